"""Exact resume: ``fit(ckpt_path=...)`` continues bit for bit like an uninterrupted run (CPU, fp32)."""

import math
import os
import random
import signal
import sys
import warnings

import lightning as L
import numpy as np
import pytest
import torch
from helpers import fit_quietly, train_bpe_tokenizer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_moe.callbacks import AuxLossFreeBalancing, LoadBalancingLoss, RouterZLoss, RoutingMonitor
from lightning_moe.checkpointing import ResumableRNG, rng_states, set_rng_states
from lightning_moe.data import ResumableDataLoader, ResumableSampler, TextDataModule, TokenChunkDataset
from lightning_moe.module import MoELanguageModel

MAX_STEPS = 12
LOG_EVERY = 4


def write_corpus(tmp_path):
    path = tmp_path / "corpus.py"
    path.write_text("".join(f"def f{i}(x):\n    return x * {i} + {i * i}\n" for i in range(14)))
    return path


class Recorder(L.Callback):
    """Each step's loss and the routing telemetry logged at it."""

    def __init__(self):
        self.losses, self.logged = {}, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step - 1
        self.losses[step] = outputs["loss"].item()
        self.logged[step] = {k: v.item() for k, v in trainer.callback_metrics.items() if k.startswith("moe/")}


def train(tmp_path, moe, callbacks, run, ckpt_path=None, source=None, tokenizer="bytes"):
    L.seed_everything(0)
    data = TextDataModule(
        source=source or str(write_corpus(tmp_path)),
        seq_len=16,
        batch_size=4,
        cache_dir=str(tmp_path / "cache"),
        val_fraction=0.1,
        tokenizer=tokenizer,
    )
    model = MoELanguageModel(
        vocab_size=data.vocab_size,
        d_model=32,
        n_heads=2,
        n_layers=2,
        max_seq_len=16,
        moe=moe,
        warmup_steps=2,
        learning_rate=5e-3,
    )
    recorder = Recorder()
    checkpoints = ModelCheckpoint(dirpath=tmp_path / run, filename="{step}", every_n_train_steps=1, save_top_k=-1)
    trainer = L.Trainer(
        max_steps=MAX_STEPS,
        val_check_interval=3,  # validation between steps, mid-epoch
        limit_val_batches=1,
        log_every_n_steps=LOG_EVERY,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[recorder, checkpoints, *callbacks],
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, data, ckpt_path=ckpt_path)
    assert not [w for w in caught if "not resumable" in str(w.message)]
    return trainer, model, recorder


CONFIGS = {
    "sparsemixer_v2": (
        {
            "num_experts": 4,
            "top_k": 2,
            "estimator": "sparsemixer_v2",
            "estimator_args": {"jitter_eps": 0.1},  # most tokens get a (sampled) router gradient
            "input_jitter": 0.01,
        },
        lambda: [LoadBalancingLoss(scope="global"), RouterZLoss(1e-3), RoutingMonitor()],
    ),
    "default_moe_aux_free": (
        {"num_experts": 4, "top_k": 2, "estimator": "default_moe"},
        lambda: [AuxLossFreeBalancing(gamma=0.01), RoutingMonitor()],
    ),
}


@pytest.mark.parametrize(
    ("config", "tokenizer"),
    [("default_moe_aux_free", "bytes"), ("sparsemixer_v2", "bytes"), ("sparsemixer_v2", "bpe")],
)
def test_resume_mid_epoch_repeats_the_uninterrupted_run_bit_for_bit(tmp_path, config, tokenizer):
    moe, callbacks = CONFIGS[config]
    if tokenizer == "bpe":  # a BPE tokenizer trained on the corpus, read through the memory-mapped cache
        tokenizer = str(train_bpe_tokenizer(tmp_path / "tokenizer.json", [write_corpus(tmp_path).read_text()], 260))
    full_trainer, full, reference = train(tmp_path, moe, callbacks(), "full", tokenizer=tokenizer)
    epoch_length = full_trainer.num_training_batches
    assert 4 < epoch_length < 8, "the resume points below must fall inside epoch 0 and epoch 1"
    final_state = full.state_dict()

    for step in (4, epoch_length + 2):  # mid-epoch 0, and mid-epoch 1 (the shuffle order changes per epoch)
        ckpt = tmp_path / "full" / f"step={step}.ckpt"
        trainer, resumed, recorder = train(
            tmp_path, moe, callbacks(), f"from{step}", ckpt_path=ckpt, tokenizer=tokenizer
        )
        assert sorted(recorder.losses) == list(range(step, MAX_STEPS))
        for s in range(step, MAX_STEPS):
            assert recorder.losses[s] == reference.losses[s], f"resumed from step {step}: loss of step {s} differs"
            if (s + 1) % LOG_EVERY == 0:  # the routing telemetry logged there, incl. sums from before the resume
                assert recorder.logged[s] == reference.logged[s]
        state = resumed.state_dict()
        assert state.keys() == final_state.keys()
        for key in final_state:
            assert torch.equal(state[key], final_state[key]), key
        assert trainer.optimizers[0].param_groups[0]["lr"] == full_trainer.optimizers[0].param_groups[0]["lr"]

    if config == "default_moe_aux_free":
        layer = full.model.moe_layers()[0]
        assert layer.estimator.default_outputs.abs().sum() > 0 and layer.selection_bias.abs().sum() > 0


