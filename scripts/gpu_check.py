"""The GPU check: everything of lightning-moe's GPU path, in one command, with a JSON summary.

For one CUDA machine without internet that has torch, lightning, torchmetrics, tensorboard
and triton (the rest comes in a carried folder made by ``scripts/prepare_gpu_carry.sh``),
within a time budget (default 11 minutes on one H100/H200):

1. ``environment``: Python, torch, CUDA, the GPU, the installed versions;
2. ``install_deps``: the project's other dependencies (jsonargparse, datasets, matplotlib,
   ...) and pytest, from ``<carry>/deps`` (pip keeps what is installed and satisfies them);
3. ``install_package``: this checkout, editable, with ``--no-deps``;
4. ``install_megablocks``: the three wheels from ``<carry>/megablocks``, after checking that
   they were built for the installed torch (``BUILD_INFO.json``);
5. ``import_kernels``: their CUDA extensions load, and the backend finds its kernels;
6. ``pytest_gpu``: ``pytest -m gpu`` over the test files that have gpu-marked tests (every
   backend against the loop reference in bf16, forward and gradients, every estimator);
7. ``fit_torch`` / ``fit_megablocks``: a short quickstart ``lightning-moe fit`` on CUDA in
   bf16-mixed with each backend; the summary has their losses from the TensorBoard logs;
8. ``benchmark``: ``benchmarks/gpu_backends.py --json`` and its comparisons;
9. ``summary.json`` in ``--out``: every step's status, time, command, log and results.

Without CUDA the fit is tiny and on the CPU, the benchmark runs its ``--dry-run``, and the
steps that need CUDA are skipped with the reason; ``--dry-run`` also makes pip only resolve
(``pip install --dry-run``), so a CPU run changes nothing. A step that fails does not stop
the later ones.

    scripts/gpu_check.sh --carry gpu-carry --out gpu-check-out
    scripts/gpu_check.sh --dry-run --skip-install --out /tmp/gpu-check
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from importlib import metadata
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest brings tomli there
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
# Already on the GPU machine; never installed or replaced by this check.
PRESENT = ("torch", "lightning", "torchmetrics", "tensorboard", "triton")
KERNEL_MODULES = ("stk", "grouped_gemm_backend", "grouped_gemm.ops", "megablocks_ops", "megablocks.ops")
STEP_TIMEOUTS_S = {
    "environment": 60,
    "install_deps": 120,
    "install_package": 90,
    "install_megablocks": 60,
    "import_kernels": 60,
    "pytest_gpu": 240,
    "fit_torch": 150,
    "fit_megablocks": 150,
    "benchmark": 240,
}
SUMMARY_RESERVE_S = 10


def requirement_name(requirement: str) -> str:
    """The normalised project name of a requirement string or of a wheel's file name."""
    return re.split(r"[\[<>=!~; (]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-").replace(".", "-")


def wheel_project(wheel: Path) -> str:
    return requirement_name(wheel.name.split("-")[0])


def installed_closure(names: tuple[str, ...]) -> set[str] | None:
    """The installed distributions that ``names`` need, transitively, extras included.

    None when one of ``names`` is not installed here.
    """
    seen, todo = set(), [(name, frozenset()) for name in names]
    while todo:
        name, extras = todo.pop()
        if (name, extras) in seen:
            continue
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            if name in names:
                return None
            continue  # a conditional requirement that does not apply here
        seen.add((name, extras))
        for requirement in requires:
            marker = re.search(r"extra\s*==\s*[\"']([^\"']+)", requirement)
            if marker is None or marker.group(1) in extras:
                wanted = re.search(r"\[([^\]]+)\]", requirement.split(";")[0])
                wanted_extras = frozenset(e.strip() for e in wanted.group(1).split(",")) if wanted else frozenset()
                todo.append((requirement_name(requirement), wanted_extras))
    return {name for name, _ in seen}


def installed(requirement: str) -> bool:
    try:
        metadata.version(requirement_name(requirement))
    except metadata.PackageNotFoundError:
        return False
    return True


