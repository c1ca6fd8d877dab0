"""Bad input and numerical faults: NaN/inf named by layer, skipped steps, impossible setups, bad checkpoints."""

import errno
import glob
import io
import os
import pickle
import re
import sys
import tempfile
from datetime import timedelta
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_moe import MoELayer
from lightning_moe.callbacks import AuxLossFreeBalancing, DefaultOutputEMA, NonFiniteGuard
from lightning_moe.callbacks.guards import NonFiniteError, check_training_setup
from lightning_moe.checkpointing import AtomicCheckpointIO, CheckpointError, atomic_write
from lightning_moe.cli import main
from lightning_moe.trainer_cli import MoECLI
from lightning_moe.data import TextDataModule
from lightning_moe.errors import ConfigError
from lightning_moe.module import MoELanguageModel

D = 8
POISONED_STEP = 1


class TwoLayers(L.LightningModule):
    """Two MoE layers; a batch whose ``scale`` is inf makes the input of ``moe_b`` non-finite."""

    def __init__(self, estimator="topk"):
        super().__init__()
        self.inp = nn.Linear(D, D)
        self.moe_a = MoELayer(D, 16, 4, 2, estimator=estimator, backend="torch")
        self.moe_b = MoELayer(D, 16, 4, 2, estimator=estimator, backend="torch")

    def training_step(self, batch, batch_idx):
        x, scale = batch
        h = self.inp(x)
        h = h + self.moe_a(h)
        h = h * scale[:, None]
        return (h + self.moe_b(h)).square().mean()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def batches(poisoned_step=None, rank=None, steps=4, batch=4):
    x = torch.randn(steps * batch, D, generator=torch.Generator().manual_seed(0))
    scale = torch.ones(steps * batch)
    if poisoned_step is not None:
        scale[poisoned_step * batch] = float("inf")
    return DataLoader(TensorDataset(x, scale), batch_size=batch)


def fit(model, data, callbacks, ckpt_path=None, **kwargs):
    trainer = L.Trainer(
        **{
            "max_steps": 4,
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "accelerator": "cpu",
            "callbacks": callbacks,
            **kwargs,
        }
    )
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return trainer


class StateAfterEachStep(L.Callback):
    def __init__(self):
        self.states = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.states.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})


def test_nan_from_upstream_raises_naming_the_layer_and_where_to_look():
    with pytest.raises(NonFiniteError) as caught:
        fit(TwoLayers(), batches(POISONED_STEP), [NonFiniteGuard()])
    message = str(caught.value)
    assert f"training step {POISONED_STEP}" in message
    assert "'moe_b': non-finite router logits" in message and "'moe_a'" not in message
    assert "its input was not" in message


def test_with_check_all_the_input_itself_is_reported():
    with pytest.raises(NonFiniteError, match="'moe_b': non-finite input"):
        fit(TwoLayers(), batches(POISONED_STEP), [NonFiniteGuard(check="all")])


def test_an_expert_that_produces_inf_is_named_by_the_output_check():
    def poisoned():
        model = TwoLayers()
        with torch.no_grad():
            model.moe_a.experts.w2.fill_(float("inf"))  # finite inputs and logits, infinite outputs
        return model

    with pytest.raises(NonFiniteError) as caught:  # logits only: seen one layer later
        fit(poisoned(), batches(), [NonFiniteGuard()], max_steps=1)
    assert "'moe_b': non-finite router logits" in str(caught.value) and "'moe_a'" not in str(caught.value)
    with pytest.raises(NonFiniteError, match="'moe_a': non-finite output .*an expert produced it"):
        fit(poisoned(), batches(), [NonFiniteGuard(check="all")], max_steps=1)


def test_a_diverged_router_is_named():
    model = TwoLayers()
    with torch.no_grad():
        model.moe_a.router.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="'moe_a': non-finite router logits .*router weight is not finite"):
        fit(model, batches(), [NonFiniteGuard()], max_steps=1)


