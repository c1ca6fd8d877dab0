"""Expert parallelism inside FSDP2: ``Trainer(strategy="moe_expert_parallel_fsdp2")``.

Lightning's :class:`~lightning.pytorch.strategies.ModelParallelStrategy`, with the experts of
every MoE layer split over an expert-parallel dimension, as torchtitan does for its
64-128-expert models. The W ranks form two meshes:

- ``device_mesh`` (ModelParallelStrategy's): ``data_parallel`` of size W. Everything but the
  experts (embeddings, attention, routers, norms) is ``fully_shard``-ed over all W ranks.
- :attr:`ExpertParallelFSDP2Strategy.expert_mesh`: [W / ep, ep], dims
  ``("expert_data_parallel", "expert_parallel")`` (rank = d * ep + e). Each layer's E experts
  are cut into ep contiguous blocks and rank (d, e) owns block e, as a DTensor sharded
  ``Shard(0)`` over ``expert_parallel``; FSDP2 shards that block further over
  ``expert_data_parallel``. So an expert lives, whole, on the ep ranks of one group only
  after the all-gather of its W / ep holders, never on every rank. Tokens reach their experts
  through all-to-all exchanges in the expert-parallel group
  (:mod:`lightning_moe.experts.expert_parallel`).

Gradients. Rank r's loss L_r is the mean over its share of the global batch. FSDP2 averages
the non-expert gradients over all W ranks: (1/W) sum_r dL_r/dw, the gradient of the global
batch mean. An expert's gradient on its owner already sums its ep group's contributions
(the all-to-all's backward carries them home); FSDP2 reduce-scatters it over the W / ep
``expert_data_parallel`` ranks, which sums the remaining groups. Its divide factor is set to
W (``set_gradient_divide_factor``), so the experts get the same (1/W) sum_r dL_r/dw.
Clipping by norm uses the global norm: every gradient element lives on exactly one rank, so
one all-reduce of the local squares gives it.

Checkpoints. Expert parameters and their optimizer state are DTensors of the global shape
[E, ...] on the expert mesh, so ModelParallelStrategy's checkpoints need nothing extra: a
distributed checkpoint (DCP, the default) stores each tensor once in its global layout, and
``save_distributed_checkpoint=False`` writes a single-process ``.ckpt`` (full [E, ...]
experts and optimizer state) that loads into one process, DDP, or any expert-parallel size.

The model must be built identically on every rank (seeded, or on the meta device and filled
after sharding), as for FSDP2 alone. The language models shard through
:meth:`~lightning_moe.lm_training.CausalLMTraining.shard_with_fsdp2`, which calls
:meth:`ExpertParallelFSDP2Strategy.shard_experts` first; a custom LightningModule calls it in
``configure_model`` before its own ``fully_shard`` calls.
"""

from __future__ import annotations

import math
from datetime import timedelta
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.strategies import _StrategyRegistry
from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Shard
from torch.optim import Optimizer

from lightning_moe.experts.expert_parallel import ExpertShard
from lightning_moe.strategies.expert_parallel import check_expert_parallel_model, check_expert_parallel_size

if TYPE_CHECKING:
    import lightning.pytorch as pl

EXPERT_MESH_DIMS = ("expert_data_parallel", "expert_parallel")


