"""Routing telemetry: entropy, load balance, dead experts, and TensorBoard load pictures.

Shape legend: E experts, L MoE layers (in :func:`mutual_information`: L token labels).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torchmetrics import Metric

from lightning_moe.callbacks.aux_loss import layer_tags
from lightning_moe.distributed import all_gather_objects
from lightning_moe.errors import ConfigError
from lightning_moe.layer import MoELayer, RoutingStats

_SCALAR_SUMS = ("num_forwards", "num_tokens", "token_entropy_sum", "gate_sum", "logit_norm_sum")
_EXPERT_SUMS = ("tokens_per_expert", "probs_sum")


class StepStatsReader:
    """Hands out each MoELayer's routing record of the current optimizer step, once.

    A layer keeps its last record until its next training forward, so in a step that ran
    no forward through it the previous step's record is still there: :meth:`read` then
    returns ``None`` instead of counting that record twice.
    """

    def __init__(self) -> None:
        self._last: dict[str, RoutingStats] = {}

    def read(self, tag: str, layer: MoELayer) -> RoutingStats | None:
        stats = layer.routing_stats
        if stats.num_forwards is None or self._last.get(tag) is stats:
            return None
        self._last[tag] = stats
        return stats

    def reset(self) -> None:
        self._last.clear()


def entropy(probs_E: Tensor) -> Tensor:
    """Shannon entropy in nats of a probability vector (0 log 0 = 0)."""
    return -(probs_E * probs_E.clamp_min(1e-30).log()).sum()


def mutual_information(counts_LE: Tensor) -> Tensor:
    """Mutual information (nats) between label and expert of a joint count table [L, E].

    ``I = sum p(l, e) log(p(l, e) / (p(l) p(e)))`` of the empirical distribution. 0 when
    the expert does not depend on the label; ``H(label)`` (``log L`` for equally
    frequent labels) when the label determines which experts are chosen and no expert
    serves two labels.
    """
    joint_LE = counts_LE.double() / counts_LE.sum().clamp_min(1.0)
    outer_LE = joint_LE.sum(dim=1, keepdim=True) * joint_LE.sum(dim=0, keepdim=True)
    terms_LE = joint_LE * (joint_LE / outer_LE.clamp_min(torch.finfo(torch.float64).tiny)).clamp_min(1e-300).log()
    return torch.where(joint_LE > 0, terms_LE, 0.0).sum().to(counts_LE.dtype)


class LayerRoutingMetric(Metric):
    """One MoELayer's routing statistics summed over optimizer steps and data-parallel ranks.

    :meth:`update` takes a :class:`~lightning_moe.RoutingStats` (one optimizer step of
    one rank) or ``None`` (no training forward through the layer in that step); every
    state reduces by sum, so :meth:`compute` describes the global batch of all steps since
    the last :meth:`reset`. The estimator's telemetry keys and the token-label counts become
    states the first time they are seen (:meth:`lazy_states`); ``RoutingMonitor`` gives
    every rank the same states before they are synchronised.
    """

    full_state_update = False

    def __init__(self, num_experts: int) -> None:
        super().__init__(compute_with_cache=False)
        self.num_experts = num_experts
        for name in _SCALAR_SUMS:
            self.add_state(name, torch.tensor(0.0), dist_reduce_fx="sum")
        for name in _EXPERT_SUMS:
            self.add_state(name, torch.zeros(num_experts), dist_reduce_fx="sum")
        self.telemetry_names: list[str] = []

    def update(self, stats: RoutingStats | None) -> None:
        if stats is None or stats.num_forwards is None:
            return
        self.num_forwards += stats.num_forwards
        self.num_tokens += stats.num_tokens
        for name in ("token_entropy_sum", "gate_sum", "logit_norm_sum", *_EXPERT_SUMS):
            setattr(self, name, getattr(self, name) + getattr(stats, name))
        for name, value in stats.telemetry.items():
            self.add_telemetry(name)
            setattr(self, f"telemetry_{name}", getattr(self, f"telemetry_{name}") + value)
        if stats.label_expert_counts is not None:
            self.add_label_counts(tuple(stats.label_expert_counts.shape))
            self.label_expert_counts = self.label_expert_counts + stats.label_expert_counts

    def add_telemetry(self, name: str) -> None:
        """Start summing the estimator telemetry ``name`` (no-op if it is summed already)."""
        if name not in self.telemetry_names:
            self.add_state(f"telemetry_{name}", torch.zeros((), device=self.device), dist_reduce_fx="sum")
            self.telemetry_names.append(name)

    def add_label_counts(self, shape: tuple[int, ...]) -> None:
        """Start summing ``label_expert_counts`` [num_labels, E] (no-op if it is summed already)."""
        if "label_expert_counts" not in self._defaults:
            self.add_state("label_expert_counts", torch.zeros(shape, device=self.device), dist_reduce_fx="sum")

    def lazy_states(self) -> dict[str, Any]:
        """The states created on first use (telemetry keys, label counts), for :meth:`add_lazy_states`."""
        counts_shape = self.label_expert_counts.shape if "label_expert_counts" in self._defaults else None
        return {"telemetry": list(self.telemetry_names), "label_counts": counts_shape}

    def add_lazy_states(self, states: dict[str, Any]) -> None:
        """Create (as zero sums) the states another rank's :meth:`lazy_states` lists and this one lacks."""
        for name in states["telemetry"]:
            self.add_telemetry(name)
        if states["label_counts"] is not None:
            self.add_label_counts(tuple(states["label_counts"]))

    def sums(self) -> dict[str, Any]:
        """Every summed state as plain numbers (for checkpoints), not synchronised across ranks."""
        return {name: value.tolist() for name, value in self.metric_state.items()}

    def load_sums(self, sums: dict[str, Any]) -> None:
        """Restore what :meth:`sums` returned."""
        for state, value in sums.items():
            tensor = torch.tensor(value, dtype=torch.float32, device=self.device)
            if state.startswith("telemetry_"):
                self.add_telemetry(state.removeprefix("telemetry_"))
            elif state == "label_expert_counts":
                self.add_label_counts(tuple(tensor.shape))
            setattr(self, state, tensor)

    def compute(self) -> dict[str, Tensor]:
        """Per-token means, load imbalance, telemetry means, and ``tokens_per_expert`` [E]."""
        tokens = self.num_tokens.clamp_min(1.0)
        load_E = self.tokens_per_expert
        mean_load = load_E.mean().clamp_min(torch.finfo(load_E.dtype).tiny)
        values = {
            # The entropy of the mean routing distribution: low when all tokens favour the
            # same experts; its maximum log(E) means the router spreads mass evenly.
            "entropy": entropy(self.probs_sum / tokens),
            # The mean per-token entropy: low when each token is confident about its experts.
            "token_entropy": self.token_entropy_sum / tokens,
            "load_max_over_mean": load_E.max() / mean_load,
            # Population standard deviation over the E experts (they are all of them, not a sample).
            "load_cv": load_E.std(correction=0) / mean_load,
            "gate_mass": self.gate_sum / tokens,
            "router_logit_norm": self.logit_norm_sum / tokens,
        }
        forwards = self.num_forwards.clamp_min(1.0)
        for name in self.telemetry_names:
            values[name] = getattr(self, f"telemetry_{name}") / forwards
        if "label_expert_counts" in self._defaults:
            values["domain_expert_mi"] = mutual_information(self.label_expert_counts)
        values["tokens_per_expert"] = load_E.clone()
        return values


