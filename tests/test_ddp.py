"""Data parallelism: 2 CPU processes (gloo) against one process with the same global batch.

``ddp_fork`` forks this process, so the ranks share its imports and start in well under a
second; each rank writes what it saw to a file. ModelParallelStrategy (FSDP2) has only a
subprocess launcher, which would re-run the pytest command, so its test forks the same way.
"""

import sys
from datetime import timedelta

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_moe import MoELayer
from lightning_moe.callbacks import (
    AuxLossFreeBalancing,
    DefaultOutputEMA,
    LoadBalancingLoss,
    NonFiniteGuard,
    ResumableRNG,
    RouterGradientFidelity,
    RouterZLoss,
    RoutingMonitor,
)
from lightning_moe.callbacks.routing_monitor import LayerRoutingMetric
from lightning_moe.data import TextDataModule
from lightning_moe.module import MoELanguageModel

from helpers import MONITOR_TOKENS, FakeKernels, ForkedModelParallel, RankRecord, use_fake_kernels

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="forked ranks need fork")

STEPS = 4
# A hang (a collective one rank never joins) fails within this instead of blocking the suite.
TIMEOUT = timedelta(seconds=30)


@pytest.fixture(autouse=True)
def _no_cuda():
    if torch.cuda.is_initialized():
        pytest.skip("forking ranks is impossible once CUDA is initialised in this process")


def ddp():
    return DDPStrategy(start_method="fork", timeout=TIMEOUT)


@pytest.fixture
def record_monitor_tokens(monkeypatch):
    """Records the (token, slot) count RoutingMonitor computes its statistics from, after its sync."""
    compute = LayerRoutingMetric.compute

    def recording_compute(self):
        values = compute(self)
        MONITOR_TOKENS.append(values["tokens_per_expert"].sum().item())
        return values

    monkeypatch.setattr(LayerRoutingMetric, "compute", recording_compute)
    MONITOR_TOKENS.clear()
    yield
    MONITOR_TOKENS.clear()


def corpus(tmp_path):
    path = tmp_path / "corpus.py"
    if not path.exists():
        path.write_text("".join(f"def g{i}(x, y):\n    return (x - {i}) * y // {i + 1}\n" for i in range(40)))
    return str(path)


def fit_language_model(tmp_path, run, moe, callbacks, devices, strategy, batch_size, ckpt_path=None):
    out_dir = tmp_path / run
    out_dir.mkdir()
    L.seed_everything(0)
    model = MoELanguageModel(d_model=32, n_heads=2, n_layers=2, max_seq_len=16, moe=moe, warmup_steps=2)
    data = TextDataModule(source=corpus(tmp_path), seq_len=16, batch_size=batch_size, cache_dir=str(tmp_path / "cache"))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_steps=STEPS,
        log_every_n_steps=2,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[RankRecord(str(out_dir)), *callbacks],
    )
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(devices)]


def router_callbacks():
    return [
        LoadBalancingLoss(alpha=0.01, scope="global"),
        RouterZLoss(1e-3),
        AuxLossFreeBalancing(0.01),
        RoutingMonitor(),
    ]


def assert_ranks_identical(ranks):
    for key, value in ranks[0]["state"].items():
        for other in ranks[1:]:
            assert torch.equal(value, other["state"][key]), f"{key} differs between ranks"


def assert_equals_single(ranks, single, rtol=1e-5, atol=1e-6):
    for step, loss in single["losses"].items():
        mean = sum(r["losses"][step] for r in ranks) / len(ranks)
        assert mean == pytest.approx(loss, rel=1e-5), f"step {step}"
    for key, value in single["state"].items():
        torch.testing.assert_close(ranks[0]["state"][key], value, rtol=rtol, atol=atol, msg=key)


