"""The grouped GEMM seam of the ``"torch"`` backend: the one place to swap in another kernel.

:func:`grouped_mm` multiplies each expert's contiguous segment of rows by that expert's
weight and :func:`grouped_mm_weight_grad` gives the weight gradient; both run
``torch._grouped_mm`` (through custom operators, so ``torch.compile`` traces them) where its
dtype and alignment rules allow, else one matmul per segment (:class:`Segments` reads the
segment sizes to the host once for all projections).
"""

from __future__ import annotations

import torch
from torch import Tensor

_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _grouped_mm_supported(x_ND: Tensor, w_EAB: Tensor) -> bool:
    """``torch._grouped_mm`` needs a supported dtype and 16-byte aligned row strides."""
    return _grouped_mm_supports(x_ND, w_EAB.shape[1], w_EAB.shape[2])


def _grouped_mm_supports(x_ND: Tensor, *widths: int) -> bool:
    """Whether ``torch._grouped_mm`` takes rows ``x_ND`` with per-expert matrices of these widths."""
    if not hasattr(torch, "_grouped_mm") or x_ND.dtype not in _GROUPED_MM_DTYPES:
        return False
    if x_ND.shape[0] == 0:  # its backward rejects empty inputs (an expert-parallel rank may receive no rows)
        return False
    if x_ND.device.type == "cuda":
        # The CUDA kernel is the sm90 CUTLASS one, bf16 only.
        if x_ND.dtype != torch.bfloat16 or torch.cuda.get_device_capability(x_ND.device)[0] < 9:
            return False
    elif x_ND.device.type != "cpu":
        return False
    align = 16 // x_ND.element_size()
    return all(width % align == 0 for width in (x_ND.shape[1], *widths))


class Segments:
    """The per-expert segments of rows sorted by expert, in the form each kernel takes.

    ``torch._grouped_mm`` takes the segments' end offsets on the device; the per-segment
    fallback splits the rows, which needs the sizes on the host. Those are read at most
    once per FFN (the fallback's one host synchronisation, shared by its three matmuls
    and their backward), and not at all when there are no rows.
    """

    def __init__(self, tokens_per_expert_E: Tensor | None, num_rows: int) -> None:
        self.tokens_per_expert_E, self.num_rows = tokens_per_expert_E, num_rows
        self._offsets_E: Tensor | None = None
        self._sizes: list[int] | None = None

    @classmethod
    def known(cls, offsets_E: Tensor, num_rows: int, sizes: list[int] | None) -> Segments:
        """Segments from their end offsets and, if already read, their host-side sizes."""
        segments = cls(None, num_rows)
        segments._offsets_E, segments._sizes = offsets_E, sizes
        return segments

    def offsets(self) -> Tensor:
        if self._offsets_E is None:
            self._offsets_E = self.tokens_per_expert_E.cumsum(0).to(torch.int32)
        return self._offsets_E

    def cached_sizes(self) -> list[int] | None:
        """The host-side sizes if a fallback matmul has read them, else None."""
        return self._sizes

    def sizes(self) -> list[int]:
        if self._sizes is None:
            if self.tokens_per_expert_E is None:
                self.tokens_per_expert_E = self._offsets_E.diff(prepend=self._offsets_E.new_zeros(1))
            num_experts = self.tokens_per_expert_E.shape[0]
            self._sizes = [0] * num_experts if self.num_rows == 0 else self.tokens_per_expert_E.tolist()
        return self._sizes


def grouped_mm(x_ND: Tensor, w_EAB: Tensor, segments: Segments) -> Tensor:
    """Rows of ``x_ND`` sorted by expert, segment e multiplied by ``w_EAB[e]`` -> [N, B].

    With :func:`grouped_mm_weight_grad` the one seam to swap in another grouped GEMM.
    """
    if _grouped_mm_supported(x_ND, w_EAB):
        if torch.compiler.is_compiling():
            return torch.ops.lightning_moe.grouped_mm(x_ND, w_EAB, segments.offsets())
        return torch._grouped_mm(x_ND, w_EAB, offs=segments.offsets())
    # Every expert runs, also on no rows: its weights then get an exact zero gradient.
    return torch.cat([seg @ w_EAB[e] for e, seg in enumerate(x_ND.split(segments.sizes()))])


def grouped_mm_weight_grad(x_NA: Tensor, grad_NB: Tensor, segments: Segments) -> Tensor:
    """The gradient of :func:`grouped_mm`'s weights: segment e's ``x^T @ grad`` -> [E, A, B] (0 for empty segments)."""
    if _grouped_mm_supports(x_NA, grad_NB.shape[1]):
        if torch.compiler.is_compiling():
            return torch.ops.lightning_moe.grouped_mm_weight_grad(x_NA, grad_NB, segments.offsets())
        return torch._grouped_mm(x_NA.t(), grad_NB, offs=segments.offsets())
    sizes = segments.sizes()
    return torch.stack([a.t() @ g for a, g in zip(x_NA.split(sizes), grad_NB.split(sizes))])


# torch.compile traces ``torch._grouped_mm`` with a meta function that accepts bf16 only
# (torch 2.13), so compiled code calls it through these two operators, whose shapes are
# declared here; eager code calls it directly.
@torch.library.custom_op("lightning_moe::grouped_mm", mutates_args=())
def _grouped_mm_op(x_ND: Tensor, w_EAB: Tensor, offsets_E: Tensor) -> Tensor:
    return torch._grouped_mm(x_ND, w_EAB, offs=offsets_E)


@_grouped_mm_op.register_fake
def _(x_ND: Tensor, w_EAB: Tensor, offsets_E: Tensor) -> Tensor:
    return x_ND.new_empty(x_ND.shape[0], w_EAB.shape[2])


@torch.library.custom_op("lightning_moe::grouped_mm_weight_grad", mutates_args=())
def _grouped_mm_weight_grad_op(x_NA: Tensor, grad_NB: Tensor, offsets_E: Tensor) -> Tensor:
    return torch._grouped_mm(x_NA.t(), grad_NB, offs=offsets_E)


@_grouped_mm_weight_grad_op.register_fake
def _(x_NA: Tensor, grad_NB: Tensor, offsets_E: Tensor) -> Tensor:
    return x_NA.new_empty(offsets_E.shape[0], x_NA.shape[1], grad_NB.shape[1])


def _grouped_mm_op_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _grouped_mm_op_backward(ctx, grad_NB: Tensor):
    x_ND, w_EAB, offsets_E = ctx.saved_tensors
    grad_x = _grouped_mm_op(grad_NB, w_EAB.transpose(1, 2), offsets_E)
    return grad_x, _grouped_mm_weight_grad_op(x_ND, grad_NB, offsets_E), None


# Autograd for the unfused path (expert parallelism); the fused path has its own backward.
_grouped_mm_op.register_autograd(_grouped_mm_op_backward, setup_context=_grouped_mm_op_setup)
