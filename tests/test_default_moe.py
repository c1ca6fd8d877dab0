"""Default MoE: output and gradient math, the EMA of default outputs, and its callback."""

import copy
import sys
import threading
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_moe import MoELayer
from lightning_moe.callbacks.default_output_ema import DefaultOutputEMA
from lightning_moe.errors import ConfigError
from lightning_moe.estimators.default_moe import DefaultMoE

D, HIDDEN, E = 8, 16, 4


def make_layer(top_k=2, backend="loop", attach=True, **estimator_args):
    layer = MoELayer(D, HIDDEN, E, top_k, estimator="default_moe", backend=backend, estimator_args=estimator_args)
    layer.experts.reset_parameters(std=0.3)
    if attach:
        layer.estimator.attach_updater()
    return layer


def expert_output(layer, e, x_TD):
    """FFN_e(x) from the parameters, by hand (SwiGLU; w1 [E, D, 2F] gate | up, w2 [E, F, D])."""
    ex = layer.experts
    gate, up = ex.w1[e].chunk(2, dim=1)
    return (F.silu(x_TD @ gate) * (x_TD @ up)) @ ex.w2[e]


def softmax_and_topk(layer, x_TD):
    probs_TE = (x_TD @ layer.router.weight.T).softmax(dim=-1)
    return probs_TE, probs_TE.topk(layer.top_k, dim=-1).indices


def expected_step_means(layer, x_TD, weighted=False, normalizer="weight_sum"):
    """Per-expert mean of E_i(x) (or of pi_i E_i(x)) over the pairs routed to i; None if none."""
    probs_TE, indices_TK = softmax_and_topk(layer, x_TD)
    means = []
    with torch.no_grad():
        for e in range(E):
            tokens = (indices_TK == e).any(dim=1).nonzero().squeeze(1)
            if tokens.numel() == 0:
                means.append(None)
                continue
            out = expert_output(layer, e, x_TD[tokens])
            if not weighted:
                means.append(out.mean(dim=0))
                continue
            gate = probs_TE[tokens, e][:, None]
            denominator = gate.sum() if normalizer == "weight_sum" else tokens.numel()
            means.append((gate * out).sum(dim=0) / denominator)
    return means


def fill_defaults(layer):
    with torch.no_grad():
        layer.estimator.default_outputs.copy_(torch.randn(E, D))


def test_all_experts_selected_gives_the_dense_softmax_mixture():
    layer = make_layer(top_k=E)
    fill_defaults(layer)  # must have no effect: no expert is left out
    x = torch.randn(6, D)
    probs_TE, _ = softmax_and_topk(layer, x)
    expected = sum(probs_TE[:, e : e + 1] * expert_output(layer, e, x) for e in range(E))
    torch.testing.assert_close(layer(x), expected)


def test_output_adds_gate_times_default_for_each_unselected_expert():
    layer = make_layer(top_k=1)
    fill_defaults(layer)
    x = torch.randn(5, D)
    probs_TE, indices_TK = softmax_and_topk(layer, x)
    expected = torch.zeros(5, D)
    for t in range(5):
        for e in range(E):
            if e == indices_TK[t, 0]:
                expected[t] += probs_TE[t, e] * expert_output(layer, e, x[t : t + 1])[0]
            else:
                expected[t] += probs_TE[t, e] * layer.estimator.default_outputs[e]
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("top_k", [1, 2])
def test_router_gradient_uses_defaults_through_the_softmax_jacobian(top_k):
    layer = make_layer(top_k=top_k)
    fill_defaults(layer)
    captured = {}

    def keep_logits(module, inputs, logits):
        logits.retain_grad()
        captured["logits"] = logits

    layer.router.register_forward_hook(keep_logits)
    x = torch.randn(7, D)
    grad_y = torch.randn(7, D)
    (layer(x) * grad_y).sum().backward()

    probs_TE, indices_TK = softmax_and_topk(layer, x)
    probs_TE = probs_TE.detach()
    with torch.no_grad():
        # dL/dpi_i: <dL/dy, E_i(x)> for the chosen experts, <dL/dy, Ehat_i> for the others.
        dpi_TE = grad_y @ layer.estimator.default_outputs.T
        for t in range(7):
            for e in indices_TK[t].tolist():
                dpi_TE[t, e] = grad_y[t] @ expert_output(layer, e, x[t : t + 1])[0]
        jacobian_TEE = torch.diag_embed(probs_TE) - probs_TE[:, :, None] * probs_TE[:, None, :]
        expected = (jacobian_TEE @ dpi_TE[:, :, None]).squeeze(-1)
    torch.testing.assert_close(captured["logits"].grad, expected)


