"""MoELayer behaviour: shapes, statistics recording rules, estimator registry, bad input."""

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from lightning_moe import ESTIMATOR_REGISTRY, Estimator, MoELayer, Routing, available_estimators
from lightning_moe.estimators import EstimatorRegistry
from lightning_moe.estimators.topk import TopK


def test_forward_keeps_shape_and_records_stats_in_training_only():
    layer = MoELayer(d_model=16, ffn_hidden=32, num_experts=4, top_k=2)
    x = torch.randn(3, 5, 16)
    y = layer(x)
    assert y.shape == x.shape
    stats = layer.routing_stats
    assert stats.num_forwards == 1 and stats.num_tokens == 15
    assert stats.tokens_per_expert.sum().item() == 30  # every (token, slot) pair counted
    torch.testing.assert_close(stats.probs_sum.sum(), torch.tensor(15.0))
    layer.eval()
    layer(x)
    assert layer.routing_stats.num_forwards == 1


def test_stats_hold_no_autograd_graph_and_reset_after_finish_step():
    layer = MoELayer(16, 32, 4, 2)
    layer(torch.randn(4, 16)).sum().backward()
    layer(torch.randn(6, 16)).sum().backward()
    stats = layer.routing_stats
    assert stats.num_tokens == 10
    for value in (stats.tokens_per_expert, stats.probs_sum, stats.token_entropy_sum, stats.gate_sum):
        assert value.grad_fn is None and not value.requires_grad
    layer.finish_step()
    assert layer.routing_stats.num_tokens == 10  # still readable until the next forward
    layer(torch.randn(2, 16))
    assert layer.routing_stats.num_tokens == 2


def test_no_recording_during_activation_checkpoint_recompute():
    layer = MoELayer(16, 32, 4, 2)
    x = torch.randn(8, 16, requires_grad=True)
    y = checkpoint(layer, x, use_reentrant=False)
    assert layer.routing_stats.num_forwards == 1
    y.sum().backward()  # recomputes the forward inside backward
    assert layer.routing_stats.num_forwards == 1
    assert x.grad is not None


def test_checkpointed_gradients_equal_plain_gradients():
    torch.manual_seed(3)
    layer = MoELayer(16, 32, 4, 2, input_jitter=0.1)  # random jitter must replay identically
    x = torch.randn(8, 16, requires_grad=True)
    torch.manual_seed(7)
    layer(x).square().sum().backward()
    plain = x.grad.clone()
    x.grad = None
    torch.manual_seed(7)
    checkpoint(layer, x, use_reentrant=False).square().sum().backward()
    torch.testing.assert_close(x.grad, plain)


def test_router_runs_in_float32_under_bf16_autocast():
    layer = MoELayer(16, 32, 4, 2)
    seen = {}
    layer.router.register_forward_hook(lambda m, i, out: seen.update(dtype=out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(torch.randn(4, 16))
    assert seen["dtype"] == torch.float32
    assert y.dtype == torch.bfloat16


def test_topk_weights_are_softmax_of_router_logits():
    layer = MoELayer(8, 8, 5, top_k=2, estimator="topk").eval()
    x = torch.randn(6, 8)
    logits = x @ layer.router.weight.T
    probs = logits.softmax(-1)
    routing = layer.estimator.route(logits, 2)
    expected_w, expected_i = probs.sort(dim=-1, descending=True)
    assert torch.equal(routing.indices, expected_i[:, :2])
    torch.testing.assert_close(routing.weights, expected_w[:, :2])
    renorm = TopK(renormalize=True).route(logits, 2)
    torch.testing.assert_close(renorm.weights, expected_w[:, :2] / expected_w[:, :2].sum(-1, keepdim=True))


def test_topk_k1_with_one_expert_is_a_dense_ffn():
    layer = MoELayer(8, 16, 1, top_k=1, backend="torch")
    x = torch.randn(5, 8)
    ex = layer.experts
    gate, up = ex.w1[0].chunk(2, dim=1)
    expected = (torch.nn.functional.silu(x @ gate) * (x @ up)) @ ex.w2[0]
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"top_k": 5}, "top_k"),
        ({"top_k": 0}, "top_k"),
        ({"num_experts": 0}, "num_experts"),
        ({"d_model": -1}, "d_model"),
        ({"estimator": "nope"}, "estimator='nope'.*topk"),
        ({"backend": "triton"}, "backend='triton'.*torch"),
        ({"activation": "relu"}, "activation"),
        ({"input_jitter": 1.5}, "input_jitter"),
    ],
)
def test_bad_arguments_name_the_field(kwargs, match):
    args = {"d_model": 8, "ffn_hidden": 8, "num_experts": 4, "top_k": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        MoELayer(**args)


def test_wrong_input_width_is_reported():
    with pytest.raises(ValueError, match="d_model=8"):
        MoELayer(8, 8, 4, 2)(torch.randn(3, 7))


def test_registry_register_get_and_dotted_path():
    registry = EstimatorRegistry()

    class Fixed(Estimator):
        """Always expert 0."""

        def route(self, logits_TE, top_k):
            probs = logits_TE.softmax(-1)
            indices = torch.zeros(logits_TE.shape[0], top_k, dtype=torch.long)
            return Routing(indices, probs.gather(1, indices), probs)

    registry.register("fixed", Fixed)
    assert registry.available_estimators() == ["fixed"]
    assert isinstance(registry.get("fixed"), Fixed)
    with pytest.raises(ValueError, match="already registered"):
        registry.register("fixed", Fixed)
    registry.register("fixed", Fixed, override=True, description="d")
    assert registry["fixed"]["description"] == "d"
    assert isinstance(ESTIMATOR_REGISTRY.get("lightning_moe.estimators.topk.TopK"), TopK)
    with pytest.raises(ValueError, match="cannot import"):
        ESTIMATOR_REGISTRY.get("no_such_pkg.Thing")
    assert "topk" in available_estimators()


def test_estimator_instances_are_copied_per_layer():
    shared = TopK(jitter_eps=0.1)
    a, b = MoELayer(8, 8, 4, 2, estimator=shared), MoELayer(8, 8, 4, 2, estimator=shared)
    assert a.estimator is not b.estimator and a.estimator.jitter_eps == 0.1
    with pytest.raises(ValueError, match="estimator_args"):
        MoELayer(8, 8, 4, 2, estimator=shared, estimator_args={"renormalize": True})
    assert MoELayer(8, 8, 4, 2, estimator_args={"renormalize": True}).estimator.renormalize


def test_logits_are_not_modified_by_topk_jitter():
    logits = torch.randn(5, 4)
    before = logits.clone()
    TopK(jitter_eps=0.5).train().route(logits, 2)
    assert torch.equal(logits, before)
