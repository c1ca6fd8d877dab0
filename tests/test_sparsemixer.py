"""SparseMixer (v1, top-1) against its definition: jitter mask, sampling, gate scale and
the mid-point router gradient 2 * G * p_D * (e_D - p).

References are computed here in float64 from the formulas, not from the estimator.
"""

import pytest
import torch

from lightning_moe import MoELayer
from lightning_moe.estimators import ESTIMATOR_REGISTRY
from lightning_moe.estimators import sparsemixer as sparsemixer_module
from lightning_moe.estimators.sparsemixer import SparseMixer


def reference_masked_softmax(z_TE: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, p) in float64: mask_i = (m - z_i) / max(|z_i|, m) > 2 eps with m = max z."""
    z = z_TE.double()
    m = z.max(dim=-1, keepdim=True).values
    mask = (m - z) / torch.maximum(z.abs(), m) > 2 * eps
    p = torch.where(mask, 0.0, z.exp())
    return mask, p / p.sum(dim=-1, keepdim=True)


def make_estimator(**kwargs) -> SparseMixer:
    estimator = SparseMixer(**kwargs)
    estimator.bind(num_experts=5, top_k=1, d_model=8)
    return estimator


def force_outcomes(monkeypatch, index_T: torch.Tensor, coin_T: torch.Tensor) -> None:
    """Make the estimator's draws return these experts and coins instead of sampling."""

    def fake_gumbel_max(logits_TE, mask_TE):
        assert not mask_TE.gather(-1, index_T[:, None]).any(), "forced a masked expert"
        return index_T.clone()

    monkeypatch.setattr(sparsemixer_module, "gumbel_max", fake_gumbel_max)
    monkeypatch.setattr(sparsemixer_module, "draw_coins", lambda num, prob, device: coin_T.clone())


def test_bind_rejects_top_k_other_than_one():
    with pytest.raises(ValueError, match="top_k"):
        SparseMixer().bind(num_experts=4, top_k=2, d_model=8)
    with pytest.raises(ValueError, match="top_k"):
        MoELayer(8, 16, num_experts=4, top_k=2, estimator="sparsemixer")
    assert ESTIMATOR_REGISTRY.get("sparsemixer").jitter_eps == 0.1


def test_eval_picks_argmax_with_masked_softmax_weight():
    estimator = make_estimator().eval()
    # Row 0: only experts 0 and 1 survive the mask (2 - 0.5 = 1.5 > 0.2 * 2), so the gate is
    # e^2 / (e^2 + e^1.9) = 0.525, not the plain softmax 0.45.
    z = torch.cat([torch.tensor([[2.0, 1.9, 0.5, -1.0, 0.0]]), 2 + 0.3 * torch.randn(15, 5)])
    routing = estimator.route(z, 1)
    _, p = reference_masked_softmax(z, 0.1)
    assert torch.equal(routing.indices[:, 0], z.argmax(dim=-1))
    expected = p.gather(-1, z.argmax(dim=-1, keepdim=True))
    torch.testing.assert_close(routing.weights.double(), expected, rtol=1e-6, atol=0)
    assert abs(routing.weights[0, 0].item() - 1 / (1 + torch.e**-0.1)) < 1e-6
    assert abs(routing.weights[0, 0].item() - z[0].softmax(-1)[0].item()) > 0.05
    torch.testing.assert_close(routing.probs, z.softmax(dim=-1))
    torch.manual_seed(123)
    assert torch.equal(estimator.route(z, 1).weights, routing.weights)
    assert routing.telemetry["mean_gate_scale"].item() == 1.0


def test_training_draws_follow_the_masked_softmax():
    """Pearson chi-square of 20000 draws against p over the survivors (dof 3, alpha 0.001)."""
    estimator = make_estimator().train()
    z = torch.tensor([3.0, 2.8, 2.6, 2.5, 0.0]).expand(20000, 5)
    mask, p = reference_masked_softmax(z[:1], 0.1)
    assert mask[0].tolist() == [False, False, False, False, True]
    counts = torch.bincount(estimator.route(z, 1).indices[:, 0], minlength=5).double()
    assert counts[4] == 0
    expected = 20000 * p[0, :4]
    chi2 = ((counts[:4] - expected) ** 2 / expected).sum().item()
    critical_dof3_alpha_0_001 = 16.266
    assert chi2 < critical_dof3_alpha_0_001
    plain = 20000 * z[0].double().softmax(-1)
    assert ((counts - plain) ** 2 / plain).sum().item() > 10 * critical_dof3_alpha_0_001


