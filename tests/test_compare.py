"""``lightning-moe compare`` end to end on a tiny study, and its statistics."""

import contextlib
import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jsonargparse
import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch.cli import LightningCLI
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import lightning_moe.cli
import lightning_moe.study
import lightning_moe.trainer_cli
from lightning_moe.study import Configuration, compare
from lightning_moe.study.records import steps_to_reach, summarise
from lightning_moe.study.runner import run_arguments
from lightning_moe.data import TextDataModule
from lightning_moe.errors import ConfigError
from lightning_moe.layer import moe_layers
from lightning_moe.module import MoELanguageModel

ARTIFACTS = (
    "results.json",
    "runs.csv",
    "summary.csv",
    "report.md",
    "val_loss.png",
    "final_val_loss.png",
    "load_imbalance.png",
    "dead_experts.png",
    "mutual_information.png",
    "telemetry.png",
)


def _study(tmp_path) -> dict:
    return {
        "name": "tiny",
        "output_dir": str(tmp_path / "study"),
        "seeds": [0, 1],
        "steps": 4,
        "corpus": "testbed",
        "num_threads": 1,
        "pairs": [["topk", "smv2"]],
        "base": {
            "model": {
                "d_model": 16,
                "n_layers": 2,
                "n_heads": 2,
                "max_seq_len": 16,
                "warmup_steps": 1,
                "moe": {"num_experts": 4, "top_k": 2, "ffn_hidden": 16},
            },
            "data": {"seq_len": 16, "batch_size": 2, "max_bytes": 40_000, "cache_dir": str(tmp_path / "cache")},
            "trainer": {
                "val_check_interval": 2,
                "limit_val_batches": 2,
                "log_every_n_steps": 2,
                "enable_checkpointing": False,
                "callbacks": [
                    {"class_path": "lightning_moe.callbacks.LoadBalancingLoss", "init_args": {"alpha": 0.01}},
                    {"class_path": "lightning_moe.callbacks.RoutingMonitor", "init_args": {"heatmap": False}},
                    {"class_path": "lightning_moe.callbacks.RouterGradientFidelity", "init_args": {"every_n_steps": 2}},
                ],
            },
        },
        "configurations": [
            {"name": "topk"},
            {
                "name": "smv2",
                "overrides": {"model.moe.estimator": "sparsemixer_v2", "model.moe.estimator_args": {"jitter_eps": 0.1}},
            },
        ],
    }


def _logged(run_dir, tag):
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return [(e.step, e.value) for e in accumulator.Scalars(tag)]


@pytest.fixture(scope="module")
def in_process_study(tmp_path_factory) -> Path:
    """The tiny study, trained through the command line (its YAML file is returned)."""
    tmp_path = tmp_path_factory.mktemp("in_process")
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(_study(tmp_path)))
    lightning_moe.cli.main(["compare", "--config", str(config)])
    return config


