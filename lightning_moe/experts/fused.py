"""Gather -> grouped FFN -> weighted combine as one autograd function that keeps what a dense FFN keeps.

Shape legend: T tokens, D model width, F expert hidden width, E experts, N = T * K
(token, slot) pairs sorted by expert.

Left to autograd, the sorted pipeline keeps for backward the gathered input x_ND and the
expert outputs out_ND, two [N, D] tensors that a dense FFN of the same active FLOPs
does not have (at top-8 with small experts they are most of the layer's activation
memory). :class:`GatherFFNCombine` keeps only the input x_TD (which the caller keeps
anyway), the two first projections h1, h3 [N, F], the gates and the pairs' token ids,
and in backward (SonicMoE, arXiv 2512.14080, Sec. 3):

* re-gathers x_ND = x_TD[token_ids] for the first projections' weight gradients;
* recomputes the activation a = act(h1) * h3 from h1 and h3 (elementwise);
* gets the gate gradient without out_ND: with out_n = a_n W2_e and y_t = sum_n gate_n out_n,
  dL/dgate_n = <dy_t, out_n> = <dy_t W2_e^T, a_n>, and dy_t W2_e^T is the product
  backward needs anyway for dL/da_n = gate_n * dy_t W2_e^T.

Every matmul goes through the grouped GEMM seam of :mod:`lightning_moe.experts.grouped`
(:func:`grouped_mm` and its weight gradient :func:`grouped_mm_weight_grad`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from lightning_moe.experts.grouped_gemm import Segments, grouped_mm, grouped_mm_weight_grad


def _first_projection(w1_EDF: Tensor, v1_EDF: Tensor | None) -> Tensor:
    """[E, D, F] or, for SwiGLU, gate and up side by side [E, D, 2F]: one grouped GEMM twice as wide."""
    return w1_EDF if v1_EDF is None else torch.cat([w1_EDF, v1_EDF], dim=2)


def _split(h_NH: Tensor, w1_EDF: Tensor) -> tuple[Tensor, Tensor | None]:
    """The gate and up halves of a :func:`_first_projection` result (or its weight gradient)."""
    width = w1_EDF.shape[2]
    return (h_NH, None) if h_NH.shape[-1] == width else (h_NH[..., :width], h_NH[..., width:])


def _activation(name: str, h1_NF: Tensor, h3_NF: Tensor | None) -> Tensor:
    return F.silu(h1_NF) * h3_NF if name == "swiglu" else F.gelu(h1_NF)


class GatherFFNCombine(torch.autograd.Function):
    """``y_TD = index_add(token_ids_N, gate_N * FFN_e(x_TD[token_ids_N]))`` over pairs sorted by expert.

    Returns ``(y_TD, out_ND)``: ``out_ND`` (the unweighted expert outputs, no gradient) only
    when ``return_outputs``, else None. Double backward is not supported.
    """

    @staticmethod
    def forward(
        ctx,
        x_TD: Tensor,
        gate_N: Tensor,
        token_ids_N: Tensor,
        tokens_per_expert_E: Tensor,
        activation: str,
        w1_EDF: Tensor,
        v1_EDF: Tensor | None,
        w2_EFD: Tensor,
        return_outputs: bool,
    ) -> tuple[Tensor, Tensor | None]:
        segments = Segments(tokens_per_expert_E, token_ids_N.shape[0])
        h_NH = grouped_mm(x_TD[token_ids_N], _first_projection(w1_EDF, v1_EDF), segments)
        out_ND = grouped_mm(_activation(activation, *_split(h_NH, w1_EDF)), w2_EFD, segments)
        weighted_ND = out_ND * gate_N[:, None] if return_outputs else out_ND.mul_(gate_N[:, None])
        y_TD = torch.zeros_like(x_TD).index_add_(0, token_ids_N, weighted_ND)
        ctx.save_for_backward(x_TD, gate_N, token_ids_N, segments.offsets(), w1_EDF, v1_EDF, w2_EFD, h_NH)
        # Host-side segment sizes of the per-segment fallback (None on the grouped kernel): read once, reused.
        ctx.activation, ctx.sizes, ctx.num_experts = activation, segments.cached_sizes(), tokens_per_expert_E.shape[0]
        if not return_outputs:
            return y_TD, None
        ctx.mark_non_differentiable(out_ND)
        return y_TD, out_ND

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y_TD: Tensor, _grad_out: Tensor | None):
        x_TD, gate_N, token_ids_N, offsets_E, w1, v1, w2, h_NH = ctx.saved_tensors
        h1_NF, h3_NF = _split(h_NH, w1)
        segments = Segments.known(offsets_E, token_ids_N.shape[0], ctx.sizes)
        need_x, need_gate = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_w1, need_v1, need_w2 = ctx.needs_input_grad[5:8]

        dy_ND = grad_y_TD.to(x_TD.dtype)[token_ids_N]
        dout_NF = grouped_mm(dy_ND, w2.transpose(1, 2), segments)  # dy W2^T: dL/da = gate * this
        silu_NF = F.silu(h1_NF) if ctx.activation == "swiglu" else None
        a_NF = silu_NF * h3_NF if silu_NF is not None else F.gelu(h1_NF)
        grad_gate_N = (dout_NF * a_NF).sum(dim=1) if need_gate else None  # <dy W2^T, a> = <dy, out>
        grad_w2 = grouped_mm_weight_grad(a_NF.mul_(gate_N[:, None]), dy_ND, segments) if need_w2 else None
        del a_NF, dy_ND
        da_NF = dout_NF.mul_(gate_N[:, None])
        if silu_NF is not None and torch.compiler.is_compiling():  # no out= into views there; the cat is fused
            dh3_NF = da_NF * silu_NF
            dh_NH = torch.cat([torch.ops.aten.silu_backward(da_NF.mul_(h3_NF), h1_NF), dh3_NF], dim=1)
        elif silu_NF is not None:  # the two halves written side by side, as the fused first projection wants them
            dh_NH = h_NH.new_empty(h_NH.shape)
            dh1_NF, dh3_NF = _split(dh_NH, w1)
            torch.mul(da_NF, silu_NF, out=dh3_NF)
            torch.ops.aten.silu_backward.grad_input(da_NF.mul_(h3_NF), h1_NF, grad_input=dh1_NF)
        else:
            dh_NH = torch.ops.aten.gelu_backward(da_NF, h1_NF)
        del da_NF, silu_NF
        grad_x = grad_w1 = grad_v1 = None
        if need_w1 or need_v1:
            # x_ND re-gathered instead of kept
            grad_w1, grad_v1 = _split(grouped_mm_weight_grad(x_TD[token_ids_N], dh_NH, segments), w1)
        if need_x:
            dx_ND = grouped_mm(dh_NH, _first_projection(w1, v1).transpose(1, 2), segments)
            grad_x = torch.zeros_like(x_TD).index_add_(0, token_ids_N, dx_ND)
        return grad_x, grad_gate_N, None, None, None, grad_w1, grad_v1, grad_w2, None


def gather_ffn_combine(
    x_TD: Tensor,
    gate_N: Tensor,
    token_ids_N: Tensor,
    tokens_per_expert_E: Tensor,
    activation: str,
    weights: tuple[Tensor, Tensor | None, Tensor],
    return_outputs: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """:class:`GatherFFNCombine` on pairs sorted by expert; ``weights`` = (w1, v1, w2) in x's dtype."""
    w1, v1, w2 = weights
    return GatherFFNCombine.apply(
        x_TD, gate_N.to(x_TD.dtype), token_ids_N, tokens_per_expert_E, activation, w1, v1, w2, return_outputs
    )


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
