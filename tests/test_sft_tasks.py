"""The generated SFT tasks: deterministic, held-out prompts never trained on, answers right by an independent check."""

import re

import numpy as np
import pytest

from lightning_moe.data.sft_tasks import TASK_KINDS, TaskSet, is_held_out
from lightning_moe.errors import ConfigError


def right_answer(prompt: str) -> str:
    """The answer worked out from the prompt's text alone, not by the generator's code."""
    if prompt.startswith("Compute "):
        expression = prompt[len("Compute ") : -1]
        assert re.fullmatch(r"\d+( [+-] \d+)*", expression)
        return str(eval(expression))  # digits, spaces, + and - only (checked above)
    if prompt.startswith("Reverse the letters: "):
        return " ".join(prompt.split(": ")[1].split()[::-1])
    if prompt.startswith("Sort the letters: "):
        return " ".join(sorted(prompt.split(": ")[1].split()))
    pairs, asked = re.fullmatch(r"Given (.*)\. What is (\w+)\?", prompt).groups()
    return dict(pair.split("=") for pair in pairs.split(", "))[asked]


def test_same_seed_same_examples_other_seed_others():
    tasks = TaskSet()
    first = tasks.examples("train", 300, seed=3)
    assert first == TaskSet().examples("train", 300, seed=3)
    assert first != tasks.examples("train", 300, seed=4)
    # A larger draw starts with the smaller one: the validation prompts are the evaluation's first ones.
    assert tasks.examples("held_out", 500, seed=3)[:50] == tasks.examples("held_out", 50, seed=3)


def test_held_out_prompts_never_appear_in_training_for_any_seed():
    tasks = TaskSet(difficulty=1)  # the smallest prompt space: the likeliest to collide
    train = {e.prompt for seed in (0, 1, 2) for e in tasks.examples("train", 3000, seed)}
    held_out = [e.prompt for seed in (0, 1, 2) for e in tasks.examples("held_out", 500, seed)]
    assert not train & set(held_out)
    assert all(is_held_out(p) for p in held_out) and not any(is_held_out(p) for p in train)
    # Distinct within a split, and about the held-out share of the prompt space is held out.
    assert len(set(tasks.examples("held_out", 500, 0))) == 500
    assert 0.1 < np.mean([is_held_out(f"Compute {a} + {b}.") for a in range(100) for b in range(100)]) < 0.3


def test_answers_are_right_and_every_kind_is_drawn():
    examples = TaskSet(difficulty=3).examples("train", 400, seed=0)
    assert {e.kind for e in examples} == set(TASK_KINDS)
    for e in examples:
        assert e.answer == right_answer(e.prompt), e
        assert e.messages() == [{"role": "user", "content": e.prompt}, {"role": "assistant", "content": e.answer}]


def test_difficulty_makes_longer_problems():
    def operands(difficulty):
        return {len(re.findall(r"\d+", e.prompt)) for e in TaskSet(("arithmetic",), difficulty).examples("train", 50, 0)}

    assert operands(1) == {2} and operands(4) == {5}
    lookup = TaskSet(("lookup",), 5).examples("held_out", 20, 0)
    assert all(e.prompt.count("=") == 12 for e in lookup)


def test_source_strings():
    assert TaskSet.parse("synthetic:chat") is None and TaskSet.parse("data/train.jsonl") is None
    assert TaskSet.parse("synthetic:tasks") == TaskSet()
    assert TaskSet.parse("synthetic:tasks?kinds=lookup,sort&difficulty=4") == TaskSet(("lookup", "sort"), 4)
    assert TaskSet.parse(TaskSet(("sort",), 3).source) == TaskSet(("sort",), 3)


@pytest.mark.parametrize(
    "source, says",
    [
        ("synthetic:tasks?kinds=lookup,divide", "choose one or more of ['arithmetic', 'reverse', 'sort', 'lookup']"),
        ("synthetic:tasks?difficulty=0", "use an integer from 1 to 10"),
        ("synthetic:tasks?difficulty=hard", "difficulty='hard' is not an integer"),
        ("synthetic:tasks?level=3", "unknown or repeated setting(s) ['level']"),
    ],
)
def test_bad_source_is_one_line_naming_the_field(source, says):
    with pytest.raises(ConfigError) as err:
        TaskSet.parse(source)
    assert str(err.value).startswith(f"data.source={source!r}: ") and says in str(err.value)
    assert "\n" not in str(err.value)


def test_too_small_a_prompt_space_is_refused():
    # Difficulty 1 arithmetic has 100 * 100 * 2 prompts, a fifth of them held out.
    says = r"synthetic:tasks\?kinds=arithmetic&difficulty=1: found only \d+ distinct held_out prompts of the 5000 asked"
    with pytest.raises(ConfigError, match=says):
        TaskSet(("arithmetic",), 1).examples("held_out", 5000, 0)


def test_posttrain_datamodule_trains_on_train_prompts_and_validates_on_held_out(tmp_path):
    pytest.importorskip("transformers")
    from lightning_moe.data.posttrain import PostTrainDataModule
    from lightning_moe.hf.tiny import build_tokenizer

    folder = tmp_path / "tokenizer"
    build_tokenizer(400).save_pretrained(folder)
    data = PostTrainDataModule(source="synthetic:tasks?kinds=sort,lookup&difficulty=2", tokenizer=str(folder),
                               seq_len=128, batch_size=4, max_examples=200, val_fraction=0.1, seed=5,
                               cache_dir=str(tmp_path / "cache"))
    data.setup("fit")
    tok = data.tokenizer

    def prompts(dataset):
        text = "".join(tok.decode(dataset[i][0]) for i in range(len(dataset)))
        return set(re.findall(r"user\n(.*?)<\|im_end\|>", text))

    train, val = prompts(data.train_dataset), prompts(data.val_dataset)
    expected_val = {e.prompt for e in TaskSet(("sort", "lookup"), 2).examples("held_out", 20, 5)}
    assert val == expected_val
    assert len(train) > 150 and not train & val
