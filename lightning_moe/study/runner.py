"""``lightning-moe compare``: train one recipe with several estimator configurations over
paired seeds, then report what the run logs say.

Every run is an ordinary ``lightning-moe fit`` (:func:`lightning_moe.cli.main`) of the base
recipe with the configuration's overrides, one after the other in this process on one
device. When the runs use CUDA and several devices are visible (or ``--devices`` lists
ids), they are spread over the devices instead, one run per device at a time, each in a
process of its own that sees only its device and logs to ``<run_dir>/log.txt``. Each run
writes its TensorBoard events to ``<output_dir>/runs/<configuration>/seed_<seed>/`` (its
``<run_dir>``) and, once finished, ``done.json`` there; a finished run whose command line
has not changed is not run again, however it was run, so an interrupted study continues
where it stopped. Ctrl-C (or SIGTERM, with runs in processes of their own) stops the
study and its running runs; those runs start afresh when the study is resumed. Each run
gets a line when it starts and when it ends (or that it finished earlier and is skipped). A
study whose runs would log no ``val/loss`` (too few steps for the validation interval,
validation off) is refused before anything trains. The report reads every number from the
event files (validation loss, routing telemetry, step time), and writes ``results.json``,
``runs.csv``, ``summary.csv``, ``report.md`` and PNG plots to ``<output_dir>``.

Usage::

    lightning-moe compare --config recipes/study_estimators.yaml
    lightning-moe compare --config recipes/study_estimators.yaml --seeds '[0]' --steps 50
    lightning-moe compare --config recipes/study_estimators.yaml --devices '[0, 1]'
    lightning-moe compare --config recipes/study_estimators.yaml --report_only true
"""

from __future__ import annotations

import contextlib
import csv
import gc
import json
import math
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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import yaml

from lightning_moe.errors import ConfigError
from lightning_moe.testbed import parse_testbed_source

VAL_LOSS = "val/loss"
STEP_SECONDS = "time/train_batch_seconds"
#: Per-layer tags reported for every layer; their value is the last one logged.
LAYER_TAGS = ("load_max_over_mean", "dead_experts", "domain_expert_mi")
#: Per-layer tags reported as the mean over layers of the last value logged.
TELEMETRY_TAGS = ("zero_router_grad_fraction", "gate_mass", "mean_gate_scale", "default_output_norm")
#: Per-layer tags reported as the mean over layers and over every value logged (one probe each).
PROBE_TAGS = ("router_grad_cosine", "router_grad_norm_ratio")
_T_95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


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
        f"--trainer.callbacks+={__name__}.StepTimer",
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
    from lightning_moe import cli

    placement = placement or {}
    start = time.perf_counter()
    try:
        with warnings.catch_warnings(), _noting_ctrl_c() as interrupted:
            # LightningCLI warns when given args while sys.argv holds the compare command's own.
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            cli.run([*args, *(launch or [])])
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
    from lightning_moe.cli import user_error

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


# ----------------------------------------------------------------------------- reading logs


