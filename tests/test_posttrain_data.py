"""PostTrainDataModule: which tokens carry loss, packing and padding, sources, resume, bad input."""

import json

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from helpers import fit_quietly  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

from lightning_moe.data.chat import synthetic_chat  # noqa: E402
from lightning_moe.data.posttrain import PostTrainDataModule  # noqa: E402
from lightning_moe.errors import ConfigError  # noqa: E402
from lightning_moe.lm_training import CausalLMTraining  # noqa: E402
from lightning_moe.hf.tiny import build_tokenizer  # noqa: E402

IGNORE = -100
END = "<|im_end|>"
# Not ChatML: a user turn is "[INST] ... [/INST]\n", an assistant turn its content and END.
INST_TEMPLATE = (  # transformers renders templates with trim_blocks: newlines as expressions
    "{% for m in messages %}{% if m['role'] == 'user' %}{% if not loop.first %}{{ '\\n' }}{% endif %}"
    "[INST] {{ m['content'] }} [/INST]{{ '\\n' }}{% else %}{{ m['content'] }}<|im_end|>{% endif %}{% endfor %}"
    "{% if not add_generation_prompt %}{{ '\\n' }}{% endif %}"
)
CONVERSATION = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris, of course."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome"},
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(400).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def setup_data(**kwargs):
    dm = PostTrainDataModule(**kwargs)
    dm.setup("fit")
    return dm


def expected_pieces(tok):
    """The conversation's token ids piece by piece and whether each piece carries loss."""
    pieces = [
        ("[INST] What is the capital of France? [/INST]\n", False),
        ("Paris, of course." + END, True),
        ("\n[INST] And of Italy? [/INST]\n", False),
        ("Rome" + END, True),
        ("\n", False),
    ]
    ids, labelled = [], []
    for text, loss in pieces:
        piece = tok(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labelled += [loss] * len(piece)
    return ids, labelled


def test_sft_targets_are_the_assistant_tokens_and_the_loss_their_mean(tmp_path, tokenizer_dir, tok):
    ids, labelled = expected_pieces(tok)
    rendered = tok(tok.apply_chat_template(CONVERSATION, tokenize=False, chat_template=INST_TEMPLATE),
                   add_special_tokens=False)["input_ids"]
    assert rendered == ids  # the pieces tokenise as the whole does, so the expectation is exact
    source = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}] * 2)
    dm = setup_data(source=source, tokenizer=tokenizer_dir, chat_template=INST_TEMPLATE, seq_len=128, packing=False)
    inputs, targets = dm.train_dataset[0]
    n = len(ids) - 1
    assert n < 128
    assert inputs[:n].tolist() == ids[:-1] and (inputs[n:] == tok.pad_token_id).all()
    expected = [t if loss else IGNORE for t, loss in zip(ids[1:], labelled[1:])]
    assert targets.tolist() == expected + [IGNORE] * (128 - n)
    assistant_ids = tok("Paris, of course." + END + "Rome" + END, add_special_tokens=False)["input_ids"]
    assert [t for t in targets.tolist() if t != IGNORE] == assistant_ids

    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Embedding(dm.vocab_size, 16), torch.nn.Linear(16, dm.vocab_size))

    class Module(CausalLMTraining):  # the language models' own loss, over this batch
        def logits(self, batch):
            return model(batch[0])

    loss, num_tokens = Module()._token_loss((inputs[None], targets[None]))
    assert num_tokens == len(assistant_ids)
    logits = model(inputs[None])[0]
    terms = []
    for position in range(n):  # positions whose next token is an assistant token
        if labelled[position + 1]:
            terms.append(-torch.log_softmax(logits[position], -1)[ids[position + 1]])
    assert len(terms) == len(assistant_ids)
    torch.testing.assert_close(loss, torch.stack(terms).mean())


