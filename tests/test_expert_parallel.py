"""Expert parallelism: the all-to-all exchange, the sharded experts and the Lightning strategy (CPU, gloo)."""

import copy
import socket
import sys

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins import MixedPrecision
from lightning.pytorch.strategies import StrategyRegistry
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.utils.data import DataLoader, TensorDataset

import lightning_moe
import lightning_moe.experts.megablocks as mb
from lightning_moe import MoELayer
from lightning_moe.callbacks import DefaultOutputEMA, LoadBalancingLoss, NonFiniteGuard
from lightning_moe.experts import Experts
from lightning_moe.experts.expert_parallel import ExpertShard, all_to_all, shard_experts, unshard_experts
from lightning_moe.strategies import ExpertParallelStrategy
from lightning_moe.strategies.expert_parallel import (
    MESH_DIMS,
    check_expert_parallel_model,
    reduce_expert_gradients,
)

from helpers import FakeKernels, use_fake_kernels

pytestmark = [
    pytest.mark.skipif(sys.platform == "win32", reason="the tests start their ranks with fork"),
    pytest.mark.skipif(torch.cuda.is_initialized(), reason="fork cannot start once CUDA is initialised"),
]

D, HIDDEN, E = 8, 16, 4  # aligned widths: the grouped GEMM runs, not its fallback


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, fn, args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world, *args):
    """``fn(rank, world, *args)`` in ``world`` forked processes joined by gloo; a failing rank fails the test."""
    mp.start_processes(_worker, args=(world, _free_port(), fn, args), nprocs=world, start_method="fork")


# ---- the exchange -------------------------------------------------------------------


def _round_trip(rank, world):
    # Rank r sends (r + j) % 3 rows to rank j (some splits are 0); row values name sender and receiver.
    input_splits = [(rank + j) % 3 for j in range(world)]
    output_splits = [(j + rank) % 3 for j in range(world)]
    x = torch.cat([torch.full((n, 2), 10.0 * rank + j) for j, n in enumerate(input_splits)]).requires_grad_(True)
    y = all_to_all(x, output_splits, input_splits, dist.group.WORLD)
    expected = torch.cat([torch.full((n, 2), 10.0 * j + rank) for j, n in enumerate(output_splits)])
    assert torch.equal(y, expected)
    back = all_to_all(y, input_splits, output_splits, dist.group.WORLD)
    assert torch.equal(back, x)
    # d(sum(back * c))/dx = c: the gradient retraces both exchanges.
    c = torch.arange(x.numel(), dtype=torch.float32).reshape(x.shape)
    (back * c).sum().backward()
    assert torch.equal(x.grad, c)


def test_all_to_all_round_trips_rows_and_gradients():
    run_ranks(_round_trip, 2)


# ---- sharded experts against one process ----------------------------------------------


def _routing(case, group_rank, T, generator):
    """[T, K] expert indices of one rank; experts 0, 1 live on group rank 0 and 2, 3 on group rank 1."""
    if case == "random_k2":
        return torch.stack([torch.randperm(E, generator=generator)[:2] for _ in range(T)])
    if case == "nothing_for_rank_0":  # group rank 0 receives no rows at all; experts 0, 1 get no tokens
        return torch.stack([torch.tensor([2, 3])[torch.randperm(2, generator=generator)] for _ in range(T)])
    if case == "skewed_k1":  # rank 0 sends everything away, rank 1 splits; experts 1, 2 get nothing
        return torch.full((T, 1), 3) if group_rank == 0 else torch.tensor([[0], [3]]).repeat(T, 1)[:T]
    raise ValueError(case)


