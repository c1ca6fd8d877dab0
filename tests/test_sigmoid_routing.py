"""Sigmoid, group-limited routing with a routed scaling factor (DeepSeek-V3 style) on MoELayer:
selection against DeepSeek-V3's own router and a brute force, DenseMixer's and Default MoE's
router gradients against the float64 dense mixture, refusals of the softmax-only estimators."""

import pytest
import torch
import torch.nn.functional as F

from lightning_moe import MoELayer
from lightning_moe.errors import ConfigError

D, HIDDEN, E, T = 12, 10, 8, 40
GROUPED = dict(score_function="sigmoid", n_group=4, topk_group=2, routed_scaling_factor=2.5)


def make_layer(estimator, top_k=3, backend="loop", scoring=GROUPED, bias=True, **estimator_args):
    torch.manual_seed(0)
    layer = MoELayer(D, HIDDEN, E, top_k, estimator=estimator, backend=backend, estimator_args=estimator_args,
                     **scoring)
    layer.experts.reset_parameters(std=0.3)
    if bias:
        layer.use_selection_bias = True
        layer.selection_bias.copy_(torch.randn(E, generator=torch.Generator().manual_seed(5)) * 0.2)
    return layer


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, D, generator=g), torch.randn(T, D, generator=g)


def brute_force_choice(choice_TE, top_k, n_group, topk_group):
    """[T, E] bool: per token, the top_k experts of the topk_group groups whose two best scores sum highest."""
    size = choice_TE.shape[1] // n_group
    chosen = torch.zeros(choice_TE.shape, dtype=torch.bool)
    for t, row in enumerate(choice_TE.tolist()):
        group_score = [sum(sorted(row[g * size:(g + 1) * size], reverse=True)[:2]) for g in range(n_group)]
        groups = sorted(range(n_group), key=lambda g: -group_score[g])[:topk_group]
        allowed = [e for g in groups for e in range(g * size, (g + 1) * size)]
        for e in sorted(allowed, key=lambda e: -row[e])[:top_k]:
            chosen[t, e] = True
    return chosen


def dense_mixture_reference(layer, x, grad_out, renormalize, defaults_ED=None):
    """The dense mixture of all experts in float64, differentiated by autograd.

    w_i = c * s_i / S on the chosen set A, c * s_i / stopgrad(S) elsewhere (S = sum of the
    chosen s_j when renormalised, else 1), s = sigmoid(x W^T). DenseMixer (defaults_ED None):
    y = sparse.detach() + dense - dense.detach(), with each E_i(x) passing gradient only on the
    tokens that chose i. Default MoE: y = the mixture with the default Ehat_i in place of
    E_i(x) off A. A is chosen by brute force from the layer's float32 scores and its bias.
    """
    scoring = layer.scoring
    with torch.no_grad():
        choice_TE = (x @ layer.router.weight.T).sigmoid() + layer.selection_bias
        chosen_TE = brute_force_choice(choice_TE, layer.top_k, scoring.n_group, scoring.topk_group).double()
    params = {name: p.detach().double().requires_grad_(True) for name, p in layer.named_parameters()}
    x64 = x.double().requires_grad_(True)
    s_TE = (x64 @ params["router.weight"].T).sigmoid()
    norm_T1 = (s_TE * chosen_TE).sum(-1, keepdim=True) if renormalize else torch.ones(T, 1, dtype=torch.float64)
    w_TE = scoring.routed_scaling_factor * (s_TE * chosen_TE / norm_T1 + s_TE * (1 - chosen_TE) / norm_T1.detach())
    dense_TD = torch.zeros(T, D, dtype=torch.float64)
    sparse_TD = torch.zeros(T, D, dtype=torch.float64)
    for e in range(E):
        gate, up = params["experts.w1"][e].chunk(2, dim=1)
        out = F.silu(x64 @ gate) * (x64 @ up) @ params["experts.w2"][e]
        keep_T1 = chosen_TE[:, e: e + 1]
        off_choice = out.detach() if defaults_ED is None else defaults_ED[e].double().expand_as(out)
        out = out * keep_T1 + off_choice * (1 - keep_T1)
        dense_TD = dense_TD + w_TE[:, e: e + 1] * out
        sparse_TD = sparse_TD + keep_T1 * w_TE[:, e: e + 1] * out
    y = dense_TD if defaults_ED is not None else sparse_TD.detach() + dense_TD - dense_TD.detach()
    y.backward(grad_out.double())
    return y.detach(), x64.grad, {name: p.grad for name, p in params.items()}