def test_chatml_header_and_trailing_newline_carry_no_loss(tmp_path, tokenizer_dir, tok):
    messages = [{"role": "system", "content": "Be brief."}] + CONVERSATION
    sharegpt = [{"from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]}
                for m in messages]
    rows = [{"messages": messages, "conversations": sharegpt}] * 2
    source = write_jsonl(tmp_path / "chat.jsonl", rows)
    by_role = setup_data(source=source, tokenizer=tokenizer_dir, seq_len=160, packing=False).train_dataset[0]
    by_from = setup_data(source=source, tokenizer=tokenizer_dir, seq_len=160, packing=False,
                         messages_field="conversations").train_dataset[0]
    assert torch.equal(by_role[1], by_from[1])
    targets = by_role[1]
    kept = tok.decode([t for t in targets.tolist() if t != IGNORE])
    assert kept == "Paris, of course." + END + "Rome" + END


def test_template_that_rewrites_past_turns_is_read_through_its_generation_markers(tmp_path, tokenizer_dir, tok):
    # Past assistant turns render as "..." (as templates that drop past reasoning do), so
    # prefix renders disagree; the {% generation %} blocks say what the assistant wrote.
    template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}U: {{ m['content'] }}{{ '\\n' }}{% else %}A: "
        "{% generation %}{% if loop.last %}{{ m['content'] }}{% else %}...{% endif %}<|im_end|>{% endgeneration %}"
        "{{ '\\n' }}{% endif %}{% endfor %}"
    )
    source = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}] * 2)
    dm = setup_data(source=source, tokenizer=tokenizer_dir, chat_template=template, seq_len=128, packing=False)
    targets = dm.train_dataset[0][1].tolist()
    assert [t for t in targets if t != IGNORE] == tok("..." + END + "Rome" + END, add_special_tokens=False)["input_ids"]


def test_text_format_packs_documents_with_eos_in_windows_of_their_own(tmp_path, tokenizer_dir, tok):
    docs = [f"document {i}: " + " ".join(["apple", "river", "stone"][: 1 + i % 3]) * (1 + i % 4) for i in range(20)]
    source = write_jsonl(tmp_path / "text.jsonl", [{"text": d, "id": i} for i, d in enumerate(docs)])
    dm = setup_data(source=source, tokenizer=tokenizer_dir, seq_len=16, batch_size=2, val_fraction=0.3)
    held = set(np.random.default_rng(0).permutation(20)[:6].tolist())
    # Each training document (its ids and EOS) cut into windows of 16 predictions, each window alone in its span.
    expected = []
    for i, doc in enumerate(docs):
        ids = tok(doc)["input_ids"] + [tok.eos_token_id]
        if i not in held:
            expected += [(ids[s : s + 16][: len(ids) - 1 - s], ids[s + 1 : s + 17]) for s in range(0, len(ids) - 1, 16)]
    found = []
    for row in range(len(dm.train_dataset)):
        inputs, targets, positions = dm.train_dataset[row]
        starts = (positions == 0).nonzero().flatten().tolist() + [16]
        for begin, end in zip(starts, starts[1:]):
            loss = targets[begin:end] != IGNORE
            n = int(loss.sum())
            assert loss[:n].all() and not loss[n:].any()  # loss on every token, then padding
            found.append((inputs[begin : begin + n].tolist(), targets[begin : begin + n].tolist()))
    assert sorted(found) == sorted(expected)


def test_padding_one_example_per_row_truncated_to_seq_len(tmp_path, tokenizer_dir, tok):
    docs = ["a short one", "a much longer document " * 10]
    source = write_jsonl(tmp_path / "text.jsonl", [{"text": d} for d in docs])
    dm = setup_data(source=source, tokenizer=tokenizer_dir, seq_len=12, packing=False, val_fraction=0.5, format="text")
    assert len(dm.train_dataset) == len(dm.val_dataset) == 1
    for inputs, targets in (dm.train_dataset[0], dm.val_dataset[0]):
        assert inputs.shape == targets.shape == (12,)
        padded = bool((inputs == tok.pad_token_id).any())
        ids = tok(docs[0] if padded else docs[1])["input_ids"] + [tok.eos_token_id]
        n = min(len(ids) - 1, 12)
        assert inputs[:n].tolist() == ids[:n] and targets[:n].tolist() == ids[1 : n + 1]
        assert (inputs[n:] == tok.pad_token_id).all() and (targets[n:] == IGNORE).all()


