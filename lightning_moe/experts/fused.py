"""Gather -> grouped FFN -> weighted combine as one autograd function that keeps what a dense FFN keeps.

Shape legend: T tokens, D model width, F expert hidden width, E experts, N = T * K
(token, slot) pairs sorted by expert, H the first projection's width (2F for the SwiGLUs, gate
and up side by side; F for GELU).

Left to autograd, the sorted pipeline keeps for backward the gathered input x_ND and the
expert outputs out_ND, two [N, D] tensors that a dense FFN of the same active FLOPs
does not have (at top-8 with small experts they are most of the layer's activation
memory). :class:`GatherFFNCombine` keeps only the input x_TD (which the caller keeps
anyway), the first projection h [N, H], the gates and the pairs' token ids, and in
backward (SonicMoE, arXiv 2512.14080, Sec. 3):

* re-gathers x_ND = x_TD[token_ids] for the first projection's weight gradient;
* recomputes the activation a = act(h) from h (elementwise);
* gets the gate gradient without out_ND: with out_n = a_n W2_e and y_t = sum_n gate_n out_n,
  dL/dgate_n = <dy_t, out_n> = <dy_t W2_e^T, a_n>, and dy_t W2_e^T is the product
  backward needs anyway for dL/da_n = gate_n * dy_t W2_e^T. Experts with biases (gpt-oss:
  h_n = x_n W1_e + b1_e, out_n = a_n W2_e + b2_e) add <dy_t, b2_e> to it; the biases'
  gradients are per-expert sums of dL/dh_n and of gate_n dy_t.

Two schedules of the same steps, every matmul through the grouped GEMM seam
(:mod:`lightning_moe.experts.grouped_gemm`):

* all rows at once (GPU, and compiled code): eager code writes results into [N, D]
  buffers it is done with (the gathered rows take the expert outputs; in backward the
  gathered gradient rows take the re-gathered input, then the input gradient);
* a block of consecutive experts at a time (CPU, eager; :class:`_ExpertBlocks`): no
  [N, D] tensor is allocated, and on CPU each fresh one costs page faults about as much
  as the pass that fills it. Forward+backward of the layer at T 4096, d 512, fp32 on two
  cores: one expert a block took 0.94x (E8 k2 f1024) and 0.90x (E64 k8 f256) of the
  all-rows schedule's time; about 2048 rows a block then beat one expert a block
  (1.31x vs 1.51x dense at E128 k8 f256; medians of interleaved rounds), most on a busy
  machine, where every small parallel operation waits for a descheduled thread.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from lightning_moe.experts import Activation, activate, expert_output_sums
from lightning_moe.experts.grouped_gemm import Segments, grouped_mm, grouped_mm_weight_grad, on_per_segment_device


def _gather(x_TD: Tensor, token_ids_N: Tensor, out: Tensor | None = None) -> Tensor:
    """Rows ``x_TD[token_ids_N]``, written into ``out`` when given (eager only)."""
    if out is None or torch.compiler.is_compiling():
        return x_TD.index_select(0, token_ids_N)
    return torch.index_select(x_TD, 0, token_ids_N, out=out)


def _recomputed_activation(activation: Activation, h_NH: Tensor) -> tuple[Tensor, Tensor | None]:
    """``(a, silu(h1))`` for SwiGLU (backward needs both), ``(a, None)`` for the others."""
    if activation.name != "swiglu":
        return activate(activation, h_NH), None
    h1_NF, h3_NF = h_NH.chunk(2, dim=1)
    silu_NF = F.silu(h1_NF)
    return silu_NF * h3_NF, silu_NF


def _activation_backward(
    activation: Activation, da_NF: Tensor, h_NH: Tensor, silu_NF: Tensor | None, dh_NH: Tensor
) -> Tensor:
    """dL/dh from dL/da (``da_NF`` is overwritten), written into ``dh_NH`` in eager code."""
    if activation.name == "clamped_swiglu":
        return _clamped_swiglu_backward(activation, da_NF, h_NH, dh_NH)
    if activation.name != "swiglu":
        if torch.compiler.is_compiling():
            return torch.ops.aten.gelu_backward(da_NF, h_NH)
        return torch.ops.aten.gelu_backward.grad_input(da_NF, h_NH, grad_input=dh_NH)
    h1_NF, h3_NF = h_NH.chunk(2, dim=1)
    if torch.compiler.is_compiling():  # no out= into views there; the cat is fused
        dh3_NF = da_NF * silu_NF
        return torch.cat([torch.ops.aten.silu_backward(da_NF * h3_NF, h1_NF), dh3_NF], dim=1)
    dh1_NF, dh3_NF = dh_NH.chunk(2, dim=1)
    torch.mul(da_NF, silu_NF, out=dh3_NF)
    torch.ops.aten.silu_backward.grad_input(da_NF.mul_(h3_NF), h1_NF, grad_input=dh1_NF)
    return dh_NH


def _clamped_swiglu_backward(activation: Activation, da_NF: Tensor, h_NH: Tensor, dh_NH: Tensor) -> Tensor:
    """dL/dh of gpt-oss's clamped SwiGLU, a = (u' + 1) * g' * s with g' = min(g, limit),
    u' = clamp(u, -limit, limit), s = sigmoid(alpha * g'):

    * da/dg = (u' + 1) * s * (1 + alpha * g' * (1 - s)) where g <= limit, else 0 (the clamp is flat);
    * da/du = g' * s where -limit <= u <= limit, else 0.

    The masks include the limits themselves, as ``torch.clamp``'s backward does (the reference).
    """
    alpha, limit = activation.alpha, activation.limit
    gate_NF, up_NF = h_NH.chunk(2, dim=1)
    clamped_NF = gate_NF.clamp(max=limit)
    s_NF = torch.sigmoid(clamped_NF * alpha)
    dgate_NF = da_NF * (up_NF.clamp(-limit, limit) + 1) * s_NF * (1 + alpha * clamped_NF * (1 - s_NF))
    dgate_NF = dgate_NF.masked_fill_(gate_NF > limit, 0)
    dup_NF = da_NF.mul_(clamped_NF * s_NF).masked_fill_(up_NF.abs() > limit, 0)
    if torch.compiler.is_compiling():
        return torch.cat([dgate_NF, dup_NF], dim=1)
    dh1_NF, dh3_NF = dh_NH.chunk(2, dim=1)
    dh1_NF.copy_(dgate_NF)
    dh3_NF.copy_(dup_NF)
    return dh_NH


def _expert_ids(tokens_per_expert_E: Tensor, num_rows: int) -> Tensor:
    """[N] int64: the expert of each row sorted by expert."""
    num_experts = tokens_per_expert_E.shape[0]
    return torch.repeat_interleave(
        torch.arange(num_experts, device=tokens_per_expert_E.device), tokens_per_expert_E, output_size=num_rows
    )  # output_size given: no host synchronisation


class _Biases(NamedTuple):
    """The experts' biases and each sorted row's expert (to index them by)."""

    b1_EH: Tensor
    b2_ED: Tensor
    expert_ids_N: Tensor


def _gate_gradient_terms(dout_nF: Tensor, a_nF: Tensor, scratch_nF: Tensor) -> Tensor:
    """dy W2^T * a, whose row sums are the gate gradient <dy W2^T, a> = <dy, out> (SonicMoE); kept in
    ``scratch_nF`` in eager code."""
    if torch.compiler.is_compiling():
        return dout_nF * a_nF
    return torch.mul(dout_nF, a_nF, out=scratch_nF)


def _gated_w2_operands(a_NF: Tensor, dy_ND: Tensor, gate_N1: Tensor) -> tuple[Tensor, Tensor]:
    """``(a, dy)`` for w2's gradient sum_n a_n^T gate_n dy_n, the gate multiplied in place into the
    narrower of the two (the caller is done with both values after)."""
    if a_NF.shape[1] <= dy_ND.shape[1]:
        return a_NF.mul_(gate_N1), dy_ND
    return a_NF, dy_ND.mul_(gate_N1)


#: Rows per block of consecutive experts on the CPU path (a block holds at least one expert).
BLOCK_ROWS = 2048


class _BlockLayout(NamedTuple):
    """Which consecutive experts each block holds, its row count and its segments (host-side only)."""

    experts: list[slice]
    row_counts: list[int]
    segments: list[Segments]


def _block_layout(sizes: list[int]) -> _BlockLayout:
    """Consecutive experts grouped into blocks of at least :data:`BLOCK_ROWS` rows (the last may have fewer)."""
    experts, row_counts = [], []
    first = rows = 0
    for e, count in enumerate(sizes):
        rows += count
        if rows >= BLOCK_ROWS or e == len(sizes) - 1:
            experts.append(slice(first, e + 1))
            row_counts.append(rows)
            first, rows = e + 1, 0
    return _BlockLayout(experts, row_counts, [Segments.of_sizes(sizes[block]) for block in experts])


class _ExpertBlocks:
    """The sorted pairs' rows in blocks of consecutive experts, each block run through the whole chain at once.

    The CPU path: a block's [rows, D] and [rows, F] tensors are small enough to be reused
    from the allocator rather than mapped afresh, the gathered rows live in one scratch
    buffer every block reuses (so no [N, D] tensor is allocated: on CPU each fresh one costs
    page faults about as much as the pass that fills it), and with about BLOCK_ROWS rows a
    block the elementwise steps run as a few large operations, not one per small expert.
    """

    def __init__(self, layout: _BlockLayout, x_TD: Tensor) -> None:
        self.experts, self.row_counts, self.segments = layout
        self.scratch_RD = x_TD.new_empty(max(self.row_counts, default=0), x_TD.shape[1])

    def split(self, tensor_N: Tensor) -> tuple[Tensor, ...]:
        """Each block's rows of an [N, ...] tensor (views)."""
        return tensor_N.split(self.row_counts)

    def scratch(self, ids_n: Tensor) -> Tensor:
        """The shared [rows, D] buffer, as many rows as ``ids_n``."""
        return self.scratch_RD[: ids_n.shape[0]]

    def gather(self, x_TD: Tensor, ids_n: Tensor) -> Tensor:
        return torch.index_select(x_TD, 0, ids_n, out=self.scratch(ids_n))


