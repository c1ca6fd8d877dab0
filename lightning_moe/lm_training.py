"""What every causal language model of this library trains with, whatever builds its logits.

:class:`CausalLMTraining` is the LightningModule part shared by :class:`~lightning_moe.MoELanguageModel`
(this library's own transformer) and :class:`~lightning_moe.hf.HFMoELanguageModel` (a converted
Hugging Face model): the next-token loss over ``(input_ids, targets)`` batches, token-weighted
validation/test loss, AdamW with a warmup + cosine schedule, and the callbacks the model adds
itself. A subclass saves its hyperparameters (``learning_rate``, ``weight_decay``, ``betas``,
``warmup_steps``, ``min_lr_ratio`` among them) and implements :meth:`CausalLMTraining.logits`.
"""

from __future__ import annotations

import math
from functools import partial

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torchmetrics.aggregation import MeanMetric

from lightning_moe.data.loading import IGNORE_INDEX
from lightning_moe.errors import ConfigError
from lightning_moe.layer import add_missing_layer_state, moe_layers


def warmup_cosine_factor(
    step: int, *, warmup_steps: int, total_steps: float, min_lr_ratio: float
) -> float:
    """Learning-rate multiplier for optimizer step ``step`` (0-based).

    With ``s = step + 1`` steps taken: linear warmup ``s / warmup_steps`` while
    ``s <= warmup_steps``, then cosine decay
    ``min_lr_ratio + (1 - min_lr_ratio) * (1 + cos(pi * p)) / 2`` with
    ``p = (s - warmup_steps) / (total_steps - warmup_steps)`` clipped to [0, 1], so the
    first step already trains, the last warmup step is at the peak and the last step
    (``step = total_steps - 1``) is at ``min_lr_ratio``. An infinite ``total_steps``
    keeps the peak after warmup.
    """
    taken = step + 1
    if taken <= warmup_steps:
        return taken / warmup_steps
    if not math.isfinite(total_steps):
        return 1.0
    progress = min(1.0, max(0.0, (taken - warmup_steps) / max(1.0, total_steps - warmup_steps)))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def check_optimizer_args(
    learning_rate: float, weight_decay: float, betas: tuple[float, float], warmup_steps: int, min_lr_ratio: float
) -> None:
    """Refuse optimizer/schedule settings that cannot train, naming the field."""
    if learning_rate <= 0:
        raise ConfigError(f"`learning_rate` must be > 0, got {learning_rate}.")
    if weight_decay < 0:
        raise ConfigError(f"`weight_decay` must be >= 0, got {weight_decay}.")
    if not all(0.0 <= beta < 1.0 for beta in betas):
        raise ConfigError(f"`betas` must both lie in [0, 1), got {betas}.")
    if warmup_steps < 0:
        raise ConfigError(f"`warmup_steps` must be >= 0, got {warmup_steps}.")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ConfigError(f"`min_lr_ratio` must be in [0, 1], got {min_lr_ratio}.")


#: Devices with torch's fused AdamW kernel that this library's models train on.
FUSED_ADAMW_DEVICES = ("cpu", "cuda")


def adamw(params, **kwargs) -> torch.optim.AdamW:
    """``torch.optim.AdamW(params, **kwargs)``, with its fused kernel when every parameter is on
    a device of :data:`FUSED_ADAMW_DEVICES`.

    The fused kernel updates each parameter in one pass; an MoE model has several times the
    parameters of a dense model with the same active ones, so this step weighs more in it.
    Measured on a 2-core CPU for 26M float32 parameters: 17 ms a step against 96 ms for
    ``foreach`` and 84 ms for the per-parameter loop torch uses on CPU by default.
    """
    groups = list(params)
    tensors = [p for group in groups for p in (group["params"] if isinstance(group, dict) else [group])]
    if "fused" not in kwargs and "foreach" not in kwargs:
        kwargs["fused"] = bool(tensors) and all(
            p.device.type in FUSED_ADAMW_DEVICES and p.is_floating_point() for p in tensors
        )
    return torch.optim.AdamW(groups, **kwargs)


