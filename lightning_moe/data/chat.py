"""Chat examples for supervised fine-tuning: messages, the model's chat template, and which tokens carry loss.

A conversation is rendered with the tokenizer's chat template and tokenised once; the loss
falls only on what the model itself must produce: each assistant turn's content and the
end-of-turn token(s) that close it (``<|im_end|>`` in ChatML), never the role header the
template puts before it (``<|im_start|>assistant\\n``, the generation prompt), nor the
whitespace a template writes after the end-of-turn token (a model stops generating at that
token, so it never produces the newline).

A template with ``{% generation %}`` markers says itself which tokens the assistant wrote, and
is read through ``return_assistant_tokens_mask``. Otherwise the turns are found in the one
render of the whole conversation (:mod:`~lightning_moe.data.chat_spans`: render again with
placeholders for the contents, read the turn boundaries from the template's own text, map them
back), which works for templates whose prefix renders are not prefixes of the whole (reasoning
kept only after the last user turn, an EOS at the end of the conversation, the system prompt in
the last user turn). The tokens with at least one character in a turn are labelled, found
through the fast tokenizer's offset mapping (a token that straddles the header and the content,
like ``" 19"`` after a header ending in a space, carries content, so it is labelled).

Examples that cannot teach anything are skipped and counted, each reason its own
:class:`SkippedExample`: no assistant turn, an empty assistant turn, a conversation the template
itself rejects (``raise_exception`` on roles that do not alternate). A template that drops or
repeats an assistant turn's content is refused (``ConfigError``).

:func:`synthetic_chat` makes a small offline conversation set from a seed (arithmetic,
copying, reversing and upper-casing words) whose answers follow from the prompt, so a tiny
model's validation loss falls within a few dozen steps (the offline recipe's test checks it).
"""

from __future__ import annotations

import os
import random
import re
from typing import Any

import numpy as np

from lightning_moe.data.chat_spans import assistant_spans
from lightning_moe.errors import ConfigError

ROLES = ("system", "user", "assistant", "tool")
# ShareGPT's "from" values (a "conversations" column of {from, value}) and the roles they mean.
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "tool": "tool", "function_call": "assistant", "observation": "tool"}
_GENERATION_MARKER = re.compile(r"{%-?\s*generation\s*-?%}")


class SkippedExample(ValueError):
    """An example that is skipped and counted rather than refused; ``reason`` completes "N examples ..."."""

    reason = "skipped"


class NoAssistantTurn(SkippedExample):
    """An example without an assistant turn: nothing to learn from."""

    reason = "with no assistant turn"


class EmptyAssistantTurn(SkippedExample):
    """An assistant turn with no content: it would teach the model to end its turn at once."""

    reason = "with an empty assistant turn"


class TemplateRejected(SkippedExample):
    """A conversation the chat template itself rejects (its ``raise_exception``, e.g. roles out of order)."""

    reason = "that the chat template rejects"


def load_chat_tokenizer(spec: str, chat_template: str | None = None) -> Any:
    """A ``transformers`` fast tokenizer from a folder, a ``tokenizer.json`` or a Hub name.

    ``chat_template``, when given, replaces the tokenizer's own template; it is a Jinja
    string or the path of a file holding one.
    """
    if not isinstance(spec, str) or not spec:
        raise ConfigError(f"data.tokenizer must be a tokenizer folder, tokenizer.json or Hub name, got {spec!r}")
    from lightning_moe.data.tokenizers import load_transformers_tokenizer

    tokenizer = load_transformers_tokenizer(spec)
    if chat_template is not None:
        if not isinstance(chat_template, str) or not chat_template.strip():
            raise ConfigError(f"data.chat_template must be a Jinja template string or file, got {chat_template!r}")
        template_file = os.path.expanduser(chat_template)
        if "{" not in chat_template and os.path.isfile(template_file):
            with open(template_file, encoding="utf-8") as fh:
                chat_template = fh.read()
        tokenizer.chat_template = chat_template
    return tokenizer


