"""SparseMixer-v2 (GRIN) against its definition, and against GRIN's released top-2 code as
shipped in Hugging Face transformers (compared in distribution).

References are computed here in float64 from the formulas, not from the estimator.
"""

import pytest
import torch
import torch.nn.functional as F

from lightning_moe import MoELayer
from lightning_moe.estimators import ESTIMATOR_REGISTRY
from lightning_moe.estimators import sparsemixer_v2 as v2_module
from lightning_moe.estimators.sparsemixer_v2 import SparseMixerV2

ONE_THIRD_F32 = torch.tensor(1 / 3, dtype=torch.float32)


def reference_step(z_E: torch.Tensor, earlier: list[int], eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, g) in float64 for one step of one token, given the experts picked before it."""
    z = z_E.double()
    remaining = z.clone()
    remaining[earlier] = float("-inf")
    m = remaining.max()
    mask = (m - z) / torch.maximum(z.abs(), m) > 2 * eps
    mask[earlier] = True
    g = torch.where(mask, 0.0, z.exp())
    return mask, g / g.sum()


def make_estimator(num_experts: int = 5, top_k: int = 2, **kwargs) -> SparseMixerV2:
    estimator = SparseMixerV2(**kwargs)
    estimator.bind(num_experts=num_experts, top_k=top_k, d_model=8)
    return estimator


def reference_gradient(z_TE, indices_TK, values_TE, eps, steps=None):
    """sum over steps j of G_j g_{D_j} (e_{D_j} - g^(j)), with G_j = values[t, D_j], in float64."""
    grad = torch.zeros(z_TE.shape, dtype=torch.float64)
    for t in range(z_TE.shape[0]):
        picks = indices_TK[t].tolist()
        for j in steps if steps is not None else range(len(picks)):
            _, g = reference_step(z_TE[t], picks[:j], eps)
            d = picks[j]
            grad[t] += values_TE[t, d].double() * g[d] * (F.one_hot(torch.tensor(d), z_TE.shape[1]).double() - g)
    return grad


def test_bind_validates_top_k_and_registry_defaults():
    with pytest.raises(ValueError, match="top_k"):
        SparseMixerV2().bind(num_experts=4, top_k=5, d_model=8)
    with pytest.raises(ValueError, match="top_k"):
        SparseMixerV2().bind(num_experts=4, top_k=0, d_model=8)
    assert ESTIMATOR_REGISTRY.get("sparsemixer_v2").jitter_eps == 0.01


@pytest.mark.parametrize("top_k", [2, 5])
def test_picks_are_distinct(top_k):
    estimator = make_estimator(top_k=top_k, jitter_eps=0.5).train()
    indices = estimator.route(torch.randn(4000, 5), top_k).indices
    assert indices.shape == (4000, top_k)
    assert (indices.sort(dim=-1).values.diff(dim=-1) > 0).all()


def test_gate_scale_is_one_on_argmax_and_one_third_with_probability_three_quarters():
    n, eps = 20000, 0.1
    estimator = make_estimator(jitter_eps=eps).train()
    z = torch.tensor([4.7, 5.0, 4.8, 4.6, 1.0]).expand(n, 5)
    routing = estimator.route(z, 2)
    first = routing.indices[:, 0]
    g_step2_given_first = torch.stack([reference_step(z[0], [d1], eps)[1] for d1 in range(5)])
    g_per_step = (reference_step(z[0], [], eps)[1].expand(n, 5), g_step2_given_first[first])
    scales = []
    for j, g in enumerate(g_per_step):
        index = routing.indices[:, j]
        scale = routing.weights[:, j].double() / g.gather(-1, index[:, None])[:, 0]
        is_one = (scale - 1).abs() < 1e-6
        assert (is_one | ((scale - 1 / 3).abs() < 1e-6)).all()
        on_argmax = index == g.argmax(dim=-1)
        assert is_one[on_argmax].all()
        off = int((~on_argmax).sum())
        assert off > 1000
        assert abs(is_one[~on_argmax].double().mean().item() - 0.25) < 5 * (0.25 * 0.75 / off) ** 0.5
        scales.append(scale)
    torch.testing.assert_close(
        routing.telemetry["mean_gate_scale"].double(), torch.stack(scales).mean(), rtol=1e-5, atol=0
    )


@pytest.mark.parametrize("autocast", [False, True])
def test_one_third_is_exact_in_float32(autocast):
    """Two tied survivors make g = (1/2, 1/2) exactly, so the low gate is float32(1/3) / 2.

    Step 2 then has a single survivor (the other tied expert): gate exactly 1, zero gradient.
    """
    n = 4000
    estimator = make_estimator(jitter_eps=0.1).train()
    z = torch.tensor([3.0, 3.0, -10.0, -10.0, -10.0]).expand(n, 5).clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        routing = estimator.route(z, 2)
    assert routing.weights.dtype == torch.float32 and routing.probs.dtype == torch.float32
    first, second = routing.indices[:, 0], routing.indices[:, 1]
    assert torch.equal(first + second, torch.ones(n, dtype=torch.long))
    low = routing.weights[:, 0] != 0.5
    assert torch.equal(routing.weights[low, 0], torch.full((int(low.sum()),), 0.5) * ONE_THIRD_F32)
    assert (first[low] == 1).all() and int(low.sum()) > 1000  # expected 4000 * 1/2 * 3/4
    assert torch.equal(routing.weights[:, 1], torch.ones(n))
    (routing.weights[:, 1] * 3.0).sum().backward()
    assert torch.equal(z.grad, torch.zeros(n, 5))


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_router_gradient_is_sum_over_steps_of_g_times_gate_times_jacobian_row(top_k):
    eps = 0.05
    estimator = make_estimator(top_k=top_k, jitter_eps=eps).train()
    z = (2 + 0.3 * torch.randn(64, 5)).requires_grad_()
    values = torch.randn(64, 5)
    routing = estimator.route(z, top_k)
    # L = sum_t sum_j w_tj * values[t, D_tj], so G_j = values[t, D_tj].
    (routing.weights * values.gather(-1, routing.indices)).sum().backward()

    expected = reference_gradient(z.detach(), routing.indices, values, eps)
    torch.testing.assert_close(z.grad.double(), expected, rtol=1e-5, atol=1e-7)

    low_scales, multi_survivor = 0, 0
    for t in range(64):
        picks = routing.indices[t].tolist()
        for j, d in enumerate(picks):
            mask, g = reference_step(z[t].detach(), picks[:j], eps)
            assert not mask[d]
            scale = routing.weights[t, j].item() / g[d].item()
            assert abs(scale - 1) < 1e-6 or (abs(scale - 1 / 3) < 1e-6 and d != int(g.argmax()))
            low_scales += abs(scale - 1 / 3) < 1e-6
            multi_survivor += int((~mask).sum()) > 1
    assert low_scales > 3 and multi_survivor > 10, "test data must exercise c = 1/3 and several survivors"


def test_second_step_puts_no_gradient_on_the_first_pick():
    eps = 0.05
    estimator = make_estimator(jitter_eps=eps).train()
    z = (2 + 0.3 * torch.randn(64, 5)).requires_grad_()
    values = torch.randn(64, 5)
    routing = estimator.route(z, 2)
    (routing.weights[:, 1] * values.gather(-1, routing.indices[:, 1:])[:, 0]).sum().backward()
    assert torch.equal(z.grad.gather(-1, routing.indices[:, :1]), torch.zeros(64, 1))
    expected = reference_gradient(z.detach(), routing.indices, values, eps, steps=[1])
    torch.testing.assert_close(z.grad.double(), expected, rtol=1e-5, atol=1e-7)
    assert z.grad.abs().sum() > 0


def test_eval_is_deterministic_top_k_without_renormalisation():
    eps = 0.1
    estimator = make_estimator(top_k=3, jitter_eps=eps).eval()
    # Row 0: step 1 keeps {0, 1, 2}, step 2 keeps {1, 2}, step 3 keeps {2}: w = (0.35, 0.51, 1).
    z = torch.cat([torch.tensor([[2.0, 1.95, 1.9, -3.0, -3.0]]), torch.randn(31, 5)]).requires_grad_()
    routing = estimator.route(z, 3)
    torch.manual_seed(99)
    again = estimator.route(z, 3)
    assert torch.equal(routing.indices, again.indices) and torch.equal(routing.weights, again.weights)
    assert torch.equal(routing.indices, z.detach().topk(3, dim=-1).indices)
    expected = torch.tensor(
        [[reference_step(z[t].detach(), routing.indices[t, :j].tolist(), eps)[1][routing.indices[t, j]].item()
          for j in range(3)] for t in range(32)],
        dtype=torch.float64,
    )
    torch.testing.assert_close(routing.weights.double(), expected, rtol=1e-6, atol=0)
    assert abs(routing.weights[0].sum().item() - 1) > 0.5
    assert routing.telemetry["mean_gate_scale"].item() == 1.0


def test_zero_router_grad_fraction_counts_tokens_with_one_survivor_at_every_step():
    estimator = make_estimator(jitter_eps=0.1).train()
    z = torch.tensor(
        [
            [10.0, 5.0, 0.0, -1.0, -2.0],  # every step has a single survivor
            [3.0, 2.0, 1.9, -1.0, -2.0],  # step 1 single, step 2 keeps {1, 2}
            [5.0, 4.9, 4.8, 4.7, 4.6],  # all survive
            [-1.0, -1.5, -9.0, -9.0, -9.0],  # negative max: (m - z) / |z| = 0.33 > 0.2, single
        ]
    )
    routing = estimator.route(z, 2)
    assert abs(routing.telemetry["zero_router_grad_fraction"].item() - 0.5) < 1e-6


def test_float32_under_bfloat16_autocast():
    estimator = make_estimator(jitter_eps=0.05).train()
    z = 2 + 0.3 * torch.randn(64, 5)
    torch.manual_seed(7)
    plain = estimator.route(z, 2)
    torch.manual_seed(7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = estimator.route(z, 2)
    assert cast.weights.dtype == torch.float32 and cast.probs.dtype == torch.float32
    assert torch.equal(plain.indices, cast.indices) and torch.equal(plain.weights, cast.weights)


def test_logits_are_not_mutated():
    estimator = make_estimator(top_k=3, jitter_eps=0.05).train()
    z = (torch.randn(32, 5) * 2).requires_grad_()
    before = z.detach().clone()
    estimator.route(z, 3).weights.sum().backward()
    estimator.eval().route(z, 3)
    assert torch.equal(z.detach(), before)


def test_loop_and_torch_backends_agree_inside_moe_layer():
    layers = {}
    for backend in ("loop", "torch"):
        torch.manual_seed(0)
        layers[backend] = MoELayer(
            16, 32, num_experts=4, top_k=2, estimator="sparsemixer_v2", backend=backend,
            estimator_args={"jitter_eps": 0.2}, input_jitter=0.01,
        )
    layers["torch"].load_state_dict(layers["loop"].state_dict())
    x = torch.randn(2, 24, 16)
    outputs = {}
    for backend, layer in layers.items():
        torch.manual_seed(1)
        y = layer(x)
        y.pow(2).sum().backward()
        outputs[backend] = y
    torch.testing.assert_close(outputs["torch"], outputs["loop"], rtol=1e-5, atol=1e-6)
    for (name, p_loop), (_, p_torch) in zip(layers["loop"].named_parameters(), layers["torch"].named_parameters()):
        torch.testing.assert_close(p_torch.grad, p_loop.grad, rtol=1e-5, atol=1e-6, msg=name)
    assert layers["loop"].router.weight.grad.abs().sum() > 0


def force_outcomes(monkeypatch, index_per_step: list[torch.Tensor], coin_per_step: list[torch.Tensor]) -> None:
    """Make the estimator's draws return these experts and coins, step by step."""
    indices, coins = iter(index_per_step), iter(coin_per_step)

    def fake_gumbel_max(logits_TE, mask_TE):
        index_T = next(indices)
        assert not mask_TE.gather(-1, index_T[:, None]).any(), "forced a masked expert"
        return index_T.clone()

    monkeypatch.setattr(v2_module, "gumbel_max", fake_gumbel_max)
    monkeypatch.setattr(v2_module, "draw_coins", lambda num, prob, device: next(coins).clone())