def test_jsonl_parquet_folder_and_glob_give_the_same_rows(tmp_path, tokenizer_dir):
    import pandas as pd

    rows = [{"messages": m} for m in synthetic_chat(30, seed=5)]
    (tmp_path / "j").mkdir()
    (tmp_path / "p").mkdir()
    write_jsonl(tmp_path / "j" / "chat.jsonl", rows)
    pd.DataFrame(rows).to_parquet(tmp_path / "p" / "chat.parquet")
    results = []
    for source in (tmp_path / "j" / "chat.jsonl", tmp_path / "p" / "chat.parquet", tmp_path / "p",
                   str(tmp_path / "j" / "*.jsonl")):
        dm = setup_data(source=str(source), tokenizer=tokenizer_dir, seq_len=32)
        results.append([[t.tolist() for t in ds[i]] for ds in (dm.train_dataset, dm.val_dataset) for i in range(len(ds))])
    assert all(other == results[0] for other in results[1:])


def test_synthetic_chat_is_deterministic_and_held_out_by_seed(tokenizer_dir):
    assert synthetic_chat(20, 1) == synthetic_chat(20, 1) != synthetic_chat(20, 2)
    a = setup_data(tokenizer=tokenizer_dir, seq_len=32, max_examples=100)
    b = setup_data(tokenizer=tokenizer_dir, seq_len=32, max_examples=100)
    assert [x[0].tolist() for x in a.train_dataset] == [x[0].tolist() for x in b.train_dataset]
    assert 0 < len(a.val_dataset) < len(a.train_dataset)



def test_loaders_leave_the_global_rng_alone(tokenizer_dir):
    # Creating an iterator draws its base seed from the loader's generator; without one of
    # its own that draw would move torch's global RNG, which the estimators sample from.
    dm = setup_data(tokenizer=tokenizer_dir, seq_len=32, max_examples=100)
    before = torch.random.get_rng_state()
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        next(iter(loader))
    assert torch.equal(torch.random.get_rng_state(), before)

class RecordingModule(L.LightningModule):
    """Embedding + linear LM that records the batches it trains on; names its tokenizer as the HF module does."""

    def __init__(self, tokenizer_source, vocab_size):
        super().__init__()
        self.tokenizer_source = tokenizer_source
        self.lm = torch.nn.Sequential(torch.nn.Embedding(vocab_size, 8), torch.nn.Linear(8, vocab_size))
        self.seen = []

    def training_step(self, batch, batch_idx):
        inputs, targets = batch[:2]  # packed rows also carry position_ids
        self.seen.append(inputs.clone())
        return F.cross_entropy(self.lm(inputs).flatten(0, 1), targets.flatten(), ignore_index=IGNORE)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_resumed_run_sees_the_same_batches_and_the_models_tokenizer(tmp_path, tokenizer_dir):
    def fit(ckpt_path=None):
        # tokenizer: the model's; rows of 16 leave some conversations no assistant token (skipped)
        data = PostTrainDataModule(seq_len=16, batch_size=4, max_examples=60, seed=7, max_skipped_fraction=0.5)
        module = RecordingModule(tokenizer_dir, 400)
        every_step = ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=1, save_top_k=-1)
        trainer = fit_quietly(module, data, [every_step], ckpt_path=ckpt_path, max_steps=8, limit_val_batches=0,
                              enable_checkpointing=True)
        assert data.vocab_size == 400 and trainer.num_training_batches > 8  # the resume point is mid-epoch
        return module.seen

    full = fit()
    resumed = fit(str(tmp_path / "step=3.ckpt"))
    assert len(full) == 8 and len(resumed) == 5
    for a, b in zip(full[3:], resumed):
        assert torch.equal(a, b)
    assert not torch.equal(full[3], full[4])


def test_examples_without_an_assistant_turn_are_skipped_and_counted(tmp_path, tokenizer_dir):
    rows = [{"messages": CONVERSATION}] * 4 + [{"messages": CONVERSATION[:1]}] * 3
    source = write_jsonl(tmp_path / "chat.jsonl", rows)
    with pytest.warns(UserWarning, match="skipped 3 of 7 examples: 3 with no assistant turn"):
        dm = setup_data(source=source, tokenizer=tokenizer_dir, seq_len=64, max_skipped_fraction=0.5)
    assert dm.skipped_examples == 3


def bad(tmp_path, tokenizer_dir, rows, **kwargs):
    source = write_jsonl(tmp_path / "bad.jsonl", rows) if rows is not None else kwargs.pop("source")
    kwargs.setdefault("tokenizer", tokenizer_dir)
    return lambda: setup_data(source=source, seq_len=16, **kwargs)