def messages_of(example: dict[str, Any], field: str) -> list[dict[str, str]]:
    """The example's conversation as ``[{"role", "content"}, ...]`` (ShareGPT's ``{from, value}`` accepted)."""
    turns = example.get(field)
    if not isinstance(turns, (list, tuple)) or not turns:
        raise ConfigError(f"data.messages_field={field!r}: expected a non-empty list of messages, got {turns!r:.80}")
    messages = []
    for turn in turns:
        if not isinstance(turn, dict):
            raise ConfigError(f"data.messages_field={field!r}: a message must be a mapping, got {turn!r:.80}")
        if "role" in turn:
            role, content = turn.get("role"), turn.get("content")
        else:
            role, content = SHAREGPT_ROLES.get(turn.get("from"), turn.get("from")), turn.get("value")
        if role not in ROLES:
            raise ConfigError(
                f"data.messages_field={field!r}: unknown role {role!r}; valid roles are {list(ROLES)}"
                f" (or ShareGPT 'from' values {sorted(SHAREGPT_ROLES)})"
            )
        messages.append({"role": role, "content": "" if content is None else str(content)})
    if not any(m["role"] == "assistant" for m in messages):
        raise NoAssistantTurn("no assistant turn")
    return messages


def tokenize_chat(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of the rendered conversation and, per token, whether it is an assistant token.

    Raises :class:`EmptyAssistantTurn` or :class:`TemplateRejected` for an example to skip, and
    ``ConfigError`` for a template that is not Jinja or whose assistant turns cannot be found.
    """
    for i, message in enumerate(messages):
        if message["role"] == "assistant" and not message["content"].strip():
            raise EmptyAssistantTurn(f"assistant message {i} is empty")
    if _GENERATION_MARKER.search(str(tokenizer.chat_template or "")):
        out = _render(tokenizer, messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        return np.asarray(out["input_ids"], dtype=np.int64), np.asarray(out["assistant_masks"], dtype=bool)
    text = _render(tokenizer, messages, tokenize=False)
    spans = assistant_spans(tokenizer, messages, text)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = np.asarray(encoding["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    mask = np.zeros(len(offsets), dtype=bool)
    for begin, end in spans:
        mask |= (offsets[:, 0] < end) & (offsets[:, 1] > begin)
    return np.asarray(encoding["input_ids"], dtype=np.int64), mask


def _render(tokenizer: Any, messages: list[dict[str, str]], **kwargs: Any) -> Any:
    """``apply_chat_template(messages, **kwargs)``; :class:`TemplateRejected` when the template raises."""
    import jinja2

    try:
        return tokenizer.apply_chat_template(messages, **kwargs)
    except jinja2.TemplateSyntaxError as err:
        raise ConfigError(f"data.chat_template is not a valid Jinja template: {err.message} (line {err.lineno})") from None
    except jinja2.TemplateError as err:
        raise TemplateRejected(f"the chat template rejects the conversation: {err}") from None


# ----------------------------------------------------------------- synthetic conversations

_WORDS = (
    "apple river stone cloud tiger paper green house light music water table night bread horse chair"
    " dream field glass honey ocean piano quiet robot smile train under violet winter yellow zebra"
).split()


def synthetic_chat(num_examples: int, seed: int) -> list[list[dict[str, str]]]:
    """``num_examples`` conversations drawn from ``seed``: small tasks with one right answer.

    Tasks: adding two numbers below 50, copying, reversing and upper-casing a word from a
    fixed list of 32. A quarter of the conversations carry a system message and a quarter
    have two exchanges, so multi-turn masking is exercised too.
    """
    rng = random.Random(seed)

    def exchange() -> list[dict[str, str]]:
        task = rng.randrange(4)
        if task == 0:
            a, b = rng.randrange(50), rng.randrange(50)
            question, answer = f"What is {a} + {b}?", str(a + b)
        else:
            word = rng.choice(_WORDS)
            question, answer = [
                (f"Repeat the word: {word}", word),
                (f"Reverse the word: {word}", word[::-1]),
                (f"Write in capitals: {word}", word.upper()),
            ][task - 1]
        return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]

    conversations = []
    for _ in range(num_examples):
        messages = [{"role": "system", "content": "Answer with the result only."}] if rng.random() < 0.25 else []
        messages += exchange()
        if rng.random() < 0.25:
            messages += exchange()
        conversations.append(messages)
    return conversations