@pytest.mark.parametrize("z_list", [[3.0, 2.0, 1.9, 1.5], [2.6, 2.8, 3.0, 2.45, -2.0]])
def test_expected_gradient_over_all_outcomes_for_a_linear_objective(monkeypatch, z_list):
    """Enumerate every (D1, c1, D2, c2) outcome of top-2, weight it by its probability, compare.

    For L = w_1 v_{D1} + w_2 v_{D2} with fixed per-expert values v (so G_j = v_{D_j}),
    g1 = step-1 gates, g2(.|D1) = step-2 gates given D1:

    - forward: E[c | D = argmax g] = 1 and E[c | D != argmax g] = 1/4 + 3/4 * 1/3 = 1/2, so
      E[L] = sum_D1 g1_D1 [k(D1) g1_D1 v_D1 + sum_D2 g2_D2 k(D2) g2_D2 v_D2], k in {1, 1/2};
    - gradient: each step contributes v_D g_D (e_D - g) = v_D dg_D/dz, so
      E[dL/dz] = sum_D1 g1_D1 v_D1 dg1_D1/dz + sum_D1 g1_D1 sum_D2 g2_D2 v_D2 dg2_D2/dz
               = 1/2 d/dz Phi_1 + sum_D1 g1_D1 * 1/2 d/dz Phi_2(.; D1),
      Phi_1 = sum_i g1_i^2 v_i, Phi_2(.; D1) = sum_i g2_i(.|D1)^2 v_i, with masks, D1 and the
      outer weights g1_D1 held fixed.

    That is, GRIN's router gradient is, in expectation, the gradient through the gates with
    the routing decisions held fixed; with k = 1 it is half of SparseMixer v1's, whose
    factor 2 restores the gradient of the sampling distribution itself.
    """
    eps = 0.1
    num_experts = len(z_list)
    z_row = torch.tensor(z_list, dtype=torch.float64)
    values = torch.linspace(-1.0, 2.0, num_experts, dtype=torch.float64) ** 2 - 0.5
    coin_prob = {True: 0.25, False: 0.75}

    mask1, g1 = reference_step(z_row, [], eps)
    outcomes = []
    for d1 in (~mask1).nonzero()[:, 0].tolist():
        mask2, g2 = reference_step(z_row, [d1], eps)
        for d2 in (~mask2).nonzero()[:, 0].tolist():
            for c1 in (True, False):
                for c2 in (True, False):
                    outcomes.append((d1, c1, d2, c2, g1[d1] * coin_prob[c1] * g2[d2] * coin_prob[c2]))
    assert len({(o[0], o[2]) for o in outcomes}) >= 2
    prob = torch.stack([o[4] for o in outcomes])
    torch.testing.assert_close(prob.sum(), torch.tensor(1.0, dtype=torch.float64))
    index_steps = [torch.tensor([o[0] for o in outcomes]), torch.tensor([o[2] for o in outcomes])]
    coin_steps = [torch.tensor([o[1] for o in outcomes]), torch.tensor([o[3] for o in outcomes])]
    force_outcomes(monkeypatch, index_steps, coin_steps)

    estimator = make_estimator(num_experts=num_experts, jitter_eps=eps).train()
    z = z_row.float().expand(len(outcomes), num_experts).clone().requires_grad_()
    routing = estimator.route(z, 2)
    assert torch.equal(routing.indices, torch.stack(index_steps, dim=-1))
    expected_loss = (prob[:, None] * routing.weights.double() * values[routing.indices]).sum()
    expected_loss.float().backward()
    expected_grad = z.grad.double().sum(dim=0)

    def kappa(g, d):
        return 1.0 if d == int(g.argmax()) else 0.5

    loss_ref = 0.0
    for d1 in (~mask1).nonzero()[:, 0].tolist():
        mask2, g2 = reference_step(z_row, [d1], eps)
        inner = sum(g2[d2] * kappa(g2, d2) * g2[d2] * values[d2] for d2 in (~mask2).nonzero()[:, 0].tolist())
        loss_ref += g1[d1] * (kappa(g1, d1) * g1[d1] * values[d1] + inner)
    torch.testing.assert_close(expected_loss, loss_ref, rtol=1e-6, atol=0)

    def phi_gradient(earlier: list[int]) -> torch.Tensor:
        mask, _ = reference_step(z_row, earlier, eps)
        z_ref = z_row.clone().requires_grad_()
        g = torch.where(mask, 0.0, z_ref.exp())
        g = g / g.sum()
        (g**2 * values).sum().backward()
        return z_ref.grad

    grad_ref = 0.5 * phi_gradient([])
    for d1 in (~mask1).nonzero()[:, 0].tolist():
        grad_ref += g1[d1] * 0.5 * phi_gradient([d1])
    torch.testing.assert_close(expected_grad, grad_ref, rtol=1e-5, atol=1e-7)