def test_domain_expert_counts_since_the_last_log_survive_a_resume(tmp_path):
    """On the labelled testbed, the mutual information logged after a resume counts the steps before it."""
    moe, callbacks = {"num_experts": 4, "top_k": 2}, lambda: [LoadBalancingLoss(), RoutingMonitor()]
    _, _, reference = train(tmp_path, moe, callbacks(), "full", source="testbed:3")
    step = LOG_EVERY - 2  # two steps into the first logging window
    _, _, resumed = train(tmp_path, moe, callbacks(), "again", tmp_path / "full" / f"step={step}.ckpt", "testbed:3")
    logged = [s for s in range(step, MAX_STEPS) if (s + 1) % LOG_EVERY == 0]
    mi_tags = [tag for tag in reference.logged[logged[0]] if tag.endswith("/domain_expert_mi")]
    assert len(mi_tags) == 2
    for s in logged:
        assert {t: resumed.logged[s][t] for t in mi_tags} == {t: reference.logged[s][t] for t in mi_tags}, s


def test_without_the_rng_state_sampled_routing_would_not_resume_exactly(tmp_path):
    class ForgetfulRNG(ResumableRNG):
        """Present (so the model does not add the real one) but saves nothing."""

        def state_dict(self):
            return {}

        def load_state_dict(self, state_dict):
            pass

        def on_train_batch_start(self, *args):
            pass

    moe, callbacks = CONFIGS["sparsemixer_v2"]
    _, _, reference = train(tmp_path, moe, [ForgetfulRNG(), *callbacks()], "full")
    _, _, resumed = train(tmp_path, moe, [ForgetfulRNG(), *callbacks()], "again", tmp_path / "full" / "step=4.ckpt")
    assert any(resumed.losses[s] != reference.losses[s] for s in resumed.losses)


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    callback = ResumableRNG()
    callback.on_train_batch_end(None, None, None, None, 0)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.save(callback.state_dict(), tmp_path / "rng.pt")

    restored = ResumableRNG()
    restored.load_state_dict(torch.load(tmp_path / "rng.pt", weights_only=True))

    class OneRank:
        world_size, global_rank = 1, 0

    torch.manual_seed(2), np.random.seed(2), random.seed(2)
    restored.on_train_start(OneRank(), None)
    restored.on_train_batch_start(None, None, None, 0)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1]) and expected[2] == again[2]


def test_set_rng_states_accepts_live_and_saved_forms():
    states = rng_states()
    first = torch.rand(2)
    set_rng_states(states)
    assert torch.equal(torch.rand(2), first)


def resumable_loader(dataset, num_replicas, rank, batch_size, consumed):
    sampler = ResumableSampler(dataset, num_replicas=num_replicas, rank=rank, seed=3)
    return ResumableDataLoader(
        dataset, batch_size=batch_size, sampler=sampler, drop_last=True, batches_consumed=consumed
    )


def test_loader_resumes_after_the_consumed_batches_also_with_another_number_of_ranks():
    dataset = TokenChunkDataset(np.arange(8 * 48 + 1, dtype=np.uint16), seq_len=8)  # 48 sequences
    one = resumable_loader(dataset, 1, 0, batch_size=8, consumed=lambda: 2)
    one.sampler.set_epoch(1)
    order = [x[:, 0].tolist() for x, _ in one]
    state = one.state_dict()
    assert state == {"epoch": 1, "samples_seen": 16, "epoch_done": False}

    resumed = resumable_loader(dataset, 1, 0, batch_size=8, consumed=None)
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(1)  # what Lightning calls at the epoch start: keeps the position
    assert [x[:, 0].tolist() for x, _ in resumed] == order[2:]
    assert len(resumed) == len(one)  # the full epoch's length, as Lightning expects

    # Two ranks with batch 4 each continue with the same global samples as one process with batch 8.
    shards = []
    for rank in range(2):
        loader = resumable_loader(dataset, 2, rank, batch_size=4, consumed=None)
        loader.load_state_dict(state)
        shards.append([x[:, 0].tolist() for x, _ in loader])
    assert [sorted(a + b) for a, b in zip(*shards)] == [sorted(batch) for batch in order[2:]]


