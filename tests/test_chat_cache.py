"""PostTrainDataModule's token cache (built once, reopened, rebuilt when its inputs change) and its skip report."""

import json
import multiprocessing
import os
import re

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from lightning_moe.data import chat_examples  # noqa: E402
from lightning_moe.data.chat import tokenize_chat  # noqa: E402
from lightning_moe.data.posttrain import PostTrainDataModule  # noqa: E402
from lightning_moe.errors import ConfigError  # noqa: E402
from lightning_moe.hf.tiny import build_tokenizer  # noqa: E402

# ChatML that refuses roles out of order, as released templates do with raise_exception.
STRICT_TEMPLATE = (
    "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SEQ_LEN = 40


def chat(question, answer):
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(400).save_pretrained(folder)
    return str(folder)


def write_jsonl(path, conversations):
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in conversations))
    return str(path)


def rows(dataset):
    return [tuple(t.tolist() for t in dataset[i]) for i in range(len(dataset))]


def test_second_setup_reopens_the_cache_without_tokenising(tmp_path, tokenizer_dir, monkeypatch):
    first = PostTrainDataModule(tokenizer=tokenizer_dir, seq_len=32, max_examples=80, cache_dir=tmp_path)
    first.prepare_data()
    first.setup("fit")
    assert not first.loaded_from_cache

    def no_tokenising(*args, **kwargs):
        raise AssertionError("tokenised again")

    monkeypatch.setattr(chat_examples, "tokenize_chat", no_tokenising)
    again = PostTrainDataModule(tokenizer=tokenizer_dir, seq_len=32, max_examples=80, cache_dir=tmp_path)
    again.setup("fit")  # another rank: no prepare_data
    assert again.loaded_from_cache and again.cache_path == first.cache_path
    assert rows(again.train_dataset) == rows(first.train_dataset)
    assert rows(again.val_dataset) == rows(first.val_dataset)


@pytest.mark.parametrize("change", ["seq_len", "packing", "chat_template", "source_file", "format"])
def test_what_the_rows_depend_on_is_in_the_key(tmp_path, tokenizer_dir, change):
    source = write_jsonl(tmp_path / "chat.jsonl", [chat(f"Say {i}", f"{i}") for i in range(10)])
    args = dict(source=source, tokenizer=tokenizer_dir, seq_len=32, cache_dir=tmp_path / "cache")
    before = PostTrainDataModule(**args)
    before.setup("fit")
    if change == "source_file":
        write_jsonl(tmp_path / "chat.jsonl", [chat(f"Say {i}", f"{i}!") for i in range(10)])
    else:
        args[change] = {"seq_len": 24, "packing": False, "chat_template": STRICT_TEMPLATE, "format": "chat"}[change]
    after = PostTrainDataModule(**args)
    after.setup("fit")
    assert after.cache_path != before.cache_path and not after.loaded_from_cache
    if change == "source_file":
        assert "!" in after.tokenizer.decode(after.train_dataset[0][0])


def test_a_damaged_cache_is_rebuilt(tmp_path, tokenizer_dir):
    dm = PostTrainDataModule(tokenizer=tokenizer_dir, seq_len=32, max_examples=40, cache_dir=tmp_path)
    dm.prepare_data()
    dm.setup("fit")
    expected = rows(dm.train_dataset)
    with open(os.path.join(dm.cache_path, "train.targets.bin"), "r+b") as fh:
        fh.seek(10)
        fh.write(b"\x07")
    again = PostTrainDataModule(tokenizer=tokenizer_dir, seq_len=32, max_examples=40, cache_dir=tmp_path)
    with pytest.warns(UserWarning, match="is damaged .*CRC-32.*rebuilding it"):
        again.prepare_data()
    again.setup("fit")
    assert not again.loaded_from_cache and rows(again.train_dataset) == expected


def _build_in_process(tokenizer_dir, cache_dir, results):
    dm = PostTrainDataModule(tokenizer=tokenizer_dir, seq_len=32, max_examples=300, cache_dir=cache_dir)
    dm.prepare_data()
    dm.setup("fit")
    results.put((dm.loaded_from_cache, dm.cache_path, len(dm.train_dataset)))


def test_two_processes_build_the_cache_once(tmp_path, tokenizer_dir):
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    processes = [context.Process(target=_build_in_process, args=(tokenizer_dir, str(tmp_path), results))
                 for _ in range(2)]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=60) for _ in processes]
    for process in processes:
        process.join(timeout=30)
        assert process.exitcode == 0
    assert sorted(loaded for loaded, _, _ in outcomes) == [False, True]  # one built, the other opened its cache
    assert len({(path, n) for _, path, n in outcomes}) == 1
    assert [name for name in os.listdir(tmp_path) if not name.startswith(".")] == [os.path.basename(outcomes[0][1])]


