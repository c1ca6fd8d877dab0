"""gpt-oss's experts read into, and written back from, :class:`~lightning_moe.Experts`' layout.

Shape legend: D model width, F expert hidden width, E experts.

``transformers``' ``GptOssExperts`` keeps ``gate_up_proj`` [E, D, 2F] with the gate and up
columns interleaved (gate at even columns, up at odd ones), ``gate_up_proj_bias`` [E, 2F]
interleaved the same way, ``down_proj`` [E, F, D] and ``down_proj_bias`` [E, D], computes
``x @ W + b`` (no transpose) and activates with a clamped SwiGLU of constants ``alpha`` and
``limit``. :class:`~lightning_moe.Experts` with ``activation="clamped_swiglu", bias=True``
keeps ``w1`` [E, D, 2F] and ``b1`` [E, 2F] with the gate columns first, ``w2`` [E, F, D] and
``b2`` [E, D]. So ``w1`` and ``b1`` are the interleaved tensors with their last dimension
de-interleaved, ``w2`` and ``b2`` are ``down_proj`` and its bias as they are. Which block holds
such experts is decided by its structure (the two biases and the clamp's constants); that the
reading is right is decided by running the block's own experts on a probe
(:func:`lightning_moe.hf.blocks.check_expert_function` against :func:`expected_output`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_moe.experts import Activation, activate

GATE_UP_BIAS, DOWN_BIAS = "gate_up_proj_bias", "down_proj_bias"
#: The parameters of gpt-oss-style experts, in ``transformers``' names.
PARAMETERS = ("gate_up_proj", "down_proj", GATE_UP_BIAS, DOWN_BIAS)


class BiasedExpertsError(Exception):
    """What gpt-oss-style experts have that the reading here does not represent (one short phrase)."""


def has_biased_clamped_experts(experts: nn.Module) -> bool:
    """Whether ``experts`` has gpt-oss's structure: both biases and the clamped SwiGLU's ``alpha`` and ``limit``."""
    params = dict(experts.named_parameters(recurse=False))
    return GATE_UP_BIAS in params and DOWN_BIAS in params and hasattr(experts, "limit") and hasattr(experts, "alpha")


def deinterleave(gate_up: Tensor) -> Tensor:
    """Interleaved gate/up columns (gate at even positions) to gate columns first, along the last dimension."""
    return torch.cat([gate_up[..., ::2], gate_up[..., 1::2]], dim=-1)


def interleave(gate_then_up: Tensor) -> Tensor:
    """The inverse of :func:`deinterleave`."""
    gate, up = gate_then_up.chunk(2, dim=-1)
    return torch.stack([gate, up], dim=-1).flatten(-2)


def clamped_swiglu_of(experts: nn.Module) -> Activation:
    """The experts' clamped SwiGLU, its constants read from them."""
    alpha, limit = experts.alpha, experts.limit
    for name, value in (("alpha", alpha), ("limit", limit)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
            raise BiasedExpertsError(f"a clamped SwiGLU whose {name}={value!r} is not a finite number > 0")
    return Activation("clamped_swiglu", float(alpha), float(limit))


def check_biased_layout(experts: nn.Module, num_experts: int, d_model: int) -> tuple[int, Activation]:
    """``(F, activation)`` of gpt-oss-style experts, after checking their parameters' names and shapes.

    Whether they compute what :func:`expected_output` says is for the caller's probe to decide.
    """
    activation = clamped_swiglu_of(experts)
    extra = sorted(name for name, _ in experts.named_parameters() if name not in PARAMETERS)
    if extra:
        raise BiasedExpertsError(f"biased experts with other parameters ({', '.join(extra)})")
    two_f = experts.gate_up_proj.shape[2]
    shapes = {"gate_up_proj": (num_experts, d_model, two_f), "down_proj": (num_experts, two_f // 2, d_model),
              GATE_UP_BIAS: (num_experts, two_f), DOWN_BIAS: (num_experts, d_model)}
    got = {name: tuple(getattr(experts, name).shape) for name in PARAMETERS}
    if two_f % 2 or got != shapes:
        raise BiasedExpertsError(
            "biased experts in a layout other than gate_up_proj [E, D, 2F], down_proj [E, F, D] and their biases"
            f" [E, 2F], [E, D] (got {', '.join(f'{k} {v}' for k, v in got.items())})"
        )
    return two_f // 2, activation


def probe_reaching_clamps(x_TD: Tensor, activation: Activation) -> Tensor:
    """``x_TD`` with its second half of rows scaled up, so the probe's first projections reach both clamps."""
    x_TD = x_TD.clone()
    x_TD[x_TD.shape[0] // 2 :] *= 4 * activation.limit
    return x_TD


def expected_output(experts: nn.Module, activation: Activation, x_TD: Tensor) -> Tensor:
    """Expert 0's ``act(x W1 + b1) W2 + b2`` in float32, its weights read as :func:`read_biased_experts` reads them."""
    w1, b1, w2, b2 = (t[0].detach().float() for t in read_biased_experts(experts))
    return activate(activation, x_TD.float() @ w1 + b1) @ w2 + b2


def read_biased_experts(experts: nn.Module) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(w1, b1, w2, b2)`` in :class:`~lightning_moe.Experts`' layout (new tensors for w1 and b1)."""
    return (deinterleave(experts.gate_up_proj), deinterleave(experts.gate_up_proj_bias), experts.down_proj,
            experts.down_proj_bias)