@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
def test_compare_end_to_end(in_process_study, monkeypatch, capsys):
    config = in_process_study
    out = config.parent / "study"
    for artifact in ARTIFACTS:
        assert (out / artifact).is_file(), artifact
    results = json.loads((out / "results.json").read_text())
    runs = results["runs"]
    assert [(r["configuration"], r["seed"], r["status"]) for r in runs] == [
        ("topk", 0, "done"),
        ("smv2", 0, "done"),
        ("topk", 1, "done"),
        ("smv2", 1, "done"),
    ]
    assert not any("device" in r for r in runs)  # "auto" without GPUs: one after the other, in this process

    # Every reported number is what the event files hold.
    finals = {}
    for run in runs:
        logged = _logged(run["run_dir"], "val/loss")
        assert run["metrics"]["final_val_loss"] == pytest.approx(logged[-1][1], abs=0)
        assert [v for _, v in run["metrics"]["val_loss"]] == pytest.approx([v for _, v in logged], abs=0)
        assert run["metrics"]["final_step"] == 4
        mi = [_logged(run["run_dir"], f"moe/layer_{i:02d}/domain_expert_mi")[-1][1] for i in range(2)]
        assert run["metrics"]["layers"]["domain_expert_mi"] == pytest.approx(mi, abs=0)
        probes = [v for i in range(2) for _, v in _logged(run["run_dir"], f"moe/layer_{i:02d}/router_grad_cosine")]
        assert len(probes) == 4
        assert run["metrics"]["telemetry"]["router_grad_cosine"] == pytest.approx(np.mean(probes), rel=1e-6)
        finals.setdefault(run["configuration"], {})[run["seed"]] = logged[-1][1]

    summary = results["summary"]
    for name, by_seed in finals.items():
        values = list(by_seed.values())
        assert summary[name]["final_val_loss"]["mean"] == pytest.approx(np.mean(values), rel=1e-9)
        assert summary[name]["final_val_loss"]["std"] == pytest.approx(np.std(values, ddof=1), rel=1e-9)
    deltas = [finals["smv2"][s] - finals["topk"][s] for s in (0, 1)]
    assert summary["smv2"]["paired_delta"]["mean"] == pytest.approx(np.mean(deltas), rel=1e-9)
    assert results["pairs"][0]["delta"]["deltas"] == pytest.approx([-d for d in deltas], rel=1e-9)
    assert results["target_val_loss"] == pytest.approx(np.mean(list(finals["topk"].values())), rel=1e-9)

    report = (out / "report.md").read_text()
    mean, std = summary["smv2"]["final_val_loss"]["mean"], summary["smv2"]["final_val_loss"]["std"]
    assert f"{mean:.4f} ± {std:.4f}" in report
    assert "zero_router_grad_fraction" in report and "log 4 = 1.386" in report
    assert "| `topk` − `smv2` |" in report
    with open(out / "runs.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert float(rows[1]["final_val_loss"]) == pytest.approx(finals["smv2"][0], rel=1e-6)

    # A second call reruns nothing: finished runs are skipped.
    def no_training(args):
        raise AssertionError(f"reran a finished run: {args}")

    done = sorted(out.rglob("done.json"))
    stamps = [p.stat().st_mtime_ns for p in done]
    monkeypatch.setattr(lightning_moe.trainer_cli, "run", no_training)
    from lightning_moe.study import main

    main(["--config", str(config)])
    assert [p.stat().st_mtime_ns for p in done] == stamps
    printed = capsys.readouterr().out
    for number, (name, seed) in enumerate([("topk", 0), ("smv2", 0), ("topk", 1), ("smv2", 1)], start=1):
        assert f"[compare] run {number}/4: {name} seed {seed}: finished earlier, skipped" in printed


def test_steps_to_reach():
    curve = [(10, 3.0), (20, 2.5), (30, 2.1)]
    assert steps_to_reach(curve, 2.5) == 20
    assert steps_to_reach(curve, 2.0) is None


def _run(name, seed, final, steps=(10, 20)):
    curve = [(steps[0], final + 0.5), (steps[1], final)]
    return {
        "configuration": name,
        "seed": seed,
        "status": "done",
        "metrics": {
            "final_val_loss": final,
            "final_step": steps[1],
            "val_loss": curve,
            "train_batch_seconds": 0.1,
            "layers": {"dead_experts": [0.0, 1.0]},
            "telemetry": {"gate_mass": 1.0},
        },
    }


def test_summary_pairs_seeds_and_tests_the_difference():
    runs = [_run("ref", s, 2.0 + 0.1 * s) for s in range(3)]
    runs += [_run("better", s, 1.9 + 0.1 * s + 0.001 * s) for s in range(3)]
    runs += [_run("noisy", s, 2.0 + 0.1 * s + (0.05 if s % 2 else -0.05)) for s in range(3)]
    target, summary = summarise(runs, "ref")
    assert target == pytest.approx(2.1)
    better = summary["better"]["paired_delta"]
    assert better["mean"] == pytest.approx(-0.099)
    assert better["lower_on"] == 3 and better["significant"]
    half = 4.303 * better["std"] / math.sqrt(3)
    assert better["ci95"] == pytest.approx([-0.099 - half, -0.099 + half])
    assert not summary["noisy"]["paired_delta"]["significant"]
    assert "paired_delta" not in summary["ref"]
    assert summary["ref"]["layers"]["dead_experts"][1]["mean"] == 1.0
    # Seed by seed, "better" ends below the reference: it gets there at step 20 on every seed.
    assert summary["better"]["steps_to_reference"]["steps"] == [20, 20, 20]
    assert summary["better"]["steps_to_reference"]["speedup"] == pytest.approx(1.0)
    # "noisy" ends above the reference on seed 1 (2.15 > 2.1): it never gets there.
    assert summary["noisy"]["steps_to_reference"]["steps"] == [20, None, 20]
    assert "speedup" not in summary["noisy"]["steps_to_reference"]
    fast = summarise([_run("ref", 0, 2.0), _run("fast", 0, 1.4, steps=(5, 20))], "ref")[1]["fast"]
    assert fast["steps_to_reference"]["steps"] == [5]
    assert fast["steps_to_reference"]["speedup"] == pytest.approx(4.0)


STUDIES = sorted((Path(__file__).parents[1] / "recipes").glob("study_*.yaml"))


def test_there_are_studies():
    assert STUDIES


@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
@pytest.mark.parametrize("study", STUDIES, ids=lambda p: p.name)
def test_every_configuration_of_a_study_recipe_builds(study, tmp_path):
    """Every run of a study parses and instantiates through the real entry point."""
    spec = yaml.safe_load(study.read_text())
    parser = jsonargparse.ArgumentParser()
    parser.add_argument("--config", action=jsonargparse.ActionConfigFile)
    parser.add_function_arguments(compare)
    assert len(parser.parse_args(["--config", str(study)]).configurations) == len(spec["configurations"])
    if isinstance(spec["base"], str):  # a recipe file naming its classes: a Hugging Face model's
        from lightning_moe.hf.tiny import build_tiny_model

        base = Path(__file__).parents[1] / spec["base"]
        common = {"model.pretrained": build_tiny_model("olmoe", str(tmp_path / "tiny"), vocab_size=320)}
        common.update({key: 5 for key in spec.get("seed_keys", [])})
        for configuration in spec["configurations"]:
            args = run_arguments(str(base), tmp_path / "run", 5, Configuration(**configuration), common)
            cli = LightningCLI(None, None, run=False, args=args[1:])
            assert "data.seed" not in spec.get("seed_keys", []) or cli.datamodule.seed == 5
            assert cli.model.hparams.estimator == configuration["overrides"]["model.estimator"]
            assert type(moe_layers(cli.model)[0][1].estimator).__name__.lower().replace("_", "") == (
                configuration["overrides"]["model.estimator"].replace("_", "")
            )
        return
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(spec["base"]))
    common = {"trainer.max_steps": spec["steps"], "data.source": spec["corpus"]}
    for configuration in spec["configurations"]:
        args = run_arguments(str(base), tmp_path / "run", 0, Configuration(**configuration), common)
        cli = LightningCLI(MoELanguageModel, TextDataModule, run=False, args=args[1:])
        assert cli.trainer.max_steps == spec["steps"]
        estimator = configuration.get("overrides", {}).get("model.estimator", spec["base"]["model"]["estimator"])
        assert cli.model.hparams.estimator == cli.model.hparams.moe["estimator"] == estimator


