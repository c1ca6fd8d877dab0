"""DeepSeek-V3-family models (sigmoid group routing, selection bias, ungated shared experts) converted
to MoELayer and back, against the original transformers models themselves."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lightning_moe import MoELayer  # noqa: E402
from lightning_moe.callbacks.aux_loss_free import balancing_update  # noqa: E402
from lightning_moe.errors import ConfigError  # noqa: E402
from lightning_moe.hf import HFMoEBlock, from_hf, to_hf  # noqa: E402
from test_hf_convert import VOCAB, assert_same_training_gradients, eval_logits, input_ids  # noqa: E402
COMMON = dict(
    vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=64, tie_word_embeddings=False,
)
MLA = dict(num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)
FAMILIES = {
    # name: (config class, family arguments); every router has a selection bias, the first three groups and scaling
    "deepseek_v3": ("DeepseekV3Config", dict(
        intermediate_size=32, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=3, n_group=4,
        topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True, first_k_dense_replace=1, **MLA)),
    "glm4_moe": ("Glm4MoeConfig", dict(
        intermediate_size=32, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
        topk_group=1, routed_scaling_factor=1.8, norm_topk_prob=True, first_k_dense_replace=0, head_dim=8)),
    "dots1": ("Dots1Config", dict(
        intermediate_size=32, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2, n_group=1,
        topk_group=1, routed_scaling_factor=2.0, norm_topk_prob=False, first_k_dense_replace=0, n_shared_experts=1,
        head_dim=8)),
    "ernie4_5_moe": ("Ernie4_5_MoeConfig", dict(
        intermediate_size=32, moe_intermediate_size=16, moe_num_experts=8, moe_k=2, moe_layer_start_index=0,
        moe_num_shared_experts=1, head_dim=8)),
}
EXPECTED_ROUTING = {
    "deepseek_v3": "sigmoid top-3 renormalised, top-2 of 4 groups, scaled by 2.5, selection bias",
    "glm4_moe": "sigmoid top-2 renormalised, top-1 of 2 groups, scaled by 1.8, selection bias",
    "dots1": "sigmoid top-2, scaled by 2, selection bias",
    "ernie4_5_moe": "softmax top-2 renormalised, selection bias",
}


def selection_biases(model):
    return {n: t for n, t in [*model.named_buffers(), *model.named_parameters()] if n.endswith("e_score_correction_bias")}


def make_model(family, **overrides):
    config_cls, args = FAMILIES[family]
    config = getattr(transformers, config_cls)(**{**COMMON, **args, **overrides})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():  # routers and biases start at zero: give them real values
        for name, p in model.named_parameters():
            if name.endswith("gate.weight"):
                p.normal_(std=0.5)
        for bias in selection_biases(model).values():
            bias.copy_(torch.randn(bias.shape) * 0.1)
    return model.float()


@pytest.mark.parametrize("family", FAMILIES)
def test_converted_eval_logits_equal_the_original(family):
    model = make_model(family)
    original = copy.deepcopy(model)
    ids = input_ids()
    from_hf(model)
    blocks = [m for m in model.modules() if isinstance(m, HFMoEBlock)]
    assert blocks and all(b.spec.describe() == EXPECTED_ROUTING[family] for b in blocks)
    assert all(b.shared_experts is not None and b.moe.use_selection_bias for b in blocks)
    # The family's bias became the layer's.
    theirs = list(selection_biases(original).values())
    assert len(theirs) == len(blocks)
    for block, bias in zip(blocks, theirs):
        assert torch.equal(block.moe.selection_bias, bias.reshape(-1))
    assert (eval_logits(model, ids) - eval_logits(original, ids)).abs().max() <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_topk_training_gradients_equal_the_original_models_own(family):
    model = make_model(family)
    original = copy.deepcopy(model)
    from_hf(model, estimator="topk", backend="loop")
    assert_same_training_gradients(model, original)


@pytest.mark.parametrize("family", FAMILIES)
def test_export_round_trip_keeps_logits_and_the_moved_selection_bias(family, tmp_path):
    model = make_model(family)
    from_hf(model, estimator="densemixer")
    model.train()
    ids = input_ids(2)
    model(ids, labels=ids).loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.sub_(0.1 * p.grad)
        for _, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, MoELayer)]:
            balancing_update(layer.selection_bias, torch.arange(8.0), gamma=0.05)  # as AuxLossFreeBalancing does
    biases = [m.selection_bias.clone() for m in model.modules() if isinstance(m, MoELayer)]
    ids = input_ids(3)
    trained = eval_logits(model, ids)
    to_hf(model)
    model.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    assert type(reloaded) is type(make_model(family))
    exported = [b.detach().reshape(-1) for b in selection_biases(reloaded).values()]
    assert len(exported) == len(biases) and all(torch.equal(a, b) for a, b in zip(exported, biases))
    assert not torch.equal(biases[0], selection_biases(make_model(family)).popitem()[1].reshape(-1))  # it moved
    assert (eval_logits(reloaded, ids) - trained).abs().max() <= 1e-5


def test_densemixer_keeps_the_forward_and_gives_the_router_a_dense_gradient():
    model = make_model("deepseek_v3")
    original = copy.deepcopy(model)
    from_hf(model, estimator="densemixer")
    layer = next(m for m in model.modules() if isinstance(m, MoELayer))
    assert type(layer.estimator).__name__ == "DenseMixer" and layer.estimator.renormalize
    assert layer.scoring.score_function == "sigmoid" and layer.scoring.n_group == 4
    ids = input_ids()
    assert (eval_logits(model, ids) - eval_logits(original, ids)).abs().max() <= 1e-5
    topk = copy.deepcopy(original)
    from_hf(topk, estimator="topk")
    for m in (model, topk):
        m.train()
        m(ids, labels=ids).loss.backward()
    ours = next(m for m in model.modules() if isinstance(m, MoELayer)).router.weight.grad
    sparse = next(m for m in topk.modules() if isinstance(m, MoELayer)).router.weight.grad
    assert not torch.allclose(ours, sparse, rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize("estimator", ["sparsemixer_v2", "sparsemixer"])
def test_softmax_only_estimators_are_refused_in_one_line_before_anything_changes(estimator):
    model = make_model("glm4_moe")
    with pytest.raises(ConfigError) as err:
        from_hf(model, estimator=estimator)
    message = str(err.value)
    assert "\n" not in message and "glm4_moe" in message and "defined for softmax top-k routing only" in message
    assert not any(isinstance(m, HFMoEBlock) for m in model.modules())


def test_a_router_adding_its_bias_to_the_gates_is_refused():
    """The probe runs the router with a random bias: one that also adds it to the weights is not DeepSeek-V3's."""
    model = make_model("dots1")
    router = model.model.layers[0].mlp.gate
    forward = type(router).forward

    def biased_gates(self, hidden_states):
        logits, weights, indices = forward(self, hidden_states)
        return logits, weights + self.e_score_correction_bias[indices], indices

    for layer in model.model.layers:
        layer.mlp.gate.forward = biased_gates.__get__(layer.mlp.gate)
    with pytest.raises(ConfigError, match="cannot convert dots1: Dots1MoE has a router whose output is none of"):
        from_hf(model)


