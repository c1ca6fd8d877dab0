"""Assistant tokens under chat templates with the properties of released ones (written here, not copied).

Each template reproduces one property that breaks prefix renders or the end of a turn:
reasoning blocks only after the last user turn (Qwen3), an EOS that only the whole
conversation ends with (Phi-3.5-MoE), the system prompt folded into the first (Gemma) or the
last (Mistral v3) user turn with strict alternation through ``raise_exception``, an end of
turn made of two tokens (Command-A), ``{% generation %}`` markers. The expected supervised
text of every turn is written out by hand from the template's definition.
"""

import json

import numpy as np
import pytest

pytest.importorskip("transformers")

from lightning_moe.data.chat import (
    EmptyAssistantTurn,
    NoAssistantTurn,
    SkippedExample,
    TemplateRejected,
    messages_of,
    tokenize_chat,
)
from lightning_moe.data.posttrain import PostTrainDataModule
from lightning_moe.errors import ConfigError
from lightning_moe.hf.tiny import CHATML_TEMPLATE, build_tokenizer

END = "<|im_end|>"
EOS = "<|endoftext|>"  # the tiny tokenizer's BOS and EOS
ADDED = ["<think>", "</think>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<start_of_turn>",
         "<end_of_turn>", "[INST]", "[/INST]", "<|START_OF_TURN|>", "<|END_OF_TURN|>", "<|SYSTEM|>", "<|USER|>",
         "<|CHATBOT|>", "<|START_RESPONSE|>", "<|END_RESPONSE|>"]

# Reasoning moved out of a leading <think>...</think> and stripped; written only for assistant
# turns after the last user turn (always for the last message, possibly empty).
REASONING = r"""
{%- set ns = namespace(last_user=-1) -%}
{%- for m in messages -%}{%- if m['role'] == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}{%- endfor -%}
{%- for m in messages -%}
  {%- if m['role'] == 'assistant' -%}
    {%- set answer = m['content'] -%}{%- set thought = '' -%}
    {%- if '</think>' in answer -%}
      {%- set thought = answer.split('</think>')[0].split('<think>')[-1].strip() -%}
      {%- set answer = answer.split('</think>')[-1].strip() -%}
    {%- endif -%}
    {{- '<|im_start|>assistant\n' -}}
    {%- if loop.index0 > ns.last_user and (loop.last or thought) -%}{{- '<think>\n' + thought + '\n</think>\n\n' -}}{%- endif -%}
    {{- answer + '<|im_end|>\n' -}}
  {%- else -%}
    {{- '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}
"""

# Every turn ends in <|end|>; the conversation ends in the EOS, which a prefix never has at that place.
# An empty system message is left out.
EOS_AT_END = r"""
{%- for m in messages -%}{%- if m['role'] != 'system' or m['content'] -%}
  {{- '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' -}}
{%- endif -%}{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|assistant|>\n' -}}{%- else -%}{{- eos_token -}}{%- endif -%}
"""

_ALTERNATE = (
    "{%- if (m['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') -}}{%- endif -%}"
)
_SPLIT_SYSTEM = (
    "{%- if messages[0]['role'] == 'system' -%}{%- set system = messages[0]['content'] -%}"
    "{%- set turns = messages[1:] -%}{%- else -%}{%- set system = '' -%}{%- set turns = messages -%}{%- endif -%}"
)

# No system role: the system prompt opens the first user turn; contents trimmed; the assistant is "model".
SYSTEM_IN_FIRST_USER = _SPLIT_SYSTEM + r"""
{{- bos_token -}}
{%- for m in turns -%}
""" + _ALTERNATE + r"""
  {%- set role = 'model' if m['role'] == 'assistant' else m['role'] -%}
  {%- set preamble = system + '\n\n' if system and loop.first else '' -%}
  {{- '<start_of_turn>' + role + '\n' + preamble + m['content'] | trim + '<end_of_turn>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<start_of_turn>model\n' -}}{%- endif -%}
"""

