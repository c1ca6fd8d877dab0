"""What a finished run of a study logged, read back from its TensorBoard event files, and the
statistics over seeds that the report gives (means, paired differences, steps to a target loss),
with, for runs scored by exact match, their answers paired prompt by prompt.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from lightning_moe.study.exact_match import RESULT_FILE

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


def paired_difference(
    runs: dict[int, dict[str, Any]], baseline: dict[int, dict[str, Any]], metric: str = "final_val_loss"
) -> dict[str, Any] | None:
    """``metric`` of ``runs`` minus ``baseline`` (both ``{seed: metrics}``), seed by seed.

    Mean and standard deviation of the differences over the seeds both have ``metric`` for,
    the 95 % Student-t interval of their mean, on how many seeds ``runs`` is lower
    (``lower_on``: better for a loss) and higher (``higher_on``: better for an accuracy), and
    whether the interval excludes 0 (``significant``). The difference is in the metric's own
    units: for ``exact_match``, a share of the prompts (0.05 is 5 accuracy points). ``None``
    without a shared seed.
    """
    seeds = sorted(s for s in set(runs) & set(baseline)
                   if runs[s].get(metric) is not None and baseline[s].get(metric) is not None)
    if not seeds:
        return None
    deltas = [runs[s][metric] - baseline[s][metric] for s in seeds]
    stats = _mean_std(deltas)
    # Two seeds or more with the same difference (common for accuracies over few prompts) give a
    # zero-width interval: it excludes 0 unless that difference is 0. One seed gives no interval.
    std = stats["std"]
    half_width = None if std is None else _t_critical(len(deltas) - 1) * std / math.sqrt(len(deltas))
    return {
        **stats,
        "metric": metric,
        "seeds": seeds,
        "deltas": deltas,
        "ci95": None if half_width is None else [stats["mean"] - half_width, stats["mean"] + half_width],
        "lower_on": sum(d < 0 for d in deltas),
        "higher_on": sum(d > 0 for d in deltas),
        "significant": half_width is not None and abs(stats["mean"]) > half_width,
    }


def read_answers(run_dir: str | os.PathLike) -> list[tuple[str, bool]] | None:
    """``(prompt, correct)`` of every answer in ``<run_dir>/exact_match.json`` (``None``: not scored)."""
    path = Path(run_dir) / RESULT_FILE
    if not path.is_file():
        return None
    return [(answer["prompt"], bool(answer["correct"])) for answer in json.loads(path.read_text()).get("answers", [])]


def _mcnemar_p(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: ``b`` successes of ``b + c`` fair coin flips, or as extreme."""
    n = b + c
    return min(1.0, 2 * sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2**n)


def discordant_answers(answers: dict[int, list[tuple[str, bool]]],
                       baseline: dict[int, list[tuple[str, bool]]]) -> dict[str, Any] | None:
    """Prompt by prompt, where a configuration and its baseline disagree, summed over the seeds.

    Each seed's two models answered the same held-out prompts, so their answers pair up:
    ``b`` counts prompts only ``answers`` got right, ``c`` those only ``baseline`` got right,
    over ``pairs`` paired answers. ``p_value`` is McNemar's exact test on b and c; it counts
    every (seed, prompt) pair as independent, so it measures how much the choice of prompts
    could move the difference, not how much the seed could: the seed-paired interval of
    :func:`paired_difference` stays the primary one. A seed whose two runs were scored on
    different prompts (or not kept) is left out. ``None`` without a seed to pair.
    """
    b = c = pairs = 0
    seeds = []
    for seed in sorted(set(answers) & set(baseline)):
        mine, theirs = answers[seed], baseline[seed]
        if not mine or [p for p, _ in mine] != [p for p, _ in theirs]:
            continue
        seeds.append(seed)
        pairs += len(mine)
        b += sum(m and not t for (_, m), (_, t) in zip(mine, theirs))
        c += sum(t and not m for (_, m), (_, t) in zip(mine, theirs))
    if not seeds:
        return None
    return {"seeds": seeds, "pairs": pairs, "b": b, "c": c, "p_value": _mcnemar_p(b, c)}