def test_skip_leaves_parameters_optimizer_state_and_router_statistics_untouched():
    model = TwoLayers(estimator="default_moe")
    guard, record = NonFiniteGuard(action="skip"), StateAfterEachStep()
    with pytest.warns(UserWarning, match="Skipping this optimizer step"):
        trainer = fit(model, batches(POISONED_STEP), [guard, DefaultOutputEMA(), AuxLossFreeBalancing(0.01), record])
    assert guard.skipped_steps == [POISONED_STEP]
    before, skipped, after = record.states[POISONED_STEP - 1], record.states[POISONED_STEP], record.states[-1]
    for key in before:  # weights, EMA default outputs, selection biases
        assert torch.equal(before[key], skipped[key]), key
    assert not torch.equal(before["moe_b.experts.w1"], after["moe_b.experts.w1"])  # training went on
    assert all(torch.isfinite(v.float()).all() for v in after.values())
    # Adam counted only the steps it took.
    steps = {float(s["step"]) for s in trainer.optimizers[0].state.values()}
    assert steps == {trainer.global_step - 1.0}
    assert trainer.global_step == 4


@pytest.mark.skipif(sys.platform == "win32", reason="forked ranks need fork")
def test_skip_is_decided_alike_on_every_rank(tmp_path):
    if torch.cuda.is_initialized():
        pytest.skip("forking ranks is impossible once CUDA is initialised in this process")

    class Sharded(TwoLayers):
        def train_dataloader(self):
            # Only rank 1 gets the poisoned row.
            return batches(POISONED_STEP if self.global_rank == 1 else None)

        def on_train_end(self):
            state = {k: v.detach().clone() for k, v in self.state_dict().items()}
            torch.save({"state": state, "skipped": self.guard.skipped_steps}, tmp_path / f"rank{self.global_rank}.pt")

    model = Sharded()
    model.guard = NonFiniteGuard(action="skip")
    strategy = DDPStrategy(start_method="fork", timeout=timedelta(seconds=30))
    fit(model, None, [model.guard], devices=2, strategy=strategy, use_distributed_sampler=False)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert ranks[0]["skipped"] == ranks[1]["skipped"] == [POISONED_STEP]
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]) and torch.isfinite(value).all(), key


def test_bad_guard_arguments():
    with pytest.raises(ValueError, match="action='ignore'"):
        NonFiniteGuard(action="ignore")
    with pytest.raises(ValueError, match="check='outputs'"):
        NonFiniteGuard(check="outputs")


# --------------------------------------------------------------------------- setups refused before compute


class CountForwards(L.Callback):
    def __init__(self):
        self.batches = 0

    def on_train_batch_start(self, *args):
        self.batches += 1


def test_megablocks_backend_without_cuda_fails_at_setup_naming_the_layer():
    model = MoELanguageModel(d_model=32, n_heads=2, n_layers=1, moe={"num_experts": 4, "backend": "megablocks"})
    counter = CountForwards()
    tokens = torch.randint(0, 258, (4, 9))
    with pytest.raises(RuntimeError, match="MoELayer 'model.blocks.0.ffn'.*needs a CUDA GPU"):
        fit(model, DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=2), [counter])
    assert counter.batches == 0


def fake_trainer(strategy, precision="32-true"):
    return SimpleNamespace(strategy=strategy, precision=precision)


def test_fsdp1_on_cpu_is_refused_with_what_works_instead():
    strategy = FSDPStrategy(accelerator=CPUAccelerator(), parallel_devices=[torch.device("cpu")])
    with pytest.raises(ValueError, match="FSDPStrategy cannot train on CPU.*ModelParallelStrategy"):
        check_training_setup(fake_trainer(strategy), TwoLayers())


def test_tensor_parallelism_is_refused_by_the_language_model():
    model = MoELanguageModel(d_model=32, n_heads=2, n_layers=1, moe={"num_experts": 4})
    sizes = {"data_parallel": 1, "tensor_parallel": 2}
    model._trainer = SimpleNamespace(strategy=ModelParallelStrategy())
    model._device_mesh = {name: SimpleNamespace(size=lambda n=n: n) for name, n in sizes.items()}
    with pytest.raises(ValueError, match="tensor parallelism is not supported"):
        model.configure_model()


