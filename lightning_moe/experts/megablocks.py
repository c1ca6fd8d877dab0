"""The ``"megablocks"`` backend: MegaBlocks' dropless grouped path run on our routing (GPU).

The pipeline is that of MegaBlocks' ``ParallelDroplessMLP.grouped_forward_once``
(``mlp_impl="grouped"``): sort the (token, slot) pairs by expert, gather the token rows
into expert order with ``megablocks.ops.gather``, run each projection as one
``grouped_gemm.ops.gmm`` over the per-expert segments, and scatter the expert outputs
back with ``megablocks.ops.scatter``, whose backward also returns the gradient of the
routing weights. What differs from MegaBlocks' own layer:

* the routing (``indices``, ``weights``) comes from our estimators, so every estimator
  runs on this backend; MegaBlocks' router, its ``Arguments`` and its process-global
  load-balancing loss list are not used (balancing losses live in ``lightning_moe.losses``);
* the expert weights are the :class:`~lightning_moe.experts.Experts` parameters
  themselves: ``w1`` [E, D, 2F] (SwiGLU's gate and up side by side, one ``gmm``) and
  ``w2`` [E, F, D] are exactly ``gmm``'s ``b``
  operand with ``trans_b=False``, so nothing is copied or re-laid out and checkpoints
  are interchangeable with the CPU backends.

MegaBlocks, ``stanford-stk`` and ``grouped_gemm`` are imported only when this backend
runs (:func:`load_kernels`); ``docs/megablocks.md`` says how to install them into an
existing CUDA torch. The three kernels are reached only through :class:`Kernels`, so the
plumbing here can be checked on CPU with plain-torch stand-ins.

Shape legend: T tokens, D model width, F expert hidden width, E experts, K experts per
token, N = T * K (token, slot) pairs.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from lightning_moe.errors import ConfigError
from lightning_moe.experts import Experts, ExpertStats, compute_dtype, count_per_expert, expert_output_sums
from lightning_moe.experts.grouped import grouped_experts, grouped_ffn

INSTALL_DOC = "docs/megablocks.md"
# Order matters: megablocks imports stk at import time and looks for grouped_gemm.
PACKAGES = (
    ("stanford-stk==0.7.1", "stk"),
    ("grouped_gemm==0.3.0", "grouped_gemm.ops"),
    ("megablocks==0.10.0", "megablocks.ops"),
)
INSTALL_COMMAND = "pip install --no-build-isolation --no-deps " + " ".join(dist for dist, _ in PACKAGES)

NEEDS_CUDA_MESSAGE = "backend='megablocks' needs a CUDA GPU; use backend='torch' (CPU grouped GEMM) or 'auto'"


class Kernels(NamedTuple):
    """The three MegaBlocks / grouped_gemm entry points this backend calls.

    ``gather(x_TD, indices_N, bin_ids_N, bins_E, top_k) -> x_ND``: row i is
    ``x_TD[indices_N[i] // top_k]``.
    ``scatter(x_ND, indices_N, bin_ids_N, weights_N, bins_E, top_k) -> y_TD``: row
    ``indices_N[i]`` of a [T * K, D] buffer is ``weights_N[indices_N[i]] * x_ND[i]``; the
    K slots of each token are summed. Its backward returns gradients for ``x_ND`` and
    ``weights_N``.
    ``gmm(a_ND, b_EAB, batch_sizes_E) -> [N, B]``: segment e of ``a_ND`` (length
    ``batch_sizes_E[e]``, a CPU int64 tensor) times ``b_EAB[e]``.
    """

    gather: Callable[..., Tensor]
    scatter: Callable[..., Tensor]
    gmm: Callable[..., Tensor]


def missing_packages() -> list[str]:
    """The packages this backend needs that do not import, each with the import error."""
    missing = []
    for dist, module in PACKAGES:
        try:
            importlib.import_module(module)
        except ImportError as error:
            missing.append(f"{dist} ({error})")
    return missing


def load_kernels(device: torch.device, dtype: torch.dtype) -> Kernels:
    """Import the kernels, or say exactly why this backend cannot run here."""
    if device.type != "cuda" or not torch.cuda.is_available():
        raise RuntimeError(NEEDS_CUDA_MESSAGE)
    if dtype != torch.bfloat16:
        raise RuntimeError(
            f"backend='megablocks' computes in bfloat16 only (grouped_gemm's kernels are bf16), but the expert"
            f" compute dtype here is {dtype}. Train with precision='bf16-mixed' or 'bf16-true' (or run under"
            " torch.autocast('cuda', dtype=torch.bfloat16)), or use backend='torch'."
        )
    missing = missing_packages()
    if missing:
        raise ImportError(
            "backend='megablocks' needs megablocks, stanford-stk and grouped_gemm built against the installed"
            f" CUDA torch. Missing: {'; '.join(missing)}. Install them without letting pip replace torch"
            f" (with nvcc on PATH or CUDA_HOME set; TORCH_CUDA_ARCH_LIST='9.0' for H100):\n"
            f"    pip install ninja numpy packaging\n    {INSTALL_COMMAND}\n"
            f"{INSTALL_DOC} has the details (build time, prebuilt wheels for offline machines). A missing"
            " 'megablocks_ops' or 'grouped_gemm_backend' means the package was installed without its CUDA"
            " extension: reinstall it as above. Or use backend='torch'."
        )
    import grouped_gemm.ops
    import megablocks.ops

    return Kernels(gather=megablocks.ops.gather, scatter=megablocks.ops.scatter, gmm=grouped_gemm.ops.gmm)


def _zero_grad_of_empty_experts(w_EAB: Tensor, empty_experts: Tensor) -> Tensor:
    """``w_EAB`` whose gradient is zero for the experts that received no tokens.

    grouped_gemm allocates the weight gradient with ``torch.empty`` and leaves the slices
    of zero-token experts to its per-expert GEMMs with an empty contraction, which may not
    write them (tgale96/grouped_gemm#36); zeroing those slices costs nothing when every
    expert has tokens, and little otherwise.
    """
    w_EAB = w_EAB.view_as(w_EAB)
    w_EAB.register_hook(lambda grad: grad.index_fill(0, empty_experts, 0))
    return w_EAB


class MegaBlocksDispatch:
    """One routing's (token, slot) pairs in expert order, moved by MegaBlocks' kernels.

    The methods of :class:`~lightning_moe.experts.grouped.GroupedDispatch`: ``gather``
    (``megablocks.ops.gather``), ``ffn`` on rows sorted by expert (one ``gmm`` per
    projection) and ``combine`` (``megablocks.ops.scatter``, which also gives the routing
    weights their gradient), so expert parallelism runs MegaBlocks' kernels around its
    token exchange as the single-process backend does. Every kernel call runs with
    autocast off and explicit dtypes: stk's autocast wrappers would otherwise recast
    their floating inputs to the autocast dtype inside the autograd functions.
    """

    def __init__(self, experts: Experts, kernels: Kernels, x_TD: Tensor, indices_TK: Tensor, num_experts: int):
        self.experts, self.kernels, self.num_experts = experts, kernels, num_experts
        self.dtype, self.device_type, self.top_k = x_TD.dtype, x_TD.device.type, indices_TK.shape[1]
        expert_ids_N = indices_TK.reshape(-1)
        self.tokens_per_expert_E = count_per_expert(expert_ids_N, num_experts)
        # MegaBlocks' indices_and_bins, with torch ops and the int32 indices its kernels take:
        # bin_ids_N are the sorted expert ids, order_N[i] the (token * K + slot) pair at
        # sorted position i, bins_E the inclusive cumulative token counts.
        with torch.no_grad():
            bin_ids_N, order_N = torch.sort(expert_ids_N.int(), stable=True)
            self.bin_ids_N, self.order_N = bin_ids_N, order_N.int()
            self.bins_E = self.tokens_per_expert_E.cumsum(0).int()

    def _no_autocast(self) -> torch.autocast:
        return torch.autocast(device_type=self.device_type, enabled=False)

    def gather(self, x_TD: Tensor) -> Tensor:
        with self._no_autocast():
            return self.kernels.gather(x_TD.contiguous(), self.order_N, self.bin_ids_N, self.bins_E, self.top_k)

    def ffn(self, x_ND: Tensor, tokens_per_expert_E: Tensor) -> Tensor:
        if x_ND.shape[0] == 0:  # an expert-parallel rank that receives no rows: nothing for gmm to do
            return grouped_ffn(self.experts, x_ND, tokens_per_expert_E)
        w1, w2 = self.experts.expert_weights(self.dtype)
        # gmm takes the segment sizes on the host: this backend's one host synchronisation per
        # forward, inherent to grouped_gemm (its backward reuses the same host tensor).
        batch_sizes_E = tokens_per_expert_E.cpu()
        empty_E = batch_sizes_E == 0
        if empty_E.any():
            empty_experts = empty_E.nonzero().squeeze(1).to(x_ND.device)
            w1, w2 = (w if not w.requires_grad else _zero_grad_of_empty_experts(w, empty_experts) for w in (w1, w2))
        with self._no_autocast():
            h_NH = self.kernels.gmm(x_ND.contiguous(), w1, batch_sizes_E)  # gate and up side by side for SwiGLU
            return self.kernels.gmm(self.experts.activate(h_NH), w2, batch_sizes_E)

    def combine(self, out_ND: Tensor, weights_TK: Tensor, return_output_sums: bool) -> tuple[Tensor, ExpertStats]:
        with self._no_autocast():
            weights_N = weights_TK.reshape(-1).to(self.dtype).contiguous()
            y_TD = self.kernels.scatter(
                out_ND.contiguous(), self.order_N, self.bin_ids_N, weights_N, self.bins_E, self.top_k
            )
        if not return_output_sums:
            return y_TD, ExpertStats(self.tokens_per_expert_E)
        # Detached: recorded forwards only, so nothing may be saved for backward here (an
        # activation-checkpoint recompute does not run this branch).
        gate_N = weights_TK.detach().reshape(-1)[self.order_N.long()]
        sums = expert_output_sums(self.bin_ids_N.long(), out_ND, gate_N, self.num_experts)
        return y_TD, ExpertStats(self.tokens_per_expert_E, *sums)


def megablocks_experts(
    experts: Experts, x_TD: Tensor, indices_TK: Tensor, weights_TK: Tensor, return_output_sums: bool
) -> tuple[Tensor, ExpertStats]:
    if experts.megablocks_refusal:
        raise ConfigError(experts.megablocks_refusal)
    dtype = compute_dtype(x_TD)
    kernels = load_kernels(x_TD.device, dtype)
    num_experts = experts.num_experts
    x_TD = x_TD.to(dtype).contiguous()
    if indices_TK.numel() == 0:
        # No tokens (a data-parallel rank whose layer received none): MegaBlocks' kernels are
        # not run on an empty routing. The torch backend runs every expert on no rows, so the
        # expert parameters and the routing weights still get an exact zero gradient, which
        # DDP with find_unused_parameters=False needs on this rank.
        return grouped_experts(experts, x_TD, indices_TK, weights_TK, return_output_sums)
    dispatch = MegaBlocksDispatch(experts, kernels, x_TD, indices_TK, num_experts)
    out_ND = dispatch.ffn(dispatch.gather(x_TD), dispatch.tokens_per_expert_E)
    return dispatch.combine(out_ND, weights_TK, return_output_sums)