def _in_expert_blocks(x_TD: Tensor) -> bool:
    """Whether the chain runs a block of experts' rows at a time (:class:`_ExpertBlocks`): CPU, eager."""
    return on_per_segment_device(x_TD) and not torch.compiler.is_compiling()


class GatherFFNCombine(torch.autograd.Function):
    """``y_TD = index_add(token_ids_N, gate_N * FFN_e(x_TD[token_ids_N]))`` over pairs sorted by expert.

    ``b1_EH``/``b2_ED``: the experts' biases (both or neither). Returns ``(y_TD, sums_E2D)``: with ``output_sums``, float32 [E, 2, D] (no gradient), per
    expert the sum of its outputs over its pairs and the sum of the gate-weighted ones
    (Default MoE's statistics), taken while each block's outputs are at hand, so no [N, D]
    copy of the outputs is kept for them; else None. Double backward is not supported. On the devices of
    :data:`~lightning_moe.experts.grouped_gemm.PER_SEGMENT_DEVICES` (CPU) each expert's rows
    go through the chain a block of experts at a time (:class:`_ExpertBlocks`); elsewhere, and in compiled code,
    all rows go through each step at once on the grouped GEMM.
    """

    @staticmethod
    def forward(
        ctx,
        x_TD: Tensor,
        gate_N: Tensor,
        token_ids_N: Tensor,
        tokens_per_expert_E: Tensor,
        activation: Activation,
        w1_EDH: Tensor,
        w2_EFD: Tensor,
        b1_EH: Tensor | None,
        b2_ED: Tensor | None,
        output_sums: bool,
    ) -> tuple[Tensor, Tensor | None]:
        segments = Segments(tokens_per_expert_E, token_ids_N.shape[0])
        biases = None if b1_EH is None else _Biases(b1_EH, b2_ED, _expert_ids(tokens_per_expert_E, token_ids_N.shape[0]))
        # The gates multiply in the compute dtype; the output sums use them as routed (float32).
        sums_gate_N, gate_N = (gate_N if output_sums else None), gate_N.to(x_TD.dtype)
        # Chosen once, kept for backward (host-side ints): the block layout, or None for all rows at once.
        ctx.block_layout = _block_layout(segments.sizes()) if _in_expert_blocks(x_TD) else None
        if ctx.block_layout is not None:
            blocks = _ExpertBlocks(ctx.block_layout, x_TD)
            y_TD, sums_E2D, h_NH = _forward_in_blocks(blocks, x_TD, gate_N, token_ids_N, activation, w1_EDH, w2_EFD,
                                                       sums_gate_N, biases)
        else:
            x_ND = _gather(x_TD, token_ids_N)
            h_NH = grouped_mm(x_ND, w1_EDH, segments)
            if biases is not None:
                h_NH.add_(biases.b1_EH.index_select(0, biases.expert_ids_N))
            a_NF = activate(activation, h_NH, in_place=True)
            out_ND = grouped_mm(a_NF, w2_EFD, segments, out=x_ND)  # x_ND is done with
            if biases is not None:
                out_ND.add_(biases.b2_ED.index_select(0, biases.expert_ids_N))
            sums_E2D = None if sums_gate_N is None else _output_sums(out_ND, sums_gate_N, tokens_per_expert_E)
            y_TD = torch.zeros_like(x_TD).index_add_(0, token_ids_N, out_ND.mul_(gate_N[:, None]))
        ctx.save_for_backward(x_TD, gate_N, token_ids_N, segments.offsets(), w1_EDH, w2_EFD, h_NH,
                              *(biases or (None, None, None)))
        # Host-side segment sizes of the per-segment matmul (None on the grouped kernel): read once, reused.
        ctx.activation, ctx.sizes = activation, segments.cached_sizes()
        if sums_E2D is None:
            return y_TD, None
        ctx.mark_non_differentiable(sums_E2D)
        return y_TD, sums_E2D

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y_TD: Tensor, _grad_sums: Tensor | None):
        x_TD, gate_N, token_ids_N, offsets_E, w1, w2, h_NH, b1, b2, expert_ids_N = ctx.saved_tensors
        biases = None if b1 is None else _Biases(b1, b2, expert_ids_N)
        needs = tuple(ctx.needs_input_grad[i] for i in (0, 1, 5, 6, 7, 8))
        grad_y_TD = grad_y_TD.to(x_TD.dtype)
        if ctx.block_layout is not None:
            blocks = _ExpertBlocks(ctx.block_layout, x_TD)
            grads = _backward_in_blocks(blocks, grad_y_TD, x_TD, gate_N, token_ids_N, ctx.activation, w1, w2, h_NH,
                                         needs, biases)
        else:
            segments = Segments.known(offsets_E, token_ids_N.shape[0], ctx.sizes)
            grads = _backward_grouped(grad_y_TD, x_TD, gate_N, token_ids_N, segments, ctx.activation, w1, w2, h_NH,
                                      needs, biases)
        grad_x, grad_gate_N, grad_w1, grad_w2, grad_b1, grad_b2 = grads
        return grad_x, grad_gate_N, None, None, None, grad_w1, grad_w2, grad_b1, grad_b2, None


