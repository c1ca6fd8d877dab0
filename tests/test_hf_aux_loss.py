"""The family's own load-balancing loss (``output_router_logits``) after conversion, against the original model."""

import copy
import pickle

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_hf_convert import COMMON, DETERMINISTIC_TRAINING, FAMILIES, VOCAB, input_ids, make_model  # noqa: E402

from lightning_moe.errors import ConfigError  # noqa: E402
from lightning_moe.hf import from_hf, to_hf  # noqa: E402
from lightning_moe.hf.module import HFMoELanguageModel  # noqa: E402


def run(model, ids, training, **kwargs):
    """(loss, aux_loss, number of recorded router logits) of one forward with labels."""
    model.train(training)
    out = model(ids, labels=ids, use_cache=False, **kwargs)
    return out.loss, out.aux_loss, len(out.router_logits)


def assert_same(ours, theirs):
    torch.testing.assert_close(ours[1], theirs[1], rtol=0, atol=1e-6)  # aux_loss
    torch.testing.assert_close(ours[0], theirs[0], rtol=0, atol=1e-6)  # loss, with router_aux_loss_coef * aux_loss
    assert ours[2] == theirs[2] == COMMON["num_hidden_layers"]  # one router record per MoE block, no duplicates


# PhiMoE samples its training routing (GRIN's sparsemixer), with randomness drawn differently from ours.
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("family", FAMILIES)
def test_converted_model_returns_the_familys_aux_loss(family, training):
    if training and family not in DETERMINISTIC_TRAINING:
        pytest.skip("sampled training routing")
    original = make_model(family, router_aux_loss_coef=0.3)  # a coefficient large enough to matter at 1e-6
    ids = input_ids(4)
    theirs = run(original, ids, training, output_router_logits=True)
    converted = from_hf(copy.deepcopy(original))
    assert_same(run(converted, ids, training, output_router_logits=True), theirs)
    converted.config.output_router_logits = True  # the framework setting instead of the keyword
    assert_same(run(converted, ids, training), theirs)


def test_aux_loss_gradient_reaches_our_router_as_the_originals():
    original = make_model("qwen3_moe", router_aux_loss_coef=0.3)
    converted = from_hf(copy.deepcopy(original), estimator="topk", backend="loop")
    ids = input_ids(5)
    for model in (original, converted):
        run(model, ids, True, output_router_logits=True)[0].backward()
    for i in range(COMMON["num_hidden_layers"]):
        theirs = original.model.layers[i].mlp.gate.weight.grad
        torch.testing.assert_close(converted.model.layers[i].mlp.moe.router.weight.grad, theirs, rtol=1e-5, atol=1e-7)


def test_aux_loss_holds_whenever_the_recording_hooks_were_installed():
    """transformers installs its recording hooks once, on the first forward that asks for them:
    before conversion (on the family's routers), while converted, or after export."""
    original = make_model("olmoe")
    ids = input_ids(6)
    theirs = run(original, ids, False, output_router_logits=True)
    model = copy.deepcopy(original)
    run(model, ids, False, output_router_logits=True)  # hooks installed on the family's routers
    from_hf(model)
    assert_same(run(model, ids, False, output_router_logits=True), theirs)
    to_hf(model)  # the family's routers again, with their hooks
    assert_same(run(model, ids, False, output_router_logits=True), theirs)

    model = from_hf(copy.deepcopy(original))  # hooks installed while converted
    assert_same(run(model, ids, False, output_router_logits=True), theirs)
    to_hf(model)
    assert_same(run(model, ids, False, output_router_logits=True), theirs)
    from_hf(model)  # converted again: still one record per block
    assert_same(run(model, ids, False, output_router_logits=True), theirs)


def test_conversion_keeps_the_familys_output_router_logits_setting():
    original = make_model("mixtral", output_router_logits=True)
    model = from_hf(copy.deepcopy(original))
    assert model.config.output_router_logits
    ids = input_ids(7)
    assert_same(run(model, ids, False), run(original, ids, False))


# ---------------------------------------------------------------------------- HFMoELanguageModel

MODULE_CONFIG = dict(
    model_type="qwen3_moe", **{**COMMON, "vocab_size": VOCAB}, **{**FAMILIES["qwen3_moe"][1], "num_experts_per_tok": 2}
)


