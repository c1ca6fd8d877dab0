"""Activation checkpointing around MoE layers: gradients as without it, statistics recorded once.

Checkpointing recomputes a forward inside backward. Whatever the layer records in a
training forward (routing statistics, Default MoE's output sums, the counts that move
the aux-loss-free bias, aux-loss values) must be recorded by exactly one of the two
forwards, and the recompute must rebuild exactly the autograd graph of the original
(non-reentrant checkpointing checks the saved-tensor count). The references are the
same layer or model run without checkpointing and hand-counted token numbers.
"""

import copy

import lightning as L
import pytest
import torch
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_moe import MoELayer, available_estimators
from lightning_moe.callbacks import AuxLossFreeBalancing, LoadBalancingLoss, RoutingMonitor
from lightning_moe.errors import ConfigError
from lightning_moe.model import MoETransformer, TransformerConfig
from lightning_moe.module import MoELanguageModel

from helpers import FakeKernels, fit_quietly, use_fake_kernels

D, E = 8, 4
MODES = ("non_reentrant", "reentrant")
CPU_BACKENDS = ("loop", "torch")


def top_k_for(estimator: str) -> int:
    return 1 if estimator == "sparsemixer" else 2  # SparseMixer v1 is top-1 only


def prepare(layer: MoELayer) -> MoELayer:
    """Default MoE with non-zero defaults (so they reach the router) and an updater declared."""
    if hasattr(layer.estimator, "attach_updater"):
        layer.estimator.attach_updater()
        with torch.no_grad():
            layer.estimator.default_outputs.normal_()
    if layer.estimator.supports_selection_bias:
        layer.use_selection_bias = True
        with torch.no_grad():
            layer.selection_bias.copy_(torch.linspace(-0.2, 0.2, layer.num_experts))
    return layer


def run_layer(layer: MoELayer, x: torch.Tensor, mode: str | None):
    """Forward + backward with a fixed output gradient; (x.grad, parameter grads)."""
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(1)  # the sampling estimators draw the same routing in every run
    y = layer(x) if mode is None else checkpoint(layer, x, use_reentrant=mode == "reentrant")
    y.backward(torch.linspace(-1, 1, y.numel()).reshape(y.shape))
    return x.grad, {name: p.grad for name, p in layer.named_parameters() if p.grad is not None}


def assert_recorded_once(layer: MoELayer, reference: MoELayer, num_tokens: int) -> None:
    """One forward's record, equal to the record of the run without checkpointing."""
    stats, ref = layer.routing_stats, reference.routing_stats
    assert stats.num_forwards == 1 and stats.num_tokens == num_tokens
    assert stats.tokens_per_expert.sum().item() == num_tokens * layer.top_k
    for name in ("tokens_per_expert", "probs_sum", "token_entropy_sum", "gate_sum", "logit_norm_sum"):
        torch.testing.assert_close(getattr(stats, name), getattr(ref, name), msg=name)
    assert stats.aux_losses.keys() == ref.aux_losses.keys()
    for name in stats.aux_losses:
        torch.testing.assert_close(stats.aux_losses[name], ref.aux_losses[name], msg=name)
    if hasattr(layer.estimator, "_step_sums_EC"):  # Default MoE: the step's output sums | normalisers
        sums, ref_sums = layer.estimator._step_sums_EC, reference.estimator._step_sums_EC
        if not layer.estimator.weighted:  # the normalisers are token counts
            assert sums[:, -1].sum().item() == num_tokens * layer.top_k
        torch.testing.assert_close(sums, ref_sums)
    # The non-finite check (for NonFiniteGuard) ran in the recorded forward.
    assert layer.nonfinite is not None and torch.equal(layer.nonfinite, reference.nonfinite)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", [*CPU_BACKENDS, "megablocks"])
def test_checkpoint_of_default_moe_runs_and_matches(monkeypatch, backend, mode, weighted):
    if backend == "megablocks":
        use_fake_kernels(monkeypatch, FakeKernels())
    estimator_args = {"weighted": weighted}
    layer = MoELayer(D, 16, E, 2, estimator="default_moe", backend=backend, estimator_args=estimator_args)
    layer = prepare(layer).train()
    reference = copy.deepcopy(layer)
    x = torch.randn(12, D)
    ref_grads = run_layer(reference, x, None)
    grads = run_layer(layer, x, mode)
    torch.testing.assert_close(grads, ref_grads)
    assert_recorded_once(layer, reference, 12)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("estimator", available_estimators())
def test_checkpointed_layer_has_plain_gradients_and_one_record(estimator, backend, mode):
    torch.manual_seed(0)
    layer = MoELayer(D, 16, E, top_k_for(estimator), estimator=estimator, backend=backend, input_jitter=0.05)
    layer = prepare(layer).train()
    layer.aux_losses["z"] = lambda routing, logits_TE, tokens_E: logits_TE.logsumexp(-1).square().mean()
    reference = copy.deepcopy(layer)
    x = torch.randn(10, D)
    ref_grads = run_layer(reference, x, None)
    grads = run_layer(layer, x, mode)
    torch.testing.assert_close(grads, ref_grads)
    assert_recorded_once(layer, reference, 10)


def test_reentrant_checkpoint_without_an_updater_fails_in_forward():
    layer = MoELayer(D, 16, E, 2, estimator="default_moe", backend="loop").train()
    x = torch.randn(6, D, requires_grad=True)
    with pytest.raises(Exception, match="DefaultOutputEMA") as plain:
        layer(x)
    with pytest.raises(plain.type, match="DefaultOutputEMA"):  # the same error, before any backward
        checkpoint(layer, x, use_reentrant=True)


