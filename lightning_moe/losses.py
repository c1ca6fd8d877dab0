"""Router losses as pure functions, and the autograd trick that adds them to the gradient.

Shape legend: T tokens, E experts.
"""

from __future__ import annotations

from typing import Callable, Union

import torch
from torch import Tensor

GradScale = Union[float, Tensor, Callable[[], Union[float, Tensor]]]


def load_balancing_loss(*, probs_TE: Tensor, tokens_per_expert_E: Tensor) -> Tensor:
    """Switch Transformer's auxiliary loss ``E * sum_i f_i * P_i`` (Fedus et al., eq. 4).

    ``f_i`` is expert i's share of the (token, slot) assignments (counts carry no
    gradient; pass counts summed over data-parallel ranks for GRIN's "global" scope) and
    ``P_i`` the mean plain-softmax probability of expert i over the local tokens. It
    equals 1 under perfectly uniform routing. Multiply by the weight alpha yourself.
    """
    num_experts = probs_TE.shape[-1]
    counts_E = tokens_per_expert_E.detach().to(probs_TE.dtype)
    share_E = counts_E / counts_E.sum().clamp_min(1)
    return num_experts * (share_E * probs_TE.mean(dim=0)).sum()


def router_z_loss(*, logits_TE: Tensor) -> Tensor:
    """ST-MoE's router z-loss ``mean_t (logsumexp_i z_ti)^2`` (Zoph et al., eq. 5)."""
    return torch.logsumexp(logits_TE.float(), dim=-1).square().mean()


class _AttachAuxLoss(torch.autograd.Function):
    """Identity on the activation; in backward, d(aux)/d(aux) = scale flows into the loss."""

    @staticmethod
    def forward(ctx, activation: Tensor, aux_loss: Tensor, grad_scale: GradScale) -> Tensor:
        ctx.grad_scale = grad_scale
        ctx.aux_shape, ctx.aux_dtype = aux_loss.shape, aux_loss.dtype
        # A copy, not a view (returning the input as is makes one too): autograd forbids
        # in-place ops on views made inside a custom Function, and callers add their
        # residual in place (``y += x``). One [T, D] copy per layer and forward.
        return activation.clone()

    @staticmethod
    def backward(ctx, grad_activation: Tensor):
        scale = ctx.grad_scale() if callable(ctx.grad_scale) else ctx.grad_scale
        # A tensor scale (fp16 AMP's, on the device) is multiplied in, never read to the host.
        grad_aux = torch.ones(ctx.aux_shape, dtype=ctx.aux_dtype, device=grad_activation.device) * scale
        return grad_activation, grad_aux, None


def attach_aux_loss(activation: Tensor, aux_loss: Tensor, grad_scale: GradScale = 1.0) -> Tensor:
    """Return ``activation`` unchanged, but make backward add ``grad_scale * d(aux_loss)``.

    This is how auxiliary losses reach the parameters without the user adding them to
    the loss they return. ``grad_scale`` must be whatever the training loop multiplies
    its loss by before ``backward`` (Lightning: ``1 / accumulate_grad_batches``, times
    the fp16 loss scale); it may be a tensor (0-d) or a callable, evaluated during backward.
    """
    return _AttachAuxLoss.apply(activation, aux_loss, grad_scale)
