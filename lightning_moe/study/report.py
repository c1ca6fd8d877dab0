"""The study's report: ``report.md``, ``runs.csv``, ``summary.csv`` and the PNG plots."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from lightning_moe.study.records import PROBE_TAGS, TELEMETRY_TAGS, VAL_LOSS


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
        _seeds_line(study),
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

    if study.get("generation"):
        lines += _exact_match_lines(study, runs, summary, names)

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
    if "exact_match" in metrics:
        row["exact_match"] = metrics["exact_match"]
    row.update(metrics.get("telemetry", {}))
    for metric, layers in metrics.get("layers", {}).items():
        row.update({f"{metric}/layer_{i:02d}": value for i, value in enumerate(layers)})
    return row


def _summary_row(name: str, entry: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {"configuration": name, "seeds": len(entry["seeds"])}
    for key in ("final_val_loss", "train_batch_seconds", "exact_match"):
        if key in entry:
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


def write_report(output_dir: Path, results: dict[str, Any], names: list[str]) -> None:
    """The plots, ``results.json``, ``runs.csv``, ``summary.csv`` and ``report.md`` of a study's ``results``.

    ``names``: the configurations in the study's order.
    """
    runs, summary = results["runs"], results["summary"]
    plots = write_plots(output_dir, runs, summary, names)
    (output_dir / "results.json").write_text(json.dumps(results, indent=1))
    _write_csv(output_dir / "runs.csv", [_run_row(r) for r in runs])
    _write_csv(output_dir / "summary.csv", [_summary_row(n, summary[n]) for n in names if n in summary])
    markdown = _markdown(results["study"], runs, results["target_val_loss"], summary, results["pairs"], plots)
    (output_dir / "report.md").write_text(markdown)


def _exact_match_lines(
    study: dict[str, Any], runs: list[dict[str, Any]], summary: dict, names: list[str]
) -> list[str]:
    """The table of exact-match accuracy on held-out prompts: the base model (step 0), then each configuration."""
    settings, base = study["generation"], study.get("base_exact_match")
    lines = [
        "",
        "## Exact match on held-out prompts",
        "",
        f"Greedy answers of each run's exported last checkpoint to {settings['num_prompts']} held-out prompts of"
        f" `{settings['tasks']}` (seed {settings['seed']}; never trained on), generated with plain transformers;"
        " a reply counts when it equals the right answer.",
        "",
        "| configuration | exact match | per seed | final val loss |",
        "|---|---|---|---|",
    ]
    if base is not None:
        lines.append(f"| base model (step 0) | {base['accuracy']:.3f} | – | – |")
    for name in names:
        entry = summary[name]
        per_seed = ", ".join(
            f"{r['metrics']['exact_match']:.3f}" for r in runs
            if r["configuration"] == name and r["status"] == "done" and "exact_match" in r["metrics"]
        )
        lines.append(f"| `{name}` | {_fmt(entry.get('exact_match'), 3)} | {per_seed or '–'} |"
                     f" {_fmt(entry['final_val_loss'], 4)} |")
    return lines


def _seeds_line(study: dict[str, Any]) -> str:
    keys = study.get("seed_keys") or []
    seeded = "".join(f", `{key}`" for key in keys)
    data = (
        "" if any(key.startswith("data.") for key in keys)
        else "; the data split and order are the recipe's, the same in every run"
    )
    return (
        f"- seeds {study['seeds']} (`seed_everything`{seeded}: initialisation, routing noise"
        f"{' and what those keys seed' if keys else ''}; paired, every configuration runs every seed{data})"
    )
