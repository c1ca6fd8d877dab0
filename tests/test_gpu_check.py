"""The GPU check script and the GPU benchmark stay runnable: their CPU dry runs, and the helpers they report with."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def load_script(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


gpu_check = load_script(REPO / "scripts" / "gpu_check.py")
gpu_backends = load_script(REPO / "benchmarks" / "gpu_backends.py")


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the check itself is run, not its dry run")
def test_dry_run_runs_every_step_it_can_on_a_cpu(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_check.sh"), "--dry-run", "--skip-install", "--out", str(out)],
        check=False,
        cwd=REPO,
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    steps = {step["name"]: step for step in summary["steps"]}
    assert list(steps) == list(gpu_check.STEP_TIMEOUTS_S)
    assert summary["ok"] and summary["dry_run"] and not summary["cuda"]
    for name in ("environment", "pytest_gpu", "fit_torch", "benchmark"):
        assert steps[name]["status"] == "ok", steps[name]
        assert (out / steps[name]["log"]).is_file()
    for name in ("install_deps", "install_package", "install_megablocks", "import_kernels", "fit_megablocks"):
        assert steps[name]["status"] == "skipped" and steps[name]["reason"]

    assert steps["environment"]["result"]["torch"] == torch.__version__
    tests = steps["pytest_gpu"]["result"]
    assert tests["tests"] > 0 and tests["skipped"] == tests["tests"]  # every gpu test skips on a CPU
    fit = steps["fit_torch"]["result"]
    assert fit["last_ckpt_bytes"] > 0 and fit["train/loss"]["last_step"] == 2  # three steps, counted from 0
    assert not list((out / "runs").rglob("*.ckpt"))  # removed once read: they are large on the real run
    assert 0 < fit["val/loss"]["last"] < 10  # a byte-level LM starts near ln(256) = 5.5
    assert fit["seconds_per_step"] > 0
    comparisons = steps["benchmark"]["result"]["comparisons"]
    assert [entry["shape"] for entry in comparisons["layer"]] == [
        str(gpu_backends.Shape.parse(s)) for s in gpu_backends.DRY_RUN_DEFAULTS["shapes"]
    ]
    assert all(entry["torch"] is not None and entry["megablocks"] is None for entry in comparisons["layer"])


def test_comparisons_are_the_ratios_of_the_rows():
    shape = "8,16,4,2"
    name = str(gpu_backends.Shape.parse(shape))
    layers = [
        {"shape": name, "impl": "loop", "status": "failed (RuntimeError: out of memory)"},
        {"shape": name, "impl": "torch", "status": "ok", "ms": 4.0, "tflops": 1.0, "fraction_of_roof": 0.25},
        {"shape": name, "impl": "megablocks", "status": "ok", "ms": 2.0, "tflops": 2.0, "fraction_of_roof": 0.5},
        {"shape": name, "impl": "dense", "status": "ok", "ms": 3.0, "tflops": 4 / 3, "fraction_of_roof": 1 / 3},
    ]
    e2e = [
        {"model": "moe E=4 k=2 torch", "status": "ok", "tokens_per_s": 600.0},
        {"model": "moe E=4 k=2 megablocks", "status": "unavailable (no GPU)"},
        {"model": "dense ffn=32", "status": "ok", "tokens_per_s": 800.0},
    ]
    result = gpu_backends.comparisons(layers, e2e, [shape])
    (entry,) = result["layer"]
    assert entry["loop"] is None
    assert entry["torch"]["fraction_of_dense_ffn"] == pytest.approx(3 / 4)
    assert entry["megablocks"]["fraction_of_dense_ffn"] == pytest.approx(3 / 2)
    assert entry["megablocks_speedup_over_torch"] == pytest.approx(2.0)
    assert result["moe_tokens_per_s_over_dense"] == {"moe E=4 k=2 torch": 0.75, "moe E=4 k=2 megablocks": None}


def test_carried_requirements_are_the_dependencies_the_gpu_machine_lacks():
    names = [gpu_check.requirement_name(r) for r in gpu_check.carried_requirements()]
    assert {"jsonargparse", "datasets", "pytest"} <= set(names)
    assert not {"torch", "lightning", "torchmetrics", "tensorboard", "triton"} & set(names)
    assert gpu_check.requirement_name("jsonargparse[signatures]>=4.27") == "jsonargparse"
    assert gpu_check.requirement_name("PyYAML (>=5.4)") == "pyyaml"
    assert gpu_check.wheel_project(Path("typing_extensions-4.16.0-py3-none-any.whl")) == "typing-extensions"


def test_wheels_built_for_another_torch_are_refused_with_the_rebuild_command(tmp_path):
    check = SimpleNamespace(steps=[{"name": "environment", "result": {"torch": "2.12.0+cu130"}}])
    info = tmp_path / "BUILD_INFO.json"
    info.write_text(json.dumps({"torch": "2.11.0+cu130"}))
    reason = gpu_check.built_for_other_torch(info, check)
    assert "torch 2.11.0+cu130" in reason and "--torch 2.12.0" in reason
    info.write_text(json.dumps({"torch": "2.12.0+cu130"}))
    assert gpu_check.built_for_other_torch(info, check) is None


def test_junit_summary_counts_and_names_the_failures(tmp_path):
    junit = tmp_path / "junit.xml"
    junit.write_text(
        '<testsuites><testsuite tests="4" failures="1" errors="0" skipped="2">'
        '<testcase classname="tests.test_a" name="test_ok"/>'
        '<testcase classname="tests.test_a" name="test_bad"><failure message="assert 1 == 2&#10;more"/></testcase>'
        '<testcase classname="tests.test_b" name="test_s1"><skipped message="needs two GPUs"/></testcase>'
        '<testcase classname="tests.test_b" name="test_s2"><skipped message="needs two GPUs"/></testcase>'
        "</testsuite></testsuites>"
    )
    summary = gpu_check.junit_summary(junit)
    assert (summary["tests"], summary["passed"], summary["failures"], summary["skipped"]) == (4, 1, 1, 2)
    assert summary["problems"] == [{"test": "tests.test_a::test_bad", "failure": ["assert 1 == 2"]}]
    assert summary["skip_reasons"] == {"needs two GPUs": 2}


def test_installed_closure_follows_requirements_and_their_extras():
    closure = gpu_check.installed_closure(("lightning",))
    assert {"lightning", "torch", "fsspec", "pyyaml"} <= closure
    assert "aiohttp" in closure  # only through lightning's fsspec[http]
    assert "datasets" not in closure
    assert gpu_check.installed_closure(("lightning", "no-such-distribution")) is None
