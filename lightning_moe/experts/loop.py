"""The reference backend: one plain matmul chain per expert over the tokens routed to it.

Obviously correct and slow; every other backend is tested against it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_moe.experts import Experts, ExpertStats, compute_dtype, count_per_expert, expert_output_sums


def loop_experts(
    experts: Experts, x_TD: Tensor, indices_TK: Tensor, weights_TK: Tensor, return_output_sums: bool
) -> tuple[Tensor, ExpertStats]:
    dtype = compute_dtype(x_TD)
    x_TD = x_TD.to(dtype)
    w1, w2 = experts.expert_weights(dtype)
    y_TD = torch.zeros_like(x_TD)
    top_k = indices_TK.shape[1]
    tokens_per_expert = count_per_expert(indices_TK, experts.num_experts)
    # Each expert's (token, slot) pairs in token order: the pair ids sorted (stably) by
    # expert, split by the counts. Each expert's matmul needs its row count on the host, so
    # reading the counts is inherent here; it is this backend's one host synchronisation.
    pairs_by_expert = indices_TK.reshape(-1).argsort(stable=True).split(tokens_per_expert.tolist())
    token_ids, slot_ids, expert_ids, outputs = [], [], [], []
    # Every expert runs, also on zero tokens: its parameters then get an exact zero
    # gradient instead of none, which DDP (find_unused_parameters=False) needs on a rank
    # where a layer receives no tokens at all.
    for e, pairs_n in enumerate(pairs_by_expert):
        tokens, slots = pairs_n // top_k, pairs_n % top_k
        x_nD = x_TD[tokens]
        out_nD = experts.expert_ffn(e, x_nD, w1[e], w2[e])
        gate_n = weights_TK[tokens, slots].to(dtype)
        y_TD = y_TD.index_add(0, tokens, out_nD * gate_n[:, None])
        token_ids.append(tokens), slot_ids.append(slots), outputs.append(out_nD)
        expert_ids.append(torch.full_like(tokens, e))

    if not return_output_sums:
        return y_TD, ExpertStats(tokens_per_expert)
    # Detached: this branch runs only in recorded forwards, not in an activation-checkpoint
    # recompute, so it must save no tensors for backward (the two would not match).
    tokens, slots = torch.cat(token_ids), torch.cat(slot_ids)
    gate_N = weights_TK.detach()[tokens, slots]
    sums = expert_output_sums(torch.cat(expert_ids), torch.cat(outputs), gate_N, experts.num_experts)
    return y_TD, ExpertStats(tokens_per_expert, *sums)
