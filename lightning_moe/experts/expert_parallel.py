"""Expert parallelism: each rank of a group holds E / P of the experts, and token rows travel to them.

Shape legend: T tokens, D model width, E experts (global), P ranks in the expert-parallel
group, L = E / P experts held per rank, K experts per token, N = T * K (token, slot) pairs
this rank routes, R rows its experts receive from the whole group.

Rank p of the group holds the experts ``p * L .. p * L + L - 1`` (contiguous blocks), as
rows ``0 .. L - 1`` of its ``w1``/``w2``. One forward is the dispatch / combine
of GShard (Lepikhin et al., 2020), without a capacity limit:

1. sort this rank's pairs by global expert and gather their token rows in that order
   (the backend's dispatch, :func:`local_dispatch`); with contiguous blocks that is also
   the order of the destination ranks;
2. exchange the per-expert counts ([P, L] on every rank) with one all-to-all, so every
   rank knows how many rows it sends to and receives from each rank;
3. send the token rows to the ranks that own their experts (all-to-all with split sizes);
4. the received rows arrive grouped by source rank, then by local expert: reorder them by
   local expert, run the grouped FFN on the local experts, restore the arrival order;
5. send the outputs back with the reverse all-to-all; weight them and scatter them onto
   the tokens (the dispatch's ``combine``).

The sort, gather, FFN and combine are those of the layer's backend: MegaBlocks' kernels
(``megablocks.ops.gather``/``scatter`` and ``grouped_gemm``'s ``gmm``, the pipeline of
MegaBlocks' own expert-parallel layer) when the backend resolves to ``"megablocks"``,
otherwise the torch grouped GEMM (also for ``"loop"``, whose per-expert loop has no
sharded form).

Gradients take the same path backwards: the backward of an all-to-all is the all-to-all
with the split sizes swapped (:class:`AllToAll`). An expert's gradient on its owner
therefore sums the contributions of every rank's tokens; the strategy scales it
(:mod:`lightning_moe.strategies.expert_parallel`, or FSDP2's reduction under
:mod:`lightning_moe.strategies.expert_parallel_fsdp2`).

:class:`~lightning_moe.experts.ExpertStats` describe this rank's tokens over the GLOBAL
experts, exactly as the single-process backends do, so balancing losses and Default-MoE
sums (which the callbacks all-reduce over data-parallel ranks) see the numbers they see
under plain DDP.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_moe.experts import Experts, ExpertStats, compute_dtype
from lightning_moe.experts.grouped import GroupedDispatch


@dataclass(frozen=True)
class ExpertShard:
    """Which experts one rank holds, and the group it exchanges tokens with."""

    group: dist.ProcessGroup = field(repr=False)
    rank: int  # this rank's index in ``group``
    size: int  # P
    num_experts: int  # E, over the whole group

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.size

    @property
    def first_expert(self) -> int:
        return self.rank * self.num_local_experts

    def __str__(self) -> str:
        last = self.first_expert + self.num_local_experts - 1
        return f"experts {self.first_expert}..{last} on rank {self.rank} of {self.size}"


def _all_to_all_rows(x: Tensor, output_splits: list[int], input_splits: list[int], group: dist.ProcessGroup) -> Tensor:
    out = x.new_empty((sum(output_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
    return out


class AllToAll(torch.autograd.Function):
    """Rows ``x[sum(input_splits[:j]) : ...]`` go to rank j; rank j's rows for us arrive in rank order.

    Backward: the gradient rows go back the way they came (the same exchange with the
    split sizes swapped).
    """

    @staticmethod
    def forward(ctx, x: Tensor, output_splits: list[int], input_splits: list[int], group: dist.ProcessGroup) -> Tensor:
        ctx.splits, ctx.group = (output_splits, input_splits), group
        return _all_to_all_rows(x, output_splits, input_splits, group)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, None, None, None]:
        output_splits, input_splits = ctx.splits
        return _all_to_all_rows(grad_out, input_splits, output_splits, ctx.group), None, None, None


def all_to_all(x: Tensor, output_splits: list[int], input_splits: list[int], group: dist.ProcessGroup) -> Tensor:
    """Differentiable ``all_to_all_single`` over the rows of ``x`` (gloo, NCCL)."""
    return AllToAll.apply(x, output_splits, input_splits, group)


def local_dispatch(experts: Experts, x_TD: Tensor, indices_TK: Tensor, num_experts: int):
    """The backend's dispatch of this rank's routing over the ``num_experts`` global experts."""
    if experts.resolved_backend(x_TD) == "megablocks":
        from lightning_moe.experts import megablocks

        kernels = megablocks.load_kernels(x_TD.device, x_TD.dtype)
        return megablocks.MegaBlocksDispatch(experts, kernels, x_TD, indices_TK, num_experts)
    return GroupedDispatch(experts, x_TD, indices_TK, num_experts)


def expert_parallel_experts(
    experts: Experts, x_TD: Tensor, indices_TK: Tensor, weights_TK: Tensor, return_output_sums: bool
) -> tuple[Tensor, ExpertStats]:
    """The backend signature, for an :class:`Experts` that holds one rank's shard."""
    shard = experts.expert_parallel
    assert shard is not None
    P, L = shard.size, shard.num_local_experts
    x_TD = x_TD.to(compute_dtype(x_TD))
    dispatch = local_dispatch(experts, x_TD, indices_TK, shard.num_experts)

    send_counts_PL = dispatch.tokens_per_expert_E.view(P, L)
    recv_counts_PL = _all_to_all_rows(send_counts_PL, [1] * P, [1] * P, shard.group)  # row p: from rank p
    # A host synchronisation: all_to_all_single takes its split sizes as Python ints.
    input_splits = send_counts_PL.sum(dim=1).tolist()
    output_splits = recv_counts_PL.sum(dim=1).tolist()

    x_RD = all_to_all(dispatch.gather(x_TD), output_splits, input_splits, shard.group)
    local_ids_R = torch.arange(L, device=x_TD.device).repeat(P)
    local_ids_R = local_ids_R.repeat_interleave(recv_counts_PL.reshape(-1), output_size=sum(output_splits))
    by_expert_R = local_ids_R.argsort(stable=True)
    out_RD = dispatch.ffn(x_RD[by_expert_R], recv_counts_PL.sum(dim=0))
    out_RD = out_RD[by_expert_R.argsort()]  # back to arrival order
    out_ND = all_to_all(out_RD, input_splits, output_splits, shard.group)
    return dispatch.combine(out_ND, weights_TK, return_output_sums)


