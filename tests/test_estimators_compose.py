"""Every registered estimator composes with every CPU backend, several k, and bf16 autocast."""

import pytest
import torch

from lightning_moe import MoELayer, available_estimators


def build(estimator, backend, top_k):
    args = {"jitter_eps": 0.5} if estimator.startswith("sparsemixer") else {}  # most tokens keep a gradient
    layer = MoELayer(16, 32, num_experts=4, top_k=top_k, estimator=estimator, backend=backend, estimator_args=args)
    if hasattr(layer.estimator, "attach_updater"):
        layer.estimator.attach_updater()
    return layer


def allowed_top_k(estimator):
    return [1] if estimator == "sparsemixer" else [1, 2, 4]


CASES = [(name, k) for name in available_estimators() for k in allowed_top_k(name)]


@pytest.mark.parametrize("estimator,top_k", CASES)
def test_backends_agree_for_every_estimator(estimator, top_k):
    torch.manual_seed(0)
    reference = build(estimator, "loop", top_k)
    other = build(estimator, "torch", top_k)
    other.load_state_dict(reference.state_dict())
    x = torch.randn(2, 9, 16)
    results = []
    for layer in (reference, other):
        torch.manual_seed(1)  # same Gumbel samples, coins and jitter in both runs
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        y.backward(torch.linspace(-1, 1, y.numel()).reshape(y.shape))
        grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
        results.append((y.detach(), xi.grad, grads))
    (y0, gx0, g0), (y1, gx1, g1) = results
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx1, gx0, rtol=1e-5, atol=1e-6)
    assert g0["router.weight"].abs().sum() > 0, "the router got no gradient at all"
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("estimator", available_estimators())
def test_bf16_autocast_keeps_routing_in_float32(estimator):
    layer = build(estimator, "torch", 1 if estimator == "sparsemixer" else 2)
    seen = {}
    original = layer.estimator.route

    def spy(logits, top_k, **kwargs):
        routing = original(logits, top_k, **kwargs)
        seen.update(logits=logits.dtype, weights=routing.weights.dtype)
        return routing

    layer.estimator.route = spy
    x = torch.randn(8, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y.float().sum().backward()
    assert seen == {"logits": torch.float32, "weights": torch.float32}
    assert torch.isfinite(x.grad).all() and layer.router.weight.grad is not None