# The system prompt goes into the last user turn; no generation prompt; assistant turns end in the EOS.
SYSTEM_IN_LAST_USER = _SPLIT_SYSTEM + r"""
{%- set ns = namespace(last_user=-1) -%}
{%- for m in turns -%}{%- if m['role'] == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}{%- endfor -%}
{{- bos_token -}}
{%- for m in turns -%}
""" + _ALTERNATE + r"""
  {%- if m['role'] == 'user' -%}
    {{- '[INST] ' + (system + '\n\n' if system and loop.index0 == ns.last_user else '') + m['content'] + '[/INST]' -}}
  {%- else -%}
    {{- ' ' + m['content'] + eos_token -}}
  {%- endif -%}
{%- endfor -%}
"""

# The model ends its turn with two tokens, and opens its response with a token of its own.
TWO_TOKEN_END = r"""
{%- for m in messages -%}
  {{- '<|START_OF_TURN|>' + {'system': '<|SYSTEM|>', 'user': '<|USER|>', 'assistant': '<|CHATBOT|>'}[m['role']] -}}
  {%- if m['role'] == 'assistant' -%}{{- '<|START_RESPONSE|>' + m['content'] + '<|END_RESPONSE|>' -}}
  {%- else -%}{{- m['content'] -}}{%- endif -%}
  {{- '<|END_OF_TURN|>' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|START_OF_TURN|><|CHATBOT|>' -}}{%- endif -%}
"""

# Generation markers around the content only: they are preferred, so the end-of-turn token is not labelled.
MARKED = r"""
{%- for m in messages -%}
  {%- if m['role'] == 'assistant' -%}{{- 'A: ' -}}{% generation %}{{- m['content'] -}}{% endgeneration %}{{- '<|im_end|>\n' -}}
  {%- else -%}{{- m['role'] + ': ' + m['content'] + '<|im_end|>\n' -}}{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- 'A: ' -}}{%- endif -%}
"""

SYSTEM = "Answer briefly and kindly."


def answer(k):
    return f"Fact {k}: water is wet."


def thought(k):
    return f"I recall fact {k}."


def question(k):
    return f"Tell me fact number {k}, please."


# template: (assistant content given turn k, expected supervised text of turn k of n (1-based))
CASES = {
    "chatml": (CHATML_TEMPLATE, answer, lambda k, n: answer(k) + END),
    # Reasoning given as "<think>...</think>" without the newlines the template writes; past turns lose it.
    "reasoning": (REASONING, lambda k: f"<think>{thought(k)}</think>{answer(k)}",
                  lambda k, n: (f"<think>\n{thought(k)}\n</think>\n\n" if k == n else "") + answer(k) + END),
    "reasoning_absent": (REASONING, answer,
                         lambda k, n: ("<think>\n\n</think>\n\n" if k == n else "") + answer(k) + END),
    "eos_at_end": (EOS_AT_END, answer, lambda k, n: answer(k) + "<|end|>"),
    "system_in_first_user": (SYSTEM_IN_FIRST_USER, lambda k: f"  {answer(k)}\n",
                             lambda k, n: answer(k) + "<end_of_turn>"),
    "system_in_last_user": (SYSTEM_IN_LAST_USER, answer, lambda k, n: answer(k) + EOS),
    "two_token_end": (TWO_TOKEN_END, answer,
                      lambda k, n: "<|START_RESPONSE|>" + answer(k) + "<|END_RESPONSE|><|END_OF_TURN|>"),
    "generation_markers": (MARKED, answer, lambda k, n: answer(k)),
}


@pytest.fixture(scope="module")
def tok():
    tokenizer = build_tokenizer(400)
    tokenizer.add_tokens(ADDED, special_tokens=True)
    return tokenizer


def supervised_runs(tok, ids, mask):
    """The decoded text of each maximal run of labelled tokens."""
    runs, start = [], None
    for i, labelled in enumerate(list(mask) + [False]):
        if labelled and start is None:
            start = i
        elif not labelled and start is not None:
            runs.append(tok.decode(ids[start:i].tolist()))
            start = None
    return runs


