"""Dropless experts as one grouped GEMM per projection over tokens sorted by expert.

The ``"torch"`` backend. (The module is not named ``torch.py``: as a submodule of this
package that name would shadow the ``torch`` module inside ``lightning_moe.experts``.)

The (token, slot) pairs are sorted by expert so each expert's rows are contiguous; each
projection is then a single grouped matmul over those segments (:func:`grouped_mm`, the
one seam to swap in another kernel), and the weighted outputs are scattered back.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_moe.experts import Experts, ExpertStats, compute_dtype, expert_output_sums

_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _grouped_mm_supported(x_ND: Tensor, w_EAB: Tensor) -> bool:
    """``torch._grouped_mm`` needs a supported dtype and 16-byte aligned row strides."""
    if not hasattr(torch, "_grouped_mm") or x_ND.dtype not in _GROUPED_MM_DTYPES:
        return False
    if x_ND.device.type == "cuda":
        # The CUDA kernel is the sm90 CUTLASS one, bf16 only.
        if x_ND.dtype != torch.bfloat16 or torch.cuda.get_device_capability(x_ND.device)[0] < 9:
            return False
    elif x_ND.device.type != "cpu":
        return False
    align = 16 // x_ND.element_size()
    return x_ND.shape[1] % align == 0 and w_EAB.shape[1] % align == 0 and w_EAB.shape[2] % align == 0


def grouped_mm(x_ND: Tensor, w_EAB: Tensor, tokens_per_expert_E: Tensor) -> Tensor:
    """Rows of ``x_ND`` sorted by expert, segment e multiplied by ``w_EAB[e]`` -> [N, B]."""
    if _grouped_mm_supported(x_ND, w_EAB):
        offsets = tokens_per_expert_E.cumsum(0).to(torch.int32)
        return torch._grouped_mm(x_ND, w_EAB, offs=offsets)
    segments = x_ND.split(tokens_per_expert_E.tolist())
    return torch.cat([seg @ w_EAB[e] for e, seg in enumerate(segments)])


def grouped_experts(
    experts: Experts, x_TD: Tensor, indices_TK: Tensor, weights_TK: Tensor, return_output_sums: bool
) -> tuple[Tensor, ExpertStats]:
    dtype = compute_dtype(x_TD)
    x_TD = x_TD.to(dtype)
    w1, v1, w2 = experts.expert_weights(dtype)
    top_k = indices_TK.shape[1]

    expert_ids_N = indices_TK.reshape(-1)
    order_N = expert_ids_N.argsort(stable=True)
    token_ids_N = order_N // top_k
    tokens_per_expert = torch.bincount(expert_ids_N, minlength=experts.num_experts)

    x_ND = x_TD[token_ids_N]
    h1 = grouped_mm(x_ND, w1, tokens_per_expert)
    h3 = None if v1 is None else grouped_mm(x_ND, v1, tokens_per_expert)
    out_ND = grouped_mm(experts.activate(h1, h3), w2, tokens_per_expert)

    gate_N = weights_TK.reshape(-1)[order_N]
    y_TD = torch.zeros_like(x_TD).index_add(0, token_ids_N, out_ND * gate_N.to(dtype)[:, None])
    if not return_output_sums:
        return y_TD, ExpertStats(tokens_per_expert)
    sums = expert_output_sums(expert_ids_N[order_N], out_ND, gate_N, experts.num_experts)
    return y_TD, ExpertStats(tokens_per_expert, *sums)
