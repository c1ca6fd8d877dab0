"""Running a study's runs: each an ordinary ``lightning-moe fit`` with a run folder of its own,
one after the other in this process or one per device in processes of their own
(:mod:`lightning_moe.study.worker`), recording how each ended in ``done.json`` or ``failed.txt``.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
import warnings
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml

from lightning_moe import trainer_cli
from lightning_moe.errors import ConfigError
from lightning_moe.study.records import STEP_SECONDS, VAL_LOSS, read_scalars
from lightning_moe.trainer_cli import user_error

#: :class:`StepTimer` as every run's arguments name it: by its module path from before the
#: study package, which :mod:`lightning_moe.compare` keeps, since a finished run is known by its
#: arguments (a new path would make every study run before the move train again).
STEP_TIMER = "lightning_moe.compare.StepTimer"


@dataclass
class Configuration:
    """One arm of the study: a name (a folder name) and the recipe keys it changes.

    ``overrides`` maps dotted recipe keys to values, e.g.
    ``{"model.moe.estimator": "sparsemixer_v2", "model.moe.estimator_args": {"jitter_eps": 0.1}}``.
    """

    name: str
    overrides: dict[str, Any] = field(default_factory=dict)
    description: str = ""


class StepTimer(L.Callback):
    """Logs ``time/train_batch_seconds``: the mean wall time of a training batch so far.

    A batch is timed from ``on_train_batch_start`` to ``on_train_batch_end`` (forward,
    backward, optimizer step, and the per-step callbacks that run in between), so
    validation is not counted. The first batch (allocation, warm-up) is left out. Put it
    after other callbacks whose ``on_train_batch_start`` should not be timed.
    """

    def __init__(self) -> None:
        self._start = 0.0
        self._total = 0.0
        self._batches = 0
        self._seen_first = False

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._total, self._batches, self._seen_first = 0.0, 0, False

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        elapsed = time.perf_counter() - self._start
        if not self._seen_first:
            self._seen_first = True
            return
        self._total += elapsed
        self._batches += 1
        pl_module.log(STEP_SECONDS, self._total / self._batches, on_step=True, on_epoch=False)


# ----------------------------------------------------------------------------- running


def _flag(key: str, value: Any) -> str:
    return f"--{key}={value if isinstance(value, str) else json.dumps(value)}"


def run_arguments(
    base_config: str, run_dir: Path, seed: int, configuration: Configuration, common: dict[str, Any]
) -> list[str]:
    """The ``lightning-moe`` arguments of one run (everything that defines it)."""
    logger = {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": str(run_dir), "name": "", "version": ""},
    }
    flags = {
        "trainer.enable_progress_bar": False,
        "trainer.enable_model_summary": False,
        **common,
        **configuration.overrides,
        "seed_everything": seed,
        "trainer.logger": logger,
    }
    return [
        "fit",
        "--config",
        base_config,
        *(_flag(k, v) for k, v in flags.items()),
        f"--trainer.callbacks+={STEP_TIMER}",
    ]


def _finished(args: list[str], run_dir: Path) -> dict[str, Any] | None:
    """The record of the run finished in ``run_dir`` if it ran with ``args``, else ``None``."""
    done = run_dir / "done.json"
    if done.is_file():
        record = json.loads(done.read_text())
        if record.get("args") == args:
            return record
        print(f"[compare] {run_dir}: finished with other arguments; running it again", flush=True)
    return None


def _empty(run_dir: Path) -> None:
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)


def _fit(
    args: list[str], run_dir: Path, launch: list[str] | None = None, placement: dict[str, Any] | None = None
) -> dict[str, Any]:
    """One fit in this process; writes ``done.json`` (its record) or ``failed.txt`` to ``run_dir``.

    ``launch``: flags that place the run without defining it (``--trainer.devices=1``); they
    are not in the record, so a run is resumed whichever way it was started. ``placement``:
    entries added to the record (the device it ran on).
    """
    placement = placement or {}
    start = time.perf_counter()
    try:
        with warnings.catch_warnings(), _noting_ctrl_c() as interrupted:
            # LightningCLI warns when given args while sys.argv holds the compare command's own.
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            trainer_cli.run([*args, *(launch or [])])
    except SystemExit as err:
        if interrupted:
            # Ctrl-C: Lightning shut the fit down and exited with 1. Stop the study (this run
            # left no done.json, so it runs again when the study is resumed).
            raise KeyboardInterrupt(f"compare: interrupted during {run_dir}") from err
        return _failed(args, run_dir, err, placement)
    # Any failure of one run is recorded and the study goes on.
    except Exception as err:  # noqa: BLE001
        return _failed(args, run_dir, err, placement)
    finally:
        gc.collect()
    record = {"args": args, "status": "done", "wall_seconds": time.perf_counter() - start, **placement}
    (run_dir / "done.json").write_text(json.dumps(record, indent=1))
    return record


@contextlib.contextmanager
def _noting_ctrl_c():
    """A list that gets an entry if Ctrl-C (SIGINT) arrives inside the block; Ctrl-C still interrupts.

    Lightning turns a KeyboardInterrupt during ``fit`` into a graceful shutdown and
    ``sys.exit(1)``, which alone cannot be told apart from other exits.
    """
    noted: list[bool] = []
    previous = signal.getsignal(signal.SIGINT)
    if not callable(previous) or threading.current_thread() is not threading.main_thread():
        yield noted  # Ctrl-C is ignored or kills the process anyway, or handlers cannot be set here
        return

    def note(signum, frame):
        noted.append(True)
        previous(signum, frame)

    signal.signal(signal.SIGINT, note)
    try:
        yield noted
    finally:
        signal.signal(signal.SIGINT, previous)


def _failed(args: list[str], run_dir: Path, err: BaseException, placement: dict[str, Any]) -> dict[str, Any]:
    error = "".join(traceback.format_exception(err))
    (run_dir / "failed.txt").write_text(error)
    # A bad configuration says it in one line (the traceback is in failed.txt); anything else in full.
    message = user_error(err)
    shown = f"error: {message}" if message else f"\n{error}"
    print(f"[compare] {run_dir} failed: {shown}", file=sys.stderr, flush=True)
    return {"args": args, "status": "failed", "error": message or str(err), **placement}


def _run_in_process(jobs: list[_Job]) -> list[dict[str, Any]]:
    """Every job's record; each unfinished job is fitted here in turn, with a line on its start and end."""
    records = []
    for number, job in enumerate(jobs, start=1):
        label = f"[compare] run {number}/{len(jobs)}: {job}"
        record = _finished(job.args, job.run_dir)
        if record is not None:
            print(f"{label}: finished earlier, skipped ({job.run_dir})", flush=True)
        else:
            print(f"{label}: training -> {job.run_dir}", flush=True)
            _empty(job.run_dir)
            record = _fit(job.args, job.run_dir)
            print(f"{label}: {_outcome(record, job.run_dir)}", flush=True)
        records.append(record)
    return records


