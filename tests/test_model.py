import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_moe.layer import MoELayer
from lightning_moe.model import (
    FeedForward,
    MoEConfig,
    MoETransformer,
    TransformerConfig,
    apply_rope,
    default_ffn_hidden,
    rope_cache,
)
from lightning_moe.module import MoELanguageModel, warmup_cosine_factor

VOCAB = 258


@pytest.fixture(autouse=True)
def single_thread():
    # These models are tiny: intra-op threads only add contention on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(**overrides) -> TransformerConfig:
    args = dict(d_model=32, n_layers=2, n_heads=2, max_seq_len=16, moe=MoEConfig(num_experts=4, top_k=2))
    args.update(overrides)
    return TransformerConfig(**args)


def tiny_module(**overrides) -> MoELanguageModel:
    args = dict(d_model=32, n_layers=2, n_heads=2, max_seq_len=16, moe=MoEConfig(num_experts=4, top_k=2))
    args.update(overrides)
    return MoELanguageModel(**args)


def tiny_trainer(**overrides) -> L.Trainer:
    args = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    args.update(overrides)
    return L.Trainer(**args)


def token_loader(batches: int, batch_size: int = 4, seq_len: int = 16, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (batches * batch_size, seq_len + 1), generator=g)
    return DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=batch_size)


@pytest.mark.parametrize("moe", [MoEConfig(num_experts=4, top_k=2), None], ids=["moe", "dense"])
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_forward_shape(moe, activation):
    torch.manual_seed(0)
    model = MoETransformer(tiny_config(moe=moe, activation=activation))
    logits = model(torch.randint(0, VOCAB, (3, 11)))
    assert logits.shape == (3, 11, VOCAB)
    assert torch.isfinite(logits).all()


def test_causal():
    torch.manual_seed(0)
    model = MoETransformer(tiny_config(moe=MoEConfig(num_experts=4, top_k=2, estimator="topk"))).eval()
    ids = torch.randint(0, VOCAB, (2, 12))
    changed = ids.clone()
    changed[:, 8] = (changed[:, 8] + 1) % VOCAB
    with torch.no_grad():
        before, after = model(ids), model(changed)
    torch.testing.assert_close(before[:, :8], after[:, :8])
    assert not torch.allclose(before[:, 8:], after[:, 8:])


@pytest.mark.parametrize(
    ("every_n_layers", "dense_first_layer", "expected"),
    [(1, False, [0, 1, 2, 3]), (2, False, [1, 3]), (1, True, [1, 2, 3]), (3, False, [2]), (4, True, [3])],
)
def test_moe_layer_placement(every_n_layers, dense_first_layer, expected):
    moe = MoEConfig(num_experts=2, top_k=1, every_n_layers=every_n_layers, dense_first_layer=dense_first_layer)
    model = MoETransformer(tiny_config(n_layers=4, moe=moe))
    placed = [i for i, block in enumerate(model.blocks) if isinstance(block.ffn, MoELayer)]
    assert placed == expected
    assert all(isinstance(model.blocks[i].ffn, FeedForward) for i in range(4) if i not in expected)
    assert model.moe_layers() == [model.blocks[i].ffn for i in expected]


def test_dense_model_has_no_moe_layer():
    model = MoETransformer(tiny_config(moe=None))
    assert not any(isinstance(m, MoELayer) for m in model.modules())
    assert model.moe_layers() == []
    assert model.num_parameters(active_only=True) == model.num_parameters()


def test_moe_config_from_dict():
    config = tiny_config(moe={"num_experts": 3, "top_k": 1})
    assert config.moe == MoEConfig(num_experts=3, top_k=1)