def conversation(turns, system, content):
    messages = [{"role": "system", "content": SYSTEM}] if system else []
    for k in range(1, turns + 1):
        messages += [{"role": "user", "content": question(k)}, {"role": "assistant", "content": content(k)}]
    return messages


@pytest.mark.parametrize("case", sorted(CASES))
def test_supervised_tokens_are_each_assistant_turn_and_its_end_of_turn(tok, case):
    template, content, expected = CASES[case]
    tok.chat_template = template
    for turns in range(1, 5):
        for system in (False, True):
            messages = conversation(turns, system, content)
            ids, mask = tokenize_chat(tok, messages)
            text = tok.apply_chat_template(messages, tokenize=False)
            assert tok.decode(ids.tolist()) == text  # the ids are the one render, tokenised
            runs = supervised_runs(tok, ids, mask)
            assert len(runs) == turns, (turns, system, runs)
            for k, run in enumerate(runs, 1):
                # A token straddling the header and the content carries content, so it is labelled.
                want = expected(k, turns)
                assert run.endswith(want) and not run[: -len(want)].strip(), (turns, system, k, run)
            supervised = "".join(runs)
            assert "fact number" not in supervised and SYSTEM not in supervised


def test_reasoning_is_kept_on_every_turn_after_the_last_user_turn(tok):
    tok.chat_template = REASONING
    messages = [
        {"role": "user", "content": question(1)},
        {"role": "assistant", "content": f"<think>\n{thought(1)}\n</think>\n\n{answer(1)}"},
        {"role": "tool", "content": "tool output 42"},
        {"role": "assistant", "content": f"<think>{thought(2)}</think>{answer(2)}"},
    ]
    ids, mask = tokenize_chat(tok, messages)
    assert supervised_runs(tok, ids, mask) == [
        f"<think>\n{thought(k)}\n</think>\n\n{answer(k)}{END}" for k in (1, 2)
    ]


def test_an_empty_message_the_template_leaves_out_is_left_out_of_the_placeholder_render_too(tok):
    tok.chat_template = EOS_AT_END
    messages = [{"role": "system", "content": ""}] + conversation(2, False, answer)
    ids, mask = tokenize_chat(tok, messages)
    assert supervised_runs(tok, ids, mask) == [answer(k) + "<|end|>" for k in (1, 2)]


def test_content_that_repeats_the_templates_own_text_is_found_in_place(tok):
    tok.chat_template = CHATML_TEMPLATE
    tricky = "<|im_start|>assistant\nnot a header"
    messages = [{"role": "user", "content": tricky}, {"role": "assistant", "content": tricky + " either"}]
    ids, mask = tokenize_chat(tok, messages)
    assert supervised_runs(tok, ids, mask) == [tricky + " either" + END]


def test_examples_the_template_rejects_or_with_an_empty_turn_are_skipped_with_a_reason(tok):
    tok.chat_template = SYSTEM_IN_LAST_USER
    two_users = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                 {"role": "assistant", "content": "c"}]
    with pytest.raises(TemplateRejected, match="roles must alternate") as rejected:
        tokenize_chat(tok, two_users)
    empty = [{"role": "user", "content": "a"}, {"role": "assistant", "content": " \n"}]
    with pytest.raises(EmptyAssistantTurn) as emptied:
        tokenize_chat(tok, empty)
    with pytest.raises(NoAssistantTurn) as nothing:
        messages_of({"messages": [{"role": "user", "content": "a"}]}, "messages")
    reasons = {err.value.reason for err in (rejected, emptied, nothing)}
    assert len(reasons) == 3 and all(issubclass(c, SkippedExample) for c in (TemplateRejected, EmptyAssistantTurn))


