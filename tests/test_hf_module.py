"""HFMoELanguageModel: a converted Hugging Face MoE trained in Lightning with this library's callbacks."""

import copy
import sys
from datetime import timedelta

import lightning as L
import pytest
import torch

transformers = pytest.importorskip("transformers")

from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.strategies import DDPStrategy  # noqa: E402

from lightning_moe.callbacks import (  # noqa: E402
    AuxLossFreeBalancing,
    LoadBalancingLoss,
    RouterGradientFidelity,
    RouterZLoss,
    RoutingMonitor,
)
from lightning_moe.data import TextDataModule  # noqa: E402
from lightning_moe.errors import ConfigError  # noqa: E402
from lightning_moe.hf import to_hf  # noqa: E402
from lightning_moe.hf.export import export_pretrained  # noqa: E402
from lightning_moe.hf.module import HFMoELanguageModel  # noqa: E402
from lightning_moe.layer import moe_layers  # noqa: E402

from helpers import ForkedModelParallel, RankRecord, fit_quietly  # noqa: E402

VOCAB = 258  # the byte-level tokenizer's, so TextDataModule's default tokenizer feeds these models
COMMON = dict(
    vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=64, tie_word_embeddings=False,
)
CONFIGS = {
    "qwen3_moe": dict(model_type="qwen3_moe", intermediate_size=24, moe_intermediate_size=16, num_experts=8,
                      num_experts_per_tok=2, norm_topk_prob=True, head_dim=8),
    "qwen2_moe": dict(model_type="qwen2_moe", intermediate_size=24, moe_intermediate_size=16,
                      shared_expert_intermediate_size=20, num_experts=6, num_experts_per_tok=2, norm_topk_prob=False),
    "phimoe": dict(model_type="phimoe", intermediate_size=16, num_local_experts=4, num_experts_per_tok=2,
                   router_jitter_noise=0.1, input_jitter_noise=0.0),
}
SEQ, STEPS = 16, 4
TIMEOUT = timedelta(seconds=60)


def make_module(family="qwen3_moe", **kwargs):
    torch.manual_seed(0)
    config = {**COMMON, **CONFIGS[family]}
    args = dict(config=config, dtype="float32", attn_implementation="eager", learning_rate=3e-3, warmup_steps=1)
    return HFMoELanguageModel(**{**args, **kwargs})


def corpus(tmp_path):
    path = tmp_path / "corpus.py"
    if not path.exists():
        path.write_text("".join(f"def g{i}(x, y):\n    return (x - {i}) * y // {i + 1}\n" for i in range(40)))
    return str(path)


def data(tmp_path, batch_size=4):
    return TextDataModule(source=corpus(tmp_path), seq_len=SEQ, batch_size=batch_size, cache_dir=str(tmp_path / "cache"))


def state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ---------------------------------------------------------------------------- against the model's own loss


def test_training_loss_and_gradients_equal_the_hugging_face_models_own(tmp_path):
    module = make_module(estimator="topk")
    reference = to_hf(copy.deepcopy(module.model))  # the family's own forward, same weights
    module.train(), reference.train()
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, VOCAB, (2, SEQ), generator=g)
    labels = input_ids.clone()
    labels[0, :5] = -100  # a prompt without loss, as in SFT
    # Hugging Face shifts labels inside its loss; our batches carry the next token at each position.
    targets = torch.cat([labels[:, 1:], torch.full((2, 1), -100)], dim=1)

    loss, num_tokens = module._token_loss((input_ids, targets))
    expected = reference(input_ids=input_ids, labels=labels, use_cache=False).loss
    assert num_tokens == (labels[:, 1:] != -100).sum()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)

    loss.backward(), expected.backward()
    ours = dict(module.model.named_parameters())
    theirs = dict(reference.named_parameters())
    compared = 0
    for name, param in theirs.items():
        ours_name = name.replace(".mlp.gate.weight", ".mlp.moe.router.weight")
        if ".experts." in name:  # other layout: the conversion tests compare these
            continue
        torch.testing.assert_close(ours[ours_name].grad, param.grad, rtol=1e-5, atol=1e-7, msg=name)
        compared += 1
    assert compared >= 10


# ---------------------------------------------------------------------------- callbacks, freezing


