import csv
import gc
import io
import math
import sys
import warnings
from datetime import timedelta
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.strategies import DDPStrategy
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_moe import MoELayer
from lightning_moe.layer import labelled_tokens
from lightning_moe.callbacks import LoadBalancingLoss, RoutingMonitor, routing_monitor

from helpers import fit_quietly

D, E = 4, 4
BATCH_CLASSES = [0, 0, 1, 2]  # layer_00 loads [2, 1, 1, 0] per step, expert 3 dead
REVERSED = [3, 2, 1, 0]  # the dense layer maps class c to class 3 - c: layer_01 loads [0, 1, 1, 2]
PROMISED = ("entropy", "token_entropy", "load_max_over_mean", "load_cv", "dead_experts", "gate_mass")


class HandRoutedModule(L.LightningModule):
    """MoE layer, dense layer, MoE layer; routers send class c (a one-hot token) to expert c
    with logits 3 e_c, and ``lr=0`` keeps every routing decision fixed."""

    def __init__(self, estimators=("topk", "topk"), top_k=1, lr=0.0):
        super().__init__()
        self.moe_a = MoELayer(D, 8, E, top_k, estimator=estimators[0], backend="loop")
        self.dense = nn.Linear(D, D, bias=False)
        self.moe_b = MoELayer(D, 8, E, top_k, estimator=estimators[1], backend="loop")
        with torch.no_grad():
            for layer in (self.moe_a, self.moe_b):
                layer.router.weight.copy_(3.0 * torch.eye(E))
            self.dense.weight.copy_(torch.eye(D)[REVERSED])
        self.lr = lr

    def forward(self, x):
        return self.moe_a(x) + self.moe_b(self.dense(x))

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return self(x).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        (x,) = batch
        self.log("val_loss", self(x).pow(2).mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def batches(steps, classes=BATCH_CLASSES):
    tokens = torch.eye(D)[torch.tensor(classes)].repeat(steps, 1)
    return DataLoader(TensorDataset(tokens), batch_size=len(classes))


def fit(module, data, callbacks, val_data=None, ckpt_path=None, **trainer_args):
    return fit_quietly(module, data, callbacks, val_data, ckpt_path, **{"log_every_n_steps": 1, **trainer_args})


def read_events(log_dir):
    events = EventAccumulator(str(log_dir), size_guidance={"histograms": 0, "images": 0, "scalars": 0})
    events.Reload()
    return events


def scalar_series(events, tag):
    return {e.step: e.value for e in events.Scalars(tag)}


class RecordingLogger(Logger):
    """Keeps every ``log_metrics`` call, to check logged values step by step."""

    def __init__(self):
        super().__init__()
        self.rows = {}

    @property
    def name(self):
        return "recording"

    @property
    def version(self):
        return 0

    def log_metrics(self, metrics, step):
        self.rows.setdefault(step, {}).update(metrics)

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def entropy(p):
    return -(p * p.log()).sum().item()


def test_tensorboard_events_hold_every_promised_tag(tmp_path):
    model = HandRoutedModule(estimators=("topk", "sparsemixer_v2"), top_k=2, lr=0.05)
    logger = TensorBoardLogger(tmp_path, name="", version=0)
    fit(model, batches(4), [RoutingMonitor()], logger=logger, log_every_n_steps=2, max_steps=4)
    events = read_events(logger.log_dir)
    tags = events.Tags()
    for layer in ("layer_00", "layer_01"):
        for name in (*PROMISED, "router_logit_norm"):
            assert sorted(scalar_series(events, f"moe/{layer}/{name}")) == [1, 3]
        assert [e.step for e in events.Histograms(f"moe/{layer}/expert_load")] == [1, 3]
    # SparseMixer-v2's telemetry, averaged over the forwards of the logging window.
    for name in ("zero_router_grad_fraction", "mean_gate_scale"):
        assert f"moe/layer_01/{name}" in tags["scalars"]
        assert f"moe/layer_00/{name}" not in tags["scalars"]
    images = events.Images("moe/load_heatmap")
    assert [image.step for image in images] == [1, 3]
    assert images[-1].encoded_image_string.startswith(b"\x89PNG")
    assert images[-1].width > 100 and images[-1].height > 50


def test_logged_values_match_hand_computation(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="", version=0)
    monitor = RoutingMonitor(dead_window=3)
    with pytest.warns(UserWarning, match="no tokens"):
        fit(HandRoutedModule(), batches(4), [monitor], logger=logger, max_steps=4, log_every_n_steps=2)
    events = read_events(logger.log_dir)

    token_probs = (3.0 * torch.eye(E)).softmax(dim=-1)  # row c: the softmax of a class-c token
    for layer, classes in (("layer_00", BATCH_CLASSES), ("layer_01", [REVERSED[c] for c in BATCH_CLASSES])):
        loads = torch.bincount(torch.tensor(classes), minlength=E).float()
        expected = {
            "entropy": entropy(token_probs[classes].mean(dim=0)),
            "token_entropy": entropy(token_probs[0]),
            "load_max_over_mean": 2.0,
            "load_cv": math.sqrt(0.5),  # loads {2, 1, 1, 0}: std sqrt(0.5) around mean 1
            "gate_mass": token_probs[0, 0].item(),
            "router_logit_norm": 3.0,
        }
        for name, value in expected.items():
            series = scalar_series(events, f"moe/{layer}/{name}")
            assert series == pytest.approx({1: value, 3: value}, rel=1e-5), name
        # The only idle expert has had no tokens for 2 steps at step 1, for 4 at step 3.
        assert scalar_series(events, f"moe/{layer}/dead_experts") == {1: 0.0, 3: 1.0}
        (histogram, _) = events.Histograms(f"moe/{layer}/expert_load")
        assert histogram.histogram_value.num == E
        assert histogram.histogram_value.min == 0.0 and histogram.histogram_value.max == 2.0
        assert histogram.histogram_value.sum == pytest.approx((loads / loads.mean()).sum().item())


def test_heatmap_shows_the_share_of_tokens_per_layer_and_expert(tmp_path):
    pytest.importorskip("PIL")
    from PIL import Image

    logger = TensorBoardLogger(tmp_path, name="", version=0)
    fit(HandRoutedModule(), batches(2), [RoutingMonitor(histograms=False)], logger=logger, max_steps=2)
    events = read_events(logger.log_dir)
    assert "moe/layer_00/expert_load" not in events.Tags()["histograms"]
    image = Image.open(io.BytesIO(events.Images("moe/load_heatmap")[-1].encoded_image_string)).convert("RGB")
    # The dead experts (layer_00 expert 3, layer_01 expert 0) get the colormap's lowest
    # colour; the busiest ones its highest: the image is not a blank canvas.
    assert len(set(image.getdata())) > 10


def test_nothing_is_counted_during_validation(monkeypatch):
    updates = []
    original = routing_monitor.LayerRoutingMetric.update

    def recording_update(self, stats):
        updates.append(None if stats is None else (stats.num_forwards, stats.num_tokens))
        original(self, stats)

    monkeypatch.setattr(routing_monitor.LayerRoutingMetric, "update", recording_update)
    model = HandRoutedModule()
    # Validation after every training step, on batches twice as large.
    fit(
        model,
        batches(3),
        [RoutingMonitor()],
        val_data=batches(2, classes=BATCH_CLASSES * 2),
        max_steps=3,
        val_check_interval=1,
        num_sanity_val_steps=1,
    )
    assert updates == [(1, 4)] * 6  # 3 steps x 2 layers, training tokens only
    stats = model.moe_a.routing_stats
    L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False).validate(model, batches(2))
    assert model.moe_a.routing_stats is stats and stats.num_forwards == 1 and stats.num_tokens == 4