def test_deepseek_v2_group_limited_greedy_is_refused_and_greedy_converts():
    """DeepSeek-V2 scores a group by its best expert, not its two best: not representable, refused;
    its greedy routing (softmax top-k with a routed scaling factor) converts exactly."""
    args = dict(intermediate_size=32, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2, n_group=4,
                topk_group=2, first_k_dense_replace=0, routed_scaling_factor=1.5, **MLA)
    common = {**COMMON, **args}
    # topk_group=1: both experts from the group with the best expert (with 2 of 4 groups the choice is greedy's).
    grouped = transformers.DeepseekV2Config(**{**common, "topk_group": 1}, topk_method="group_limited_greedy")
    torch.manual_seed(0)
    with pytest.raises(ConfigError, match="cannot convert deepseek_v2: DeepseekV2Moe has a router whose output is none"):
        from_hf(transformers.AutoModelForCausalLM.from_config(grouped))
    greedy = transformers.DeepseekV2Config(**common, topk_method="greedy")
    model = transformers.AutoModelForCausalLM.from_config(greedy, attn_implementation="eager").float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gate.weight"):
                p.normal_(std=0.5)
    original = copy.deepcopy(model)
    from_hf(model)
    ids = input_ids()
    assert (eval_logits(model, ids) - eval_logits(original, ids)).abs().max() <= 1e-5


