"""`lightning-moe export`: never overwrites, never writes into the base model, needs no base model.

A post-training checkpoint carries its model's Hugging Face config and tokenizer, so it
exports (and samples) from any working directory after the base model folder has moved;
the exported folder is checked with plain ``transformers``, against the trained module.
"""

import hashlib
import os
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lightning_moe.cli import main  # noqa: E402
from lightning_moe.data import TextDataModule  # noqa: E402
from lightning_moe.errors import ConfigError  # noqa: E402
from lightning_moe.hf.module import HFMoELanguageModel  # noqa: E402
from lightning_moe.hf.tiny import build_tiny_model  # noqa: E402

from helpers import fit_quietly, record_hub_retries  # noqa: E402

SEQ = 16
IDS = torch.randint(0, 258, (2, SEQ), generator=torch.Generator().manual_seed(1))
TEXT = "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    return build_tiny_model("olmoe", str(tmp_path_factory.mktemp("tiny") / "olmoe"), vocab_size=320)


def folder_bytes(folder):
    """Every file under ``folder`` (relative path -> sha256), to show nothing there changed."""
    found = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as fh:
                found[os.path.relpath(path, folder)] = hashlib.sha256(fh.read()).hexdigest()
    return found


@pytest.fixture
def trained(tmp_path, tiny_base, monkeypatch):
    """A checkpoint of a model post-trained from ``base`` (given relative to the run's folder), and its logits."""
    run = tmp_path / "run"
    run.mkdir()
    shutil.copytree(tiny_base, run / "base")
    corpus = run / "corpus.py"
    corpus.write_text("".join(f"def g{i}(x, y):\n    return (x - {i}) * y // {i + 1}\n" for i in range(40)))
    monkeypatch.chdir(run)
    torch.manual_seed(0)
    module = HFMoELanguageModel(pretrained="base", estimator="densemixer", learning_rate=3e-3)
    data = TextDataModule(source=str(corpus), seq_len=SEQ, batch_size=4, cache_dir=str(run / "cache"))
    trainer = fit_quietly(module, data, [], max_steps=2, limit_val_batches=0)
    checkpoint = str(run / "trained.ckpt")
    trainer.save_checkpoint(checkpoint)
    module.eval()
    with torch.no_grad():
        logits = module(IDS)
    return checkpoint, str(run / "base"), logits


def export(*args):
    main(["export", *map(str, args)])


