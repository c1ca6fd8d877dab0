"""Where each assistant turn lies in the one render of a whole conversation.

Released chat templates do not render a conversation's prefixes as prefixes of the whole:
Qwen3 writes a reasoning block only on assistant turns after the last user message, Phi-3.5-MoE
ends a conversation (not a turn) with the EOS token, Mistral v3 puts the system prompt into the
last user turn. So the turns are found in the one render of the whole conversation:

1. **Sentinels.** The conversation is rendered a second time with each message's content
   replaced by a unique placeholder (:func:`sentinel`). The text between placeholders is the
   template's own scaffolding; an assistant placeholder that is missing (or appears twice)
   means the template drops (or repeats) that turn's content, which is refused.
2. **Turn boundaries, read from the scaffolding.** An assistant turn is what the model
   generates after the generation prompt: it begins where the template's *header* ends (the
   text ``add_generation_prompt=True`` appends, e.g. ``<|im_start|>assistant\\n``, found as
   its last occurrence in the scaffolding just before the placeholder, with the whitespace
   after it; when the template has no generation prompt, at the content) and ends after the
   **end of turn**. The end of turn is what the template writes after an assistant's
   content whether a user turn follows or the conversation ends: the common start of the
   two, read once per template from a probe conversation, cut between added tokens or words
   and without trailing whitespace (``<|im_end|>`` in ChatML; ``<|end|>`` in Phi-3.5, not
   the EOS that ends the whole conversation; both tokens of a two-token end like Command-A's
   ``<|END_RESPONSE|><|END_OF_TURN_TOKEN|>``). A model stops at that token, so it never
   generates the newline after it. Where the probe cannot tell (the template rejects it),
   the end of turn runs up to and including the first added token after the content.
   Everything between header and end of turn is supervised, scaffolding the template writes
   inside the turn included: Qwen3's ``<think>...</think>`` block, empty or not, or an
   opening token like Command-A's ``<|START_RESPONSE|>``.
3. **Mapping back.** The scaffolding is split into pieces (at added tokens, whitespace runs
   and the turn boundaries) and the pieces are found in the real render in order. Each
   placeholder stands for its content: taken verbatim when the render holds it there,
   otherwise (a template that strips it or moves a reasoning block out of it) as whatever
   lies before the next piece of scaffolding. The real render may hold text between pieces
   that the placeholder render lacks (Qwen3's reasoning, which the template writes only when
   the content has some) and may lack whitespace the placeholder render has; pieces are never
   reordered. So a turn whose reasoning the template drops (Qwen3's turns before the last
   user message) is supervised as the render holds it: its answer only.

The cost is two renders per conversation and a template's probe once, where comparing
prefix renders took about two per assistant turn.
"""

from __future__ import annotations

import itertools
import os
import re
import weakref
from dataclasses import dataclass
from typing import Any

from lightning_moe.errors import ConfigError

_FIX = ("\u2063LMOE", "\u2063")  # an invisible separator keeps the placeholder clear of real text
_REFUSAL_HINT = "use a template that renders every assistant message's content once, or one with {% generation %} markers"


def sentinel(tag: str, index: int) -> str:
    """The placeholder for message ``index``'s content; ``tag`` keeps it out of the real text."""
    return f"{_FIX[0]}{tag}#{index}{_FIX[1]}"


@dataclass(frozen=True)
class TemplateTurns:
    """What a chat template writes around an assistant turn, read once from a probe conversation."""

    header: str  # appended by add_generation_prompt=True (the assistant turn's opening), whitespace stripped
    end_of_turn: str | None  # what closes an assistant turn; None: the probe could not tell
    splitter: re.Pattern[str]  # added tokens and whitespace runs: where scaffolding is cut into pieces


_TURNS: weakref.WeakKeyDictionary[Any, tuple[str, TemplateTurns]] = weakref.WeakKeyDictionary()


