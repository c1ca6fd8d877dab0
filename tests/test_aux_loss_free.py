import copy
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_moe import MoELayer
from lightning_moe.callbacks import AuxLossFreeBalancing, DefaultOutputEMA, aux_loss_free
from lightning_moe.estimators.default_moe import DefaultMoE
from lightning_moe.estimators.topk import TopK

from helpers import fit_quietly

D, E = 4, 4


def one_hot_tokens(classes, repeats=1):
    return torch.eye(D)[torch.tensor(classes)].repeat(repeats, 1)


class FixedRouterModule(L.LightningModule):
    """Two MoE layers (a dense layer between them) whose routers send token class c to
    expert c; SGD with ``lr=0`` keeps the routers fixed, so only the bias changes routing."""

    def __init__(self, estimators=("topk", "topk"), lr=0.0, top_k=1):
        super().__init__()
        self.moe_a = MoELayer(D, 8, E, top_k, estimator=estimators[0], backend="loop")
        self.dense = nn.Linear(D, D)
        self.moe_b = MoELayer(D, 8, E, top_k, estimator=estimators[1], backend="loop")
        with torch.no_grad():
            for layer in (self.moe_a, self.moe_b):
                layer.router.weight.copy_(torch.eye(E) * 2.0)
            self.dense.weight.copy_(torch.eye(D))
            self.dense.bias.zero_()
        self.lr = lr

    def forward(self, x):
        h = x + self.moe_a(x)
        return h + self.moe_b(self.dense(x))

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return self(x).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def fit(module, data, callbacks, ckpt_path=None, **trainer_args):
    return fit_quietly(module, data, callbacks, ckpt_path=ckpt_path, **trainer_args)


def skewed_data(steps, batch=8):
    """Classes 0, 0, 0, 0, 0, 1, 2, 3 in every batch: expert 0 is overloaded five times over."""
    return DataLoader(TensorDataset(one_hot_tokens([0, 0, 0, 0, 0, 1, 2, 3], steps)), batch_size=batch)


def test_update_formula_on_hand_made_counts():
    bias = torch.zeros(4)
    pointer = bias.data_ptr()
    aux_loss_free.balancing_update(bias, torch.tensor([10.0, 2.0, 4.0, 4.0]), gamma=0.1)
    # mean load 5: expert 0 overloaded (b -= gamma), the rest underloaded (b += gamma);
    # then the mean 0.05 is subtracted.
    torch.testing.assert_close(bias, torch.tensor([-0.15, 0.05, 0.05, 0.05]))
    assert bias.data_ptr() == pointer
    aux_loss_free.balancing_update(bias, torch.tensor([8.0, 2.0, 5.0, 5.0]), gamma=0.1)
    # Experts exactly at the mean load keep their bias (sign 0); the mean stays 0.
    torch.testing.assert_close(bias, torch.tensor([-0.25, 0.15, 0.05, 0.05]))
    assert abs(bias.mean().item()) < 1e-7


def test_training_moves_the_bias_towards_balance_in_place():
    model = FixedRouterModule()
    buffers = [model.moe_a.selection_bias, model.moe_b.selection_bias]
    pointers = [b.data_ptr() for b in buffers]
    fit(model, skewed_data(3), [AuxLossFreeBalancing(gamma=0.01)], max_steps=3)
    # Three steps at loads [5, 1, 1, 1]: expert 0 went down by gamma each step, the others
    # up, and recentring kept the mean at zero.
    for buffer, pointer, layer in zip(buffers, pointers, (model.moe_a, model.moe_b)):
        assert layer.selection_bias is buffer and buffer.data_ptr() == pointer
        assert layer.use_selection_bias
        torch.testing.assert_close(buffer, 3 * torch.tensor([-0.015, 0.005, 0.005, 0.005]))
    assert "moe/layer_01/selection_bias_max_abs" in model.trainer.callback_metrics


class SkipsSecondLayerAfterFirstStep(FixedRouterModule):
    def forward(self, x):
        h = x + self.moe_a(x)
        if self.trainer.global_step == 0:
            h = h + self.moe_b(self.dense(x))
        return h


def test_a_step_without_forwards_through_a_layer_leaves_its_bias_alone():
    model = SkipsSecondLayerAfterFirstStep()
    fit(model, skewed_data(3), [AuxLossFreeBalancing(gamma=0.01)], max_steps=3)
    one_step = torch.tensor([-0.015, 0.005, 0.005, 0.005])
    torch.testing.assert_close(model.moe_a.selection_bias, 3 * one_step)
    torch.testing.assert_close(model.moe_b.selection_bias, one_step)