@pytest.mark.parametrize("backend", ["loop", "torch"])
@pytest.mark.parametrize("estimator", ["topk", "default_moe"])
def test_ddp_equals_one_process_with_the_same_global_batch(tmp_path, estimator, backend, record_monitor_tokens):
    moe = {"num_experts": 4, "top_k": 2, "estimator": estimator, "backend": backend}
    single = fit_language_model(tmp_path, "single", moe, router_callbacks(), 1, "auto", batch_size=8)[0]
    MONITOR_TOKENS.clear()
    ranks = fit_language_model(tmp_path, "ddp", moe, router_callbacks(), 2, ddp(), batch_size=4)

    assert_ranks_identical(ranks)  # parameters, EMA defaults, selection biases
    assert_equals_single(ranks, single)
    layer = "model.blocks.0.ffn"
    assert ranks[0]["state"][f"{layer}.selection_bias"].abs().sum() > 0
    if estimator == "default_moe":
        assert ranks[0]["state"][f"{layer}.estimator.default_outputs"].abs().sum() > 0
    # The monitor's statistics cover the global batch once: summed over ranks, not twice.
    assert single["monitor_tokens"] and ranks[0]["monitor_tokens"] == single["monitor_tokens"]


def two_rank_trainer(callbacks, **trainer_args):
    """Three steps on 2 DDP ranks, each rank reading its own DataLoader (no distributed sampler)."""
    return L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ddp(),
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=callbacks,
        **trainer_args,
    )


class MaskedMoE(L.LightningModule):
    """Sends only the rows whose flag is set through the MoE layer; rank 1 never has any."""

    def __init__(self, estimator, backend, top_k):
        super().__init__()
        self.inp = nn.Linear(8, 8)
        self.moe = MoELayer(8, 16, 4, top_k, estimator=estimator, backend=backend, estimator_args=None)
        self.out = nn.Linear(8, 1)

    def training_step(self, batch, batch_idx):
        x, flag = batch
        h = self.inp(x)
        routed = flag.bool()
        h = h.index_put((routed,), h[routed] + self.moe(h[routed]))
        return self.out(h).square().mean()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)

    def train_dataloader(self):
        # Rank 0 gets rows 0, 2, 4, ... (flag 1), rank 1 rows 1, 3, 5, ... (flag 0).
        x = torch.randn(32, 8, generator=torch.Generator().manual_seed(0))
        flags = torch.arange(32) % 2 == 0
        shard = slice(self.global_rank, None, self.trainer.world_size)
        return DataLoader(TensorDataset(x[shard], flags[shard].float()), batch_size=4)

    def on_train_end(self):
        state = {k: v.detach().clone() for k, v in self.state_dict().items()}
        torch.save({"state": state}, f"{self.out_dir}/rank{self.global_rank}.pt")


@pytest.mark.parametrize("backend", ["loop", "torch", "megablocks"])
@pytest.mark.parametrize("estimator", ["topk", "sparsemixer", "sparsemixer_v2", "default_moe"])
def test_a_rank_whose_layer_gets_no_tokens_trains_in_step_with_the_others(tmp_path, monkeypatch, estimator, backend):
    if backend == "megablocks":  # the stand-in kernels; the forked ranks inherit the patch
        use_fake_kernels(monkeypatch, FakeKernels())
    top_k = 1 if estimator == "sparsemixer" else 2
    model = MaskedMoE(estimator, backend, top_k)
    model.out_dir = str(tmp_path)
    callbacks = [LoadBalancingLoss(scope="global"), RouterZLoss(), RoutingMonitor(), NonFiniteGuard(), ResumableRNG()]
    if estimator == "default_moe":
        callbacks.append(DefaultOutputEMA())
    if estimator in ("topk", "default_moe"):
        callbacks.append(AuxLossFreeBalancing(0.01))
    # ddp(): find_unused_parameters=False, so an expert parameter without a gradient would fail.
    two_rank_trainer(callbacks, log_every_n_steps=1).fit(model)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert_ranks_identical(ranks)
    initial = MaskedMoE(estimator, backend, top_k)
    assert not torch.equal(ranks[0]["state"]["moe.experts.w1"], initial.moe.experts.w1)


def test_fsdp2_through_model_parallel_strategy_equals_one_process(tmp_path):
    moe = {"num_experts": 4, "top_k": 2, "estimator": "default_moe", "backend": "torch"}
    callbacks = [LoadBalancingLoss(scope="global"), AuxLossFreeBalancing(0.01), RoutingMonitor()]
    single = fit_language_model(tmp_path, "single", moe, callbacks, 1, "auto", batch_size=8)[0]
    strategy = ForkedModelParallel(data_parallel_size=2, tensor_parallel_size=1, timeout=TIMEOUT)
    callbacks = [LoadBalancingLoss(scope="global"), AuxLossFreeBalancing(0.01), RoutingMonitor()]
    ranks = fit_language_model(tmp_path, "fsdp2", moe, callbacks, 2, strategy, batch_size=4)
    assert_ranks_identical(ranks)
    assert_equals_single(ranks, single)


