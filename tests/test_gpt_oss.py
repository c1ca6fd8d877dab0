"""gpt-oss: biased, clamped-SwiGLU experts and a biased router, against brute force and the original model."""

import pytest
import torch

from lightning_moe.errors import ConfigError
from lightning_moe.experts import Experts, fused
from lightning_moe.experts.grouped import sort_pairs

ALPHA, LIMIT = 1.702, 7.0


def brute_force_experts(x, indices, weights, w1, w2, b1, b2):
    """sum_k weight_k * FFN_{index_k}(x) token by token, gpt-oss's formula written out (float64)."""
    f = w2.shape[1]
    y = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(indices.shape[1]):
            e = int(indices[t, k])
            h = x[t] @ w1[e] + b1[e]
            gate, up = h[:f].clamp(max=LIMIT), h[f:].clamp(-LIMIT, LIMIT)
            y[t] = y[t] + weights[t, k] * (((up + 1) * gate * torch.sigmoid(gate * ALPHA)) @ w2[e] + b2[e])
    return y


def gpt_oss_experts(backend, num_experts=5, d=6, f=4, seed=0):
    torch.manual_seed(seed)
    experts = Experts(d, f, num_experts, activation="clamped_swiglu", backend=backend, bias=True).double()
    with torch.no_grad():  # large enough that both clamps are active on some rows
        experts.w1.normal_(std=2.0)
        experts.b1.normal_(std=2.0)
        experts.b2.normal_()
    return experts


def routing(num_tokens, num_experts, top_k, seed=1):
    generator = torch.Generator().manual_seed(seed)
    indices = torch.rand(num_tokens, num_experts, generator=generator).argsort(dim=1)[:, :top_k]
    indices[0] = torch.arange(top_k)  # expert 0 always used; the last expert may get no tokens
    weights = torch.rand(num_tokens, top_k, generator=generator, dtype=torch.float64)
    return indices, weights


@pytest.mark.parametrize("backend", ["loop", "torch"])
@pytest.mark.parametrize("all_rows", [False, True])
def test_clamped_swiglu_experts_equal_brute_force_in_forward_and_every_gradient(backend, all_rows, monkeypatch):
    if all_rows:  # the fused function's GPU / compiled schedule, run on the CPU
        monkeypatch.setattr(fused, "_in_expert_blocks", lambda x: False)
    experts = gpt_oss_experts(backend)
    indices, weights = routing(7, 5, 2)
    indices[indices == 4] = 3  # expert 4 gets no tokens: its gradients are exact zeros
    x = torch.randn(7, 6, dtype=torch.float64, requires_grad=True)
    weights.requires_grad_(True)
    y, stats = experts(x, indices, weights)
    params = [experts.w1, experts.w2, experts.b1, experts.b2]
    grad_y = torch.randn_like(y)
    ours = torch.autograd.grad(y, [x, weights, *params], grad_y)
    reference = brute_force_experts(x, indices, weights, *params)
    expected = torch.autograd.grad(reference, [x, weights, *params], grad_y)
    torch.testing.assert_close(y, reference)
    for got, want in zip(ours, expected):
        torch.testing.assert_close(got, want)
    h = torch.einsum("td,edh->teh", x, experts.w1) + experts.b1  # both clamps were exercised by the probe
    assert bool((h[..., :4] > LIMIT).any()) and bool((h[..., 4:].abs() > LIMIT).any())
    assert torch.equal(stats.tokens_per_expert, torch.bincount(indices.reshape(-1), minlength=5))


@pytest.mark.parametrize("all_rows", [False, True])
def test_fused_clamped_swiglu_passes_gradcheck_in_float64(all_rows, monkeypatch):
    if all_rows:
        monkeypatch.setattr(fused, "_in_expert_blocks", lambda x: False)
    experts = gpt_oss_experts("torch", num_experts=3, d=4, f=3)
    indices, weights = routing(5, 3, 2)
    pairs = sort_pairs(indices, 3)
    gate_N = weights.reshape(-1)[pairs.order_N].detach().requires_grad_(True)
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    params = [p.detach().clone().requires_grad_(True) for p in (experts.w1, experts.w2, experts.b1, experts.b2)]

    def run(x, gate_N, w1, w2, b1, b2):
        return fused.gather_ffn_combine(x, gate_N, pairs.token_ids_N, pairs.tokens_per_expert_E,
                                        experts.activation_spec, (w1, w2), biases=(b1, b2))[0]

    assert torch.autograd.gradcheck(run, (x, gate_N, *params))


def test_megablocks_refuses_the_variant_in_one_line_and_auto_never_picks_it(monkeypatch):
    import lightning_moe.experts as experts_module
    from lightning_moe.experts.megablocks import megablocks_experts

    experts = Experts(4, 3, 2, activation="clamped_swiglu", bias=True)
    with pytest.raises(ConfigError, match="backend='megablocks' does not support expert biases or"):
        megablocks_experts(experts, torch.randn(3, 4), torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1), False)
    monkeypatch.setattr(experts_module, "auto_backend", lambda device, dtype: "megablocks")  # as on a GPU with it
    assert experts.resolved_backend(torch.randn(3, 4)) == "torch"
    assert Experts(4, 3, 2).resolved_backend(torch.randn(3, 4)) == "megablocks"


def test_bad_clamped_swiglu_constants_are_refused():
    with pytest.raises(ConfigError, match="swiglu_limit must be a finite number > 0"):
        Experts(4, 3, 2, activation="clamped_swiglu", swiglu_limit=0.0)
