"""DenseMixer: Top-K forward, the dense mixture's router gradient, Top-K's expert gradients, bounded memory."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_moe import MoELayer
from lightning_moe.errors import ConfigError

D, HIDDEN, E, T = 12, 10, 6, 40


def make_pair(top_k, backend, renormalize=False, **topk_args):
    """A densemixer layer and a topk layer with the same parameters."""
    torch.manual_seed(0)
    args = {"renormalize": renormalize, **topk_args}
    dense = MoELayer(D, HIDDEN, E, top_k, estimator="densemixer", backend=backend, estimator_args=args)
    dense.experts.reset_parameters(std=0.3)
    topk = MoELayer(D, HIDDEN, E, top_k, estimator="topk", backend=backend, estimator_args=args)
    topk.load_state_dict(dense.state_dict())
    return dense, topk


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, D, generator=g), torch.randn(T, D, generator=g)


def run(layer, x, grad_out, seed=2):
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)
    y = layer(x)
    y.backward(grad_out)
    grads = {name: p.grad.clone() for name, p in layer.named_parameters()}
    return y.detach(), x.grad, grads


def reference(layer, x, grad_out, renormalize):
    """DenseMixer's dense mixture written out in float64 (Yao et al., 2025).

    y = sparse.detach() + dense - dense.detach(), dense = sum_i w_i E_i(x) over ALL experts,
    where each E_i(x) passes gradient only on the tokens that chose i; with renormalisation
    the unchosen w_i use the detached normaliser. The chosen set is taken from the layer's
    own float32 logits (a discrete choice, not part of the gradient).
    """
    with torch.no_grad():
        chosen_TK = (x @ layer.router.weight.T).softmax(-1).topk(layer.top_k, dim=-1).indices
    chosen_TE = torch.zeros(T, E, dtype=torch.float64).scatter(1, chosen_TK, 1.0)
    ex = layer.experts
    params = {name: p.detach().double().requires_grad_(True) for name, p in layer.named_parameters()}
    x64 = x.double().requires_grad_(True)
    probs_TE = (x64 @ params["router.weight"].T).softmax(-1)
    if renormalize:
        norm_T1 = (probs_TE * chosen_TE).sum(-1, keepdim=True)
        w_TE = probs_TE * chosen_TE / norm_T1 + probs_TE * (1 - chosen_TE) / norm_T1.detach()
    else:
        w_TE = probs_TE
    dense_TD = torch.zeros(T, D, dtype=torch.float64)
    sparse_TD = torch.zeros(T, D, dtype=torch.float64)
    for e in range(E):
        gate, up = params["experts.w1"][e].chunk(2, dim=1)
        out = F.silu(x64 @ gate) * (x64 @ up) @ params["experts.w2"][e]
        keep_T1 = chosen_TE[:, e : e + 1]
        out = out * keep_T1 + out.detach() * (1 - keep_T1)
        dense_TD = dense_TD + w_TE[:, e : e + 1] * out
        sparse_TD = sparse_TD + keep_T1 * w_TE[:, e : e + 1] * out
    assert ex.activation == "swiglu"
    y = sparse_TD.detach() + dense_TD - dense_TD.detach()
    y.backward(grad_out.double())
    return sparse_TD.detach(), x64.grad, {name: p.grad for name, p in params.items()}


@pytest.mark.parametrize("backend", ["loop", "torch"])
@pytest.mark.parametrize("top_k,renormalize", [(1, False), (2, False), (2, True), (3, True)])
def test_gradients_equal_float64_dense_mixture(backend, top_k, renormalize):
    dense, _ = make_pair(top_k, backend, renormalize)
    x, grad_out = inputs()
    y, x_grad, grads = run(dense, x, grad_out)
    y_ref, x_grad_ref, grads_ref = reference(dense, x, grad_out, renormalize)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x_grad.double(), x_grad_ref, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad.double(), grads_ref[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("backend", ["loop", "torch"])
@pytest.mark.parametrize("renormalize", [False, True])
def test_forward_and_expert_gradients_are_topk_bit_for_bit(backend, renormalize):
    # Router jitter and a selection bias on: the forward must still be Top-K's exactly.
    dense, topk = make_pair(2, backend, renormalize, jitter_eps=0.1)
    for layer in (dense, topk):
        layer.use_selection_bias = True
        layer.selection_bias.copy_(torch.linspace(-0.05, 0.05, E))
    x, grad_out = inputs()
    y, _, grads = run(dense, x, grad_out)
    y_topk, _, grads_topk = run(topk, x, grad_out)
    assert torch.equal(y, y_topk)
    for name in ("experts.w1", "experts.w2"):
        assert torch.equal(grads[name], grads_topk[name]), name
    # The router's gradient is the dense one, not Top-K's.
    assert not torch.allclose(grads["router.weight"], grads_topk["router.weight"], rtol=1e-3, atol=1e-6)


def test_eval_and_no_grad_add_nothing():
    dense, topk = make_pair(2, "loop")
    x, _ = inputs()
    with torch.no_grad():
        assert torch.equal(dense(x), topk(x))
        dense.eval(), topk.eval()
        assert torch.equal(dense(x), topk(x))


def test_refuses_expert_parallelism():
    dense, _ = make_pair(2, "loop")
    x, _ = inputs()
    routing = dense.estimator.route(dense.router(x), 2)
    dense.experts.expert_parallel = object()  # what ExpertParallelStrategy sets on a sharded layer
    with pytest.raises(ConfigError, match="expert parallelism"):
        dense.estimator.output_correction(routing, x, dense.experts)


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an operator returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def saved_bytes(layer, x):
    """Bytes of the tensors autograd saves for backward in one forward (each storage once)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    return sum(storages.values())


@pytest.mark.parametrize("backend", ["loop", "torch"])
def test_never_allocates_a_tokens_by_experts_by_width_tensor(backend):
    # Wide D and many experts, narrow F: any [T, E, D] tensor would dwarf every legitimate one.
    t, d, f, e, k = 64, 32, 4, 16, 2
    torch.manual_seed(0)
    dense = MoELayer(d, f, e, k, estimator="densemixer", backend=backend)
    topk = MoELayer(d, f, e, k, estimator="topk", backend=backend)
    topk.load_state_dict(dense.state_dict())
    x = torch.randn(t, d, requires_grad=True)

    recorder = LargestTensor()
    with recorder:
        dense(x).sum().backward()
    assert recorder.largest < t * e * d / 4, recorder.largest
    assert dense.router.weight.grad.abs().sum() > 0

    # What densemixer keeps for backward beyond Top-K: a few [T, E] routing tensors at most
    # (x is Top-K's own saved input), nowhere near one [T, E, D] tensor.
    extra = saved_bytes(dense, x) - saved_bytes(topk, x)
    assert 0 < extra <= 4 * t * e * 4, extra


def test_bf16_autocast_gradient_close_to_float32():
    dense, _ = make_pair(2, "torch", renormalize=True)
    x, grad_out = inputs()
    _, _, grads32 = run(dense, x, grad_out)
    dense.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = dense(x)
    y.float().backward(grad_out)
    g16, g32 = dense.router.weight.grad.flatten(), grads32["router.weight"].flatten()
    assert F.cosine_similarity(g16, g32, dim=0) > 0.99