def test_matches_phimoe_reference_in_distribution():
    """GRIN's released top-2 code (transformers' PhiMoE) draws its randomness differently, so
    compare in distribution over many copies of the same logits: mean weights, mean router
    gradient for a fixed linear objective, and (D1, D2) pair frequencies, each within 5
    standard errors; at eval, exact agreement. (The reference rounds 1/3 to 0.3333: a bias
    of about 1e-5 in the mean weights, far below the Monte-Carlo error here.)
    """
    phimoe = pytest.importorskip("transformers.models.phimoe.modeling_phimoe")
    reference = getattr(phimoe, "sparsemixer", None)
    if reference is None:
        pytest.skip("this transformers version has no phimoe sparsemixer")
    eps, n, num_experts = 0.1, 20000, 5
    rows = torch.tensor([[4.0, 3.8, 3.7, 3.5, 1.0], [1.0, 1.1, 0.95, -0.5, 1.05]])
    values = torch.tensor([0.3, -1.0, 2.0, 0.5, -0.7])
    estimator = make_estimator(num_experts=num_experts, jitter_eps=eps)

    def ours(z, training):
        estimator.train(training)
        routing = estimator.route(z, 2)
        return routing.weights, routing.indices

    def theirs(z, training):
        return reference(z, jitter_eps=eps, training=training, top_k=2)

    for row in rows:
        draws = {}
        for name, fn in (("ours", ours), ("theirs", theirs)):
            z = row.expand(n, num_experts).clone().requires_grad_()
            weights, indices = fn(z, True)
            (weights * values[indices]).sum().backward()
            pair = indices[:, 0] * num_experts + indices[:, 1]
            draws[name] = (weights.detach().double(), z.grad.double(), pair)
        (w_a, grad_a, pair_a), (w_b, grad_b, pair_b) = draws["ours"], draws["theirs"]
        for a, b in ((w_a, w_b), (grad_a, grad_b)):
            standard_error = ((a.var(dim=0) + b.var(dim=0)) / n).sqrt()
            assert ((a.mean(dim=0) - b.mean(dim=0)).abs() <= 5 * standard_error + 1e-6).all()
        freq_a = torch.bincount(pair_a, minlength=num_experts**2).double() / n
        freq_b = torch.bincount(pair_b, minlength=num_experts**2).double() / n
        pooled = (freq_a + freq_b) / 2
        assert ((freq_a - freq_b).abs() <= 5 * (pooled * (1 - pooled) * 2 / n).sqrt() + 1e-12).all()
        assert (pooled > 0.01).sum() >= 4

    z = torch.cat([rows, torch.randn(30, num_experts)])
    for fn_a, fn_b in ((ours, theirs),):
        z_a, z_b = z.clone().requires_grad_(), z.clone().requires_grad_()
        w_a, i_a = fn_a(z_a, False)
        w_b, i_b = fn_b(z_b, False)
        assert torch.equal(i_a, i_b)
        torch.testing.assert_close(w_a, w_b, rtol=1e-6, atol=0)
        (w_a * values[i_a]).sum().backward()
        (w_b * values[i_b]).sum().backward()
        torch.testing.assert_close(z_a.grad, z_b.grad, rtol=1e-5, atol=1e-7)
