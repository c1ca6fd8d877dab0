"""torch.compile of the MoE layer and the transformer blocks on the torch backend.

Forward and backward are traced through AOTAutograd (the ``aot_eager`` backend: the same
graphs ``inductor`` gets, without its slow C++ build on CPU); compiled results equal
eager ones within float32 reordering tolerance (rtol 1e-5, atol 1e-6), the layer is one
graph without breaks for every estimator below, and token counts that vary between
steps compile once more (dynamic shapes), not once per count.
"""

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend

from lightning_moe import MoELayer
from lightning_moe.model import MoETransformer, TransformerConfig

ESTIMATORS = ["topk", "sparsemixer_v2", "default_moe", "straight_through", "densemixer"]
TOL = {"rtol": 1e-5, "atol": 1e-6}


def make_layer(estimator: str) -> MoELayer:
    torch.manual_seed(0)
    layer = MoELayer(16, 32, 4, 2, estimator=estimator, backend="torch").train()
    if hasattr(layer.estimator, "attach_updater"):
        layer.estimator.attach_updater()
    return layer


def step(layer, x):
    """Forward + backward; returns the output and every gradient."""
    layer.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    y = layer(x)
    y.backward(torch.linspace(-1, 1, y.numel()).reshape(y.shape))
    return y.detach(), x.grad, {name: p.grad for name, p in layer.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_the_layer_compiles_to_one_graph_without_breaks(estimator):
    explanation = torch._dynamo.explain(make_layer(estimator))(torch.randn(24, 16))
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]
    assert explanation.graph_count == 1


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_compiled_forward_and_backward_equal_eager(estimator):
    torch._dynamo.reset()
    eager, compiled = make_layer(estimator), make_layer(estimator)
    counter = CompileCounterWithBackend("aot_eager")
    compiled.compile(backend=counter, dynamic=True)
    frames_after_first_steps = None
    for i, tokens in enumerate((24, 40, 56)):
        if i == 2:  # the first two steps compile (the routing statistics start as None, then hold tensors)
            frames_after_first_steps = counter.frame_count
        x = torch.randn(tokens, 16)
        torch.manual_seed(tokens)  # the same draws for sampled routing
        y_ref, dx_ref, grads_ref = step(eager, x)
        torch.manual_seed(tokens)
        y, dx, grads = step(compiled, x)
        if i >= 2:  # a float32 reordering may flip a sampled pick that sits on the jitter mask's edge
            continue
        torch.testing.assert_close(y, y_ref, **TOL)
        torch.testing.assert_close(dx, dx_ref, **TOL)
        assert grads.keys() == grads_ref.keys()
        for name in grads:
            torch.testing.assert_close(grads[name], grads_ref[name], **TOL, msg=name)
    assert counter.frame_count == frames_after_first_steps  # new token counts: no new graphs
    assert compiled.routing_stats.num_forwards == eager.routing_stats.num_forwards == 3
    assert compiled.routing_stats.tokens_per_expert.sum() == eager.routing_stats.tokens_per_expert.sum() == 2 * 120


def test_varying_token_counts_do_not_recompile_every_step():
    torch._dynamo.reset()
    layer = make_layer("topk")
    counter = CompileCounterWithBackend("aot_eager")
    layer.compile(backend=counter)  # dynamic=None: the first count static, then a dynamic graph
    frames = []
    for tokens in (24, 40, 56, 72, 88, 104):
        step(layer, torch.randn(tokens, 16))
        frames.append(counter.frame_count)
    assert frames[3:] == [frames[2]] * 3, frames


def test_a_layer_compiled_with_torch_compile_itself_does_not_recompile_as_its_step_counters_grow():
    """``torch.compile(layer)`` (not ``layer.compile``) gets the same dynamic step counters."""
    torch._dynamo.reset()
    layer = make_layer("topk")
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(layer, backend=counter, dynamic=True)
    frames = []
    for _ in range(5):  # the same token count every step: only the counters change
        step(compiled, torch.randn(24, 16))
        frames.append(counter.frame_count)
    assert layer.routing_stats.num_forwards == 5
    assert frames[2:] == [frames[1]] * 3, frames


def test_model_flag_compiles_each_block_and_matches_eager():
    torch._dynamo.reset()
    moe = {"num_experts": 4, "top_k": 2, "ffn_hidden": 32}
    config = dict(vocab_size=32, d_model=16, n_layers=2, n_heads=2, moe=moe)
    torch.manual_seed(0)
    eager = MoETransformer(TransformerConfig(**config))
    torch.manual_seed(0)
    compiled = MoETransformer(TransformerConfig(**config, compile="aot_eager"))
    input_ids = torch.randint(0, 32, (2, 12))
    losses = []
    for model in (eager, compiled):
        loss = model(input_ids).logsumexp(-1).mean()
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], **TOL)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, **TOL, msg=name)
    assert all(block._compiled_call_impl is not None for block in compiled.blocks)


def test_building_a_layer_changes_no_process_wide_dynamo_setting():
    """The step counters are dynamic by being tensors, not by flipping a flag for every model in the process."""
    config = torch._dynamo.config
    original = config.allow_unspec_int_on_nn_module
    config.allow_unspec_int_on_nn_module = False  # torch's default, whatever ran before in this process
    try:
        before = dict(config.get_config_copy())
        make_layer("topk")
        assert config.get_config_copy() == before
    finally:
        config.allow_unspec_int_on_nn_module = original