@pytest.mark.parametrize(
    "case, match",
    [
        ("missing_file", r"data.source='.*nowhere.jsonl': no such file"),
        ("unknown_format", r"data.format='sharegpt' is unknown"),
        ("no_column", r"data.format='auto' found neither .* columns \['prompt', 'response'\]"),
        ("chat_column_missing", r"data.messages_field='chat' is not a column .* \['messages'\]"),
        ("unknown_role", r"data.messages_field='messages': unknown role 'narrator'"),
        ("empty", r"data.source=.* cannot be read|holds no examples"),
        ("one_example", r"has 1 example\(s\); need at least 2"),
        ("only_no_assistant", r"no usable train examples"),
        ("no_template", r"data.chat_template is not set and the tokenizer has no chat template"),
        ("inconsistent_template", r"data.chat_template: the template does not render .* assistant message 1 "),
        ("local_val_split", r"data.val_split='test': a local data.source has the one split"),
        ("bad_tokenizer", r"data.tokenizer='/nonexistent/tok' cannot be loaded"),
        ("unreachable_hub_dataset", r"data.source='nobody-here/no-such-dataset': no such local file or folder"),
    ],
)
def test_bad_input_is_a_config_error_naming_the_field(tmp_path, tokenizer_dir, case, match, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    chat = [{"messages": CONVERSATION}] * 3
    make = {
        "missing_file": lambda: bad(tmp_path, tokenizer_dir, None, source=str(tmp_path / "nowhere.jsonl")),
        "unknown_format": lambda: bad(tmp_path, tokenizer_dir, chat, format="sharegpt"),
        "no_column": lambda: bad(tmp_path, tokenizer_dir, [{"prompt": "a", "response": "b"}] * 3),
        "chat_column_missing": lambda: bad(tmp_path, tokenizer_dir, chat, format="chat", messages_field="chat"),
        "unknown_role": lambda: bad(tmp_path, tokenizer_dir, [{"messages": [{"role": "narrator", "content": "x"}]}]
                                    * 3),
        "empty": lambda: bad(tmp_path, tokenizer_dir, []),
        "one_example": lambda: bad(tmp_path, tokenizer_dir, chat[:1]),
        "only_no_assistant": lambda: bad(tmp_path, tokenizer_dir, [{"messages": CONVERSATION[:1]}] * 3),
        "no_template": lambda: bad(tmp_path, tokenizer_dir, chat, tokenizer=f"{tokenizer_dir}/tokenizer.json"),
        # Renders a past assistant turn as its role only: its content cannot be found.
        "inconsistent_template": lambda: bad(
            tmp_path, tokenizer_dir, chat,
            chat_template="{% for m in messages %}{% if loop.last %}{{ m['content'] }}{% else %}<{{ m['role'] }}>"
                          "{% endif %}{% endfor %}"),
        "local_val_split": lambda: bad(tmp_path, tokenizer_dir, chat, val_split="test"),
        "bad_tokenizer": lambda: lambda: setup_data(source="synthetic:chat", tokenizer="/nonexistent/tok"),
        "unreachable_hub_dataset": lambda: bad(tmp_path, tokenizer_dir, None, source="nobody-here/no-such-dataset"),
    }[case]
    build = make()
    with pytest.raises(ConfigError, match=match) as info:
        build()
    assert "\n" not in str(info.value)


def test_prepare_data_loads_a_hub_dataset_and_nothing_else(tokenizer_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    PostTrainDataModule(tokenizer=tokenizer_dir, max_examples=50).prepare_data()  # synthetic: nothing to download
    hub = PostTrainDataModule(source="nobody-here/no-such-dataset", tokenizer=tokenizer_dir)
    with pytest.raises(ConfigError, match="the Hugging Face dataset could not be loaded .*ConnectionError"):
        hub.prepare_data()


def test_no_tokenizer_anywhere_names_data_tokenizer():
    dm = PostTrainDataModule(seq_len=16)
    assert dm.vocab_size is None
    with pytest.raises(ConfigError, match="data.tokenizer is not set and the model names no tokenizer"):
        dm.setup("fit")
