"""Block inspection decides the routing by running the block's own router on a probe, not by attribute names."""

import copy
import types

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_hf_convert import COMMON, eval_logits, hf_layout_grads, input_ids, make_model  # noqa: E402

from lightning_moe import MoELayer  # noqa: E402
from lightning_moe.errors import ConfigError  # noqa: E402
from lightning_moe.hf import HFMoEBlock, from_hf, to_hf  # noqa: E402

# Jamba: softmax top-k WITHOUT renormalisation, and no norm_topk_prob attribute to say so. Its
# Mamba layers run transformers' reference PyTorch scan on CPU. Layers 1 and 3 are MoE blocks.
JAMBA = dict(
    **{**COMMON, "num_hidden_layers": 4}, intermediate_size=16, num_experts=4, num_experts_per_tok=2,
    expert_layer_period=2, expert_layer_offset=1, attn_layer_period=2, attn_layer_offset=0, use_mamba_kernels=False,
    mamba_d_state=4, mamba_d_conv=4, mamba_expand=2,
)


def make_jamba(**overrides):
    torch.manual_seed(0)
    config = transformers.JambaConfig(**{**JAMBA, **overrides})
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("router.weight"):
                p.normal_(std=0.5)
    return model


def moe_layers_of(model):
    return [m for m in model.modules() if isinstance(m, MoELayer)]


def test_jamba_converts_as_softmax_topk_without_renormalisation():
    original = make_jamba()
    model = from_hf(copy.deepcopy(original))
    layers = moe_layers_of(model)
    assert len(layers) == 2 and all(not layer.estimator.renormalize for layer in layers)
    ids = input_ids()
    assert (eval_logits(model, ids) - eval_logits(original, ids)).abs().max() <= 1e-5


def test_jamba_training_gradients_and_export_equal_the_original():
    original = make_jamba()
    model = from_hf(copy.deepcopy(original), estimator="topk", backend="loop")
    ids = input_ids(1)
    for m in (model, original):
        m.train()
        m(ids, labels=ids).loss.backward()
    ours, theirs = hf_layout_grads(model), {name: p.grad for name, p in original.named_parameters()}
    assert ours.keys() == theirs.keys()
    for name, grad in theirs.items():
        torch.testing.assert_close(ours[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    with torch.no_grad():  # the same training step on both
        for m in (model, original):
            for p in m.parameters():
                p.sub_(0.1 * p.grad)
    ids = input_ids(2)
    to_hf(model)
    assert not any(isinstance(m, HFMoEBlock) for m in model.modules())
    assert (eval_logits(model, ids) - eval_logits(original, ids)).abs().max() <= 1e-5


def test_jamba_aux_loss_equals_the_originals():
    original = make_jamba(router_aux_loss_coef=0.3)
    model = from_hf(copy.deepcopy(original))
    ids = input_ids(3)
    ours, theirs = (m(ids, labels=ids, output_router_logits=True) for m in (model.train(), original.train()))
    assert len(ours.router_logits) == len(theirs.router_logits) == 2
    torch.testing.assert_close(ours.aux_loss, theirs.aux_loss, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=0, atol=1e-6)


def mislabel(router, **attributes):
    for name, value in attributes.items():
        setattr(router, name, value)


@pytest.mark.parametrize(
    "attributes",
    [
        dict(norm_topk_prob=False),  # says "not renormalised"; Mixtral's router renormalises
        dict(router_jitter_noise=0.1),  # PhiMoE's sparsemixer attribute on a softmax router
    ],
)
def test_routing_comes_from_the_probe_not_from_attribute_names(attributes):
    original = make_model("mixtral")
    model = copy.deepcopy(original)
    for layer in model.model.layers:
        mislabel(layer.mlp.gate, **attributes)
    from_hf(model)
    layer = moe_layers_of(model)[0]
    assert type(layer.estimator).__name__ == "TopK" and layer.estimator.renormalize
    ids = input_ids()
    assert (eval_logits(model, ids) - eval_logits(original, ids)).abs().max() <= 1e-5


def unchanged_after_refusal(model):
    before = {name: p.clone() for name, p in model.state_dict().items()}
    with pytest.raises(ConfigError) as err:
        from_hf(model)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(isinstance(m, HFMoEBlock) for m in model.modules())
    message = str(err.value)
    assert "\n" not in message, message
    return message


def test_minimax_m2_is_refused_in_one_line_naming_the_family():
    config = transformers.MiniMaxM2Config(
        **COMMON, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2, head_dim=8,
        bos_token_id=0, eos_token_id=1,
    )
    torch.manual_seed(0)
    message = unchanged_after_refusal(transformers.AutoModelForCausalLM.from_config(config))
    assert message.startswith("cannot convert minimax_m2: MiniMaxM2SparseMoeBlock has "), message
    assert "e_score_correction_bias" in message, message


def test_a_router_that_raises_is_refused_in_one_line():
    model = make_model("qwen3_moe")

    def broken(hidden_states):
        raise RuntimeError("this router needs a kernel that is not here\nsecond line")

    model.model.layers[0].mlp.gate.forward = broken
    message = unchanged_after_refusal(model)
    assert message.startswith("cannot convert qwen3_moe: Qwen3MoeSparseMoeBlock has a router that"), message
    assert "RuntimeError: this router needs a kernel that is not here" in message, message


def test_a_router_computing_something_else_is_refused():
    model = make_model("olmoe")
    router = model.model.layers[1].mlp.gate

    def tempered(self, hidden_states):  # weights from softmax(logits / 2): no candidate computes that
        logits, _, indices = type(self).forward(self, hidden_states)
        weights = torch.softmax(logits.float() / 2, dim=-1).gather(1, indices)
        return logits, weights, indices

    router.forward = types.MethodType(tempered, router)
    message = unchanged_after_refusal(model)
    assert message.startswith("cannot convert olmoe: OlmoeSparseMoeBlock has a router whose output is none of"), message


MINIMAX_CONFIG = (
    '{"model_type": "minimax_m2", "vocab_size": 512, "hidden_size": 32, "intermediate_size": 16, "num_hidden_layers": 1,'
    ' "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 16, "num_local_experts": 4, "bos_token_id": 0,'
    ' "eos_token_id": 1}'
)


def test_the_cli_refuses_an_unsupported_family_in_one_line(tmp_path, monkeypatch):
    from test_bad_inputs import ROOT, run_in_process

    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    args = ["fit", "--config", "recipes/posttrain_tiny_offline.yaml", "--model.pretrained", "null",
            "--model.config", MINIMAX_CONFIG]
    code, stderr = run_in_process(args)
    assert code == 2 and len(stderr.splitlines()) == 1, stderr
    assert stderr.startswith("error: cannot convert minimax_m2: MiniMaxM2SparseMoeBlock has a router"), stderr
