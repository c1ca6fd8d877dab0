"""Every backend equals the loop reference; E = 1 equals a dense FFN (DESIGN §5)."""

import pytest
import torch
import torch.nn.functional as F

from lightning_moe.experts import Experts, fused, grouped_gemm

from helpers import routing_cases, run_backend


# CPU: all experts in one block, some, one each; None: every row at once, as on a GPU (on the grouped
# kernel for aligned rows, per segment for odd ones)
@pytest.mark.parametrize("block_rows", [2048, 5, 0, None])
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("d_model,ffn_hidden", [(16, 32), (6, 10)])  # aligned and odd rows
@pytest.mark.parametrize("case", list(routing_cases()), ids=lambda c: c[0])
def test_torch_backend_matches_loop(case, activation, d_model, ffn_hidden, block_rows, monkeypatch):
    if block_rows is None:
        monkeypatch.setattr(grouped_gemm, "PER_SEGMENT_DEVICES", ())
    else:
        monkeypatch.setattr(fused, "BLOCK_ROWS", block_rows)
    _, E, indices = case
    experts = Experts(d_model, ffn_hidden, E, activation=activation)
    T, K = indices.shape
    x = torch.randn(T, d_model)
    weights = torch.rand(T, K)
    y_ref, stats_ref, grads_ref = run_backend(experts, "loop", x, indices, weights)
    y, stats, grads = run_backend(experts, "torch", x, indices, weights)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(stats.tokens_per_expert, stats_ref.tokens_per_expert)
    torch.testing.assert_close(stats.output_sum, stats_ref.output_sum, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.weighted_output_sum, stats_ref.weighted_output_sum, rtol=1e-5, atol=1e-6)
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-5, atol=1e-6, msg=name)


def test_tokens_per_expert_counts_pairs():
    experts = Experts(8, 8, 5)
    indices = torch.tensor([[0, 1], [0, 4], [4, 1]])
    _, stats = experts(torch.randn(3, 8), indices, torch.ones(3, 2))
    assert stats.tokens_per_expert.tolist() == [2, 2, 0, 0, 2]


def test_output_sums_match_hand_computation():
    experts = Experts(8, 16, 3, activation="gelu", backend="torch")
    x = torch.randn(4, 8)
    indices = torch.tensor([[0], [2], [0], [0]])
    weights = torch.tensor([[0.5], [0.25], [2.0], [1.0]])
    _, stats = experts(x, indices, weights, return_output_sums=True)

    def ffn(e, x_row):
        return F.gelu(x_row @ experts.w1[e]) @ experts.w2[e]

    with torch.no_grad():
        expected0 = ffn(0, x[0]) + ffn(0, x[2]) + ffn(0, x[3])
        weighted0 = 0.5 * ffn(0, x[0]) + 2.0 * ffn(0, x[2]) + ffn(0, x[3])
    torch.testing.assert_close(stats.output_sum[0], expected0)
    torch.testing.assert_close(stats.weighted_output_sum[0], weighted0)
    torch.testing.assert_close(stats.output_sum[1], torch.zeros(8))


@pytest.mark.parametrize("backend", ["loop", "torch"])
def test_single_expert_equals_dense_swiglu_ffn(backend):
    d, f, T = 8, 12, 7
    experts = Experts(d, f, 1, activation="swiglu", backend=backend)
    x = torch.randn(T, d)
    y, _ = experts(x, torch.zeros(T, 1, dtype=torch.long), torch.ones(T, 1))
    gate, up, w2 = experts.w1[0, :, :f].detach(), experts.w1[0, :, f:].detach(), experts.w2[0].detach()
    expected = (F.silu(x @ gate) * (x @ up)) @ w2  # a dense SwiGLU FFN
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)


def test_cpu_runs_per_segment_and_aligned_shapes_elsewhere_use_grouped_mm(monkeypatch):
    calls = []
    real = torch._grouped_mm

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(grouped_gemm.torch, "_grouped_mm", counting)
    indices = torch.randint(0, 4, (9, 2))
    Experts(16, 32, 4, backend="torch")(torch.randn(9, 16), indices, torch.rand(9, 2))
    assert calls == []  # CPU: one torch.mm per segment
    monkeypatch.setattr(grouped_gemm, "PER_SEGMENT_DEVICES", ())  # as on a device where the kernel takes them
    Experts(16, 32, 4, backend="torch")(torch.randn(9, 16), indices, torch.rand(9, 2))
    assert len(calls) == 2  # gate and up side by side in one, then down
    calls.clear()
    Experts(6, 10, 4, backend="torch")(torch.randn(9, 6), indices, torch.rand(9, 2))
    assert calls == []  # rows not 16-byte aligned


def test_per_segment_matmul_writes_into_the_buffer_it_is_given():
    x = torch.randn(7, 4)
    w = torch.randn(3, 4, 5)
    segments = grouped_gemm.Segments(torch.tensor([2, 0, 5]), 7)
    out = torch.full((7, 5), float("nan"))
    result = grouped_gemm.grouped_mm(x, w, segments, out=out)
    assert result.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out, torch.cat([x[:2] @ w[0], x[2:] @ w[2]]))
    grad = torch.randn(7, 5)
    torch.testing.assert_close(
        grouped_gemm.grouped_mm_weight_grad(x, grad, segments),
        torch.stack([x[:2].t() @ grad[:2], torch.zeros(4, 5), x[2:].t() @ grad[2:]]),
    )


def test_bf16_autocast_runs_in_bf16_and_matches_fp32_loosely():
    experts = Experts(16, 32, 4, backend="torch")
    x = torch.randn(20, 16)
    indices = torch.randint(0, 4, (20, 2))
    weights = torch.rand(20, 2)
    y32, _ = experts(x, indices, weights)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16, _ = experts(x, indices, weights)
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y32, rtol=5e-2, atol=5e-3)


def test_invalid_names_list_valid_choices():
    with pytest.raises(ValueError, match="backend='cuda'.*loop"):
        Experts(8, 8, 2, backend="cuda")
    with pytest.raises(ValueError, match="activation='relu'.*swiglu"):
        Experts(8, 8, 2, activation="relu")