def test_gate_scale_is_one_on_argmax_and_a_fair_coin_otherwise():
    estimator = make_estimator().train()
    n = 20000
    z = torch.tensor([5.0, 4.8, 4.6, 4.5, 4.4]).expand(n, 5)
    mask, p = reference_masked_softmax(z[:1], 0.1)
    assert not mask.any()
    routing = estimator.route(z, 1)
    index = routing.indices[:, 0]
    scale = routing.weights[:, 0].double() / p[0, index]
    is_one = (scale - 1).abs() < 1e-6
    is_half = (scale - 0.5).abs() < 1e-6
    assert (is_one | is_half).all()
    on_argmax = index == 0
    assert is_one[on_argmax].all()
    off = int((~on_argmax).sum())
    share_one = is_one[~on_argmax].double().mean().item()
    assert abs(share_one - 0.5) < 5 * (0.25 / off) ** 0.5
    torch.testing.assert_close(routing.telemetry["mean_gate_scale"].double(), scale.mean(), rtol=1e-5, atol=0)


def test_router_gradient_is_twice_g_times_gate_times_softmax_jacobian_row():
    estimator = make_estimator().train()
    z = (2 + 0.3 * torch.randn(64, 5)).requires_grad_()
    values = torch.randn(64, 5)
    routing = estimator.route(z, 1)
    index = routing.indices[:, 0]
    g_T = values.gather(-1, index[:, None])[:, 0]  # G = dL/dw for L = sum_t w_t * values[t, D_t]
    (routing.weights[:, 0] * g_T).sum().backward()

    mask, p = reference_masked_softmax(z.detach(), 0.1)
    assert not mask.gather(-1, index[:, None]).any()
    p_d = p.gather(-1, index[:, None])
    expected = 2 * g_T.double()[:, None] * p_d * (torch.nn.functional.one_hot(index, 5).double() - p)
    torch.testing.assert_close(z.grad.double(), expected, rtol=1e-5, atol=1e-7)
    assert torch.all(z.grad[mask] == 0)
    scale = routing.weights[:, 0].double() / p_d[:, 0]
    assert ((scale - 0.5).abs() < 1e-6).sum() > 3, "the gradient must not depend on c: need rows with c = 1/2"
    assert mask.any() and (~mask).sum(-1).gt(1).any()


def test_single_survivor_gives_exactly_zero_router_gradient():
    estimator = make_estimator().train()
    z = torch.tensor([[10.0, 0.0, -1.0, -2.0, 5.0], [4.0, 1.0, 1.0, 1.0, 1.0], [5.0, 4.9, 4.8, 4.7, 4.6]])
    z.requires_grad_()
    routing = estimator.route(z, 1)
    (routing.weights[:, 0] * torch.tensor([1.5, -2.0, 0.7])).sum().backward()
    assert torch.equal(routing.indices[:2, 0], torch.tensor([0, 0]))
    assert torch.equal(routing.weights[:2, 0], torch.ones(2))
    assert torch.equal(z.grad[:2], torch.zeros(2, 5))
    assert z.grad[2].abs().sum() > 0
    assert abs(routing.telemetry["zero_router_grad_fraction"].item() - 2 / 3) < 1e-6


@pytest.mark.parametrize("training", [True, False])
def test_logits_are_not_mutated(training):
    estimator = make_estimator(learnable_omega=True).train(training)
    z = (torch.randn(32, 5) * 2).requires_grad_()
    before = z.detach().clone()
    estimator.route(z, 1).weights.sum().backward()
    assert torch.equal(z.detach(), before)


