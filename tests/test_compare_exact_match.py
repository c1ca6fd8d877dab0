"""compare's exact-match statistics: seed-paired differences with a Student-t interval, the
per-prompt (McNemar) counts read from each run's exact_match.json, routing change, and the report.

Every expected number is computed here by hand from the runs' values, not by the code under test.
"""

import csv
import json
import math
from pathlib import Path

import pytest

from lightning_moe.study.records import pair_differences, paired_difference, summarise
from lightning_moe.study.report import write_report

REFERENCE = [0.50, 0.52, 0.48, 0.55, 0.50]
BETTER = [0.56, 0.57, 0.50, 0.62, 0.55]  # minus REFERENCE: 0.06, 0.05, 0.02, 0.07, 0.05
SAME = [0.52, 0.50, 0.48, 0.55, 0.49]  # minus REFERENCE: 0.02, -0.02, 0, 0, -0.01


def _run(name, seed, exact_match=None, final=2.0, run_dir=None, **metrics):
    run_metrics = {
        "final_val_loss": final,
        "final_step": 20,
        "val_loss": [(10, final + 0.5), (20, final)],
        "train_batch_seconds": 0.1,
        "layers": {},
        "telemetry": {},
        **metrics,
    }
    if exact_match is not None:
        run_metrics["exact_match"] = exact_match
    return {"configuration": name, "seed": seed, "status": "done", "run_dir": str(run_dir or f"/nowhere/{name}/{seed}"),
            "metrics": run_metrics}


def _hand_interval(deltas):
    """Mean, sample standard deviation and the 95 % t interval (t(4) = 2.776) of five deltas, by hand."""
    assert len(deltas) == 5
    mean = sum(deltas) / 5
    std = math.sqrt(sum((d - mean) ** 2 for d in deltas) / 4)
    half = 2.776 * std / math.sqrt(5)
    return mean, std, [mean - half, mean + half]


def test_exact_match_gets_a_seed_paired_difference_with_a_t_interval():
    runs = [_run("ref", s, REFERENCE[s], final=2.0 + 0.1 * s) for s in range(5)]
    runs += [_run("better", s, BETTER[s], final=1.9 + 0.1 * s) for s in range(5)]
    runs += [_run("same", s, SAME[s], final=2.0 + 0.1 * s) for s in range(5)]
    _, summary = summarise(runs, "ref")

    better = summary["better"]
    assert better["exact_match"]["mean"] == pytest.approx(0.56)
    assert better["exact_match"]["std"] == pytest.approx(math.sqrt(sum((a - 0.56) ** 2 for a in BETTER) / 4))
    delta = better["paired_delta_exact_match"]
    mean, std, ci95 = _hand_interval([0.06, 0.05, 0.02, 0.07, 0.05])
    assert mean == pytest.approx(0.05) and ci95[0] > 0  # the hand numbers: [0.0268, 0.0732]
    assert delta["mean"] == pytest.approx(mean) and delta["std"] == pytest.approx(std)
    assert delta["ci95"] == pytest.approx(ci95)
    assert delta["significant"] and delta["higher_on"] == 5 and delta["lower_on"] == 0
    assert delta["metric"] == "exact_match" and delta["seeds"] == [0, 1, 2, 3, 4]

    same = summary["same"]["paired_delta_exact_match"]
    mean, std, ci95 = _hand_interval([0.02, -0.02, 0.0, 0.0, -0.01])
    assert same["mean"] == pytest.approx(mean) and same["ci95"] == pytest.approx(ci95)
    assert ci95[0] < 0 < ci95[1] and not same["significant"]
    assert same["higher_on"] == 1 and same["lower_on"] == 2

    # The loss delta is what it was: the default metric stays final validation loss.
    assert better["paired_delta"]["mean"] == pytest.approx(-0.1) and better["paired_delta"]["lower_on"] == 5
    assert "paired_delta_exact_match" not in summary["ref"]


def test_paired_difference_takes_any_metric_and_only_seeds_that_have_it():
    runs = {s: {"final_val_loss": 1.0, "exact_match": BETTER[s]} for s in range(5)}
    baseline = {s: {"final_val_loss": 1.5, "exact_match": REFERENCE[s]} for s in range(5)}
    del baseline[4]["exact_match"]  # a seed the baseline was not scored on is left out of the pairing
    delta = paired_difference(runs, baseline, metric="exact_match")
    assert delta["seeds"] == [0, 1, 2, 3] and delta["deltas"] == pytest.approx([0.06, 0.05, 0.02, 0.07])
    half = 3.182 * math.sqrt(sum((d - 0.05) ** 2 for d in [0.06, 0.05, 0.02, 0.07]) / 3) / 2
    assert delta["ci95"] == pytest.approx([0.05 - half, 0.05 + half])
    assert paired_difference(runs, baseline)["mean"] == pytest.approx(-0.5)  # default: final validation loss
    assert paired_difference(runs, {s: {"final_val_loss": 1.0} for s in range(5)}, metric="exact_match") is None


