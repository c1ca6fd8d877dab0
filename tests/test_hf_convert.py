"""Hugging Face MoE models converted to MoELayer and back, against the original models themselves."""

import ast
import copy
import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import lightning_moe  # noqa: E402
from lightning_moe import MoELayer  # noqa: E402
from lightning_moe.errors import ConfigError  # noqa: E402
from lightning_moe.hf import HFMoEBlock, from_hf, to_hf  # noqa: E402

VOCAB, SEQ = 64, 12
COMMON = dict(
    vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=64, tie_word_embeddings=False,
)
FAMILIES = {
    # name: (config class, family arguments)
    "mixtral": ("MixtralConfig", dict(intermediate_size=16, num_local_experts=4, num_experts_per_tok=2)),
    "phimoe": (
        "PhimoeConfig",
        dict(intermediate_size=16, num_local_experts=4, num_experts_per_tok=2, router_jitter_noise=0.1,
             input_jitter_noise=0.0),
    ),
    "olmoe": ("OlmoeConfig", dict(intermediate_size=16, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False)),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        dict(intermediate_size=24, moe_intermediate_size=16, shared_expert_intermediate_size=20, num_experts=6,
             num_experts_per_tok=2, norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[]),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        dict(intermediate_size=24, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=3, norm_topk_prob=True,
             decoder_sparse_step=1, mlp_only_layers=[], head_dim=8),
    ),
}
DETERMINISTIC_TRAINING = ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe")  # PhiMoE samples its routing


def make_model(family, **overrides):
    config_cls, args = FAMILIES[family]
    config = getattr(transformers, config_cls)(**{**COMMON, **args, **overrides})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():  # routers start at zero in some families: give them real logits
        for name, p in model.named_parameters():
            if name.endswith(("gate.weight", "router.weight")):
                p.normal_(std=0.5)
    return model.float()


def input_ids(seed=0):
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(seed))


def eval_logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(ids).logits


def hf_layout_grads(model):
    """Gradients of a converted model, renamed and laid out as the original model's parameters.

    The documented correspondence: router weight shared as is; gate_up_proj[e] = w1[e]^T,
    down_proj[e] = w2[e]^T; the shared expert and its gate keep their names.
    """
    grads = {}
    for name, p in model.named_parameters():
        grads[name] = p.grad
    out = {}
    for name, block in model.named_modules():
        if not isinstance(block, HFMoEBlock):
            continue
        ex, router_name = block.moe.experts, block.spec.router_name
        out[f"{name}.{router_name}.weight"] = block.moe.router.weight.grad
        out[f"{name}.experts.gate_up_proj"] = ex.w1.grad.transpose(1, 2)
        out[f"{name}.experts.down_proj"] = ex.w2.grad.transpose(1, 2)
        for key in list(grads):
            if key.startswith(f"{name}.moe."):
                del grads[key]
    return {**grads, **out}


