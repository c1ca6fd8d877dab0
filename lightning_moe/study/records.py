"""What a finished run of a study logged, read back from its TensorBoard event files, and the
statistics over seeds that the report gives (means, paired differences, steps to a target loss).
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

VAL_LOSS = "val/loss"
STEP_SECONDS = "time/train_batch_seconds"
#: Per-layer tags reported for every layer; their value is the last one logged.
LAYER_TAGS = ("load_max_over_mean", "dead_experts", "domain_expert_mi")
#: Per-layer tags reported as the mean over layers of the last value logged.
TELEMETRY_TAGS = ("zero_router_grad_fraction", "gate_mass", "mean_gate_scale", "default_output_norm")
#: Per-layer tags reported as the mean over layers and over every value logged (one probe each).
PROBE_TAGS = ("router_grad_cosine", "router_grad_norm_ratio")
_T_95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


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
        if any("exact_match" in m for m in seeds.values()):
            entry["exact_match"] = _mean_std([m["exact_match"] for m in seeds.values() if "exact_match" in m])
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
