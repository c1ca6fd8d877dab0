"""Progress is readable in a log file: plain lines every few steps when stdout is not a terminal."""

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.demos.boring_classes import BoringModel

from lightning_moe.cli import main
from lightning_moe.progress import MAX_LINES, StepLog, StepRichProgressBar, StepTQDMProgressBar, choose_progress_display

ROOT = Path(__file__).resolve().parents[1]
STEP_LINE = re.compile(r"^step (\d+)/(\d+) \| (.*) \| \d+:\d\d:\d\d, [\d.]+ steps/s$")


# A tiny quickstart fit in the current folder: 6 steps, a validation every 3.
TINY_FIT = [
    *("fit", "--config", str(ROOT / "recipes" / "quickstart.yaml")),
    *("--model.d_model=32", "--model.n_heads=2", "--model.n_layers=1", "--model.max_seq_len=16"),
    *("--model.moe.num_experts=4", "--model.moe.ffn_hidden=32"),
    *("--data.source=corpus.txt", "--data.seq_len=16", "--data.batch_size=2", "--data.cache_dir=cache"),
    *("--trainer.max_steps=6", "--trainer.log_every_n_steps=2", "--trainer.val_check_interval=3"),
    *("--trainer.limit_val_batches=1", "--trainer.enable_model_summary=false", "--trainer.accelerator=cpu"),
    "--trainer.logger.init_args.save_dir=runs",
]


def write_corpus(folder):
    (folder / "corpus.txt").write_text("".join(f"def g{i}(x):\n    return x * {i}\n" for i in range(100)))


@pytest.mark.slow
def test_a_fit_redirected_to_a_file_logs_its_steps_and_validations(tmp_path):
    write_corpus(tmp_path)
    log = tmp_path / "log.txt"
    with open(log, "w") as out:
        done = subprocess.run(
            [sys.executable, "-m", "lightning_moe.cli", *TINY_FIT],
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            timeout=180,
            check=False,
        )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = log.read_text().splitlines()
    steps = [STEP_LINE.match(line) for line in lines if line.startswith("step ")]
    assert [(int(m[1]), int(m[2])) for m in steps] == [(2, 6), (4, 6), (6, 6)], lines
    assert all("train/loss " in m[3] for m in steps)
    # val/loss is shown once the first validation (after step 3) has run.
    assert ["val/loss " in m[3] for m in steps] == [False, True, True]
    validations = [line for line in lines if line.startswith("validation at ")]
    assert [line.split(" | ")[0] for line in validations] == ["validation at step 3/6", "validation at step 6/6"]
    assert all(re.search(r"\| val/loss \d+\.\d{4}\b", line) for line in validations)


def boring_trainer(tmp_path, callbacks=(), **kwargs):
    return L.Trainer(
        callbacks=list(callbacks),
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **kwargs,
    )


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_a_terminal_keeps_the_bar_and_a_file_gets_lines(tmp_path):
    default_bar = (RichProgressBar, StepRichProgressBar) if _rich() else (TQDMProgressBar, StepTQDMProgressBar)
    trainer = boring_trainer(tmp_path)
    assert type(trainer.progress_bar_callback) is default_bar[0]
    choose_progress_display(trainer, [], stream=FakeTerminal())
    assert type(trainer.progress_bar_callback) is default_bar[1]

    trainer = boring_trainer(tmp_path)
    choose_progress_display(trainer, [], stream=io.StringIO())
    assert type(trainer.progress_bar_callback) is StepLog
    assert sum(isinstance(c, (StepLog, TQDMProgressBar, RichProgressBar)) for c in trainer.callbacks) == 1

    # A bar the recipe sets itself is kept, whatever stdout is.
    chosen = TQDMProgressBar(refresh_rate=7)
    trainer = boring_trainer(tmp_path, [chosen])
    choose_progress_display(trainer, [chosen], stream=io.StringIO())
    assert trainer.progress_bar_callback is chosen and chosen.refresh_rate == 7

    trainer = boring_trainer(tmp_path, enable_progress_bar=False)
    choose_progress_display(trainer, [], stream=io.StringIO())
    assert trainer.progress_bar_callback is None


def _rich():
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return True


def printed_steps(out):
    return [int(line.split()[1].split("/")[0]) for line in out.splitlines() if line.startswith("step ")]


def test_lines_come_once_per_interval_of_optimizer_steps(tmp_path, capsys):
    # Two batches a step: a step's second batch must not print its line again.
    trainer = boring_trainer(
        tmp_path, [StepLog()], max_steps=5, accumulate_grad_batches=2, log_every_n_steps=2, limit_val_batches=0
    )
    trainer.fit(BoringModel())
    assert printed_steps(capsys.readouterr().out) == [2, 4, 5]  # every log_every_n_steps, and the last step


def test_a_long_run_prints_a_bounded_number_of_lines(tmp_path, capsys):
    steps = 3 * MAX_LINES  # log_every_n_steps=1 would print every step: widened to every 3rd
    trainer = boring_trainer(tmp_path, [StepLog()], max_steps=steps, log_every_n_steps=1, limit_val_batches=0)
    trainer.fit(BoringModel())
    assert printed_steps(capsys.readouterr().out) == list(range(3, steps + 1, 3))


@pytest.mark.parametrize("every", ["0", "-2"])
def test_a_bad_interval_is_one_line_naming_it(every, tmp_path, monkeypatch, capsys):
    write_corpus(tmp_path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main([*TINY_FIT, "--trainer.callbacks+=lightning_moe.progress.StepLog", f"--trainer.callbacks.every={every}"])
    err = capsys.readouterr().err.replace("Seed set to 0\n", "")
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: ") and "every=" in err, err
