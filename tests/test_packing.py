"""Packed rows: whole examples side by side, position_ids restarting at each, no attention across examples."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from lightning_moe.data.chat import synthetic_chat, tokenize_chat  # noqa: E402
from lightning_moe.data.loading import IGNORE_INDEX, _collate  # noqa: E402
from lightning_moe.data.packing import PackedBatch, assign_rows, position_ids_of, row_position_ids  # noqa: E402
from lightning_moe.data.posttrain import PostTrainDataModule  # noqa: E402
from lightning_moe.errors import ConfigError  # noqa: E402
from lightning_moe.hf.module import HFMoELanguageModel  # noqa: E402
from lightning_moe.hf.tiny import build_tokenizer  # noqa: E402

COMMON = dict(vocab_size=400, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=128, tie_word_embeddings=False, head_dim=8)
FAMILIES = {
    "qwen3_moe": dict(model_type="qwen3_moe", intermediate_size=24, moe_intermediate_size=16, num_experts=8,
                      num_experts_per_tok=2, norm_topk_prob=True),
    "mixtral": dict(model_type="mixtral", intermediate_size=16, num_local_experts=4, num_experts_per_tok=2),
}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(400).save_pretrained(folder)
    return str(folder)


def test_best_fit_decreasing_fills_rows_with_whole_windows():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 17, size=200)
    row_W, order_W = assign_rows(lengths, 16, packing=True)
    rows = row_W.max() + 1
    assert sorted(order_W.tolist()) == list(range(200))  # every window placed once
    assert np.bincount(row_W, weights=lengths).max() <= 16  # no row overflows
    assert (np.diff(row_W[order_W]) >= 0).all()  # order lists the windows row by row
    assert rows <= int(np.ceil(lengths.sum() / 16)) + 5  # within a few rows of the volume bound (~99 % full)
    # Brute force on a case where next-fit wastes a row: 9,9,7,7 in rows of 16 need exactly two.
    row_W, _ = assign_rows(np.array([9, 7, 9, 7]), 16, packing=True)
    assert row_W.max() + 1 == 2 and sorted(np.bincount(row_W, weights=[9, 7, 9, 7]).tolist()) == [16, 16]
    assert assign_rows(np.array([3, 5]), 16, packing=False)[0].tolist() == [0, 1]


def test_position_ids_restart_at_every_window_and_padding_continues_the_last():
    assert row_position_ids(np.array([3, 2]), 8).tolist() == [0, 1, 2, 0, 1, 2, 3, 4]
    assert row_position_ids(np.array([4]), 4).tolist() == [0, 1, 2, 3]


def test_packed_rows_hold_each_example_exactly_as_alone(tmp_path, tokenizer_dir):
    dm = PostTrainDataModule(tokenizer=tokenizer_dir, seq_len=48, max_examples=60, val_fraction=0.1, seed=3,
                             cache_dir=tmp_path)
    dm.setup("fit")
    ds = dm.train_dataset
    # The reference: every training conversation tokenised on its own (ids[:-1] -> ids[1:]).
    conversations = synthetic_chat(60, 3)
    held = set(np.random.default_rng(3).permutation(60)[:6].tolist())
    expected = []
    for i, messages in enumerate(conversations):
        if i not in held:
            ids, labelled = tokenize_chat(dm.tokenizer, messages)
            expected.append((ids[:-1].tolist(), np.where(labelled[1:], ids[1:], IGNORE_INDEX).tolist()))
    found = []
    for row in range(len(ds)):
        inputs, targets, positions = ds[row]
        starts = (positions == 0).nonzero().flatten().tolist() + [len(positions)]
        for begin, end in zip(starts, starts[1:]):
            piece = (inputs[begin:end].tolist(), targets[begin:end].tolist())
            if set(piece[1]) != {IGNORE_INDEX}:  # padding continues the last example with no loss
                found.append(piece)
    for inputs, targets in found:  # cut the padding off the last window of a row
        assert any(inputs[: len(e[0])] == e[0] and targets[: len(e[1])] == e[1] for e in expected)
    assert len(found) == len(expected)  # every example once
    assert len(ds) < 0.7 * len(expected)  # packed (the density of the packer: the test above)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("attn", ["sdpa", "eager", pytest.param("flex_attention", marks=pytest.mark.slow)])
def test_packed_row_loss_is_the_sum_of_its_examples_run_alone(family, attn):
    if attn == "flex_attention":
        pytest.importorskip("torch.nn.attention.flex_attention")
    torch.manual_seed(0)
    module = HFMoELanguageModel(config={**COMMON, **FAMILIES[family]}, dtype="float32", attn_implementation=attn)
    module.eval()
    lengths, seq_len = [11, 7, 5], 28  # three examples and 5 slots of padding
    generator = torch.Generator().manual_seed(1)
    examples = [torch.randint(0, 400, (n + 1,), generator=generator) for n in lengths]
    inputs, targets = torch.zeros(seq_len, dtype=torch.long), torch.full((seq_len,), IGNORE_INDEX)
    slot = 0
    for ids in examples:
        inputs[slot : slot + len(ids) - 1], targets[slot : slot + len(ids) - 1] = ids[:-1], ids[1:]
        slot += len(ids) - 1
    positions = torch.from_numpy(row_position_ids(np.array(lengths), seq_len))
    batch = _collate([PackedBatch(inputs, targets, positions)] * 2)  # two rows, as a loader makes them

    def summed_loss(batch):
        logits = module.logits(batch)
        return F.cross_entropy(logits.flatten(0, 1), batch[1].flatten(), ignore_index=IGNORE_INDEX, reduction="sum")

    with torch.no_grad():
        packed = summed_loss(batch)
        alone = sum(summed_loss((ids[None, :-1], ids[None, 1:])) for ids in examples)
        leaking = summed_loss(tuple(batch[:2]))  # the same rows without position_ids
    torch.testing.assert_close(packed, 2 * alone, rtol=1e-5, atol=0)
    assert not torch.isclose(leaking, 2 * alone, rtol=1e-5, atol=0)  # attention across examples changes the loss


def test_batches_keep_their_kind_and_moe_language_model_refuses_packed_rows():
    from lightning_moe.module import MoELanguageModel

    plain = _collate([(torch.arange(4), torch.arange(4))] * 2)
    packed = _collate([PackedBatch(torch.arange(4), torch.arange(4), torch.arange(4))] * 2)
    assert type(plain) is tuple and position_ids_of(plain) is None
    assert isinstance(packed, PackedBatch) and packed.position_ids.shape == (2, 4)
    model = MoELanguageModel(vocab_size=16, d_model=16, n_layers=1, n_heads=2, max_seq_len=8)
    assert model.logits(plain).shape == (2, 4, 16)  # pretraining batches: one causal sequence per row
    with pytest.raises(ConfigError, match="set data.packing=false"):
        model.logits(packed)


def test_flash_attention_gets_the_rows_end_to_end_as_one_sequence_per_example():
    # flash-attention reads cu_seqlens from position_ids only for one row (no GPU here to run it):
    # packed_forward lays the rows end to end, and transformers' own reader finds every example.
    from types import SimpleNamespace

    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    from lightning_moe.hf.packed import packed_forward

    seen = {}

    class FlashModel(torch.nn.Module):
        config = SimpleNamespace(_attn_implementation="flash_attention_2")

        def forward(self, input_ids, position_ids, **kwargs):
            seen.update(input_ids=input_ids, position_ids=position_ids, **kwargs)
            return SimpleNamespace(logits=input_ids[..., None].float().expand(-1, -1, 3))

    positions = torch.from_numpy(np.stack([row_position_ids(np.array([3, 4]), 8), row_position_ids(np.array([8]), 8)]))
    batch = PackedBatch(torch.arange(16).reshape(2, 8), torch.zeros(2, 8, dtype=torch.long), positions)
    logits = packed_forward(FlashModel(), batch, use_cache=False)
    assert seen["input_ids"].shape == (1, 16) and seen["use_cache"] is False
    (cu_seqlens, _), _ = prepare_fa_kwargs_from_position_ids(seen["position_ids"])
    assert cu_seqlens.tolist() == [0, 3, 8, 16]  # examples of 3 and 4 (+1 padding slot), then the second row
    assert torch.equal(logits.logits[..., 0], batch.input_ids.float())  # back to [B, T, V]
