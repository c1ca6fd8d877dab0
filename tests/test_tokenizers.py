"""Hugging Face tokenizers in TextDataModule: loading, the token streams they give, vocab linking, sampling.

Every tokenizer here is trained or built locally with the `tokenizers` library; nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from helpers import ready_datamodule, record_hub_retries, train_bpe_tokenizer, write_corpus
from tokenizers import Tokenizer, models, pre_tokenizers

from lightning_moe.cli import main
from lightning_moe.trainer_cli import MoECLI
from lightning_moe.data import TextDataModule, decode
from lightning_moe.data.tokenizers import load_tokenizer
from lightning_moe.data.train_tokenizer import main as train_tokenizer
from lightning_moe.errors import ConfigError
from lightning_moe.module import MoELanguageModel

DOCS = {
    f"doc_{i:02d}.py": "".join(
        f"def function_{i}_{j}(value):\n    return value * {j} + {i}  # café\n"
        for j in range(30)
    )
    for i in range(12)
}


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "corpus", DOCS)


@pytest.fixture
def bpe(tmp_path):
    return train_bpe_tokenizer(tmp_path / "tokenizer.json", list(DOCS.values()), vocab_size=300)


def make_dm(source, tmp_path, **kwargs) -> TextDataModule:
    return ready_datamodule(source, kwargs.pop("cache_dir", tmp_path / "cache"), **kwargs)


def test_tokenizer_json_file_and_folder_load_with_their_special_tokens(tmp_path, bpe):
    reference = Tokenizer.from_file(str(bpe))
    eot = reference.token_to_id("<|endoftext|>")
    from_file = load_tokenizer(str(bpe))
    assert (from_file.vocab_size, from_file.bos_id, from_file.eos_id, from_file.doc_start_id) == (300, None, eot, eot)
    text = "def f(x):\n    return x  # café"
    assert from_file.encode(text).tolist() == reference.encode(text, add_special_tokens=False).ids
    assert from_file.encode(text, bos=True).tolist() == [eot] + reference.encode(text, add_special_tokens=False).ids
    assert from_file.decode(from_file.encode(text, bos=True)) == text

    # A folder whose tokenizer_config.json names the specials (as transformers saves them).
    folder = tmp_path / "tok"
    folder.mkdir()
    backend = Tokenizer.from_file(str(bpe))
    backend.add_special_tokens(["<s>", "<pad>"])
    backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": {"content": "<s>"}, "eos_token": "<|endoftext|>", "pad_token": "<pad>"})
    )
    tok = load_tokenizer(str(folder))
    assert tok.vocab_size == 302
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (backend.token_to_id("<s>"), eot, backend.token_to_id("<pad>"))
    assert tok.doc_start_id == tok.bos_id


def test_bpe_streams_equal_tokenizing_each_document_directly(tmp_path, corpus, bpe):
    dm = make_dm(corpus, tmp_path, tokenizer=str(bpe), val_fraction=0.2)
    reference = Tokenizer.from_file(str(bpe))
    eot = reference.token_to_id("<|endoftext|>")
    assert dm.vocab_size == 300 and dm.train_tokens.dtype == np.uint16
    for names, stream in ((dm.train_documents, dm.train_tokens), (dm.val_documents, dm.val_tokens)):
        expected = []
        for name in names:
            expected += [eot] + reference.encode(DOCS[name], add_special_tokens=False).ids
        assert np.asarray(stream).tolist() == expected
    assert sorted(dm.train_documents + dm.val_documents) == sorted(DOCS)
    # The cache is keyed by the tokenizer: bytes on the same corpus is a different cache.
    assert make_dm(corpus, tmp_path).cache_path != dm.cache_path


def test_vocab_above_65536_is_stored_as_uint32(tmp_path):
    # A word-level vocabulary of 70,000 words: ids above 65,535 would wrap around in uint16.
    vocab = {"<|endoftext|>": 0, **{f"w{i}": i + 1 for i in range(70_000)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(str(tmp_path / "words.json"))
    words = [f"w{i}" for i in range(69_000, 70_000)] + [f"w{i}" for i in range(500)]
    (tmp_path / "words.txt").write_text(" ".join(words))
    dm = make_dm(tmp_path / "words.txt", tmp_path, tokenizer=str(tmp_path / "words.json"), val_fraction=0.25)
    assert dm.vocab_size == 70_001 and dm.train_tokens.dtype == np.uint32
    stream = np.concatenate([np.asarray(dm.train_tokens), np.asarray(dm.val_tokens)[1:]])  # one document, cut in two
    assert stream[0] == 0
    ids = stream[1:].tolist()
    assert ids[:3] == [69_001, 69_002, 69_003] and max(ids) == 70_000
    inputs, _ = next(iter(dm.train_dataloader()))
    assert inputs.max() > 65_535


def test_unloadable_tokenizer_is_a_one_line_config_error(tmp_path, monkeypatch):
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{ this is not a tokenizer")
    with pytest.raises(ConfigError, match=r"^data.tokenizer=.*is not a Hugging Face tokenizer.json[^\n]*$"):
        TextDataModule(tokenizer=str(bad))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match=r"^data.tokenizer='no-such-org-7f3a/no-such-tokenizer': could not load this tokenizer"):
        TextDataModule(tokenizer="no-such-org-7f3a/no-such-tokenizer")
    # A tokenizer without BOS or EOS cannot mark where documents start.
    plain = Tokenizer(models.WordLevel({"a": 0, "b": 1}, unk_token="a"))
    plain.save(str(tmp_path / "plain.json"))
    with pytest.raises(ConfigError, match=r"^data.tokenizer=.*neither a BOS nor an EOS"):
        TextDataModule(tokenizer=str(tmp_path / "plain.json"))


def test_cli_links_model_vocab_size_to_the_tokenizer(tmp_path, corpus, bpe):
    cli = MoECLI(
        MoELanguageModel,
        TextDataModule,
        run=False,
        args=[
            f"--data.source={corpus}",
            f"--data.tokenizer={bpe}",
            "--model.d_model=16",
            "--model.n_heads=2",
            "--model.n_layers=1",
            "--trainer.logger=false",
        ],
    )
    assert cli.model.model.config.vocab_size == 300 == cli.datamodule.vocab_size
    assert cli.model.model.embed.num_embeddings == 300


def tiny_model(vocab_size, max_seq_len=16):
    return MoELanguageModel(
        vocab_size=vocab_size,
        d_model=16,
        n_heads=2,
        n_layers=1,
        max_seq_len=max_seq_len,
        moe={"num_experts": 2, "top_k": 1, "ffn_hidden": 16},
        warmup_steps=1,
    )


def tiny_trainer(tmp_path, **kwargs):
    return L.Trainer(
        max_steps=2,
        limit_val_batches=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **kwargs,
    )


@pytest.mark.parametrize(
    ("model_kwargs", "data_kwargs", "message"),
    [
        ({"vocab_size": 258}, {"seq_len": 16}, r"^data.tokenizer=.* has 300 tokens, more than model.vocab_size=258"),
        ({"vocab_size": 300}, {"seq_len": 32}, r"^data.seq_len=32 is longer than model.max_seq_len=16"),
    ],
)
def test_data_the_model_cannot_take_fails_before_tokenising(tmp_path, corpus, bpe, model_kwargs, data_kwargs, message):
    data = TextDataModule(
        source=str(corpus), tokenizer=str(bpe), batch_size=2, cache_dir=str(tmp_path / "cache"), **data_kwargs
    )
    with pytest.raises(ConfigError, match=message):
        tiny_trainer(tmp_path).fit(tiny_model(**model_kwargs), data)
    assert not (tmp_path / "cache").exists(), "the corpus was tokenised before the error"


def test_checkpoint_records_the_tokenizer_and_sample_decodes_with_it(tmp_path, corpus, bpe, capsys):
    data = TextDataModule(
        source=str(corpus), tokenizer=str(bpe), seq_len=16, batch_size=2, cache_dir=str(tmp_path / "cache")
    )
    trainer = tiny_trainer(tmp_path, enable_checkpointing=False)
    trainer.fit(tiny_model(300), data)
    ckpt = tmp_path / "model.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=True)["tokenizer"]
    assert saved["name"] == str(bpe) and saved["eos_id"] == Tokenizer.from_file(str(bpe)).token_to_id("<|endoftext|>")
    bpe.unlink()  # the checkpoint alone is enough to decode

    # What `sample` must print: the model's continuation (same seed and settings as its
    # defaults) decoded by the `tokenizers` library itself.
    reference = Tokenizer.from_str(saved["json"])
    prompt = "def function_3"
    prompt_ids = torch.tensor([saved["eos_id"]] + reference.encode(prompt, add_special_tokens=False).ids)
    torch.manual_seed(0)  # before loading, as `sample` does (building the model draws random numbers)
    model = MoELanguageModel.load_from_checkpoint(ckpt, map_location="cpu")
    ids = model.generate(prompt_ids, 8, temperature=0.8, top_k=40)
    expected = reference.decode(ids.tolist(), skip_special_tokens=True)
    assert expected.startswith(prompt) and expected != decode(ids)  # byte-level decoding would differ

    capsys.readouterr()
    main(["sample", str(ckpt), "--prompt", prompt, "--max_new_tokens", "8"])
    assert capsys.readouterr().out == expected + "\n"


def test_offline_bpe_recipe_trains_its_tokenizer_then_fits_and_samples(tmp_path, monkeypatch, capsys):
    recipe = Path(__file__).parents[1] / "recipes" / "pretrain_bpe_offline.yaml"
    data = yaml.safe_load(recipe.read_text())["data"]
    monkeypatch.chdir(tmp_path)  # the recipe's tokenizer path is relative, as its comment's commands are
    train_tokenizer(
        ["--source", data["source"], "--vocab-size", "320", "--max-bytes", "200000", "--output", data["tokenizer"]]
    )
    tiny = ["--model.d_model=32", "--model.n_heads=2", "--model.n_layers=1", "--model.moe.ffn_hidden=32"]
    main(
        ["fit", "--config", str(recipe), *tiny, "--model.warmup_steps=1", "--data.seq_len=32", "--data.batch_size=4"]
        + ["--data.max_bytes=200000", f"--data.cache_dir={tmp_path / 'cache'}", "--trainer.max_steps=2"]
        + ["--trainer.val_check_interval=2", "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false"]
    )
    last = tmp_path / "runs" / "pretrain_bpe_offline" / "version_0" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["tokenizer"]["name"] == data["tokenizer"]
    assert checkpoint["state_dict"]["model.embed.weight"].shape[0] == 320  # linked to the tokenizer
    capsys.readouterr()
    main(["sample", str(last), "--prompt", "import ", "--max_new_tokens", "5"])
    assert capsys.readouterr().out.startswith("import ")


@pytest.mark.parametrize("offline", [False, True])
def test_a_tokenizer_hub_name_that_cannot_be_fetched_fails_at_once_with_the_offline_hint(monkeypatch, offline):
    """No ~23 s of retries and a hint at HF_HUB_OFFLINE, as for a model's Hub name."""
    from lightning_moe.data.tokenizers import load_transformers_tokenizer

    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    sleeps = record_hub_retries(monkeypatch)
    with pytest.raises(ConfigError) as err:
        load_transformers_tokenizer("nobody-here/no-such-tokenizer-7f3a9c", field="--tokenizer")
    message = str(err.value)
    assert sleeps == []  # no retries
    assert len(message.splitlines()) == 1
    assert "--tokenizer='nobody-here/no-such-tokenizer-7f3a9c'" in message
    assert "HF_HUB_OFFLINE" in message and "local folder" in message