def test_router_gradient_fidelity_probes_under_fsdp2_without_changing_training(tmp_path):
    # Top-K with k = E is the dense mixture itself: the probe must find cosine and norm ratio 1.
    moe = {"num_experts": 4, "top_k": 4, "estimator": "topk", "backend": "torch"}
    single = fit_language_model(tmp_path, "single", moe, [], 1, "auto", batch_size=8)[0]
    strategy = ForkedModelParallel(data_parallel_size=2, tensor_parallel_size=1, timeout=TIMEOUT)
    probe = RouterGradientFidelity(every_n_steps=2)
    ranks = fit_language_model(tmp_path, "fsdp2", moe, [probe], 2, strategy, batch_size=4)
    for layer in ("layer_00", "layer_01"):
        for name in ("router_grad_cosine", "router_grad_norm_ratio"):
            assert ranks[0]["metrics"][f"moe/{layer}/{name}"] == pytest.approx(1.0, abs=1e-4), (layer, name)
    assert_ranks_identical(ranks)
    assert_equals_single(ranks, single)


def test_fsdp2_resumes_from_a_full_checkpoint_bit_for_bit(tmp_path, record_monitor_tokens):
    moe = {"num_experts": 4, "top_k": 2, "estimator": "sparsemixer_v2", "backend": "torch"}

    def run(name, ckpt_path=None):
        strategy = ForkedModelParallel(
            data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=False, timeout=TIMEOUT
        )
        checkpoints = ModelCheckpoint(
            dirpath=tmp_path / "ckpt", filename="{step}", every_n_train_steps=1, save_top_k=-1
        )
        # The monitor logs once, at the last step, over all four steps: two of them before the checkpoint.
        monitor = RoutingMonitor(log_every_n_steps=STEPS)
        return fit_language_model(
            tmp_path, name, moe, [checkpoints, monitor], 2, strategy, batch_size=4, ckpt_path=ckpt_path
        )

    full = run("full")
    resumed = run("resumed", ckpt_path=tmp_path / "ckpt" / "step=2.ckpt")
    for rank in range(2):
        assert resumed[rank]["losses"] == {s: full[rank]["losses"][s] for s in range(2, STEPS)}
        assert full[rank]["monitor_tokens"] and resumed[rank]["monitor_tokens"] == full[rank]["monitor_tokens"]
        for key, value in full[rank]["state"].items():
            assert torch.equal(resumed[rank]["state"][key], value), key


class SameDataOnEveryRank(L.LightningModule):
    """Every rank trains on the same rows with sampled routing, so only the routing noise can tell them apart."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.moe = MoELayer(8, 16, 4, 2, estimator="sparsemixer_v2", estimator_args={"jitter_eps": 0.5})
        self.losses = []

    def training_step(self, batch, batch_idx):
        (x,) = batch
        loss = (self.moe(x) - x).square().mean()
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
        return DataLoader(TensorDataset(x), batch_size=16)

    def on_train_end(self):
        torch.save(self.losses, f"{self.out_dir}/rank{self.global_rank}.pt")


def per_rank_losses(out_dir, independent_ranks):
    out_dir.mkdir()
    L.seed_everything(0)
    model = SameDataOnEveryRank()
    model.out_dir = str(out_dir)
    two_rank_trainer([ResumableRNG(independent_ranks=independent_ranks)]).fit(model)
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(2)]


def test_ranks_draw_independent_routing_noise_that_is_reproducible_from_the_seed(tmp_path):
    shared = per_rank_losses(tmp_path / "shared", independent_ranks=False)
    assert shared[0] == shared[1]  # same seed, same data: the ranks sample the same routing
    independent = per_rank_losses(tmp_path / "independent", independent_ranks=True)
    assert independent[0][0] != independent[1][0]  # same weights and data at step 0: only the noise differs
    assert per_rank_losses(tmp_path / "again", independent_ranks=True) == independent
