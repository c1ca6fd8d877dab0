"""Shared machinery for callbacks that add an auxiliary router loss to every MoELayer."""

from __future__ import annotations

from typing import Callable

import lightning as L
import torch
from torch import Tensor, nn

from lightning_moe.errors import ConfigError
from lightning_moe.layer import MoELayer, moe_layers
from lightning_moe.routing import Routing


def layer_tags(module: nn.Module) -> list[tuple[str, MoELayer]]:
    """``("layer_00", layer), ...`` for every MoELayer, numbered in module order."""
    return [(f"layer_{i:02d}", layer) for i, (_, layer) in enumerate(moe_layers(module))]


def lightning_loss_scale(trainer: L.Trainer) -> Callable[[], float | Tensor]:
    """What Lightning multiplies the returned loss by before ``backward``.

    Automatic optimisation divides the loss by ``accumulate_grad_batches``, and fp16 AMP
    multiplies it by the grad scaler's current scale. An attached aux loss must be
    scaled the same way, or its effective weight would change with trainer settings.
    Evaluated lazily (during backward) because the AMP scale changes between steps.
    """

    def scale() -> float | Tensor:
        value = 1.0
        if trainer.lightning_module.automatic_optimization:
            value /= trainer.accumulate_grad_batches
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            value = value * _loss_scale(scaler)
        return value

    return scale


def _loss_scale(scaler) -> float | Tensor:
    """The grad scaler's current scale, as the tensor on the device when it has one.

    ``GradScaler.get_scale()`` reads that tensor back to the host: a synchronisation per
    MoE layer and backward. The tensor is the very factor ``scaler.scale(loss)`` applied.
    Before the first ``scale()`` there is no tensor yet and ``get_scale()`` returns the
    initial scale without reading anything.
    """
    if isinstance(scaler, torch.amp.GradScaler):
        device_scale = scaler._get_scale_async()
        if device_scale is not None:
            return device_scale
    return scaler.get_scale()


class AuxLossCallback(L.Callback):
    """Attaches ``weight * loss(routing)`` to every MoELayer's output during training.

    Subclasses define :attr:`name` and :meth:`loss`. The user's ``training_step`` does
    not change: the loss reaches the gradient through :func:`lightning_moe.attach_aux_loss`.
    Logs the weighted loss per layer (``moe/layer_00/<name>``, mean over the step's
    micro-batches) and in total (``moe/<name>``).
    """

    name: str

    def __init__(self, weight: float) -> None:
        if weight < 0:
            raise ConfigError(f"{type(self).__name__}: the loss weight must be >= 0, got {weight}")
        self.weight = weight

    def loss(self, routing: Routing, logits_TE: Tensor, tokens_per_expert_E: Tensor) -> Tensor:
        raise NotImplementedError

    def _weighted_loss(self, routing: Routing, logits_TE: Tensor, tokens_per_expert_E: Tensor) -> Tensor:
        return self.weight * self.loss(routing, logits_TE, tokens_per_expert_E)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Not ``setup``: it runs before the module's ``configure_model``, which may build the layers.
        scale = lightning_loss_scale(trainer)
        for _, layer in layer_tags(pl_module):
            layer.aux_losses[self.name] = self._weighted_loss
            layer.aux_grad_scale = scale

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for _, layer in layer_tags(pl_module):
            layer.aux_losses.pop(self.name, None)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        total = 0.0
        for tag, layer in layer_tags(pl_module):
            stats = layer.routing_stats
            if self.name not in stats.aux_losses or stats.num_forwards is None:
                continue
            value = stats.aux_losses[self.name] / stats.num_forwards
            pl_module.log(f"moe/{tag}/{self.name}", value, on_step=True, on_epoch=False)
            total = total + value
            layer.finish_step()
        pl_module.log(f"moe/{self.name}", total, on_step=True, on_epoch=False, prog_bar=False)