# ----------------------------------------------------------------------------- one run per device


def _write_study(tmp_path, configurations) -> Path:
    study = {**_study(tmp_path), "seeds": [0], "pairs": [], "configurations": configurations}
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(study))
    return config


def _popen_recording(started, killed=()):
    """``subprocess.Popen`` that notes each run it starts; runs of ``killed`` get a process killed at once."""
    popen = subprocess.Popen

    def start(command, **kwargs):
        configuration = Path(json.loads(command[-1])["run_dir"]).parent.name
        started.append(configuration)
        if configuration in killed:
            command = [sys.executable, "-c", "import os; print('almost there'); os.kill(os.getpid(), 9)"]
        return popen(command, **kwargs)

    return start


@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
def test_runs_spread_over_devices_train_what_in_process_runs_train(in_process_study, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    topk, smv2 = _study(tmp_path)["configurations"]
    # "killed" dies without leaving a record; the study goes on, and its device goes to the next run.
    config = _write_study(tmp_path, [topk, {"name": "killed"}, smv2])
    started = []
    monkeypatch.setattr(subprocess, "Popen", _popen_recording(started, killed=("killed",)))
    lightning_moe.study.main(["--config", str(config), "--devices", "[0, 1]"])
    out = tmp_path / "study"
    for artifact in ARTIFACTS:
        assert (out / artifact).is_file(), artifact
    runs = {r["configuration"]: r for r in json.loads((out / "results.json").read_text())["runs"]}
    assert started == ["topk", "killed", "smv2"]
    assert [(r["status"], r["device"]) for r in runs.values()] == [("done", 0), ("failed", 1), ("done", 1)]
    for name in ("topk", "smv2"):
        record = json.loads((Path(runs[name]["run_dir"]) / "done.json").read_text())
        # What the run's own process saw: it would be None had the variable not been set for it.
        assert record["cuda_visible_devices"] == str(record["device"]) == str(runs[name]["device"])
        assert "max_steps=4" in (Path(runs[name]["run_dir"]) / "log.txt").read_text()
    failed = (Path(runs["killed"]["run_dir"]) / "failed.txt").read_text()
    assert "exited with code -9" in runs["killed"]["error"] and "almost there" in failed
    assert "`killed` seed 0: failed" in (out / "report.md").read_text()
    with open(out / "runs.csv") as handle:
        assert [row["device"] for row in csv.DictReader(handle)] == ["0", "1", "1"]
    printed = capsys.readouterr().out
    assert printed.count(" -> device ") == 3 and printed.count(" on device ") == 3

    # The same runs one after the other in this process trained the same model.
    for run in json.loads((in_process_study.parent / "study" / "results.json").read_text())["runs"]:
        if run["seed"] == 0:
            expected = runs[run["configuration"]]["metrics"]["final_val_loss"]
            assert run["metrics"]["final_val_loss"] == pytest.approx(expected, abs=1e-6)

    # Again: finished runs are skipped (no process started for them); the failed one runs again.
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("done.json")}
    started.clear()
    lightning_moe.study.main(["--config", str(config), "--devices", "[0, 1]"])
    assert started == ["killed"]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("done.json")} == stamps