def test_ffn_hidden_defaults():
    assert default_ffn_hidden(256, "gelu") == 1024
    assert default_ffn_hidden(256, "swiglu") == 704
    assert default_ffn_hidden(256, "swiglu") % 64 == 0
    model = MoETransformer(tiny_config(d_model=64, moe=MoEConfig(num_experts=2, top_k=1)))
    assert model.config.ffn_hidden == 192
    assert model.moe_layers()[0].experts.ffn_hidden == 192
    model = MoETransformer(tiny_config(moe=MoEConfig(num_experts=2, top_k=1, ffn_hidden=40, activation="gelu")))
    assert model.moe_layers()[0].experts.ffn_hidden == 40
    assert model.moe_layers()[0].experts.activation == "gelu"


def test_active_parameters_count_top_k_of_the_experts():
    moe = MoEConfig(num_experts=4, top_k=1, ffn_hidden=48)
    model = MoETransformer(tiny_config(moe=moe))
    expert_params = 3 * 32 * 48  # one SwiGLU expert: w1, v1, w2
    assert model.num_parameters() - model.num_parameters(active_only=True) == 2 * 3 * expert_params


@pytest.mark.parametrize("tie", [True, False])
def test_tied_embeddings(tie):
    model = MoETransformer(tiny_config(tie_embeddings=tie))
    shared = model.lm_head.weight.data_ptr() == model.embed.weight.data_ptr()
    assert shared is tie
    untied_extra = 0 if tie else VOCAB * 32
    assert model.num_parameters() == MoETransformer(tiny_config()).num_parameters() + untied_extra


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    seq_len, head_dim = 24, 16
    cos, sin = rope_cache(seq_len, head_dim)
    q, k = torch.randn(head_dim), torch.randn(head_dim)
    q_rot = apply_rope(q.expand(seq_len, head_dim), cos, sin)
    k_rot = apply_rope(k.expand(seq_len, head_dim), cos, sin)
    scores = q_rot @ k_rot.T  # scores[m, n] = <q at position m, k at position n>
    torch.testing.assert_close(scores[1:, 1:], scores[:-1, :-1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(scores[0, 0], scores[0, 5])
    torch.testing.assert_close(q_rot.norm(dim=-1), q.norm().expand(seq_len))
    torch.testing.assert_close(q_rot[0], q)


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: TransformerConfig(d_model=30, n_heads=4), "d_model"),
        (lambda: TransformerConfig(d_model=12, n_heads=4), "n_heads"),
        (lambda: TransformerConfig(n_layers=0), "n_layers"),
        (lambda: TransformerConfig(vocab_size=0), "vocab_size"),
        (lambda: TransformerConfig(max_seq_len=-1), "max_seq_len"),
        (lambda: TransformerConfig(ffn_hidden=0), "ffn_hidden"),
        (lambda: TransformerConfig(activation="relu"), "activation"),
        (lambda: TransformerConfig(moe="topk"), "moe"),
        (lambda: MoEConfig(num_experts=2, top_k=3), "top_k"),
        (lambda: MoEConfig(num_experts=0), "num_experts"),
        (lambda: MoEConfig(every_n_layers=0), "every_n_layers"),
        (lambda: MoEConfig(activation="relu"), "activation"),
        (lambda: MoEConfig(input_jitter=1.5), "input_jitter"),
        (lambda: MoEConfig(ffn_hidden=0), "ffn_hidden"),
        (lambda: MoELanguageModel(d_model=30, n_heads=4), "d_model"),
        (lambda: MoELanguageModel(learning_rate=0.0), "learning_rate"),
        (lambda: MoELanguageModel(min_lr_ratio=2.0), "min_lr_ratio"),
        (lambda: MoELanguageModel(warmup_steps=-1), "warmup_steps"),
    ],
)
def test_invalid_config_names_the_field(build, field):
    with pytest.raises(ValueError, match=field):
        build()


def test_unknown_estimator_is_rejected():
    with pytest.raises((ValueError, KeyError), match="nope"):
        MoETransformer(tiny_config(moe=MoEConfig(estimator="nope")))


