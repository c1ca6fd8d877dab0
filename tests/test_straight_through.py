"""The forward-scale controls of the estimator study: straight-through Top-K, and Default
MoE with a backward-only default term."""

import pytest
import torch

from lightning_moe import MoELayer, available_estimators
from lightning_moe.estimators.default_moe import DefaultMoE
from lightning_moe.estimators.straight_through import StraightThroughTopK
from lightning_moe.estimators.topk import TopK

T, D, E, K = 24, 8, 6, 2


def test_registered():
    assert "straight_through" in available_estimators()


def test_forward_gates_are_one_and_experts_are_the_top_k():
    logits = torch.randn(T, E)
    routing = StraightThroughTopK().train().route(logits, K)
    assert torch.equal(routing.weights, torch.ones(T, K))
    assert torch.equal(routing.indices, logits.softmax(-1).topk(K, dim=-1).indices)
    torch.testing.assert_close(routing.probs, logits.softmax(-1))


def test_router_gradient_is_the_softmax_gates_gradient():
    """dL/dz = sum_j G_j * d pi_{D_j} / dz, the gradient of unrenormalised Top-K's gates."""
    logits = torch.randn(T, E, requires_grad=True)
    upstream = torch.randn(T, K)
    routing = StraightThroughTopK().route(logits, K)
    (grad,) = torch.autograd.grad((routing.weights * upstream).sum(), logits)

    probs = logits.detach().softmax(-1)
    index = routing.indices
    gate = probs.gather(1, index)
    # d pi_D / dz = pi_D (e_D - pi), summed over the chosen slots with weights G_j
    expected = torch.zeros(T, E).scatter_add(1, index, upstream * gate) - (upstream * gate).sum(1, keepdim=True) * probs
    torch.testing.assert_close(grad, expected)

    reference = logits.detach().clone().requires_grad_(True)
    topk = TopK().route(reference, K)
    (topk_grad,) = torch.autograd.grad((topk.weights * upstream).sum(), reference)
    torch.testing.assert_close(grad, topk_grad)


def test_layer_output_is_the_unscaled_sum_of_the_chosen_experts():
    layer = MoELayer(D, 16, E, K, estimator="straight_through", backend="loop")
    x = torch.randn(T, D)
    routing = layer.estimator.route(layer.router(x), K)
    expected, _ = layer.experts(x, routing.indices, torch.ones(T, K))
    torch.testing.assert_close(layer(x), expected)


def test_selection_bias_changes_the_choice_not_the_gates():
    logits = torch.randn(T, E)
    bias = torch.zeros(E)
    bias[0] = 10.0
    routing = StraightThroughTopK().route(logits, K, selection_bias=bias)
    assert (routing.indices == 0).any(dim=1).all()
    assert torch.equal(routing.weights, torch.ones(T, K))


def _default_moe_layer(**estimator_args):
    layer = MoELayer(
        D, 16, E, K, estimator="default_moe", backend="loop", estimator_args={"beta": 0.0, **estimator_args}
    )
    layer.estimator.attach_updater()
    layer.estimator.default_outputs.copy_(torch.randn(E, D))
    return layer


@pytest.mark.parametrize("training", [True, False])
def test_backward_only_defaults_add_no_forward_value(training):
    full, backward_only = _default_moe_layer(), _default_moe_layer(forward_defaults=False)
    backward_only.load_state_dict(full.state_dict())
    full.train(training), backward_only.train(training)
    x = torch.randn(T, D)
    routing = full.estimator.route(full.router(x), K)
    top_k_only, _ = full.experts(x, routing.indices, routing.weights)
    torch.testing.assert_close(backward_only(x), top_k_only)
    assert not torch.allclose(full(x), top_k_only)


def test_backward_only_defaults_keep_the_dense_router_gradient():
    full, backward_only = _default_moe_layer(), _default_moe_layer(forward_defaults=False)
    backward_only.load_state_dict(full.state_dict())
    x, upstream = torch.randn(T, D), torch.randn(T, D)
    grads = []
    for layer in (full, backward_only):
        logits = layer.train().router(x)
        correction = layer.estimator.output_correction(layer.estimator.route(logits, K))
        grads += torch.autograd.grad((correction * upstream).sum(), logits)
    torch.testing.assert_close(grads[0], grads[1])
    assert grads[0].abs().sum() > 0


def test_backward_only_defaults_cost_nothing_without_grad():
    estimator = DefaultMoE(forward_defaults=False)
    estimator.bind(num_experts=E, top_k=K, d_model=D)
    routing = estimator.eval().route(torch.randn(T, E), K)
    with torch.no_grad():
        assert estimator.output_correction(routing) is None