def assert_same_training_gradients(converted, original, layout_grads=None):
    """One training step of each on the same batch: the converted model's gradients, under the
    original's names and layout (``layout_grads``, default :func:`hf_layout_grads`), equal the
    original model's own for every trainable parameter."""
    ids = input_ids(1)
    for m in (converted, original):
        m.train()
        m(ids, labels=ids).loss.backward()
    ours = (layout_grads or hf_layout_grads)(converted)
    theirs = {name: p.grad for name, p in original.named_parameters() if p.requires_grad}
    assert ours.keys() == theirs.keys()
    for name, grad in theirs.items():
        torch.testing.assert_close(ours[name], grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("family", FAMILIES)
def test_converted_eval_logits_equal_the_original(family):
    model = make_model(family)
    original = copy.deepcopy(model)
    ids = input_ids()
    from_hf(model)
    blocks = [m for m in model.modules() if isinstance(m, HFMoEBlock)]
    assert len(blocks) == 2 and not transformers_blocks_left(model)
    assert (eval_logits(model, ids) - eval_logits(original, ids)).abs().max() <= 1e-5


def transformers_blocks_left(model):
    return [n for n, m in model.named_modules() if hasattr(m, "experts") and not isinstance(m, (HFMoEBlock, MoELayer))]


@pytest.mark.parametrize("estimator", [None, "topk"])
@pytest.mark.parametrize("family", DETERMINISTIC_TRAINING)
def test_topk_training_gradients_equal_the_original_models_own(family, estimator):
    model = make_model(family)
    original = copy.deepcopy(model)
    from_hf(model, estimator=estimator, backend="loop")
    assert_same_training_gradients(model, original)


def test_family_semantics_are_read_from_the_model():
    specs = {}
    for family in FAMILIES:
        model = from_hf(make_model(family))
        layer = next(m for m in model.modules() if isinstance(m, MoELayer))
        specs[family] = (type(layer.estimator).__name__, getattr(layer.estimator, "renormalize", None), layer.top_k)
    assert specs == {
        "mixtral": ("TopK", True, 2),
        "phimoe": ("SparseMixerV2", None, 2),
        "olmoe": ("TopK", False, 2),
        "qwen2_moe": ("TopK", False, 2),
        "qwen3_moe": ("TopK", True, 3),
    }
    phimoe = from_hf(make_model("phimoe", input_jitter_noise=0.02))
    layer = next(m for m in phimoe.modules() if isinstance(m, MoELayer))
    assert layer.estimator.jitter_eps == 0.1 and layer.input_jitter == 0.02
    mixtral = from_hf(make_model("mixtral", router_jitter_noise=0.05))  # Mixtral's jitter multiplies the input
    assert next(m for m in mixtral.modules() if isinstance(m, MoELayer)).input_jitter == 0.05


def test_phimoe_training_routing_matches_its_sparsemixer_in_distribution():
    """PhiMoE's training routing samples (GRIN's sparsemixer), with randomness drawn differently
    from ours: over many copies of the same hidden states, the mean block output and the mean
    gradient reaching each token's input (through router and experts) agree within 5 standard errors."""
    model = make_model("phimoe")
    original_block = copy.deepcopy(model.model.layers[0].mlp)
    from_hf(model, backend="loop")
    block = model.model.layers[0].mlp
    n, d = 6000, COMMON["hidden_size"]
    # Hidden states whose router logits are close enough for the jitter mask to keep several experts.
    logits = torch.tensor([[4.0, 3.8, 3.7, 3.5], [1.0, 1.1, 0.95, 1.05], [-1.0, -1.1, -0.95, -1.2]])
    rows = logits @ torch.linalg.pinv(original_block.router.weight.detach()).T
    direction = torch.randn(d, generator=torch.Generator().manual_seed(4))
    for row in rows:
        samples = []
        for module in (block, original_block):
            module.train()
            x = row.expand(1, n, d).clone().requires_grad_(True)
            y = module(x)
            (y * direction).sum().backward()
            samples.append((y.detach()[0].double(), x.grad[0].double()))
        for a, b in zip(*samples):
            standard_error = ((a.var(dim=0) + b.var(dim=0)) / n).sqrt()
            assert ((a.mean(0) - b.mean(0)).abs() <= 5 * standard_error + 1e-6).all()
        assert samples[0][1].var(dim=0).sum() > 0  # the routing really varied between copies


def test_densemixer_on_renormalised_family_keeps_the_forward():
    model = make_model("qwen3_moe")
    original = copy.deepcopy(model)
    from_hf(model, estimator="densemixer")
    layer = next(m for m in model.modules() if isinstance(m, MoELayer))
    assert type(layer.estimator).__name__ == "DenseMixer" and layer.estimator.renormalize
    ids = input_ids()
    assert (eval_logits(model, ids) - eval_logits(original, ids)).abs().max() <= 1e-5
    model.train()
    model(ids, labels=ids).loss.backward()
    assert layer.router.weight.grad.abs().sum() > 0


def test_estimator_that_cannot_represent_the_family_fails_before_changing_anything():
    model = make_model("qwen3_moe")
    with pytest.raises(ConfigError, match="default_moe.*qwen3_moe.*renormalised"):
        from_hf(model, estimator="default_moe")
    assert not any(isinstance(m, HFMoEBlock) for m in model.modules())


def test_an_estimator_with_other_eval_routing_warns():
    with pytest.warns(UserWarning, match="routes differently at evaluation than olmoe"):
        from_hf(make_model("olmoe"), estimator="sparsemixer_v2")


def test_experts_reading_their_weights_differently_are_refused():
    """A sibling block with the same parameter shapes whose experts take the up rows first."""
    model = make_model("mixtral")
    experts = model.model.layers[1].mlp.experts

    def up_rows_first(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for slot in range(top_k_index.shape[1]):
            for e in top_k_index[:, slot].unique().tolist():
                rows = (top_k_index[:, slot] == e).nonzero().squeeze(1)
                up, gate = torch.nn.functional.linear(hidden_states[rows], self.gate_up_proj[e]).chunk(2, dim=-1)
                h = torch.nn.functional.linear(self.act_fn(gate) * up, self.down_proj[e])
                out = out.index_add(0, rows, h * top_k_weights[rows, slot, None])
        return out

    experts.forward = types.MethodType(up_rows_first, experts)
    with pytest.raises(ConfigError, match="MixtralSparseMoeBlock has experts that do not compute silu"):
        from_hf(model)
    assert not any(isinstance(m, HFMoEBlock) for m in model.modules())


def test_converting_twice_or_exporting_an_unconverted_model_is_refused():
    model = from_hf(make_model("olmoe"))
    with pytest.raises(ConfigError, match="already converted"):
        from_hf(model)
    to_hf(model)
    with pytest.raises(ConfigError, match="nothing to export"):
        to_hf(model)


def test_export_warns_about_state_the_format_cannot_hold():
    model = from_hf(make_model("olmoe"))
    layer = next(m for m in model.modules() if isinstance(m, MoELayer))
    layer.use_selection_bias = True
    layer.selection_bias.fill_(0.1)
    with pytest.warns(UserWarning, match="selection bias"):
        to_hf(model)


@pytest.mark.parametrize(
    "config_cls,args,missing",
    [
        (  # gpt-oss, once refused here, converts (tests/test_gpt_oss.py)
            "Llama4TextConfig",
            dict(intermediate_size=16, intermediate_size_mlp=32, num_local_experts=4, num_experts_per_tok=1, head_dim=8),
            "llama4_text: Llama4TextMoe has a router that returns (logits, weights, indices)",
        ),
    ],
)
def test_unsupported_family_fails_with_one_message_naming_it(config_cls, args, missing):
    config = getattr(transformers, config_cls)(**COMMON, **args)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    before = {name: p.clone() for name, p in model.state_dict().items()}
    with pytest.raises(ConfigError) as err:
        from_hf(model)
    message = str(err.value)
    assert message.startswith(f"cannot convert {missing}") and "\n" not in message, message
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def module_level_imports(path):
    """Top-level module names imported by a source file outside any function or class."""
    names, pending = set(), list(ast.parse(path.read_text()).body)
    while pending:
        node = pending.pop()
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
        elif not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            pending.extend(ast.iter_child_nodes(node))
    return names


def test_no_lightning_moe_module_imports_transformers_at_import_time():
    package = Path(lightning_moe.__file__).parent
    importing = [str(p.relative_to(package)) for p in package.rglob("*.py") if "transformers" in module_level_imports(p)]
    assert importing == []
    assert "ast" in module_level_imports(Path(__file__))  # the scan sees imports


def test_from_hf_without_transformers_names_the_extra(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "transformers" else find_spec(name, *a))
    with pytest.raises(ImportError, match=r"lightning-moe\[hf\]"):
        from_hf(make_model("olmoe"))


# ---- round trip: original -> ours -> to_hf -> save_pretrained -> from_pretrained elsewhere ----

RELOAD = textwrap.dedent(
    """
    import json, sys, torch
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(1)  # as the test process (conftest), so float sums run in the same order
    results = {}
    for family, path in json.loads(sys.argv[1]).items():
        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
        ids = torch.load(path + "/ids.pt")
        with torch.no_grad():
            torch.save(model(ids).logits, path + "/logits.pt")
        results[family] = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert not any(name.startswith("lightning_moe") for name in sys.modules)
    print(json.dumps(results))
    """
)


@pytest.fixture(scope="module")
def round_trip(tmp_path_factory):
    """Every family trained one step with densemixer, exported, then reloaded in a fresh
    process that never imports lightning_moe."""
    folders, expected = {}, {}
    for family in FAMILIES:
        model = make_model(family)
        from_hf(model, estimator="densemixer" if family != "phimoe" else None)
        model.train()
        ids = input_ids(2)
        model(ids, labels=ids).loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                p.sub_(0.1 * p.grad)  # a training step, so the export carries trained weights
        ids = input_ids(3)
        logits = eval_logits(model, ids)
        to_hf(model)
        path = str(tmp_path_factory.mktemp(family))
        model.save_pretrained(path)
        torch.save(ids, os.path.join(path, "ids.pt"))
        folders[family] = path
        expected[family] = (logits, eval_logits(model, ids), {k: list(v.shape) for k, v in model.state_dict().items()})
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [sys.executable, "-c", RELOAD, json.dumps(folders)], capture_output=True, text=True, env=env, cwd="/"
    )
    assert out.returncode == 0, out.stderr[-3000:]
    shapes = json.loads(out.stdout.strip().splitlines()[-1])
    reloaded = {f: torch.load(os.path.join(p, "logits.pt")) for f, p in folders.items()}
    return expected, reloaded, shapes


@pytest.mark.slow  # one fresh process importing transformers
@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_through_save_pretrained(round_trip, family):
    expected, reloaded, shapes = round_trip
    trained_logits, exported_logits, state_shapes = expected[family]
    original_shapes = {k: list(v.shape) for k, v in make_model(family).state_dict().items()}
    assert state_shapes == original_shapes  # to_hf restores the original keys and shapes
    assert shapes[family] == original_shapes  # and so does the folder save_pretrained wrote
    assert (exported_logits - trained_logits).abs().max() <= 1e-5  # our kernels vs transformers' own
    assert torch.equal(reloaded[family], exported_logits)
