"""Every bad input listed in docs/bad_inputs.md gives one ``error: ...`` line naming the field, exit 2.

The commands run in-process (:func:`lightning_moe.cli.main`, stderr captured) in a scratch
folder holding the files the list refers to; two run as real ``lightning-moe`` processes to
show the installed command behaves the same.
"""

import contextlib
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed.checkpoint
from helpers import TINY_QUICKSTART
from lightning.pytorch.demos.boring_classes import BoringModel

from lightning_moe.cli import main
from lightning_moe.module import MoELanguageModel

ROOT = Path(__file__).resolve().parents[1]
LIST = ROOT / "docs" / "bad_inputs.md"

# A tiny model and corpus, put before the bad flags of training commands (so they win).
TINY = [*TINY_QUICKSTART, "--trainer.enable_progress_bar=false"]


def listed_cases():
    cases = []
    for line in LIST.read_text().splitlines():
        match = re.match(r"\| (\d+) \| `(.+?)` \| `(.+?)` \|", line)
        if match:
            number, command, field = int(match[1]), match[2], match[3]
            cases.append(pytest.param(command, field, id=f"{number}"))
    return cases


def split_command(command):
    """(environment settings written before the command as ``VAR=value``, the command's arguments)."""
    words = shlex.split(command)
    env = {}
    while "=" in words[0] and words[0].split("=", 1)[0].isupper():
        name, value = words.pop(0).split("=", 1)
        env[name] = value
    return env, cli_args(shlex.join(words))


def cli_args(command):
    args = shlex.split(command)
    assert args[0] == "lightning-moe"
    args = args[1:]
    if args[0] in ("fit", "validate", "test", "predict") and args[1:3] == ["--config", "recipes/quickstart.yaml"]:
        args = args[:3] + TINY + args[3:]
    return args