def _answers(run_dir: Path, prompts, correct):
    run_dir.mkdir(parents=True)
    answers = [{"kind": "k", "prompt": p, "answer": "a", "reply": "a" if c else "b", "correct": c}
               for p, c in zip(prompts, correct)]
    (run_dir / "exact_match.json").write_text(json.dumps({"accuracy": sum(correct) / len(correct), "answers": answers}))
    return sum(correct) / len(correct)


PROMPTS = ["p0", "p1", "p2", "p3"]
T, F = True, False
#: seed: (reference's flags, configuration's flags). b counts prompts only the configuration answers
#: right, c prompts only the reference answers right: seed 0 b=2 c=1, seed 1 b=2 c=0.
FLAGS = {0: ([T, F, F, T], [T, T, T, F]), 1: ([F, F, T, T], [T, T, T, T])}


def _scored_runs(tmp_path):
    runs = []
    for seed, (reference, configuration) in FLAGS.items():
        for name, flags in (("ref", reference), ("cfg", configuration)):
            run_dir = tmp_path / name / f"seed_{seed}"
            runs.append(_run(name, seed, _answers(run_dir, PROMPTS, flags), run_dir=run_dir))
    return runs


def test_per_prompt_answers_give_discordant_counts_and_an_exact_mcnemar_p(tmp_path):
    runs = _scored_runs(tmp_path)
    # A seed scored on other prompts cannot be paired prompt by prompt, only by its accuracy.
    for name, flags in (("ref", [T, T, F, F]), ("cfg", [T, T, T, F])):
        run_dir = tmp_path / name / "seed_2"
        runs.append(_run(name, 2, _answers(run_dir, ["q0", "q1", "q2", "q3" if name == "ref" else "q9"], flags),
                         run_dir=run_dir))
    runs.append(_run("ref", 3, 0.5))  # scored, but its exact_match.json is gone: paired by accuracy only
    runs.append(_run("cfg", 3, 0.5))
    _, summary = summarise(runs, "ref")
    delta = summary["cfg"]["paired_delta_exact_match"]
    assert delta["deltas"] == pytest.approx([0.25, 0.5, 0.25, 0.0])
    # b = 4, c = 1 over 8 paired answers; two-sided exact binomial: 2 * (C(5,0) + C(5,1)) / 2**5 = 0.375.
    assert delta["discordant"] == {"seeds": [0, 1], "pairs": 8, "b": 4, "c": 1, "p_value": pytest.approx(0.375)}
    assert "discordant" not in summary["ref"]


def test_mcnemar_p_value_by_hand(tmp_path):
    runs = []
    for name, flags in (("ref", [F] * 10), ("cfg", [T] * 10)):
        run_dir = tmp_path / name
        runs.append(_run(name, 0, _answers(run_dir, [f"p{i}" for i in range(10)], flags), run_dir=run_dir))
    discordant = summarise(runs, "ref")[1]["cfg"]["paired_delta_exact_match"]["discordant"]
    assert (discordant["b"], discordant["c"]) == (10, 0)
    assert discordant["p_value"] == pytest.approx(2 / 2**10)


def test_pairs_get_the_exact_match_difference_too(tmp_path):
    runs = _scored_runs(tmp_path) + [_run("plain", s, None) for s in FLAGS]
    pairs = pair_differences(runs, [("ref", "cfg"), ("plain", "ref")])
    first = pairs[0]
    assert (first["configuration"], first["baseline"]) == ("ref", "cfg")
    assert first["delta"]["mean"] == pytest.approx(0.0)  # both final losses are 2.0
    assert first["delta_exact_match"]["deltas"] == pytest.approx([-0.25, -0.5])
    assert first["delta_exact_match"]["discordant"]["b"] == 1 and first["delta_exact_match"]["discordant"]["c"] == 4
    assert pairs[1]["delta"] is not None and pairs[1]["delta_exact_match"] is None  # "plain" was never scored


def test_routing_change_is_summarised_and_absent_without_it():
    changes = [0.10, 0.12, 0.08]
    per_layer = [[0.05, 0.15], [0.06, 0.18], [0.04, 0.12]]
    runs = [_run("ref", s, routing_change=changes[s], routing_change_per_layer=per_layer[s]) for s in range(3)]
    runs += [_run("other", s) for s in range(3)]
    _, summary = summarise(runs, "ref")
    assert summary["ref"]["routing_change"]["mean"] == pytest.approx(0.10)
    assert summary["ref"]["routing_change"]["std"] == pytest.approx(0.02)  # sqrt((0.0004 + 0.0004) / 2)
    assert [s["mean"] for s in summary["ref"]["routing_change_per_layer"]] == pytest.approx([0.05, 0.15])
    assert "routing_change" not in summary["other"] and "exact_match" not in summary["other"]


