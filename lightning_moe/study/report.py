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


def _delta_cells(delta: dict[str, Any] | None, digits: int, better_on: str) -> list[str]:
    """Δ (mean ± std over seeds), its 95 % interval, on how many seeds it points the better way, beyond seed noise.

    ``better_on``: ``"lower_on"`` for a loss, ``"higher_on"`` for an accuracy.
    """
    if not delta:
        return ["–"] * 4
    interval = f"[{delta['ci95'][0]:+.{digits}f}, {delta['ci95'][1]:+.{digits}f}]" if delta["ci95"] else "–"
    return [_fmt(delta, digits), interval, f"{delta[better_on]}/{delta['n']}", "yes" if delta["significant"] else "no"]


def _discordant_cell(delta: dict[str, Any] | None) -> str:
    discordant = (delta or {}).get("discordant")
    if not discordant:
        return "–"
    return f"{discordant['b']} / {discordant['c']} of {discordant['pairs']} (p = {discordant['p_value']:.3g})"


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
        cells = _delta_cells(delta, 4, "lower_on")
        if name == reference:
            cells[0] = "(reference)"
        row = [
            f"`{name}`",
            _fmt(entry["final_val_loss"], 4),
            *cells,
            reached,
            f"{steps['speedup']:.2f}x" if steps.get("speedup") else "–",
            _fmt(entry["train_batch_seconds"], 3),
        ]
        lines.append("| " + " | ".join(row) + " |")

    if study.get("generation"):
        lines += _exact_match_lines(study, runs, summary, names)

    if pairs:
        lines += _pairs_lines(pairs)
    if any("routing_change" in summary[n] for n in names):
        lines += _routing_change_lines(summary, names)

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
    for key in ("exact_match", "routing_change"):
        if metrics.get(key) is not None:
            row[key] = metrics[key]
    row.update(metrics.get("telemetry", {}))
    for metric, layers in metrics.get("layers", {}).items():
        row.update({f"{metric}/layer_{i:02d}": value for i, value in enumerate(layers)})
    return row


def _summary_row(name: str, entry: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {"configuration": name, "seeds": len(entry["seeds"])}
    for key in ("final_val_loss", "train_batch_seconds", "exact_match", "routing_change"):
        if key in entry:
            row[f"{key}_mean"], row[f"{key}_std"] = entry[key]["mean"], entry[key]["std"]
    row.update({f"routing_change/layer_{i:02d}_mean": s["mean"] for i, s in
                enumerate(entry.get("routing_change_per_layer", []))})
    delta = entry.get("paired_delta")
    if delta:
        row.update(delta_mean=delta["mean"], delta_std=delta["std"], delta_significant=delta["significant"])
    delta = entry.get("paired_delta_exact_match")
    if delta:
        low, high = delta["ci95"] or (None, None)
        discordant = delta.get("discordant") or {}
        row.update(delta_exact_match_mean=delta["mean"], delta_exact_match_std=delta["std"],
                   delta_exact_match_ci95_low=low, delta_exact_match_ci95_high=high,
                   delta_exact_match_significant=delta["significant"], exact_match_only_here=discordant.get("b"),
                   exact_match_only_reference=discordant.get("c"), exact_match_mcnemar_p=discordant.get("p_value"))
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
        (
            f"Greedy answers of each run's exported last checkpoint to {settings['num_prompts']} held-out prompts of"
            f" `{settings['tasks']}` (seed {settings['seed']}; never trained on), generated with plain transformers;"
            " a reply counts when it equals the right answer."
        ),
        (
            f"Δ is paired by seed against `{study['reference']}` (a share of the prompts: 0.050 is 5 accuracy"
            " points), with the same Student-t interval as validation loss. *b / c*: prompts answered right only by"
            " the configuration / only by the reference, the same prompts paired within each seed and summed over"
            " seeds; its McNemar p treats every (seed, prompt) pair as independent, so it shows prompt-sampling"
            " noise only, beside the seed interval."
        ),
        "",
        (
            "| configuration | exact match | per seed | Δ vs reference | 95 % interval of Δ | higher on"
            " | beyond seed noise | b / c (McNemar p) | final val loss |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    if base is not None:
        lines.append(f"| base model (step 0) | {base['accuracy']:.3f} | – | – | – | – | – | – | – |")
    for name in names:
        entry = summary[name]
        delta = entry.get("paired_delta_exact_match")
        per_seed = ", ".join(
            f"{r['metrics']['exact_match']:.3f}" for r in runs
            if r["configuration"] == name and r["status"] == "done" and "exact_match" in r["metrics"]
        )
        cells = _delta_cells(delta, 3, "higher_on")
        if name == study["reference"]:
            cells[0] = "(reference)"
        row = [f"`{name}`", _fmt(entry.get("exact_match"), 3), per_seed or "–", *cells, _discordant_cell(delta),
               _fmt(entry["final_val_loss"], 4)]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _pairs_lines(pairs: list[dict[str, Any]]) -> list[str]:
    """The paired differences of the study's ``pairs``: validation loss, and exact match where scored."""
    scored = any(pair.get("delta_exact_match") for pair in pairs)
    header = "| configuration − baseline | Δ final val loss | 95 % interval of Δ | lower on | beyond seed noise |"
    if scored:
        header += " Δ exact match | 95 % interval of Δ | higher on | beyond seed noise | b / c (McNemar p) |"
    lines = ["", "## Paired differences between configurations", "", header, "|---" * header[1:].count("|") + "|"]
    for pair in pairs:
        row = [f"`{pair['configuration']}` − `{pair['baseline']}`", *_delta_cells(pair["delta"], 4, "lower_on")]
        if scored:
            delta = pair.get("delta_exact_match")
            row += [*_delta_cells(delta, 3, "higher_on"), _discordant_cell(delta)]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _routing_change_lines(summary: dict, names: list[str]) -> list[str]:
    """Per configuration, the share of (token, layer) whose chosen experts differ from the base model's."""
    present = [n for n in names if "routing_change" in summary[n]]
    num_layers = max((len(summary[n].get("routing_change_per_layer", [])) for n in present), default=0)
    header = ["configuration", "routing change", *(f"layer {i}" for i in range(num_layers))]
    lines = [
        "",
        "## Routing change from the base model",
        "",
        (
            "Share of (token, layer) whose top-k expert set differs from the base model's on the same tokens"
            " (mean ± std over seeds)."
        ),
        "",
        "| " + " | ".join(header) + " |",
        "|---" * len(header) + "|",
    ]
    for name in present:
        per_layer = [_fmt(s, 3) for s in summary[name].get("routing_change_per_layer", [])]
        per_layer += ["–"] * (num_layers - len(per_layer))
        row = [f"`{name}`", _fmt(summary[name]["routing_change"], 3), *per_layer]
        lines.append("| " + " | ".join(row) + " |")
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
