"""Crash recovery: a training process killed with SIGKILL at random points resumes to the same final state;
one stopped with SIGTERM (preemption) saves the step it reached and resumes from there exactly.

Each run is a child process executing ``lightning-moe fit`` (``lightning_moe.cli.main``)
on a tiny recipe that checkpoints every step with ``save_last``. The children are forked
from this process, so they start with the imports already done (a fresh interpreter
needs many seconds to import torch and Lightning on a loaded machine); each is still an
ordinary process that the test kills with SIGKILL or SIGTERM, and each resume is a new process that
finds only what is on disk.
"""

import logging
import multiprocessing
import os
import random
import signal
import sys
import time

import pytest
import torch
import yaml
from helpers import assert_same_checkpoint

from lightning_moe.cli import main

MAX_STEPS = 60
KILLS = 3
KILL_SEED = 1234


def write_recipe(tmp_path, run, every_n_train_steps=1):
    corpus = tmp_path / "corpus.py"
    if not corpus.exists():
        corpus.write_text("".join(f"def h{i}(a, b):\n    return a ** {i % 3} - b * {i}\n" for i in range(30)))
    recipe = {
        "seed_everything": 0,
        "model": {
            "d_model": 32,
            "n_heads": 2,
            "n_layers": 2,
            "max_seq_len": 16,
            "warmup_steps": 2,
            "moe": {
                "num_experts": 4,
                "top_k": 2,
                "estimator": "sparsemixer_v2",
                "estimator_args": {"jitter_eps": 0.1},
                "input_jitter": 0.01,
            },
        },
        "data": {
            "source": str(corpus),
            "seq_len": 16,
            "batch_size": 4,
            "val_fraction": 0.1,
            "cache_dir": str(tmp_path / "cache"),
        },
        "trainer": {
            "max_steps": MAX_STEPS,
            "val_check_interval": 5,
            "limit_val_batches": 1,
            "log_every_n_steps": 5,
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(tmp_path / run),
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {
                        "dirpath": str(tmp_path / run / "checkpoints"),
                        "every_n_train_steps": every_n_train_steps,
                        "save_top_k": 0,
                        "save_last": True,
                    },
                },
                {"class_path": "lightning_moe.callbacks.LoadBalancingLoss", "init_args": {"scope": "global"}},
                {"class_path": "lightning_moe.callbacks.RoutingMonitor"},
            ],
        },
    }
    path = tmp_path / f"{run}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path, tmp_path / run / "checkpoints" / "last.ckpt"


def _fit(argv, log_path):
    # Child process: its output and Lightning's log go to its own file (pytest's capture
    # objects, inherited through fork, would swallow them).
    with open(log_path, "a", buffering=1) as log:
        os.dup2(log.fileno(), 1), os.dup2(log.fileno(), 2)
        sys.stdout = sys.stderr = log
        logging.getLogger("lightning.pytorch").addHandler(logging.StreamHandler(log))
        main(argv)


def start(recipe, log_path, resume=False):
    # "last": resume from the newest last.ckpt of the recipe's ModelCheckpoint (an error if there is none).
    argv = ["fit", "--config", str(recipe), *(["--ckpt_path=last"] if resume else [])]
    process = multiprocessing.get_context("fork").Process(target=_fit, args=(argv, str(log_path)))
    process.start()
    return process


def mtime(path):
    return path.stat().st_mtime_ns if path.exists() else None


@pytest.fixture(scope="module")
def reference_last(tmp_path_factory):
    """last.ckpt of an uninterrupted run (a forked child like the others)."""
    if torch.cuda.is_initialized():
        pytest.skip("forking is impossible once CUDA is initialised in this process")
    tmp_path = tmp_path_factory.mktemp("reference")
    recipe, last = write_recipe(tmp_path, "reference")
    reference = start(recipe, tmp_path / "reference.log")
    reference.join(120)
    assert reference.exitcode == 0, (tmp_path / "reference.log").read_text()[-3000:]
    return last


