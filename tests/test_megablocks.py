"""The ``megablocks`` backend.

On CPU: its plumbing (sorting, bins, segment sizes, dtypes, weights, stats) runs with
plain-torch stand-ins for MegaBlocks' gather/scatter and grouped_gemm's ``gmm`` that
implement those kernels' contracts and check their inputs, and must equal the ``loop``
reference in forward and every gradient; the errors for a missing GPU, a non-bf16
compute dtype and missing packages are checked by monkeypatching. On a GPU (``gpu``
marker, skipped elsewhere) the real kernels are compared with ``loop`` in bf16 for
every registered estimator, and a small model is fitted with ``precision="bf16-mixed"``.
"""

import copy
import math
import sys

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import lightning_moe.experts.megablocks as mb
from lightning_moe import MoELayer, available_estimators
from lightning_moe.experts import Experts, get_backend
from lightning_moe.model import MoEConfig
from lightning_moe.module import MoELanguageModel

from helpers import FakeKernels, routing_cases, run_backend, use_fake_kernels


def reference_layer(estimator: str, d_model: int, num_experts: int, device: str = "cpu") -> MoELayer:
    """An MoELayer on the loop backend; Default MoE gets non-zero defaults so they reach the router."""
    torch.manual_seed(0)
    top_k = 1 if estimator == "sparsemixer" else 2  # SparseMixer v1 is top-1 only
    layer = MoELayer(d_model, 2 * d_model, num_experts, top_k, estimator=estimator, backend="loop").to(device)
    if hasattr(layer.estimator, "attach_updater"):
        layer.estimator.attach_updater()
        layer.estimator.default_outputs.normal_()
    return layer


def layer_results_per_backend(reference: MoELayer, backends, x, autocast_dtype=None) -> dict:
    """Forward + backward of a copy of ``reference`` per backend: {backend: (y, x.grad, param grads)}."""
    grad_out = torch.linspace(-1, 1, x.numel(), device=x.device).reshape(x.shape)
    results = {}
    for backend in backends:
        layer = copy.deepcopy(reference)
        layer.experts.backend = backend
        torch.manual_seed(1)  # the stochastic estimators draw the same routing on every backend
        xb = x.clone().requires_grad_(True)
        with torch.autocast(x.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            y = layer(xb)
        y.float().backward(grad_out)
        grads = {name: p.grad for name, p in layer.named_parameters() if p.grad is not None}
        results[backend] = (y.detach(), xb.grad, grads)
    return results


# --- CPU: plumbing against the loop reference ------------------------------------------


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("case", list(routing_cases()), ids=lambda c: c[0])
def test_plumbing_matches_loop_in_forward_and_all_gradients(monkeypatch, case, activation):
    _, E, indices = case
    use_fake_kernels(monkeypatch, FakeKernels(indices))
    experts = Experts(16, 24, E, activation=activation)
    T, K = indices.shape
    x, weights = torch.randn(T, 16), torch.rand(T, K)
    y_ref, stats_ref, grads_ref = run_backend(experts, "loop", x, indices, weights)
    y, stats, grads = run_backend(experts, "megablocks", x, indices, weights)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(stats.tokens_per_expert, stats_ref.tokens_per_expert)
    torch.testing.assert_close(stats.output_sum, stats_ref.output_sum, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.weighted_output_sum, stats_ref.weighted_output_sum, rtol=1e-5, atol=1e-6)
    assert grads.keys() == grads_ref.keys() == {"x", "weights", "w1", "w2"}
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-5, atol=1e-6, msg=name)


def test_expert_gemms_run_in_the_autocast_dtype_and_match_loop(monkeypatch):
    indices = torch.randint(0, 4, (20, 2))
    kernels = FakeKernels(indices)
    use_fake_kernels(monkeypatch, kernels)
    experts = Experts(16, 32, 4)
    x, weights = torch.randn(20, 16), torch.rand(20, 2)
    y_ref, _, grads_ref = run_backend(experts, "loop", x, indices, weights, autocast_dtype=torch.bfloat16)
    y, _, grads = run_backend(experts, "megablocks", x, indices, weights, autocast_dtype=torch.bfloat16)
    assert kernels.gmm_dtypes == [torch.bfloat16] * 2  # gate and up side by side, then down
    assert y.dtype == torch.bfloat16
    assert grads["weights"].dtype == grads["w1"].dtype == torch.float32  # leaves keep their own dtype
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=2e-2, atol=2e-3)
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=2e-2, atol=2e-3, msg=name)


