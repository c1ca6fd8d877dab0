"""DenseMixer (Yao et al., 2025, "Improving MoE Post-Training with Precise Router Gradients"):
a Top-K forward pass whose router gets the gradient of the dense mixture of all experts.

Shape legend: T tokens, D model width, F expert hidden width, E experts, K experts per token.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from lightning_moe.errors import ConfigError
from lightning_moe.estimators.registry import register_estimator
from lightning_moe.estimators.topk import TopK
from lightning_moe.experts import compute_dtype
from lightning_moe.routing import Routing

if TYPE_CHECKING:
    from lightning_moe.experts import Experts


def expert_output(experts: Experts, e: int, x_nD: Tensor) -> Tensor:
    """FFN_e(x) for rows of ``x_nD``, casting only expert e's weights to the rows' dtype."""
    return experts.expert_ffn(e, x_nD)


class _UnselectedExperts(torch.autograd.Function):
    """Forward: exactly 0 [T, D]. Backward: dL/du_{t,i} = <dL/dy_t, E_i(x_t)> for every (t, i).

    ``u`` [T, E] is the weight of the unselected experts in the dense mixture (0, with no
    gradient, where selected), so the term stands for sum_i u_i E_i(x) with E_i(x) a
    constant: its value is never added (the forward stays Top-K) and no autograd graph is
    built through the experts. Backward runs one expert at a time over all tokens,
    without grad, so nothing larger than one expert's [T, F] activations and [T, D]
    output exists at once (never a [T, E, D] tensor). All tokens rather than only those
    that skipped the expert: the extra rows cost K/E of this pass, while selecting rows
    would size each expert's matmul by a count read back from the device.
    """

    @staticmethod
    def forward(ctx, unselected_weights_TE: Tensor, x_TD: Tensor, experts: Experts) -> Tensor:
        ctx.save_for_backward(x_TD)
        ctx.experts, ctx.dtype, ctx.num_experts = experts, compute_dtype(x_TD), unselected_weights_TE.shape[1]
        return x_TD.new_zeros(x_TD.shape, dtype=torch.float32)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_TD: Tensor):
        (x_TD,) = ctx.saved_tensors
        x_TD, grad_TD = x_TD.to(ctx.dtype), grad_TD.float()
        grad_TE = grad_TD.new_empty(x_TD.shape[0], ctx.num_experts)
        with torch.no_grad(), torch.autocast(device_type=x_TD.device.type, enabled=False):
            for e in range(ctx.num_experts):
                grad_TE[:, e] = (expert_output(ctx.experts, e, x_TD).float() * grad_TD).sum(dim=-1)
        return grad_TE, None, None


@register_estimator(
    "densemixer",
    description="Top-K forward; the router gets the dense mixture's gradient (every expert run once more in backward).",
)
class DenseMixer(TopK):
    """Top-K routing whose router gradient is that of the dense mixture of all E experts.

    The forward pass is :class:`TopK`'s, bit for bit (same selection, same gates, same
    ``renormalize``). The router's gradient is the one of (Yao et al., 2025, Sec. 3)::

        y_dense = sum_{i=1..E} w_i(z) E_i(x),   so   dL/dw_i = <dL/dy, E_i(x)> for every i,

    pushed through the gate function w(z): with pi = softmax(z) and A the chosen set,
    w_i = pi_i without renormalisation; with it, w_i = pi_i / S for i in A and
    w_i = pi_i / stopgrad(S) for i not in A, where S = sum_{j in A} pi_j, as DenseMixer's
    released code keeps the unchosen entries scaled by the detached normaliser.

    Sigmoid routing (the layer's ``score_function="sigmoid"``, DeepSeek-V3 and its
    descendants; the released DenseMixer patches softmax families only) takes the same
    weight function with s_i = sigmoid(z_i) for pi_i and the routed scaling factor c::

        w_i = c * s_i / S          for i in A      (S = sum_{j in A} s_j; S = 1 without renormalisation)
        w_i = c * s_i / stopgrad(S) for i not in A

    Since ds_i/dz_i = s_i (1 - s_i) and s_i depends on z_i alone, the router gradient is,
    with g_i = <dL/dy, E_i(x)> for every i and G = sum_{j in A} g_j s_j / S::

        dL/dz_i = c * s_i (1 - s_i) * (g_i - G) / S    for i in A   (G's term only when renormalised)
        dL/dz_i = c * s_i (1 - s_i) * g_i / S          for i not in A

    The first line is Top-K's own gradient (the chosen gates); the second is what the dense
    mixture adds. Selection (group-limited, biased) only decides A; it is constant in z.

    The chosen experts' part is the ordinary Top-K gradient through ``Routing.weights``;
    the unchosen experts' part comes from :meth:`output_correction`, a term whose value is
    0 and whose backward evaluates every expert on every token once more, one expert at a
    time, without grad. So the experts' parameters get exactly Top-K's sparse gradient,
    and backward costs about one dense forward of all E experts more (DenseMixer quotes
    ~1.46x training FLOPs at Qwen3-30B-A3B shapes).

    Works on every single-process backend (the extra expert evaluations use the shared
    parameter layout directly); refused under expert parallelism, where a rank holds
    only its own experts. Double backward is not supported.

    Args:
        renormalize: divide the chosen gates by their sum (Mixtral, Qwen3-MoE, DeepSeek-V3,
            ``norm_topk_prob``).
        jitter_eps: router jitter on the logits in training, as in :class:`TopK`.
    """

    def output_correction(
        self, routing: Routing, x_TD: Tensor | None = None, experts: Experts | None = None
    ) -> Tensor | None:
        if not (torch.is_grad_enabled() and routing.gate_scores.requires_grad):
            return None
        if x_TD is None or experts is None:
            raise ValueError("DenseMixer.output_correction needs the layer input x_TD and its experts")
        if experts.expert_parallel is not None:
            raise ConfigError(
                "estimator='densemixer' does not support expert parallelism (each rank holds only its own experts,"
                " and the dense router gradient needs every expert on every token); use a data-parallel strategy"
            )
        unselected_weights_TE = self.scoring.unselected_weights(routing, self.renormalize)
        return _UnselectedExperts.apply(unselected_weights_TE, x_TD.detach(), experts)