def carried_requirements() -> list[str]:
    """The project's dependencies that the GPU machine is not assumed to have, and pytest."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    tests = [r for r in project["optional-dependencies"]["test"] if requirement_name(r) == "pytest"]
    return [r for r in project["dependencies"] + tests if requirement_name(r) not in PRESENT]


class Check:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out).resolve()
        self.logs = self.out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.deadline = time.monotonic() + args.budget_s
        self.steps: list[dict] = []
        self.python = sys.executable

    def remaining_s(self) -> float:
        return self.deadline - time.monotonic() - SUMMARY_RESERVE_S

    def skip(self, name: str, reason: str) -> dict:
        step = {"name": name, "status": "skipped", "reason": reason}
        self.steps.append(step)
        print(f"[{name}] skipped: {reason}", flush=True)
        return step

    def run(self, name: str, command: list[str]) -> dict:
        """Run one step in its own process group, its output in logs/<name>.log, within its timeout."""
        timeout = min(STEP_TIMEOUTS_S[name], self.remaining_s())
        if timeout < 5:
            return self.skip(name, "the time budget is spent")
        log = self.logs / f"{name}.log"
        print(f"[{name}] {' '.join(command)}", flush=True)
        start = time.monotonic()
        with open(log, "w") as f:
            process = subprocess.Popen(command, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc = process.wait(timeout=timeout)
                status = "ok" if rc == 0 else "failed"
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                rc, status = process.wait(), "timeout"
        seconds = time.monotonic() - start
        tail = log.read_text(errors="replace").strip().splitlines()[-15:]
        step = {
            "name": name,
            "status": status,
            "returncode": rc,
            "seconds": round(seconds, 1),
            "timeout_s": round(timeout),
            "command": command,
            "log": str(log.relative_to(self.out)),
        }
        if status != "ok":
            step["log_tail"] = tail
        self.steps.append(step)
        print(f"[{name}] {status} in {seconds:.1f} s", flush=True)
        return step

    def python_step(self, name: str, code: str, *argv: str) -> dict:
        return self.run(name, [self.python, "-c", code, *argv])


ENVIRONMENT_PROBE = """
import json, platform, shutil, subprocess, sys
from importlib import metadata
import torch
info = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(), "devices": []}
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    memory_gib = round(p.total_memory / 2**30, 1)
    info["devices"].append({"name": p.name, "capability": f"{p.major}.{p.minor}", "memory_gib": memory_gib})
if shutil.which("nvidia-smi"):
    query = ["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit", "--format=csv,noheader"]
    info["nvidia_smi"] = subprocess.run(query, capture_output=True, text=True).stdout.strip().splitlines()
info["versions"] = {}
for dist in sys.argv[2:]:
    try:
        info["versions"][dist] = metadata.version(dist)
    except metadata.PackageNotFoundError:
        info["versions"][dist] = None
open(sys.argv[1], "w").write(json.dumps(info))
"""

KERNEL_PROBE = """
import importlib, sys, torch
for module in sys.argv[1:]:
    importlib.import_module(module)
    print("import ok:", module)
if torch.cuda.is_available():
    from lightning_moe.experts import megablocks
    megablocks.load_kernels(torch.device("cuda"), torch.bfloat16)
    print("lightning_moe.experts.megablocks.load_kernels: ok")