def test_balancing_evens_out_the_load_of_a_fixed_router():
    # A constant first feature gives expert 0 a head start over the noise on the others.
    tokens = torch.randn(64 * 40, D, generator=torch.Generator().manual_seed(0))
    tokens[:, 0] = 1.0
    model = FixedRouterModule()
    loads = []

    class RecordLoad(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            counts = pl_module.moe_a.routing_stats.tokens_per_expert
            loads.append((counts.max() / counts.mean()).item())

    # The recorder runs first, so it sees each step's counts before the bias update.
    data = DataLoader(TensorDataset(tokens), batch_size=64)
    fit(model, data, [RecordLoad(), AuxLossFreeBalancing(gamma=0.02)], max_steps=40)
    first, last = sum(loads[:5]) / 5, sum(loads[-10:]) / 10
    assert first > 1.8
    assert last < 1.45


def test_updates_once_per_optimizer_step_under_accumulation(monkeypatch):
    calls = []
    original = aux_loss_free.balancing_update

    def recording_update(bias_E, tokens_per_expert_E, gamma):
        calls.append(tokens_per_expert_E.sum().item())
        original(bias_E, tokens_per_expert_E, gamma)

    monkeypatch.setattr(aux_loss_free, "balancing_update", recording_update)
    model = FixedRouterModule(lr=0.1)
    fit(model, skewed_data(12, batch=8), [AuxLossFreeBalancing()], max_steps=4, accumulate_grad_batches=3)
    # 4 optimizer steps x 2 layers, each update over the 8 tokens of all 3 micro-batches of its step.
    assert calls == [3 * 8.0] * 8


@pytest.mark.parametrize("estimator", [TopK(), DefaultMoE()])
def test_selection_uses_the_bias_but_weights_the_unbiased_softmax(estimator):
    estimator.bind(num_experts=4, top_k=1, d_model=D)
    logits = torch.tensor([[2.0, 1.9, 0.0, -1.0]], requires_grad=True)
    probs = logits.detach().softmax(dim=-1)
    with torch.no_grad():
        estimator.eval()
        assert estimator.route(logits, 1).indices.item() == 0
        routing = estimator.route(logits, 1, selection_bias=torch.tensor([-0.1, 0.1, 0.0, 0.0]))
    assert routing.indices.item() == 1
    torch.testing.assert_close(routing.weights, probs[:, 1:2])
    torch.testing.assert_close(routing.probs, probs)

    # The gate's gradient is that of the unbiased softmax value of the chosen expert.
    estimator.train()
    if isinstance(estimator, DefaultMoE):
        estimator.attach_updater()
    routing = estimator.route(logits, 1, selection_bias=torch.tensor([-0.1, 0.1, 0.0, 0.0]))
    (grad,) = torch.autograd.grad(routing.weights.sum(), logits)
    (expected,) = torch.autograd.grad(logits.softmax(dim=-1)[0, 1], logits)
    torch.testing.assert_close(grad, expected)


def test_layer_uses_the_bias_only_when_switched_on():
    layer = MoELayer(D, 8, E, 1, backend="loop")
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(E))
        layer.selection_bias.copy_(torch.tensor([-1.0, 1.0, 0.0, 0.0]))
    layer.eval()
    x = one_hot_tokens([0])
    y_off = layer(x)
    layer.use_selection_bias = True
    y_on = layer(x)
    # The class-0 token moves from expert 0 to expert 1, gated by its unbiased probability.
    gate = torch.eye(E)[0].softmax(dim=-1)
    expert_0, _ = layer.experts(x, torch.tensor([[0]]), gate[0].view(1, 1))
    expert_1, _ = layer.experts(x, torch.tensor([[1]]), gate[1].view(1, 1))
    torch.testing.assert_close(y_off, expert_0)
    torch.testing.assert_close(y_on, expert_1)
    assert "selection_bias" in layer.state_dict()


@pytest.mark.parametrize("estimator", ["sparsemixer", "sparsemixer_v2"])
def test_refused_for_sampling_estimators_with_a_clear_error(estimator):
    model = FixedRouterModule(estimators=("topk", estimator))
    with pytest.raises(ValueError, match=r"'moe_b' \(layer_01\).*SparseMixer.*does not support a selection bias"):
        fit(model, skewed_data(2), [AuxLossFreeBalancing()], max_steps=1)