@pytest.mark.parametrize("family", ["deepseek_v3", "ernie4_5_moe"])
def test_meta_init_fills_the_selection_bias_from_the_checkpoint(family, tmp_path):
    """Built on meta and filled tensor by tensor, the layers route with the checkpoint's bias ([E] or [1, E])."""
    from lightning_moe.hf.module import HFMoELanguageModel

    make_model(family).save_pretrained(tmp_path)
    module = HFMoELanguageModel(pretrained=str(tmp_path), estimator="topk", meta_init=True, attn_implementation="eager")
    module.configure_model()
    saved = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    layers = [m for m in module.model.modules() if isinstance(m, MoELayer)]
    biases = list(selection_biases(saved).values())
    assert len(layers) == len(biases)
    for layer, bias in zip(layers, biases):
        assert layer.use_selection_bias and torch.equal(layer.selection_bias, bias.detach().reshape(-1))
    ids = input_ids(4)
    torch.testing.assert_close(module.eval()(ids), eval_logits(saved, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("selection,norm,routing", [("sigmoid", True, "sigmoid top-2 renormalised"),
                                                    ("sigmoid", False, "sigmoid top-2"),
                                                    ("softmax", True, "softmax top-2 renormalised")])
def test_cohere2_moe_with_added_shared_experts_converts_and_averaged_ones_are_refused(selection, norm, routing):
    """Cohere2-MoE: sigmoid or softmax over the top-k logits, shared experts added ('sum') or averaged."""
    args = dict(**COMMON, intermediate_size=16, num_experts=8, num_experts_per_tok=2, num_shared_experts=1,
                expert_selection_fn=selection, norm_topk_prob=norm, head_dim=8, eos_token_id=0, bos_token_id=0,
                pad_token_id=0)
    torch.manual_seed(0)
    added = transformers.Cohere2MoeConfig(**args, shared_expert_combination_strategy="sum")
    model = transformers.AutoModelForCausalLM.from_config(added,
                                                          attn_implementation="eager").float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gate.weight"):
                p.normal_(std=0.5)
    original = copy.deepcopy(model)
    from_hf(model)
    block = next(m for m in model.modules() if isinstance(m, HFMoEBlock))
    assert block.spec.describe() == routing and block.shared_experts is not None
    ids = input_ids()
    assert (eval_logits(model, ids) - eval_logits(original, ids)).abs().max() <= 1e-5
    averaged = transformers.Cohere2MoeConfig(**args, shared_expert_combination_strategy="average")
    with pytest.raises(ConfigError, match="Cohere2MoeSparseMoeBlock has shared experts combined by 'average'"):
        from_hf(transformers.AutoModelForCausalLM.from_config(averaged))


def test_trainable_experts_includes_the_ungated_shared_experts():
    from lightning_moe.hf.module import set_trainable

    model = from_hf(make_model("glm4_moe"))
    set_trainable(model, "experts")
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    shared = {name for name, _ in model.named_parameters() if ".mlp.shared_experts." in name}
    routed = {name for name, _ in model.named_parameters() if ".moe.experts." in name}
    assert shared and routed and trained == shared | routed


def test_ernie_own_aux_loss_is_the_originals_after_conversion():
    model = make_model("ernie4_5_moe")
    original = copy.deepcopy(model)
    from_hf(model)
    ids = input_ids()
    ours, theirs = (m(ids, labels=ids, output_router_logits=True) for m in (model, original))
    assert theirs.aux_loss > 0
    torch.testing.assert_close(ours.aux_loss, theirs.aux_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=1e-6, atol=1e-6)