def _forward_in_blocks(blocks, x_TD, gate_N, token_ids_N, activation, w1_EDH, w2_EFD, sums_gate_N, biases):
    """The forward of :class:`GatherFFNCombine`, a block of experts at a time: ``(y_TD, sums_E2D or None, h_NH)``;
    the output sums only with their gates ``sums_gate_N``."""
    h_NH = x_TD.new_empty(token_ids_N.shape[0], w1_EDH.shape[2])
    output_sums = sums_gate_N is not None
    sums_E2D = x_TD.new_empty(w2_EFD.shape[0], 2, x_TD.shape[1], dtype=torch.float32) if output_sums else None
    sums_gates = blocks.split(sums_gate_N) if output_sums else itertools.repeat(None)
    y_TD = torch.zeros_like(x_TD)
    expert_ids = itertools.repeat(None) if biases is None else blocks.split(biases.expert_ids_N)
    per_block = zip(blocks.experts, blocks.segments, blocks.split(token_ids_N), blocks.split(gate_N),
                    blocks.split(h_NH))
    for (experts, segs, ids_n, gate_n, h_nH), sums_gate_n, eids_n in zip(per_block, sums_gates, expert_ids):
        x_nD = blocks.gather(x_TD, ids_n)
        grouped_mm(x_nD, w1_EDH[experts], segs, out=h_nH)
        if biases is not None:
            h_nH.add_(biases.b1_EH.index_select(0, eids_n))
        a_nF = activate(activation, h_nH, in_place=True)
        out_nD = grouped_mm(a_nF, w2_EFD[experts], segs, out=x_nD)  # x_nD is done with
        if biases is not None:
            out_nD.add_(biases.b2_ED.index_select(0, eids_n))
        if output_sums:
            _segment_output_sums(out_nD, sums_gate_n, segs.sizes(), sums_E2D[experts])
        y_TD.index_add_(0, ids_n, out_nD.mul_(gate_n[:, None]))
    return y_TD, sums_E2D, h_NH


