"""SparseMixer-v2 (Liu et al., 2024, "GRIN: GRadient-INformed MoE"): sampled top-k routing
with a Heun third-order router gradient, one expert per step.

Shape legend: T tokens, E experts, K experts per token.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_moe.errors import ConfigError
from lightning_moe.estimators.base import Estimator
from lightning_moe.estimators.jitter import (
    draw_coins,
    gumbel_max,
    jitter_mask,
    masked_softmax,
    midpoint_gate,
    midpoint_scale,
)
from lightning_moe.estimators.registry import register_estimator
from lightning_moe.routing import Routing

#: Heun's third-order rule: a draw other than the argmax keeps c = 1 with this probability, else c = 1/3.
_KEEP_ONE_PROB = 0.25
_LOW_SCALE = 1.0 / 3.0


@register_estimator(
    "sparsemixer_v2", description="GRIN's SparseMixer-v2: sampled top-k with a Heun third-order router gradient."
)
class SparseMixerV2(Estimator):
    """SparseMixer-v2 (GRIN) for any ``1 <= top_k <= num_experts``.

    k = 1 and k = 2 are the paper's; a larger k repeats the same step and is an extension.
    Step j = 1..k, per token with logits z:

    1. s = z with the experts chosen in earlier steps set to -inf; m = max s.
    2. Mask ``(m - z_i) / max(|z_i|, m) > 2 * jitter_eps`` from the original z against this
       m, plus the earlier picks; g = softmax of z over the unmasked experts.
    3. Training: D_j ~ g (Gumbel-max); c_j = 1 if D_j = argmax g, else 1 with probability
       1/4 and 1/3 (float32) with probability 3/4. Eval: D_j = argmax g, c_j = 1.
    4. Gate ``w_j = c_j * g_{D_j}``. Training backward: dL/dz += G_j * g_{D_j} * (e_{D_j} - g),
       with G_j = dL/dw_j, independent of c_j and with no autograd through g; g is 0 on the
       masked and earlier-picked experts, so step 2 puts no gradient on z_{D_1}.

    The weights are not renormalised, in training or eval. Eval gates get plain autograd
    through g, which is the same formula with c_j = 1. All of this runs in float32, also
    under autocast (in bf16, 1/3 would be 0.334).

    Expert gradients: the experts backend multiplies each expert output by w_j, so expert
    gradients are scaled by ``c_j * g_{D_j}``. GRIN's released code does this; the paper's
    Algorithm 1 does not scale them by c_j.

    GRIN also multiplies the hidden states by U(1 - delta, 1 + delta) noise in training
    (delta = 0.01) before router and experts: that is ``MoELayer(input_jitter=0.01)``.

    Telemetry: ``zero_router_grad_fraction`` is the share of tokens whose router gradient
    is structurally zero (every step left a single expert unmasked); ``mean_gate_scale``
    is the mean c_j over tokens and steps.

    Args:
        jitter_eps: the jitter mask's eps (reference default 0.01).
    """

    softmax_only_reason = "its router gradient is derived for sampling experts from a softmax of the logits"

    def __init__(self, jitter_eps: float = 0.01) -> None:
        super().__init__()
        if not 0.0 <= jitter_eps < float("inf"):
            raise ConfigError(f"jitter_eps must be a finite number >= 0, got {jitter_eps}")
        self.jitter_eps = jitter_eps

    def bind(self, *, num_experts: int, top_k: int, d_model: int) -> None:
        if not 1 <= top_k <= num_experts:
            raise ConfigError(f"top_k must be in [1, num_experts={num_experts}], got top_k={top_k}")

    def route(self, logits_TE: Tensor, top_k: int) -> Routing:
        with torch.autocast(device_type=logits_TE.device.type, enabled=False):
            z_TE = logits_TE.float()
            picked_TE = torch.zeros_like(z_TE, dtype=torch.bool)
            single_survivor_T = torch.ones_like(z_TE[:, 0], dtype=torch.bool)
            indices, gates, scales = [], [], []
            for _ in range(top_k):
                with torch.no_grad():  # piecewise constant in z: nothing here is kept for backward
                    remaining_TE = z_TE.masked_fill(picked_TE, float("-inf"))
                    reference_T1, argmax_T1 = remaining_TE.max(dim=-1, keepdim=True)  # first index of ties
                    argmax_T = argmax_T1.squeeze(-1)
                mask_TE = jitter_mask(z_TE, reference_T1, self.jitter_eps) | picked_TE
                if self.training:
                    index_T = gumbel_max(z_TE, mask_TE)
                    coin_T = draw_coins(z_TE.shape[0], _KEEP_ONE_PROB, z_TE.device)
                    scale_T = midpoint_scale(index_T, argmax_T, coin_T, _LOW_SCALE)
                    gate_T = midpoint_gate(z_TE, mask_TE, index_T, scale_T, grad_factor=1.0)
                else:
                    index_T = argmax_T
                    scale_T = torch.ones_like(z_TE[:, 0])
                    gate_T = masked_softmax(z_TE, mask_TE).gather(-1, index_T.unsqueeze(-1)).squeeze(-1)
                single_survivor_T &= (~mask_TE).sum(dim=-1) == 1
                picked_TE = picked_TE.scatter(-1, index_T.unsqueeze(-1), True)
                indices.append(index_T)
                gates.append(gate_T)
                scales.append(scale_T)
            telemetry = {
                "zero_router_grad_fraction": single_survivor_T.float().mean().detach(),
                "mean_gate_scale": torch.stack(scales).mean().detach(),
            }
            return Routing(
                indices=torch.stack(indices, dim=-1),
                weights=torch.stack(gates, dim=-1),
                probs=z_TE.softmax(dim=-1),
                telemetry=telemetry,
            )

    def extra_repr(self) -> str:
        return f"jitter_eps={self.jitter_eps}"
