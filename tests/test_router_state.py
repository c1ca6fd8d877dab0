"""Router state that lives in buffers: float32 under any precision, saved with the layer.

The selection bias of aux-loss-free balancing and Default MoE's default outputs are
moved by small steps (gamma = 1e-3) once per optimizer step; in bfloat16 such a step is
lost once |value| >= 0.5 (bf16 keeps 8 significant bits). Whether the bias is used at
all is part of the trained model, so it travels in the ``state_dict`` too.
"""

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_moe import MoELayer
from lightning_moe.callbacks import AuxLossFreeBalancing, DefaultOutputEMA
from lightning_moe.callbacks.aux_loss_free import balancing_update
from lightning_moe.module import MoELanguageModel

from helpers import fit_quietly

D, E = 8, 4
THIRD = 1.0 / 3.0  # not representable in bfloat16 (nor exactly in float32, but fixed there)


def default_moe_layer() -> MoELayer:
    layer = MoELayer(D, 16, E, 1, estimator="default_moe", backend="loop")
    with torch.no_grad():
        layer.selection_bias.copy_(torch.tensor([-0.6, THIRD, 0.2, 0.0667]))
        layer.estimator.default_outputs.fill_(THIRD)
    return layer


def router_buffers(layer: MoELayer) -> dict:
    return {"selection_bias": layer.selection_bias, "default_outputs": layer.estimator.default_outputs}


@pytest.mark.parametrize("convert", ["to_bf16", "half", "double", "to_dtype_and_device"])
def test_router_state_keeps_float32_and_its_exact_values_when_the_module_is_cast(convert):
    layer = default_moe_layer()
    before = {name: t.clone() for name, t in router_buffers(layer).items()}
    cast = {
        "to_bf16": lambda m: m.to(torch.bfloat16),
        "half": lambda m: m.half(),
        "double": lambda m: m.double(),
        "to_dtype_and_device": lambda m: m.to("cpu", torch.bfloat16),
    }[convert]
    cast(layer)
    assert layer.router.weight.dtype != torch.float32  # the cast did reach the module
    for name, value in router_buffers(layer).items():
        assert value.dtype == torch.float32, name
        assert torch.equal(value, before[name]), name
    assert layer.estimator.default_initialised.dtype == torch.bool


def test_selection_bias_of_a_bf16_module_moves_like_float32_math():
    """The issue's numbers: 2000 steps of a fixed imbalance move the bias to [-3, 1, 1, 1]."""
    layer = MoELayer(D, 16, E, 1, backend="loop").to(torch.bfloat16)
    counts_E = torch.tensor([10, 2, 2, 2])  # expert 0 overloaded every step
    for _ in range(2000):
        balancing_update(layer.selection_bias, counts_E, 1e-3)
    # Each step adds gamma * (sign(mean - load) - mean of the signs) = 1e-3 * [-1.5, .5, .5, .5].
    expected = torch.tensor([-3.0, 1.0, 1.0, 1.0])
    torch.testing.assert_close(layer.selection_bias.float(), expected, rtol=0, atol=1e-4)


class FixedRouting(L.LightningModule):
    """Every token goes to expert 0 (router lr 0), so each step has the same imbalance."""

    def __init__(self, estimator: str):
        super().__init__()
        self.moe = MoELayer(D, 16, E, 1, estimator=estimator, backend="loop")
        with torch.no_grad():
            self.moe.router.weight.zero_()
            self.moe.router.weight[0] = 20.0  # inputs are positive: softmax ~ e_0
            self.moe.selection_bias.copy_(torch.tensor([-0.6, 0.2, 0.2, 0.2]))
            if estimator == "default_moe":
                self.moe.estimator.default_outputs.fill_(THIRD)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return self.moe(x).float().square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