def _study(pairs):
    return {
        "name": "em", "command": "", "base": "base.yaml", "overrides": {}, "seeds": list(range(5)), "seed_keys": [],
        "reference": "ref", "pairs": pairs, "corpus": None, "num_domains": None,
        "configurations": [{"name": n, "overrides": {}, "description": None} for n in ("ref", "better", "same")],
        "generation": {"tasks": "synthetic:tasks", "seed": 0, "num_prompts": 4},
        "base_exact_match": {"accuracy": 0.25},
    }


def test_report_gives_the_exact_match_interval_and_routing_change(tmp_path):
    runs = [_run("ref", s, REFERENCE[s], routing_change=0.1 + 0.01 * s) for s in range(5)]
    runs += [_run("better", s, BETTER[s], final=1.9, routing_change=0.2) for s in range(5)]
    runs += [_run("same", s, SAME[s], routing_change=0.3) for s in range(5)]
    target, summary = summarise(runs, "ref")
    pairs = pair_differences(runs, [("same", "better")])
    results = {"study": _study([["same", "better"]]), "target_val_loss": target, "summary": summary, "pairs": pairs,
               "runs": runs}
    write_report(tmp_path, results, ["ref", "better", "same"])
    report = (tmp_path / "report.md").read_text()

    _, _, (low, high) = _hand_interval([0.06, 0.05, 0.02, 0.07, 0.05])
    better = "| `better` | 0.560 ± 0.043 | 0.560, 0.570, 0.500, 0.620, 0.550 | 0.050 ± 0.019 |"
    assert f"{better} [{low:+.3f}, {high:+.3f}] | 5/5 | yes |" in report
    assert "[+0.027, +0.073]" in report  # the same interval, rounded by hand
    _, _, (low, high) = _hand_interval([0.02, -0.02, 0.0, 0.0, -0.01])
    assert f"[{low:+.3f}, {high:+.3f}] | 1/5 | no |" in report
    # The pair: same − better, seed by seed -0.04, -0.07, -0.02, -0.07, -0.06.
    _, _, (low, high) = _hand_interval([-0.04, -0.07, -0.02, -0.07, -0.06])
    assert "| `same` − `better` |" in report and f"[{low:+.3f}, {high:+.3f}] | 0/5 | yes |" in report
    assert "## Routing change" in report
    assert "| `ref` | 0.120 ± 0.016 |" in report and "| `same` | 0.300 ± 0.000 |" in report

    with open(tmp_path / "summary.csv") as handle:
        rows = {row["configuration"]: row for row in csv.DictReader(handle)}
    assert float(rows["better"]["delta_exact_match_mean"]) == pytest.approx(0.05)
    assert rows["better"]["delta_exact_match_significant"] == "True"
    assert float(rows["ref"]["routing_change_mean"]) == pytest.approx(0.12)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["summary"]["same"]["routing_change"]["mean"] == pytest.approx(0.3)


def test_report_without_exact_match_or_routing_change_has_neither(tmp_path):
    runs = [_run(name, s, final=2.0 + 0.01 * s) for name in ("ref", "better", "same") for s in range(2)]
    target, summary = summarise(runs, "ref")
    study = {**_study([["better", "same"]]), "generation": None, "base_exact_match": None}
    write_report(tmp_path, {"study": study, "target_val_loss": target, "summary": summary,
                            "pairs": pair_differences(runs, [("better", "same")]), "runs": runs},
                 ["ref", "better", "same"])
    report = (tmp_path / "report.md").read_text()
    assert "Exact match" not in report and "Routing change" not in report and "Δ exact match" not in report
    assert "| `better` − `same` |" in report


def test_the_same_difference_on_every_seed_is_beyond_seed_noise():
    # Accuracies are coarse: 0.75 against 0.50 on each of three seeds is a zero-spread, zero-width
    # t interval at +0.25, which excludes 0; no difference on any seed stays within the noise.
    runs = {s: {"exact_match": 0.75} for s in range(3)}
    baseline = {s: {"exact_match": 0.5} for s in range(3)}
    delta = paired_difference(runs, baseline, metric="exact_match")
    assert delta["std"] == 0.0 and delta["ci95"] == [0.25, 0.25] and delta["significant"]
    same = paired_difference(baseline, baseline, metric="exact_match")
    assert same["ci95"] == [0.0, 0.0] and not same["significant"]
    assert paired_difference({0: {"exact_match": 1.0}}, {0: {"exact_match": 0.0}}, "exact_match")["ci95"] is None
