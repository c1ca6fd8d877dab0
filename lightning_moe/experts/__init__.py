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
(:func:`merge_gate_and_up`). The first projection is stored [D, 2F] rather than
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


class Experts(nn.Module):
    """E feed-forward experts in one parameter layout, run by a chosen backend.

    Args:
        d_model: model width D.
        ffn_hidden: hidden width F of each expert.
        num_experts: E.
        activation: ``"swiglu"`` (``silu(x w1[:, :F]) * (x w1[:, F:])``) or ``"gelu"``.
        backend: ``"loop"`` (reference), ``"torch"`` (sorted grouped GEMM),
            ``"megablocks"`` (GPU) or ``"auto"`` (fastest available for the input).
    """

    def __init__(
        self, d_model: int, ffn_hidden: int, num_experts: int, activation: str = "swiglu", backend: str = "auto"
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ConfigError(f"activation={activation!r} is not valid; choose one of {ACTIVATIONS}")
        if backend not in BACKENDS:
            raise ConfigError(f"backend={backend!r} is not valid; choose one of {BACKENDS}")
        self.d_model, self.ffn_hidden, self.num_experts = d_model, ffn_hidden, num_experts
        self.activation = activation
        self.backend = backend
        first_width = 2 * ffn_hidden if activation == "swiglu" else ffn_hidden
        self.w1 = nn.Parameter(torch.empty(num_experts, d_model, first_width))
        self.w2 = nn.Parameter(torch.empty(num_experts, ffn_hidden, d_model))
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

    def activate(self, h_NH: Tensor) -> Tensor:
        """The expert nonlinearity applied to the first projection ``x @ w1`` ([..., 2F] for SwiGLU)."""
        return activate(self.activation, h_NH)

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
        return auto_backend(x_TD.device, compute_dtype(x_TD))

    def forward(
        self, x_TD: Tensor, indices_TK: Tensor, weights_TK: Tensor, return_output_sums: bool = False
    ) -> tuple[Tensor, ExpertStats]:
        if self.expert_parallel is not None:
            from lightning_moe.experts.expert_parallel import expert_parallel_experts

            return expert_parallel_experts(self, x_TD, indices_TK, weights_TK, return_output_sums)
        return get_backend(self.resolved_backend(x_TD))(self, x_TD, indices_TK, weights_TK, return_output_sums)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, ffn_hidden={self.ffn_hidden}, num_experts={self.num_experts}, "
            f"activation={self.activation!r}, backend={self.backend!r}"
            + ("" if self.expert_parallel is None else f", expert_parallel={self.expert_parallel}")
        )


def activate(activation: str, h_NH: Tensor, in_place: bool = False) -> Tensor:
    """``silu(h1) * h3`` for ``"swiglu"`` (h = [h1 | h3], gate then up), ``gelu(h)`` for ``"gelu"``.

    ``in_place`` multiplies into silu's output instead of a new tensor (outside autograd only).
    """
    if activation != "swiglu":
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