def test_more_ranks_than_training_sequences_is_a_clear_error(tmp_path):
    (tmp_path / "tiny.txt").write_text("x" * 2000)
    data = TextDataModule(
        source=str(tmp_path / "tiny.txt"), seq_len=32, batch_size=1, val_fraction=0.1, cache_dir=str(tmp_path)
    )
    data.setup()
    data.trainer = SimpleNamespace(strategy=SimpleNamespace(distributed_sampler_kwargs={"num_replicas": 64, "rank": 3}))
    with pytest.raises(ValueError, match="fewer than the 64 data-parallel ranks"):
        data.train_dataloader()


# --------------------------------------------------------------------------- checkpoints


def language_model(num_experts=4):
    return MoELanguageModel(d_model=32, n_heads=2, n_layers=1, max_seq_len=8, moe={"num_experts": num_experts})


def token_batches():
    tokens = torch.randint(0, 258, (8, 9), generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=4)


def save_two_checkpoints(tmp_path):
    trainer = fit(language_model(), token_batches(), [], max_steps=1, plugins=[AtomicCheckpointIO()])
    trainer.save_checkpoint(tmp_path / "step1.ckpt")
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    return tmp_path / "last.ckpt"


def test_a_truncated_checkpoint_names_the_file_and_the_one_to_use_instead(tmp_path):
    last = save_two_checkpoints(tmp_path)
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as caught:
        fit(language_model(), token_batches(), [], max_steps=2, plugins=[AtomicCheckpointIO()], ckpt_path=last)
    message = str(caught.value)
    assert repr(str(last)) in message and "truncated or corrupt" in message
    assert "step1.ckpt" in message


def test_a_checkpoint_of_another_architecture_lists_what_differs(tmp_path):
    last = save_two_checkpoints(tmp_path)
    with pytest.raises(CheckpointError) as caught:
        fit(language_model(num_experts=8), token_batches(), [], max_steps=2, ckpt_path=last)
    message = str(caught.value)
    assert "moe.num_experts: checkpoint 4, this model 8" in message
    assert "model.blocks.0.ffn.experts.w1: checkpoint [4, 32, 256], this model [8, 32, 256]" in message
    # The checkpoint itself is fine: the model it describes loads.
    assert MoELanguageModel.load_from_checkpoint(last).hparams.moe["num_experts"] == 4


def test_a_write_that_dies_midway_leaves_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1}, path)

    class DiesWhilePickled:
        def __reduce__(self):
            raise KeyboardInterrupt("killed mid-write")

    with pytest.raises(KeyboardInterrupt):
        AtomicCheckpointIO().save_checkpoint({"step": 2, "big": torch.zeros(10_000), "x": DiesWhilePickled()}, path)
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert os.listdir(tmp_path) == ["last.ckpt"]


def test_temp_files_of_a_killed_writer_are_cleared_by_the_next_write(tmp_path):
    path = tmp_path / "last.ckpt"
    (tmp_path / ".last.ckpt.abc123.tmp").write_bytes(b"half a checkpoint")
    atomic_write(str(path), lambda fh: pickle.dump("done", fh))
    assert sorted(os.listdir(tmp_path)) == ["last.ckpt"]
    assert not glob.glob(str(tmp_path / "*.tmp"))


def test_the_cli_trainer_writes_atomically():
    args = ["--model.d_model=32", "--model.n_heads=2", "--model.n_layers=1", "--trainer.logger=false"]
    cli = MoECLI(MoELanguageModel, TextDataModule, run=False, args=args)
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)


class FailsAfter(io.RawIOBase):
    """A file that takes ``budget`` bytes, then fails every write with ``OSError(code)`` (a full or failing disk)."""

    def __init__(self, file, budget, code):
        self.file, self.budget, self.code = file, budget, code

    def writable(self):
        return True

    def write(self, data):
        if len(data) > self.budget:
            raise OSError(self.code, os.strerror(self.code))
        self.budget -= len(data)
        return self.file.write(data)


class SaveStep(L.Callback):
    """Saves ``last.ckpt`` after every step, as ``ModelCheckpoint(save_last=True, every_n_train_steps=1)``."""

    def __init__(self, path):
        self.path = path

    def on_train_batch_end(self, trainer, *args):
        trainer.save_checkpoint(self.path)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO])
