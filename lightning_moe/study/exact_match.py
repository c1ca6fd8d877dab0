"""Exact-match accuracy of a Hugging Face folder's greedy answers to held-out task prompts.

``lightning-moe evaluate-generation FOLDER --tasks 'synthetic:tasks?kinds=...&difficulty=...'``
draws the task set's held-out prompts (:mod:`lightning_moe.data.sft_tasks`: never trained on,
for any seed), has the folder answer them greedily and counts the answers that equal the right
one (surrounding whitespace aside). ``lightning-moe compare`` does the same for every finished run
and for the base model before fine-tuning when its study names ``generation``
(:func:`evaluate_study_runs`), so the report tables task accuracy beside validation loss.

The answers come from :mod:`~lightning_moe.study.greedy_generate`, run as a process of its own
that imports only ``torch`` and ``transformers``: what is scored is the exported folder as plain
``transformers`` runs it, and no ``lightning_moe`` code in the scoring process can change the model
(a conversion left registered, a patched module). The prompts go to it and the answers come back
as JSON files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lightning_moe.data.sft_tasks import TASK_SOURCE, TaskExample, TaskSet
from lightning_moe.errors import ConfigError

#: A function from conversations (each a list of messages) to the model's reply texts.
Generate = Callable[[list[list[dict[str, str]]]], list[str]]
_GREEDY_GENERATE = Path(__file__).with_name("greedy_generate.py")
RESULT_FILE = "exact_match.json"
ROUTING_FILE = "routing_stats.json"


@dataclass
class GenerationEval:
    """What ``compare`` (its ``generation`` setting) and ``evaluate-generation`` score models on.

    Args:
        tasks: the task set (``"synthetic:tasks?kinds=...&difficulty=..."``), the runs' ``data.source``.
        seed: draws the held-out prompts; one seed for every model, so all answer the same prompts.
        num_prompts: how many held-out prompts.
        max_new_tokens: the longest reply; default: the longest right answer's UTF-8 bytes plus 4
            (a token holds at least one byte of text in byte-level and byte-fallback tokenizers).
        batch_size: prompts generated for at once.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ``"cuda:1"``.
    """

    tasks: str = TASK_SOURCE
    seed: int = 0
    num_prompts: int = 200
    max_new_tokens: int | None = None
    batch_size: int = 32
    device: str = "auto"

    def task_set(self) -> TaskSet:
        tasks = TaskSet.parse(self.tasks, field="tasks")
        if tasks is None:
            raise ConfigError(f"tasks={self.tasks!r} is not a task set; use {TASK_SOURCE!r} or {TASK_SOURCE}?kinds=..&difficulty=..")
        for field in ("num_prompts", "batch_size", "max_new_tokens"):
            value = getattr(self, field)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{field}={value!r} must be a positive integer")
        return tasks


def score(examples: list[TaskExample], replies: list[str]) -> dict[str, Any]:
    """Exact-match accuracy of ``replies`` to ``examples``, over all and per task kind, with every answer."""
    if len(replies) != len(examples):
        raise ValueError(f"{len(replies)} replies to {len(examples)} prompts")
    answers = [
        {"kind": e.kind, "prompt": e.prompt, "answer": e.answer, "reply": r, "correct": r.strip() == e.answer.strip()}
        for e, r in zip(examples, replies)
    ]
    kinds = sorted({e.kind for e in examples})
    per_kind = {k: sum(a["correct"] for a in answers if a["kind"] == k) / sum(a["kind"] == k for a in answers)
                for k in kinds}
    correct = sum(a["correct"] for a in answers)
    return {"accuracy": correct / len(answers), "correct": correct, "total": len(answers), "per_kind": per_kind,
            "answers": answers}


def greedy_replies(model: str, settings: GenerationEval, max_new_tokens: int) -> Generate:
    """A :data:`Generate` that runs :mod:`~lightning_moe.study.greedy_generate` on ``model`` in a process of its own."""

    def generate(conversations: list[list[dict[str, str]]]) -> list[str]:
        with tempfile.TemporaryDirectory(prefix="greedy-") as scratch:
            prompts, output = os.path.join(scratch, "prompts.json"), os.path.join(scratch, "replies.json")
            Path(prompts).write_text(json.dumps({"conversations": conversations}))
            # Run by path through runpy: `python FILE` would put this package's folder first on sys.path.
            launcher = f"import runpy; runpy.run_path({str(_GREEDY_GENERATE)!r}, run_name='__main__')"
            command = [sys.executable, "-c", launcher, model, prompts, output, "--max-new-tokens",
                       str(max_new_tokens), "--batch-size", str(settings.batch_size), "--device", settings.device]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"greedy generation with {model!r} failed:\n{done.stderr[-4000:]}")
            result = json.loads(Path(output).read_text())
        if result["imported_lightning_moe"]:
            raise RuntimeError("the generating process imported lightning_moe; it must run plain transformers")
        return result["texts"]

    return generate


def evaluate_generation(model: str, settings: GenerationEval, generate: Generate | None = None) -> dict[str, Any]:
    """Score ``model`` (a Hugging Face folder) on ``settings``' held-out prompts; ``generate`` replaces the model."""
    tasks = settings.task_set()
    if generate is None and not (Path(model) / "config.json").is_file():
        raise ConfigError(f"model={model!r} is not a Hugging Face model folder (no config.json in it)")
    examples = tasks.examples("held_out", settings.num_prompts, settings.seed)
    max_new_tokens = settings.max_new_tokens or max(len(e.answer.encode()) for e in examples) + 4
    generate = generate or greedy_replies(str(model), settings, max_new_tokens)
    replies = generate([e.messages()[:1] for e in examples])
    return {"model": str(model), "settings": {**asdict(settings), "max_new_tokens": max_new_tokens},
            **score(examples, replies)}