"""


def environment(check: Check) -> dict:
    path = check.out / "environment.json"
    names = [*PRESENT, "megablocks", "stanford-stk", "grouped_gemm", "lightning-moe", "pytest"]
    names += [requirement_name(r) for r in carried_requirements()]
    step = check.python_step("environment", ENVIRONMENT_PROBE, str(path), *dict.fromkeys(names))
    if step["status"] != "ok":
        return {"cuda_available": False}
    info = json.loads(path.read_text())
    step["result"] = info
    return info


def install(check: Check) -> None:
    args = check.args
    if args.skip_install:
        for name in ("install_deps", "install_package", "install_megablocks"):
            check.skip(name, "--skip-install")
        return
    carry = Path(args.carry).resolve()
    pip = [check.python, "-m", "pip", "install", "--no-index", "--disable-pip-version-check"]
    if args.dry_run:
        pip.append("--dry-run")
    deps = carry / "deps"
    if deps.is_dir():
        carried = {wheel_project(w) for w in deps.glob("*.whl")}
        wanted = [r for r in carried_requirements() if requirement_name(r) in carried]
        if wanted:
            step = check.run("install_deps", [*pip, "--find-links", str(deps), *wanted])
        else:
            step = check.skip("install_deps", f"no wheel in {deps} is a requirement")
        # Neither carried nor installed (e.g. datasets: only Hugging Face sources import it).
        step["missing"] = [r for r in carried_requirements() if r not in wanted and not installed(r)]
        # Editable: the check runs this checkout. Its build backend (setuptools) comes from deps.
        check.run("install_package", [*pip, "--find-links", str(deps), "--no-deps", "-e", str(REPO)])
    else:
        check.skip("install_deps", f"no {deps} (scripts/prepare_gpu_carry.sh makes it)")
        check.skip("install_package", f"no {deps}")
    wheels = sorted((carry / "megablocks").glob("*.whl"))
    if not wheels:
        check.skip("install_megablocks", f"no wheels in {carry / 'megablocks'}")
        return
    mismatch = built_for_other_torch(carry / "megablocks" / "BUILD_INFO.json", check)
    if mismatch:
        check.steps.append({"name": "install_megablocks", "status": "failed", "reason": mismatch})
        print(f"[install_megablocks] failed: {mismatch}", flush=True)
        return
    check.run("install_megablocks", [*pip, "--no-deps", "--force-reinstall", *map(str, wheels)])


def built_for_other_torch(build_info: Path, check: Check) -> str | None:
    """Why the carried wheels cannot load here (their C++ extensions need the exact torch they were built on)."""
    if not build_info.is_file():
        return None
    built = json.loads(build_info.read_text())
    here = next(s for s in check.steps if s["name"] == "environment").get("result", {})
    if here.get("torch") and here["torch"] != built["torch"]:
        return (
            f"the wheels were built for torch {built['torch']}, this machine has torch {here['torch']}: rebuild"
            f" them with scripts/build_gpu_wheels.sh --torch {here['torch'].split('+')[0]}"
        )
    return None


def gpu_test_files() -> list[str]:
    """The test files with gpu-marked tests: collecting only these keeps the step short."""
    return sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py") if "mark.gpu" in p.read_text())


def pytest_gpu(check: Check) -> None:
    junit = check.out / "pytest_gpu.xml"
    command = [check.python, "-m", "pytest", "-m", "gpu", "-q", "-rfEs", "-p", "no:cacheprovider"]
    step = check.run("pytest_gpu", [*command, f"--junitxml={junit}", *gpu_test_files()])
    if junit.is_file():
        step["result"] = junit_summary(junit)


def junit_summary(path: Path) -> dict:
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    problems, skip_reasons = [], {}
    for case in suite.iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        for kind in ("failure", "error"):
            element = case.find(kind)
            if element is not None:
                problems.append({"test": name, kind: (element.get("message") or "").splitlines()[:1]})
        skipped = case.find("skipped")
        if skipped is not None:
            reason = skipped.get("message") or ""
            skip_reasons[reason] = skip_reasons.get(reason, 0) + 1
    return {**counts, "problems": problems, "skip_reasons": skip_reasons}


def fit(check: Check, backend: str, cuda: bool) -> None:
    name = f"fit_{backend}"
    if not cuda and backend == "megablocks":
        check.skip(name, "backend='megablocks' needs CUDA")
        return
    runs = check.out / "runs"
    script = Path(check.python).with_name("lightning-moe")
    entry = [str(script)] if script.is_file() else [check.python, "-m", "lightning_moe.cli"]
    steps = check.args.fit_steps
    command = [
        *entry,
        "fit",
        "--config",
        "recipes/quickstart.yaml",
        f"--model.moe.backend={backend}",
        "--trainer.precision=bf16-mixed",
        f"--trainer.accelerator={'cuda' if cuda else 'cpu'}",
        "--trainer.devices=1",
        f"--trainer.max_steps={steps}",
        f"--trainer.val_check_interval={steps}",
        "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={runs}",
        f"--trainer.logger.init_args.name={name}",
        f"--data.cache_dir={check.out / 'data-cache'}",
    ]
    if check.args.dry_run or not cuda:  # a tiny model: the step's plumbing, not a result
        command += [
            "--model.d_model=32",
            "--model.n_heads=2",
            "--model.n_layers=1",
            "--model.moe.ffn_hidden=32",
            "--model.warmup_steps=1",
            "--data.seq_len=32",
            "--data.batch_size=4",
            "--data.max_bytes=100000",
            "--trainer.limit_val_batches=1",
            "--trainer.log_every_n_steps=1",
        ]
    else:
        command += ["--trainer.limit_val_batches=10", "--trainer.log_every_n_steps=10"]
    step = check.run(name, command)
    step["result"] = fit_result(runs / name)
    if not check.args.keep_checkpoints:  # a few hundred MB that the summary does not need
        for checkpoint in (runs / name).rglob("*.ckpt"):
            checkpoint.unlink()


def fit_result(run_root: Path) -> dict:
    """Losses and checkpoint of the newest version of a run, read back from its TensorBoard events."""
    versions = sorted(run_root.glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    if not versions:
        return {"error": f"no run under {run_root}"}
    run = versions[-1]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    last = run / "checkpoints" / "last.ckpt"
    result = {"run": str(run), "last_ckpt_bytes": last.stat().st_size if last.is_file() else None}
    for tag in ("train/loss", "val/loss"):
        if tag in events.Tags()["scalars"]:
            values = events.Scalars(tag)
            result[tag] = {"first": values[0].value, "last": values[-1].value, "last_step": values[-1].step}
            if tag == "train/loss" and values[-1].step > values[0].step:  # training speed, start-up excluded
                seconds = values[-1].wall_time - values[0].wall_time
                result["seconds_per_step"] = seconds / (values[-1].step - values[0].step)
    return result


def benchmark(check: Check, cuda: bool) -> None:
    path = check.out / "gpu_backends.json"
    command = [check.python, "benchmarks/gpu_backends.py", "--json", str(path)]
    if check.args.dry_run or not cuda:  # tiny shapes; the loop reference is the slow part on a CPU
        command += ["--dry-run", "--backends", "torch", "megablocks"]
    step = check.run("benchmark", command)
    if not path.is_file():
        return
    results = json.loads(path.read_text())
    rows = results["layer"] + results["e2e"]
    # On a GPU every row must run; on a CPU megablocks is expectedly unavailable.
    bad = [r for r in rows if r["status"] != "ok" and (cuda or r["status"].startswith("failed"))]
    step["result"] = {
        "roof_tflops": results["roof_tflops"],
        "comparisons": results["comparisons"],
        "rows_not_ok": [{k: r[k] for k in ("shape", "model", "impl", "status") if k in r} for r in bad],
    }
    if bad and step["status"] == "ok":
        step["status"] = "failed"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--carry", default=str(REPO / "gpu-carry"), help="folder from scripts/prepare_gpu_carry.sh")
    parser.add_argument("--out", default=str(REPO / "gpu-check-out"), help="logs, runs and summary.json go here")
    parser.add_argument("--dry-run", action="store_true", help="on a CPU: resolve installs, tiny fit, skip CUDA steps")
    parser.add_argument("--skip-install", action="store_true", help="use the packages already installed")
    parser.add_argument("--fit-steps", type=int, help="optimizer steps of each fit (default 100; 3 with --dry-run)")
    parser.add_argument("--budget-s", type=float, default=660, help="wall-clock budget of the whole check")
    parser.add_argument("--keep-checkpoints", action="store_true", help="keep the fits' checkpoints and data cache")
    args = parser.parse_args(argv)
    if args.fit_steps is None:
        args.fit_steps = 3 if args.dry_run else 100
    check = Check(args)
    started = time.time()

    env = environment(check)
    cuda = bool(env.get("cuda_available"))
    if not cuda and not args.dry_run:
        print("warning: no CUDA device; the CUDA steps are skipped (use --dry-run on a CPU)", flush=True)
    install(check)
    if cuda or installed("megablocks"):  # the extensions load without a driver, so this runs on a CPU too
        check.python_step("import_kernels", KERNEL_PROBE, *KERNEL_MODULES)
    else:
        check.skip("import_kernels", "no CUDA and megablocks is not installed")
    pytest_gpu(check)
    for backend in ("torch", "megablocks"):
        fit(check, backend, cuda)
    benchmark(check, cuda)
    if not args.keep_checkpoints:
        shutil.rmtree(check.out / "data-cache", ignore_errors=True)

    summary = {
        "ok": all(s["status"] in ("ok", "skipped") for s in check.steps),
        "dry_run": args.dry_run,
        "cuda": cuda,
        "host": platform.node(),
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "seconds": round(time.time() - started, 1),
        "commit": git_commit(),
        "steps": check.steps,
    }
    (check.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    print(f"gpu check: {'ok' if summary['ok'] else 'FAILED'}; summary in {check.out / 'summary.json'}")
    return 0 if summary["ok"] else 1


def git_commit() -> str | None:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], check=False, cwd=REPO, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() or None


if __name__ == "__main__":
    sys.exit(main())