def _outcome(record: dict[str, Any], run_dir: Path) -> str:
    if record["status"] != "done":
        return f"failed ({record.get('error', '')}); see {run_dir / 'failed.txt'}"
    val = read_scalars(run_dir).get(VAL_LOSS)
    final = f"final {VAL_LOSS} {val[-1][1]:.4f}" if val else f"no {VAL_LOSS} logged"
    return f"done in {record['wall_seconds']:.1f} s, {final}"


# ----------------------------------------------------------------------------- one run per device


@dataclass
class _Job:
    configuration: str
    seed: int
    run_dir: Path
    args: list[str]

    def __str__(self) -> str:
        return f"{self.configuration} seed {self.seed}"


@dataclass
class _Child:
    process: subprocess.Popen
    device: int
    cuda_visible_devices: str


def _device_ids(devices: int | list[int] | str | None, cuda_devices: int | None) -> list[int] | None:
    """The ids that runs are spread over, one run per id at a time (``None``: one after the other here).

    ``cuda_devices``: how many CUDA devices this process sees when the runs use CUDA, else ``None``.
    """
    valid = '"auto", None, a count >= 1, or a list of distinct device ids >= 0'
    if devices is None:
        return None
    if devices == "auto":
        return list(range(cuda_devices)) if cuda_devices and cuda_devices > 1 else None
    if isinstance(devices, int) and not isinstance(devices, bool) and devices >= 1:
        ids = list(range(devices))
    elif (
        isinstance(devices, (list, tuple))
        and devices
        and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in devices)
        and len(set(devices)) == len(devices)
    ):
        ids = list(devices)
    else:
        raise ConfigError(f"compare: devices={devices!r} is not valid; give {valid}")
    if cuda_devices is not None and max(ids) >= cuda_devices:
        raise ConfigError(
            f"compare: devices={devices!r} names CUDA devices that are not there: {cuda_devices} are visible,"
            f" so valid ids are 0..{cuda_devices - 1}"
        )
    return ids


def _runs_use_cuda(base_config: Path, common: dict[str, Any], configurations: list[Configuration]) -> bool:
    """Whether some run would train on a CUDA GPU: one is there and its ``trainer.accelerator`` allows it."""
    if not torch.cuda.is_available():
        return False
    recipe = _recipe_value(base_config, common, "trainer.accelerator")
    accelerators = [c.overrides.get("trainer.accelerator", recipe) for c in configurations]
    return any(accelerator in (None, "auto", "gpu", "cuda") for accelerator in accelerators)