def test_an_interrupted_study_stops_its_runs(tmp_path, monkeypatch):
    children, interrupted = [], []

    class InterruptedWhileRunning(subprocess.Popen):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            children.append(self)

        def poll(self):
            if len(children) == 2 and not interrupted:
                interrupted.append(True)
                raise KeyboardInterrupt  # what Ctrl-C raises in the compare process
            return super().poll()

    monkeypatch.setattr(subprocess, "Popen", InterruptedWhileRunning)
    config = _write_study(tmp_path, [{"name": "a"}, {"name": "b"}, {"name": "c"}])
    with pytest.raises(KeyboardInterrupt):
        lightning_moe.study.main(["--config", str(config), "--devices", "2"])
    assert [child.returncode for child in children] == [-signal.SIGTERM] * 2


def test_a_terminated_study_stops_its_runs(tmp_path):
    # The compare process gets SIGTERM (a scheduler's kill) while two runs train in children.
    config = _write_study(tmp_path, [{"name": "a"}, {"name": "b"}, {"name": "c"}])
    study = yaml.safe_load(config.read_text())
    study["steps"] = 10_000  # the runs are still training when the signal comes
    config.write_text(yaml.safe_dump(study))
    parent = subprocess.Popen(
        [sys.executable, "-m", "lightning_moe.cli", "compare", "--config", str(config), "--devices", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    pids = []
    for line in parent.stdout:
        if "(pid " in line:
            pids.append(int(line.split("(pid ")[1].split(")")[0]))
        if len(pids) == 2:
            break
    run_dirs = [tmp_path / "study" / "runs" / name / "seed_0" for name in ("a", "b")]
    deadline = time.monotonic() + 120
    while not all(any(d.glob("events.out.tfevents*")) for d in run_dirs) and time.monotonic() < deadline:
        time.sleep(0.2)  # until both children have started fitting (their loggers wrote event files)
    assert time.monotonic() < deadline
    parent.send_signal(signal.SIGTERM)
    try:
        assert parent.wait(timeout=60) == 128 + signal.SIGTERM
        for pid in pids:  # stopped and reaped: no process left behind
            assert not Path(f"/proc/{pid}").exists(), f"run process {pid} is still there"
        assert not (tmp_path / "study" / "runs" / "c").exists()
    finally:  # whatever failed, leave nothing running
        parent.kill()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
def test_ctrl_c_during_an_in_process_run_stops_the_study(tmp_path):
    # A real SIGINT during the first run's fit: Lightning shuts that fit down and exits with 1;
    # the study must stop there (not record a failure and go on with Ctrl-C ignored).
    interrupted = {"name": "a", "overrides": {"trainer.callbacks+": "helpers.InterruptAtStep"}}
    config = _write_study(tmp_path, [interrupted, {"name": "b"}])
    # Python's own Ctrl-C handler, also when pytest was started with SIGINT ignored (a background job).
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt, match="interrupted during"):
            lightning_moe.study.main(["--config", str(config), "--devices", "null"])
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C works again
    finally:
        signal.signal(signal.SIGINT, inherited)
    runs = tmp_path / "study" / "runs"
    assert not (runs / "a" / "seed_0" / "done.json").exists() and not (runs / "a" / "seed_0" / "failed.txt").exists()
    assert not (runs / "b").exists()


@pytest.mark.parametrize("devices", [0, -1, [], [0, -1], [1, 1], [True], "all", "0,1", 1.5])
def test_bad_devices_are_refused(devices, tmp_path):
    with pytest.raises(ValueError, match=r"devices=.* is not valid; give \"auto\", None, a count >= 1, or a list"):
        compare([Configuration("topk")], base=_study(tmp_path)["base"], output_dir=str(tmp_path), devices=devices)


def test_devices_are_the_visible_gpus_when_runs_use_cuda(tmp_path, monkeypatch):
    from lightning_moe.study.runner import _cuda_visible_devices, _device_ids, _runs_use_cuda

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    base = _study(tmp_path)["base"]  # no trainer.accelerator: Lightning's "auto" takes the GPUs
    for devices in ([0, 1, 2], [2], 3):
        with pytest.raises(ValueError, match=r"2 are visible, so valid ids are 0\.\.1"):
            compare([Configuration("topk")], base=base, output_dir=str(tmp_path), devices=devices)

    base_config = tmp_path / "base.yaml"
    assert _runs_use_cuda(base_config, {}, [Configuration("topk")])
    assert not _runs_use_cuda(base_config, {"trainer.accelerator": "cpu"}, [Configuration("topk")])
    assert _runs_use_cuda(
        base_config,
        {"trainer.accelerator": "cpu"},
        [Configuration("cpu"), Configuration("gpu", {"trainer.accelerator": "gpu"})],
    )
    assert _device_ids("auto", 2) == [0, 1]
    assert _device_ids("auto", 1) is None and _device_ids("auto", None) is None and _device_ids(None, 2) is None
    assert _device_ids(3, None) == [0, 1, 2] and _device_ids([5, 2], None) == [5, 2]  # CPU processes: any ids
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    assert [_cuda_visible_devices(i, uses_cuda=True) for i in (0, 1)] == ["4", "6"]
    assert _cuda_visible_devices(1, uses_cuda=False) == "1"


def test_compare_shows_progress_per_run(tmp_path, capsys):
    base = _study(tmp_path)["base"]
    compare([Configuration("topk")], base=base, seeds=[0], steps=2, output_dir=str(tmp_path / "out"))
    printed = capsys.readouterr().out
    assert "[compare] run 1/1: topk seed 0: training ->" in printed
    assert "[compare] run 1/1: topk seed 0: done in" in printed and "final val/loss" in printed


def test_too_few_steps_to_validate_are_refused_before_training(tmp_path):
    # steps below the recipe's val_check_interval: no run would log val/loss, the compared metric.
    base = _study(tmp_path)["base"]
    with pytest.raises(ConfigError, match=r"steps=1 .*val_check_interval=2.*steps >= 2"):
        compare([Configuration("topk")], base=base, seeds=[0], steps=1, output_dir=str(tmp_path / "out"))
    assert not (tmp_path / "out" / "runs").exists() and not (tmp_path / "out" / "summary.csv").exists()
    # A configuration that turns validation off is refused too, naming it.
    off = Configuration("no_val", {"trainer.limit_val_batches": 0})
    with pytest.raises(ConfigError, match=r"no_val.*limit_val_batches=0"):
        compare([Configuration("topk"), off], base=base, seeds=[0], steps=2, output_dir=str(tmp_path / "out"))
    assert not (tmp_path / "out" / "runs").exists()


def test_report_only_without_finished_runs_is_refused(tmp_path):
    base = _study(tmp_path)["base"]
    with pytest.raises(ConfigError, match=r"report_only.*no finished run"):
        compare([Configuration("topk")], base=base, output_dir=str(tmp_path / "out"), report_only=True)
    assert not (tmp_path / "out" / "summary.csv").exists()


def test_a_run_with_a_bad_configuration_is_recorded_in_one_line(tmp_path, capsys):
    bad = Configuration("bad", {"model.moe.top_k": 9})
    results = compare([bad], base=_study(tmp_path)["base"], seeds=[0], steps=2, output_dir=str(tmp_path / "out"))
    (run,) = results["runs"]
    assert run["status"] == "failed"
    assert "`moe.top_k` must be between 1 and `moe.num_experts` (4), got 9" in run["error"]
    err = capsys.readouterr().err
    assert "failed: error: `moe.top_k`" in err and "Traceback" not in err
    assert "Traceback" in (tmp_path / "out" / "runs" / "bad" / "seed_0" / "failed.txt").read_text()


def test_seed_keys_give_each_run_its_seed(tmp_path, monkeypatch):
    jobs_seen = []

    def record_jobs(jobs):
        jobs_seen.extend(jobs)
        return [{"status": "failed", "error": "not trained here"} for _ in jobs]

    monkeypatch.setattr(lightning_moe.study.command, "_run_in_process", record_jobs)
    study = _study(tmp_path)
    compare(
        [Configuration("topk")], base=study["base"], seeds=[3, 4], steps=2, output_dir=str(tmp_path / "out"),
        seed_keys=["data.seed"], devices=None,
    )
    assert [(job.seed, [a for a in job.args if a.startswith("--data.seed=")]) for job in jobs_seen] == [
        (3, ["--data.seed=3"]),
        (4, ["--data.seed=4"]),
    ]
    report = (tmp_path / "out" / "report.md").read_text()
    assert "`seed_everything`, `data.seed`" in report and "the same in every run" not in report
