"""The grouped GEMM seam of the ``"torch"`` backend: the one place to swap in another kernel.

:func:`grouped_mm` multiplies each expert's contiguous segment of rows by that expert's
weight and :func:`grouped_mm_weight_grad` gives the weight gradient. Which kernel runs:

* CUDA: ``torch._grouped_mm`` where its dtype and alignment rules allow (sm90, bf16),
  with the segment offsets on the device, so no host synchronisation;
* CPU, and CUDA cases ``torch._grouped_mm`` does not take: one ``torch.mm`` per segment
  (:class:`Segments` reads the segment sizes to the host once for all projections). On
  CPU that is what ``torch._grouped_mm`` does too, but the per-segment form writes each
  product straight into a slice of one output (``out=``), which the fused FFN uses to
  reuse buffers instead of allocating (and page-faulting) new ones; it measured at least
  as fast as ``torch._grouped_mm`` at every shape of ``benchmarks/moe_layer.py``.

Compiled code reaches both through two custom operators (their shapes declared here, as
torch's meta for ``_grouped_mm`` takes bf16 only), which also give the unfused path
(expert parallelism) its autograd.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: Devices where the per-segment matmul runs even where ``torch._grouped_mm`` would take the input.
PER_SEGMENT_DEVICES = ("cpu",)


def on_per_segment_device(x: Tensor) -> bool:
    """Whether ``x`` is on a device of :data:`PER_SEGMENT_DEVICES`."""
    return x.device.type in PER_SEGMENT_DEVICES


@functools.cache
def _grouped_kernel_takes(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch._grouped_mm`` takes this device and dtype at all.

    Cached: the answer does not change, and the matmuls of every layer ask it on every
    forward and backward (on CUDA it reads the device's properties).
    """
    if not hasattr(torch, "_grouped_mm") or dtype not in _GROUPED_MM_DTYPES:
        return False
    if device.type == "cuda":
        # The CUDA kernel is the sm90 CUTLASS one, bf16 only.
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability(device)[0] >= 9
    return device.type == "cpu"


def uses_grouped_kernel(x_ND: Tensor, *widths: int) -> bool:
    """Whether rows ``x_ND`` times per-expert matrices of these widths run on ``torch._grouped_mm``."""
    if on_per_segment_device(x_ND) or x_ND.shape[0] == 0:  # its backward rejects empty inputs
        return False
    if not _grouped_kernel_takes(x_ND.device, x_ND.dtype):
        return False
    align = 16 // x_ND.element_size()  # 16-byte aligned row strides
    return all(width % align == 0 for width in (x_ND.shape[1], *widths))


class Segments:
    """The per-expert segments of rows sorted by expert, in the form each kernel takes.

    ``torch._grouped_mm`` takes the segments' end offsets on the device; the per-segment
    matmul needs the sizes on the host. Those are read at most once per FFN (one host
    synchronisation on CUDA, shared by its three matmuls and their backward), and not at
    all when there are no rows.
    """

    def __init__(self, tokens_per_expert_E: Tensor | None, num_rows: int) -> None:
        self.tokens_per_expert_E, self.num_rows = tokens_per_expert_E, num_rows
        self._offsets_E: Tensor | None = None
        self._sizes: list[int] | None = None

    @classmethod
    def of_sizes(cls, sizes: list[int]) -> Segments:
        """Segments known only by their host-side sizes (for the per-segment matmul)."""
        segments = cls(None, sum(sizes))
        segments._sizes = sizes
        return segments

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
        """The host-side sizes if a per-segment matmul has read them, else None."""
        return self._sizes

    def sizes(self) -> list[int]:
        if self._sizes is None:
            if self.tokens_per_expert_E is None:
                self.tokens_per_expert_E = self._offsets_E.diff(prepend=self._offsets_E.new_zeros(1))
            num_experts = self.tokens_per_expert_E.shape[0]
            self._sizes = [0] * num_experts if self.num_rows == 0 else self.tokens_per_expert_E.tolist()
        return self._sizes