def read_scalars(run_dir: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TensorBoard event files under ``run_dir``: ``{tag: [(step, value), ...]}``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {
        tag: [(int(event.step), float(event.value)) for event in accumulator.Scalars(tag)]
        for tag in accumulator.Tags()["scalars"]
    }


def _layer_series(scalars: dict[str, list[tuple[int, float]]], name: str) -> list[list[tuple[int, float]]]:
    tags = sorted(tag for tag in scalars if tag.startswith("moe/layer_") and tag.endswith(f"/{name}"))
    return [scalars[tag] for tag in tags]


def run_metrics(scalars: dict[str, list[tuple[int, float]]]) -> dict[str, Any]:
    """What the report uses from one run's scalars.

    Lightning logs a value with the 0-based index of the last batch trained; the
    validation curve here counts optimizer steps taken instead (that index + 1).
    """
    val = [(step + 1, value) for step, value in scalars.get(VAL_LOSS, [])]
    metrics: dict[str, Any] = {
        "val_loss": val,
        "final_val_loss": val[-1][1] if val else None,
        "final_step": val[-1][0] if val else None,
        "train_batch_seconds": scalars[STEP_SECONDS][-1][1] if scalars.get(STEP_SECONDS) else None,
        "layers": {},
        "telemetry": {},
    }
    for name in LAYER_TAGS:
        series = _layer_series(scalars, name)
        if series:
            metrics["layers"][name] = [s[-1][1] for s in series]
    for name in TELEMETRY_TAGS:
        series = _layer_series(scalars, name)
        if series:
            metrics["telemetry"][name] = float(np.mean([s[-1][1] for s in series]))
    for name in PROBE_TAGS:
        series = _layer_series(scalars, name)
        if series:
            metrics["telemetry"][name] = float(np.mean([value for s in series for _, value in s]))
    return metrics


def steps_to_reach(val_loss: list[tuple[int, float]], target: float) -> int | None:
    """The first validation step whose loss is at most ``target`` (``None``: never)."""
    return next((step for step, value in val_loss if value <= target), None)


def _t_critical(dof: int) -> float:
    """Two-sided 95 % quantile of Student's t (table to 10 dof, Cornish-Fisher beyond)."""
    if dof in _T_95:
        return _T_95[dof]
    z = 1.959964
    return z + (z**3 + z) / (4 * dof) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * dof**2)


def _mean_std(values: list[float]) -> dict[str, Any]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    std = float(np.std(values, ddof=1)) if len(values) > 1 else None
    return {"mean": float(np.mean(values)), "std": std, "n": len(values)}


def paired_difference(runs: dict[int, dict[str, Any]], baseline: dict[int, dict[str, Any]]) -> dict[str, Any] | None:
    """Final validation loss of ``runs`` minus ``baseline`` (both ``{seed: metrics}``), seed by seed.

    Mean and standard deviation of the differences over the shared seeds, the 95 %
    Student-t interval of their mean, on how many seeds ``runs`` is lower, and whether the
    interval excludes 0 (``significant``). ``None`` without a shared seed.
    """
    seeds = sorted(set(runs) & set(baseline))
    if not seeds:
        return None
    deltas = [runs[s]["final_val_loss"] - baseline[s]["final_val_loss"] for s in seeds]
    stats = _mean_std(deltas)
    half_width = _t_critical(len(deltas) - 1) * stats["std"] / math.sqrt(len(deltas)) if stats["std"] else None
    return {
        **stats,
        "seeds": seeds,
        "deltas": deltas,
        "ci95": None if half_width is None else [stats["mean"] - half_width, stats["mean"] + half_width],
        "lower_on": sum(d < 0 for d in deltas),
        "significant": half_width is not None and abs(stats["mean"]) > half_width,
    }


def _finished_by_configuration(runs: list[dict[str, Any]]) -> dict[str, dict[int, dict[str, Any]]]:
    by_config: dict[str, dict[int, dict[str, Any]]] = {}
    for run in runs:
        if run["status"] == "done" and run["metrics"]["final_val_loss"] is not None:
            by_config.setdefault(run["configuration"], {})[run["seed"]] = run["metrics"]
    return by_config


def summarise(runs: list[dict[str, Any]], reference: str) -> tuple[float | None, dict[str, dict[str, Any]]]:
    """Per configuration: means and standard deviations over seeds, and paired differences to ``reference``."""
    by_config = _finished_by_configuration(runs)
    reference_runs = by_config.get(reference, {})
    target = _mean_std([m["final_val_loss"] for m in reference_runs.values()])["mean"]
    summary: dict[str, dict[str, Any]] = {}
    for name, seeds in by_config.items():
        entry: dict[str, Any] = {
            "seeds": sorted(seeds),
            "final_val_loss": _mean_std([m["final_val_loss"] for m in seeds.values()]),
            "train_batch_seconds": _mean_std([m["train_batch_seconds"] for m in seeds.values()]),
            "layers": {},
            "telemetry": {},
        }
        for metric in LAYER_TAGS:
            per_seed = [m["layers"][metric] for m in seeds.values() if metric in m["layers"]]
            if per_seed:
                entry["layers"][metric] = [_mean_std(list(layer)) for layer in zip(*per_seed)]
        for metric in TELEMETRY_TAGS + PROBE_TAGS:
            values = [m["telemetry"][metric] for m in seeds.values() if metric in m["telemetry"]]
            if values:
                entry["telemetry"][metric] = _mean_std(values)
        steps = _steps_to_reference(seeds, reference_runs)
        if name != reference and steps is not None:
            entry["steps_to_reference"] = steps
        delta = paired_difference(seeds, reference_runs)
        if name != reference and delta is not None:
            entry["paired_delta"] = delta
        summary[name] = entry
    return target, summary