def load_heatmap_image(shares: list[Tensor], tags: list[str]) -> np.ndarray:
    """An RGB image [H, W, 3] (uint8) of the share of tokens per layer (rows) and expert (columns)."""
    # Figure + Agg canvas, not pyplot: nothing is registered globally, so nothing needs
    # closing and no GUI backend is ever chosen.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    num_experts = max(share.numel() for share in shares)
    share_LE = np.full((len(shares), num_experts), np.nan)
    for row, share in enumerate(shares):
        share_LE[row, : share.numel()] = share.cpu().numpy()
    figure = Figure(figsize=(min(3.0 + 0.3 * num_experts, 16.0), min(1.5 + 0.35 * len(shares), 12.0)), dpi=100)
    canvas = FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    image = axes.imshow(share_LE, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0.0)
    axes.set_xlabel("expert")
    axes.set_yticks(range(len(tags)), labels=tags)
    figure.colorbar(image, ax=axes, label="share of tokens")
    figure.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


class RoutingMonitor(L.Callback):
    """Logs what routing does in every MoELayer, for any LightningModule and logger.

    Once per optimizer step (``on_before_optimizer_step``, so once per step under
    ``accumulate_grad_batches``) it adds every layer's :attr:`~lightning_moe.MoELayer.routing_stats`
    to a :class:`LayerRoutingMetric` and marks them consumed. Only training forwards are
    recorded (not validation, ``no_grad`` or activation-checkpoint recompute). Every
    ``log_every_n_steps`` optimizer steps the metrics are summed over the data-parallel
    ranks and logged with ``LightningModule.log`` (so every logger, or none, works), per
    layer ``XX`` (numbered in module order), over the steps since the last log:

    - ``moe/layer_XX/entropy``: entropy (nats) of the mean routing distribution
    - ``moe/layer_XX/token_entropy``: mean per-token routing entropy
    - ``moe/layer_XX/load_max_over_mean``: max tokens per expert / mean tokens per expert
    - ``moe/layer_XX/load_cv``: coefficient of variation of tokens per expert
    - ``moe/layer_XX/dead_experts``: experts without tokens in the last ``dead_window`` steps
    - ``moe/layer_XX/gate_mass``: mean summed gate weight of a token's chosen experts
    - ``moe/layer_XX/router_logit_norm``: mean L2 norm of a token's router logits
    - ``moe/layer_XX/<key>``: the mean over forwards of each estimator telemetry value
      (e.g. ``zero_router_grad_fraction`` for SparseMixer-v2)
    - ``moe/layer_XX/domain_expert_mi``: mutual information (nats) between a token's
      domain and its chosen experts, when the tokens carry domain labels (the testbed
      corpus, ``TextDataModule(source="testbed")``, or :func:`~lightning_moe.layer.labelled_tokens`)

    Tokens are counted as (token, expert) assignments. The auxiliary losses are logged by
    their own callbacks. With a :class:`~lightning.pytorch.loggers.TensorBoardLogger`
    among ``trainer.loggers``, rank 0 also writes ``moe/layer_XX/expert_load`` (histogram
    over experts of load / mean load, 1 = balanced) and ``moe/load_heatmap`` (an image of
    the share of tokens per layer and expert).

    When an expert has had no tokens for ``dead_warn_after`` steps a warning names it,
    once per expert; dead experts are checked when the monitor logs. Its state (the step
    each expert last had tokens, the warnings given) is saved in checkpoints and restored
    by ``fit(ckpt_path=...)``, together with the statistics summed since the last log, so
    a resumed run logs what the uninterrupted run would. Under data parallelism the
    checkpoint holds every rank's copy and each rank restores its own.

    Args:
        log_every_n_steps: optimizer steps between logs; ``None`` (recommended) uses the
            Trainer's. The Trainer writes what ``LightningModule.log`` holds on its own
            logging steps, so use a multiple of ``Trainer(log_every_n_steps=...)``; on the
            Trainer's steps in between, the loggers get the monitor's latest values again.
        dead_window: an expert with no tokens in this many consecutive optimizer steps is
            counted in ``dead_experts``.
        dead_warn_after: warn once an expert has had no tokens for this many steps;
            ``None`` means ``dead_window``.
        histograms: write the TensorBoard load histograms.
        heatmap: write the TensorBoard load heatmap (rendered with matplotlib).
    """

    def __init__(
        self,
        log_every_n_steps: int | None = None,
        dead_window: int = 100,
        dead_warn_after: int | None = None,
        histograms: bool = True,
        heatmap: bool = True,
    ) -> None:
        for name, value, minimum in (
            ("log_every_n_steps", log_every_n_steps, 1),
            ("dead_window", dead_window, 1),
            ("dead_warn_after", dead_warn_after, 1),
        ):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
                raise ConfigError(f"RoutingMonitor: {name} must be an int >= {minimum}, got {value!r}")
        self.log_every_n_steps = log_every_n_steps
        self.dead_window = dead_window
        self.dead_warn_after = dead_window if dead_warn_after is None else dead_warn_after
        self.histograms = histograms
        self.heatmap = heatmap
        self._layers: list[tuple[str, MoELayer]] = []
        self._metrics: dict[str, LayerRoutingMetric] = {}
        self._last_active: dict[str, Tensor] = {}  # [E] int64: the last step with tokens
        self._warned: set[tuple[str, int]] = set()
        self._stats = StepStatsReader()
        self._restored: dict[str, Any] | None = None
        self._every = 0

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Not ``setup``: layers built in ``configure_model`` exist only from here on.
        self._layers = layer_tags(pl_module)
        if not self._layers:
            rank_zero_warn("RoutingMonitor: the model has no MoELayer; it logs nothing.")
        self._metrics = {tag: LayerRoutingMetric(layer.num_experts).to(pl_module.device) for tag, layer in self._layers}
        self._stats.reset()
        self._last_active, self._warned = {}, set()
        trainer_every = trainer.log_every_n_steps
        self._every = trainer_every if self.log_every_n_steps is None else self.log_every_n_steps
        if self.log_every_n_steps is not None and trainer_every and self.log_every_n_steps % trainer_every:
            rank_zero_warn(
                f"RoutingMonitor(log_every_n_steps={self.log_every_n_steps}) is not a multiple of"
                f" Trainer(log_every_n_steps={trainer_every}): Lightning writes logged values only on its own"
                " logging steps, so some of the monitor's values would be dropped or written late."
            )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Not ``on_fit_start``: strategies that restore the checkpoint after setup (FSDP,
        # ModelParallelStrategy) call ``load_state_dict`` after it; every strategy has by now.
        if self._restored is not None:
            self._restore(self._restored, trainer, pl_module.device)
            self._restored = None

    @torch.no_grad()
    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        step = trainer.global_step
        for tag, layer in self._layers:
            stats = self._stats.read(tag, layer)
            self._metrics[tag].update(stats)
            last_active_E = self._last_active.get(tag)
            if last_active_E is None:
                last_active_E = torch.full((layer.num_experts,), step - 1, dtype=torch.long, device=pl_module.device)
                self._last_active[tag] = last_active_E
            if stats is not None:
                last_active_E.masked_fill_(stats.tokens_per_expert.to(last_active_E.device) > 0, step)
            layer.finish_step()
        if self._layers and self._every > 0 and (step + 1) % self._every == 0:
            self._log(trainer, pl_module, step)

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        tags = [tag for tag, _ in self._layers]
        # One collective for every layer's last-active steps: the latest step on any rank.
        last_active = torch.cat([self._last_active[tag] for tag in tags])
        last_active = trainer.strategy.reduce(last_active, reduce_op="max")
        idle_steps = {}
        for tag, merged_E in zip(tags, last_active.split([self._last_active[tag].numel() for tag in tags])):
            self._last_active[tag].copy_(merged_E)
            idle_steps[tag] = step - merged_E

        # A rank whose layers have had no tokens yet has not met the estimator's telemetry
        # keys or the token labels; the metrics sync only if every rank holds the same states.
        for rank_states in all_gather_objects({tag: self._metrics[tag].lazy_states() for tag in tags}):
            for tag, states in rank_states.items():
                self._metrics[tag].add_lazy_states(states)
        loads = {}
        for tag in tags:
            metric = self._metrics[tag]
            values = metric.compute()
            metric.reset()
            loads[tag] = values.pop("tokens_per_expert")
            values["dead_experts"] = (idle_steps[tag] >= self.dead_window).sum().float()
            for name, value in values.items():
                pl_module.log(f"moe/{tag}/{name}", value, on_step=True, on_epoch=False)
        self._warn_dead_experts(idle_steps, step)
        if trainer.is_global_zero and (self.histograms or self.heatmap):
            self._write_tensorboard(trainer, loads, step)

    def _warn_dead_experts(self, idle_steps: dict[str, Tensor], step: int) -> None:
        for tag, idle_E in idle_steps.items():
            for expert in torch.nonzero(idle_E >= self.dead_warn_after).flatten().tolist():
                if (tag, expert) in self._warned:
                    continue
                self._warned.add((tag, expert))
                rank_zero_warn(
                    f"RoutingMonitor: expert {expert} of MoE {tag} has received no tokens for"
                    f" {int(idle_E[expert])} optimizer steps (at step {step}). Consider a load-balancing loss,"
                    " AuxLossFreeBalancing, or fewer experts."
                )

    def _write_tensorboard(self, trainer: L.Trainer, loads: dict[str, Tensor], step: int) -> None:
        writer = next((lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        if writer is None:
            return
        loads = {tag: load_E.float().cpu() for tag, load_E in loads.items()}
        if self.histograms:
            for tag, load_E in loads.items():
                if load_E.sum() > 0:
                    writer.add_histogram(f"moe/{tag}/expert_load", load_E / load_E.mean(), global_step=step)
        if self.heatmap:
            shares = [load_E / load_E.sum().clamp_min(1.0) for load_E in loads.values()]
            image = load_heatmap_image(shares, list(loads))
            writer.add_image("moe/load_heatmap", image, global_step=step, dataformats="HWC")

    def state_dict(self) -> dict[str, Any]:
        # Each rank's own record (called on every rank while a checkpoint is assembled): the
        # last-active steps are merged and the sums reduced only when the monitor logs.
        local = {
            "last_active": {tag: last_active_E.tolist() for tag, last_active_E in self._last_active.items()},
            "sums": {tag: metric.sums() for tag, metric in self._metrics.items()},
        }
        return {
            "last_active": local["last_active"],
            "warned": sorted([tag, expert] for tag, expert in self._warned),
            "ranks": all_gather_objects(local),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Applied in ``on_train_start``, once the layers (possibly built in ``configure_model``) exist.
        self._restored = state_dict

    def _restore(self, state: dict[str, Any], trainer: L.Trainer, device: torch.device) -> None:
        sizes = {tag: layer.num_experts for tag, layer in self._layers}
        ranks = state.get("ranks", [{"last_active": state.get("last_active", {})}])  # older checkpoints: rank 0's
        # With another number of ranks, every rank starts from rank 0's last-active steps
        # (merged at the next log anyway) and the sums since the last log are dropped.
        same_ranks = len(ranks) == trainer.world_size
        local = ranks[trainer.global_rank] if same_ranks else ranks[0]
        for tag, steps in local.get("last_active", {}).items():
            if sizes.get(tag) == len(steps):
                self._last_active[tag] = torch.tensor(steps, dtype=torch.long, device=device)
        for tag, sums in local.get("sums", {}).items() if same_ranks else ():
            if tag in self._metrics and len(sums.get("tokens_per_expert", [])) == sizes[tag]:
                self._metrics[tag].load_sums(sums)
        self._warned = {(tag, int(expert)) for tag, expert in state.get("warned", []) if tag in sizes}
