"""Expert parallelism as a Lightning strategy: ``Trainer(strategy="moe_expert_parallel")``.

The W ranks form a [data_parallel, expert_parallel] device mesh of shape [W / ep, ep]
(rank = d * ep + e). Every MoE layer's E experts are cut into ep contiguous blocks and
rank (d, e) keeps block e; tokens reach their experts through all-to-all exchanges
inside the expert-parallel group (:mod:`lightning_moe.experts.expert_parallel`). All other
parameters (embeddings, attention, routers, dense FFNs) are replicated and handled by
Lightning's :class:`~lightning.pytorch.strategies.DDPStrategy`, which this subclasses.

Gradients. Rank r's loss L_r is the mean over its share of the global batch, and DDP
averages replicated gradients over all W ranks: (1/W) sum_r dL_r/dw, the gradient of the
global-batch mean. After backward, an expert's gradient on its owner already sums the
contributions of the tokens of all ep ranks of its group (the all-to-all's backward
carries them home): sum_{r in group} dL_r/dw. Summing that over the W / ep ranks holding
the same experts (the mesh's data-parallel dimension) gives sum over all W ranks, and
dividing by W gives the same (1/W) sum_r dL_r/dw. So expert parameters are kept out of
DDP, and once per optimizer step, after its last backward (so the gradients sum every
micro-batch of an accumulation, automatic or manual), their gradients are all-reduced over
the data-parallel dimension (nothing to do when W = ep) and divided by W. Clipping by norm
uses the global norm.

Checkpoints hold the single-process layout: full [E, ...] expert tensors in the
``state_dict`` and in the optimizer state, gathered from the expert-parallel group on
save. A checkpoint therefore loads into one process, DDP, or any expert-parallel size.
Loading needs no gathering: Lightning restores weights before :meth:`setup` shards the
model, and the optimizer state is sliced to each rank's experts.

Lifecycle. The model is built whole on every rank; :meth:`setup` broadcasts rank 0's
experts (as DDP does for every other parameter) and keeps each rank's block;
:meth:`teardown` gathers them back, so after ``fit`` the module holds all experts again
(and Lightning's fork/spawn launchers hand full weights to the main process). Predict
runs unsharded: Lightning's predict sampler may give ranks unequal batch counts, and an
expert-parallel forward is a collective every rank must join.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from lightning.fabric.strategies import _StrategyRegistry
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer

from lightning_moe.errors import ConfigError
from lightning_moe.experts import Experts
from lightning_moe.experts.expert_parallel import ExpertShard, gather_experts, shard_experts, unshard_experts
from lightning_moe.layer import MoELayer, moe_layers

if TYPE_CHECKING:
    import lightning.pytorch as pl

MESH_DIMS = ("data_parallel", "expert_parallel")


def check_expert_parallel_size(world_size: int, expert_parallel_size: int | None) -> None:
    """``ConfigError`` unless ``expert_parallel_size`` is None (all ranks) or a positive int dividing the ranks.

    The strategies call it when the Trainer is built, so a bad size fails before any process
    starts, and LightningCLI reports it as one line (a check in ``__init__`` would surface
    inside jsonargparse's parse error instead).
    """
    size = expert_parallel_size
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ConfigError(f"expert_parallel_size must be a positive int or None (all ranks), got {size!r}")
    check_world_size(world_size, world_size if size is None else size)


def check_world_size(world_size: int, expert_parallel_size: int) -> None:
    """``ValueError`` unless ``expert_parallel_size`` divides the number of processes."""
    if world_size % expert_parallel_size:
        raise ConfigError(
            f"expert_parallel_size={expert_parallel_size} does not divide the world size {world_size}"
            " (num_nodes x devices): the ranks form a [world / expert_parallel_size, expert_parallel_size]"
            " mesh. Choose devices or expert_parallel_size so that it divides."
        )


def check_expert_parallel_model(module: nn.Module, expert_parallel_size: int) -> list[tuple[str, MoELayer]]:
    """The model's MoE layers, or ``ValueError`` naming the first layer that cannot be sharded."""
    layers = moe_layers(module)
    if not layers:
        raise ConfigError(
            f"ExpertParallelStrategy found no MoELayer in {type(module).__name__}: there are no experts to"
            " shard. Use strategy='ddp' for a model without MoE layers."
        )
    for name, layer in layers:
        if layer.num_experts % expert_parallel_size:
            raise ConfigError(
                f"MoE layer {name!r} has num_experts={layer.num_experts}, which expert_parallel_size="
                f"{expert_parallel_size} does not divide: every rank must hold the same number of experts."
                f" Use an expert_parallel_size that divides {layer.num_experts}."
            )
    return layers


def reduce_expert_gradients(
    params: list[nn.Parameter], data_parallel_group: dist.ProcessGroup | None, world_size: int
) -> None:
    """Turn owner-side expert gradients (sums over an expert-parallel group) into global-batch means.

    ``data_parallel_group`` joins the ranks holding the same experts (None: only this one).
    """
    grads = [p.grad for p in params if p.grad is not None]
    if data_parallel_group is not None:
        for grad in grads:
            dist.all_reduce(grad, group=data_parallel_group)
    for grad in grads:
        grad.div_(world_size)


class ExpertParallelStrategy(DDPStrategy):
    """DDP for the replicated parameters, experts sharded over an expert-parallel group.

    Args:
        expert_parallel_size: ranks that share one copy of the experts (each holds
            ``num_experts / expert_parallel_size`` of every layer's experts). Must divide
            the world size and every MoE layer's ``num_experts``. ``None``: all ranks.
        **kwargs: anything :class:`~lightning.pytorch.strategies.DDPStrategy` takes
            (``start_method``, ``process_group_backend``, ``timeout``, DDP kwargs, ...).

    Registered names: ``"moe_expert_parallel"`` (processes started like ``"ddp"``),
    ``"moe_expert_parallel_spawn"`` and ``"moe_expert_parallel_fork"``, all with
    ``expert_parallel_size=None``.
    """

    def __init__(self, expert_parallel_size: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._expert_parallel_size = expert_parallel_size
        self.device_mesh: DeviceMesh | None = None
        self._sharded: list[tuple[str, Experts]] = []  # (qualified name, experts) of the sharded layers
        self._ignored_before: list[str] | None = None
        self._failed = False

    @property
    def expert_parallel_size(self) -> int:
        return self._expert_parallel_size or self.world_size

    @property
    def _shards_experts(self) -> bool:
        return self.expert_parallel_size > 1

    def _configure_launcher(self) -> None:
        check_expert_parallel_size(self.num_nodes * self.num_processes, self._expert_parallel_size)
        super()._configure_launcher()

    def setup_environment(self) -> None:
        super().setup_environment()
        if self._shards_experts and self.device_mesh is None:
            ep = self.expert_parallel_size
            self.device_mesh = init_device_mesh(
                self.root_device.type, (self.world_size // ep, ep), mesh_dim_names=MESH_DIMS
            )

    def setup(self, trainer: pl.Trainer) -> None:
        self._failed = False
        layers = check_expert_parallel_model(self.lightning_module, self.expert_parallel_size)
        sharding = self._shards_experts and trainer.state.fn != TrainerFn.PREDICTING
        if sharding:
            self._shard(layers)
        super().setup(trainer)
        if sharding:
            # Instance attribute: the precision plugin's norm clipping would see one rank's experts only.
            self.precision_plugin.clip_grad_by_norm = self._clip_grad_by_global_norm
            scaler = getattr(self.precision_plugin, "scaler", None)
            if scaler is not None:
                scaler.unscale_ = self._unscale_agreeing_on_overflow(scaler.unscale_)

    def _shard(self, layers: list[tuple[str, MoELayer]]) -> None:
        assert self.device_mesh is not None
        group = self.device_mesh.get_group("expert_parallel")
        rank = self.device_mesh.get_local_rank("expert_parallel")
        ignored = []
        for name, layer in layers:
            experts = layer.experts.to(self.root_device)
            with torch.no_grad():
                for param in experts.parameters(recurse=False):
                    dist.broadcast(param, src=0)
            shard_experts(experts, ExpertShard(group, rank, self.expert_parallel_size, layer.num_experts))
            prefix = f"{name}.experts" if name else "experts"
            self._sharded.append((prefix, experts))
            ignored += [f"{prefix}.{p}" for p, _ in experts.named_parameters(recurse=False)]
        module = self.lightning_module
        self._ignored_before = getattr(module, "_ddp_params_and_buffers_to_ignore", None)
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            module, list(self._ignored_before or []) + ignored
        )

    def _expert_parameters(self) -> list[nn.Parameter]:
        return [p for _, experts in self._sharded for p in experts.parameters(recurse=False)]

    def _data_parallel_group(self) -> dist.ProcessGroup | None:
        assert self.device_mesh is not None
        if self.world_size == self.expert_parallel_size:
            return None
        return self.device_mesh.get_group("data_parallel")

    def optimizer_step(
        self,
        optimizer: Optimizer,
        closure: Callable[[], Any],
        model: pl.LightningModule | nn.Module | None = None,
        **kwargs: Any,
    ) -> Any:
        if not self._sharded:
            return super().optimizer_step(optimizer, closure, model, **kwargs)
        expert_ids = {id(p) for p in self._expert_parameters()}
        params = [p for group in optimizer.param_groups for p in group["params"] if id(p) in expert_ids]

        def closure_then_reduce() -> Any:
            # Once per optimizer step, after its last backward and before clipping, the
            # optimizer-step hooks and the step: the expert gradients then hold the sums of all
            # micro-batches (automatic accumulation, or several manual_backward calls).
            result = closure()
            reduce_expert_gradients(params, self._data_parallel_group(), self.world_size)
            return result

        return super().optimizer_step(optimizer, closure_then_reduce, model, **kwargs)

    def _unscale_agreeing_on_overflow(self, unscale: Callable[[Optimizer], None]) -> Callable[[Optimizer], None]:
        """``GradScaler.unscale_``, then every rank takes the overflow flag of any rank.

        fp16 loss scaling skips a step (and lowers the scale) when the rank's own gradients
        hold inf/NaN. Expert gradients differ between the ranks of a group, so one rank could
        skip alone and its replicated parameters would fall behind for good; as FSDP's
        ``ShardedGradScaler`` does, the flag is all-reduced (max) before the step decides.
        """

        def unscale_and_agree(optimizer: Optimizer) -> None:
            unscale(optimizer)
            scaler = self.precision_plugin.scaler
            found_infs = list(scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"].values())
            found_inf = torch.stack(found_infs).amax() if found_infs else torch.zeros((), device=self.root_device)
            dist.all_reduce(found_inf, op=dist.ReduceOp.MAX)
            for flag in found_infs:
                flag.copy_(found_inf)

        return unscale_and_agree

    def _grad_norm(self, grads: list[Tensor]) -> Tensor:
        # get_total_norm([]) is a CPU tensor, which NCCL cannot all-reduce; a rank holds no
        # gradients e.g. in a step NonFiniteGuard(action="skip") dropped (Lightning clips after it).
        return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=self.root_device)

    def _clip_grad_by_global_norm(self, optimizer: Optimizer, clip_val: float) -> None:
        assert self.device_mesh is not None
        params = [p for p in self.precision_plugin.main_params(optimizer) if p.grad is not None]
        expert_ids = {id(p) for p in self._expert_parameters()}
        replicated_norm = self._grad_norm([p.grad for p in params if id(p) not in expert_ids])
        expert_squares = self._grad_norm([p.grad for p in params if id(p) in expert_ids]).pow(2)
        dist.all_reduce(expert_squares, group=self.device_mesh.get_group("expert_parallel"))
        total_norm = (replicated_norm.pow(2) + expert_squares).sqrt()
        torch.nn.utils.clip_grads_with_norm_(params, clip_val, total_norm)

    # ---- checkpoints: always the single-process layout -------------------------------

    def lightning_module_state_dict(self) -> dict[str, Any]:
        state = super().lightning_module_state_dict()
        for prefix, experts in self._sharded:
            for name, param in experts.named_parameters(recurse=False):
                state[f"{prefix}.{name}"] = gather_experts(param, experts.expert_parallel)
        return state

    def _optimizer_shards(self, optimizer: Optimizer) -> dict[int, tuple[nn.Parameter, ExpertShard]]:
        """Expert parameters by their index in ``optimizer.state_dict()``."""
        shard_of = {
            id(p): (p, experts.expert_parallel)
            for _, experts in self._sharded
            for p in experts.parameters(recurse=False)
        }
        params = [p for group in optimizer.param_groups for p in group["params"]]
        return {index: shard_of[id(p)] for index, p in enumerate(params) if id(p) in shard_of}

    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        state = super().optimizer_state(optimizer)
        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        shards = self._optimizer_shards(optimizer)
        if not shards:
            return state
        per_param = dict(state["state"])
        for index, (param, shard) in shards.items():
            if index in per_param:
                per_param[index] = {
                    key: gather_experts(value, shard)
                    if isinstance(value, Tensor) and value.shape == param.shape
                    else value
                    for key, value in per_param[index].items()
                }
        return {**state, "state": per_param}

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        if self._sharded:
            states = [
                self._slice_optimizer_state(optimizer, state)
                for optimizer, state in zip(self.optimizers, checkpoint["optimizer_states"])
            ]
            checkpoint = {**checkpoint, "optimizer_states": states}
        super().load_optimizer_state_dict(checkpoint)

    def _slice_optimizer_state(self, optimizer: Optimizer, state: dict[str, Any]) -> dict[str, Any]:
        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        per_param = dict(state["state"])
        for index, (param, shard) in self._optimizer_shards(optimizer).items():
            if index not in per_param:
                continue
            lo, hi = shard.first_expert, shard.first_expert + shard.num_local_experts
            full_shape = (shard.num_experts, *param.shape[1:])
            per_param[index] = {
                key: value[lo:hi].clone() if isinstance(value, Tensor) and value.shape == full_shape else value
                for key, value in per_param[index].items()
            }
        return {**state, "state": per_param}

    # ---- end of a stage -------------------------------------------------------------

    def on_exception(self, exception: BaseException) -> None:
        # Gathering on teardown is a collective the other ranks may never join now.
        self._failed = True
        super().on_exception(exception)

    def teardown(self) -> None:
        if self._sharded:
            if not self._failed:
                for _, experts in self._sharded:
                    unshard_experts(experts)
            module = self.lightning_module
            if self._ignored_before is None:
                del module._ddp_params_and_buffers_to_ignore
            else:
                module._ddp_params_and_buffers_to_ignore = self._ignored_before
            self._sharded, self._ignored_before = [], None
            vars(self.precision_plugin).pop("clip_grad_by_norm", None)
            if getattr(self.precision_plugin, "scaler", None) is not None:
                vars(self.precision_plugin.scaler).pop("unscale_", None)
        super().teardown()

    @classmethod
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        for name, start_method in (
            ("moe_expert_parallel", "popen"),
            ("moe_expert_parallel_spawn", "spawn"),
            ("moe_expert_parallel_fork", "fork"),
        ):
            if name not in strategy_registry:
                strategy_registry.register(
                    name,
                    cls,
                    description=f"Experts sharded over all ranks (all-to-all), DDP for the rest; start_method {start_method!r}",
                    start_method=start_method,
                )


ExpertParallelStrategy.register_strategies(StrategyRegistry)
