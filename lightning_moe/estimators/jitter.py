"""Pieces shared by SparseMixer and SparseMixer-v2: the jitter mask, masked softmax,
Gumbel-max sampling, the midpoint gate scale, and the gate with its custom router gradient.

Shape legend: T tokens, E experts. Everything here runs in float32 on router logits.
"""

from __future__ import annotations

import torch
from torch import Tensor


def jitter_mask(logits_TE: Tensor, reference_T1: Tensor, eps: float) -> Tensor:
    """Experts that could never beat ``reference_T1`` under multiplicative jitter U(1 - eps, 1 + eps).

    ``mask_i = (m - z_i) / max(|z_i|, m) > 2 * eps`` with ``m = reference_T1`` (SparseMixer,
    Liu et al. 2023; GRIN, Liu et al. 2024). Without grad: the mask is piecewise constant
    in the logits. A 0/0 ratio (``z_i == m == 0``) compares False, so ties with the
    reference always survive.
    """
    with torch.no_grad():
        ratio_TE = (reference_T1 - logits_TE) / torch.maximum(logits_TE.abs(), reference_T1)
        return ratio_TE > 2 * eps


def masked_softmax(logits_TE: Tensor, mask_TE: Tensor) -> Tensor:
    """Softmax over the experts where ``mask_TE`` is False; masked entries are exactly 0."""
    return logits_TE.masked_fill(mask_TE, float("-inf")).softmax(dim=-1)


def gumbel_max(logits_TE: Tensor, mask_TE: Tensor) -> Tensor:
    """One draw per token from ``masked_softmax(logits_TE, mask_TE)``, as int64 [T].

    Gumbel-max: argmax of the logits plus Gumbel(0, 1) noise ``-log(-log U)``, U uniform
    on [tiny, 1) from torch's RNG (``torch.manual_seed`` reproduces it), so every noise
    value is finite. (Drawn from uniforms rather than as ``-log(Exp(1))`` with
    ``Tensor.exponential_``: that and its log took about 5x as long on CPU as ``uniform_``
    and two logs.) The mask is applied after the noise, so a masked expert is never drawn.
    """
    with torch.no_grad():
        tiny = torch.finfo(logits_TE.dtype).tiny
        log_exponential_TE = torch.empty_like(logits_TE).uniform_(tiny, 1.0).log_().neg_().log_()  # log(Exp(1))
        return (logits_TE - log_exponential_TE).masked_fill_(mask_TE, float("-inf")).argmax(dim=-1)


def draw_coins(num_tokens: int, prob_true: float, device: torch.device) -> Tensor:
    """``num_tokens`` independent Bernoulli(``prob_true``) draws, as bool [T]."""
    return torch.rand(num_tokens, device=device) < prob_true


def midpoint_scale(index_T: Tensor, argmax_T: Tensor, coin_T: Tensor, low: float) -> Tensor:
    """The forward gate scale c: 1 when the draw is the argmax or the coin is True, else ``low``.

    ``low`` is rounded once to float32 (so 1/3 is the float32 nearest 1/3, not 0.3333).
    """
    keep_one_T = (index_T == argmax_T) | coin_T
    one = torch.ones((), dtype=torch.float32, device=index_T.device)
    return torch.where(keep_one_T, one, torch.tensor(low, dtype=torch.float32, device=index_T.device))


class _MidpointGate(torch.autograd.Function):
    """Forward ``c * p_D`` with ``p = masked_softmax(z, mask)``; backward ``grad_factor * G * p_D * (e_D - p)`` into z.

    There is no autograd through ``p`` and no dependence on ``c``. Masked entries of ``p``
    are exactly 0, so they get exactly 0; when ``p`` is one-hot the whole row is exactly 0.
    Backward recomputes ``p`` from the logits and the mask instead of keeping it: the
    logits are shared by every call of one routing and the mask takes a byte per entry,
    where ``p`` would take a float32 [T, E] per call (SparseMixer-v2 calls once per pick).
    """

    @staticmethod
    def forward(ctx, logits_TE: Tensor, mask_TE: Tensor, index_T: Tensor, scale_T: Tensor, grad_factor: float):
        index_T1 = index_T.unsqueeze(-1)
        gate_T1 = masked_softmax(logits_TE, mask_TE).gather(-1, index_T1)
        ctx.save_for_backward(logits_TE, mask_TE, index_T1)
        ctx.grad_factor = grad_factor
        return scale_T * gate_T1.squeeze(-1)

    @staticmethod
    def backward(ctx, grad_T: Tensor):
        logits_TE, mask_TE, index_T1 = ctx.saved_tensors
        probs_TE = masked_softmax(logits_TE, mask_TE)
        coef_T1 = ctx.grad_factor * grad_T.float().unsqueeze(-1) * probs_TE.gather(-1, index_T1)
        grad_TE = (-coef_T1) * probs_TE
        grad_TE.scatter_add_(-1, index_T1, coef_T1)
        return grad_TE, None, None, None, None


def midpoint_gate(logits_TE: Tensor, mask_TE: Tensor, index_T: Tensor, scale_T: Tensor, grad_factor: float) -> Tensor:
    """Gate ``scale_T * p[D]`` [T], ``p = masked_softmax(logits_TE, mask_TE)``, whose router gradient is
    ``grad_factor * G * p_D * (e_D - p)``."""
    return _MidpointGate.apply(logits_TE, mask_TE, index_T, scale_T, grad_factor)