def test_expert_gradients_do_not_see_the_default_term():
    default = make_layer(top_k=2)
    fill_defaults(default)
    topk = MoELayer(D, HIDDEN, E, 2, estimator="topk", backend="loop")
    topk.load_state_dict(default.state_dict(), strict=False)
    x, grad_y = torch.randn(9, D), torch.randn(9, D)
    for layer in (default, topk):
        (layer(x) * grad_y).sum().backward()
    for name in ("w1", "w2"):
        torch.testing.assert_close(getattr(default.experts, name).grad, getattr(topk.experts, name).grad)
    # ...while the router's gradient does change.
    assert (default.router.weight.grad - topk.router.weight.grad).abs().max() > 1e-3


def separable_routing(layer):
    """All-positive inputs and a router on which expert E-1 never makes the top-k."""
    with torch.no_grad():
        weight = torch.rand(E, D) + 0.1
        weight[E - 1] = -weight[E - 1]
        layer.router.weight.copy_(weight)


def test_ema_update_matches_the_formula_and_leaves_unrouted_experts_alone():
    layer = make_layer(top_k=2, beta=0.75)
    separable_routing(layer)
    assert torch.equal(layer.estimator.default_outputs, torch.zeros(E, D))  # zero init
    x1, x2 = torch.rand(10, D), torch.rand(6, D)

    layer(x1)
    layer.estimator.update_defaults()
    means = expected_step_means(layer, x1)
    assert means[E - 1] is None
    after_first = layer.estimator.default_outputs.clone()
    for e in range(E - 1):
        torch.testing.assert_close(after_first[e], 0.25 * means[e])
    assert torch.equal(after_first[E - 1], torch.zeros(D))
    assert layer.estimator.default_initialised.tolist() == [True, True, True, False]

    with torch.no_grad():
        layer.estimator.default_outputs[E - 1] = torch.randn(D)
    before = layer.estimator.default_outputs.clone()
    layer(x2)
    layer.estimator.update_defaults()
    means = expected_step_means(layer, x2)
    for e in range(E - 1):
        torch.testing.assert_close(layer.estimator.default_outputs[e], 0.75 * before[e] + 0.25 * means[e])
    assert torch.equal(layer.estimator.default_outputs[E - 1], before[E - 1])


@pytest.mark.parametrize("normalizer", ["weight_sum", "token_count"])
def test_weighted_variant_formula(normalizer):
    layer = make_layer(top_k=2, beta=0.5, weighted=True, weighted_normalizer=normalizer)
    separable_routing(layer)
    fill_defaults(layer)
    before = layer.estimator.default_outputs.clone()
    x = torch.rand(12, D)
    layer(x)
    layer.estimator.update_defaults()
    means = expected_step_means(layer, x, weighted=True, normalizer=normalizer)
    for e in range(E - 1):
        torch.testing.assert_close(layer.estimator.default_outputs[e], 0.5 * before[e] + 0.5 * means[e])
    assert torch.equal(layer.estimator.default_outputs[E - 1], before[E - 1])


