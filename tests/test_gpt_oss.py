"""gpt-oss: biased, clamped-SwiGLU experts and a biased router, against brute force and the original model."""

import copy
import json
import os
import subprocess
import sys

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


# --- gpt-oss converted from Hugging Face and back, against the original model ---------------------------------------

transformers = pytest.importorskip("transformers")

from lightning_moe.hf import HFMoEBlock, from_hf, to_hf  # noqa: E402
from lightning_moe.hf.blocks import inspect_block  # noqa: E402

from test_hf_convert import VOCAB, assert_same_training_gradients, eval_logits, input_ids  # noqa: E402


def make_gpt_oss(seed=0, **overrides):
    config = transformers.GptOssConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
        sliding_window=8, tie_word_embeddings=False, **overrides,
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float()
    with torch.no_grad():  # the router and the biases start at zero: give them values that matter
        for name, p in model.named_parameters():
            if name.endswith(("router.weight", "router.bias", "_bias")):
                p.normal_(std=0.5)
            elif name.endswith("gate_up_proj"):
                p.normal_(std=1.0)  # first projections large enough to reach the clamps at limit 7
    return model


def test_gpt_oss_block_is_read_from_its_structure_and_probes():
    spec = inspect_block(make_gpt_oss().model.layers[0].mlp)
    assert (spec.routing, spec.renormalize, spec.top_k) == ("softmax_topk", True, 2)  # softmax over the chosen logits
    assert spec.router_bias and spec.returns_router_scores
    assert spec.clamped_swiglu.name == "clamped_swiglu"
    assert (spec.clamped_swiglu.alpha, spec.clamped_swiglu.limit) == (1.702, 7.0)


@pytest.mark.parametrize("backend", ["loop", "torch"])
def test_gpt_oss_converts_with_eval_logits_within_1e_5(backend):
    model = make_gpt_oss()
    original = copy.deepcopy(model)
    ids = input_ids()
    from_hf(model, backend=backend)
    assert len([m for m in model.modules() if isinstance(m, HFMoEBlock)]) == 2
    layer = model.model.layers[0].mlp.moe
    assert layer.router.bias is not None and layer.experts.b1 is not None
    assert (eval_logits(model, ids) - eval_logits(original, ids)).abs().max() <= 1e-5


def hf_layout_grads(model):
    """Gradients of a converted gpt-oss, renamed and laid out as the original's parameters: router weight and
    bias as they are; gate_up_proj and its bias with gate/up columns interleaved again; down_proj and its bias
    as they are."""
    out = {name: p.grad for name, p in model.named_parameters() if ".moe." not in name}
    for name, block in model.named_modules():
        if isinstance(block, HFMoEBlock):
            ex, router = block.moe.experts, block.moe.router
            out[f"{name}.router.weight"], out[f"{name}.router.bias"] = router.weight.grad, router.bias.grad
            for ours, theirs in ((ex.w1, "gate_up_proj"), (ex.b1, "gate_up_proj_bias")):
                gate, up = ours.grad.chunk(2, dim=-1)
                out[f"{name}.experts.{theirs}"] = torch.stack([gate, up], dim=-1).flatten(-2)
            out[f"{name}.experts.down_proj"], out[f"{name}.experts.down_proj_bias"] = ex.w2.grad, ex.b2.grad
    return out


@pytest.mark.parametrize("backend", ["loop", "torch"])
def test_gpt_oss_topk_training_gradients_equal_the_original_models_own(backend):
    model = make_gpt_oss()
    original = copy.deepcopy(model)
    from_hf(model, estimator="topk", backend=backend)
    assert_same_training_gradients(model, original, hf_layout_grads)


RELOAD = """
import json, sys, torch
from transformers import AutoModelForCausalLM
path = sys.argv[1]
torch.set_num_threads(int(sys.argv[2]))  # the test's own: the same reduction order, so bitwise equal logits
model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
with torch.no_grad():
    torch.save(model(torch.load(path + "/ids.pt")).logits, path + "/logits.pt")
assert not any(name.startswith("lightning_moe") for name in sys.modules)
print(json.dumps({k: list(v.shape) for k, v in model.state_dict().items()}))
"""


