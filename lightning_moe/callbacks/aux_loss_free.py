"""Aux-loss-free load balancing (DeepSeek-V3): a per-expert bias on the selection scores."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_moe.callbacks.aux_loss import layer_tags
from lightning_moe.callbacks.routing_monitor import StepStatsReader
from lightning_moe.distributed import data_parallel_sum
from lightning_moe.errors import ConfigError
from lightning_moe.layer import MoELayer, moe_layers


def balancing_update(bias_E: Tensor, tokens_per_expert_E: Tensor, gamma: float) -> None:
    """One step of DeepSeek-V3's bias update (Sec. 2.1.2), in place on ``bias_E``.

    ``b_i += gamma * sign(mean load - load_i)``, then ``b -= mean(b)``: overloaded experts
    become less likely to be chosen, underloaded ones more. Recentring (not in DeepSeek-V3's
    description) keeps the bias from drifting as a whole; a common shift changes no top-k
    choice, nor a group-limited one (every group's score moves by the same amount), so the
    routing is DeepSeek-V3's exactly. In place, because the
    registered buffer object is what ``state_dict``, DDP's buffer broadcast and
    checkpointing code hold: rebinding it would leave them with a stale tensor.
    """
    load_E = tokens_per_expert_E.to(bias_E.dtype)
    bias_E.add_(torch.sign(load_E.mean() - load_E), alpha=gamma)
    bias_E.sub_(bias_E.mean())


class AuxLossFreeBalancing(L.Callback):
    """Balances expert load without an auxiliary loss, by moving a selection bias.

    Every MoELayer holds :attr:`~lightning_moe.MoELayer.selection_bias` ([E], float32
    under any precision, in the model's ``state_dict``, so checkpoints carry it and
    ``fit(ckpt_path=...)`` restores it). This callback switches it on
    (``layer.use_selection_bias = True``, saved in the ``state_dict`` too): the
    estimator then chooses the top-k experts of ``scores + bias`` (softmax scores, or the
    sigmoid scores of a layer with ``score_function="sigmoid"``, within its best groups
    under group-limited selection) while the gate weights stay the unbiased scores, so the
    bias steers routing but never enters the output or the gradient. A Hugging Face model
    converted from a family that holds such a bias (DeepSeek-V3's ``e_score_correction_bias``)
    starts from the family's values and exports the moved ones.

    Once per optimizer step (``on_before_optimizer_step``, so once per step under
    ``accumulate_grad_batches``) the step's tokens per expert, summed over all
    micro-batches and data-parallel ranks, update the bias::

        b_i += gamma * sign(mean load - load_i);   b -= mean(b)

    Every rank applies the same update to the same counts, so the biases stay identical
    across ranks. The switch stays on after ``fit``, and a model loaded from a checkpoint
    (e.g. by ``lightning-moe sample`` or ``predict``, without this callback) has it on
    too, so validation, testing and inference route the way training did.

    Logs ``moe/layer_XX/selection_bias_max_abs`` per layer.

    Only estimators with ``supports_selection_bias`` (``topk``, ``straight_through``,
    ``densemixer``, ``default_moe``) can be biased; sampling-based ones (``sparsemixer``, ``sparsemixer_v2``) are refused at fit
    start, because a bias on the scores would change the distribution their router
    gradient is derived for.

    Args:
        gamma: bias update speed, on the scale of a routing probability (DeepSeek-V3
            uses 1e-3 for most of its training).
    """

    def __init__(self, gamma: float = 1e-3) -> None:
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not gamma > 0:
            raise ConfigError(f"AuxLossFreeBalancing: gamma must be a number > 0, got {gamma!r}")
        self.gamma = float(gamma)
        self._layers: list[tuple[str, MoELayer]] = []
        self._stats = StepStatsReader()

    def _enable(self, pl_module: L.LightningModule) -> None:
        self._layers = layer_tags(pl_module)
        names = {id(layer): name for name, layer in moe_layers(pl_module)}
        for tag, layer in self._layers:
            if not layer.estimator.supports_selection_bias:
                estimator = type(layer.estimator).__name__
                raise ConfigError(
                    f"AuxLossFreeBalancing: MoELayer {names[id(layer)]!r} ({tag}) uses the estimator {estimator},"
                    f" which does not support a selection bias ({estimator}.supports_selection_bias is False;"
                    " for sampled routing such as SparseMixer's, a bias would change the distribution the router"
                    " gradient is derived for). Use estimator='topk' or 'default_moe' for that layer, or balance"
                    " it with LoadBalancingLoss instead."
                )
        for _, layer in self._layers:
            layer.use_selection_bias = True

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Not ``setup``: layers built in ``configure_model`` exist only from here on.
        self._enable(pl_module)
        self._stats.reset()
        if not self._layers:
            rank_zero_warn("AuxLossFreeBalancing: the model has no MoELayer; it does nothing.")

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._enable(pl_module)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._enable(pl_module)

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._enable(pl_module)

    def _step_counts(self, tag: str, layer: MoELayer) -> Tensor:
        """The tokens per expert of this optimizer step's training forwards (zeros if none ran)."""
        stats = self._stats.read(tag, layer)
        if stats is None:
            return layer.selection_bias.new_zeros(layer.num_experts)
        return stats.tokens_per_expert.to(layer.selection_bias.dtype)

    @torch.no_grad()
    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        if not self._layers:
            return
        counts = [self._step_counts(tag, layer) for tag, layer in self._layers]
        # One collective for all layers: every rank must call it, with or without tokens.
        summed = data_parallel_sum(torch.cat(counts)).split([c.numel() for c in counts])
        for (tag, layer), counts_E in zip(self._layers, summed):
            balancing_update(layer.selection_bias, counts_E, self.gamma)
            layer.finish_step()
            max_abs = layer.selection_bias.abs().max()
            pl_module.log(f"moe/{tag}/selection_bias_max_abs", max_abs, on_step=True, on_epoch=False)
