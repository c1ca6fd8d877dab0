"""Dropless expert FFNs behind one parameter layout and several interchangeable backends.

Shape legend: T tokens, D model width, F expert hidden width, E experts, K experts per
token, N = T * K (token, slot) pairs.

Every backend computes ``y_T = sum_k weights_TK[t, k] * FFN_{indices_TK[t, k]}(x_T)`` for
every pair (no capacity factor, no dropped tokens), and gradients flow to ``x``, the
expert parameters and the routing weights. The parameters use
one layout for all backends, so a checkpoint moves between backends: ``w2`` [E, F, D] and
the first projection ``w1``, for SwiGLU the gate and up projections side by side,
[E, D, 2F] (columns ``:F`` the gate, ``F:`` the up projection; expert e computes
``(silu(x @ w1[e, :, :F]) * (x @ w1[e, :, F:])) @ w2[e]``), for GELU [E, D, F]. Side by
side, the two run as one grouped GEMM twice as wide, as Hugging Face's ``gate_up_proj``
does, with no per-step concatenation of the weights or split of their gradient.
Checkpoints of the earlier layout (separate ``w1`` and ``v1`` [E, D, F]) load unchanged
(:func:`merge_gate_and_up`). With ``bias=True`` each expert also adds ``b1`` [E, H] to its first
projection and ``b2`` [E, D] to its output (gpt-oss). The first projection is stored [D, 2F] rather than
nn.Linear's [2F, D] because the grouped GEMM's backward is about twice as fast on
contiguous operands than on transposed views.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_moe.errors import ConfigError

if TYPE_CHECKING:
    from lightning_moe.experts.expert_parallel import ExpertShard

ACTIVATIONS = ("swiglu", "gelu")
#: What experts may run: :data:`ACTIVATIONS` and gpt-oss's clamped SwiGLU (experts only; no dense FFN uses it).
EXPERT_ACTIVATIONS = (*ACTIVATIONS, "clamped_swiglu")
BACKENDS = ("auto", "loop", "torch", "megablocks")


class ExpertStats(NamedTuple):
    """Per-expert facts about one forward, all without grad."""

    tokens_per_expert: Tensor  # [E] int64: (token, slot) pairs routed to each expert
    output_sum: Tensor | None = None  # [E, D] float32: sum of FFN_e(x) over its pairs
    weighted_output_sum: Tensor | None = None  # [E, D] float32: sum of weight * FFN_e(x)


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype expert matmuls run in: autocast's when it is on, else the input's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def count_per_expert(expert_ids: Tensor, num_experts: int) -> Tensor:
    """[E] int64: how often each expert id occurs, computed without leaving the device.

    Not ``torch.bincount``: on CUDA it reads the input's min and max back to the host, two
    synchronisations per MoE layer and step; a scatter-add of ones into ``num_experts``
    bins never does (and is deterministic for a 1-D input).
    """
    ids_N = expert_ids.reshape(-1)
    counts_E = torch.zeros(num_experts, dtype=torch.long, device=ids_N.device)
    return counts_E.scatter_add_(0, ids_N, torch.ones_like(ids_N))


def expert_output_sums(
    expert_ids_N: Tensor, out_ND: Tensor, weights_N: Tensor, num_experts: int
) -> tuple[Tensor, Tensor]:
    """Per-expert sums of outputs and of weighted outputs (float32, no grad)."""
    out_ND = out_ND.detach().float()
    output_sum = out_ND.new_zeros(num_experts, out_ND.shape[1]).index_add_(0, expert_ids_N, out_ND)
    weighted = out_ND * weights_N.detach().float()[:, None]
    weighted_sum = out_ND.new_zeros(num_experts, out_ND.shape[1]).index_add_(0, expert_ids_N, weighted)
    return output_sum, weighted_sum


class Activation(NamedTuple):
    """An expert nonlinearity: its name, and the clamped SwiGLU's constants (unused by the others).

    ``"clamped_swiglu"`` (gpt-oss): with h = [g | u] (gate, then up),
    ``(clamp(u, -limit, limit) + 1) * g' * sigmoid(alpha * g')`` where ``g' = min(g, limit)``.
    The defaults are gpt-oss's ``swiglu_alpha`` and ``swiglu_limit``.
    """

    name: str = "swiglu"
    alpha: float = 1.702  # gpt-oss's swiglu_alpha
    limit: float = 7.0  # gpt-oss's swiglu_limit


class Experts(nn.Module):
    """E feed-forward experts in one parameter layout, run by a chosen backend.

    Args:
        d_model: model width D.
        ffn_hidden: hidden width F of each expert.
        num_experts: E.
        activation: ``"swiglu"`` (``silu(x w1[:, :F]) * (x w1[:, F:])``), ``"gelu"`` or
            ``"clamped_swiglu"`` (gpt-oss; :class:`Activation`, with ``swiglu_alpha`` and
            ``swiglu_limit``).
        backend: ``"loop"`` (reference), ``"torch"`` (sorted grouped GEMM),
            ``"megablocks"`` (GPU) or ``"auto"`` (fastest available for the input).
        bias: each expert adds ``b1`` [E, H] to its first projection and ``b2`` [E, D] to its
            output (zero-initialised); gpt-oss's experts have them.
    """

    def __init__(
        self,
        d_model: int,
        ffn_hidden: int,
        num_experts: int,
        activation: str = "swiglu",
        backend: str = "auto",
        bias: bool = False,
        swiglu_alpha: float = Activation._field_defaults["alpha"],
        swiglu_limit: float = Activation._field_defaults["limit"],
    ) -> None:
        super().__init__()
        if activation not in EXPERT_ACTIVATIONS:
            raise ConfigError(f"activation={activation!r} is not valid; choose one of {EXPERT_ACTIVATIONS}")
        if backend not in BACKENDS:
            raise ConfigError(f"backend={backend!r} is not valid; choose one of {BACKENDS}")
        for name, value in (("swiglu_alpha", swiglu_alpha), ("swiglu_limit", swiglu_limit)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")
        self.d_model, self.ffn_hidden, self.num_experts = d_model, ffn_hidden, num_experts
        self.activation = activation
        self.activation_spec = Activation(activation, float(swiglu_alpha), float(swiglu_limit))
        self.backend = backend
        first_width = ffn_hidden if activation == "gelu" else 2 * ffn_hidden
        self.w1 = nn.Parameter(torch.empty(num_experts, d_model, first_width))
        self.w2 = nn.Parameter(torch.empty(num_experts, ffn_hidden, d_model))
        self.b1 = nn.Parameter(torch.zeros(num_experts, first_width)) if bias else None
        self.b2 = nn.Parameter(torch.zeros(num_experts, d_model)) if bias else None
        # Set by the expert-parallel strategies while this module holds only its rank's slice
        # of the experts (then w1/w2 have E / ep rows, or are DTensors of E rows under
        # ExpertParallelFSDP2Strategy); None when it holds all of them.
        self.expert_parallel: ExpertShard | None = None
        self.register_load_state_dict_pre_hook(merge_gate_and_up)
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02, out_std: float | None = None) -> None:
        # The gate, then the up projection, drawn separately: the same values for a seed as
        # when they were two parameters.
        with torch.no_grad():
            halves = self.w1.split(self.ffn_hidden, dim=2)
            self.w1.copy_(torch.cat([torch.empty_like(half).normal_(std=std) for half in halves], dim=2))
        nn.init.normal_(self.w2, std=std if out_std is None else out_std)
        for bias in (self.b1, self.b2):
            if bias is not None:
                nn.init.zeros_(bias)

    def activate(self, h_NH: Tensor) -> Tensor:
        """The expert nonlinearity applied to the first projection ``x @ w1`` ([..., 2F] for SwiGLU)."""
        return activate(self.activation_spec, h_NH)

    def expert_ffn(self, e: int, x_nD: Tensor, w1: Tensor | None = None, w2: Tensor | None = None) -> Tensor:
        """FFN_e(x) of rows ``x_nD``: with expert e's ``w1``/``w2`` if given (e.g. cast), else its own
        cast to the rows' dtype; biases added when the experts have them."""
        w1 = self.w1[e].to(x_nD.dtype) if w1 is None else w1
        w2 = self.w2[e].to(x_nD.dtype) if w2 is None else w2
        h_nH = x_nD @ w1
        if self.b1 is not None:
            h_nH = h_nH + self.b1[e].to(x_nD.dtype)
        out_nD = self.activate(h_nH) @ w2
        return out_nD if self.b2 is None else out_nD + self.b2[e].to(x_nD.dtype)

    def expert_biases(self, dtype: torch.dtype) -> tuple[Tensor, Tensor] | None:
        """``(b1, b2)`` in ``dtype``, or None for experts without biases."""
        if self.b1 is None:
            return None
        return self.b1.to(dtype), self.b2.to(dtype)

    @property
    def megablocks_refusal(self) -> str | None:
        """Why MegaBlocks cannot run these experts (its kernels have no biases and no clamped SwiGLU), or None."""
        parts = [what for what, present in (("expert biases", self.b1 is not None),
                                            ("activation='clamped_swiglu'", self.activation == "clamped_swiglu"))
                 if present]
        return f"backend='megablocks' does not support {' or '.join(parts)}; use backend='torch' or 'loop'" if parts else None

    def expert_weights(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``(w1, w2)`` in ``dtype``, as this rank's local tensors.

        Under expert parallelism inside FSDP2 the parameters are DTensors sharded over the
        expert-parallel ranks; a rank computes with the experts it owns (``to_local`` carries
        the gradient back to the DTensor).
        """
        w1, w2 = self.w1, self.w2
        if hasattr(w1, "to_local"):
            w1, w2 = w1.to_local(), w2.to_local()
        return w1.to(dtype), w2.to(dtype)

    def resolved_backend(self, x_TD: Tensor) -> str:
        """The backend that will run for this input (resolves ``"auto"``)."""
        if self.backend != "auto":
            return self.backend
        backend = auto_backend(x_TD.device, compute_dtype(x_TD))
        return "torch" if backend == "megablocks" and self.megablocks_refusal else backend

    def forward(
        self, x_TD: Tensor, indices_TK: Tensor, weights_TK: Tensor, return_output_sums: bool = False
    ) -> tuple[Tensor, ExpertStats]:
        if self.expert_parallel is not None:
            if self.b1 is not None:
                raise ConfigError("expert parallelism does not support expert biases (bias=True); run without it")
            from lightning_moe.experts.expert_parallel import expert_parallel_experts

            return expert_parallel_experts(self, x_TD, indices_TK, weights_TK, return_output_sums)
        return get_backend(self.resolved_backend(x_TD))(self, x_TD, indices_TK, weights_TK, return_output_sums)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, ffn_hidden={self.ffn_hidden}, num_experts={self.num_experts}, "
            f"activation={self.activation!r}, backend={self.backend!r}"
            + (f", swiglu_alpha={self.activation_spec.alpha}, swiglu_limit={self.activation_spec.limit}"
               if self.activation == "clamped_swiglu" else "")
            + (", bias=True" if self.b1 is not None else "")
            + ("" if self.expert_parallel is None else f", expert_parallel={self.expert_parallel}")
        )


def activate(activation: str | Activation, h_NH: Tensor, in_place: bool = False) -> Tensor:
    """``silu(h1) * h3`` for ``"swiglu"`` (h = [h1 | h3], gate then up), ``gelu(h)`` for ``"gelu"``,
    gpt-oss's clamped SwiGLU for ``"clamped_swiglu"`` (:class:`Activation`).

    ``in_place`` multiplies into silu's output instead of a new tensor (outside autograd only).
    """
    spec = Activation(activation) if isinstance(activation, str) else activation
    if spec.name == "clamped_swiglu":
        gate_NF, up_NF = h_NH.chunk(2, dim=-1)
        gate_NF = gate_NF.clamp(max=spec.limit)
        return (up_NF.clamp(-spec.limit, spec.limit) + 1) * (gate_NF * torch.sigmoid(gate_NF * spec.alpha))
    if spec.name != "swiglu":
        return F.gelu(h_NH)
    h1_NF, h3_NF = h_NH.chunk(2, dim=-1)
    silu_NF = F.silu(h1_NF)
    return silu_NF.mul_(h3_NF) if in_place else silu_NF * h3_NF


def merge_gate_and_up(module: Experts, state_dict: dict, prefix: str, *args) -> None:
    """``load_state_dict`` pre-hook: a checkpoint of the earlier layout, ``w1`` (gate) and
    ``v1`` (up) [E, D, F], becomes the one side-by-side ``w1`` [E, D, 2F]."""
    if prefix + "v1" in state_dict and prefix + "w1" in state_dict:
        state_dict[prefix + "w1"] = torch.cat([state_dict[prefix + "w1"], state_dict.pop(prefix + "v1")], dim=2)


BackendFn = Callable[[Experts, Tensor, Tensor, Tensor, bool], "tuple[Tensor, ExpertStats]"]


def get_backend(name: str) -> BackendFn:
    """The forward function of a backend; MegaBlocks is imported only when asked for."""
    if name == "loop":
        from lightning_moe.experts.loop import loop_experts

        return loop_experts
    if name == "torch":
        from lightning_moe.experts.grouped import grouped_experts

        return grouped_experts
    if name == "megablocks":
        from lightning_moe.experts.megablocks import megablocks_experts

        return megablocks_experts
    raise ConfigError(f"backend={name!r} is not valid; choose one of {BACKENDS}")


@functools.cache
def megablocks_available() -> bool:
    """Whether a GPU is present and every package the megablocks backend imports is installed.

    Cached: ``auto`` asks on every forward, and a failed import is slow to repeat.
    """
    if not torch.cuda.is_available():
        return False
    from lightning_moe.experts.megablocks import missing_packages

    return not missing_packages()


def auto_backend(device: torch.device, dtype: torch.dtype) -> str:
    """Fastest backend for a device and compute dtype.

    CPU: the grouped GEMM (``benchmarks/moe_layer.py``). CUDA: MegaBlocks when installed
    and the compute dtype is bf16 (its grouped GEMM is bf16-only), else the torch grouped
    GEMM; which of the two is faster on an H100 is for ``benchmarks/gpu_backends.py`` to show.
    """
    if device.type == "cuda" and dtype == torch.bfloat16 and megablocks_available():
        return "megablocks"
    return "torch"


def init_std_for_depth(n_layers: int, std: float = 0.02) -> float:
    """Scaled init for residual output projections (GPT-2: std / sqrt(2 * n_layers))."""
    return std / math.sqrt(2 * n_layers)
