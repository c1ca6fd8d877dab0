"""Sigmoid routing reaches the gradient-fidelity probe's dense reference and the built-in model's config."""

from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_moe import MoELayer
from lightning_moe.callbacks.gradient_fidelity import router_gradient_fidelity

D, E, T = 12, 4, 64
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"


def probe(layer: MoELayer, seed: int = 0) -> dict[str, float]:
    generator = torch.Generator().manual_seed(seed)
    x, target = torch.randn(T, D, generator=generator), torch.randn(T, D, generator=generator)
    model = nn.ModuleDict({"moe": layer}).train()
    results = router_gradient_fidelity(model, lambda: ((torch.tanh(model["moe"](x)) - target) ** 2).mean())
    return {name: float(value) for name, value in results["layer_00"].items()}


@pytest.mark.parametrize("renormalize", [False, True])
def test_sigmoid_topk_over_every_expert_is_exact_against_the_layers_own_dense_mixture(renormalize):
    # k = E: top-k's gates are the dense mixture's weights, c * s_i (/ sum_j s_j when renormalised), s = sigmoid(z).
    torch.manual_seed(0)
    layer = MoELayer(D, 16, E, top_k=E, backend="loop", estimator_args={"renormalize": renormalize},
                     score_function="sigmoid", routed_scaling_factor=2.5)
    values = probe(layer)
    assert values["router_grad_cosine"] == pytest.approx(1.0, abs=1e-5)
    assert values["router_grad_norm_ratio"] == pytest.approx(1.0, abs=1e-5)


def test_dense_reference_equals_brute_force_autograd_of_the_dense_sigmoid_mixture():
    # k = 2 of 4: the estimator differs from the dense reference, which must be the gradient of
    # y = c * sum_i sigmoid(z_i) E_i(x) computed by autograd through every expert (an independent route).
    torch.manual_seed(1)
    layer = MoELayer(D, 16, E, top_k=2, backend="loop", score_function="sigmoid", routed_scaling_factor=2.5).train()
    generator = torch.Generator().manual_seed(0)
    x, target = torch.randn(T, D, generator=generator), torch.randn(T, D, generator=generator)
    z = layer.router(x).detach().requires_grad_(True)
    y = layer(x)
    (grad_y,) = torch.autograd.grad(((torch.tanh(y) - target) ** 2).mean(), y)
    experts = layer.experts
    dense_y = sum(2.5 * torch.sigmoid(z[:, i : i + 1]) * experts.expert_ffn(i, x).detach() for i in range(E))
    (dense_grad,) = torch.autograd.grad(dense_y, z, grad_y)
    z_est = layer.router(x).detach().requires_grad_(True)
    routing = layer.estimator.route(z_est, 2)
    gate_grads = torch.stack([(grad_y[t] * experts.expert_ffn(int(e), x[t : t + 1])[0]).sum()
                              for t, row in enumerate(routing.indices) for e in row]).view(T, 2)
    (estimator_grad,) = torch.autograd.grad(routing.weights, z_est, gate_grads)
    cosine = float(estimator_grad.flatten().double() @ dense_grad.flatten().double()
                   / (estimator_grad.double().norm() * dense_grad.double().norm()))
    assert probe(layer)["router_grad_cosine"] == pytest.approx(cosine, abs=1e-5)


def test_a_recipe_sets_sigmoid_routing_on_the_built_in_model(tmp_path):
    from lightning.pytorch.cli import LightningCLI

    from lightning_moe.data import TextDataModule
    from lightning_moe.layer import moe_layers
    from lightning_moe.module import MoELanguageModel

    recipe = tmp_path / "sigmoid.yaml"
    recipe.write_text(
        "model:\n  d_model: 32\n  n_heads: 2\n  n_layers: 2\n"
        "  moe: {num_experts: 8, top_k: 2, ffn_hidden: 32, estimator: topk, estimator_args: {renormalize: true},\n"
        "        score_function: sigmoid, n_group: 4, topk_group: 2, routed_scaling_factor: 2.5}\n"
        "trainer: {max_steps: 1, logger: false}\n"
    )
    cli = LightningCLI(MoELanguageModel, TextDataModule, run=False,
                       args=["--config", str(recipe), f"--trainer.default_root_dir={tmp_path}"])
    layers = [layer for _, layer in moe_layers(cli.model)]
    assert len(layers) == 2
    for layer in layers:
        assert (layer.scoring.score_function, layer.scoring.n_group, layer.scoring.topk_group) == ("sigmoid", 4, 2)
        assert layer.scoring.routed_scaling_factor == 2.5
        # and it routes so: every gate is 2.5 * a sigmoid score renormalised over the chosen two
        logits = torch.randn(5, 8)
        routing = layer.estimator.route(logits, 2)
        chosen = logits.sigmoid().gather(1, routing.indices)
        torch.testing.assert_close(routing.weights, 2.5 * chosen / chosen.sum(dim=1, keepdim=True))


@pytest.mark.parametrize(
    "flag, line",
    [
        ("--model.moe.score_function=tanh", "error: moe.score_function='tanh' is not valid; choose one of"),
        ("--model.moe.n_group=3", "error: moe.n_group=3 must divide num_experts=4"),
        ("--model.moe.topk_group=2", "error: moe.topk_group=2 must be in [1, n_group=1]"),
        ("--model.moe.routed_scaling_factor=0", "error: moe.routed_scaling_factor must be a finite number > 0"),
    ],
)
def test_bad_scoring_fields_of_a_recipe_are_one_line_errors(flag, line, tmp_path, capsys, monkeypatch):
    from lightning_moe.cli import main

    monkeypatch.chdir(tmp_path)
    tiny = ["--model.d_model=32", "--model.n_heads=2", "--model.n_layers=1", "--model.moe.num_experts=4",
            "--model.moe.ffn_hidden=32", "--trainer.logger=false"]
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(RECIPE), *tiny, flag])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and err[-1].startswith(line), err
