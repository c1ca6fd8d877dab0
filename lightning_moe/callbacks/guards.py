"""Guards that stop a bad run early: impossible setups before any compute, NaN/inf while training.

Shape legend: W data-parallel ranks, L MoE layers.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_moe.distributed import data_parallel_sum
from lightning_moe.errors import ConfigError
from lightning_moe.layer import FINITE_CHECKS, NONFINITE_TENSORS, MoELayer, moe_layers

ACTIONS = ("raise", "skip")


class NonFiniteError(FloatingPointError):
    """An MoE layer saw NaN or inf during training."""


def check_training_setup(trainer: L.Trainer, pl_module: L.LightningModule) -> None:
    """Refuse strategy / backend / precision combinations that cannot train, before any compute.

    * Lightning's ``FSDPStrategy`` on CPU: torch's ``FullyShardedDataParallel`` (FSDP1)
      refuses to run without an accelerator. ``ModelParallelStrategy`` (FSDP2,
      ``fully_shard`` in ``configure_model``) and DDP run on CPU.
    * ``backend="megablocks"`` without a CUDA device, without bf16 precision, or without
      its packages.

    :class:`NonFiniteGuard` calls it at ``setup`` and again at fit start (for layers built
    in ``configure_model``); call it from your own code for the same checks without the guard.
    """
    strategy = trainer.strategy
    device = strategy.root_device
    if isinstance(strategy, FSDPStrategy) and device.type == "cpu":
        raise ConfigError(
            "FSDPStrategy cannot train on CPU: torch's FullyShardedDataParallel (FSDP1) needs an accelerator"
            " ('FSDP needs a non-CPU accelerator device'). On CPU use strategy='ddp' (or 'ddp_fork'), or"
            " lightning.pytorch.strategies.ModelParallelStrategy, whose FSDP2 (fully_shard) runs over gloo;"
            " MoELanguageModel shards itself under it in configure_model."
        )
    for name, layer in moe_layers(pl_module):
        if layer.experts.backend != "megablocks":
            continue
        from lightning_moe.experts.megablocks import load_kernels

        dtype = torch.bfloat16 if str(trainer.precision).startswith("bf16") else torch.float32
        try:
            load_kernels(device, dtype)
        except (RuntimeError, ImportError) as err:
            raise type(err)(
                f"MoELayer {name!r} (trainer device {device}, precision {trainer.precision}): {err}"
            ) from err


class NonFiniteGuard(L.Callback):
    """Raises (default) or skips the optimizer step when an MoE layer sees NaN or inf.

    Every MoELayer checks, in each training forward, its router logits
    (``layer.check_finite = "logits"``, the default) or also its input and output
    (``"all"``) for NaN/inf: one reduction per tensor on the device, with no host
    synchronisation. After each backward this callback gathers every layer's flags over
    the data-parallel ranks (one all-reduce of ``3 L`` values per rank and one host sync
    per micro-batch) and, if any is set:

    * ``action="raise"``: raises :class:`NonFiniteError` naming the rank, the layer
      (its qualified name in the module) and which tensor was not finite, with a hint
      where the NaN came from;
    * ``action="skip"``: skips the step cleanly. The router statistics recorded in the
      step are discarded (no Default-MoE EMA update, no aux-loss-free bias update, no
      telemetry from it), and in ``on_before_optimizer_step`` every parameter's gradient
      is set to ``None``, so the optimizer leaves parameters and its own state (Adam
      moments, step counts) untouched. The step still counts, like a step AMP's grad
      scaler skips: ``global_step`` and the learning-rate schedule advance. Every rank
      decides alike, so data-parallel replicas stay identical. Skipped steps are listed
      in :attr:`skipped_steps` and logged as ``moe/skipped_steps``.

    Raising happens before the optimizer step, so the weights and the last checkpoint
    are still finite: resume from it with ``action="skip"`` or a lower learning rate.
    :attr:`skipped_steps` is saved in checkpoints.

    Lightning has no supported way for a callback to cancel an automatic-optimisation
    step (returning ``None`` from ``training_step`` is for the module's own code), which
    is why skipping works through the gradients. At ``setup`` and fit start the guard
    also runs :func:`check_training_setup`. ``MoELanguageModel`` adds ``NonFiniteGuard()``
    itself; add it to your Trainer for your own module.

    Args:
        action: ``"raise"`` or ``"skip"``.
        check: set every layer's ``check_finite`` (``"logits"``, ``"all"``, ``"off"``);
            ``None`` keeps each layer's own.
    """

    def __init__(self, action: str = "raise", check: str | None = None) -> None:
        if action not in ACTIONS:
            raise ConfigError(f"NonFiniteGuard: action={action!r} is not valid; choose one of {ACTIONS}")
        if check is not None and check not in FINITE_CHECKS:
            raise ConfigError(f"NonFiniteGuard: check={check!r} is not valid; choose one of {FINITE_CHECKS} or None")
        self.action = action
        self.check = check
        self.skipped_steps: list[int] = []
        self._layers: list[tuple[str, MoELayer]] = []
        self._skipping = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            check_training_setup(trainer, pl_module)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        check_training_setup(trainer, pl_module)
        self._layers = moe_layers(pl_module)
        for _, layer in self._layers:
            if self.check is not None:
                layer.check_finite = self.check
            layer.nonfinite = None
        self._skipping = False

    @torch.no_grad()
    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._layers:
            return
        local_L3 = torch.stack([self._take_flags(layer, pl_module.device) for _, layer in self._layers])
        # Every rank fills its own row; one sum over the ranks gives each rank all of them.
        flags_WL3 = local_L3.new_zeros((trainer.world_size, *local_L3.shape), dtype=torch.float32)
        flags_WL3[trainer.global_rank] = local_L3.float()
        flags_WL3 = data_parallel_sum(flags_WL3) > 0
        if flags_WL3.any():
            report = self._describe(flags_WL3, trainer)
            if self.action == "raise":
                raise NonFiniteError(report + " (NonFiniteGuard(action='skip') skips such steps instead.)")
            if not self._skipping:
                rank_zero_warn(f"{report} Skipping this optimizer step (NonFiniteGuard(action='skip')).")
            self._skipping = True
        if self._skipping:
            # Also for the step's later micro-batches: nothing recorded in a skipped step counts.
            for _, layer in self._layers:
                layer.discard_step()

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        if not self._skipping:
            return
        self._skipping = False
        for param in pl_module.parameters():
            param.grad = None
        self.skipped_steps.append(trainer.global_step)
        pl_module.log("moe/skipped_steps", float(len(self.skipped_steps)), on_step=True, on_epoch=False)

    def state_dict(self) -> dict[str, Any]:
        return {"skipped_steps": list(self.skipped_steps)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_steps = list(state_dict.get("skipped_steps", []))

    @staticmethod
    def _take_flags(layer: MoELayer, device: torch.device) -> Tensor:
        flags, layer.nonfinite = layer.nonfinite, None
        return torch.zeros(len(NONFINITE_TENSORS), dtype=torch.bool, device=device) if flags is None else flags

    def _describe(self, flags_WL3: Tensor, trainer: L.Trainer) -> str:
        lines = []
        for rank, layer_index, what in flags_WL3.nonzero().tolist():
            name, layer = self._layers[layer_index]
            line = f"rank {rank}: MoE layer {name!r}: non-finite {NONFINITE_TENSORS[what]}"
            if NONFINITE_TENSORS[what] == "router logits" and not flags_WL3[rank, layer_index, 0]:
                weight = layer.router.weight
                if hasattr(weight, "full_tensor"):  # an FSDP2 shard; every rank describes alike
                    weight = weight.full_tensor()
                if not torch.isfinite(weight).all():
                    line += " (its router weight is not finite: an earlier update diverged)"
                elif layer.check_finite != "all":
                    line += " (its router weight is finite, so its input was not: look upstream; check='all' tells)"
            if NONFINITE_TENSORS[what] == "output" and not flags_WL3[rank, layer_index, :2].any():
                line += " (input and router logits finite: an expert produced it)"
            lines.append(line)
        return f"NaN/inf in training step {trainer.global_step}: " + "; ".join(lines) + "."