def test_zero_token_experts_get_zero_weight_gradients_even_if_gmm_leaves_them_unwritten(monkeypatch):
    indices = torch.randint(0, 2, (9, 1))  # experts 2 and 3 get nothing
    use_fake_kernels(monkeypatch, FakeKernels(indices, nan_for_empty_experts=True))
    experts = Experts(8, 16, 4)
    x, weights = torch.randn(9, 8), torch.rand(9, 1)
    _, _, grads_ref = run_backend(experts, "loop", x, indices, weights)
    _, _, grads = run_backend(experts, "megablocks", x, indices, weights)
    for name in ("w1", "w2"):
        assert torch.equal(grads[name][2:], torch.zeros_like(grads[name][2:])), name
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-5, atol=1e-6, msg=name)


def test_no_tokens_gives_zero_output_and_stats(monkeypatch):
    indices = torch.zeros(0, 2, dtype=torch.long)
    use_fake_kernels(monkeypatch, FakeKernels(indices))
    experts = Experts(8, 16, 3)
    y, stats = get_backend("megablocks")(experts, torch.randn(0, 8), indices, torch.rand(0, 2), True)
    assert y.shape == (0, 8)
    assert stats.tokens_per_expert.tolist() == [0, 0, 0]
    assert torch.equal(stats.output_sum, torch.zeros(3, 8))


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_no_tokens_still_give_every_expert_parameter_and_the_weights_an_exact_zero_gradient(monkeypatch, activation):
    # As on the loop reference: DDP with find_unused_parameters=False needs a gradient for
    # every parameter on a rank whose layer receives no tokens at all.
    use_fake_kernels(monkeypatch, FakeKernels())
    experts = Experts(8, 16, 3, activation=activation)
    for backend in ("loop", "torch", "megablocks"):
        experts.zero_grad(set_to_none=True)
        x, weights = torch.randn(0, 8, requires_grad=True), torch.rand(0, 2, requires_grad=True)
        y, _ = get_backend(backend)(experts, x, torch.zeros(0, 2, dtype=torch.long), weights, False)
        y.sum().backward()
        for name, p in experts.named_parameters():
            assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p)), (backend, name)
        assert weights.grad is not None and weights.grad.shape == (0, 2), backend
        assert x.grad is not None and x.grad.shape == (0, 8), backend


@pytest.mark.parametrize("estimator", available_estimators())
def test_layer_with_every_estimator_matches_loop_through_the_plumbing(monkeypatch, estimator):
    use_fake_kernels(monkeypatch, FakeKernels())
    results = layer_results_per_backend(reference_layer(estimator, 16, 6), ("loop", "megablocks"), torch.randn(15, 16))
    (y_ref, gx_ref, g_ref), (y, gx, g) = results["loop"], results["megablocks"]
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-6)
    assert g.keys() == g_ref.keys() and "router.weight" in g
    for name in g:
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-5, atol=1e-6, msg=name)


# --- CPU: clear errors ---------------------------------------------------------------------


def test_without_cuda_the_error_names_the_backend_and_the_alternatives(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    experts = Experts(8, 16, 2, backend="megablocks")
    with pytest.raises(RuntimeError, match=r"backend='megablocks' needs a CUDA GPU; use backend='torch' .* or 'auto'"):
        experts(torch.randn(3, 8), torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1))
    layer = MoELayer(8, 16, 2, 1, backend="megablocks")
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        layer(torch.randn(3, 8))


