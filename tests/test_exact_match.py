"""Exact match on held-out task prompts: the scorer against known answers, and the real generating
process against transformers' own greedy decoding on a tiny random model."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_sft_tasks import right_answer  # noqa: E402

from lightning_moe.cli import main  # noqa: E402
from lightning_moe.data.sft_tasks import TaskSet  # noqa: E402
from lightning_moe.hf.tiny import IM_END, build_tiny_model  # noqa: E402
from lightning_moe.study.exact_match import GenerationEval, evaluate_generation, score  # noqa: E402

TASKS = "synthetic:tasks?kinds=arithmetic,lookup,reverse&difficulty=2"


def test_scorer_counts_exactly_the_right_replies():
    seen = []

    def stub(conversations):
        seen.extend(conversations)
        # Right on every third prompt (with stray whitespace), wrong by one character otherwise.
        return [f" {right_answer(c[0]['content'])}\n" if i % 3 == 0 else right_answer(c[0]["content"]) + "0"
                for i, c in enumerate(conversations)]

    result = evaluate_generation("unused", GenerationEval(TASKS, seed=4, num_prompts=30), generate=stub)
    assert result["correct"] == 10 and result["total"] == 30 and result["accuracy"] == pytest.approx(1 / 3)
    # The model is asked the held-out prompts, the user's turn alone.
    held_out = TaskSet.parse(TASKS).examples("held_out", 30, 4)
    assert seen == [[{"role": "user", "content": e.prompt}] for e in held_out]
    for kind, accuracy in result["per_kind"].items():
        answers = [a for a in result["answers"] if a["kind"] == kind]
        assert accuracy == sum(i % 3 == 0 for i, e in enumerate(held_out) if e.kind == kind) / len(answers)


def test_scorer_refuses_a_missing_reply():
    examples = TaskSet().examples("held_out", 3, 0)
    with pytest.raises(ValueError, match="2 replies to 3 prompts"):
        score(examples, ["1", "2"])


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return build_tiny_model("olmoe", str(tmp_path_factory.mktemp("tiny") / "olmoe"), vocab_size=512)


def test_generating_process_replies_as_transformers_greedy_decoding(tiny_folder):
    settings = GenerationEval(TASKS, seed=1, num_prompts=5, max_new_tokens=12, batch_size=2)  # uneven, padded batches
    result = evaluate_generation(tiny_folder, settings)  # raises if the generating process imported lightning_moe
    assert 0.0 <= result["accuracy"] <= 1.0 and result["total"] == 5

    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_folder).eval()
    stops = {tokenizer.convert_tokens_to_ids(IM_END), tokenizer.eos_token_id}
    for answer in result["answers"]:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": answer["prompt"]}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
        with torch.no_grad():
            generated = model.generate(ids, do_sample=False, max_new_tokens=12, eos_token_id=sorted(stops),
                                       pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1] :].tolist()
            # And by hand: the argmax of a full forward pass, token by token, no cache.
            by_hand = []
            while len(by_hand) < 12:
                token = int(model(torch.tensor([ids[0].tolist() + by_hand])).logits[0, -1].argmax())
                if token in stops:
                    break
                by_hand.append(token)
        assert generated[: next((i for i, t in enumerate(generated) if t in stops), len(generated))] == by_hand
        assert answer["reply"] == tokenizer.decode(by_hand, skip_special_tokens=True)


def test_command_prints_accuracy_and_writes_every_reply(tiny_folder, tmp_path, capsys):
    output = tmp_path / "result.json"
    main(["evaluate-generation", tiny_folder, "--tasks", TASKS, "--num_prompts", "3", "--max_new_tokens", "4",
          "--output", str(output)])
    assert capsys.readouterr().out.startswith("exact match ")
    written = json.loads(output.read_text())
    assert written["total"] == 3 and len(written["answers"]) == 3 and written["settings"]["tasks"] == TASKS


@pytest.mark.parametrize(
    "args, says",
    [
        (["--tasks", "synthetic:chat"], "error: tasks='synthetic:chat' is not a task set; use 'synthetic:tasks'"),
        (["--tasks", "synthetic:tasks?kinds=divide"], "error: tasks='synthetic:tasks?kinds=divide': task kinds"),
        (["--num_prompts", "0"], "error: num_prompts=0 must be a positive integer"),
    ],
)
def test_bad_settings_are_one_line(tiny_folder, capsys, args, says):
    with pytest.raises(SystemExit) as exit_:
        main(["evaluate-generation", tiny_folder, *args])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith(says) and err.count("\n") == 1, err


def test_a_folder_without_a_model_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["evaluate-generation", str(tmp_path)])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == f"error: model={str(tmp_path)!r} is not a Hugging Face model folder (no config.json in it)\n"


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
def test_compare_tables_exact_match_of_every_run_and_of_the_base(tiny_folder, tmp_path):
    from pathlib import Path

    from lightning_moe.study import Configuration, compare

    recipe = Path(__file__).parents[1] / "recipes" / "posttrain_tiny_offline.yaml"
    settings = GenerationEval(TASKS, seed=2, num_prompts=4, max_new_tokens=4)
    study = dict(
        configurations=[Configuration("topk", {"model.estimator": "topk"})], base=str(recipe), seeds=[0], steps=4,
        overrides={"model.pretrained": tiny_folder, "data.source": TASKS, "data.max_examples": 64,
                   "trainer.val_check_interval": 4, "trainer.limit_val_batches": 1},
        output_dir=str(tmp_path / "study"), devices=None, generation=settings,
    )
    results = compare(**study)
    run = results["runs"][0]
    assert run["status"] == "done"
    # The run's last checkpoint was exported as an ordinary folder, and that folder is what was scored.
    scored = json.loads((Path(run["run_dir"]) / "exact_match.json").read_text())
    assert scored["model"] == str(Path(run["run_dir"]) / "hf") and scored["total"] == 4
    assert transformers.AutoConfig.from_pretrained(scored["model"]).model_type == "olmoe"
    assert run["metrics"]["exact_match"] == scored["accuracy"] and 0 <= scored["accuracy"] <= 1
    base = results["study"]["base_exact_match"]
    assert base["model"] == str(Path(tiny_folder).absolute()) and base["total"] == 4
    report = (tmp_path / "study" / "report.md").read_text()
    assert "## Exact match on held-out prompts" in report
    assert f"| base model (step 0) | {base['accuracy']:.3f} |" in report
    assert f"| `topk` | {scored['accuracy']:.3f} | {scored['accuracy']:.3f} |" in report
    # The report alone again: the scores are reused, not generated anew.
    stamp = (Path(run["run_dir"]) / "exact_match.json").stat().st_mtime_ns
    compare(**study, report_only=True)
    assert (Path(run["run_dir"]) / "exact_match.json").stat().st_mtime_ns == stamp


def test_a_kept_score_is_reused_only_until_the_folder_is_written_again(tmp_path, monkeypatch):
    """A run exported anew (from a newer checkpoint: a resumed or extended run) is scored anew, not
    reported with the answers of the model it replaced."""
    import os
    from pathlib import Path

    from lightning_moe.study import exact_match

    folder = Path(build_tiny_model("olmoe", str(tmp_path / "model"), vocab_size=320))
    settings = GenerationEval(TASKS, num_prompts=3, max_new_tokens=2)
    calls = []

    def fake(model, asked):
        calls.append(model)
        return {"model": model, "accuracy": len(calls) / 10}

    result_file = tmp_path / "exact_match.json"
    monkeypatch.setattr(exact_match, "evaluate_generation", fake)
    assert exact_match.evaluate_saved(str(folder), settings, result_file)["accuracy"] == 0.1
    assert exact_match.evaluate_saved(str(folder), settings, result_file)["accuracy"] == 0.1  # kept
    later = result_file.stat().st_mtime + 5
    os.utime(folder / "config.json", (later, later))  # the folder written again after the score
    assert exact_match.evaluate_saved(str(folder), settings, result_file)["accuracy"] == 0.2
    assert len(calls) == 2