def test_a_write_that_fails_part_way_keeps_the_previous_checkpoint_and_says_where(tmp_path, monkeypatch, code):
    path = tmp_path / "checkpoints" / "last.ckpt"
    real_save, saves = torch.save, []

    def save_to_a_failing_disk(obj, file, *args, **kwargs):
        saves.append(file)
        # The third checkpoint meets a disk that takes only 10 kB more.
        return real_save(obj, FailsAfter(file, 10_000, code) if len(saves) == 3 else file, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_to_a_failing_disk)
    with pytest.raises(CheckpointError) as caught:
        fit(language_model(), token_batches(), [SaveStep(path)], max_steps=4, plugins=[AtomicCheckpointIO()])
    monkeypatch.undo()
    message = str(caught.value)
    assert "\n" not in message and repr(str(path)) in message
    assert os.strerror(code) in message and errno.errorcode[code] in message
    assert "the previous checkpoint there is unchanged" in message
    assert os.listdir(path.parent) == ["last.ckpt"]  # no temporary file left behind
    assert torch.load(path, weights_only=False)["global_step"] == 2  # intact, the step before the failure
    assert MoELanguageModel.load_from_checkpoint(path).hparams.moe["num_experts"] == 4


def test_a_failing_fsync_or_a_read_only_folder_is_reported_with_the_path(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1}, path)

    def fsync_fails(fd):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", fsync_fails)
    with pytest.raises(CheckpointError, match=rf"{re.escape(repr(str(path)))}: Input/output error \(EIO\)"):
        AtomicCheckpointIO().save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1} and os.listdir(tmp_path) == ["last.ckpt"]

    (tmp_path / "a_file").write_text("")
    inside_a_file = tmp_path / "a_file" / "checkpoints" / "last.ckpt"  # unwritable, even for root
    with pytest.raises(CheckpointError, match=rf"{re.escape(repr(str(inside_a_file)))}: Not a directory"):
        AtomicCheckpointIO().save_checkpoint({"step": 1}, inside_a_file)


QUICKSTART = os.path.join(os.path.dirname(__file__), os.pardir, "recipes", "quickstart.yaml")
TINY = ["--model.d_model=32", "--model.n_heads=2", "--model.n_layers=1", "--model.moe.ffn_hidden=32"]
TINY += ["--data.seq_len=32", "--data.batch_size=4", "--data.max_bytes=2000", "--trainer.max_steps=2"]
TINY += ["--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false", "--trainer.accelerator=cpu"]


def user_error_from_cli(argv, capsys):
    """The one-line message of a ConfigError from ``lightning-moe`` (raised, or printed with exit status 2)."""
    with pytest.raises((ConfigError, SystemExit)) as caught:
        main(argv)
    if caught.type is SystemExit:
        assert caught.value.code == 2
        (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
        return line
    return str(caught.value)


@pytest.mark.parametrize("field", ["trainer.logger.init_args.save_dir", "data.cache_dir"])
@pytest.mark.parametrize("read_only", [False, True], ids=["file_in_the_way", "read_only_disk"])
def test_an_unwritable_log_or_cache_folder_is_refused_before_training(tmp_path, monkeypatch, capsys, field, read_only):
    if read_only:  # what a read-only mount answers (root may write anywhere else)
        folder = tmp_path / "mounted_read_only"
        real_mkstemp = tempfile.mkstemp

        def mkstemp(*args, dir=None, **kwargs):
            if str(dir).startswith(str(folder)):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS))
            return real_mkstemp(*args, dir=dir, **kwargs)

        monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    else:
        (tmp_path / "a_file").write_text("")
        folder = tmp_path / "a_file" / "runs"
    folders = {"trainer.logger.init_args.save_dir": tmp_path / "runs", "data.cache_dir": tmp_path / "cache"}
    folders[field] = folder
    argv = ["fit", "--config", QUICKSTART, *TINY, *(f"--{name}={path}" for name, path in folders.items())]
    message = user_error_from_cli(argv, capsys)
    assert "\n" not in message and field.rsplit(".", 1)[1] in message and repr(str(folder)) in message
    assert (os.strerror(errno.EROFS) if read_only else os.strerror(errno.ENOTDIR)) in message
    # Refused before the data was read or anything trained.
    assert not glob.glob(str(tmp_path / "cache" / "*"))
    assert not glob.glob(str(tmp_path / "**" / "*.ckpt"), recursive=True)