@pytest.mark.parametrize("template, match", [
    ("{% for m in messages %}{% if loop.last %}{{ m['content'] }}{% else %}<{{ m['role'] }}>{% endif %}{% endfor %}",
     r"data.chat_template: the template does not render the content of assistant message 1 "),
    ("{% for m in messages %}{{ m['content'] + '|' + m['content'] }}<|im_end|>{% endfor %}",
     r"data.chat_template: the template renders the content of assistant message 1 \(.*\) 2 times"),
    ("{% for m in messages %}{{ m['content'] }", r"data.chat_template is not a valid Jinja template: .*line 1"),
    # Its own text depends on the content (here: whether it is ASCII, which the placeholders are not).
    (("{% for m in messages %}{% if not m['content'].isascii() %}<|im_start|>{% endif %}{{ m['content'] }}"
      "<|im_end|>{% endfor %}"), r"data.chat_template: the template's text '<\|im_start\|>' near message 0 is missing from its"),
])
def test_a_template_whose_turns_cannot_be_found_is_refused_in_one_line(tok, template, match):
    tok.chat_template = template
    with pytest.raises(ConfigError, match=match) as info:
        tokenize_chat(tok, conversation(2, False, answer))
    assert "\n" not in str(info.value)


def test_a_template_that_rejects_the_probe_ends_turns_at_the_first_added_token(tok):
    # The probe conversation has no system message, which this template refuses, so its end of
    # turn is read as the first added token after the content (and the turn starts at the content).
    tok.chat_template = (
        "{% if messages[0]['role'] != 'system' %}{{ raise_exception('a system message must come first') }}{% endif %}"
        + CHATML_TEMPLATE
    )
    for turns in (1, 3):
        ids, mask = tokenize_chat(tok, conversation(turns, True, answer))
        assert supervised_runs(tok, ids, mask) == [answer(k) + END for k in range(1, turns + 1)]


def test_the_data_module_counts_skipped_examples_by_reason(tmp_path, tok):
    folder = tmp_path / "tok"
    tok.chat_template = SYSTEM_IN_LAST_USER
    tok.save_pretrained(folder)
    good = conversation(2, True, answer)
    rows = [good] * 3 + [
        [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}],
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}],
        [{"role": "user", "content": "a"}],
        [{"role": "user", "content": "a"}],
    ]
    source = tmp_path / "chat.jsonl"
    source.write_text("".join(json.dumps({"messages": r}) + "\n" for r in rows))
    dm = PostTrainDataModule(source=str(source), tokenizer=str(folder), seq_len=64, val_fraction=0.01,
                             max_skipped_fraction=0.6)
    with pytest.warns(UserWarning, match=r"skipped 4 of 7 examples: 2 with no assistant turn \(first: train example 5\)"
                      ) as warned:
        dm.setup("fit")
    message = str(warned[0].message)
    assert "1 with an empty assistant turn (first: " in message and "1 that the chat template rejects (first: " in message
    assert dm.skipped_examples == 4

    dropping = "{% for m in messages %}{% if loop.last %}{{ m['content'] }}{% else %}<{{ m['role'] }}>{% endif %}{% endfor %}"
    with pytest.raises(ConfigError, match=r"assistant message 2 .*\(train example \d\)$"):
        PostTrainDataModule(source=str(source), tokenizer=str(folder), chat_template=dropping, seq_len=16,
                            val_fraction=0.01).setup("fit")


def test_labels_do_not_depend_on_the_sentinels_chosen(tok):
    # Content holding the span finder's own placeholder text is still found in place.
    tok.chat_template = TWO_TOKEN_END
    from lightning_moe.data import chat_spans

    sneaky = chat_spans.sentinel("", 0) + " and " + chat_spans.sentinel("", 1)
    messages = [{"role": "user", "content": sneaky}, {"role": "assistant", "content": sneaky}]
    ids, mask = tokenize_chat(tok, messages)
    assert supervised_runs(tok, ids, mask) == ["<|START_RESPONSE|>" + sneaky + "<|END_RESPONSE|><|END_OF_TURN|>"]
    assert np.asarray(mask).dtype == bool