def _sharded_experts_match(rank, world, ep, case, backend):
    T, K = 5, (1 if case.endswith("k1") else 2)
    kernels = FakeKernels(nan_for_empty_experts=True)
    if backend == "megablocks":  # this forked rank runs the stand-in kernels (a process of its own)
        mb.load_kernels = lambda device, dtype: mb.Kernels(kernels.gather, kernels.scatter, kernels.gmm)
    g = torch.Generator().manual_seed(0)
    full = Experts(D, HIDDEN, E, backend="loop")
    with torch.no_grad():
        for p in full.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    x_all = torch.randn(world, T, D, generator=g)
    weights_all = torch.rand(world, T, K, generator=g)
    grad_out_all = torch.randn(world, T, D, generator=g)
    indices_all = torch.stack([_routing(case, r % ep, T, g) for r in range(world)])

    # One process: every rank's tokens through all experts; the loss is the mean over ranks.
    x_ref = x_all.clone().requires_grad_(True)
    w_ref = weights_all.clone().requires_grad_(True)
    outputs = [full(x_ref[r], indices_all[r], w_ref[r], return_output_sums=True) for r in range(world)]
    (sum((y * grad_out_all[r]).sum() for r, (y, _) in enumerate(outputs)) / world).backward()

    mesh = init_device_mesh("cpu", (world // ep, ep), mesh_dim_names=MESH_DIMS)
    shard = ExpertShard(mesh.get_group("expert_parallel"), mesh.get_local_rank("expert_parallel"), ep, E)
    experts = copy.deepcopy(full)
    experts.backend = backend
    experts.zero_grad(set_to_none=True)
    shard_experts(experts, shard)
    assert experts.w1.shape == (E // ep, D, 2 * HIDDEN)  # SwiGLU: gate and up side by side
    x = x_all[rank].clone().requires_grad_(True)
    w = weights_all[rank].clone().requires_grad_(True)
    y, stats = experts(x, indices_all[rank], w, return_output_sums=True)
    (y * grad_out_all[rank]).sum().backward()  # this rank's own loss, as under DDP
    if backend == "megablocks":  # MegaBlocks' kernels ran, unless the rank's experts received no rows
        received_rows = case != "nothing_for_rank_0" or shard.rank == 1
        assert len(kernels.gmm_dtypes) == (2 if received_rows else 0)  # gate and up side by side, then down
    data_parallel = mesh.get_group("data_parallel") if world > ep else None
    reduce_expert_gradients(list(experts.parameters()), data_parallel, world)

    y_ref, stats_ref = outputs[rank]
    tight = {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(y, y_ref, **tight)
    assert torch.equal(stats.tokens_per_expert, stats_ref.tokens_per_expert)  # this rank's tokens, global experts
    torch.testing.assert_close(stats.output_sum, stats_ref.output_sum, **tight)
    torch.testing.assert_close(stats.weighted_output_sum, stats_ref.weighted_output_sum, **tight)
    torch.testing.assert_close(x.grad / world, x_ref.grad[rank], **tight)
    torch.testing.assert_close(w.grad / world, w_ref.grad[rank], **tight)
    lo, hi = shard.first_expert, shard.first_expert + E // ep
    for name, p in experts.named_parameters():
        torch.testing.assert_close(p.grad, getattr(full, name).grad[lo:hi], **tight, msg=name)
    unshard_experts(experts)
    assert experts.expert_parallel is None
    for name, p in experts.named_parameters():
        assert torch.equal(p, getattr(full, name)), name


@pytest.mark.parametrize(
    "world,ep,case,backend",
    [
        (2, 2, "random_k2", "torch"),
        (2, 2, "nothing_for_rank_0", "torch"),
        (2, 2, "skewed_k1", "torch"),
        (4, 2, "random_k2", "torch"),
        # MegaBlocks' gather / gmm / scatter (plain-torch stand-ins with the kernels' contracts,
        # whose gmm leaves the weight gradient of zero-row experts as NaN) around the exchange.
        (2, 2, "random_k2", "megablocks"),
        (2, 2, "nothing_for_rank_0", "megablocks"),
        (2, 2, "skewed_k1", "megablocks"),
    ],
)
def test_sharded_experts_equal_one_process_in_outputs_stats_and_gradients(world, ep, case, backend):
    run_ranks(_sharded_experts_match, world, ep, case, backend)


# ---- the strategy -----------------------------------------------------------------------


def test_strategy_is_registered_on_import():
    assert lightning_moe.ExpertParallelStrategy is ExpertParallelStrategy
    for name in ("moe_expert_parallel", "moe_expert_parallel_fork", "moe_expert_parallel_spawn"):
        assert StrategyRegistry[name]["strategy"] is ExpertParallelStrategy
    trainer = L.Trainer(strategy="moe_expert_parallel_fork", accelerator="cpu", devices=2, logger=False)
    assert isinstance(trainer.strategy, ExpertParallelStrategy)
    assert trainer.strategy.expert_parallel_size == 2


class ShardedRegression(L.LightningModule):
    """Rank r of W trains on samples r, r + W, ... so every step sees the same global batch for any W.

    A dense projection, a Default-MoE layer (deterministic top-2 routing, EMA buffers fed
    by the expert output sums) and SGD with momentum (its state is per expert). Each rank
    saves the losses it saw to ``default_root_dir``.
    """

    def __init__(self, data, global_batch, num_experts=E, backend="torch"):
        super().__init__()
        self.data, self.global_batch = data, global_batch
        self.proj = nn.Linear(D, D)
        self.moe = MoELayer(D, HIDDEN, num_experts, top_k=2, estimator="default_moe", backend=backend)
        self.moe.experts.reset_parameters(std=0.3)
        self.losses = []

    def _loss(self, x):
        assert self.moe.experts.w1.shape[0] == self.moe.num_experts // self.trainer.world_size  # sharded
        h = self.proj(x)
        return (h + self.moe(h) - x.flip(-1)).pow(2).mean()

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch[0])
        self.losses.append(loss.detach())
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self._loss(batch[0]), sync_dist=True)

    def train_dataloader(self):
        world = self.trainer.world_size
        micro_batch = self.global_batch // (world * self.trainer.accumulate_grad_batches)
        return DataLoader(TensorDataset(self.data[self.global_rank :: world]), batch_size=micro_batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.9)

    def on_train_end(self):
        torch.save(torch.stack(self.losses), f"{self.trainer.default_root_dir}/losses{self.global_rank}.pt")


def fit(module, root, devices, ckpt_path=None):
    root.mkdir(exist_ok=True)
    strategy = ExpertParallelStrategy(expert_parallel_size=2, start_method="fork") if devices > 1 else "auto"
    trainer = L.Trainer(
        default_root_dir=root,
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_epochs=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        accumulate_grad_batches=2,
        gradient_clip_val=1.1,  # clips the first steps only (gradient norms 1.5, 1.2, 1.0, 0.8)
        callbacks=[
            ModelCheckpoint(dirpath=root, filename="{epoch}", save_top_k=-1, every_n_epochs=1),
            LoadBalancingLoss(alpha=0.1, scope="global"),
            DefaultOutputEMA(),
        ],
    )
    trainer.fit(module, ckpt_path=ckpt_path)
    return [torch.load(root / f"losses{r}.pt") for r in range(devices)]


def assert_states_close(actual, expected):
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-5, msg=key)


@pytest.mark.filterwarnings("ignore:The dirpath has changed")
def test_fit_and_checkpoints_equal_one_process_with_the_same_global_batch(tmp_path):
    # Two epochs of two optimizer steps of two micro-batches, global batch 8 per step: one
    # process with micro-batches of 4 vs two ranks sharing the experts with micro-batches of 2.
    model = ShardedRegression(torch.randn(16, D), global_batch=8)
    single, sharded = copy.deepcopy(model), copy.deepcopy(model)
    (single_losses,) = fit(single, tmp_path / "single", devices=1)
    sharded_losses = fit(sharded, tmp_path / "ep", devices=2)

    assert single_losses.shape == (8,) and single_losses[-1] < single_losses[0]
    torch.testing.assert_close((sharded_losses[0] + sharded_losses[1]) / 2, single_losses, rtol=1e-5, atol=1e-6)
    # Teardown gathered the experts back: the fork launcher handed full weights to this process.
    final = single.state_dict()
    assert final["moe.estimator.default_outputs"].abs().sum() > 0
    assert_states_close(sharded.state_dict(), final)

    # The expert-parallel checkpoint is a single-process one: full experts and optimizer state.
    single_ckpt = torch.load(tmp_path / "single" / "epoch=0.ckpt", weights_only=False)
    ep_ckpt = torch.load(tmp_path / "ep" / "epoch=0.ckpt", weights_only=False)
    assert ep_ckpt["state_dict"]["moe.experts.w1"].shape == (E, D, 2 * HIDDEN)
    assert_states_close(ep_ckpt["state_dict"], single_ckpt["state_dict"])
    assert_states_close(
        {k: v["momentum_buffer"] for k, v in ep_ckpt["optimizer_states"][0]["state"].items()},
        {k: v["momentum_buffer"] for k, v in single_ckpt["optimizer_states"][0]["state"].items()},
    )

    # Resume across layouts: expert parallel -> one process, and one process -> expert parallel.
    resumed_single = copy.deepcopy(model)
    fit(resumed_single, tmp_path / "ep_to_single", devices=1, ckpt_path=tmp_path / "ep" / "epoch=0.ckpt")
    assert_states_close(resumed_single.state_dict(), final)
    resumed_sharded = copy.deepcopy(model)
    fit(resumed_sharded, tmp_path / "single_to_ep", devices=2, ckpt_path=tmp_path / "single" / "epoch=0.ckpt")
    assert_states_close(resumed_sharded.state_dict(), final)


@pytest.mark.filterwarnings("ignore:The dirpath has changed")
def test_fit_on_the_megablocks_path_equals_one_process(tmp_path, monkeypatch):
    # The forked ranks inherit the stand-in kernels; one process runs the torch backend.
    kernels = FakeKernels(nan_for_empty_experts=True)
    use_fake_kernels(monkeypatch, kernels)
    model = ShardedRegression(torch.randn(16, D), global_batch=8)
    single, sharded = copy.deepcopy(model), copy.deepcopy(model)
    sharded.moe.experts.backend = "megablocks"
    (single_losses,) = fit(single, tmp_path / "single", devices=1)
    sharded_losses = fit(sharded, tmp_path / "ep", devices=2)
    torch.testing.assert_close((sharded_losses[0] + sharded_losses[1]) / 2, single_losses, rtol=1e-5, atol=1e-6)
    assert_states_close(sharded.state_dict(), single.state_dict())


class ManualAccumulation(ShardedRegression):
    """Lightning's documented manual accumulation: two ``manual_backward`` calls, then one step.

    Saves the expert gradients each rank holds right before each step (``<root>/grads<rank>.pt``).
    """

    def __init__(self, data):
        super().__init__(data, global_batch=4)  # micro-batches of 4 / W; 8 samples per step
        self.automatic_optimization = False
        self.expert_grads = []

    def training_step(self, batch, batch_idx):
        self.manual_backward(super().training_step(batch, batch_idx) / 2)
        if batch_idx % 2 == 1:
            optimizer = self.optimizers()
            optimizer.step()
            optimizer.zero_grad()

    def on_before_optimizer_step(self, optimizer):
        self.expert_grads.append({n: p.grad.clone() for n, p in self.moe.experts.named_parameters()})

    def on_train_end(self):
        super().on_train_end()
        torch.save(self.expert_grads, f"{self.trainer.default_root_dir}/grads{self.global_rank}.pt")


def quiet_trainer(root, devices, **trainer_args) -> L.Trainer:
    """A CPU trainer on ``devices`` processes (expert parallel when more than one) with no logger,
    checkpoints or progress output, each rank reading its own batches, Default MoE's updater on."""
    trainer_args.setdefault("callbacks", [DefaultOutputEMA()])
    return L.Trainer(
        default_root_dir=root,
        accelerator="cpu",
        devices=devices,
        strategy=ExpertParallelStrategy(start_method="fork") if devices > 1 else "auto",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        **trainer_args,
    )


def test_manual_optimisation_with_accumulation_equals_one_process(tmp_path):
    model = ManualAccumulation(torch.randn(16, D))
    runs = {}
    for devices in (1, 2):
        root = tmp_path / str(devices)
        root.mkdir()
        trainer = quiet_trainer(root, devices, max_epochs=1)
        runs[devices] = copy.deepcopy(model)
        trainer.fit(runs[devices])
        runs[devices].grads = [torch.load(root / f"grads{r}.pt") for r in range(devices)]
    (single,), sharded = runs[1].grads, runs[2].grads
    assert len(single) == 2  # two optimizer steps of two micro-batches
    for step, expected in enumerate(single):
        for name, grad in expected.items():
            # Rank r holds experts 2r, 2r + 1 of the 4.
            torch.testing.assert_close(torch.cat([sharded[r][step][name] for r in range(2)]), grad, msg=name)
    assert_states_close(runs[2].state_dict(), runs[1].state_dict())


class OverflowOnOneRank(ShardedRegression):
    """Rank 0's expert gradients overflow in the second step; every other gradient stays finite.

    Saves each rank's replicated parameters and loss scale (``<root>/rank<r>.pt``).
    """

    def on_train_start(self):
        if self.global_rank == 0:
            self.moe.experts.w1.register_hook(lambda g: g * float("inf") if self.trainer.global_step == 1 else g)

    def on_train_end(self):
        replicated = {k: v.clone() for k, v in self.state_dict().items() if not k.startswith("moe.experts.")}
        scale = self.trainer.precision_plugin.scaler.get_scale()
        record = {"replicated": replicated, "scale": scale}
        torch.save(record, f"{self.trainer.default_root_dir}/rank{self.global_rank}.pt")


def test_fp16_loss_scaling_skips_an_overflowing_step_on_every_rank(tmp_path):
    # Expert gradients differ between the ranks of an expert-parallel group: a rank whose
    # experts overflow must not skip the step alone (its replicated parameters would fall behind).
    model = OverflowOnOneRank(torch.randn(24, D), global_batch=8)
    initial = model.proj.weight.detach().clone()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=1000)
    trainer = quiet_trainer(
        tmp_path, 2, max_steps=3,
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],  # Lightning adds no scaler on CPU
    )
    trainer.fit(model)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert [r["scale"] for r in ranks] == [2.0**7, 2.0**7]  # one skipped step, on both ranks
    for key, value in ranks[0]["replicated"].items():
        assert torch.equal(ranks[1]["replicated"][key], value), key
    assert not torch.equal(ranks[0]["replicated"]["proj.weight"], initial)  # the other steps trained