def test_gpt_oss_export_round_trip_loads_in_plain_transformers_with_identical_logits(tmp_path):
    model = make_gpt_oss()
    original_shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    from_hf(model, estimator="densemixer", backend="torch")
    model.train()
    ids = input_ids(2)
    model(ids, labels=ids).loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p.sub_(0.1 * p.grad)  # a training step, so the export carries trained weights (biases included)
    ids = input_ids(3)
    trained = eval_logits(model, ids)
    to_hf(model)
    exported = eval_logits(model, ids)
    assert (exported - trained).abs().max() <= 1e-5  # our kernels vs transformers' own
    model.save_pretrained(tmp_path)
    torch.save(ids, tmp_path / "ids.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    command = [sys.executable, "-c", RELOAD, str(tmp_path), str(torch.get_num_threads())]
    out = subprocess.run(command, capture_output=True, text=True, env=env, cwd="/", check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == original_shapes
    assert torch.equal(torch.load(tmp_path / "logits.pt"), exported)


GPT_OSS_CONFIG = dict(
    model_type="gpt_oss", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2,
    max_position_embeddings=64, sliding_window=8, tie_word_embeddings=False,
)


def test_meta_init_fills_gpt_oss_with_exactly_what_from_pretrained_loads(tmp_path):
    from lightning_moe.hf.module import HFMoELanguageModel

    make_gpt_oss().save_pretrained(tmp_path, max_shard_size="40KB")  # several shards and an index
    module = HFMoELanguageModel(pretrained=str(tmp_path), estimator="topk", meta_init=True, attn_implementation="eager")
    module.configure_model()
    ours = {name: t.detach() for name, t in module.model.state_dict().items()}
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    for name, param in hf.named_parameters():  # against the checkpoint's tensors, read here independently
        prefix, _, leaf = name.rpartition(".experts.")
        if leaf in ("gate_up_proj", "gate_up_proj_bias"):  # gate columns (even) first, then up (odd)
            want = torch.cat([param[..., ::2], param[..., 1::2]], dim=-1)
            got = ours[f"{prefix}.moe.experts.{'w1' if leaf == 'gate_up_proj' else 'b1'}"]
        elif leaf in ("down_proj", "down_proj_bias"):
            want, got = param, ours[f"{prefix}.moe.experts.{'w2' if leaf == 'down_proj' else 'b2'}"]
        elif name.endswith(("mlp.router.weight", "mlp.router.bias")):
            want, got = param, ours[name.replace("mlp.router.", "mlp.moe.router.")]
        else:
            want, got = param, ours[name]
        assert torch.equal(got, want), name
    ids = input_ids(4)
    torch.testing.assert_close(module.eval()(ids), eval_logits(hf, ids), rtol=0, atol=1e-5)


def test_lightning_moe_export_streams_a_gpt_oss_checkpoint_that_plain_transformers_loads(tmp_path):
    import lightning as L

    from lightning_moe.cli import main
    from lightning_moe.hf.module import HFMoELanguageModel

    torch.manual_seed(0)
    module = HFMoELanguageModel(config=dict(GPT_OSS_CONFIG), estimator="topk", dtype="float32",
                                attn_implementation="eager", learning_rate=1e-2)
    with torch.no_grad():  # biases away from zero, so a misplaced column shows in the logits
        for name, p in module.model.named_parameters():
            if name.endswith(("experts.b1", "experts.b2", "router.bias")):
                p.normal_(std=0.5)
    ids = torch.randint(0, VOCAB, (8, 8), generator=torch.Generator().manual_seed(0))
    data = torch.utils.data.DataLoader(list(zip(ids, ids.roll(-1, dims=1))), batch_size=2)
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, data)
    trainer.save_checkpoint(tmp_path / "trained.ckpt")
    ids = input_ids(5)
    module.eval()
    with torch.no_grad():
        trained = module(ids)
    main(["export", str(tmp_path / "trained.ckpt"), "--output", str(tmp_path / "exported")])
    model, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported", output_loading_info=True,
                                                                     attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    torch.testing.assert_close(eval_logits(model, ids), trained, rtol=0, atol=1e-5)



# --- the router bias --------------------------------------------------------------------------------------------------


def test_router_bias_enters_the_float32_logits_of_every_estimator():
    from lightning_moe import MoELayer

    torch.manual_seed(0)
    x = torch.randn(16, 8)
    for estimator in ("topk", "sparsemixer", "sparsemixer_v2", "default_moe", "densemixer"):
        top_k = 1 if estimator == "sparsemixer" else 2
        layer = MoELayer(8, 4, 4, top_k=top_k, estimator=estimator, backend="loop", router_bias=True)
        with torch.no_grad():
            layer.router.bias.copy_(torch.tensor([0.0, 0.0, 50.0, 40.0]))
        logits = layer.router(x.bfloat16())
        assert logits.dtype == torch.float32
        torch.testing.assert_close(logits, x.bfloat16().float() @ layer.router.weight.T + layer.router.bias)
        if estimator == "default_moe":
            layer.estimator.attach_updater()
        layer.train()(x)  # the layer's own forward records which experts its estimator chose
        assert layer.routing_stats.tokens_per_expert[2] == 16, estimator  # the bias decides, whatever the estimator


def test_router_without_bias_keeps_its_state_dict_keys():
    from lightning_moe import MoELayer

    assert "router.bias" not in MoELayer(8, 4, 4).state_dict()
    assert MoELayer(8, 4, 4, router_bias=True).state_dict()["router.bias"].shape == (4,)


def test_expert_parallelism_refuses_expert_biases_in_one_line():
    experts = Experts(4, 3, 2, activation="clamped_swiglu", bias=True)
    experts.expert_parallel = object()  # as a strategy sets it on the experts it splits
    with pytest.raises(ConfigError, match="expert parallelism does not support expert biases"):
        experts(torch.randn(3, 4), torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1))