def test_a_hub_dataset_is_keyed_by_its_fingerprint(tmp_path, tokenizer_dir, monkeypatch):
    import datasets

    table = {"messages": [chat(f"Say {i}", f"{i}") for i in range(10)]}

    def hub(self, field, split, builder, files):  # a Hub dataset as load_dataset returns it
        return datasets.Dataset.from_dict(table)

    monkeypatch.setattr(PostTrainDataModule, "_dataset", hub)
    args = dict(source="someone/chats", tokenizer=tokenizer_dir, seq_len=32, cache_dir=tmp_path)
    first = PostTrainDataModule(**args)
    first.setup("fit")
    same = PostTrainDataModule(**args)
    same.setup("fit")
    table["messages"][0] = chat("Say 0", "zero")  # a new revision: other contents, another fingerprint
    changed = PostTrainDataModule(**args)
    changed.setup("fit")
    assert same.loaded_from_cache and same.cache_path == first.cache_path
    assert changed.cache_path != first.cache_path and not changed.loaded_from_cache


def bad_examples(tok):
    """Good conversations, and two each of: roles out of order, an empty assistant turn, a conversation longer
    than SEQ_LEN (kept, truncated), one whose assistant turn starts beyond SEQ_LEN; their source indices."""
    long_answer = " ".join(["apple river stone"] * 12)
    kinds = {
        "that the chat template rejects": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}],
        "with an empty assistant turn": chat("Say nothing", ""),
        "truncated": chat("Say it", long_answer),
        "with no assistant token left within data.seq_len": chat(" ".join(["cloud"] * 60), "ok"),
    }
    bad_at = [3, 7, 13, 17, 23, 27, 33, 37]
    conversations, where = [], {kind: [] for kind in kinds}
    for i in range(40):
        if i in bad_at:
            kind = list(kinds)[bad_at.index(i) % 4]
            where[kind].append(i)
            conversations.append(kinds[kind])
        else:
            conversations.append(chat(f"What is {i} + 1?", str(i + 1)))
    return conversations, where


def test_bad_examples_are_skipped_counted_and_summarised_in_one_line(tmp_path, tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    conversations, where = bad_examples(tok)
    source = write_jsonl(tmp_path / "chat.jsonl", conversations)
    args = dict(source=source, tokenizer=tokenizer_dir, chat_template=STRICT_TEMPLATE, seq_len=SEQ_LEN,
                val_fraction=0.25, cache_dir=tmp_path / "cache")
    held = set(np.random.default_rng(0).permutation(40)[:10].tolist())

    def first(indices):  # training examples come first in the report
        train = [i for i in indices if i not in held]
        return f"train example {min(train)}" if train else f"validation example {min(indices)}"

    # 6 of 40 skipped (15 %): more than the default 10 %, refused in one line.
    with pytest.raises(ConfigError, match=r"skipped 6 of 40 examples: .* more than data.max_skipped_fraction=0.1"
                       ) as info:
        PostTrainDataModule(**args).setup("fit")
    assert "\n" not in str(info.value)

    tok.chat_template = STRICT_TEMPLATE
    ids, labelled = tokenize_chat(tok, conversations[where["truncated"][0]])
    lost = int(labelled[SEQ_LEN + 1 :].sum())  # assistant tokens after the last one a full row predicts
    assert lost > 0
    with pytest.warns(UserWarning) as warned:
        dm = PostTrainDataModule(**args, max_skipped_fraction=0.2)
        dm.setup("fit")
    line = str(next(w.message for w in warned if "skipped" in str(w.message)))
    assert "\n" not in line and "skipped 6 of 40 examples: " in line
    for reason in ("that the chat template rejects", "with an empty assistant turn",
                   "with no assistant token left within data.seq_len"):
        assert f"2 {reason} (first: {first(where[reason])})" in line
    assert f"truncated 2 examples to data.seq_len={SEQ_LEN}, losing {2 * lost} assistant tokens" in line
    assert dm.skipped_examples == 6 and dm.truncated_examples == 2 and dm.truncated_tokens == 2 * lost
    # The truncated conversation is kept: its first SEQ_LEN predictions, as alone.
    targets = [t for i in range(len(dm.train_dataset)) for t in dm.train_dataset[i][1].tolist()]
    kept = ids[1 : SEQ_LEN + 1][labelled[1 : SEQ_LEN + 1]].tolist()
    assert re.search(",".join(map(str, kept)), ",".join(map(str, targets))) or where["truncated"][0] in held
    assert torch.is_tensor(dm.train_dataset[0][2])


def test_worker_processes_give_the_same_cache(tmp_path, tokenizer_dir):
    args = dict(tokenizer=tokenizer_dir, seq_len=32, max_examples=300)
    one = PostTrainDataModule(**args, cache_dir=tmp_path / "one")
    one.setup("fit")
    two = PostTrainDataModule(**args, num_proc=2, cache_dir=tmp_path / "two")
    two.setup("fit")
    assert os.path.basename(one.cache_path) == os.path.basename(two.cache_path)
    assert rows(two.train_dataset) == rows(one.train_dataset) and rows(two.val_dataset) == rows(one.val_dataset)