class NaNAtSecondBatch(ShardedRegression):
    """Every rank's second batch is NaN, so NonFiniteGuard(action="skip") drops every gradient of that step."""

    def training_step(self, batch, batch_idx):
        return super().training_step([batch[0] * float("nan")] if batch_idx == 1 else batch, batch_idx)


def test_norm_clipping_after_a_skipped_step_reduces_on_the_strategy_device(tmp_path, monkeypatch):
    # A rank without gradients clips with norms of empty lists; torch's get_total_norm([]) is a
    # CPU tensor, which NCCL cannot all-reduce. Here it is a meta tensor (not the CPU ranks'
    # device) and all-reduce refuses tensors off the device as NCCL does (gloo would not).
    def fit_skipping(module, devices):
        trainer = quiet_trainer(
            tmp_path, devices, max_steps=3, gradient_clip_val=0.5,
            callbacks=[NonFiniteGuard(action="skip"), DefaultOutputEMA()],
        )
        trainer.fit(module)

    model = NaNAtSecondBatch(torch.randn(32, D), global_batch=8)
    single, sharded = copy.deepcopy(model), copy.deepcopy(model)
    fit_skipping(single, devices=1)
    total_norm = torch.nn.utils.get_total_norm
    monkeypatch.setattr(
        torch.nn.utils,
        "get_total_norm",
        lambda tensors, *args, **kwargs: total_norm(tensors, *args, **kwargs)
        if len(tensors)
        else torch.zeros((), device="meta"),
    )
    all_reduce = dist.all_reduce

    def all_reduce_on_cpu(tensor, *args, **kwargs):
        assert tensor.device.type == "cpu", f"all_reduce of a tensor on {tensor.device}"
        return all_reduce(tensor, *args, **kwargs)

    monkeypatch.setattr(dist, "all_reduce", all_reduce_on_cpu)
    fit_skipping(sharded, devices=2)
    final = single.state_dict()
    assert all(value.isfinite().all() for value in final.values())
    assert_states_close(sharded.state_dict(), final)