def run(layer, x, grad_out):
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    y = layer(x)
    y.backward(grad_out)
    return y.detach(), x.grad, {name: p.grad.clone() for name, p in layer.named_parameters() if p.grad is not None}


def assert_matches(ours, reference):
    """Float32 against float64: gradients reach ~40 here, so the absolute tolerance is 1e-5."""
    y, x_grad, grads = ours
    y_ref, x_grad_ref, grads_ref = reference
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x_grad.double(), x_grad_ref, rtol=1e-5, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad.double(), grads_ref[name], rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("backend", ["loop", "torch"])
@pytest.mark.parametrize("scoring,renormalize", [
    (dict(score_function="sigmoid"), False),
    (GROUPED, True),
    (GROUPED, False),
])
def test_densemixer_sigmoid_gradients_equal_float64_dense_mixture(backend, scoring, renormalize):
    layer = make_layer("densemixer", backend=backend, scoring=scoring, renormalize=renormalize)
    x, grad_out = inputs()
    assert_matches(run(layer, x, grad_out), dense_mixture_reference(layer, x, grad_out, renormalize))


def test_densemixer_sigmoid_forward_and_expert_gradients_are_topk_bit_for_bit():
    dense = make_layer("densemixer", renormalize=True)
    topk = make_layer("topk", renormalize=True)
    x, grad_out = inputs()
    y, _, grads = run(dense, x, grad_out)
    y_topk, _, grads_topk = run(topk, x, grad_out)
    assert torch.equal(y, y_topk)
    for name in ("experts.w1", "experts.w2"):
        assert torch.equal(grads[name], grads_topk[name]), name
    assert not torch.allclose(grads["router.weight"], grads_topk["router.weight"], rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("scoring", [dict(score_function="sigmoid"), GROUPED])
def test_default_moe_sigmoid_equals_float64_mixture_with_defaults(scoring):
    layer = make_layer("default_moe", scoring=scoring)
    layer.estimator.attach_updater()
    layer.estimator.default_outputs.copy_(torch.randn(E, D, generator=torch.Generator().manual_seed(7)))
    x, grad_out = inputs()
    defaults = layer.estimator.default_outputs.clone()
    assert_matches(run(layer, x, grad_out), dense_mixture_reference(layer, x, grad_out, False, defaults))


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_selection_and_gates_equal_deepseek_v3_router(norm_topk_prob):
    """DeepSeek-V3's router as transformers ships it is the reference: same experts, same weights."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    config = transformers.DeepseekV3Config(hidden_size=D, n_routed_experts=16, num_experts_per_tok=4, n_group=4,
                                           topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=norm_topk_prob)
    theirs = DeepseekV3TopkRouter(config)
    layer = MoELayer(D, HIDDEN, 16, 4, score_function="sigmoid", n_group=4, topk_group=2, routed_scaling_factor=2.5,
                     estimator_args={"renormalize": norm_topk_prob})
    with torch.no_grad():
        theirs.weight.copy_(layer.router.weight)
        theirs.e_score_correction_bias.copy_(torch.randn(16, generator=torch.Generator().manual_seed(3)) * 0.3)
    layer.selection_bias.copy_(theirs.e_score_correction_bias)
    layer.use_selection_bias = True
    x = torch.randn(64, D, generator=torch.Generator().manual_seed(4))
    _, their_weights, their_indices = theirs(x)
    routing = layer.estimator.route(layer.router(x), 4, selection_bias=layer.selection_bias)
    ours_idx, order = routing.indices.sort(-1)
    theirs_idx, their_order = their_indices.sort(-1)
    assert torch.equal(ours_idx, theirs_idx)
    torch.testing.assert_close(routing.weights.gather(1, order), their_weights.gather(1, their_order))


def test_group_limited_choice_equals_brute_force():
    layer = make_layer("topk", top_k=2, scoring=dict(score_function="sigmoid", n_group=4, topk_group=1))
    x, _ = inputs()
    logits = layer.router(x)
    routing = layer.estimator.route(logits, 2, selection_bias=layer.selection_bias)
    chosen = brute_force_choice(logits.detach().sigmoid() + layer.selection_bias, 2, 4, 1)
    assert torch.equal(torch.zeros_like(chosen).scatter(1, routing.indices, True), chosen)
    # topk_group=1: both experts of each token come from one group of 2.
    assert torch.equal(routing.indices[:, 0] // 2, routing.indices[:, 1] // 2)


def test_probs_are_normalised_sigmoid_scores_and_weights_the_unbiased_scores():
    layer = make_layer("topk", top_k=2, scoring=dict(score_function="sigmoid", routed_scaling_factor=2.0))
    x, _ = inputs()
    logits = layer.router(x)
    routing = layer.estimator.route(logits, 2, selection_bias=layer.selection_bias)
    s = logits.sigmoid()
    torch.testing.assert_close(routing.probs, s / s.sum(-1, keepdim=True))
    torch.testing.assert_close(routing.weights, 2.0 * s.gather(1, routing.indices))
    # The bias chose experts a plain top-k of the scores would not have chosen.
    assert not torch.equal(routing.indices.sort(-1).values, s.topk(2).indices.sort(-1).values)


def test_straight_through_sigmoid_has_unit_gates_and_the_sigmoid_gate_gradient():
    layer = make_layer("straight_through", top_k=2, scoring=dict(score_function="sigmoid"), bias=False)
    logits = torch.randn(T, E, requires_grad=True)
    routing = layer.estimator.route(logits, 2)
    assert torch.equal(routing.weights.detach(), torch.ones(T, 2))
    g = torch.randn(T, 2)
    (routing.weights * g).sum().backward()
    s = logits.detach().sigmoid()
    expected = torch.zeros(T, E).scatter_add(1, routing.indices, g * (s * (1 - s)).gather(1, routing.indices))
    torch.testing.assert_close(logits.grad, expected)


@pytest.mark.parametrize("estimator", ["sparsemixer", "sparsemixer_v2"])
@pytest.mark.parametrize("scoring,field", [
    (dict(score_function="sigmoid"), "score_function='sigmoid'"),
    (dict(n_group=2, topk_group=1), "n_group=2"),
    (dict(routed_scaling_factor=2.0), "routed_scaling_factor=2.0"),
])
def test_sampling_estimators_refuse_anything_but_softmax_top_k(estimator, scoring, field):
    with pytest.raises(ConfigError, match=f"^{field}: estimator SparseMixer.* is defined for softmax top-k routing"
                                          ".*sampling experts from a softmax"):
        MoELayer(D, HIDDEN, E, 1, estimator=estimator, **scoring)


@pytest.mark.parametrize("args,match", [
    (dict(score_function="tanh"), "score_function='tanh' is not valid"),
    (dict(n_group=3), "n_group=3 must divide num_experts=8"),
    (dict(n_group=4, topk_group=5), r"topk_group=5 must be in \[1, n_group=4\]"),
    (dict(n_group=4, topk_group=1), "top_k=3 is more than the 2 experts of topk_group=1"),
    (dict(routed_scaling_factor=0), "routed_scaling_factor must be a finite number > 0"),
    (dict(n_group=0), "n_group must be a positive int"),
])
def test_bad_scoring_names_the_field(args, match):
    with pytest.raises(ConfigError, match=match):
        MoELayer(D, HIDDEN, E, 3, **args)


def test_aux_loss_free_bias_update_moves_sigmoid_choices_toward_balance():
    """DeepSeek-V3's update (sign of the load deviation, speed gamma) on a sigmoid-routed layer: a layer whose
    router prefers one expert spreads its load once the callback's update has run for a while."""
    from lightning_moe.callbacks.aux_loss_free import balancing_update

    layer = make_layer("topk", top_k=2, scoring=dict(score_function="sigmoid", n_group=2, topk_group=1), bias=False)
    layer.use_selection_bias = True
    with torch.no_grad():
        layer.router.weight[0] += 0.5  # expert 0 wins most tokens
    x = torch.randn(256, D, generator=torch.Generator().manual_seed(9))

    def load():
        with torch.no_grad():
            idx = layer.estimator.route(layer.router(x), 2, selection_bias=layer.selection_bias).indices
        return torch.bincount(idx.reshape(-1), minlength=E).float()

    before = load()
    for _ in range(300):
        balancing_update(layer.selection_bias, load(), gamma=1e-2)
    after = load()
    assert after.max() - after.min() < (before.max() - before.min()) / 2
    # The bias never enters the gates.
    logits = layer.router(x)
    routing = layer.estimator.route(logits, 2, selection_bias=layer.selection_bias)
    torch.testing.assert_close(routing.weights, logits.sigmoid().gather(1, routing.indices))