def _steps_to_reference(runs: dict[int, dict[str, Any]], reference: dict[int, dict[str, Any]]) -> dict[str, Any] | None:
    """Seed by seed, the first validation step at which a run is as good as the reference's final loss.

    ``speedup`` (when every seed gets there): the mean over seeds of the reference's
    final step divided by that step.
    """
    seeds = sorted(set(runs) & set(reference))
    if not seeds:
        return None
    steps = [steps_to_reach(runs[s]["val_loss"], reference[s]["final_val_loss"]) for s in seeds]
    entry = {
        "seeds": seeds,
        "steps": steps,
        "reached": sum(step is not None for step in steps),
        **_mean_std([float(step) for step in steps if step is not None]),
    }
    if entry["reached"] == len(seeds):
        entry["speedup"] = float(np.mean([reference[s]["final_step"] / step for s, step in zip(seeds, steps)]))
    return entry


# ----------------------------------------------------------------------------- writing


def _fmt(stats: dict[str, Any] | None, digits: int = 3) -> str:
    if not stats or stats.get("mean") is None:
        return "–"
    if stats.get("std") is None:
        return f"{stats['mean']:.{digits}f}"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def _figure(width: float, height: float, cols: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, cols, squeeze=False)[0]
    return figure, axes


def _bars(axis, names: list[str], stats: list[dict[str, Any] | None], label: str) -> None:
    means = [s["mean"] if s and s.get("mean") is not None else np.nan for s in stats]
    stds = [s["std"] if s and s.get("std") is not None else 0.0 for s in stats]
    axis.barh(range(len(names)), means, xerr=stds, color="tab:blue", alpha=0.7, capsize=3)
    axis.set_yticks(range(len(names)), labels=names)
    axis.set_ylim(len(names) - 0.5, -0.5)  # first configuration on top, also when some bars are missing
    axis.set_xlabel(label)
    axis.grid(axis="x", alpha=0.3)


