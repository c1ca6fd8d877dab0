"""``lightning-moe compare``: train one recipe with several estimator configurations over
paired seeds, then report what the run logs say.

Every run is an ordinary ``lightning-moe fit`` (:func:`lightning_moe.cli.main`) of the base
recipe with the configuration's overrides, one after the other in this process. Each
run writes its TensorBoard events to ``<output_dir>/runs/<configuration>/seed_<seed>/``
and, once finished, ``done.json`` there; a finished run whose command line has not
changed is not run again, so an interrupted study continues where it stopped. The report
reads every number from the event files (validation loss, routing telemetry, step time),
and writes ``results.json``, ``runs.csv``, ``summary.csv``, ``report.md`` and PNG plots to
``<output_dir>``.

Usage::

    lightning-moe compare --config recipes/study_estimators.yaml
    lightning-moe compare --config recipes/study_estimators.yaml --seeds '[0]' --steps 50
    lightning-moe compare --config recipes/study_estimators.yaml --report_only true
"""

from __future__ import annotations

import csv
import gc
import json
import math
import os
import shutil
import sys
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import yaml

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


def _run(args: list[str], run_dir: Path) -> dict[str, Any]:
    """Run one fit unless ``run_dir`` holds a finished run with the same arguments."""
    from lightning_moe.cli import main as cli_main

    done = run_dir / "done.json"
    if done.is_file():
        record = json.loads(done.read_text())
        if record.get("args") == args:
            return record
        print(f"[compare] {run_dir}: finished with other arguments; running it again", flush=True)
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            # LightningCLI warns when given args while sys.argv holds the compare command's own.
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            cli_main(args)
    # Any failure of one run is recorded and the study goes on; SystemExit is jsonargparse's bad-flag exit.
    except (Exception, SystemExit) as err:  # noqa: BLE001
        error = "".join(traceback.format_exception(err))
        (run_dir / "failed.txt").write_text(error)
        print(f"[compare] {run_dir} failed:\n{error}", file=sys.stderr, flush=True)
        return {"args": args, "status": "failed", "error": str(err)}
    finally:
        gc.collect()
    record = {"args": args, "status": "done", "wall_seconds": time.perf_counter() - start}
    done.write_text(json.dumps(record, indent=1))
    return record


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
        report_only: do not train; report on the runs already finished.

    Returns the contents of ``results.json``.
    """
    if not configurations:
        raise ValueError("compare: give at least one configuration")
    names = [c.name for c in configurations]
    if len(set(names)) != len(names) or any(not n or "/" in n or n.startswith(".") for n in names):
        raise ValueError(f"compare: configuration names must be unique folder names, got {names}")
    reference = reference or names[0]
    if reference not in names:
        raise ValueError(f"compare: reference={reference!r} is not one of the configurations {names}")
    pairs = [tuple(pair) for pair in pairs or []]
    unknown = sorted({n for pair in pairs for n in pair} - set(names))
    if unknown:
        raise ValueError(f"compare: pairs name configurations that do not exist: {unknown}")
    out = Path(output_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(base, dict):
        base_config = out / "base.yaml"
        base_config.write_text(yaml.safe_dump(base, sort_keys=False))
    else:
        base_config = Path(base).absolute()
        if not base_config.is_file():
            raise FileNotFoundError(f"compare: base recipe {base!r} not found")
    common = dict(overrides or {})
    if steps is not None:
        common["trainer.max_steps"] = steps
    if corpus is not None:
        common["data.source"] = corpus

    if num_threads is not None:
        import torch

        torch.set_num_threads(num_threads)
    runs = []
    # Seed-major order: an interrupted study has complete, paired seeds first.
    for seed in seeds:
        for configuration in configurations:
            run_dir = out / "runs" / configuration.name / f"seed_{seed}"
            args = run_arguments(str(base_config), run_dir, seed, configuration, common)
            done = run_dir / "done.json"
            if report_only:
                record = json.loads(done.read_text()) if done.is_file() else {"status": "not run"}
            else:
                print(f"[compare] {configuration.name} seed {seed} -> {run_dir}", flush=True)
                record = _run(args, run_dir)
            runs.append({"configuration": configuration.name, "seed": seed, "run_dir": str(run_dir), **record})
    for run in runs:
        run["metrics"] = run_metrics(read_scalars(run["run_dir"])) if run["status"] == "done" else None

    target, summary = summarise(runs, reference)
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

    CLI(compare, args=args)