def _segment_output_sums(out_nD: Tensor, gate_n: Tensor, sizes: list[int], sums_E2D: Tensor) -> None:
    """Per expert, the sums of its rows of ``out_nD`` and of ``gate_n`` times them, written into ``sums_E2D``.

    One [2, rows] x [rows, D] product per expert (a row of ones, then the gates), in float32.
    """
    for out_sD, gate_s, sums_2D in zip(out_nD.split(sizes), gate_n.split(sizes), sums_E2D):
        coefficients_2s = torch.stack([torch.ones_like(gate_s), gate_s])
        if out_sD.dtype == coefficients_2s.dtype == torch.float32:
            torch.mm(coefficients_2s, out_sD, out=sums_2D)
        else:
            sums_2D.copy_(coefficients_2s.float() @ out_sD.float())


def _output_sums(out_ND: Tensor, gate_N: Tensor, tokens_per_expert_E: Tensor) -> Tensor:
    """Float32 [E, 2, D]: per expert the sum of its rows of ``out_ND`` and of ``gate_N`` times them (all rows
    at once)."""
    expert_ids_N = _expert_ids(tokens_per_expert_E, out_ND.shape[0])
    return torch.stack(expert_output_sums(expert_ids_N, out_ND, gate_N, tokens_per_expert_E.shape[0]), dim=1)