def write_plots(
    output_dir: Path, runs: list[dict[str, Any]], summary: dict[str, dict[str, Any]], names: list[str]
) -> list[str]:
    """The PNG plots; returns their file names."""
    names = [n for n in names if n in summary]
    written = []
    colors = {name: f"C{i % 10}" for i, name in enumerate(names)}

    figure, (full, zoom) = _figure(13, 5, cols=2)
    late_values: list[float] = []
    for name in names:
        curves = [r["metrics"]["val_loss"] for r in runs if r["configuration"] == name and r["status"] == "done"]
        steps = sorted(set.intersection(*({s for s, _ in c} for c in curves))) if curves else []
        if not steps:
            continue
        values = np.array([[dict(c)[s] for s in steps] for c in curves])
        for axis in (full, zoom):
            axis.plot(steps, values.mean(axis=0), color=colors[name], label=f"{name} (n={len(curves)})")
            axis.fill_between(steps, values.min(axis=0), values.max(axis=0), color=colors[name], alpha=0.2)
        if len(steps) > 2:
            zoom.set_xlim(steps[len(steps) // 2], steps[-1])
            late_values += values[:, len(steps) // 2 :].ravel().tolist()
    for axis in (full, zoom):
        axis.set_xlabel("optimizer steps")
        axis.set_ylabel("validation loss (nats/token)")
        axis.grid(alpha=0.3)
    full.set_title("mean over seeds; band = min..max over seeds")
    zoom.set_title("second half")
    if late_values:
        margin = 0.05 * (max(late_values) - min(late_values)) + 1e-3
        zoom.set_ylim(min(late_values) - margin, max(late_values) + margin)
    if zoom.lines:
        zoom.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(output_dir / "val_loss.png")
    written.append("val_loss.png")

    height = 1.0 + 0.35 * len(names)
    figure, (loss, speed) = _figure(12, height, cols=2)
    _bars(loss, names, [summary[n]["final_val_loss"] for n in names], "final validation loss (mean ± std)")
    for row, name in enumerate(names):
        seeds = [r["metrics"]["final_val_loss"] for r in runs if r["configuration"] == name and r["status"] == "done"]
        loss.plot(seeds, [row] * len(seeds), "k.", markersize=4)
    _bars(speed, names, [summary[n]["train_batch_seconds"] for n in names], "seconds per training batch")
    finite = [s["final_val_loss"]["mean"] for s in summary.values() if s["final_val_loss"]["mean"] is not None]
    if finite:
        spread = max(finite) - min(finite)
        loss.set_xlim(min(finite) - spread - 0.02, max(finite) + spread + 0.02)
    figure.tight_layout()
    figure.savefig(output_dir / "final_val_loss.png")
    written.append("final_val_loss.png")

    for metric, file_name, label in (
        ("load_max_over_mean", "load_imbalance.png", "busiest expert's load / mean load (last log)"),
        ("dead_experts", "dead_experts.png", "dead experts (last log)"),
        ("domain_expert_mi", "mutual_information.png", "I(domain; expert) in nats (last log)"),
    ):
        present = [n for n in names if metric in summary[n]["layers"]]
        if not present:
            continue
        num_layers = max(len(summary[n]["layers"][metric]) for n in present)
        figure, (axis,) = _figure(max(6.0, 1.2 * num_layers * 1.5), 4.5)
        width = 0.8 / len(present)
        for i, name in enumerate(present):
            layers = summary[name]["layers"][metric]
            axis.bar(
                np.arange(len(layers)) + i * width,
                [s["mean"] for s in layers],
                width,
                yerr=[s["std"] or 0.0 for s in layers],
                color=colors[name],
                label=name,
                capsize=2,
            )
        axis.set_xticks(np.arange(num_layers) + 0.4 - width / 2, labels=[f"layer {i}" for i in range(num_layers)])
        axis.set_ylabel(label)
        axis.legend(fontsize=7)
        axis.grid(axis="y", alpha=0.3)
        figure.tight_layout()
        figure.savefig(output_dir / file_name)
        written.append(file_name)

    metrics = [m for m in TELEMETRY_TAGS + PROBE_TAGS if any(m in summary[n]["telemetry"] for n in names)]
    if metrics:
        figure, axes = _figure(3.6 * len(metrics), height, cols=len(metrics))
        for axis, metric in zip(axes, metrics):
            _bars(axis, names, [summary[n]["telemetry"].get(metric) for n in names], metric)
            if axis is not axes[0]:
                axis.set_yticklabels([])
        figure.tight_layout()
        figure.savefig(output_dir / "telemetry.png")
        written.append("telemetry.png")
    return written


def _markdown(
    study: dict[str, Any],
    runs: list[dict[str, Any]],
    target: float | None,
    summary: dict,
    pairs: list[dict[str, Any]],
    plots: list[str],
) -> str:
    names = [c["name"] for c in study["configurations"] if c["name"] in summary]
    reference = study["reference"]
    lines = [
        f"# Estimator comparison: {study['name']}",
        "",
        f"- command: `{study['command']}`",
        f"- base recipe: `{study['base']}`; shared overrides: `{json.dumps(study['overrides'])}`",
        (
            f"- seeds {study['seeds']} (`seed_everything`: initialisation and routing noise; paired, every"
            " configuration runs every seed; the data split and order are the recipe's, the same in every run)"
        ),
        f"- runs finished: {sum(r['status'] == 'done' for r in runs)} of {len(runs)}",
        f"- reference: `{reference}`; its mean final validation loss is "
        + (f"{target:.4f}" if target is not None else "not available"),
        "",
        "Every number below is read from the runs' TensorBoard event files. Final validation loss is the last",
        f"`{VAL_LOSS}` logged; Δ is paired (configuration minus reference on the same seed), its 95 % interval",
        "uses Student's t over seeds, and *beyond seed noise* means that interval excludes 0. Steps to the",
        "reference's final loss: the first validation step at which a run's loss is at most the reference's final",
        "loss on the same seed (resolution: the validation interval); speed-up: the reference's steps over those,",
        "averaged over seeds, when every seed gets there.",
        "",
        "## Validation loss",
        "",
        (
            "| configuration | final val loss | Δ vs reference | 95 % interval of Δ | lower on | beyond seed noise |"
            " steps to reference's final loss | speed-up | s / batch |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        entry = summary[name]
        delta = entry.get("paired_delta")
        steps = entry.get("steps_to_reference", {})
        reached = f"{_fmt(steps, 0)} ({steps['reached']}/{len(steps['seeds'])})" if steps else "–"
        row = [
            f"`{name}`",
            _fmt(entry["final_val_loss"], 4),
            _fmt(delta, 4) if delta else "(reference)" if name == reference else "–",
            f"[{delta['ci95'][0]:+.4f}, {delta['ci95'][1]:+.4f}]" if delta and delta["ci95"] else "–",
            f"{delta['lower_on']}/{delta['n']}" if delta else "–",
            ("yes" if delta["significant"] else "no") if delta else "–",
            reached,
            f"{steps['speedup']:.2f}x" if steps.get("speedup") else "–",
            _fmt(entry["train_batch_seconds"], 3),
        ]
        lines.append("| " + " | ".join(row) + " |")

    if pairs:
        lines += [
            "",
            "## Paired differences between configurations",
            "",
            "| configuration − baseline | Δ final val loss | 95 % interval of Δ | lower on | beyond seed noise |",
            "|---|---|---|---|---|",
        ]
        for pair in pairs:
            delta = pair["delta"]
            row = [f"`{pair['configuration']}` − `{pair['baseline']}`"]
            if delta is None:
                row += ["–"] * 4
            else:
                interval = f"[{delta['ci95'][0]:+.4f}, {delta['ci95'][1]:+.4f}]" if delta["ci95"] else "–"
                row += [
                    _fmt(delta, 4),
                    interval,
                    f"{delta['lower_on']}/{delta['n']}",
                    "yes" if delta["significant"] else "no",
                ]
            lines.append("| " + " | ".join(row) + " |")

    for metric, title in (
        ("load_max_over_mean", "Load imbalance (busiest expert / mean), per layer, last log"),
        ("dead_experts", "Dead experts per layer, last log"),
        ("domain_expert_mi", "Mutual information between domain and chosen expert (nats), per layer, last log"),
    ):
        present = [n for n in names if metric in summary[n]["layers"]]
        if not present:
            continue
        num_layers = max(len(summary[n]["layers"][metric]) for n in present)
        lines += ["", f"## {title}", ""]
        if metric == "domain_expert_mi" and study.get("num_domains"):
            domains = study["num_domains"]
            lines += [
                (
                    "A router that ignores the domain scores 0; one expert set per domain scores"
                    f" log {domains} = {math.log(domains):.3f}."
                ),
                "",
            ]
        lines.append("| configuration | " + " | ".join(f"layer {i}" for i in range(num_layers)) + " |")
        lines.append("|---" * (num_layers + 1) + "|")
        for name in present:
            digits = 1 if metric == "dead_experts" else 3
            lines.append(f"| `{name}` | " + " | ".join(_fmt(s, digits) for s in summary[name]["layers"][metric]) + " |")

    metrics = [m for m in TELEMETRY_TAGS + PROBE_TAGS if any(m in summary[n]["telemetry"] for n in names)]
    if metrics:
        lines += [
            "",
            "## Estimator telemetry (mean over layers)",
            "",
            "Last logged value, except the gradient-fidelity probe (`router_grad_*`), averaged over every probe.",
            "",
            "| configuration | " + " | ".join(metrics) + " |",
            "|---" * (len(metrics) + 1) + "|",
        ]
        for name in names:
            lines.append(f"| `{name}` | " + " | ".join(_fmt(summary[name]["telemetry"].get(m)) for m in metrics) + " |")

    failed = [r for r in runs if r["status"] != "done"]
    if failed:
        lines += ["", "## Runs that did not finish", ""]
        lines += [f"- `{r['configuration']}` seed {r['seed']}: {r['status']} {r.get('error', '')}" for r in failed]
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    descriptions = [c for c in study["configurations"] if c.get("description")]
    if descriptions:
        lines += ["", "## Configurations", ""]
        lines += [f"- `{c['name']}`: {c['description']} (`{json.dumps(c['overrides'])}`)" for c in descriptions]
    return "\n".join(lines) + "\n"


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def _run_row(run: dict[str, Any]) -> dict[str, Any]:
    metrics = run.get("metrics") or {}
    row = {
        "configuration": run["configuration"],
        "seed": run["seed"],
        "status": run["status"],
        "final_val_loss": metrics.get("final_val_loss"),
        "final_step": metrics.get("final_step"),
        "steps_to_reference": run.get("steps_to_reference"),
        "train_batch_seconds": metrics.get("train_batch_seconds"),
        "wall_seconds": run.get("wall_seconds"),
        "device": run.get("device"),
    }
    row.update(metrics.get("telemetry", {}))
    for metric, layers in metrics.get("layers", {}).items():
        row.update({f"{metric}/layer_{i:02d}": value for i, value in enumerate(layers)})
    return row


def _summary_row(name: str, entry: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {"configuration": name, "seeds": len(entry["seeds"])}
    for key in ("final_val_loss", "train_batch_seconds"):
        row[f"{key}_mean"], row[f"{key}_std"] = entry[key]["mean"], entry[key]["std"]
    delta = entry.get("paired_delta")
    if delta:
        row.update(delta_mean=delta["mean"], delta_std=delta["std"], delta_significant=delta["significant"])
    steps = entry.get("steps_to_reference")
    if steps:
        row.update(steps_to_reference_mean=steps["mean"], reached=steps["reached"], speedup=steps.get("speedup"))
    for metric, stats in entry["telemetry"].items():
        row[f"{metric}_mean"], row[f"{metric}_std"] = stats["mean"], stats["std"]
    for metric, layers in entry["layers"].items():
        row.update({f"{metric}/layer_{i:02d}_mean": s["mean"] for i, s in enumerate(layers)})
    return row


# ----------------------------------------------------------------------------- entry point


def compare(
    configurations: list[Configuration],
    base: str | dict = "recipes/quickstart.yaml",
    seeds: list[int] = [0, 1, 2],  # noqa: B006 - jsonargparse shows this default
    steps: int | None = None,
    corpus: str | None = None,
    overrides: dict[str, Any] | None = None,
    reference: str | None = None,
    pairs: list[tuple[str, str]] | None = None,
    output_dir: str = "runs/compare",
    name: str = "compare",
    num_threads: int | None = None,
    devices: int | list[int] | str | None = "auto",
    report_only: bool = False,
) -> dict[str, Any]:
    """Train ``base`` with every configuration and seed, then write the comparison report.

    Args:
        configurations: the arms of the study, each a name and the recipe keys it overrides.
        base: a ``lightning-moe fit`` recipe: a YAML path, or the recipe itself inline.
        seeds: ``seed_everything`` of the runs; every configuration runs every seed, so
            differences can be paired by seed.
        steps: ``trainer.max_steps`` of every run (default: the recipe's).
        corpus: ``data.source`` of every run (default: the recipe's).
        overrides: recipe keys set in every run (dotted keys, e.g. ``model.d_model``).
        reference: the configuration the others are compared with (default: the first).
        pairs: further ``(configuration, baseline)`` pairs whose paired difference the
            report gives, e.g. an estimator against the control that shares its forward pass.
        output_dir: where runs, plots and reports go.
        name: the study's name, the report's title.
        num_threads: ``torch.set_num_threads`` for the runs (default: torch's). On a CPU
            shared with other processes one thread is often several times faster than two.
            Applies to the runs' own processes too (``devices``).
        devices: where the runs train. ``"auto"`` (default): one run per visible CUDA
            device at a time when the runs use CUDA and more than one device is visible,
            else one run after the other in this process. ``None``: always one after the
            other in this process. A list of device ids (or a count ``N``, ids ``0..N-1``):
            up to that many runs at once, each in a process of its own that sees only its
            device (``CUDA_VISIBLE_DEVICES=<id>``, ``--trainer.devices=1``) and writes its
            output to ``<run_dir>/log.txt``; the next run starts on the device the last one
            freed. Ids count the GPUs this process sees, as ``torch.cuda`` does. When the runs
            do not use CUDA (a CPU recipe, or no GPU), a list means that many CPU processes at
            once; give them ``num_threads`` so they do not oversubscribe the cores. Each run's
            record says which device it ran on (``device``, ``cuda_visible_devices``).
        report_only: do not train; report on the runs already finished.

    Returns the contents of ``results.json``.
    """
    if not configurations:
        raise ConfigError("compare: configurations is empty; give at least one configuration")
    names = [c.name for c in configurations]
    if len(set(names)) != len(names) or any(not n or "/" in n or n.startswith(".") for n in names):
        raise ConfigError(f"compare: configuration names must be unique folder names, got {names}")
    reference = reference or names[0]
    if reference not in names:
        raise ConfigError(f"compare: reference={reference!r} is not one of the configurations {names}")
    pairs = [tuple(pair) for pair in pairs or []]
    unknown = sorted({n for pair in pairs for n in pair} - set(names))
    if unknown:
        raise ConfigError(f"compare: pairs name configurations that do not exist: {unknown}; choose from {names}")
    out = Path(output_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(base, dict):
        base_config = out / "base.yaml"
        base_config.write_text(yaml.safe_dump(base, sort_keys=False))
    else:
        base_config = Path(base).absolute()
        if not base_config.is_file():
            raise ConfigError(f"compare: base={base!r}: no such recipe file")
    common = dict(overrides or {})
    if steps is not None:
        common["trainer.max_steps"] = steps
    if corpus is not None:
        common["data.source"] = corpus

    if not report_only:
        _check_runs_validate(base_config, common, configurations)
    uses_cuda = _runs_use_cuda(base_config, common, configurations)
    device_ids = _device_ids(devices, torch.cuda.device_count() if uses_cuda else None)

    if num_threads is not None:
        torch.set_num_threads(num_threads)
    # Seed-major order: an interrupted study has complete, paired seeds first.
    jobs = []
    for seed in seeds:
        for configuration in configurations:
            run_dir = out / "runs" / configuration.name / f"seed_{seed}"
            args = run_arguments(str(base_config), run_dir, seed, configuration, common)
            jobs.append(_Job(configuration.name, seed, run_dir, args))
    if report_only:
        done = [job.run_dir / "done.json" for job in jobs]
        records = [json.loads(d.read_text()) if d.is_file() else {"status": "not run"} for d in done]
        if not any(record["status"] == "done" for record in records):
            raise ConfigError(
                f"compare: report_only=true, but {out / 'runs'} holds no finished run of this study (none of its"
                f" {len(jobs)} runs has a done.json); train it first, without --report_only"
            )
    elif device_ids is None:
        records = _run_in_process(jobs)
    else:
        records = _run_on_devices(jobs, device_ids, uses_cuda, num_threads)
    runs = [
        {"configuration": job.configuration, "seed": job.seed, "run_dir": str(job.run_dir), **record}
        for job, record in zip(jobs, records)
    ]
    for run in runs:
        run["metrics"] = run_metrics(read_scalars(run["run_dir"])) if run["status"] == "done" else None

    target, summary = summarise(runs, reference)
    if not summary:
        print(f"[compare] no finished run logged {VAL_LOSS}: the report compares nothing", file=sys.stderr, flush=True)
    by_config = _finished_by_configuration(runs)
    pair_results = []
    for configuration, baseline in pairs:
        delta = paired_difference(by_config.get(configuration, {}), by_config.get(baseline, {}))
        pair_results.append({"configuration": configuration, "baseline": baseline, "delta": delta})
    reference_runs = by_config.get(reference, {})
    for run in runs:
        if run["metrics"] and run["seed"] in reference_runs and run["configuration"] != reference:
            target_loss = reference_runs[run["seed"]]["final_val_loss"]
            run["steps_to_reference"] = steps_to_reach(run["metrics"]["val_loss"], target_loss)
    source = corpus or _recipe_value(base_config, common, "data.source")
    study = {
        "name": name,
        "command": _training_command(sys.argv),
        "base": str(base if isinstance(base, str) else base_config),
        "overrides": common,
        "seeds": list(seeds),
        "reference": reference,
        "pairs": [list(pair) for pair in pairs],
        "corpus": source,
        "num_domains": parse_testbed_source(source) if isinstance(source, str) else None,
        "configurations": [asdict(c) for c in configurations],
    }
    plots = write_plots(out, runs, summary, names)
    results = {"study": study, "target_val_loss": target, "summary": summary, "pairs": pair_results, "runs": runs}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    _write_csv(out / "runs.csv", [_run_row(r) for r in runs])
    _write_csv(out / "summary.csv", [_summary_row(n, summary[n]) for n in names if n in summary])
    (out / "report.md").write_text(_markdown(study, runs, target, summary, pair_results, plots))
    print(f"[compare] report: {out / 'report.md'}", flush=True)
    return results


def _training_command(argv: list[str]) -> str:
    """The ``lightning-moe compare`` command line that trains this study (``--report_only`` left out)."""
    if argv[1:2] != ["compare"]:
        return ""
    kept, skip = [], False
    for arg in argv[2:]:
        if skip or arg.startswith("--report_only"):
            skip = arg == "--report_only"
            continue
        kept.append(arg)
    return " ".join(["lightning-moe compare", *kept])


def _check_runs_validate(base_config: Path, common: dict[str, Any], configurations: list[Configuration]) -> None:
    """Refuse, before anything trains, a study whose runs would log no ``val/loss`` (the compared metric).

    Caught here: validation turned off (``trainer.limit_val_batches: 0``), and a step budget
    shorter than an integer ``trainer.val_check_interval`` (validation comes every that many
    batches, and a run stopped by ``max_steps`` does not validate at its end).
    """
    problems = {}
    for configuration in configurations:
        def value(key: str) -> Any:
            return configuration.overrides.get(key, _recipe_value(base_config, common, key))

        steps, interval = value("trainer.max_steps"), value("trainer.val_check_interval")
        limit = value("trainer.limit_val_batches")
        if isinstance(limit, (int, float)) and not isinstance(limit, bool) and limit == 0:
            problems[configuration.name] = f"trainer.limit_val_batches={limit}"
        elif all(isinstance(v, int) and not isinstance(v, bool) for v in (steps, interval)) and 0 < steps < interval:
            problems[configuration.name] = (
                f"steps={steps} is below trainer.val_check_interval={interval} (give steps >= {interval})"
            )
    if not problems:
        return
    metric = f"so no run would log {VAL_LOSS}, the metric the report compares"
    if len(problems) == len(configurations) and len(set(problems.values())) == 1:
        raise ConfigError(f"compare: {next(iter(problems.values()))}, {metric}")
    listed = "; ".join(f"configuration {name!r}: {problem}" for name, problem in problems.items())
    raise ConfigError(f"compare: {listed}; {metric.replace('no run', 'those runs')}")


def _recipe_value(base_config: Path, common: dict[str, Any], key: str) -> Any:
    if key in common:
        return common[key]
    value: Any = yaml.safe_load(base_config.read_text()) or {}
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def main(args: list[str] | None = None) -> None:
    """``lightning-moe compare ...`` (``--config study.yaml`` reads the arguments from a file)."""
    from jsonargparse import CLI

    CLI(compare, args=args, exit_on_error=False)  # a bad flag raises, for lightning-moe to print in one line
