"""SparseMixer (Liu et al., 2023, "Sparse Backpropagation for MoE Training"): top-1 routing
with a mid-point router gradient.

Shape legend: T tokens, E experts, K experts per token (always 1 here).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

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

#: Mid-point rule: a draw other than the argmax keeps c = 1 with this probability, else c = 1/2.
_KEEP_ONE_PROB = 0.5
_LOW_SCALE = 0.5
#: The gate's incoming gradient is doubled before it flows through p_D.
_GRAD_FACTOR = 2.0


def _check_top_1(top_k: int) -> None:
    if top_k != 1:
        raise ConfigError(f"SparseMixer is top-1 only; use sparsemixer_v2 for top_k=2 (got top_k={top_k}).")


@register_estimator("sparsemixer", description="SparseMixer: top-1 sampled routing with a mid-point router gradient.")
class SparseMixer(Estimator):
    """SparseMixer, top-1 only (``top_k=1``; use ``sparsemixer_v2`` for more).

    Training, per token with logits z: m = max z; experts with
    ``(m - z_i) / max(|z_i|, m) > 2 * jitter_eps`` are masked; p = softmax over the rest.
    D ~ p (Gumbel-max). c = 1 if D = argmax z, else 1 or 1/2 with probability 1/2 each.
    The gate is ``w = c * p_D``; its router gradient is ``2 * G * p_D * (e_D - p)`` with
    G = dL/dw, independent of c, exactly 0 on masked experts, and exactly 0 for a token
    whose mask leaves a single expert (reported as ``zero_router_grad_fraction``;
    ``mean_gate_scale`` is the mean c).

    Eval: D = argmax z and ``w = p_D`` of the masked softmax (not the plain softmax), with
    plain autograd. ``Routing.probs`` is always the plain softmax of z.

    Args:
        jitter_eps: the jitter mask's eps (reference default 0.1).
        learnable_omega: add a learnable vector omega (init ones) to the layer. It has one
            entry per expert (shape [E], created in :meth:`bind`) and scales the chosen
            expert's gate, ``w = omega_D * c * p_D``, i.e. that expert's output for the
            token. The router gradient then carries ``omega_D`` as well:
            ``2 * G * omega_D * p_D * (e_D - p)``.
    """

    softmax_only_reason = "its router gradient is derived for sampling experts from a softmax of the logits"

    def __init__(self, jitter_eps: float = 0.1, learnable_omega: bool = False) -> None:
        super().__init__()
        if not 0.0 <= jitter_eps < float("inf"):
            raise ConfigError(f"jitter_eps must be a finite number >= 0, got {jitter_eps}")
        self.jitter_eps = jitter_eps
        self.learnable_omega = learnable_omega
        self.register_parameter("omega", None)

    def bind(self, *, num_experts: int, top_k: int, d_model: int) -> None:
        _check_top_1(top_k)
        if self.learnable_omega:
            self.omega = nn.Parameter(torch.ones(num_experts))

    def route(self, logits_TE: Tensor, top_k: int) -> Routing:
        _check_top_1(top_k)
        with torch.autocast(device_type=logits_TE.device.type, enabled=False):
            z_TE = logits_TE.float()
            mask_TE = jitter_mask(z_TE, z_TE.max(dim=-1, keepdim=True).values, self.jitter_eps)
            argmax_T = z_TE.argmax(dim=-1)
            if self.training:
                index_T = gumbel_max(z_TE, mask_TE)
                coin_T = draw_coins(z_TE.shape[0], _KEEP_ONE_PROB, z_TE.device)
                scale_T = midpoint_scale(index_T, argmax_T, coin_T, _LOW_SCALE)
                gate_T = midpoint_gate(z_TE, mask_TE, index_T, scale_T, _GRAD_FACTOR)
            else:
                index_T = argmax_T
                scale_T = torch.ones_like(z_TE[:, 0])
                gate_T = masked_softmax(z_TE, mask_TE).gather(-1, index_T.unsqueeze(-1)).squeeze(-1)
            if self.omega is not None:
                gate_T = gate_T * self.omega.float()[index_T]
            telemetry = {
                "zero_router_grad_fraction": ((~mask_TE).sum(dim=-1) == 1).float().mean().detach(),
                "mean_gate_scale": scale_T.mean().detach(),
            }
            return Routing(
                indices=index_T.unsqueeze(-1),
                weights=gate_T.unsqueeze(-1),
                probs=z_TE.softmax(dim=-1),
                telemetry=telemetry,
            )

    def extra_repr(self) -> str:
        return f"jitter_eps={self.jitter_eps}, learnable_omega={self.learnable_omega}"