def test_a_finished_epoch_resumes_at_the_next_one():
    dataset = TokenChunkDataset(np.arange(8 * 16 + 1, dtype=np.uint16), seq_len=8)
    done = resumable_loader(dataset, 1, 0, batch_size=4, consumed=lambda: 10**9)
    state = done.state_dict()
    assert state["epoch_done"]
    resumed = resumable_loader(dataset, 1, 0, batch_size=4, consumed=None)
    resumed.load_state_dict(state)
    fresh = resumable_loader(dataset, 1, 0, batch_size=4, consumed=None)
    fresh.sampler.set_epoch(1)
    assert [x.tolist() for x, _ in resumed] == [x.tolist() for x, _ in fresh]


class LearningRates(L.Callback):
    """The learning rate each optimizer step uses (read before the step; the scheduler steps after it)."""

    def __init__(self):
        self.used = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.used[trainer.global_step] = trainer.optimizers[0].param_groups[0]["lr"]


def test_a_resumed_run_with_a_larger_max_steps_follows_the_cosine_of_its_new_length(tmp_path):
    def fit(max_steps, ckpt_path=None):
        L.seed_everything(0)
        model = MoELanguageModel(
            d_model=16,
            n_heads=2,
            n_layers=1,
            max_seq_len=8,
            moe={"num_experts": 2, "top_k": 1},
            warmup_steps=2,
            learning_rate=1.0,
            min_lr_ratio=0.1,
        )
        tokens = torch.randint(0, 258, (64, 9), generator=torch.Generator().manual_seed(0))
        data = DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=4)
        lrs = LearningRates()
        trainer = fit_quietly(model, data, [lrs], ckpt_path=ckpt_path, max_steps=max_steps, default_root_dir=tmp_path)
        trainer.save_checkpoint(tmp_path / f"{max_steps}.ckpt")
        return lrs.used

    def factor(step, total):  # warmup, then cosine to min_lr_ratio at step total - 1
        if step + 1 <= 2:
            return (step + 1) / 2
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step + 1 - 2) / (total - 2))))

    first = fit(10)
    assert [first[s] for s in range(10)] == pytest.approx([factor(s, 10) for s in range(10)])
    extended = fit(20, tmp_path / "10.ckpt")
    # From the first resumed step on: the 20-step schedule at that step (back up from the 10-step floor).
    assert sorted(extended) == list(range(10, 20))
    assert [extended[s] for s in range(10, 20)] == pytest.approx([factor(s, 20) for s in range(10, 20)])
    assert extended[10] > 5 * first[9]


class SigtermAt(L.Callback):
    """Sends this process SIGTERM after a training batch, or a validation batch, at ``step``."""

    def __init__(self, step, during):
        self.step, self.during = step, during

    def on_train_batch_end(self, trainer, *args):
        if self.during == "training" and trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)

    def on_validation_batch_end(self, trainer, *args):
        if self.during == "validation" and trainer.global_step == self.step and not trainer.sanity_checking:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.skipif(sys.platform == "win32", reason="needs SIGTERM")
@pytest.mark.parametrize("during", ["training", "validation"])
def test_sigterm_saves_a_checkpoint_that_resumes_exactly_also_in_the_middle_of_validation(tmp_path, during):
    def run(name, callbacks=(), ckpt_path=None):
        L.seed_everything(0)
        moe, router_callbacks = CONFIGS["sparsemixer_v2"]
        model = MoELanguageModel(
            d_model=32, n_heads=2, n_layers=2, max_seq_len=16, moe=moe, warmup_steps=2, learning_rate=5e-3
        )
        data = TextDataModule(
            source=str(write_corpus(tmp_path)),
            seq_len=16,
            batch_size=4,
            cache_dir=str(tmp_path / "cache"),
            val_fraction=0.3,  # two validation batches: a signal after the first stops mid-validation
        )
        recorder = Recorder()
        trainer = L.Trainer(
            max_steps=MAX_STEPS,
            val_check_interval=3,
            limit_val_batches=2,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="cpu",
            default_root_dir=tmp_path,
            callbacks=[
                recorder,
                ModelCheckpoint(dirpath=tmp_path / name, save_last=True, save_top_k=0),
                *router_callbacks(),
                *callbacks,
            ],
        )
        trainer.fit(model, data, ckpt_path=ckpt_path)
        return trainer, model, recorder

    _, full, reference = run("full")
    step = 3 if during == "validation" else 5  # validation runs after steps 3 and 6
    with pytest.raises(SystemExit):  # Lightning's SIGTERMException
        run(during, [SigtermAt(step, during)])
    last = tmp_path / during / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == step
    trainer, resumed, recorder = run(during, ckpt_path=last)
    assert sorted(recorder.losses) == list(range(step, MAX_STEPS))
    assert all(recorder.losses[s] == reference.losses[s] for s in recorder.losses)
    for key, value in full.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