def test_the_two_weighted_normalizers_differ():
    layers = [make_layer(weighted=True, weighted_normalizer=n) for n in ("weight_sum", "token_count")]
    layers[1].load_state_dict(layers[0].state_dict())
    x = torch.randn(12, D)
    for layer in layers:
        layer(x)
        layer.estimator.update_defaults()
    seen = layers[0].estimator.default_initialised
    assert seen.any()
    ratio = layers[1].estimator.default_outputs[seen] / layers[0].estimator.default_outputs[seen]
    assert (ratio < 1).all()  # dividing by the count shrinks each default by the mean gate


def test_eval_neither_records_nor_updates_and_uses_frozen_defaults_if_asked():
    layer = make_layer(top_k=1)
    fill_defaults(layer)
    before = layer.estimator.default_outputs.clone()
    x = torch.randn(5, D)
    layer.eval()
    y_with = layer(x)
    layer.estimator.update_defaults()
    assert torch.equal(layer.estimator.default_outputs, before)

    layer.estimator.use_defaults_in_eval = False
    y_without = layer(x)
    probs_TE, indices_TK = softmax_and_topk(layer, x)
    unselected_TE = probs_TE.scatter(1, indices_TK, 0.0)
    torch.testing.assert_close(y_with - y_without, unselected_TE @ before)


@pytest.mark.parametrize(("weighted", "normalizer"), [(False, "weight_sum"), (True, "weight_sum"), (True, "token_count")])
def test_micro_batches_and_ranks_give_the_same_update_as_one_batch(weighted, normalizer):
    whole = make_layer(top_k=2, beta=0.6, weighted=weighted, weighted_normalizer=normalizer)
    fill_defaults(whole)
    accumulated = copy.deepcopy(whole)
    ranks = [copy.deepcopy(whole), copy.deepcopy(whole)]
    x = torch.randn(17, D)
    parts = (x[:4], x[4:])  # unequal sizes: a mean of per-micro-batch means would differ

    whole(x)
    whole.estimator.update_defaults()
    for part in parts:
        accumulated(part)
    accumulated.estimator.update_defaults()
    for rank, part in zip(ranks, parts):
        rank(part)

    # Two "ranks" whose reduce sums their tensors, like an all-reduce.
    barrier, shared = threading.Barrier(2), [None, None]

    def update(r):
        def reduce(t):
            shared[r] = t.clone()
            barrier.wait()
            return shared[0] + shared[1]

        ranks[r].estimator.update_defaults(reduce=reduce)

    threads = [threading.Thread(target=update, args=(r,)) for r in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    expected = whole.estimator.default_outputs
    assert not torch.allclose(expected, ranks[0].estimator.default_outputs.new_zeros(E, D))
    for layer in (accumulated, *ranks):
        torch.testing.assert_close(layer.estimator.default_outputs, expected)
    assert torch.equal(ranks[0].estimator.default_outputs, ranks[1].estimator.default_outputs)


def test_accumulators_reset_after_each_update():
    layer = make_layer()
    fill_defaults(layer)
    layer(torch.randn(5, D))
    layer.estimator.update_defaults()
    after = layer.estimator.default_outputs.clone()
    layer.estimator.update_defaults()  # nothing observed since: nothing changes
    assert torch.equal(layer.estimator.default_outputs, after)


@pytest.mark.parametrize("top_k", [1, 2])
def test_loop_and_torch_backends_agree(top_k):
    loop = make_layer(top_k=top_k, backend="loop")
    fill_defaults(loop)
    grouped = make_layer(top_k=top_k, backend="torch")
    grouped.load_state_dict(loop.state_dict())
    x, grad_y = torch.randn(11, D), torch.randn(11, D)
    outputs = []
    for layer in (loop, grouped):
        y = layer(x)
        (y * grad_y).sum().backward()
        layer.estimator.update_defaults()
        outputs.append(y)
    torch.testing.assert_close(outputs[0], outputs[1])
    for (name, p_loop), p_grouped in zip(loop.named_parameters(), grouped.parameters()):
        torch.testing.assert_close(p_loop.grad, p_grouped.grad, msg=name)
    torch.testing.assert_close(loop.estimator.default_outputs, grouped.estimator.default_outputs)


def test_bad_arguments_name_the_field():
    with pytest.raises(ValueError, match="renormalize"):
        DefaultMoE(renormalize=True)
    with pytest.raises(ValueError, match="renormalize"):
        MoELayer(D, HIDDEN, E, 2, estimator="default_moe", estimator_args={"renormalize": True})
    for beta in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="beta"):
            DefaultMoE(beta=beta)
    with pytest.raises(ValueError, match="weighted_normalizer"):
        DefaultMoE(weighted=True, weighted_normalizer="mean")
    with pytest.raises(ValueError, match="beta"):
        DefaultOutputEMA(beta=1.0)