class ExpertParallelFSDP2Strategy(ModelParallelStrategy):
    """FSDP2 over all ranks for the model, experts split over ``expert_parallel_size`` ranks.

    Args:
        expert_parallel_size: ranks that share one copy of the experts (each owns
            ``num_experts / expert_parallel_size`` of every layer's experts). Must divide the
            world size and every MoE layer's ``num_experts``. ``None``: all ranks.
        save_distributed_checkpoint, process_group_backend, timeout: as in
            :class:`~lightning.pytorch.strategies.ModelParallelStrategy`. Its
            ``data_parallel_size`` and ``tensor_parallel_size`` are not taken: FSDP2 shards
            over all ranks, and tensor parallelism is not supported.

    Registered name: ``"moe_expert_parallel_fsdp2"`` (``expert_parallel_size=None``).
    """

    def __init__(
        self,
        expert_parallel_size: int | None = None,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        super().__init__(
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self._expert_parallel_size = expert_parallel_size
        self.expert_mesh: DeviceMesh | None = None

    @property
    def expert_parallel_size(self) -> int:
        return self._expert_parallel_size or self.num_nodes * self.num_processes

    def _configure_launcher(self) -> None:
        check_expert_parallel_size(self.num_nodes * self.num_processes, self._expert_parallel_size)
        super()._configure_launcher()

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()
        ep = self.expert_parallel_size
        self.expert_mesh = init_device_mesh(
            self.root_device.type, (self.world_size // ep, ep), mesh_dim_names=EXPERT_MESH_DIMS
        )

    def setup(self, trainer: pl.Trainer) -> None:
        super().setup(trainer)
        # Instance attribute: the plugin's clipping would stack norms of DTensors on two meshes.
        self.precision_plugin.clip_grad_by_norm = self._clip_grad_by_global_norm

    def shard_experts(self, module: nn.Module) -> None:
        """Split every MoE layer's experts over the expert mesh and ``fully_shard`` them there.

        Call in ``configure_model`` before ``fully_shard`` of the enclosing blocks (which then
        leave the experts to their own FSDP2 unit). Idempotent. Works on the meta device.
        """
        from torch.distributed.fsdp import FSDPModule, fully_shard

        assert self.expert_mesh is not None
        ep_mesh = self.expert_mesh["expert_parallel"]
        ep = self.expert_parallel_size
        for _, layer in check_expert_parallel_model(module, ep):
            experts = layer.experts
            if isinstance(experts, FSDPModule):
                continue
            shard = ExpertShard(ep_mesh.get_group(), ep_mesh.get_local_rank(), ep, layer.num_experts)
            lo, hi = shard.first_expert, shard.first_expert + shard.num_local_experts
            for name, param in list(experts.named_parameters(recurse=False)):
                local = param.detach()[lo:hi].clone()
                distributed = DTensor.from_local(local, ep_mesh, [Shard(0)], run_check=False)
                setattr(experts, name, nn.Parameter(distributed, requires_grad=param.requires_grad))
            experts.expert_parallel = shard
            fully_shard(experts, mesh=self.expert_mesh["expert_data_parallel"])
            # The owner's gradient sums its group's ranks; FSDP2 sums the groups: mean over all W.
            experts.set_gradient_divide_factor(float(self.world_size))
            if self.world_size > ep and dist.get_backend(ep_mesh.get_group()) != "nccl":
                # A factor other than the group size is NCCL's PREMUL_SUM, which gloo lacks: sum, then
                # divide. Not on a group of one, where torch 2.13 would then divide twice.
                experts.set_force_sum_reduction_for_comms(True)

    def _clip_grad_by_global_norm(self, optimizer: Optimizer, clip_val: float) -> None:
        grads = [p.grad for p in self.precision_plugin.main_params(optimizer) if p.grad is not None]
        local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
        # Each rank adds the squares of what it holds, divided by how many ranks hold the same
        # elements (1 for FSDP2's shards and the experts, all ranks for a parameter left unsharded).
        squares = torch.zeros((), device=self.root_device)
        for norm, grad in zip(torch._foreach_norm(local) if local else [], grads):
            squares += norm.to(squares.device).pow(2) / self._holders(grad)
        dist.all_reduce(squares)
        scale = (clip_val / (squares.sqrt() + 1e-6)).clamp(max=1.0)
        if local:
            torch._foreach_mul_(local, scale.to(local[0].device))

    def _holders(self, grad: Tensor) -> int:
        """How many ranks hold each element of ``grad`` (its replicas)."""
        if not isinstance(grad, DTensor):
            return self.world_size
        mesh = grad.device_mesh
        return math.prod(mesh.size(dim) for dim, placement in enumerate(grad.placements) if placement.is_replicate())

    def teardown(self) -> None:
        vars(self.precision_plugin).pop("clip_grad_by_norm", None)
        super().teardown()

    @classmethod
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        if "moe_expert_parallel_fsdp2" not in strategy_registry:
            strategy_registry.register(
                "moe_expert_parallel_fsdp2",
                cls,
                description="FSDP2 over all ranks, experts split over an expert-parallel mesh dimension (all-to-all)",
            )


ExpertParallelFSDP2Strategy.register_strategies(StrategyRegistry)