def template_turns(tokenizer: Any) -> TemplateTurns:
    """The tokenizer's :class:`TemplateTurns` for its current chat template (cached per tokenizer)."""
    template = tokenizer.chat_template
    cached = _TURNS.get(tokenizer)
    if cached is not None and cached[0] == template:
        return cached[1]
    # Only added tokens the template can write (its own text, or a special token it reads as a variable such as
    # eos_token): tokenizers with thousands of reserved tokens would otherwise make every split slow.
    specials = set(getattr(tokenizer, "all_special_tokens", ()))
    text = str(template or "")  # a dict of named templates holds its texts in its str
    tokens = sorted((t for t in tokenizer.get_added_vocab() if t and (t in text or t in specials)), key=len,
                    reverse=True)
    splitter = re.compile("|".join([re.escape(t) for t in tokens] + [r"\s+"]))
    turns = TemplateTurns(*_probe(tokenizer, splitter), splitter)
    _TURNS[tokenizer] = (template, turns)
    return turns


def _probe(tokenizer: Any, splitter: re.Pattern[str]) -> tuple[str, str | None]:
    """The header and the end of turn the template writes, from a user/assistant/user/assistant probe."""
    probe = [{"role": r, "content": sentinel("", i)} for i, r in enumerate(("user", "assistant") * 2)]
    try:
        plain, prompted = (tokenizer.apply_chat_template(probe[:1], tokenize=False, add_generation_prompt=flag)
                           for flag in (False, True))
        shape = tokenizer.apply_chat_template(probe, tokenize=False)
    except Exception:  # noqa: BLE001 - a template that rejects the probe: no header, the added-token rule
        return "", None
    # Past a conversation-final EOS; stripped, as templates without whitespace control indent it.
    header = prompted[_common_start(plain, prompted, splitter):].strip()
    followed = _between(shape, sentinel("", 1), sentinel("", 2))
    last = _between(shape, sentinel("", 3), None)
    if followed is None or last is None:
        return header, None
    return header, followed[:_common_start(followed, last, splitter)].rstrip()


def _common_start(a: str, b: str, splitter: re.Pattern[str]) -> int:
    """Length of the common start of ``a`` and ``b``, never ending inside an added token or a word.

    ``"<|end|>\\n<|user|>"`` and ``"<|end|>\\n<|endoftext|>"`` share ``"<|end|>\\n"``, not ``"<|end|>\\n<|"``;
    where one string is a start of the other, it is the common start whole.
    """
    common = len(os.path.commonprefix([a, b]))
    if common in (len(a), len(b)):
        return common
    bounds = [0] + [edge for match in splitter.finditer(a) for edge in match.span()]
    return max(edge for edge in bounds if edge <= common)


def _between(text: str, after: str, before: str | None) -> str | None:
    start = text.find(after)
    if start < 0 or text.count(after) != 1:
        return None
    start += len(after)
    end = len(text) if before is None else text.find(before, start)
    return None if end < 0 else text[start:end]


def assistant_spans(tokenizer: Any, messages: list[dict[str, str]], text: str) -> list[tuple[int, int]]:
    """Character ranges in ``text`` (the render of ``messages``) of the assistant turns, in order.

    Raises ``ConfigError`` naming the assistant message that cannot be found.
    """
    turns = template_turns(tokenizer)
    tag = _free_tag(text, messages)
    # An empty content stays empty: templates that skip empty messages (Phi-3.5's system) must skip them here too.
    placeholders = [{**m, "content": sentinel(tag, i) if m["content"] else ""} for i, m in enumerate(messages)]
    try:
        shape = tokenizer.apply_chat_template(placeholders, tokenize=False)
    except Exception as err:  # noqa: BLE001 - the template reads the contents themselves
        raise ConfigError(
            f"data.chat_template: the template renders this conversation but not with its contents replaced"
            f" ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}), so the assistant turns"
            f" cannot be found; {_REFUSAL_HINT}"
        ) from None
    found = re.compile(re.escape(_FIX[0] + tag) + r"#(\d+)" + re.escape(_FIX[1]))
    literals, slots = [], []  # shape = literals[0] slot[0] literals[1] slot[1] ... literals[-1]
    position = 0
    for match in found.finditer(shape):
        literals.append(shape[position:match.start()])
        slots.append(int(match.group(1)))
        position = match.end()
    literals.append(shape[position:])
    assistants = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    for i in assistants:
        if slots.count(i) != 1:
            verb, times = ("does not render", "") if i not in slots else ("renders", f" {slots.count(i)} times")
            raise ConfigError(
                f"data.chat_template: the template {verb} the content of assistant message {i}"
                f" ({messages[i]['content']!r:.40}){times}, so its tokens cannot be found in the render; {_REFUSAL_HINT}"
            )
    # Turn boundaries as (literal index, offset in that literal).
    cuts: dict[int, set[int]] = {k: set() for k in range(len(literals))}
    bounds = []
    for i in assistants:
        k = slots.index(i)
        before, after = literals[k], literals[k + 1]
        start = _header_end(before, turns.header)
        bounds.append(((k, start), (k + 1, _end_of_turn(after, turns))))
        cuts[k].add(start)
        cuts[k + 1].add(bounds[-1][1][1])
    where = _map_back(text, literals, slots, messages, cuts, turns.splitter)
    return [(where[begin], where[end]) for begin, end in bounds]