def exit_line(capsys, *args):
    """The one ``error: ...`` line of a refused ``lightning-moe export ARGS``."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        export(*args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    return err


def assert_loads_with_the_trained_logits(folder, logits):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, logits, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- no overwriting


def test_a_non_empty_output_folder_is_refused_unless_overwrite(tmp_path, trained, capsys):
    checkpoint, _, logits = trained
    output = tmp_path / "out"
    output.mkdir()
    (output / "notes.txt").write_text("keep me")
    err = exit_line(capsys, checkpoint, "--output", output)
    assert "--output" in err and "--overwrite" in err and "not empty" in err
    assert os.listdir(output) == ["notes.txt"] and (output / "notes.txt").read_text() == "keep me"

    export(checkpoint, "--output", output, "--overwrite")
    # The folder is replaced as a whole: nothing of what was there is left beside the export.
    assert not (output / "notes.txt").exists()
    assert_loads_with_the_trained_logits(output, logits)
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []  # no temporary folders left


@pytest.mark.parametrize("where", ["base", "base/sub", "."])
def test_the_base_model_folder_is_never_written_even_with_overwrite(tmp_path, trained, capsys, where):
    checkpoint, base, _ = trained
    before = folder_bytes(base)
    output = os.path.normpath(os.path.join(base, "..", where)) if where != "base/sub" else os.path.join(base, "sub")
    err = exit_line(capsys, checkpoint, "--output", output, "--overwrite")
    assert "base model" in err and "--output" in err
    assert folder_bytes(base) == before
    assert os.path.isfile(checkpoint)


def test_the_hugging_face_cache_is_never_written(tmp_path, trained, capsys, monkeypatch):
    from huggingface_hub import constants

    checkpoint, _, _ = trained
    cache = tmp_path / "hub"
    snapshot = cache / "models--someone--moe" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    err = exit_line(capsys, checkpoint, "--output", snapshot, "--overwrite")
    assert "Hugging Face cache" in err and "--output" in err
    assert os.listdir(snapshot) == []


def test_a_failed_export_leaves_no_half_written_folder(tmp_path, trained, capsys, monkeypatch):
    checkpoint, _, _ = trained
    output = tmp_path / "out"
    err = exit_line(capsys, checkpoint, "--output", output, "--tokenizer", tmp_path / "no-such-tokenizer")
    assert "tokenizer" in err
    assert not output.exists()

    export(checkpoint, "--output", output)
    before = folder_bytes(output)

    save_config = transformers.PretrainedConfig.save_pretrained  # written after the weights

    def disk_full_after_the_weights(self, *args, **kwargs):
        save_config(self, *args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(transformers.PretrainedConfig, "save_pretrained", disk_full_after_the_weights)
    with pytest.raises(OSError, match="No space left"):
        export(checkpoint, "--output", output, "--overwrite", "true")
    assert folder_bytes(output) == before  # the previous export, whole
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []


# ---------------------------------------------------------------------------- no base model needed


def test_a_checkpoint_exports_and_samples_from_elsewhere_after_the_base_model_is_gone(
    tmp_path, trained, capsys, monkeypatch
):
    checkpoint, base, logits = trained
    tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    generation = transformers.GenerationConfig.from_pretrained(base)
    shutil.rmtree(base)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    export(checkpoint, "--output", "sft")
    assert_loads_with_the_trained_logits(elsewhere / "sft", logits)
    exported = transformers.AutoTokenizer.from_pretrained(elsewhere / "sft")
    assert exported(TEXT)["input_ids"] == tokenizer(TEXT)["input_ids"]
    assert exported.chat_template == tokenizer.chat_template
    assert transformers.GenerationConfig.from_pretrained(elsewhere / "sft").eos_token_id == generation.eos_token_id

    capsys.readouterr()
    main(["sample", checkpoint, "--prompt", "def ", "--max_new_tokens", "3", "--temperature", "0"])
    assert capsys.readouterr().out.startswith("def ")


def test_an_older_checkpoint_without_the_stored_model_still_exports_from_its_base(tmp_path, trained):
    checkpoint, _, logits = trained
    saved = torch.load(checkpoint, weights_only=False)
    assert {"config", "tokenizer"} <= saved.pop("hf_model").keys()
    saved["hyper_parameters"]["pretrained"] = "base"  # as older versions stored it: relative
    torch.save(saved, checkpoint)
    export(checkpoint, "--output", tmp_path / "out")
    assert_loads_with_the_trained_logits(tmp_path / "out", logits)


def test_pretrained_is_kept_as_an_absolute_folder(trained):
    checkpoint, base, _ = trained
    hparams = torch.load(checkpoint, weights_only=False)["hyper_parameters"]
    assert hparams["pretrained"] == os.path.abspath(base)


# ---------------------------------------------------------------------------- Hub names


@pytest.mark.parametrize("offline", [False, True])
def test_a_hub_name_that_cannot_be_fetched_fails_at_once_with_the_offline_hint(tmp_path, monkeypatch, offline):
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    sleeps = record_hub_retries(monkeypatch)
    with pytest.raises(ConfigError) as err:
        HFMoELanguageModel(pretrained="nobody-here/no-such-moe-model-7f3a9c")
    message = str(err.value)
    assert sleeps == []  # no retries
    assert len(message.splitlines()) == 1
    assert "`pretrained`='nobody-here/no-such-moe-model-7f3a9c'" in message
    assert "HF_HUB_OFFLINE" in message and "local" in message


def test_a_model_pretrained_from_a_config_exports_with_the_data_tokenizer(tmp_path, tiny_base, monkeypatch):
    """A base pretrained from scratch (``model.config``) on a Hugging Face tokenizer is exported with that
    tokenizer, so the folder post-trains and generates as any released model does; ``--tokenizer`` overrides it."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_base, tmp_path / "tokenizer-folder", ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    corpus = tmp_path / "corpus.py"
    corpus.write_text("".join(f"def g{i}(x, y):\n    return (x - {i}) * y // {i + 1}\n" for i in range(40)))
    config = transformers.AutoConfig.from_pretrained(tiny_base).to_dict()
    module = HFMoELanguageModel(config=config, estimator="topk", dtype="float32")
    data = TextDataModule(source=str(corpus), tokenizer="tokenizer-folder", seq_len=SEQ, batch_size=4,
                          cache_dir=str(tmp_path / "cache"))
    trainer = fit_quietly(module, data, [], max_steps=1, limit_val_batches=0)
    trainer.save_checkpoint(tmp_path / "scratch.ckpt")
    shutil.move(tmp_path / "tokenizer-folder", tmp_path / "moved")  # the checkpoint carries the tokenizer itself
    export(tmp_path / "scratch.ckpt", "--output", tmp_path / "exported")
    reference = transformers.AutoTokenizer.from_pretrained(tiny_base)
    exported = transformers.AutoTokenizer.from_pretrained(tmp_path / "exported")
    assert exported(TEXT)["input_ids"] == reference(TEXT)["input_ids"]
    assert exported.chat_template == reference.chat_template and exported.eos_token == reference.eos_token