def evaluate_saved(model: str, settings: GenerationEval, result_file: Path) -> dict[str, Any]:
    """:func:`evaluate_generation`, kept in ``result_file`` and reused while the model and settings are the
    same and the folder was not written again since (a run exported anew from a newer checkpoint is scored anew)."""
    config = Path(model) / "config.json"
    fresh = result_file.is_file() and config.is_file() and config.stat().st_mtime <= result_file.stat().st_mtime
    if fresh:
        kept = json.loads(result_file.read_text())
        if kept.get("model") == str(model) and kept.get("asked") == asdict(settings):
            return kept
    result = {"asked": asdict(settings), **evaluate_generation(model, settings)}
    result_file.write_text(json.dumps(result, indent=1))
    return result


def evaluate_study_runs(runs: list[dict[str, Any]], settings: GenerationEval, base_model: str | None,
                        output_dir: Path) -> dict[str, Any] | None:
    """Export every finished run's last checkpoint and score it; the base model is scored as step 0.

    Each run gets ``metrics["exact_match"]`` (and ``metrics["exact_match_per_kind"]``); the export
    goes to ``<run_dir>/hf`` and the answers to ``<run_dir>/exact_match.json``. Returns the base
    model's result (``None`` without a base model folder).

    With a base model, the same held-out conversations also give each run's routing statistics
    against the base (:mod:`~lightning_moe.study.routing_stats`, kept in ``<run_dir>/routing_stats.json``):
    ``metrics["routing_change"]`` (share of tokens whose top-k experts changed, mean over MoE
    layers) and ``metrics["routing_change_per_layer"]``, ``metrics["routing_entropy_tasks"]`` and
    ``metrics["kind_expert_mi"]`` (means over layers); the base's own ``token_entropy`` and
    ``kind_expert_mi`` join its returned result. A base of a family whose routers do not select the
    top-k of their logits gets no routing statistics (a line says so), its exact match still counts.
    """
    from lightning_moe.hf.export import export_checkpoint
    from lightning_moe.study.routing_stats import check_routing_folder, routing_statistics_saved

    settings.task_set()  # a bad setting fails before anything is exported
    routing_base = base_model = None if base_model is None else str(Path(base_model).absolute())
    try:
        check_routing_folder(routing_base, "base_model")
    except ConfigError as refusal:
        print(f"compare: no routing statistics: {refusal}")
        routing_base = None
    for run in runs:
        if run["status"] != "done":
            continue
        run_dir = Path(run["run_dir"])
        checkpoint, folder = run_dir / "checkpoints" / "last.ckpt", run_dir / "hf"
        if not checkpoint.is_file():
            raise ConfigError(f"compare: generation needs each run's last checkpoint; {checkpoint} does not exist"
                              " (give the recipe a ModelCheckpoint with save_last: true)")
        if not (folder / "config.json").is_file() or folder.stat().st_mtime < checkpoint.stat().st_mtime:
            export_checkpoint(str(checkpoint), str(folder), overwrite=True)
        result = evaluate_saved(str(folder), settings, run_dir / RESULT_FILE)
        run["metrics"]["exact_match"] = result["accuracy"]
        run["metrics"]["exact_match_per_kind"] = result["per_kind"]
        if routing_base is not None:
            routing = routing_statistics_saved(str(folder), settings, routing_base, run_dir / ROUTING_FILE)
            run["metrics"].update(routing_change=routing["routing_change"],
                                  routing_change_per_layer=[layer["routing_change"] for layer in routing["layers"]],
                                  routing_entropy_tasks=routing["token_entropy"], kind_expert_mi=routing["kind_expert_mi"])
    if base_model is None:
        return None
    result = evaluate_saved(base_model, settings, output_dir / f"base_{RESULT_FILE}")
    base = {key: result[key] for key in ("model", "accuracy", "correct", "total", "per_kind")}
    if routing_base is not None:
        routing = routing_statistics_saved(base_model, settings, None, output_dir / f"base_{ROUTING_FILE}")
        base.update(token_entropy=routing["token_entropy"], kind_expert_mi=routing["kind_expert_mi"])
    return base