def test_cpu_input_is_refused_even_when_a_gpu_exists(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        mb.load_kernels(torch.device("cpu"), torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_non_bf16_compute_is_refused_with_the_fix(monkeypatch, dtype):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(RuntimeError, match=r"bfloat16 only.*bf16-mixed.*backend='torch'"):
        mb.load_kernels(torch.device("cuda"), dtype)


@pytest.mark.parametrize("dist,module", mb.PACKAGES, ids=[module for _, module in mb.PACKAGES])
def test_missing_package_error_says_what_to_install_and_where_the_doc_is(monkeypatch, dist, module):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    # None in sys.modules makes the import raise, even where the real package was imported before.
    monkeypatch.setitem(sys.modules, module, None)
    monkeypatch.setitem(sys.modules, module.split(".")[0], None)
    with pytest.raises(ImportError) as error:
        mb.load_kernels(torch.device("cuda"), torch.bfloat16)
    message = str(error.value)
    install = "pip install --no-build-isolation --no-deps stanford-stk==0.7.1 grouped_gemm==0.3.0 megablocks==0.10.0"
    assert install in message
    assert "docs/megablocks.md" in message and "backend='torch'" in message
    assert f"Missing: {dist}" in message or f"; {dist}" in message
    assert any(entry.startswith(dist) for entry in mb.missing_packages())


def test_install_doc_exists_and_holds_the_install_command():
    from pathlib import Path

    doc = Path(__file__).resolve().parents[1] / mb.INSTALL_DOC
    assert mb.INSTALL_COMMAND in doc.read_text()


# --- GPU: the real kernels -------------------------------------------------------------------


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    value, reference = value.float(), reference.float()
    return ((value - reference).norm() / reference.norm().clamp_min(1e-12)).item()


# bf16 backends differ from the bf16 loop only in accumulation order and where intermediate
# results are rounded; a wrong permutation, weight or segment gives errors of order 1.
BF16_REL_TOL = 2e-2
BACKENDS_ON_GPU = ("loop", "torch", "megablocks")  # the reference first


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("case", list(routing_cases()), ids=lambda c: c[0])
def test_gpu_backends_match_loop_in_bf16(case, activation):
    _, E, indices = case
    experts = Experts(64, 128, E, activation=activation).cuda()
    T, K = indices.shape
    indices = indices.cuda()
    x, weights = torch.randn(T, 64, device="cuda"), torch.rand(T, K, device="cuda")
    y_ref, stats_ref, grads_ref = run_backend(experts, "loop", x, indices, weights, autocast_dtype=torch.bfloat16)
    empty = stats_ref.tokens_per_expert == 0
    for backend in BACKENDS_ON_GPU[1:]:
        y, stats, grads = run_backend(experts, backend, x, indices, weights, autocast_dtype=torch.bfloat16)
        assert y.dtype == torch.bfloat16, backend
        assert relative_error(y, y_ref) < BF16_REL_TOL, backend
        assert torch.equal(stats.tokens_per_expert, stats_ref.tokens_per_expert), backend
        assert relative_error(stats.output_sum, stats_ref.output_sum) < BF16_REL_TOL, backend
        assert relative_error(stats.weighted_output_sum, stats_ref.weighted_output_sum) < BF16_REL_TOL, backend
        for name in grads:
            assert torch.isfinite(grads[name]).all(), (backend, name)
            assert relative_error(grads[name], grads_ref[name]) < BF16_REL_TOL, (backend, name)
        for name in ("w1", "w2"):
            if name in grads:
                assert not grads[name][empty].any(), (backend, name)  # zero-token experts: exactly zero


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [6, 512])  # 6 tokens x top-2 over 16 experts leaves experts empty
@pytest.mark.parametrize("estimator", available_estimators())
def test_gpu_layer_matches_loop_for_every_estimator(estimator, num_tokens):
    reference = reference_layer(estimator, 64, 16, device="cuda")
    x = torch.randn(num_tokens, 64, device="cuda")
    results = layer_results_per_backend(reference, BACKENDS_ON_GPU, x, autocast_dtype=torch.bfloat16)
    y_ref, gx_ref, g_ref = results["loop"]
    assert "router.weight" in g_ref
    for backend in BACKENDS_ON_GPU[1:]:
        y, gx, g = results[backend]
        assert relative_error(y, y_ref) < BF16_REL_TOL, backend
        assert relative_error(gx, gx_ref) < BF16_REL_TOL, backend
        assert g.keys() == g_ref.keys(), backend
        for name in g:
            assert torch.isfinite(g[name]).all(), (backend, name)
            assert relative_error(g[name], g_ref[name]) < BF16_REL_TOL, (backend, name)


@pytest.mark.gpu
def test_gpu_fp32_compute_is_refused():
    experts = Experts(64, 128, 4, backend="megablocks").cuda()
    indices = torch.randint(0, 4, (8, 2), device="cuda")
    with pytest.raises(RuntimeError, match="bfloat16 only"):
        experts(torch.randn(8, 64, device="cuda"), indices, torch.rand(8, 2, device="cuda"))


class LossRecorder(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def fit_bf16_mixed_on_megablocks(estimator: str, accelerator: str, steps: int = 20) -> list[float]:
    """Fit a small MoELanguageModel on one repeated batch; returns the training losses."""
    torch.manual_seed(0)
    top_k = 1 if estimator == "sparsemixer" else 2
    model = MoELanguageModel(
        d_model=64,
        n_layers=2,
        n_heads=2,
        max_seq_len=32,
        moe=MoEConfig(num_experts=8, top_k=top_k, estimator=estimator, backend="megablocks"),
        learning_rate=1e-2,
        warmup_steps=2,
        weight_decay=0.0,
    )
    w1_before = [layer.experts.w1.detach().clone() for layer in model.model.moe_layers()]
    tokens = torch.randint(0, 258, (4, 33))
    batches = (tokens[:, :-1].repeat(steps, 1), tokens[:, 1:].repeat(steps, 1))
    recorder = LossRecorder()
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=1,
        precision="bf16-mixed",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[recorder],
    )
    trainer.fit(model, DataLoader(TensorDataset(*batches), batch_size=4))
    assert len(recorder.losses) == steps
    assert all(math.isfinite(loss) for loss in recorder.losses)
    assert recorder.losses[-1] < recorder.losses[0] - 0.5
    for layer, w1 in zip(model.model.moe_layers(), w1_before):
        assert layer.experts.backend == "megablocks"
        assert not torch.equal(layer.experts.w1.detach().cpu(), w1.cpu())
    return recorder.losses


def test_fit_bf16_mixed_through_the_plumbing_on_cpu(monkeypatch):
    kernels = FakeKernels()
    use_fake_kernels(monkeypatch, kernels)
    fit_bf16_mixed_on_megablocks("default_moe", "cpu", steps=10)  # output sums and the EMA callback too
    assert kernels.gmm_dtypes and set(kernels.gmm_dtypes) == {torch.bfloat16}


@pytest.mark.gpu
@pytest.mark.parametrize("estimator", available_estimators())
def test_gpu_fit_bf16_mixed_on_megablocks(estimator):
    fit_bf16_mixed_on_megablocks(estimator, "gpu")


def _expert_parallel_on_gpus(rank: int, world: int, port: int, backend: str) -> None:
    """Rank r holds experts [r * E / world, ...); its outputs and gradients must match the loop on all experts."""
    import torch.distributed as dist

    from lightning_moe.experts.expert_parallel import ExpertShard, shard_experts

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # the same experts and data on every rank
        E, T, K = 4 * world, 256, 2
        full = Experts(64, 128, E).cuda()
        x_all = torch.randn(world, T, 64, device="cuda")
        weights_all = torch.rand(world, T, K, device="cuda")
        indices_all = torch.stack([torch.stack([torch.randperm(E)[:K] for _ in range(T)]) for _ in range(world)])
        y_ref, _, grads_ref = run_backend(
            full, "loop", x_all[rank], indices_all[rank].cuda(), weights_all[rank], autocast_dtype=torch.bfloat16
        )
        sharded = copy.deepcopy(full)
        sharded.backend = backend
        shard_experts(sharded, ExpertShard(dist.group.WORLD, rank, world, E))
        # Through Experts.forward (run_backend would call a single-process backend function).
        x = x_all[rank].clone().requires_grad_(True)
        w = weights_all[rank].clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y, _ = sharded(x, indices_all[rank].cuda(), w)
        y.float().backward(torch.linspace(-1, 1, y.numel(), device="cuda").reshape(y.shape))
        assert relative_error(y, y_ref) < BF16_REL_TOL
        assert relative_error(x.grad, grads_ref["x"]) < BF16_REL_TOL
        assert relative_error(w.grad, grads_ref["weights"]) < BF16_REL_TOL
        # This rank's expert gradients sum every rank's tokens: compare with the all-rank sum of the loop's.
        lo, hi = rank * 4, rank * 4 + 4
        for name, p in sharded.named_parameters():
            full_grad = grads_ref[name].clone()
            dist.all_reduce(full_grad)
            assert relative_error(p.grad, full_grad[lo:hi]) < BF16_REL_TOL, name
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="expert parallelism on GPUs needs two of them")
@pytest.mark.parametrize("backend", ["megablocks", "torch"])
def test_gpu_expert_parallel_matches_loop_on_two_gpus(backend):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_expert_parallel_on_gpus, args=(2, port, backend), nprocs=2, start_method="spawn")
