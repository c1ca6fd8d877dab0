"""``lightning-moe compare``: the study's arguments and checks, then its runs, then its report."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import yaml

from lightning_moe.errors import ConfigError
from lightning_moe.study.exact_match import GenerationEval, evaluate_study_runs
from lightning_moe.study.records import (
    VAL_LOSS,
    _finished_by_configuration,
    pair_differences,
    read_scalars,
    run_metrics,
    steps_to_reach,
    summarise,
)
from lightning_moe.study.report import write_report
from lightning_moe.study.runner import (
    Configuration,
    _device_ids,
    _Job,
    _recipe_value,
    _run_in_process,
    _run_on_devices,
    _runs_use_cuda,
    run_arguments,
)
from lightning_moe.testbed import parse_testbed_source


def compare(
    configurations: list[Configuration] | None = None,
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
    seed_keys: list[str] | None = None,
    generation: GenerationEval | None = None,
) -> dict[str, Any]:
    """Train ``base`` with every configuration and seed, then write the comparison report.

    Args:
        configurations: the arms of the study, each a name and the recipe keys it overrides
            (required; optional in the signature only so that the usage line shows it as the
            option a study file gives, not as a positional ``[ITEM,...]``).
        base: a ``lightning-moe fit`` recipe: a YAML path, or the recipe itself inline.
        seeds: ``seed_everything`` of the runs; every configuration runs every seed, so
            differences can be paired by seed.
        steps: ``trainer.max_steps`` of every run (default: the recipe's).
        corpus: ``data.source`` of every run (default: the recipe's).
        overrides: recipe keys set in every run (dotted keys, e.g. ``model.d_model``).
        reference: the configuration the others are compared with (default: the first).
        pairs: further ``(configuration, baseline)`` pairs whose paired difference the
            report gives (validation loss, and exact match with ``generation``), e.g. an
            estimator against the control that shares its forward pass.
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
        seed_keys: recipe keys that also take each run's seed, e.g. ``[data.seed]`` to vary
            the data order by seed when ``seed_everything`` alone changes nothing (a
            post-trained model starts from the same weights in every run).
        generation: score every finished run's exported last checkpoint by exact match of its
            greedy answers to held-out task prompts (:mod:`~lightning_moe.study.exact_match`), and
            the recipe's ``model.pretrained`` folder as step 0; the report tables the accuracy
            beside validation loss, with its seed-paired difference to ``reference`` (95 % interval)
            and the prompts only one of the two answers right. E.g. ``{tasks: "synthetic:tasks?difficulty=3", num_prompts: 500}``.

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
    if generation is not None:
        generation.task_set()  # a bad setting fails before anything trains
    uses_cuda = _runs_use_cuda(base_config, common, configurations)
    device_ids = _device_ids(devices, torch.cuda.device_count() if uses_cuda else None)

    if num_threads is not None:
        torch.set_num_threads(num_threads)
    # Seed-major order: an interrupted study has complete, paired seeds first.
    jobs = []
    for seed in seeds:
        for configuration in configurations:
            run_dir = out / "runs" / configuration.name / f"seed_{seed}"
            seeded = {**common, **{key: seed for key in seed_keys or []}}
            args = run_arguments(str(base_config), run_dir, seed, configuration, seeded)
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
    base_exact_match = None
    if generation is not None:
        base_model = _recipe_value(base_config, common, "model.pretrained")
        base_exact_match = evaluate_study_runs(runs, generation, base_model, out)

    target, summary = summarise(runs, reference)
    if not summary:
        print(f"[compare] no finished run logged {VAL_LOSS}: the report compares nothing", file=sys.stderr, flush=True)
    pair_results = pair_differences(runs, pairs)
    reference_runs = _finished_by_configuration(runs).get(reference, {})
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
        "seed_keys": list(seed_keys or []),
        "reference": reference,
        "pairs": [list(pair) for pair in pairs],
        "corpus": source,
        "num_domains": parse_testbed_source(source) if isinstance(source, str) else None,
        "configurations": [asdict(c) for c in configurations],
        "generation": asdict(generation) if generation is not None else None,
        "base_exact_match": base_exact_match,
    }
    results = {"study": study, "target_val_loss": target, "summary": summary, "pairs": pair_results, "runs": runs}
    write_report(out, results, names)
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


def main(args: list[str] | None = None) -> None:
    """``lightning-moe compare ...`` (``--config study.yaml`` reads the arguments from a file)."""
    from jsonargparse import CLI

    CLI(compare, args=args, exit_on_error=False, prog="lightning-moe compare")  # a bad flag raises, for one line
