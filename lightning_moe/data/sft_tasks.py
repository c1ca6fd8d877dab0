"""Generated fine-tuning tasks whose answers are checked by exact match, with held-out prompts.

A post-training study measures task accuracy, not only validation loss, so it needs prompts
with one right answer that the base model cannot give and that fine-tuning teaches in a few
hundred steps. :class:`TaskSet` draws them from a seed, offline:

* ``arithmetic``: ``difficulty + 1`` numbers below 100 added and subtracted (``"Compute 23 + 7 - 15."``),
* ``reverse``: ``difficulty + 3`` letters written in reverse order,
* ``sort``: ``difficulty + 3`` letters written in alphabetical order,
* ``lookup``: ``2 * difficulty + 2`` key-value pairs in the prompt, the value of one key asked for.

A source names a task set as ``"synthetic:tasks"`` (every kind, difficulty 2) or
``"synthetic:tasks?kinds=arithmetic,lookup&difficulty=3"``; the same string is given to
``PostTrainDataModule(source=...)`` for training and to ``lightning-moe evaluate-generation
--tasks`` for the exact-match evaluation, so both see the same task set.

Held-out prompts are never trained on, whatever the seeds and sizes: a prompt belongs to the
held-out split when a hash of its text falls in the held-out share (:func:`is_held_out`), so the
two splits partition the space of prompts itself, not one draw from it. Within a split prompts
are distinct, and each split is a prefix-stable stream: the first ``n`` examples of a larger draw
are the ``n`` examples of a smaller one (the validation examples a run is scored on are the first
held-out prompts the evaluation generates for).
"""

from __future__ import annotations

import hashlib
import random
import string
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import parse_qs

from lightning_moe.errors import ConfigError

TASK_SOURCE = "synthetic:tasks"
SPLITS = ("train", "held_out")
#: Percent of the prompt space that is held out; bump GENERATOR_VERSION when a task's text changes.
HELD_OUT_PERCENT = 20
GENERATOR_VERSION = 1
MAX_DIFFICULTY = 10
DEFAULT_DIFFICULTY = 2
_ATTEMPTS_PER_EXAMPLE = 50  # distinct prompts of one split that one draw may take, before the space is deemed too small


@dataclass(frozen=True)
class TaskExample:
    """One prompt and its right answer."""

    kind: str
    prompt: str
    answer: str

    def messages(self) -> list[dict[str, str]]:
        """The example as a chat conversation: the prompt from the user, the answer from the assistant."""
        return [{"role": "user", "content": self.prompt}, {"role": "assistant", "content": self.answer}]


def _arithmetic(rng: random.Random, difficulty: int) -> tuple[str, str]:
    numbers = [rng.randrange(100) for _ in range(difficulty + 1)]
    signs = [rng.choice("+-") for _ in range(difficulty)]
    total = numbers[0] + sum(n if s == "+" else -n for s, n in zip(signs, numbers[1:]))
    expression = " ".join([str(numbers[0]), *(f"{s} {n}" for s, n in zip(signs, numbers[1:]))])
    return f"Compute {expression}.", str(total)


def _letters(rng: random.Random, count: int) -> list[str]:
    return [rng.choice(string.ascii_lowercase) for _ in range(count)]


def _reverse(rng: random.Random, difficulty: int) -> tuple[str, str]:
    letters = _letters(rng, difficulty + 3)
    return f"Reverse the letters: {' '.join(letters)}", " ".join(reversed(letters))


def _sort(rng: random.Random, difficulty: int) -> tuple[str, str]:
    letters = _letters(rng, difficulty + 3)
    return f"Sort the letters: {' '.join(letters)}", " ".join(sorted(letters))


def _lookup(rng: random.Random, difficulty: int) -> tuple[str, str]:
    keys = rng.sample([a + b for a in string.ascii_lowercase for b in string.ascii_lowercase], 2 * difficulty + 2)
    values = [rng.randrange(100) for _ in keys]
    asked = rng.randrange(len(keys))
    pairs = ", ".join(f"{k}={v}" for k, v in zip(keys, values))
    return f"Given {pairs}. What is {keys[asked]}?", str(values[asked])