def test_every_router_callback_runs_on_a_converted_model(tmp_path):
    # Default MoE's gates are the full softmax: a family without renormalisation (Qwen2-MoE).
    module = make_module("qwen2_moe", estimator="default_moe")
    initial = state(module)
    callbacks = [
        LoadBalancingLoss(alpha=0.01),
        RouterZLoss(1e-3),
        AuxLossFreeBalancing(0.01),
        RoutingMonitor(log_every_n_steps=2),
        RouterGradientFidelity(every_n_steps=2),
    ]
    trainer = fit_quietly(module, data(tmp_path), callbacks, max_steps=STEPS, limit_val_batches=0, log_every_n_steps=2)
    names = {type(c).__name__ for c in trainer.callbacks}
    # Added by the model itself, as for MoELanguageModel.
    assert {"DefaultOutputEMA", "NonFiniteGuard", "ResumableRNG", "PreemptionCheckpoint"} <= names
    layers = moe_layers(module)
    assert len(layers) == 2
    for name, layer in layers:
        assert layer.use_selection_bias and layer.selection_bias.abs().sum() > 0, name
    defaults = [k for k in initial if k.endswith("default_outputs")]
    assert defaults and all(not torch.equal(initial[k], module.state_dict()[k]) for k in defaults)
    metrics = trainer.callback_metrics
    for tag in ("layer_00", "layer_01"):
        for name in ("router_grad_cosine", "load_balancing_loss", "router_z_loss", "entropy", "load_cv"):
            assert torch.isfinite(metrics[f"moe/{tag}/{name}"]), (tag, name)
    # Softmax over 6 experts: a mean routing distribution's entropy lies in (0, log 6].
    assert 0 < metrics["moe/layer_00/entropy"] <= torch.log(torch.tensor(6.0)) + 1e-6


@pytest.mark.parametrize(
    "trainable, trains",
    [
        ("router", lambda name: ".moe.router." in name),
        ("experts", lambda name: ".moe.experts." in name or ".shared_expert" in name),
        ("all_but_router", lambda name: ".moe.router." not in name),
    ],
)
def test_trainable_freezes_exactly_the_other_parameters(tmp_path, trainable, trains):
    module = make_module("qwen2_moe", trainable=trainable)
    initial = state(module)
    fit_quietly(module, data(tmp_path), [], max_steps=2, limit_val_batches=0)
    changed = {k for k, v in module.state_dict().items() if k in initial and not torch.equal(v, initial[k])}
    params = {name for name, _ in module.named_parameters()}
    expected = {name for name in params if trains(name)}
    assert expected and changed & params == expected


def test_bad_settings_name_the_field():
    with pytest.raises(ConfigError, match="trainable"):
        make_module(trainable="routers")
    with pytest.raises(ConfigError, match="exactly one of `pretrained`"):
        HFMoELanguageModel()
    with pytest.raises(ConfigError, match="pretrained"):
        HFMoELanguageModel(pretrained=str("/nonexistent/model/folder"))
    with pytest.raises(ConfigError, match="dtype"):
        make_module(dtype="int8")