def test_once_per_optimizer_step_under_gradient_accumulation(monkeypatch):
    updates = []
    original = routing_monitor.LayerRoutingMetric.update

    def recording_update(self, stats):
        updates.append((stats.num_forwards, stats.num_tokens))
        original(self, stats)

    monkeypatch.setattr(routing_monitor.LayerRoutingMetric, "update", recording_update)
    logger = RecordingLogger()
    with pytest.warns(UserWarning, match="no tokens"):
        fit(
            HandRoutedModule(),
            batches(12),
            [RoutingMonitor(dead_window=3)],
            logger=logger,
            max_steps=4,
            accumulate_grad_batches=3,
        )
    assert updates == [(3, 12)] * 8  # 4 steps x 2 layers, each over its 3 micro-batches
    # Idle time is counted in optimizer steps, not micro-batches.
    assert [logger.rows[step]["moe/layer_00/dead_experts"] for step in range(4)] == [0.0, 0.0, 1.0, 1.0]
    assert logger.rows[3]["moe/layer_00/load_max_over_mean"] == pytest.approx(2.0)


@pytest.mark.parametrize("logger_kind", ["none", "csv"])
def test_runs_without_a_logger_and_with_a_csv_logger(tmp_path, logger_kind):
    logger = False if logger_kind == "none" else CSVLogger(tmp_path, name="", version=0)
    trainer = fit(HandRoutedModule(), batches(2), [RoutingMonitor()], logger=logger, max_steps=2)
    assert trainer.callback_metrics["moe/layer_01/load_max_over_mean"].item() == pytest.approx(2.0)
    if logger_kind == "csv":
        with open(Path(logger.log_dir) / "metrics.csv") as f:
            rows = list(csv.DictReader(f))
        assert float(rows[-1]["moe/layer_00/load_cv"]) == pytest.approx(math.sqrt(0.5))