@pytest.mark.parametrize(
    ("input_ids", "match"),
    [
        (torch.tensor([[0, 1, VOCAB]]), "input_ids"),
        (torch.tensor([[-1, 1, 2]]), "input_ids"),
        (torch.zeros(1, 3), "input_ids"),
        (torch.zeros(1, 17, dtype=torch.long), "max_seq_len"),
        (torch.zeros(3, dtype=torch.long), "input_ids"),
    ],
)
def test_invalid_input_ids(input_ids, match):
    model = MoETransformer(tiny_config())
    with pytest.raises(ValueError, match=match):
        model(input_ids)


def test_lr_schedule_formula():
    kwargs = dict(warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert warmup_cosine_factor(0, **kwargs) == pytest.approx(0.1)
    assert warmup_cosine_factor(9, **kwargs) == pytest.approx(1.0)
    assert warmup_cosine_factor(59, **kwargs) == pytest.approx(0.55)  # half-way down the cosine
    assert warmup_cosine_factor(109, **kwargs) == pytest.approx(0.1)
    assert warmup_cosine_factor(500, **kwargs) == pytest.approx(0.1)
    assert warmup_cosine_factor(50, warmup_steps=0, total_steps=math.inf, min_lr_ratio=0.1) == 1.0


class LearningRateRecorder(L.Callback):
    def __init__(self):
        self.lrs = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_fit_overfits_one_batch_and_follows_the_schedule():
    torch.manual_seed(0)
    model = tiny_module(learning_rate=1e-2, warmup_steps=5, min_lr_ratio=0.1, weight_decay=0.0)
    input_ids, targets = next(iter(token_loader(1)))
    steps = 40
    repeated = DataLoader(TensorDataset(input_ids.repeat(steps, 1), targets.repeat(steps, 1)), batch_size=4)
    with torch.no_grad():
        before, _ = model._token_loss((input_ids, targets))
    recorder = LearningRateRecorder()
    tiny_trainer(max_steps=steps, callbacks=[recorder]).fit(model, repeated)
    model.eval()
    with torch.no_grad():
        after, _ = model._token_loss((input_ids, targets))
    assert before.item() == pytest.approx(math.log(VOCAB), abs=0.2)
    assert after.item() < before.item() - 1.0

    schedule = dict(warmup_steps=5, total_steps=steps, min_lr_ratio=0.1)
    expected = [1e-2 * warmup_cosine_factor(i, **schedule) for i in range(steps)]
    assert recorder.lrs == pytest.approx(expected)
    assert recorder.lrs[0] == pytest.approx(1e-2 / 5)
    assert recorder.lrs[4] == pytest.approx(1e-2)
    assert recorder.lrs[-1] == pytest.approx(1e-3)


def test_weight_decay_groups():
    model = tiny_module(tie_embeddings=False)
    model.trainer = tiny_trainer(max_steps=10)
    optimizer = model.configure_optimizers()["optimizer"]
    decay, no_decay = (group["params"] for group in optimizer.param_groups)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay}
    not_decayed = {names[id(p)] for p in no_decay}
    assert "model.embed.weight" in not_decayed
    assert all("norm" in n for n in not_decayed - {"model.embed.weight"})
    assert "model.lm_head.weight" in decayed
    assert "model.blocks.0.ffn.experts.w1" in decayed
    assert len(decay) + len(no_decay) == len(list(model.parameters()))


def test_the_optimizer_is_torchs_fused_adamw_and_steps_as_adamws_formula():
    model = tiny_module(weight_decay=0.1)
    model.trainer = tiny_trainer(max_steps=10)
    optimizer = model.configure_optimizers()["optimizer"]
    assert optimizer.defaults["fused"] is True  # every parameter is on the CPU
    param = model.model.blocks[0].ffn.experts.w1
    before = param.detach().double().clone()
    grad = torch.randn_like(param)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    param.grad = grad.clone()
    optimizer.step()
    group = next(g for g in optimizer.param_groups if any(p is param for p in g["params"]))
    lr, (beta1, beta2), eps, decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    g = grad.double()  # AdamW's first step (Loshchilov & Hutter, Alg. 2), bias-corrected, in float64
    m_hat, v_hat = (1 - beta1) * g / (1 - beta1), (1 - beta2) * g * g / (1 - beta2)
    expected = before * (1 - lr * decay) - lr * m_hat / (v_hat.sqrt() + eps)
    torch.testing.assert_close(param.detach().double(), expected, rtol=1e-5, atol=1e-7)