def test_training_without_an_updater_fails_loudly_but_eval_and_no_grad_do_not():
    layer = make_layer(attach=False)
    x = torch.randn(4, D)
    with pytest.raises(ConfigError, match="DefaultOutputEMA"):
        layer(x)
    with torch.no_grad():
        layer(x)
    layer.eval()
    layer(x)
    layer.train()
    layer.estimator.attach_updater()
    layer(x).sum().backward()


def test_telemetry_reports_default_norm_and_initialised_share():
    layer = make_layer(top_k=1)
    separable_routing(layer)
    routing = layer.estimator.route(layer.router(torch.rand(3, D)), 1)
    assert routing.telemetry["defaults_initialised_fraction"].item() == 0.0
    assert routing.telemetry["default_output_norm"].item() == 0.0
    layer(torch.rand(8, D))
    layer.estimator.update_defaults()
    routing = layer.estimator.route(layer.router(torch.rand(3, D)), 1)
    initialised = layer.estimator.default_initialised.float().mean()
    assert 0 < initialised.item() < 1
    torch.testing.assert_close(routing.telemetry["defaults_initialised_fraction"], initialised)
    torch.testing.assert_close(
        routing.telemetry["default_output_norm"], layer.estimator.default_outputs.norm(dim=1).mean()
    )