def grouped_mm(x_ND: Tensor, w_EAB: Tensor, segments: Segments, out: Tensor | None = None) -> Tensor:
    """Rows of ``x_ND`` sorted by expert, segment e multiplied by ``w_EAB[e]`` -> [N, B].

    ``out`` ([N, B], contiguous, not overlapping ``x_ND``) is written and returned when the
    per-segment matmul runs outside autograd and compilation; otherwise a new tensor is
    returned. With :func:`grouped_mm_weight_grad` the one seam to swap in another grouped GEMM.
    """
    if torch.compiler.is_compiling():
        return torch.ops.lightning_moe.grouped_mm(x_ND, w_EAB, segments.offsets())
    if uses_grouped_kernel(x_ND, w_EAB.shape[1], w_EAB.shape[2]):
        return torch._grouped_mm(x_ND, w_EAB, offs=segments.offsets())
    parts = zip(x_ND.split(segments.sizes()), w_EAB)
    if torch.is_grad_enabled() and (x_ND.requires_grad or w_EAB.requires_grad):
        # Recorded by autograd (the unfused path): every expert runs, also on no rows, so
        # its weights get an exact zero gradient.
        return torch.cat([seg_nA @ w_AB for seg_nA, w_AB in parts])
    if out is None:
        out = x_ND.new_empty(x_ND.shape[0], w_EAB.shape[2])
    for (seg_nA, w_AB), out_nB in zip(parts, out.split(segments.sizes())):
        torch.mm(seg_nA, w_AB, out=out_nB)
    return out


def grouped_mm_weight_grad(x_NA: Tensor, grad_NB: Tensor, segments: Segments, out: Tensor | None = None) -> Tensor:
    """The gradient of :func:`grouped_mm`'s weights: segment e's ``x^T @ grad`` -> [E, A, B] (0 for empty segments).

    ``out`` as for :func:`grouped_mm`.
    """
    if torch.compiler.is_compiling():
        return torch.ops.lightning_moe.grouped_mm_weight_grad(x_NA, grad_NB, segments.offsets())
    if uses_grouped_kernel(x_NA, grad_NB.shape[1]):
        return torch._grouped_mm(x_NA.t(), grad_NB, offs=segments.offsets())
    sizes = segments.sizes()
    grad_EAB = x_NA.new_empty(len(sizes), x_NA.shape[1], grad_NB.shape[1]) if out is None else out
    for x_nA, g_nB, grad_AB in zip(x_NA.split(sizes), grad_NB.split(sizes), grad_EAB):
        torch.mm(x_nA.t(), g_nB, out=grad_AB)  # an empty segment writes zeros
    return grad_EAB


@torch.library.custom_op("lightning_moe::grouped_mm", mutates_args=())
def _grouped_mm_op(x_ND: Tensor, w_EAB: Tensor, offsets_E: Tensor) -> Tensor:
    return grouped_mm(x_ND, w_EAB, Segments.known(offsets_E, x_ND.shape[0], None))


@_grouped_mm_op.register_fake
def _(x_ND: Tensor, w_EAB: Tensor, offsets_E: Tensor) -> Tensor:
    return x_ND.new_empty(x_ND.shape[0], w_EAB.shape[2])


@torch.library.custom_op("lightning_moe::grouped_mm_weight_grad", mutates_args=())
def _grouped_mm_weight_grad_op(x_NA: Tensor, grad_NB: Tensor, offsets_E: Tensor) -> Tensor:
    return grouped_mm_weight_grad(x_NA, grad_NB, Segments.known(offsets_E, x_NA.shape[0], None))


@_grouped_mm_weight_grad_op.register_fake
def _(x_NA: Tensor, grad_NB: Tensor, offsets_E: Tensor) -> Tensor:
    return x_NA.new_empty(offsets_E.shape[0], x_NA.shape[1], grad_NB.shape[1])


def _grouped_mm_op_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _grouped_mm_op_backward(ctx, grad_NB: Tensor):
    x_ND, w_EAB, offsets_E = ctx.saved_tensors
    grad_x = _grouped_mm_op(grad_NB, w_EAB.transpose(1, 2), offsets_E)
    return grad_x, _grouped_mm_weight_grad_op(x_ND, grad_NB, offsets_E), None


# Autograd for compiled unfused code (expert parallelism); the fused path has its own backward.
_grouped_mm_op.register_autograd(_grouped_mm_op_backward, setup_context=_grouped_mm_op_setup)