def _cuda_visible_devices(device: int, uses_cuda: bool) -> str:
    """``CUDA_VISIBLE_DEVICES`` of the process that runs on ``device``.

    Ids count the GPUs this process sees, as ``torch.cuda`` does: under an outer
    ``CUDA_VISIBLE_DEVICES=2,3``, id 0 is GPU 2.
    """
    outer = [entry.strip() for entry in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if entry.strip()]
    return outer[device] if uses_cuda and outer else str(device)


def _start(job: _Job, device: int, uses_cuda: bool, num_threads: int | None) -> _Child:
    _empty(job.run_dir)
    visible = _cuda_visible_devices(device, uses_cuda)
    spec = {"args": job.args, "run_dir": str(job.run_dir), "device": device, "num_threads": num_threads}
    # Unbuffered, so that the log of a process that is killed ends where it stopped.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": visible, "PYTHONUNBUFFERED": "1"}
    with open(job.run_dir / "log.txt", "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "lightning_moe.study.worker", json.dumps(spec)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    print(f"[compare] {job} -> device {device} (pid {process.pid}): {job.run_dir}", flush=True)
    return _Child(process, device, visible)


def _log_tail(log: Path, lines: int = 30) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.is_file() else ""


def _collect(job: _Job, child: _Child) -> dict[str, Any]:
    """The record of a run whose process has exited; a process that left none failed."""
    done = job.run_dir / "done.json"
    if done.is_file():
        record = json.loads(done.read_text())
        print(f"[compare] {job} on device {child.device}: done in {record['wall_seconds']:.1f} s", flush=True)
        return record
    failed = job.run_dir / "failed.txt"
    code = child.process.returncode
    if failed.is_file():
        error = failed.read_text().strip().splitlines()[-1]
    else:
        # Killed or crashed before the run could record anything: the log says how far it got.
        error = f"its process exited with code {code} without a record"
        failed.write_text(f"{error}; the end of log.txt:\n{_log_tail(job.run_dir / 'log.txt')}\n")
    print(f"[compare] {job} on device {child.device}: failed (exit code {code}): {error}; see {failed}", flush=True)
    placement = {"device": child.device, "cuda_visible_devices": child.cuda_visible_devices}
    return {"args": job.args, "status": "failed", "error": error, **placement}


def _stop(children: list[_Child]) -> None:
    """Terminate the processes still running (an interrupted study leaves none behind)."""
    if not children:
        return
    print(f"[compare] stopping {len(children)} running run(s)", file=sys.stderr, flush=True)
    for child in children:
        if child.process.poll() is None:
            child.process.terminate()
    for child in children:
        try:
            child.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            child.process.kill()
            child.process.wait()


def _run_on_devices(
    jobs: list[_Job], device_ids: list[int], uses_cuda: bool, num_threads: int | None
) -> list[dict[str, Any]]:
    """Every job's record; unfinished jobs run in child processes, in order, one per device at a time.

    A child is :mod:`lightning_moe.study.worker`: :func:`_fit` with
    ``CUDA_VISIBLE_DEVICES`` set to its device and ``--trainer.devices=1``, its output in
    ``<run_dir>/log.txt``.
    """
    records: list[dict[str, Any] | None] = [_finished(job.args, job.run_dir) for job in jobs]
    for job, record in zip(jobs, records):
        if record is not None:
            print(f"[compare] {job}: finished earlier, skipped ({job.run_dir})", flush=True)
    pending = deque(i for i, record in enumerate(records) if record is None)
    free = list(device_ids)
    running: dict[int, _Child] = {}
    try:
        with _exit_on_sigterm():
            while pending or running:
                while pending and free:
                    i = pending.popleft()
                    running[i] = _start(jobs[i], free.pop(0), uses_cuda, num_threads)
                exited = [i for i, child in running.items() if child.process.poll() is not None]
                if not exited:
                    time.sleep(0.2)
                for i in exited:
                    child = running.pop(i)
                    records[i] = _collect(jobs[i], child)
                    free.append(child.device)
    finally:
        _stop(list(running.values()))
    return records


@contextlib.contextmanager
def _exit_on_sigterm():
    """Inside the block SIGTERM raises ``SystemExit``, so (as after Ctrl-C) the running children are stopped."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def exit_(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, exit_)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _recipe_value(base_config: Path, common: dict[str, Any], key: str) -> Any:
    if key in common:
        return common[key]
    value: Any = yaml.safe_load(base_config.read_text()) or {}
    for part in key.split("."):
        if isinstance(value, dict) and part not in value and isinstance(value.get("init_args"), dict):
            value = value["init_args"]  # a class named by class_path: `model.x` is its init_args' x
        value = value.get(part) if isinstance(value, dict) else None
    return value