class TinyMoEModule(L.LightningModule):
    def __init__(self, estimator_args=None):
        super().__init__()
        self.moe = MoELayer(D, HIDDEN, E, 2, estimator="default_moe", backend="loop", estimator_args=estimator_args)
        self.moe.experts.reset_parameters(std=0.3)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return (self.moe(x) - x).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        (x,) = batch
        self.log("val_loss", (self.moe(x) - x).pow(2).mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit_quietly(module, *loaders, callbacks=None, **trainer_args):
    """``Trainer.fit`` on CPU with no logger, checkpoints or progress output."""
    trainer = L.Trainer(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        callbacks=callbacks or [DefaultOutputEMA()],
        **trainer_args,
    )
    trainer.fit(module, *loaders)
    return trainer


def test_trainer_updates_once_per_optimizer_step_over_all_micro_batches():
    model = TinyMoEModule()
    estimator = model.moe.estimator
    update = estimator.update_defaults
    normaliser_totals = []

    def counting_update(reduce=None):
        def recording_reduce(t):
            t = reduce(t) if reduce is not None else t
            normaliser_totals.append(t[:, -1].sum().item())
            return t

        update(reduce=recording_reduce)

    estimator.update_defaults = counting_update
    batch = 5
    data = DataLoader(TensorDataset(torch.randn(batch * 6, D)), batch_size=batch)
    val_data = DataLoader(TensorDataset(torch.randn(batch, D)), batch_size=batch)
    fit_quietly(
        model, data, val_data, max_steps=3, accumulate_grad_batches=2, num_sanity_val_steps=1, limit_val_batches=1
    )
    # 3 updates, each over the (token, slot) pairs of both micro-batches of its step.
    assert normaliser_totals == [2 * batch * 2] * 3
    assert estimator.default_initialised.any()
    assert estimator.default_outputs.abs().sum() > 0
    assert "default_output_norm" in model.moe.routing_stats.telemetry  # logged by RoutingMonitor
    # The callback lets go after fit: training on without an updater fails loudly again.
    assert not estimator.updater_attached
    with pytest.raises(ConfigError, match="DefaultOutputEMA"):
        model.moe(torch.randn(2, D))


def test_callback_overrides_beta_and_weighted():
    model = TinyMoEModule()
    data = DataLoader(TensorDataset(torch.randn(4, D)), batch_size=4)
    fit_quietly(model, data, max_steps=1, callbacks=[DefaultOutputEMA(beta=0.5, weighted=True)])
    assert model.moe.estimator.beta == 0.5 and model.moe.estimator.weighted


class ShardedMoEModule(TinyMoEModule):
    """Rank r of W trains on samples r, r + W, ... in order, ``global_batch`` samples per
    optimizer step over all ranks and micro-batches; saves its defaults to ``out_dir``."""

    def __init__(self, data, global_batch, out_dir):
        super().__init__()
        self.data, self.global_batch, self.out_dir = data, global_batch, out_dir

    def train_dataloader(self):
        world = self.trainer.world_size
        shard = self.data[self.global_rank :: world]
        micro_batch = self.global_batch // (world * self.trainer.accumulate_grad_batches)
        return DataLoader(TensorDataset(shard), batch_size=micro_batch)

    def on_train_end(self):
        torch.save(self.moe.estimator.default_outputs.clone(), f"{self.out_dir}/rank{self.global_rank}.pt")


@pytest.mark.skipif(sys.platform == "win32", reason="ddp_fork needs fork")
def test_ddp_ranks_hold_identical_defaults_equal_to_one_process(tmp_path):
    if torch.cuda.is_initialized():
        pytest.skip("ddp_fork cannot start once CUDA is initialised in this process")
    model = ShardedMoEModule(torch.randn(3 * 8, D), global_batch=8, out_dir=str(tmp_path / "single"))
    ddp_model = copy.deepcopy(model)
    ddp_model.out_dir = str(tmp_path / "ddp")
    # One process with one batch of 8 per step vs 2 ranks x 2 micro-batches of 2 per step.
    for module, devices, strategy, accumulate in ((model, 1, "auto", 1), (ddp_model, 2, "ddp_fork", 2)):
        Path(module.out_dir).mkdir()
        fit_quietly(
            module,
            max_steps=3,
            devices=devices,
            strategy=strategy,
            accumulate_grad_batches=accumulate,
            use_distributed_sampler=False,
        )
    expected = torch.load(tmp_path / "single" / "rank0.pt")
    ranks = [torch.load(tmp_path / "ddp" / f"rank{r}.pt") for r in range(2)]
    assert expected.abs().mean() > 1e-2
    assert torch.equal(ranks[0], ranks[1])
    torch.testing.assert_close(ranks[0], expected, rtol=1e-4, atol=1e-5)


def test_language_model_adds_the_ema_callback_itself(tmp_path):
    from lightning_moe.callbacks import DefaultOutputEMA
    from lightning_moe.module import MoELanguageModel

    model = MoELanguageModel(
        d_model=32, n_heads=2, n_layers=1, moe={"num_experts": 4, "top_k": 2, "estimator": "default_moe"}
    )
    tokens = torch.randint(0, 258, (6, 17))
    batches = DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=2)
    trainer = L.Trainer(
        max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path
    )
    trainer.fit(model, batches)  # would raise "no updater" without the callback
    assert any(isinstance(c, DefaultOutputEMA) for c in trainer.callbacks)
    assert model.model.moe_layers()[0].estimator.default_outputs.abs().sum() > 0