class CausalLMTraining(L.LightningModule):
    """Next-token training, evaluation, optimizer and schedule of a causal LM with MoE layers.

    Batches are ``(input_ids [B, T] int64, targets [B, T] int64, *extra)``; targets equal to
    :data:`IGNORE_INDEX` do not count towards the loss. Rows packed with several examples come
    as a :class:`~lightning_moe.data.packing.PackedBatch`, whose ``position_ids`` a model reads
    through :func:`~lightning_moe.data.packing.position_ids_of` (the one place that knows the
    format) to keep each example's attention to itself. MoE auxiliary losses are attached
    inside the MoE layers, so the steps here compute only the language-modelling loss.
    """

    def __init__(self) -> None:
        super().__init__()
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()

    def shard_with_fsdp2(self, units: list[nn.Module], root: nn.Module) -> None:
        """Under Lightning's ``ModelParallelStrategy``, ``fully_shard`` each of ``units``, then ``root``.

        The usual FSDP2 layout: one all-gather per unit (a transformer block) over the
        data-parallel mesh. Under :class:`~lightning_moe.strategies.ExpertParallelFSDP2Strategy`
        (a ModelParallelStrategy) the experts are first split over its expert-parallel mesh.
        Tensor parallelism is refused. Other strategies leave the model as it is; idempotent,
        as Lightning asks of ``configure_model``.
        """
        from lightning.pytorch.strategies import ModelParallelStrategy

        if self._trainer is None or not isinstance(self.trainer.strategy, ModelParallelStrategy):
            return
        from torch.distributed.fsdp import FSDPModule, fully_shard

        mesh = self.device_mesh
        if mesh["tensor_parallel"].size() > 1:
            raise ConfigError(
                f"{type(self).__name__} under ModelParallelStrategy shards its parameters with FSDP2 only; tensor"
                f" parallelism is not supported (tensor_parallel_size={mesh['tensor_parallel'].size()})."
                " Use ModelParallelStrategy(data_parallel_size=<number of devices>, tensor_parallel_size=1)."
            )
        if isinstance(root, FSDPModule):
            return
        from lightning_moe.strategies.expert_parallel_fsdp2 import ExpertParallelFSDP2Strategy

        if isinstance(self.trainer.strategy, ExpertParallelFSDP2Strategy):
            self.trainer.strategy.shard_experts(root)  # before the blocks, which then leave the experts alone
        for unit in units:
            fully_shard(unit, mesh=mesh["data_parallel"])
        fully_shard(root, mesh=mesh["data_parallel"])

    def logits(self, batch: tuple[Tensor, ...]) -> Tensor:
        """Logits ``[B, T, V]`` for the batch's ``input_ids``."""
        raise NotImplementedError

    def configure_callbacks(self) -> list[L.Callback]:
        """Callbacks this model trains with, each added unless the trainer has one of its kind.

        ``DefaultOutputEMA`` when a layer uses Default MoE (its EMA needs an updater),
        ``ResumableRNG`` (sampled routing resumes exactly), ``ResumableEpochEnd`` (a run stopped
        by ``max_steps`` resumes at the right batch), ``PreemptionCheckpoint`` (SIGTERM
        saves ``last.ckpt`` at the current step) and ``NonFiniteGuard`` (NaN/inf stops training
        with the layer named; impossible setups fail before any compute).
        """
        from lightning_moe.callbacks import DefaultOutputEMA, NonFiniteGuard, ResumableRNG
        from lightning_moe.checkpointing import PreemptionCheckpoint, ResumableEpochEnd
        from lightning_moe.estimators.default_moe import DefaultMoE

        wanted: list[L.Callback] = [ResumableRNG(), ResumableEpochEnd(), PreemptionCheckpoint(), NonFiniteGuard()]
        if any(isinstance(layer.estimator, DefaultMoE) for _, layer in moe_layers(self)):
            wanted.insert(0, DefaultOutputEMA())
        present = self.trainer.callbacks if self._trainer is not None else []
        return [c for c in wanted if not any(isinstance(p, type(c)) for p in present)]

    def _token_loss(self, batch: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
        """Mean next-token cross-entropy (float32) and the number of tokens it averages."""
        targets = batch[1]
        logits = self.logits(batch)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
        return loss, (targets != IGNORE_INDEX).sum()

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        loss, _ = self._token_loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch[0].shape[0])
        return loss

    def validation_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> None:
        loss, num_tokens = self._token_loss(batch)
        self.val_loss.update(loss, weight=num_tokens)

    def test_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> None:
        loss, num_tokens = self._token_loss(batch)
        self.test_loss.update(loss, weight=num_tokens)

    def on_validation_epoch_end(self) -> None:
        self._log_epoch_loss("val", self.val_loss)

    def on_test_epoch_end(self) -> None:
        self._log_epoch_loss("test", self.test_loss)

    def _log_epoch_loss(self, split: str, metric: MeanMetric) -> None:
        # Token-weighted mean over the epoch (and over ranks: MeanMetric syncs in compute),
        # so perplexity is exp of the per-token loss, not of a mean of batch means.
        loss = metric.compute()
        metric.reset()
        self.log(f"{split}/loss", loss, prog_bar=split == "val")
        self.log(f"{split}/ppl", loss.exp())

    def parameter_groups(self) -> list[tuple[float, list[tuple[str, nn.Parameter]]]]:
        """The optimizer's groups, ``(weight decay, [(name, parameter), ...])``, empty ones left out.

        Trainable matrices decay; norms, biases and embeddings (and a head tied to them) do not.
        """
        embedding_weights = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)}
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            if param.ndim < 2 or id(param) in embedding_weights:
                no_decay.append((name, param))
            else:
                decay.append((name, param))
        groups = [(self.hparams.weight_decay, decay), (0.0, no_decay)]
        return [(weight_decay, params) for weight_decay, params in groups if params]

    def configure_optimizers(self):
        """AdamW over :meth:`parameter_groups` (:func:`adamw`), warmup + cosine schedule stepped every optimizer step."""
        optimizer = adamw(
            [{"params": [p for _, p in params], "weight_decay": decay} for decay, params in self.parameter_groups()],
            lr=self.hparams.learning_rate,
            betas=tuple(self.hparams.betas),
        )
        total_steps = self.trainer.estimated_stepping_batches
        if not math.isfinite(total_steps):
            rank_zero_warn(
                "The trainer has no finite number of steps (set `max_steps` or `max_epochs`);"
                " the learning rate stays at its peak after warmup."
            )
        schedule = partial(
            warmup_cosine_factor,
            warmup_steps=self.hparams.warmup_steps,
            total_steps=total_steps,
            min_lr_ratio=self.hparams.min_lr_ratio,
        )
        # This run's settings; a resume's optimizer state brings the checkpoint's (see on_train_start).
        self._optimizer_settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Bring an older checkpoint to this version, then refuse one of another architecture with one
        error listing what differs."""
        from lightning_moe.checkpointing import check_checkpoint_matches
        from lightning_moe.run_identity import adapt_estimator_state

        if isinstance(checkpoint.get("state_dict"), dict):  # older checkpoints: other layouts, fewer switches
            self.merge_old_expert_optimizer_state(checkpoint)
            add_missing_layer_state(self, checkpoint["state_dict"])
            adapt_estimator_state(self, checkpoint)  # a resume that switches the estimator
        check_checkpoint_matches(self, checkpoint, hparams=self.hparams, strict=self.strict_loading)

    def merge_old_expert_optimizer_state(self, checkpoint: dict) -> None:
        """Bring the optimizer state of a checkpoint with separate expert gate (``w1``) and up
        (``v1``) weights to the merged ``w1`` [E, D, 2F], in place, so such a run resumes exactly.

        Call before the state dict itself is converted (it tells which layers were saved so).
        AdamW's per-parameter tensors of ``w1`` and ``v1`` are concatenated like the weights;
        the parameters are renumbered as :meth:`parameter_groups` orders them.
        """
        from lightning_moe.checkpointing import CheckpointError

        saved = checkpoint.get("state_dict") or {}
        merged = {name[: -len("v1")] + "w1" for name in saved if name.endswith("experts.v1")}
        states = checkpoint.get("optimizer_states") or []
        if not merged or not states:
            return
        groups = [[name for name, _ in params] for _, params in self.parameter_groups()]
        old_groups = [[old for name in names for old in ((name, name[:-2] + "v1") if name in merged else (name,))]
                      for names in groups]
        state = states[0]
        if len(states) != 1 or [len(g["params"]) for g in state["param_groups"]] != [len(g) for g in old_groups]:
            raise CheckpointError(
                "the checkpoint's optimizer state has separate expert gate and up weights (w1, v1) in groups this"
                " model cannot match; load its weights alone (load_from_checkpoint) and start a new run from them"
            )
        by_name = {
            name: state["state"].get(index)
            for group, names in zip(state["param_groups"], old_groups)
            for index, name in zip(group["params"], names)
        }
        new_state, index = {}, 0
        for group, names in zip(state["param_groups"], groups):
            group["params"] = list(range(index, index + len(names)))
            for name in names:
                entry, up = by_name[name], by_name.get(name[:-2] + "v1") if name in merged else None
                if entry is not None and up is not None:
                    entry = {k: torch.cat([v, up[k]], dim=2) if torch.is_tensor(v) and v.ndim == 3 else v
                             for k, v in entry.items()}
                if entry is not None:
                    new_state[index] = entry
                index += 1
        state["state"] = new_state

    def on_train_start(self) -> None:
        # A resumed run builds its schedule for its own length (estimated_stepping_batches), but the
        # optimizer state brings the rate the checkpoint's schedule set for this step; with a new
        # max_steps they differ, so set this run's rate from its first step on (a no-op otherwise).
        # It also brings the checkpoint's peak rate, weight decay and betas: this run's apply
        # (lightning-moe reports them as changed on resume).
        for config in self.trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
                # LambdaLR's own formula (get_lr), which warns when called outside step().
                groups = scheduler.optimizer.param_groups
                settings = getattr(self, "_optimizer_settings", None)
                if settings is not None and len(settings) == len(groups):
                    for group, own in zip(groups, settings):
                        group.update(own, initial_lr=own["lr"])
                    scheduler.base_lrs = [own["lr"] for own in settings]
                for group, base, factor in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas):
                    group["lr"] = base * factor(scheduler.last_epoch)