def run_in_process(args):
    """(exit status, stderr) of ``lightning-moe ARGS`` run by calling ``main``."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            main(args)
            code = 0
        except SystemExit as exit_:
            code = exit_.code
    return code, err.getvalue()


def save_moe_checkpoint(path):
    moe = {"num_experts": 4, "ffn_hidden": 32}
    module = MoELanguageModel(d_model=32, n_heads=2, n_layers=1, max_seq_len=16, moe=moe)
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(path)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad_inputs")
    (folder / "recipes").symlink_to(ROOT / "recipes")
    text = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n\n" for i in range(400))
    (folder / "corpus.txt").write_text(text)
    (folder / "notes.txt").write_text("not a checkpoint\n")
    (folder / "empty.txt").write_text("")
    (folder / "empty_folder").mkdir()
    save_moe_checkpoint(folder / "moe.ckpt")
    (folder / "truncated.ckpt").write_bytes((folder / "moe.ckpt").read_bytes()[:2000])
    other = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    other.strategy.connect(BoringModel())
    other.save_checkpoint(folder / "other_model.ckpt")
    (folder / "other_run" / "checkpoints").mkdir(parents=True)
    shutil.copy(folder / "moe.ckpt", folder / "other_run" / "checkpoints" / "last.ckpt")
    (folder / "full_folder").mkdir()
    (folder / "full_folder" / "keep.txt").write_text("a file export must not overwrite\n")
    (folder / "drop_turns.jinja").write_text(
        "{% for m in messages %}{% if loop.last %}{{ m['content'] }}{% else %}<{{ m['role'] }}>{% endif %}{% endfor %}"
    )
    save_hf_checkpoint(folder)
    torch.distributed.checkpoint.save({"state_dict": {"model.w": torch.zeros(2)}}, checkpoint_id=folder / "dcp-other", no_dist=True)
    torch.save({"hyper_parameters": {"hidden": 2}}, folder / "dcp-other" / "meta.pt")
    save_distributed_copy(folder / "moe.ckpt", folder / "dcp")
    shutil.copytree(folder / "dcp", folder / "dcp-half")
    (folder / "dcp-half" / "meta.pt").unlink()
    (folder / "bin-only").mkdir()
    shutil.copy(folder / "tiny" / "config.json", folder / "bin-only" / "config.json")
    torch.save({}, folder / "bin-only" / "pytorch_model.bin")
    return folder


def save_distributed_copy(checkpoint, folder):
    """``checkpoint`` as ModelParallelStrategy writes it: the weights as DCP shards, the rest in ``meta.pt``."""
    contents = torch.load(checkpoint, weights_only=False)
    torch.distributed.checkpoint.save({"state_dict": contents.pop("state_dict")}, checkpoint_id=folder, no_dist=True)
    contents.pop("optimizer_states", None)
    torch.save(contents, folder / "meta.pt")


def save_hf_checkpoint(folder):
    """``tiny/``: a tiny OLMoE folder (also the posttrain recipe's ``runs/tiny-olmoe``); ``hf.ckpt``: a checkpoint of it;
    ``tiny-glm4/``: a tiny GLM-4.5-shaped folder."""
    from lightning_moe.hf import HFMoELanguageModel
    from lightning_moe.hf.tiny import build_tiny_model

    build_tiny_model("olmoe", str(folder / "tiny"), vocab_size=320)
    build_tiny_model("glm4_moe", str(folder / "tiny-glm4"), vocab_size=320)  # routers that select by sigmoid scores
    (folder / "runs").mkdir(exist_ok=True)
    (folder / "runs" / "tiny-olmoe").symlink_to(folder / "tiny")
    module = HFMoELanguageModel(pretrained=str(folder / "tiny"), dtype="float32")
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(folder / "hf.ckpt")


def test_the_list_is_long_enough():
    assert len(listed_cases()) >= 25


@pytest.mark.parametrize(("command", "field"), listed_cases())
def test_bad_input_gives_one_line_naming_the_field(command, field, scratch, monkeypatch):
    monkeypatch.chdir(scratch)
    monkeypatch.delenv("LIGHTNING_MOE_DEBUG", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a Hub name fails at once instead of waiting for the network
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    env, args = split_command(command)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code, stderr = run_in_process(args)
    # transformers draws a "Loading weights" bar while a model loads: progress, not part of an
    # error found after the model is loaded.
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("Loading weights")]
    assert code == 2, stderr
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ") and field in lines[0], lines[0]


def test_validate_with_a_missing_checkpoint_creates_no_run_folder(tmp_path, scratch, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    (tmp_path / "corpus.txt").write_text((scratch / "corpus.txt").read_text())
    command = "lightning-moe validate --config recipes/quickstart.yaml --ckpt_path gone.ckpt"
    code, stderr = run_in_process(cli_args(command))
    assert code == 2 and "gone.ckpt" in stderr
    assert not (tmp_path / "runs").exists(), sorted(p.name for p in (tmp_path / "runs").rglob("*"))


def test_debug_shows_the_traceback(scratch, monkeypatch):
    monkeypatch.chdir(scratch)
    args = cli_args("lightning-moe fit --config recipes/quickstart.yaml --model.learning_rate -1")
    with pytest.raises(ValueError, match="learning_rate"):
        main([*args, "--debug"])
    monkeypatch.setenv("LIGHTNING_MOE_DEBUG", "1")
    with pytest.raises(ValueError, match="learning_rate"):
        main(args)


def test_a_bug_keeps_its_traceback(scratch, monkeypatch):
    """An error that is not the user's (here: a broken sampler) is not turned into one line."""

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(MoELanguageModel, "sample_text", broken)
    with pytest.raises(ZeroDivisionError):
        main(["sample", str(scratch / "moe.ckpt")])


def test_the_installed_command_prints_one_line(scratch):
    command, field = "lightning-moe fit --config recipes/quickstart.yaml --model.moe.top_k 9", "top_k"
    env = {k: v for k, v in os.environ.items() if k != "LIGHTNING_MOE_DEBUG"}
    script = Path(sys.executable).parent / "lightning-moe"
    result = subprocess.run(
        [str(script), *cli_args(command)], cwd=scratch, capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and field in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    # Whatever else is on stderr is Lightning's log of the seed, never part of the error.
    assert all(line.startswith(("error: ", "Seed set to")) for line in result.stderr.splitlines()), result.stderr


def test_moe_checkpoint_fixture_is_a_real_checkpoint(scratch):
    """The list's "good" checkpoint loads, so the errors about it are about the flags, not the file."""
    module = MoELanguageModel.load_from_checkpoint(scratch / "moe.ckpt", map_location="cpu")
    assert module.hparams.d_model == 32 and torch.is_tensor(next(module.parameters()))