@pytest.mark.skipif(sys.platform == "win32", reason="needs fork and SIGKILL")
def test_sigkill_at_random_points_then_resume_ends_like_an_uninterrupted_run(tmp_path, reference_last):
    if torch.cuda.is_initialized():
        pytest.skip("forking is impossible once CUDA is initialised in this process")

    recipe, last = write_recipe(tmp_path, "crashing")
    rng = random.Random(KILL_SEED)
    killed_at_steps = []
    for attempt in range(KILLS):
        # Kill after a random number of this process's checkpoints, at a random moment of
        # the step that follows (which may be in the middle of writing the next one).
        checkpoints, pause = rng.randint(1, 12), rng.uniform(0.0, 0.05)
        process = start(recipe, tmp_path / f"attempt{attempt}.log", resume=attempt > 0)
        seen, written = mtime(last), 0
        deadline = time.monotonic() + 60
        while written < checkpoints and process.is_alive() and time.monotonic() < deadline:
            time.sleep(0.001)
            if mtime(last) != seen:
                seen, written = mtime(last), written + 1
        time.sleep(pause)
        os.kill(process.pid, signal.SIGKILL)
        process.join()
        assert process.exitcode == -signal.SIGKILL, "the run ended before it could be killed; raise MAX_STEPS"
        # Whatever the kill interrupted, last.ckpt is a complete checkpoint.
        killed_at_steps.append(torch.load(last, weights_only=False)["global_step"])
    assert killed_at_steps == sorted(killed_at_steps) and killed_at_steps[-1] < MAX_STEPS

    final = start(recipe, tmp_path / "final.log", resume=True)
    final.join(120)
    assert final.exitcode == 0, (tmp_path / "final.log").read_text()[-3000:]
    # Every run after the first resumed (a run from scratch would also end like the reference).
    for log in [f"attempt{a}.log" for a in range(1, KILLS)] + ["final.log"]:
        assert f"Restored all states from the checkpoint at {last}" in (tmp_path / log).read_text(), log

    expected, got = torch.load(reference_last, weights_only=False), torch.load(last, weights_only=False)
    assert got["global_step"] == MAX_STEPS
    # Weights, optimizer, schedule, RNG streams and routing monitor end where the uninterrupted run's did.
    assert_same_checkpoint(got, expected)
    print(f"killed after steps {killed_at_steps} of {MAX_STEPS}")


@pytest.mark.skipif(sys.platform == "win32", reason="needs fork and SIGTERM")
def test_sigterm_saves_the_current_step_then_resume_ends_like_an_uninterrupted_run(tmp_path, reference_last):
    if torch.cuda.is_initialized():
        pytest.skip("forking is impossible once CUDA is initialised in this process")

    # Checkpoints every 6 steps (MAX_STEPS is a multiple); SIGTERM at a random moment after the first one.
    recipe, last = write_recipe(tmp_path, "preempted", every_n_train_steps=6)
    process = start(recipe, tmp_path / "preempted.log")
    deadline = time.monotonic() + 60
    while not last.exists() and process.is_alive() and time.monotonic() < deadline:
        time.sleep(0.001)
    time.sleep(random.Random(KILL_SEED).uniform(0.0, 0.3))
    os.kill(process.pid, signal.SIGTERM)
    process.join(60)
    log = (tmp_path / "preempted.log").read_text()
    assert process.exitcode == 0, log[-3000:]  # a clean exit, not death by the signal
    step = torch.load(last, weights_only=False)["global_step"]
    assert 6 <= step < MAX_STEPS, "the run ended before the signal; raise MAX_STEPS"
    # The checkpoint holds the step the run reached when the signal came, not the last periodic one.
    assert f"Received SIGTERM at step {step}: saved {last}" in log, log[-3000:]
    assert not list(last.parent.glob(".*.tmp"))

    final = start(recipe, tmp_path / "final.log", resume=True)
    final.join(120)
    assert final.exitcode == 0, (tmp_path / "final.log").read_text()[-3000:]
    assert f"Restored all states from the checkpoint at {last}" in (tmp_path / "final.log").read_text()
    expected, got = torch.load(reference_last, weights_only=False), torch.load(last, weights_only=False)
    assert got["global_step"] == MAX_STEPS
    # Weights, optimizer, schedule, RNG streams and routing monitor end where the uninterrupted run's did.
    assert_same_checkpoint(got, expected)
    print(f"SIGTERM at step {step} of {MAX_STEPS}")