def test_activation_checkpointing_keeps_the_gradients(tmp_path):
    batch = next(iter(_loader(tmp_path)))
    grads = []
    for mode in (False, "non_reentrant", "reentrant"):
        module = make_module(estimator="densemixer", activation_checkpointing=mode)
        assert module.model.is_gradient_checkpointing == bool(mode)
        module.train()
        module._token_loss(batch)[0].backward()
        grads.append({n: p.grad for n, p in module.named_parameters()})
    for other in grads[1:]:
        for name, grad in grads[0].items():
            torch.testing.assert_close(other[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def _loader(tmp_path):
    dm = data(tmp_path)
    dm.setup("fit")
    return dm.train_dataloader()


# ---------------------------------------------------------------------------- resume, export


def test_resume_mid_run_is_bit_exact_with_sampled_routing(tmp_path):
    # PhiMoE trains with SparseMixer-v2, which samples: only restored RNG states give equal steps.
    def run(name, ckpt_path=None):
        module = make_module("phimoe")
        losses = {}

        class Record(L.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                losses[trainer.global_step - 1] = outputs["loss"].item()

        checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{step}", every_n_train_steps=1, save_top_k=-1)
        callbacks = [Record(), checkpoints, LoadBalancingLoss(), RoutingMonitor(log_every_n_steps=STEPS)]
        fit_quietly(module, data(tmp_path), callbacks, ckpt_path=ckpt_path, max_steps=STEPS, limit_val_batches=0,
                    enable_checkpointing=True)
        return losses, state(module)

    full_losses, full_state = run("full")
    resumed_losses, resumed_state = run("resumed", ckpt_path=tmp_path / "ckpt" / "step=2.ckpt")
    assert resumed_losses == {s: full_losses[s] for s in range(2, STEPS)}
    for key, value in full_state.items():
        assert torch.equal(resumed_state[key], value), key


def test_export_after_training_loads_without_the_library_and_gives_the_same_logits(tmp_path):
    module = make_module("qwen2_moe", estimator="densemixer")
    fit_quietly(module, data(tmp_path), [LoadBalancingLoss()], max_steps=2, limit_val_batches=0)
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))
    module.eval()
    with torch.no_grad():
        trained = module(ids)
    export_pretrained(module, str(tmp_path / "export"))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export", attn_implementation="eager")
    assert not any("lightning_moe" in type(m).__module__ for m in loaded.modules())
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, trained, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- data and model parallel


def fit_ranks(tmp_path, run, estimator, devices, strategy, batch_size, trainable="all"):
    out_dir = tmp_path / run
    out_dir.mkdir()
    L.seed_everything(0)
    module = make_module(estimator=estimator, trainable=trainable)
    callbacks = [RankRecord(str(out_dir)), LoadBalancingLoss(scope="global"), AuxLossFreeBalancing(0.01)]
    fit_quietly(module, data(tmp_path, batch_size), callbacks, devices=devices, strategy=strategy,
                max_steps=STEPS, limit_val_batches=0)
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(devices)]


@pytest.mark.skipif(sys.platform == "win32", reason="forked ranks need fork")
@pytest.mark.parametrize(
    "estimator, parallel, trainable",
    [("topk", "ddp", "all"), ("densemixer", "fsdp2", "all"), ("topk", "fsdp2", "all_but_router")],
)
def test_two_processes_equal_one_with_the_same_global_batch(tmp_path, estimator, parallel, trainable):
    if torch.cuda.is_initialized():
        pytest.skip("forking ranks is impossible once CUDA is initialised in this process")
    single = fit_ranks(tmp_path, "single", estimator, 1, "auto", batch_size=8, trainable=trainable)[0]
    if parallel == "ddp":
        strategy = DDPStrategy(start_method="fork", timeout=TIMEOUT)
    else:
        strategy = ForkedModelParallel(data_parallel_size=2, tensor_parallel_size=1, timeout=TIMEOUT)
    ranks = fit_ranks(tmp_path, parallel, estimator, 2, strategy, batch_size=4, trainable=trainable)
    for step, loss in single["losses"].items():
        assert sum(r["losses"][step] for r in ranks) / 2 == pytest.approx(loss, rel=1e-5), step
    for key, value in single["state"].items():
        assert torch.equal(ranks[0]["state"][key], ranks[1]["state"][key]), key
        # Float32 summation order differs between one batch of 8 and two of 4; Adam's normalisation
        # turns that into ~1e-6 on weights whose gradient is tiny.
        torch.testing.assert_close(ranks[0]["state"][key], value, rtol=1e-4, atol=1e-5, msg=key)


# ---------------------------------------------------------------------------- from a saved folder


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from lightning_moe.hf.tiny import build_tiny_model

    return build_tiny_model("phimoe", str(tmp_path_factory.mktemp("tiny") / "phimoe"), vocab_size=320)


def test_a_model_loaded_from_a_folder_trains_in_training_mode(tmp_path, tiny_folder):
    # from_pretrained hands back an eval-mode model; Lightning keeps submodule modes, so a
    # model left that way would train with evaluation routing (PhiMoE: no SparseMixer sampling).
    module = HFMoELanguageModel(pretrained=tiny_folder, learning_rate=1e-3)
    modes = []

    class Modes(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            modes.append({name: m.training for name, m in pl_module.named_modules()})

    fit_quietly(module, data(tmp_path), [Modes()], max_steps=1, limit_val_batches=0)
    assert modes and all(modes[0].values()), [name for name, training in modes[0].items() if not training]
    assert module.tokenizer_source == tiny_folder