def test_dead_expert_warning_names_layer_and_expert_once():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(HandRoutedModule(), batches(8), [RoutingMonitor(dead_window=100, dead_warn_after=3)], max_steps=8)
    messages = [str(w.message) for w in caught if "no tokens" in str(w.message)]
    assert len(messages) == 2
    assert "expert 3 of MoE layer_00" in messages[0] and "for 3 optimizer steps" in messages[0]
    assert "expert 0 of MoE layer_01" in messages[1]


def test_state_survives_fit_from_a_checkpoint(tmp_path):
    data = batches(6)
    with pytest.warns(UserWarning, match="no tokens"):
        first = fit(HandRoutedModule(), data, [RoutingMonitor(dead_window=2, dead_warn_after=2)], max_steps=3)
    first.save_checkpoint(tmp_path / "step3.ckpt")
    saved = torch.load(tmp_path / "step3.ckpt", weights_only=True)["callbacks"]["RoutingMonitor"]
    assert saved["last_active"]["layer_00"] == [2, 2, 2, -1]
    assert saved["warned"] == [["layer_00", 3], ["layer_01", 0]]

    logger = RecordingLogger()
    monitor = RoutingMonitor(dead_window=2, dead_warn_after=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(HandRoutedModule(), data, [monitor], logger=logger, max_steps=5, ckpt_path=tmp_path / "step3.ckpt")
    # Restored: expert 3 has been idle since before step 0 and was already warned about.
    assert logger.rows[3]["moe/layer_00/dead_experts"] == 1.0
    assert not [w for w in caught if "no tokens" in str(w.message)]
    assert monitor.state_dict()["last_active"]["layer_00"] == [4, 4, 4, -1]


def test_no_tensors_accumulate_over_a_long_fit(tmp_path):
    counts = {}

    class CountTensors(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step in (50, 200):
                gc.collect()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # isinstance() touches deprecated module attributes
                    counts[trainer.global_step] = sum(isinstance(o, torch.Tensor) for o in gc.get_objects())

    tokens = torch.randn(8 * 200, D, generator=torch.Generator().manual_seed(0))
    logger = TensorBoardLogger(tmp_path, name="", version=0)
    fit(
        HandRoutedModule(estimators=("topk", "sparsemixer_v2"), top_k=2, lr=0.05),
        DataLoader(TensorDataset(tokens), batch_size=8),
        [LoadBalancingLoss(), RoutingMonitor(log_every_n_steps=10), CountTensors()],
        logger=logger,
        log_every_n_steps=10,
        max_steps=200,
    )
    assert set(counts) == {50, 200}
    # One-sided: tensors left by earlier tests (e.g. compiled graphs' caches) may be freed meanwhile.
    assert counts[200] - counts[50] <= 2, counts


def test_bad_arguments_name_the_field():
    for kwargs, field in (
        ({"log_every_n_steps": 0}, "log_every_n_steps"),
        ({"dead_window": 0}, "dead_window"),
        ({"dead_warn_after": 1.5}, "dead_warn_after"),
    ):
        with pytest.raises(ValueError, match=field):
            RoutingMonitor(**kwargs)


def test_warns_when_its_interval_misses_the_trainers_logging_steps():
    with pytest.warns(UserWarning, match="not a multiple"):
        fit(HandRoutedModule(), batches(1), [RoutingMonitor(log_every_n_steps=3)], max_steps=1, log_every_n_steps=2)


class ShardedHandRoutedModule(HandRoutedModule):
    """Rank 0 trains on classes 0, 0 and rank 1 on classes 1, 2: together the usual batch."""

    def __init__(self, out_dir):
        super().__init__()
        self.out_dir = out_dir

    def train_dataloader(self):
        classes = BATCH_CLASSES[2 * self.global_rank : 2 * self.global_rank + 2]
        return batches(4, classes=classes)

    def on_train_end(self):
        monitor = next(c for c in self.trainer.callbacks if isinstance(c, RoutingMonitor))
        torch.save(monitor.state_dict(), f"{self.out_dir}/rank{self.global_rank}.pt")


@pytest.mark.skipif(sys.platform == "win32", reason="ddp_fork needs fork")
def test_data_parallel_ranks_log_the_global_statistics(tmp_path):
    if torch.cuda.is_initialized():
        pytest.skip("ddp_fork cannot start once CUDA is initialised in this process")
    logger = CSVLogger(tmp_path, name="", version=0)
    model = ShardedHandRoutedModule(str(tmp_path))
    fit(
        model,
        None,
        [RoutingMonitor(dead_window=3)],
        logger=logger,
        max_steps=4,
        log_every_n_steps=2,
        devices=2,
        strategy="ddp_fork",
        use_distributed_sampler=False,
    )
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = [row for row in csv.DictReader(f) if row["moe/layer_00/load_cv"]]
    assert [int(row["step"]) for row in rows] == [1, 3]
    # Rank 0 alone would see loads [2, 0, 0, 0] and three idle experts.
    for row in rows:
        assert float(row["moe/layer_00/load_max_over_mean"]) == pytest.approx(2.0)
        assert float(row["moe/layer_00/load_cv"]) == pytest.approx(math.sqrt(0.5))
    assert [float(row["moe/layer_00/dead_experts"]) for row in rows] == [0.0, 1.0]
    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert states[0] == states[1]
    assert states[0]["last_active"]["layer_00"] == [3, 3, 3, -1]


class LabelledOnRankZero(HandRoutedModule):
    """Rank 0 routes its classes 0, 0, 1, 2 (labels 0, 0, 1, 1); rank 1's layers receive no tokens at all."""

    def __init__(self):
        super().__init__()
        del self.moe_b, self.dense

    def forward(self, x):
        return self.moe_a(x)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        rows = x.shape[0] if self.global_rank == 0 else 0
        labels = (x[:rows].argmax(dim=-1) > 0).long()
        with labelled_tokens(self, labels, num_labels=2):
            return self(x[:rows]).pow(2).sum()

    def train_dataloader(self):
        return batches(3)


@pytest.mark.skipif(sys.platform == "win32", reason="forked ranks need fork")
def test_label_counts_sync_when_a_rank_has_recorded_none(tmp_path):
    if torch.cuda.is_initialized():
        pytest.skip("forking ranks is impossible once CUDA is initialised in this process")
    logger = CSVLogger(tmp_path, name="", version=0)
    fit(
        LabelledOnRankZero(),
        None,
        [RoutingMonitor()],
        logger=logger,
        max_steps=2,
        devices=2,
        strategy=DDPStrategy(start_method="fork", timeout=timedelta(seconds=20)),
        use_distributed_sampler=False,
    )
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = [row for row in csv.DictReader(f) if row["moe/layer_00/domain_expert_mi"]]
    # Label 0 goes to expert 0 only, label 1 to experts 1 and 2: I(label; expert) = H(label) = log 2.
    assert [float(row["moe/layer_00/domain_expert_mi"]) for row in rows] == pytest.approx([math.log(2)] * 2)