def _exact_match_difference(
    runs: dict[int, dict[str, Any]], baseline: dict[int, dict[str, Any]],
    answers: dict[int, list[tuple[str, bool]]], baseline_answers: dict[int, list[tuple[str, bool]]],
) -> dict[str, Any] | None:
    """:func:`paired_difference` of exact match, with the prompt-level :func:`discordant_answers` as ``discordant``."""
    delta = paired_difference(runs, baseline, metric="exact_match")
    if delta is not None:
        delta["discordant"] = discordant_answers(answers, baseline_answers)
    return delta


def _answers_by_configuration(runs: list[dict[str, Any]]) -> dict[str, dict[int, list[tuple[str, bool]]]]:
    """Per configuration and seed, the answers of every finished run that was scored by exact match."""
    by_config: dict[str, dict[int, list[tuple[str, bool]]]] = {}
    for run in runs:
        if run["status"] == "done" and "exact_match" in (run["metrics"] or {}):
            answers = read_answers(run["run_dir"])
            if answers is not None:
                by_config.setdefault(run["configuration"], {})[run["seed"]] = answers
    return by_config


def pair_differences(runs: list[dict[str, Any]], pairs: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """For each ``(configuration, baseline)``: the paired difference of final validation loss
    (``delta``) and of exact match (``delta_exact_match``, ``None`` when not scored)."""
    by_config, answers = _finished_by_configuration(runs), _answers_by_configuration(runs)
    results = []
    for configuration, baseline in pairs:
        mine, theirs = by_config.get(configuration, {}), by_config.get(baseline, {})
        results.append({
            "configuration": configuration,
            "baseline": baseline,
            "delta": paired_difference(mine, theirs),
            "delta_exact_match": _exact_match_difference(
                mine, theirs, answers.get(configuration, {}), answers.get(baseline, {})),
        })
    return results


def _finished_by_configuration(runs: list[dict[str, Any]]) -> dict[str, dict[int, dict[str, Any]]]:
    by_config: dict[str, dict[int, dict[str, Any]]] = {}
    for run in runs:
        if run["status"] == "done" and run["metrics"]["final_val_loss"] is not None:
            by_config.setdefault(run["configuration"], {})[run["seed"]] = run["metrics"]
    return by_config


def summarise(runs: list[dict[str, Any]], reference: str) -> tuple[float | None, dict[str, dict[str, Any]]]:
    """Per configuration: means and standard deviations over seeds, and paired differences to ``reference``.

    With exact match scored: ``paired_delta_exact_match`` beside ``paired_delta`` (validation
    loss). With the runs' ``routing_change`` (share of (token, layer) whose chosen experts
    differ from the base model's): its mean and standard deviation, per layer too when given.
    """
    by_config, answers = _finished_by_configuration(runs), _answers_by_configuration(runs)
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
        for metric in ("exact_match", "routing_change"):
            values = [m[metric] for m in seeds.values() if m.get(metric) is not None]
            if values:
                entry[metric] = _mean_std(values)
        per_layer = [m["routing_change_per_layer"] for m in seeds.values() if m.get("routing_change_per_layer")]
        if per_layer:
            entry["routing_change_per_layer"] = [_mean_std(list(layer)) for layer in zip(*per_layer)]
        steps = _steps_to_reference(seeds, reference_runs)
        if name != reference and steps is not None:
            entry["steps_to_reference"] = steps
        if name != reference:
            delta = paired_difference(seeds, reference_runs)
            if delta is not None:
                entry["paired_delta"] = delta
            delta = _exact_match_difference(seeds, reference_runs, answers.get(name, {}), answers.get(reference, {}))
            if delta is not None:
                entry["paired_delta_exact_match"] = delta
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