def test_bad_gamma():
    for gamma in (0, -1e-3, True, "1e-3"):
        with pytest.raises(ValueError, match="gamma"):
            AuxLossFreeBalancing(gamma=gamma)


def test_bias_is_checkpointed_and_restored_by_fit_ckpt_path(tmp_path):
    data = skewed_data(3)  # one epoch = 3 optimizer steps
    kwargs = {"enable_checkpointing": False}
    reference = FixedRouterModule(lr=0.1)
    resumed = copy.deepcopy(reference)
    fit(reference, data, [AuxLossFreeBalancing(gamma=0.01)], max_epochs=2, **kwargs)

    first = fit(resumed, data, [AuxLossFreeBalancing(gamma=0.01)], max_epochs=1, **kwargs)
    first.save_checkpoint(tmp_path / "epoch1.ckpt")
    saved = torch.load(tmp_path / "epoch1.ckpt", weights_only=True)["state_dict"]
    assert saved["moe_a.selection_bias"].abs().sum() > 0

    restarted = FixedRouterModule(lr=0.1)
    seen = []

    class RecordStart(L.Callback):
        def on_train_start(self, trainer, pl_module):
            seen.append(pl_module.moe_a.selection_bias.clone())

    fit(
        restarted,
        data,
        [AuxLossFreeBalancing(gamma=0.01), RecordStart()],
        max_epochs=2,
        ckpt_path=tmp_path / "epoch1.ckpt",
        **kwargs,
    )
    torch.testing.assert_close(seen[0], saved["moe_a.selection_bias"])
    for name in ("moe_a.selection_bias", "moe_b.selection_bias"):
        torch.testing.assert_close(restarted.state_dict()[name], reference.state_dict()[name], rtol=0, atol=0)


class ShardedModule(FixedRouterModule):
    """Rank r of W trains on samples r, r + W, ...; saves its biases to ``out_dir``."""

    def __init__(self, tokens, batch, out_dir):
        super().__init__()
        self.tokens, self.batch, self.out_dir = tokens, batch, out_dir

    def train_dataloader(self):
        shard = self.tokens[self.global_rank :: self.trainer.world_size]
        return DataLoader(TensorDataset(shard), batch_size=self.batch // self.trainer.world_size)

    def on_train_end(self):
        biases = torch.stack([self.moe_a.selection_bias, self.moe_b.selection_bias])
        torch.save(biases.clone(), f"{self.out_dir}/rank{self.global_rank}.pt")


@pytest.mark.skipif(sys.platform == "win32", reason="ddp_fork needs fork")
def test_ddp_ranks_hold_identical_biases_equal_to_one_process(tmp_path):
    if torch.cuda.is_initialized():
        pytest.skip("ddp_fork cannot start once CUDA is initialised in this process")
    # Rank 0 sees only classes 0 and 2, rank 1 only 1, 1 and 3: without the all-reduce
    # the ranks would move their biases differently.
    tokens = one_hot_tokens([0, 1, 0, 1, 2, 1, 2, 3], 4)
    for name, devices, strategy in (("single", 1, "auto"), ("ddp", 2, "ddp_fork")):
        module = ShardedModule(tokens, batch=8, out_dir=str(tmp_path / name))
        Path(module.out_dir).mkdir()
        fit(
            module,
            None,
            [AuxLossFreeBalancing(gamma=0.01)],
            max_steps=4,
            devices=devices,
            strategy=strategy,
            use_distributed_sampler=False,
        )
    expected = torch.load(tmp_path / "single" / "rank0.pt")
    ranks = [torch.load(tmp_path / "ddp" / f"rank{r}.pt") for r in range(2)]
    assert expected.abs().sum() > 0
    assert torch.equal(ranks[0], ranks[1])
    torch.testing.assert_close(ranks[0], expected, rtol=0, atol=1e-7)


def test_default_moe_layers_are_balanced_too():
    model = FixedRouterModule(estimators=("default_moe", "default_moe"))
    fit(model, skewed_data(5), [DefaultOutputEMA(), AuxLossFreeBalancing(gamma=0.05)], max_steps=5)
    assert model.moe_a.selection_bias[0] < 0 and (model.moe_a.selection_bias[1:] > 0).all()