def shard_experts(experts: Experts, shard: ExpertShard) -> None:
    """Keep only ``shard``'s experts: each parameter becomes a new one holding its L rows."""
    if experts.expert_parallel is not None:
        raise RuntimeError(f"these experts are already sharded ({experts.expert_parallel})")
    lo, hi = shard.first_expert, shard.first_expert + shard.num_local_experts
    for name, param in list(experts.named_parameters(recurse=False)):
        setattr(experts, name, nn.Parameter(param.detach()[lo:hi].clone(), requires_grad=param.requires_grad))
    experts.expert_parallel = shard


def gather_experts(tensor_LX: Tensor, shard: ExpertShard) -> Tensor:
    """The [E, ...] tensor whose rows are every rank's [L, ...] slice (e.g. a parameter or its Adam moment)."""
    parts = [torch.empty_like(tensor_LX) for _ in range(shard.size)]
    dist.all_gather(parts, tensor_LX.detach().contiguous(), group=shard.group)
    return torch.cat(parts)


def unshard_experts(experts: Experts) -> None:
    """Gather every rank's experts back into full parameters (a collective over the shard's group)."""
    shard = experts.expert_parallel
    if shard is None:
        return
    for name, param in list(experts.named_parameters(recurse=False)):
        setattr(experts, name, nn.Parameter(gather_experts(param, shard), requires_grad=param.requires_grad))
    experts.expert_parallel = None
