"""Activation checkpointing around MoE layers: gradients as without it, statistics recorded once.

Checkpointing recomputes a forward inside backward. Whatever the layer records in a
training forward (routing statistics, Default MoE's output sums, the counts that move
the aux-loss-free bias, aux-loss values) must be recorded by exactly one of the two
forwards, and the recompute must rebuild exactly the autograd graph of the original
(non-reentrant checkpointing checks the saved-tensor count). The references are the
same layer or model run without checkpointing and hand-counted token numbers.
"""

import copy

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from lightning_moe import MoELayer, available_estimators
from lightning_moe.errors import ConfigError
from lightning_moe.model import MoETransformer, TransformerConfig

from helpers import FakeKernels, use_fake_kernels

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
    if hasattr(layer.estimator, "_step_sums_EC"):  # Default MoE: the step's output sums | token counts
        sums, ref_sums = layer.estimator._step_sums_EC, reference.estimator._step_sums_EC
        assert sums[:, -1].sum().item() == num_tokens * layer.top_k
        torch.testing.assert_close(sums, ref_sums)


@pytest.mark.parametrize("backend", [*CPU_BACKENDS, "megablocks"])
def test_non_reentrant_checkpoint_of_default_moe_runs_and_matches(monkeypatch, backend):
    if backend == "megablocks":
        use_fake_kernels(monkeypatch, FakeKernels())
    layer = prepare(MoELayer(D, 16, E, 2, estimator="default_moe", backend=backend)).train()
    reference = copy.deepcopy(layer)
    x = torch.randn(12, D)
    ref_grads = run_layer(reference, x, None)
    grads = run_layer(layer, x, "non_reentrant")
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
    with pytest.raises(RuntimeError, match="DefaultOutputEMA"):
        checkpoint(layer, x, use_reentrant=True)
