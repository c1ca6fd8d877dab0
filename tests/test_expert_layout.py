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


# ---- a whole training run saved with the earlier layout resumes exactly ----------------


def _split_to_earlier_layout(checkpoint, module):
    """Rewrite a checkpoint of ``module`` as the earlier layout would have saved it (weights and AdamW)."""
    state_dict = checkpoint["state_dict"]
    for key in [k for k in state_dict if k.endswith("experts.w1")]:
        gate, up = state_dict[key].chunk(2, dim=2)
        state_dict[key], state_dict[key[:-2] + "v1"] = gate.clone(), up.clone()
    optimizer = checkpoint["optimizer_states"][0]
    old_state, index = {}, 0
    for group, (_, params) in zip(optimizer["param_groups"], module.parameter_groups()):
        ids = []
        for (name, _), saved_index in zip(params, group["params"]):
            entry = optimizer["state"][saved_index]
            if name.endswith("experts.w1"):  # v1 followed w1 in the earlier parameter order
                halves = [{k: v.chunk(2, dim=2)[h].clone() if v.ndim == 3 else v for k, v in entry.items()}
                          for h in (0, 1)]
                old_state[index], old_state[index + 1] = halves
                ids += [index, index + 1]
                index += 2
            else:
                old_state[index] = entry
                ids.append(index)
                index += 1
        group["params"] = ids
    optimizer["state"] = old_state


def test_a_run_checkpointed_with_the_earlier_layout_resumes_bit_for_bit(tmp_path):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_moe.data import TextDataModule
    from lightning_moe.module import MoELanguageModel

    from helpers import fit_quietly

    corpus = tmp_path / "corpus.py"
    corpus.write_text("".join(f"def g{i}(x):\n    return x * {i} - {i % 5}\n" for i in range(60)))

    def run(ckpt_path=None):
        L.seed_everything(0)
        module = MoELanguageModel(d_model=16, n_heads=2, n_layers=2, max_seq_len=16, warmup_steps=1,
                                  moe={"num_experts": 4, "top_k": 2, "ffn_hidden": 8, "backend": "torch"})
        data = TextDataModule(source=str(corpus), seq_len=16, batch_size=4, cache_dir=str(tmp_path / "cache"))
        losses = {}

        class Record(L.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                losses[trainer.global_step - 1] = outputs["loss"].item()

        saves = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{step}", every_n_train_steps=1, save_top_k=-1)
        fit_quietly(module, data, [Record(), saves], ckpt_path=ckpt_path, max_steps=4, limit_val_batches=0,
                    enable_checkpointing=True)
        return module, losses

    module, full = run()
    checkpoint = torch.load(tmp_path / "ckpt" / "step=2.ckpt", weights_only=False)
    _split_to_earlier_layout(checkpoint, module)
    assert any(k.endswith("experts.v1") for k in checkpoint["state_dict"])
    torch.save(checkpoint, tmp_path / "earlier.ckpt")
    expected = {k: v.clone() for k, v in module.state_dict().items()}

    resumed, losses = run(ckpt_path=tmp_path / "earlier.ckpt")
    assert losses == {s: full[s] for s in (2, 3)}
    for key, value in expected.items():
        assert torch.equal(resumed.state_dict()[key], value), key
    # Without training: the weights alone load strictly.
    MoELanguageModel.load_from_checkpoint(tmp_path / "earlier.ckpt", map_location="cpu")