TASK_KINDS: dict[str, Callable[[random.Random, int], tuple[str, str]]] = {
    "arithmetic": _arithmetic,
    "reverse": _reverse,
    "sort": _sort,
    "lookup": _lookup,
}


def is_held_out(prompt: str) -> bool:
    """Whether ``prompt`` belongs to the held-out split: a hash of its text, the same for every seed."""
    bucket = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big") % 100
    return bucket < HELD_OUT_PERCENT


@dataclass(frozen=True)
class TaskSet:
    """Which task kinds, at which difficulty; parsed from a source string with :meth:`parse`."""

    kinds: tuple[str, ...] = tuple(TASK_KINDS)
    difficulty: int = DEFAULT_DIFFICULTY

    def __post_init__(self) -> None:
        unknown = [k for k in self.kinds if k not in TASK_KINDS]
        if not self.kinds or unknown:
            raise ConfigError(f"task kinds {list(self.kinds)}: choose one or more of {list(TASK_KINDS)}")
        if isinstance(self.difficulty, bool) or not isinstance(self.difficulty, int) or not (
            1 <= self.difficulty <= MAX_DIFFICULTY
        ):
            raise ConfigError(f"task difficulty={self.difficulty!r}: use an integer from 1 to {MAX_DIFFICULTY}")

    @classmethod
    def parse(cls, source: str, field: str = "data.source") -> TaskSet | None:
        """The task set ``source`` names, ``None`` when it names no task set; ``ConfigError`` for a bad one."""
        if not isinstance(source, str) or not (source == TASK_SOURCE or source.startswith(TASK_SOURCE + "?")):
            return None
        valid = f"{TASK_SOURCE}?kinds=K1,K2&difficulty=D with kinds from {list(TASK_KINDS)}, D from 1 to {MAX_DIFFICULTY}"
        query = parse_qs(source[len(TASK_SOURCE) + 1 :], keep_blank_values=True, strict_parsing=False)
        unknown = sorted(set(query) - {"kinds", "difficulty"})
        if unknown or any(len(v) != 1 for v in query.values()):
            raise ConfigError(f"{field}={source!r}: unknown or repeated setting(s) {unknown or sorted(query)}; use {valid}")
        kinds = tuple(query["kinds"][0].split(",")) if "kinds" in query else tuple(TASK_KINDS)
        difficulty = query.get("difficulty", [str(DEFAULT_DIFFICULTY)])[0]
        if not difficulty.isdigit():
            raise ConfigError(f"{field}={source!r}: difficulty={difficulty!r} is not an integer; use {valid}")
        try:
            return cls(kinds, int(difficulty))
        except ConfigError as err:
            raise ConfigError(f"{field}={source!r}: {err}") from None

    @property
    def source(self) -> str:
        """The source string that names this task set."""
        return f"{TASK_SOURCE}?kinds={','.join(self.kinds)}&difficulty={self.difficulty}"

    @property
    def identity(self) -> str:
        """What the generated examples depend on besides seed and count (a cache key part)."""
        return f"sft_tasks-v{GENERATOR_VERSION}:{','.join(self.kinds)}:{self.difficulty}:{HELD_OUT_PERCENT}"

    def examples(self, split: str, num_examples: int, seed: int) -> list[TaskExample]:
        """The first ``num_examples`` distinct prompts of ``split`` (``"train"`` or ``"held_out"``) drawn from ``seed``."""
        if split not in SPLITS:
            raise ValueError(f"split={split!r}: use one of {SPLITS}")
        rng = random.Random(f"sft_tasks:{seed}:{split}")
        held_out = split == "held_out"
        seen: set[str] = set()
        examples = []
        for _ in range(_ATTEMPTS_PER_EXAMPLE * num_examples):
            if len(examples) == num_examples:
                break
            kind = rng.choice(self.kinds)
            prompt, answer = TASK_KINDS[kind](rng, self.difficulty)
            if prompt in seen or is_held_out(prompt) != held_out:
                continue
            seen.add(prompt)
            examples.append(TaskExample(kind, prompt, answer))
        if len(examples) < num_examples:
            raise ConfigError(
                f"{self.source}: found only {len(examples)} distinct {split} prompts of the {num_examples} asked for"
                " (data.max_examples, num_prompts); ask for fewer, or raise the difficulty"
            )
        return examples