def _bias_grads(biases: _Biases | None, needs: tuple[bool, ...]) -> tuple[Tensor | None, Tensor | None]:
    """Zeroed gradients of ``(b1, b2)``, each only where asked for."""
    if biases is None:
        return None, None
    return (torch.zeros_like(biases.b1_EH) if needs[4] else None), (torch.zeros_like(biases.b2_ED) if needs[5] else None)


def _backward_in_blocks(blocks, grad_y_TD, x_TD, gate_N, token_ids_N, activation, w1, w2, h_NH, needs, biases):
    """The backward of :class:`GatherFFNCombine`, a block of experts at a time (as :func:`_backward_grouped`)."""
    need_x, need_gate, need_w1, need_w2 = needs[:4]
    grad_b1, grad_b2 = _bias_grads(biases, needs)
    grad_x = torch.zeros_like(x_TD) if need_x else None
    grad_gate_N = gate_N.new_empty(gate_N.shape) if need_gate else None
    grad_gates = blocks.split(grad_gate_N) if need_gate else itertools.repeat(None)
    grad_w1 = torch.empty_like(w1) if need_w1 else None
    grad_w2 = torch.empty_like(w2) if need_w2 else None
    per_block = zip(blocks.experts, blocks.segments, blocks.split(token_ids_N), blocks.split(gate_N[:, None]),
                    blocks.split(h_NH))
    expert_ids = itertools.repeat(None) if biases is None else blocks.split(biases.expert_ids_N)
    for (experts, segs, ids_n, gate_n1, h_nH), grad_gate_n, eids_n in zip(per_block, grad_gates, expert_ids):
        dy_nD = blocks.gather(grad_y_TD, ids_n)
        dout_nF = grouped_mm(dy_nD, w2[experts].transpose(1, 2), segs)
        a_nF, silu_nF = _recomputed_activation(activation, h_nH)
        dh_nH = torch.empty_like(h_nH)
        if need_gate:
            torch.sum(_gate_gradient_terms(dout_nF, a_nF, dh_nH[:, : a_nF.shape[1]]), dim=1, out=grad_gate_n)
        if biases is not None:  # before dy is scaled in place for w2's gradient
            _output_bias_backward(biases, eids_n, dy_nD, gate_n1, grad_gate_n if need_gate else None, grad_b2)
        if need_w2:
            grouped_mm_weight_grad(*_gated_w2_operands(a_nF, dy_nD, gate_n1), segs, out=grad_w2[experts])
        dh_nH = _activation_backward(activation, dout_nF.mul_(gate_n1), h_nH, silu_nF, dh_nH)
        if grad_b1 is not None:
            grad_b1.index_add_(0, eids_n, dh_nH)
        if need_w1:  # x re-gathered instead of kept
            grouped_mm_weight_grad(blocks.gather(x_TD, ids_n), dh_nH, segs, out=grad_w1[experts])
        if need_x:
            grad_x.index_add_(0, ids_n, grouped_mm(dh_nH, w1[experts].transpose(1, 2), segs, out=blocks.scratch(ids_n)))
    return grad_x, grad_gate_N, grad_w1, grad_w2, grad_b1, grad_b2


