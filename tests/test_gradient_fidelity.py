"""RouterGradientFidelity: the estimator's router gradient against the dense mixture's."""

import csv

import lightning as L
import pytest
import torch
from helpers import fit_quietly
from torch import nn

from lightning_moe import MoELayer
from lightning_moe.callbacks import RouterGradientFidelity
from lightning_moe.callbacks.gradient_fidelity import router_gradient_fidelity
from lightning_moe.experts import ExpertStats
from lightning_moe.module import MoELanguageModel

D, E, T = 12, 4, 96


class TwoLayers(nn.Module):
    def __init__(self, top_k: int, estimator: str = "topk", **estimator_args):
        super().__init__()
        self.first = MoELayer(D, 16, E, top_k, estimator=estimator, backend="loop", estimator_args=estimator_args)
        self.second = MoELayer(D, 16, E, top_k, estimator=estimator, backend="torch", estimator_args=estimator_args)

    def forward(self, x):
        h = x + self.first(x)
        return h + self.second(torch.tanh(h))


def _probe(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> dict:
    results = router_gradient_fidelity(model, lambda: ((model(x) - target) ** 2).mean())
    return {tag: {name: float(value) for name, value in values.items()} for tag, values in results.items()}


def test_exact_when_every_expert_is_used():
    model = TwoLayers(top_k=E).train()
    results = _probe(model, torch.randn(T, D), torch.randn(T, D))
    assert set(results) == {"layer_00", "layer_01"}
    for values in results.values():
        assert values["router_grad_cosine"] == pytest.approx(1.0, abs=1e-5)
        assert values["router_grad_norm_ratio"] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize(
    "estimator, args",
    [("topk", {}), ("topk", {"renormalize": True}), ("straight_through", {}), ("sparsemixer_v2", {"jitter_eps": 0.1})],
)
def test_sparse_estimators_are_not_exact(estimator, args):
    model = TwoLayers(top_k=2, estimator=estimator, **args).train()
    for values in _probe(model, torch.randn(T, D), torch.randn(T, D)).values():
        assert values["router_grad_cosine"] < 0.999


class ConstantExperts(nn.Module):
    """Expert i outputs the same vector c_i for every input (the experts-backend interface)."""

    def __init__(self):
        super().__init__()
        self.values = nn.Parameter(torch.randn(E, D))

    def forward(self, x_TD, indices_TK, weights_TK, return_output_sums=False):
        out_TKD = self.values[indices_TK]
        y_TD = (weights_TK.unsqueeze(-1) * out_TKD).sum(dim=1) + 0.0 * x_TD
        tokens = torch.bincount(indices_TK.reshape(-1), minlength=E)
        stats = ExpertStats(tokens_per_expert=tokens)
        if return_output_sums:
            flat = out_TKD.detach().reshape(-1, D)
            weighted = flat * weights_TK.detach().reshape(-1, 1)
            index = indices_TK.reshape(-1)
            stats = ExpertStats(
                tokens_per_expert=tokens,
                output_sum=torch.zeros(E, D).index_add_(0, index, flat),
                weighted_output_sum=torch.zeros(E, D).index_add_(0, index, weighted),
            )
        return y_TD, stats


def _constant_default_moe(**estimator_args) -> TwoLayers:
    model = TwoLayers(top_k=2, estimator="default_moe", beta=0.0, **estimator_args).train()
    for layer in (model.first, model.second):
        layer.experts = ConstantExperts()
        layer.estimator.attach_updater()
    return model


@pytest.mark.parametrize("weighted", [False, True])
def test_default_moe_is_exact_with_constant_experts_after_one_update_at_beta_zero(weighted):
    model = _constant_default_moe(weighted=weighted)
    x, target = torch.randn(T, D), torch.randn(T, D)
    before = _probe(model, x, target)  # defaults still zero: not exact
    assert all(v["router_grad_cosine"] < 0.999 for v in before.values())

    model(x)  # one recorded training forward, then the EMA update (beta 0: defaults = the outputs)
    for layer in (model.first, model.second):
        assert layer.routing_stats.tokens_per_expert.min() > 0, "every expert needs tokens for the check"
        layer.estimator.update_defaults()
    for values in _probe(model, x, target).values():
        assert values["router_grad_cosine"] == pytest.approx(1.0, abs=1e-5)
        assert values["router_grad_norm_ratio"] == pytest.approx(1.0, abs=1e-5)


def test_the_probe_changes_nothing():
    model = TwoLayers(top_k=2, estimator="default_moe", weighted=True).train()
    for layer in (model.first, model.second):
        layer.estimator.attach_updater()
    x, target = torch.randn(T, D), torch.randn(T, D)
    model(x)  # a recorded forward whose statistics the probe must leave alone
    stats = [layer.routing_stats for layer in (model.first, model.second)]
    counts = [s.tokens_per_expert.clone() for s in stats]
    pending = [layer.estimator._step_sums_EC.clone() for layer in (model.first, model.second)]
    rng = torch.get_rng_state()
    _probe(model, x, target)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())
    for layer, before, count, sums in zip((model.first, model.second), stats, counts, pending):
        assert layer.routing_stats is before and before.num_forwards == 1
        assert torch.equal(before.tokens_per_expert, count)
        assert torch.equal(layer.estimator._step_sums_EC, sums)
        assert layer.training and not layer.aux_losses and layer.token_labels is None


class RandomTokens(L.LightningDataModule):
    def train_dataloader(self):
        data = torch.randint(0, 258, (32, 17), generator=torch.Generator().manual_seed(0))
        return torch.utils.data.DataLoader(list(zip(data[:, :-1], data[:, 1:])), batch_size=4)


def _fit(tmp_path, callbacks):
    torch.manual_seed(0)
    model = MoELanguageModel(
        d_model=16,
        n_heads=2,
        n_layers=2,
        max_seq_len=16,
        warmup_steps=1,
        moe={
            "num_experts": 4,
            "top_k": 2,
            "ffn_hidden": 16,
            "estimator": "sparsemixer_v2",
            "estimator_args": {"jitter_eps": 0.1},
        },
    )
    logger = L.pytorch.loggers.CSVLogger(tmp_path)
    fit_quietly(
        model, RandomTokens(), callbacks, max_steps=4, log_every_n_steps=2, logger=logger, default_root_dir=tmp_path
    )
    return model


def test_callback_logs_on_its_steps_and_does_not_change_training(tmp_path):
    probed = _fit(tmp_path / "probed", [RouterGradientFidelity(every_n_steps=2)])
    plain = _fit(tmp_path / "plain", [])
    for a, b in zip(probed.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with open(next((tmp_path / "probed").rglob("metrics.csv"))) as handle:
        rows = list(csv.DictReader(handle))
    logged = {int(r["step"]) for r in rows if r.get("moe/layer_01/router_grad_cosine")}
    assert logged == {1, 3}
    for row in rows:
        if row.get("moe/layer_00/router_grad_cosine"):
            assert -1.0 <= float(row["moe/layer_00/router_grad_cosine"]) <= 1.0
            assert float(row["moe/layer_00/router_grad_norm_ratio"]) > 0


def test_argument_checks():
    with pytest.raises(ValueError, match="every_n_steps"):
        RouterGradientFidelity(every_n_steps=0)