def make_module(**kwargs):
    torch.manual_seed(0)
    args = dict(config=MODULE_CONFIG, dtype="float32", attn_implementation="eager", estimator="topk", backend="loop")
    module = HFMoELanguageModel(**{**args, **kwargs})
    with torch.no_grad():  # real router logits, as make_model gives
        for name, p in module.model.named_parameters():
            if name.endswith("router.weight"):
                p.normal_(std=0.5)
    return module


def batch(seed=8):
    ids = input_ids(seed)
    return ids, torch.cat([ids[:, 1:], torch.full((ids.shape[0], 1), -100)], dim=1)


@pytest.mark.parametrize(
    "kwargs, config, coef",
    [
        (dict(router_aux_loss=True), {}, 0.001),  # the config's default coefficient
        ({}, dict(output_router_logits=True, router_aux_loss_coef=0.2), 0.2),  # on because the family's config is
        (dict(router_aux_loss=True, router_aux_loss_coef=0.5), {}, 0.5),
    ],
)
def test_training_gradient_is_the_task_loss_plus_the_weighted_family_aux_loss(kwargs, config, coef):
    module = make_module(config={**MODULE_CONFIG, **config}, **kwargs)
    reference = to_hf(copy.deepcopy(module.model))  # the family's own classes, same weights
    module.train(), reference.train()
    ids, targets = batch()
    with pytest.warns(UserWarning, match="self.log"):  # no trainer attached: logging is skipped
        loss = module.training_step((ids, targets), 0)
    loss.backward()
    out = reference(input_ids=ids, labels=ids, use_cache=False, output_router_logits=True)
    task = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    (task + coef * out.aux_loss).backward()  # explicitly, whatever the config's coefficient
    ours = dict(module.model.named_parameters())
    for name, param in reference.named_parameters():
        if ".experts." not in name:  # other layout; test_hf_convert compares those
            ours_name = name.replace(".mlp.gate.weight", ".mlp.moe.router.weight")
            torch.testing.assert_close(ours[ours_name].grad, param.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_without_the_aux_loss_the_gradient_is_the_task_losss_alone():
    module = make_module(config={**MODULE_CONFIG, "output_router_logits": True}, router_aux_loss=False)
    plain = make_module()
    module.train(), plain.train()
    for model in (module, plain):
        with pytest.warns(UserWarning, match="self.log"):
            loss = model.training_step(batch(), 0)
        loss.backward()
    for (name, a), (_, b) in zip(module.named_parameters(), plain.named_parameters()):
        assert torch.equal(a.grad, b.grad), name


def test_a_negative_aux_loss_coefficient_is_refused():
    with pytest.raises(ConfigError, match="router_aux_loss_coef.*>= 0"):
        make_module(router_aux_loss=True, router_aux_loss_coef=-1.0)


def test_the_cli_refuses_a_negative_coefficient_in_one_line(tmp_path, monkeypatch):
    from test_bad_inputs import ROOT, run_in_process

    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    code, stderr = run_in_process(["fit", "--config", "recipes/posttrain_tiny_offline.yaml", "--model.router_aux_loss_coef", "-1"])
    assert code == 2 and stderr.splitlines() == [
        "error: `router_aux_loss_coef` must be a number >= 0 (or null: the config's), got -1.0"
    ], stderr


def test_aux_loss_gradient_is_kept_under_non_reentrant_checkpointing_and_reentrant_is_refused():
    grads = []
    for checkpointing in (False, "non_reentrant"):
        module = make_module(router_aux_loss=True, router_aux_loss_coef=10.0, activation_checkpointing=checkpointing)
        module.train()
        with pytest.warns(UserWarning, match="self.log"):
            loss = module.training_step(batch(), 0)
        loss.backward()
        grads.append({name: p.grad for name, p in module.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-6, atol=1e-8, msg=name)
    with pytest.raises(ConfigError, match="`router_aux_loss` needs `activation_checkpointing` false or 'non_reentrant'"):
        make_module(config={**MODULE_CONFIG, "output_router_logits": True}, activation_checkpointing="reentrant")


def test_a_converted_model_still_pickles():
    """torch.save(model) and spawned processes pickle the model; a closure as hook would not."""
    original = make_model("qwen2_moe")
    model = pickle.loads(pickle.dumps(from_hf(copy.deepcopy(original))))
    ids = input_ids(9)
    assert_same(run(model, ids, False, output_router_logits=True), run(original, ids, False, output_router_logits=True))