def test_validate_logs_token_weighted_loss_and_perplexity():
    torch.manual_seed(0)
    model = tiny_module()
    loader = token_loader(3, batch_size=2)
    metrics = tiny_trainer().validate(model, loader, verbose=False)[0]
    model.eval()
    with torch.no_grad():
        losses = [model._token_loss(batch)[0] for batch in loader]
    expected = torch.stack(losses).mean()  # equal token counts per batch
    assert metrics["val/loss"] == pytest.approx(expected.item(), rel=1e-5)
    assert metrics["val/ppl"] == pytest.approx(math.exp(expected.item()), rel=1e-5)
    test_metrics = tiny_trainer().test(model, loader, verbose=False)[0]
    assert test_metrics["test/loss"] == pytest.approx(expected.item(), rel=1e-5)


class WrongVocabData(L.LightningDataModule):
    vocab_size = 100

    def train_dataloader(self):
        return token_loader(1)


def test_setup_rejects_datamodule_with_other_vocab():
    with pytest.raises(ValueError, match="vocab_size"):
        tiny_trainer(max_steps=1).fit(tiny_module(), datamodule=WrongVocabData())


def test_generate():
    torch.manual_seed(0)
    model = tiny_module(vocab_size=40)
    model.train()
    prompt = torch.randint(0, 40, (5,))
    out = model.generate(prompt, max_new_tokens=20, top_k=3)  # runs past max_seq_len = 16
    assert out.shape == (25,)
    assert torch.equal(out[:5], prompt)
    assert out.min() >= 0 and out.max() < 40
    assert model.training

    batch = model.generate(torch.randint(0, 40, (3, 4)), max_new_tokens=6, temperature=0.5)
    assert batch.shape == (3, 10)
    greedy = model.generate(prompt, max_new_tokens=8, temperature=0)
    assert torch.equal(greedy, model.generate(prompt, max_new_tokens=8, temperature=0))
    with pytest.raises(ValueError, match="prompt_ids"):
        model.generate(torch.zeros(0, dtype=torch.long), max_new_tokens=1)


def test_sample_text_continues_the_prompt():
    torch.manual_seed(0)
    text = tiny_module().sample_text("héllo", max_new_tokens=5)
    assert isinstance(text, str)
    assert text.startswith("héllo")


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = tiny_module(moe=MoEConfig(num_experts=3, top_k=1, every_n_layers=2))
    trainer = tiny_trainer(max_steps=1)
    trainer.fit(model, token_loader(1))
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    loaded = MoELanguageModel.load_from_checkpoint(path)
    assert loaded.model.config.moe == MoEConfig(num_experts=3, top_k=1, every_n_layers=2)
    ids = torch.randint(0, VOCAB, (2, 8))
    model.eval(), loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids))


def test_cli_arguments_parse_moe_from_yaml():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(MoELanguageModel, "model")
    config = parser.parse_string(
        "model: {d_model: 32, n_heads: 2, n_layers: 2, moe: {num_experts: 4, estimator: topk, every_n_layers: 2}}"
    )
    model = parser.instantiate(config).model
    assert model.model.config.moe == MoEConfig(num_experts=4, top_k=2, every_n_layers=2)
    assert [type(b.ffn) for b in model.model.blocks] == [FeedForward, MoELayer]

    dense = parser.instantiate(parser.parse_string("model: {d_model: 32, n_heads: 2, n_layers: 2, moe: null}")).model
    assert dense.model.moe_layers() == []
