"""Dropless experts as one grouped GEMM per projection over tokens sorted by expert.

The ``"torch"`` backend. (The module is not named ``torch.py``: as a submodule of this
package that name would shadow the ``torch`` module inside ``lightning_moe.experts``.)

The (token, slot) pairs are sorted by expert so each expert's rows are contiguous
(:func:`sort_pairs`); each projection is then a single grouped matmul over those segments
(:mod:`lightning_moe.experts.grouped_gemm`, the one seam to swap in another kernel), and
the weighted outputs are scattered back. The backend
(:func:`grouped_experts`) runs the three steps as one autograd function that keeps only
what a dense FFN keeps (:mod:`lightning_moe.experts.fused`). :class:`GroupedDispatch`
runs them as separate steps (:func:`grouped_ffn`, :func:`combine_pairs`) for expert
parallelism (:mod:`lightning_moe.experts.expert_parallel`), which exchanges the rows in
between; the ``"megablocks"`` backend has a dispatch with the same methods.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from lightning_moe.experts import Experts, ExpertStats, compute_dtype, count_per_expert, expert_output_sums
from lightning_moe.experts.fused import gather_ffn_combine
from lightning_moe.experts.grouped_gemm import Segments, grouped_mm


class SortedPairs(NamedTuple):
    """The (token, slot) pairs of one routing, in expert order."""

    order_N: Tensor  # position of each sorted pair in the flattened [T * K] routing
    token_ids_N: Tensor  # token of each sorted pair
    expert_ids_N: Tensor  # expert of each sorted pair (non-decreasing)
    tokens_per_expert_E: Tensor  # [E] int64: pairs per expert


def sort_pairs(indices_TK: Tensor, num_experts: int) -> SortedPairs:
    """Sort the (token, slot) pairs by expert; ties keep token order (a stable sort)."""
    expert_ids_N = indices_TK.reshape(-1)
    order_N = expert_ids_N.argsort(stable=True)
    tokens_per_expert_E = count_per_expert(expert_ids_N, num_experts)
    return SortedPairs(order_N, order_N // indices_TK.shape[1], expert_ids_N[order_N], tokens_per_expert_E)


def grouped_ffn(experts: Experts, x_ND: Tensor, tokens_per_expert_E: Tensor) -> Tensor:
    """The expert FFN of rows already sorted by expert: segment e goes through ``experts``' e-th weights.

    ``tokens_per_expert_E`` has one entry per expert held in ``experts``' parameters (all
    of them, or an expert-parallel rank's own); the result is [N, D] in the rows' order.
    """
    w1, w2 = experts.expert_weights(x_ND.dtype)
    segments = Segments(tokens_per_expert_E, x_ND.shape[0])
    return grouped_mm(experts.activate(grouped_mm(x_ND, w1, segments)), w2, segments)


def combine_pairs(
    x_TD: Tensor, pairs: SortedPairs, out_ND: Tensor, weights_TK: Tensor, num_experts: int, return_output_sums: bool
) -> tuple[Tensor, ExpertStats]:
    """Scatter the sorted pairs' expert outputs back to their tokens, each times its routing weight."""
    gate_N = weights_TK.reshape(-1)[pairs.order_N]
    y_TD = torch.zeros_like(x_TD).index_add(0, pairs.token_ids_N, out_ND * gate_N.to(out_ND.dtype)[:, None])
    if not return_output_sums:
        return y_TD, ExpertStats(pairs.tokens_per_expert_E)
    sums = expert_output_sums(pairs.expert_ids_N, out_ND, gate_N, num_experts)
    return y_TD, ExpertStats(pairs.tokens_per_expert_E, *sums)


class GroupedDispatch:
    """One routing's (token, slot) pairs in expert order, moved with plain torch indexing.

    ``gather`` takes the token rows to expert order, ``ffn`` runs rows sorted by expert
    through the experts held in ``experts``' parameters, ``combine`` weights the outputs
    and sums them onto the tokens. Between ``gather`` and ``ffn`` the rows may travel
    (expert parallelism); ``ffn`` only needs them sorted by the experts it holds.
    """

    def __init__(self, experts: Experts, x_TD: Tensor, indices_TK: Tensor, num_experts: int) -> None:
        self.experts, self.x_TD, self.num_experts = experts, x_TD, num_experts
        self.pairs = sort_pairs(indices_TK, num_experts)
        self.tokens_per_expert_E = self.pairs.tokens_per_expert_E

    def gather(self, x_TD: Tensor) -> Tensor:
        return x_TD[self.pairs.token_ids_N]

    def ffn(self, x_ND: Tensor, tokens_per_expert_E: Tensor) -> Tensor:
        return grouped_ffn(self.experts, x_ND, tokens_per_expert_E)

    def combine(self, out_ND: Tensor, weights_TK: Tensor, return_output_sums: bool) -> tuple[Tensor, ExpertStats]:
        return combine_pairs(self.x_TD, self.pairs, out_ND, weights_TK, self.num_experts, return_output_sums)


def grouped_experts(
    experts: Experts, x_TD: Tensor, indices_TK: Tensor, weights_TK: Tensor, return_output_sums: bool
) -> tuple[Tensor, ExpertStats]:
    x_TD = x_TD.to(compute_dtype(x_TD))
    pairs = sort_pairs(indices_TK, experts.num_experts)
    gate_N = weights_TK.reshape(-1)[pairs.order_N]
    y_TD, sums_E2D = gather_ffn_combine(
        x_TD, gate_N, pairs.token_ids_N, pairs.tokens_per_expert_E, experts.activation_spec,
        experts.expert_weights(x_TD.dtype), output_sums=return_output_sums, biases=experts.expert_biases(x_TD.dtype),
    )
    if sums_E2D is None:
        return y_TD, ExpertStats(pairs.tokens_per_expert_E)
    return y_TD, ExpertStats(pairs.tokens_per_expert_E, sums_E2D[:, 0], sums_E2D[:, 1])