# --- the model option: MoETransformer / MoELanguageModel(activation_checkpointing=...) ---


def tiny_config(estimator: str, backend: str, activation_checkpointing=False) -> TransformerConfig:
    moe = {"num_experts": E, "top_k": top_k_for(estimator), "estimator": estimator, "backend": backend}
    moe["input_jitter"] = 0.05
    return TransformerConfig(
        vocab_size=32, d_model=D, n_layers=2, n_heads=2, max_seq_len=8, ffn_hidden=16, moe=moe,
        activation_checkpointing=activation_checkpointing,
    )


def run_model(model: MoETransformer, input_ids: torch.Tensor) -> dict:
    torch.manual_seed(1)
    model(input_ids).float().square().mean().backward()
    return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("estimator", available_estimators())
def test_checkpointed_transformer_has_plain_gradients_and_one_record(estimator, backend, mode):
    torch.manual_seed(0)
    reference = MoETransformer(tiny_config(estimator, backend))
    for layer in reference.moe_layers():
        prepare(layer)
    model = MoETransformer(tiny_config(estimator, backend, activation_checkpointing=mode))
    model.load_state_dict(reference.state_dict())
    for layer, ref_layer in zip(model.moe_layers(), reference.moe_layers()):
        layer.use_selection_bias = ref_layer.use_selection_bias
        if hasattr(layer.estimator, "attach_updater"):
            layer.estimator.attach_updater()
    input_ids = torch.randint(0, 32, (2, 8))
    ref_grads = run_model(reference.train(), input_ids)
    grads = run_model(model.train(), input_ids)
    assert grads.keys() == ref_grads.keys()
    torch.testing.assert_close(grads, ref_grads)
    for layer, ref_layer in zip(model.moe_layers(), reference.moe_layers()):
        assert_recorded_once(layer, ref_layer, 16)


def test_checkpointing_recomputes_each_block_in_backward():
    """The option really checkpoints: each block's forward runs again during backward."""
    for mode, forwards in ((False, 1), ("non_reentrant", 2), ("reentrant", 2), (True, 2)):
        model = MoETransformer(tiny_config("topk", "loop", activation_checkpointing=mode)).train()
        calls = []
        model.blocks[0].attn.register_forward_hook(lambda *_: calls.append(1))
        model(torch.randint(0, 32, (2, 8))).sum().backward()
        assert len(calls) == forwards, mode
        calls.clear()
        with torch.no_grad():  # nothing to recompute without a backward
            model(torch.randint(0, 32, (2, 8)))
        assert len(calls) == 1


@pytest.mark.parametrize("value", ["yes", "full", 1, "Reentrant"])
def test_bad_activation_checkpointing_value_names_the_field(value):
    with pytest.raises(ConfigError, match="activation_checkpointing"):
        tiny_config("topk", "loop", activation_checkpointing=value)


class StepCounts(L.Callback):
    """Per optimizer step and MoE layer: the tokens and (token, slot) pairs the callbacks will read."""

    def __init__(self):
        self.steps = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        record = []
        for layer in pl_module.model.moe_layers():
            stats = layer.routing_stats
            sums = getattr(layer.estimator, "_step_sums_EC", None)
            pairs_in_sums = None if sums is None else sums[:, -1].sum().item()
            record.append((stats.num_tokens, stats.tokens_per_expert.sum().item(), pairs_in_sums))
        self.steps.append(record)


def fit_language_model(estimator: str, mode):
    """Two optimizer steps of two micro-batches each, with the router callbacks that fit the estimator."""
    L.seed_everything(0)
    model = MoELanguageModel(
        vocab_size=32, d_model=D, n_layers=2, n_heads=2, max_seq_len=8, ffn_hidden=16, warmup_steps=0,
        moe={"num_experts": E, "top_k": top_k_for(estimator), "estimator": estimator, "backend": "torch"},
        activation_checkpointing=mode,
    )
    counts, monitor = StepCounts(), RoutingMonitor(log_every_n_steps=1000)
    callbacks = [counts, monitor, LoadBalancingLoss(alpha=0.1)]  # the model adds DefaultOutputEMA itself
    if all(layer.estimator.supports_selection_bias for layer in model.model.moe_layers()):
        callbacks.append(AuxLossFreeBalancing(gamma=0.01))
    ids = torch.randint(0, 32, (8, 8))
    data = DataLoader(TensorDataset(ids, ids.roll(-1, dims=1)), batch_size=2)
    fit_quietly(model, data, callbacks, max_steps=2, accumulate_grad_batches=2)
    monitor_sums = {tag: metric.sums() for tag, metric in monitor._metrics.items()}
    return model.state_dict(), counts.steps, monitor_sums


@pytest.mark.parametrize("estimator", available_estimators())
def test_fit_with_checkpointing_equals_fit_without_and_counts_each_token_once(estimator):
    reference = fit_language_model(estimator, False)
    tokens, pairs = 2 * 2 * 8, 2 * 2 * 8 * top_k_for(estimator)  # per step: 2 micro-batches of [2, 8]
    for mode in MODES:
        state, steps, monitor_sums = fit_language_model(estimator, mode)
        torch.testing.assert_close(state, reference[0], msg=mode)  # parameters, selection bias, defaults
        assert steps == reference[1]
        for record in steps:
            for num_tokens, num_pairs, pairs_in_sums in record:
                assert (num_tokens, num_pairs) == (tokens, pairs)
                assert pairs_in_sums in (None, pairs)
        assert monitor_sums == reference[2]
        for sums in monitor_sums.values():
            assert sums["num_tokens"] == 2 * tokens and sum(sums["tokens_per_expert"]) == 2 * pairs