def test_train_tokenizer_with_chatml_writes_a_chat_tokenizer_folder_within_the_vocab_size(tmp_path, corpus):
    """``--chat-template chatml``: a folder AutoTokenizer loads, ChatML's turn tokens as the last two ids,
    its template rendering each message as ``<|im_start|>role\\ncontent<|im_end|>\\n``."""
    from transformers import AutoTokenizer

    output = tmp_path / "chat-tokenizer"
    train_tokenizer(["--source", str(corpus), "--vocab-size", "320", "--chat-template", "chatml", "--output", str(output)])
    tokenizer = AutoTokenizer.from_pretrained(output)
    assert len(tokenizer) == 320
    assert tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [318, 319]
    assert tokenizer.eos_token == tokenizer.bos_token == tokenizer.pad_token == "<|endoftext|>"
    messages = [{"role": "user", "content": "Sort: b a"}, {"role": "assistant", "content": "a b"}]
    expected = "<|im_start|>user\nSort: b a<|im_end|>\n<|im_start|>assistant\na b<|im_end|>\n"
    assert tokenizer.apply_chat_template(messages, tokenize=False) == expected
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nSort: b a<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer(expected, add_special_tokens=False)["input_ids"]
    assert ids.count(318) == 2 and ids.count(319) == 2  # one id each, never split into bytes
    assert tokenizer.decode(ids) == expected  # byte-level: the text round-trips
