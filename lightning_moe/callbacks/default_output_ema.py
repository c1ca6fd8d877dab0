"""Updates Default MoE's default outputs (an EMA of expert outputs) once per optimizer step."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn

from lightning_moe.distributed import data_parallel_sum
from lightning_moe.estimators.default_moe import DefaultMoE, check_beta
from lightning_moe.layer import moe_layers


class DefaultOutputEMA(L.Callback):
    """Drives :meth:`DefaultMoE.update_defaults` for every MoELayer using Default MoE.

    The update runs in ``on_before_optimizer_step``, so once per optimizer step even
    with ``accumulate_grad_batches``, and the per-expert sums are all-reduced over the
    data-parallel ranks first: every rank ends with the same buffers, equal to a
    single-process run on the same global batch. The buffers live in the model's
    ``state_dict`` (so checkpoints carry them); this callback holds no state of its own.

    The defaults' mean norm is estimator telemetry (``default_output_norm``), logged as
    ``moe/layer_XX/default_output_norm`` by :class:`RoutingMonitor`.

    Args:
        beta: EMA decay for every layer; ``None`` keeps each estimator's own.
        weighted: use the weighted variant in every layer; ``None`` keeps each estimator's.
    """

    def __init__(self, beta: float | None = None, weighted: bool | None = None) -> None:
        self.beta = None if beta is None else check_beta(beta)
        self.weighted = weighted
        self._estimators: list[DefaultMoE] = []
        self._attached_here: list[DefaultMoE] = []

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Not ``setup``: layers built in ``configure_model`` exist only from here on.
        self._estimators = [
            layer.estimator for _, layer in moe_layers(pl_module) if isinstance(layer.estimator, DefaultMoE)
        ]
        if not self._estimators:
            rank_zero_warn("DefaultOutputEMA: the model has no MoELayer with estimator='default_moe'; it does nothing.")
        for estimator in self._estimators:
            if self.beta is not None:
                estimator.beta = self.beta
            if self.weighted is not None:
                estimator.weighted = self.weighted
            if not estimator.updater_attached:
                estimator.attach_updater()
                self._attached_here.append(estimator)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for estimator in self._attached_here:
            estimator.attach_updater(False)
        self._estimators, self._attached_here = [], []

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        for estimator in self._estimators:
            estimator.update_defaults(reduce=data_parallel_sum)