@pytest.mark.parametrize("z_list", [[2.7, 3.0, 2.5, -2.0], [2.6, 2.8, 3.0, 2.45, -2.0]])
def test_expected_gradient_over_all_outcomes_for_a_linear_objective(monkeypatch, z_list):
    """Enumerate every (D, coin) outcome, weight it by its probability, and compare.

    For L = w * v_D with fixed per-expert values v, G = v_D, and with p the masked softmax
    and a = argmax z:

    - forward: E[w | D] = p_D * E[c | D], with E[c | D = a] = 1 and E[c | D != a] =
      (1 + 1/2) / 2 = 3/4, so E[L] = sum_D p_D^2 v_D kappa_D (kappa_a = 1, otherwise 3/4);
    - gradient: E[dL/dz] = sum_D p_D * 2 v_D p_D (e_D - p) = sum_D 2 p_D v_D dp_D/dz
      = d/dz [sum_i p_i(z)^2 v_i] = d/dz E_{D~p}[p_D v_D]  (mask held fixed).

    So for a linear objective SparseMixer's router gradient is an unbiased estimate of the
    exact gradient of the expected c = 1 output over the jitter-masked softmax, and is
    independent of the forward coins.
    """
    num_experts = len(z_list)
    z_row = torch.tensor(z_list, dtype=torch.float64)  # the last expert is masked
    values = torch.randn(num_experts, dtype=torch.float64)
    eps = 0.1
    mask, p = reference_masked_softmax(z_row[None], eps)
    survivors = (~mask[0]).nonzero()[:, 0].tolist()
    assert len(survivors) >= 3
    argmax = int(z_row.argmax())

    outcomes = [(d, coin) for d in survivors for coin in (True, False)]
    prob = torch.tensor([p[0, d].item() * 0.5 for d, _ in outcomes], dtype=torch.float64)
    index = torch.tensor([d for d, _ in outcomes])
    force_outcomes(monkeypatch, index, torch.tensor([coin for _, coin in outcomes]))
    estimator = SparseMixer(jitter_eps=eps)
    estimator.bind(num_experts=num_experts, top_k=1, d_model=8)
    z = z_row.float().expand(len(outcomes), num_experts).clone().requires_grad_()
    routing = estimator.route(z, 1)
    assert torch.equal(routing.indices[:, 0], index)
    expected_loss = (prob * routing.weights[:, 0].double() * values[index]).sum()
    expected_loss.float().backward()
    expected_grad = (z.grad.double()).sum(dim=0)  # rows were already weighted by prob

    kappa = torch.full((num_experts,), 0.75, dtype=torch.float64)
    kappa[argmax] = 1.0
    torch.testing.assert_close(expected_loss, (p[0] ** 2 * values * kappa).sum(), rtol=1e-6, atol=0)

    z_ref = z_row.clone().requires_grad_()
    p_ref = torch.where(mask[0], 0.0, z_ref.exp())
    p_ref = p_ref / p_ref.sum()
    (p_ref**2 * values).sum().backward()
    torch.testing.assert_close(expected_grad, z_ref.grad, rtol=1e-5, atol=1e-7)
    assert expected_grad[-1] == 0


def test_learnable_omega_scales_the_gate_and_receives_gradient():
    estimator = make_estimator(learnable_omega=True).train()
    assert torch.equal(estimator.omega.detach(), torch.ones(5))
    assert "omega" in estimator.state_dict()
    with torch.no_grad():
        estimator.omega.copy_(torch.tensor([0.5, 1.5, 2.0, 1.0, 0.8]))
    z = (2 + 0.3 * torch.randn(64, 5)).requires_grad_()
    values = torch.randn(64, 5)
    routing = estimator.route(z, 1)
    index = routing.indices[:, 0]
    g_T = values.gather(-1, index[:, None])[:, 0]
    (routing.weights[:, 0] * g_T).sum().backward()

    _, p = reference_masked_softmax(z.detach(), 0.1)
    omega = estimator.omega.detach().double()
    p_d = p.gather(-1, index[:, None])[:, 0]
    scale = routing.weights[:, 0].double() / (omega[index] * p_d)
    assert (((scale - 1).abs() < 1e-6) | ((scale - 0.5).abs() < 1e-6)).all()
    expected_omega_grad = torch.zeros(5, dtype=torch.float64).index_add_(0, index, g_T.double() * scale * p_d)
    torch.testing.assert_close(estimator.omega.grad.double(), expected_omega_grad, rtol=1e-5, atol=1e-7)
    one_hot = torch.nn.functional.one_hot(index, 5).double()
    expected_z_grad = 2 * (g_T.double() * omega[index] * p_d)[:, None] * (one_hot - p)
    torch.testing.assert_close(z.grad.double(), expected_z_grad, rtol=1e-5, atol=1e-7)


def test_inside_moe_layer_the_router_learns():
    layer = MoELayer(16, 32, num_experts=4, top_k=1, estimator="sparsemixer", estimator_args={"jitter_eps": 0.5})
    layer(torch.randn(64, 16)).pow(2).sum().backward()
    assert layer.router.weight.grad.abs().sum() > 0
    assert set(layer.routing_stats.telemetry) == {"zero_router_grad_fraction", "mean_gate_scale"}