def test_validate_shards_the_experts_and_equals_one_process(tmp_path):
    model = ShardedRegression(torch.randn(16, D), global_batch=8)
    data = torch.randn(8, D)
    losses = []
    for devices in (1, 2):
        strategy = ExpertParallelStrategy(start_method="fork") if devices > 1 else "auto"
        trainer = L.Trainer(
            accelerator="cpu", devices=devices, strategy=strategy, logger=False, enable_progress_bar=False
        )
        # Each rank validates its own half (no padding needed); the logged mean syncs over ranks.
        loader = DataLoader(TensorDataset(data), batch_size=8 // devices)
        (metrics,) = trainer.validate(copy.deepcopy(model), loader, verbose=False)
        losses.append(metrics["val_loss"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


# ---- clear errors before any compute ---------------------------------------------------------


def test_num_experts_not_divisible_names_the_layer_and_both_sizes():
    model = ShardedRegression(torch.randn(4, D), global_batch=4, num_experts=3)
    with pytest.raises(ValueError, match=r"MoE layer 'moe' has num_experts=3, which expert_parallel_size=2"):
        check_expert_parallel_model(model, 2)


def test_models_without_experts_are_refused():
    with pytest.raises(ValueError, match="no MoELayer in Linear"):
        check_expert_parallel_model(nn.Linear(2, 2), 2)


def test_world_size_and_size_argument_are_checked_when_the_trainer_is_built():
    with pytest.raises(ValueError, match="expert_parallel_size=2 does not divide the world size 3"):
        L.Trainer(strategy=ExpertParallelStrategy(expert_parallel_size=2), accelerator="cpu", devices=3)
    with pytest.raises(ValueError, match="expert_parallel_size must be a positive int"):
        L.Trainer(strategy=ExpertParallelStrategy(expert_parallel_size=0), accelerator="cpu", devices=2)


def test_fit_refuses_indivisible_experts_before_training(tmp_path):
    model = ShardedRegression(torch.randn(8, D), global_batch=4, num_experts=3)
    with pytest.raises(Exception, match="num_experts=3, which expert_parallel_size=2 does not divide"):
        fit(model, tmp_path, devices=2)
    assert not (tmp_path / "losses0.pt").exists()