@pytest.mark.parametrize("estimator", ["topk", "default_moe"])
def test_bf16_true_training_keeps_router_state_in_float32(estimator):
    module = FixedRouting(estimator)
    steps, gamma = 3, 1e-3
    callbacks = [AuxLossFreeBalancing(gamma=gamma)]
    if estimator == "default_moe":
        callbacks.append(DefaultOutputEMA(beta=0.5))
    data = DataLoader(TensorDataset(torch.rand(8, D) + 0.1), batch_size=4)
    fit_quietly(module, data, callbacks, max_steps=steps, precision="bf16-true")
    assert module.moe.router.weight.dtype == torch.bfloat16  # Lightning did cast the module
    bias = module.moe.selection_bias
    assert bias.dtype == torch.float32
    # Float64 reference of the update: in bf16, a step of 1e-3 at |b| = 0.6 rounds away.
    expected = torch.tensor([-0.6, 0.2, 0.2, 0.2], dtype=torch.float64)
    expected += steps * gamma * torch.tensor([-1.5, 0.5, 0.5, 0.5], dtype=torch.float64)
    torch.testing.assert_close(bias.double(), expected, rtol=0, atol=1e-6)
    if estimator == "default_moe":
        defaults = module.moe.estimator.default_outputs
        assert defaults.dtype == torch.float32
        # Experts 1..3 got no tokens: they keep the exact float32 value they started with.
        assert torch.equal(defaults[1:], torch.full((E - 1, D), THIRD))


# --- use_selection_bias travels with the layer ------------------------------------------


def biased_layer() -> MoELayer:
    layer = MoELayer(D, 16, E, 2, backend="loop")
    layer.use_selection_bias = True
    with torch.no_grad():
        layer.selection_bias.copy_(torch.tensor([0.5, -0.5, 0.3, -0.3]))  # decides most choices
    return layer.eval()


def chosen_experts(layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    """The experts ``layer`` sends each token to, computed from its router and bias by hand."""
    probs = (x @ layer.router.weight.T).softmax(-1)
    return (probs + layer.selection_bias * layer.use_selection_bias).topk(layer.top_k, dim=-1).indices


def test_a_loaded_layer_routes_with_the_bias_it_was_saved_with():
    trained = biased_layer()
    loaded = MoELayer(D, 16, E, 2, backend="loop").eval()
    assert not loaded.use_selection_bias
    loaded.load_state_dict(trained.state_dict())
    assert loaded.use_selection_bias
    x = torch.randn(64, D)
    seen = {}
    loaded.experts.register_forward_hook(lambda m, args, out: seen.update(indices=args[1]))
    torch.testing.assert_close(loaded(x), trained(x))
    assert torch.equal(seen["indices"], chosen_experts(trained, x))
    without_bias = (x @ trained.router.weight.T).softmax(-1).topk(2, dim=-1).indices
    assert not torch.equal(seen["indices"], without_bias)  # the bias matters for this input


def test_switching_the_bias_off_is_saved_too():
    layer = biased_layer()
    layer.use_selection_bias = False
    loaded = biased_layer()
    loaded.load_state_dict(layer.state_dict())
    assert not loaded.use_selection_bias


def test_a_state_dict_from_before_the_switch_was_saved_loads_with_the_bias_off():
    old = {k: v for k, v in biased_layer().state_dict().items() if "selection_bias_enabled" not in k}
    assert "selection_bias" in old
    layer = biased_layer()
    layer.load_state_dict(old)  # strict
    assert not layer.use_selection_bias


def language_model() -> MoELanguageModel:
    return MoELanguageModel(
        vocab_size=32, d_model=D, n_layers=2, n_heads=2, max_seq_len=8, ffn_hidden=16, warmup_steps=0,
        learning_rate=1e-2, moe={"num_experts": E, "top_k": 2, "estimator": "topk", "backend": "loop"},
    )


def test_a_model_trained_with_aux_loss_free_balancing_routes_the_same_after_load_from_checkpoint(tmp_path):
    L.seed_everything(0)
    model = language_model()
    ids = torch.randint(0, 32, (16, 8))
    data = DataLoader(TensorDataset(ids, ids.roll(-1, dims=1)), batch_size=4)
    trainer = fit_quietly(model, data, [AuxLossFreeBalancing(gamma=0.05)], max_steps=4, default_root_dir=tmp_path)
    path = tmp_path / "trained.ckpt"
    trainer.save_checkpoint(path)

    loaded = MoELanguageModel.load_from_checkpoint(path).eval()  # no callback: as `sample`/`predict` run
    model.eval()
    for layer, trained in zip(loaded.model.moe_layers(), model.model.moe_layers()):
        assert layer.use_selection_bias and trained.use_selection_bias
        assert layer.selection_bias.abs().sum() > 0
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids))

    # A checkpoint written before the switch was saved still loads (strictly), with the bias off.
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if "selection_bias_enabled" not in k}
    torch.save(checkpoint, tmp_path / "old.ckpt")
    old = MoELanguageModel.load_from_checkpoint(tmp_path / "old.ckpt")
    assert not any(layer.use_selection_bias for layer in old.model.moe_layers())