def _output_bias_backward(
    biases: _Biases, expert_ids_n: Tensor, dy_nD: Tensor, gate_n1: Tensor, grad_gate_n: Tensor | None,
    grad_b2: Tensor | None,
) -> None:
    """The output bias's parts of the gradients, added in place: <dy_t, b2_e> to each gate's, and the per-expert
    sum of gate_n dy_t to b2's."""
    if grad_gate_n is not None:
        grad_gate_n.add_((dy_nD * biases.b2_ED.index_select(0, expert_ids_n)).sum(dim=1))
    if grad_b2 is not None:
        grad_b2.index_add_(0, expert_ids_n, dy_nD * gate_n1)


def _backward_grouped(grad_y_TD, x_TD, gate_N, token_ids_N, segments, activation, w1, w2, h_NH, needs, biases):
    """The backward of :class:`GatherFFNCombine`, every row at once on the grouped GEMM."""
    need_x, need_gate, need_w1, need_w2 = needs[:4]
    grad_b1, grad_b2 = _bias_grads(biases, needs)
    gate_N1 = gate_N[:, None]
    dy_ND = _gather(grad_y_TD, token_ids_N)
    dout_NF = grouped_mm(dy_ND, w2.transpose(1, 2), segments)  # dy W2^T: dL/da = gate * this
    a_NF, silu_NF = _recomputed_activation(activation, h_NH)
    dh_NH = h_NH.new_empty(h_NH.shape)  # its first F columns hold scratch until dL/dh is written
    grad_gate_N = _gate_gradient_terms(dout_NF, a_NF, dh_NH[:, : a_NF.shape[1]]).sum(dim=1) if need_gate else None
    if biases is not None:  # before dy is scaled in place for w2's gradient
        _output_bias_backward(biases, biases.expert_ids_N, dy_ND, gate_N1, grad_gate_N, grad_b2)
    grad_w2 = grouped_mm_weight_grad(*_gated_w2_operands(a_NF, dy_ND, gate_N1), segments) if need_w2 else None
    del a_NF
    dh_NH = _activation_backward(activation, dout_NF.mul_(gate_N1), h_NH, silu_NF, dh_NH)
    del dout_NF, silu_NF
    if grad_b1 is not None:
        grad_b1.index_add_(0, biases.expert_ids_N, dh_NH)
    grad_x = grad_w1 = None
    if need_w1:
        x_ND = _gather(x_TD, token_ids_N, out=dy_ND)  # re-gathered instead of kept
        grad_w1 = grouped_mm_weight_grad(x_ND, dh_NH, segments)
    if need_x:
        dx_ND = grouped_mm(dh_NH, w1.transpose(1, 2), segments, out=dy_ND)
        grad_x = torch.zeros_like(x_TD).index_add_(0, token_ids_N, dx_ND)
    return grad_x, grad_gate_N, grad_w1, grad_w2, grad_b1, grad_b2


def gather_ffn_combine(
    x_TD: Tensor,
    gate_N: Tensor,
    token_ids_N: Tensor,
    tokens_per_expert_E: Tensor,
    activation: str | Activation,
    weights: tuple[Tensor, Tensor],
    output_sums: bool = False,
    biases: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor | None]:
    """:class:`GatherFFNCombine` on pairs sorted by expert; ``weights`` = (w1, w2) and ``biases`` = (b1, b2)
    (or None) in x's dtype."""
    w1, w2 = weights
    b1, b2 = biases or (None, None)
    activation = Activation(activation) if isinstance(activation, str) else activation
    return GatherFFNCombine.apply(x_TD, gate_N, token_ids_N, tokens_per_expert_E, activation, w1, w2, b1, b2,
                                  output_sums)


def saved_activation_bytes(run: Callable[[], object], excluded: Iterable[Tensor] = ()) -> int:
    """Bytes of the tensors autograd keeps for backward while ``run()`` builds its graph.

    Counted with saved-tensor hooks, as unique storages (a tensor saved twice, or two
    views of one buffer, count once), leaving out the storages of ``excluded`` (e.g. the
    parameters and the input, which a dense layer keeps as well). The graph ``run``
    returns is dropped. Tensors a custom autograd function keeps as ``ctx`` attributes
    rather than through ``save_for_backward`` are not seen; :class:`GatherFFNCombine`
    keeps none but its segment sizes as host ints.
    """
    skip = {t.untyped_storage().data_ptr() for t in excluded}
    saved: dict[int, int] = {}

    def pack(tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in skip:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = run()
    del result
    return sum(saved.values())