def _free_tag(text: str, messages: list[dict[str, str]]) -> str:
    """A tag that makes the placeholders occur nowhere in the render or the contents."""
    tag = ""
    while any(_FIX[0] + tag + "#" in s for s in [text] + [m["content"] for m in messages]):
        tag += "x"
    return tag


def _header_end(before: str, header: str) -> int:
    """Where the last header in ``before`` (the scaffolding before an assistant's content) ends, with the
    whitespace after it; at the content when there is no header."""
    start = before.rfind(header) if header else -1
    if start < 0:
        return len(before)
    end = start + len(header)
    return end + len(before[end:]) - len(before[end:].lstrip())


def _end_of_turn(after: str, turns: TemplateTurns) -> int:
    """Length of the end of turn at the start of ``after``, the scaffolding after an assistant's content."""
    if turns.end_of_turn is not None and after.startswith(turns.end_of_turn):
        return len(turns.end_of_turn)
    for match in turns.splitter.finditer(after):
        if not match.group().isspace():
            return match.end()
    return 0


def _map_back(text: str, literals: list[str], slots: list[int], messages: list[dict[str, str]],
              cuts: dict[int, set[int]], splitter: re.Pattern[str]) -> dict[tuple[int, int], int]:
    """Position in ``text`` of each cut (literal index, offset) of the placeholder render."""
    pieces = [_pieces(literal, cuts[k], splitter) for k, literal in enumerate(literals)]
    where: dict[tuple[int, int], int] = {}
    position = 0
    for k, literal_pieces in enumerate(pieces):
        offset = 0
        where[(k, 0)] = position
        for piece in literal_pieces:
            if text.startswith(piece, position):
                position += len(piece)
            elif not piece.isspace():  # text the placeholder render lacks comes first (a reasoning block)
                found = text.find(piece, position)
                if found < 0:
                    i = slots[k - 1] if k else slots[0] if slots else 0
                    raise ConfigError(
                        f"data.chat_template: the template's text {piece!r:.40} near message {i} is missing from"
                        " its render of the conversation (it writes its own text differently for these contents),"
                        " so the assistant turns cannot be found; use a template with {% generation %} markers"
                    )
                position = found + len(piece)
            offset += len(piece)
            where[(k, offset)] = position
        if k < len(slots):
            position = _slot_end(text, position, messages[slots[k]]["content"], pieces[k + 1:])
    return where


def _pieces(literal: str, cuts: set[int], splitter: re.Pattern[str]) -> list[str]:
    bounds = set(cuts) | {0, len(literal)}
    for match in splitter.finditer(literal):
        bounds.update(match.span())
    bounds = sorted(bounds)
    return [literal[a:b] for a, b in itertools.pairwise(bounds) if b > a]


def _slot_end(text: str, position: int, content: str, following: list[list[str]]) -> int:
    """Where a message's content ends in ``text``: verbatim if it is there, else before the next scaffolding."""
    rest = (piece for literal_pieces in following for piece in literal_pieces)
    first = next(rest, None)
    if text.startswith(content, position):
        after = position + len(content)
        adjacent = bool(following) and not following[0]  # the next message's content follows at once
        if first is None or adjacent or first.isspace() or text.startswith(first, after):
            return after
    solid = first if first is not None and not first.isspace() else next((p for p in rest if not p.isspace()), None)
    if solid is None:
        return len(text.rstrip())
    found = text.find(solid, position)
    return position if found < 0 else found
