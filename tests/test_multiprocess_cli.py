"""Multi-process ``lightning-moe fit`` and ``compare --devices 2`` run through the real command to their end.

The tests start the command as a process of its own (``python -m lightning_moe.cli``), as a
user or a cluster scheduler does: Lightning's launcher then starts rank 1 as a second process
running the same command line (``ddp_fork``, whose ranks are forked from the command's process,
runs the command in the test's). A fit must exit 0 and print its summary once, from rank 0,
naming the folders it really wrote.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import TINY_QUICKSTART

from lightning_moe.cli import main

ROOT = Path(__file__).resolve().parents[1]

# A tiny quickstart on two CPU processes: 2 optimizer steps, one validation at the end, checkpoints kept.
TINY = [*TINY_QUICKSTART, "--trainer.accelerator=cpu", "--trainer.devices=2"]

pytestmark = [pytest.mark.slow, pytest.mark.skipif(sys.platform == "win32", reason="gloo ranks on Linux/macOS")]


def lightning_moe(args, cwd, timeout=240):
    """``lightning-moe ARGS`` run in ``cwd``: (exit status, stdout, stderr)."""
    # One thread per rank: two ranks on a shared CPU are otherwise several times slower.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LIGHTNING_MOE_CACHE": str(cwd / "cache")}
    env.pop("LOCAL_RANK", None)  # a rank's variables would make the command think it is one
    done = subprocess.run(
        [sys.executable, "-m", "lightning_moe.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return done.returncode, done.stdout, done.stderr


def write_corpus(tmp_path):
    (tmp_path / "corpus.txt").write_text(
        "".join(f"def g{i}(x, y):\n    return (x - {i}) * y // {i + 1}\n" for i in range(100))
    )


def summary_lines(stdout, prefix):
    return [line[len(prefix) :] for line in stdout.splitlines() if line.startswith(prefix)]


def assert_ends_cleanly(tmp_path, strategy_flags):
    write_corpus(tmp_path)
    code, out, err = lightning_moe(
        ["fit", "--config", str(ROOT / "recipes" / "quickstart.yaml"), *TINY, *strategy_flags], tmp_path
    )
    assert code == 0, err[-3000:]
    assert "Connection closed" not in err
    # The summary is printed once (rank 0 alone) and names what the run wrote.
    folders = summary_lines(out, "Run folder: ")
    assert folders == [str(Path("runs") / "quickstart" / "version_0")], out
    assert (tmp_path / folders[0] / "hparams.yaml").is_file()
    [last] = summary_lines(out, "Last checkpoint: ")
    assert Path(last) == Path(folders[0]) / "checkpoints" / "last.ckpt"
    assert (tmp_path / last).exists()
    [best] = summary_lines(out, "Best checkpoint: ")
    assert " (val/loss " in best and (tmp_path / best.split(" (val/loss ")[0]).exists()
    # Progress (plain lines: stdout is a pipe) comes from rank 0 alone too.
    assert [line.split(" | ")[0] for line in out.splitlines() if line.startswith(("step ", "validation "))] == [
        "step 2/2",
        "validation at step 2/2",
    ]


def test_ddp_fit_ends_cleanly_with_one_summary(tmp_path):
    assert_ends_cleanly(tmp_path, ["--trainer.strategy=ddp"])


def test_model_parallel_fit_ends_cleanly_with_one_summary(tmp_path):
    # FSDP2 over the two ranks (ModelParallelStrategy's only launcher starts processes, as here).
    assert_ends_cleanly(
        tmp_path,
        [
            "--trainer.strategy=lightning.pytorch.strategies.ModelParallelStrategy",
            "--trainer.strategy.data_parallel_size=2",
            "--trainer.strategy.tensor_parallel_size=1",
        ],
    )


@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
def test_a_fit_in_forked_ranks_prints_its_summary(tmp_path, monkeypatch, capsys):
    """``ddp_fork`` (as ``ddp_spawn``) trains in processes this one starts; this one prints the summary.

    Forked here, so the ranks need no fresh interpreter. Lightning sends the best checkpoint
    back to this process, not the last one.
    """
    import torch

    if torch.cuda.is_initialized():
        pytest.skip("forking ranks is impossible once CUDA is initialised in this process")
    write_corpus(tmp_path)
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(ROOT / "recipes" / "quickstart.yaml"), *TINY, "--trainer.strategy=ddp_fork"])
    out = capsys.readouterr().out
    assert summary_lines(out, "Run folder: ") == [str(Path("runs") / "quickstart" / "version_0")], out
    [best] = summary_lines(out, "Best checkpoint: ")
    assert (tmp_path / best).exists()


def test_compare_on_two_devices_ends_cleanly(tmp_path):
    """``compare --devices 2`` on CPU: two runs at once, each in a process of its own, each ending with its summary."""
    write_corpus(tmp_path)
    study = {
        "name": "tiny",
        "output_dir": "study",
        "seeds": [0],
        "steps": 2,
        "corpus": "corpus.txt",
        "num_threads": 1,
        "base": str(ROOT / "recipes" / "quickstart.yaml"),
        "overrides": {
            flag[2:].split("=")[0]: yaml.safe_load(flag.split("=", 1)[1])
            for flag in TINY
            if not flag.startswith(("--data.source", "--trainer.max_steps", "--trainer.devices", "--trainer.logger"))
        },
        "configurations": [
            {"name": "topk"},
            {"name": "smv2", "overrides": {"model.moe.estimator": "sparsemixer_v2"}},
        ],
    }
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    code, _, err = lightning_moe(["compare", "--config", "study.yaml", "--devices", "2"], tmp_path)
    assert code == 0, err[-3000:]
    results = json.loads((tmp_path / "study" / "results.json").read_text())
    assert sorted((run["status"], run["device"]) for run in results["runs"]) == [("done", 0), ("done", 1)]
    for run in results["runs"]:
        log = (Path(run["run_dir"]) / "log.txt").read_text()
        assert summary_lines(log, "Run folder: ") == [run["run_dir"]], log[-2000:]
