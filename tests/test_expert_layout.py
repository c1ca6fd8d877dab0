"""The one expert parameter layout: SwiGLU's gate and up projections side by side in ``w1`` [E, D, 2F],
and checkpoints of the earlier layout (``w1`` gate and ``v1`` up, each [E, D, F]) loading into it."""

import pytest
import torch
import torch.nn.functional as F

from lightning_moe import MoELayer
from lightning_moe.experts import Experts

E, D, HIDDEN, T = 4, 8, 6, 11


def old_layout_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w1": torch.randn(E, D, HIDDEN, generator=g),  # gate
        "v1": torch.randn(E, D, HIDDEN, generator=g),  # up
        "w2": torch.randn(E, HIDDEN, D, generator=g),
    }


def swiglu_mixture(state, x_TD, indices_TK, weights_TK):
    """sum_k weight_k * (silu(x gate_e) * (x up_e)) down_e from the earlier layout's tensors, by hand."""
    y = torch.zeros_like(x_TD)
    for t in range(x_TD.shape[0]):
        for e, w in zip(indices_TK[t].tolist(), weights_TK[t]):
            hidden = F.silu(x_TD[t] @ state["w1"][e]) * (x_TD[t] @ state["v1"][e])
            y[t] += w * (hidden @ state["w2"][e])
    return y


@pytest.mark.parametrize("backend", ["loop", "torch"])
def test_an_old_layout_state_dict_loads_and_computes_the_same_ffn(backend):
    state = old_layout_state()
    experts = Experts(D, HIDDEN, E, backend=backend)
    experts.load_state_dict(state)  # strict: no key left over or missing
    assert experts.w1.shape == (E, D, 2 * HIDDEN)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, D, generator=g)
    indices = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(T)])
    weights = torch.rand(T, 2, generator=g)
    y, _ = experts(x, indices, weights)
    torch.testing.assert_close(y, swiglu_mixture(state, x, indices, weights), rtol=1e-5, atol=1e-5)


def test_an_old_layout_layer_checkpoint_loads_under_its_prefix_with_gate_columns_first():
    state = {f"experts.{name}": value for name, value in old_layout_state().items()}
    layer = MoELayer(D, HIDDEN, E, 2)
    state["router.weight"] = layer.router.weight.detach().clone()
    result = layer.load_state_dict({**layer.state_dict(), **state}, strict=False)
    assert "experts.v1" not in result.unexpected_keys and not result.missing_keys
    assert torch.equal(layer.experts.w1[..., :HIDDEN], state["experts.w1"])
    assert torch.equal(layer.experts.w1[..., HIDDEN:], state["experts.v1"])
    assert torch.equal(layer.experts.w2, state["experts.w2"])


def test_gelu_experts_keep_one_first_projection_of_width_f():
    experts = Experts(D, HIDDEN, E, activation="gelu")
    assert experts.w1.shape == (E, D, HIDDEN)
    assert set(experts.state_dict()) == {"w1", "w2"}


def test_a_state_dict_of_the_new_layout_round_trips():
    source = Experts(D, HIDDEN, E)
    target = Experts(D, HIDDEN, E)
    target.load_state_dict(source.state_dict())
    assert torch.equal(target.w1, source.w1) and torch.equal(target.w2, source.w2)
