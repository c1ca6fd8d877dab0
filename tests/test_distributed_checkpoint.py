"""Distributed (sharded) checkpoints of FSDP2 runs: exact resume, atomic writes, ``--ckpt_path last``.

``ModelParallelStrategy(save_distributed_checkpoint=True)`` writes a checkpoint as a folder named
like the file it replaces (``last.ckpt/``): every rank's shards and the index through
``torch.distributed.checkpoint`` (``__<rank>_0.distcp``, ``.metadata``) and rank 0's non-tensor
part (``meta.pt``). Two gloo ranks on the CPU train a tiny MoELanguageModel with sampled routing
(SparseMixer-v2) and the router callbacks, so a resume is only exact if the weights, AdamW's
state, the schedule, every rank's RNG streams, the data position and the callbacks' states all
come back from the folder.
"""

import errno
import os
import shutil
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import ForkedModelParallel, RankRecord, assert_same
from jsonargparse import Namespace
from lightning.fabric.utilities.load import _load_distributed_checkpoint
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import model_parallel

from lightning_moe import checkpointing
from lightning_moe.callbacks import LoadBalancingLoss, RouterZLoss, RoutingMonitor
from lightning_moe.checkpointing import CheckpointError, use_atomic_checkpoint_io
from lightning_moe.cli import main
from lightning_moe.data import TextDataModule
from lightning_moe.errors import ConfigError
from lightning_moe.module import MoELanguageModel
from lightning_moe.resume import check_sharded_resume, resolve_last_checkpoint, resume_settings
from lightning_moe.trainer_cli import check_checkpoint

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="forked ranks need fork")

STEPS = 4
TIMEOUT = timedelta(seconds=30)  # a collective one rank never joins fails the test instead of hanging it
RECIPES = Path(__file__).resolve().parents[1] / "recipes"
MOE = {"num_experts": 4, "top_k": 2, "estimator": "sparsemixer_v2", "backend": "torch"}


@pytest.fixture(autouse=True)
def _no_cuda():
    if torch.cuda.is_initialized():
        pytest.skip("forking ranks is impossible once CUDA is initialised in this process")


def corpus(folder):
    path = folder / "corpus.py"
    if not path.exists():
        path.write_text("".join(f"def g{i}(x, y):\n    return (x - {i}) * y // {i + 1}\n" for i in range(40)))
    return str(path)


def fit_sharded(root, run, checkpoints, max_steps, ckpt_path=None, save_top_k=0):
    """Two FSDP2 ranks train for ``max_steps``, saving distributed checkpoints in ``checkpoints`` every step."""
    out_dir = root / run
    out_dir.mkdir()
    L.seed_everything(0)
    model = MoELanguageModel(d_model=32, n_heads=2, n_layers=2, max_seq_len=16, moe=MOE, warmup_steps=2)
    data = TextDataModule(source=corpus(root), seq_len=16, batch_size=4, cache_dir=str(root / "cache"))
    strategy = ForkedModelParallel(
        data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=True, timeout=TIMEOUT
    )
    saver = ModelCheckpoint(
        dirpath=checkpoints, filename="{step}", every_n_train_steps=1, save_top_k=save_top_k, save_last=True
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_steps=max_steps,
        log_every_n_steps=2,
        limit_val_batches=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[
            RankRecord(str(out_dir)),
            saver,
            LoadBalancingLoss(alpha=0.01, scope="global"),
            RouterZLoss(1e-3),
            RoutingMonitor(log_every_n_steps=STEPS),  # logs once, over steps before and after the resume
        ],
    )
    use_atomic_checkpoint_io(trainer)  # as lightning-moe does for every run
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(2)]


def read_sharded(folder):
    """A distributed checkpoint read back whole, independently of the code under test: the tensors
    through torch.distributed.checkpoint, the rest from ``meta.pt``."""
    tensors = _load_distributed_checkpoint(folder)
    return {**torch.load(folder / "meta.pt", weights_only=False), **tensors}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted run of STEPS steps, and one stopped half-way then resumed from its DCP ``last``."""
    root = tmp_path_factory.mktemp("dcp")
    full = fit_sharded(root, "full", root / "full_ckpt", STEPS)
    fit_sharded(root, "half", root / "ckpt", STEPS // 2)
    resumed = fit_sharded(root, "resumed", root / "ckpt", STEPS, ckpt_path="last")
    return root, full, resumed


def test_resume_from_the_distributed_last_checkpoint_equals_an_uninterrupted_run_bit_for_bit(runs):
    root, full, resumed = runs
    for rank in range(2):
        assert resumed[rank]["losses"] == {s: full[rank]["losses"][s] for s in range(STEPS // 2, STEPS)}
        for key, value in full[rank]["state"].items():
            assert torch.equal(resumed[rank]["state"][key], value), key
    # The final checkpoints hold the same training state: weights, AdamW's state, schedule, every
    # rank's RNG streams, the routing monitor's sums and the loops' data position.
    expected, got = read_sharded(root / "full_ckpt" / "last.ckpt"), read_sharded(root / "ckpt" / "last.ckpt")
    assert got["global_step"] == expected["global_step"] == STEPS
    assert_same(got["state_dict"], expected["state_dict"])
    assert_same(got["optimizer_0"], expected["optimizer_0"])
    assert got["lr_schedulers"] == expected["lr_schedulers"]
    for name in ("ResumableRNG", "RoutingMonitor"):
        assert_same(got["callbacks"][name], expected["callbacks"][name])
    assert len(got["callbacks"]["ResumableRNG"]["ranks"]) == 2  # each rank's own streams, not rank 0's twice
    assert got["loops"]["fit_loop"]["state_dict"] == expected["loops"]["fit_loop"]["state_dict"]


def test_a_save_cut_short_leaves_the_previous_distributed_checkpoint_intact(tmp_path, monkeypatch):
    """A run killed while writing ``last.ckpt`` (shards written, the rest not) must not leave a folder that
    mixes the new shards with the old step's ``meta.pt``: the previous checkpoint stays whole."""
    write = model_parallel._distributed_checkpoint_save
    saves_of_last = []

    def killed_after_the_shards(state, path):
        write(state, path)
        if "last.ckpt" in os.path.basename(path):
            saves_of_last.append(path)
            if len(saves_of_last) == 2:  # the second step's last.ckpt: shards and index written, meta.pt not
                raise RuntimeError("killed")

    monkeypatch.setattr(model_parallel, "_distributed_checkpoint_save", killed_after_the_shards)
    with pytest.raises(Exception, match="killed"):  # the ranks' error, as the launcher re-raises it
        fit_sharded(tmp_path, "killed", tmp_path / "ckpt", STEPS, save_top_k=-1)
    assert_last_is_step_1(tmp_path / "ckpt")


def assert_last_is_step_1(folder):
    last, step1 = read_sharded(folder / "last.ckpt"), read_sharded(folder / "step=1.ckpt")
    assert last["global_step"] == 1
    assert_same(last["state_dict"], step1["state_dict"])
    assert_same(last["optimizer_0"], step1["optimizer_0"])


def test_a_failed_rename_stops_every_rank_with_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """Rank 0 alone puts the folder in place; the other ranks must learn that it failed rather than train on
    (or wait for a collective rank 0 never joins)."""
    put_in_place = checkpointing._put_in_place
    calls = []

    def disk_full_on_the_second_last(folder, path):
        calls.append(path)
        if os.path.basename(path) == "last.ckpt" and sum(c.endswith("last.ckpt") for c in calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        put_in_place(folder, path)

    monkeypatch.setattr(checkpointing, "_put_in_place", disk_full_on_the_second_last)
    with pytest.raises(Exception) as caught:
        fit_sharded(tmp_path, "full_disk", tmp_path / "ckpt", STEPS, save_top_k=-1)
    message = str(tmp_path / "ckpt" / "last.ckpt")
    # The launcher re-raises the first rank's error, in its traceback text; both ranks raised it.
    assert f"CheckpointError: Cannot write the checkpoint {message!r}: No space left on device (ENOSPC)" in str(
        caught.value
    )
    assert_last_is_step_1(tmp_path / "ckpt")
    assert not [name for name in os.listdir(tmp_path / "ckpt") if name.startswith(".")]  # the new folder removed


def fit_config(root):
    """A parsed ``fit`` configuration as LightningCLI hands it over: Lightning's default logger under ``root``."""
    return Namespace(ckpt_path="last", trainer=Namespace(default_root_dir=str(root), logger=None, callbacks=[]))


def version_checkpoint(root, version, source, mtime):
    """A copy of the distributed checkpoint ``source`` as ``version``'s last.ckpt, modified at ``mtime``."""
    target = root / "lightning_logs" / version / "checkpoints" / "last.ckpt"
    shutil.copytree(source, target)
    set_time(target, mtime)
    return target


def set_time(folder, mtime):
    for path in [*folder.iterdir(), folder]:
        os.utime(path, (mtime, mtime))


def test_last_finds_a_distributed_checkpoint_and_passes_over_a_half_written_one(runs, tmp_path):
    real = runs[0] / "ckpt" / "last.ckpt"
    complete = version_checkpoint(tmp_path, "version_0", real, 1000)
    config = fit_config(tmp_path)
    resolve_last_checkpoint(config)
    assert config.ckpt_path == str(complete)
    assert config.trainer.logger.init_args.version == "version_0"

    # Newer, but written in place by a run killed before the index and meta.pt (no atomic writer).
    half = version_checkpoint(tmp_path, "version_1", real, 2000)
    os.remove(half / ".metadata")
    os.remove(half / "meta.pt")
    set_time(half, 2000)
    config = fit_config(tmp_path)
    with pytest.warns(UserWarning, match="incomplete distributed checkpoint") as caught:
        resolve_last_checkpoint(config)
    assert config.ckpt_path == str(complete)
    assert any(str(half) in str(warning.message) for warning in caught)

    # Among complete ones the newest wins, by when it was written.
    newer = version_checkpoint(tmp_path, "version_2", real, 3000)
    config = fit_config(tmp_path)
    with pytest.warns(UserWarning, match="passing over"):
        resolve_last_checkpoint(config)
    assert config.ckpt_path == str(newer)

    # Only a half-written one: refused in one line that names it, never loaded.
    shutil.rmtree(complete)
    shutil.rmtree(newer)
    with pytest.raises(ConfigError) as caught, pytest.warns(UserWarning, match="passing over"):
        resolve_last_checkpoint(fit_config(tmp_path))
    assert str(half) in str(caught.value) and "incomplete" in str(caught.value) and "\n" not in str(caught.value)


def test_a_distributed_checkpoint_is_accepted_where_a_ckpt_file_is(runs, tmp_path):
    real = runs[0] / "ckpt" / "last.ckpt"
    assert check_checkpoint(str(real), "ckpt_path") is MoELanguageModel

    half = tmp_path / "last.ckpt"
    shutil.copytree(real, half)
    os.remove(half / "meta.pt")
    with pytest.raises((ConfigError, CheckpointError)) as caught:
        check_checkpoint(str(half), "ckpt_path")
    message = str(caught.value)
    assert repr(str(half)) in message and "incomplete" in message and "meta.pt" in message
    assert "\n" not in message

    (tmp_path / "plain").mkdir()
    with pytest.raises(ConfigError, match="is a folder"):
        check_checkpoint(str(tmp_path / "plain"), "ckpt_path")


def test_evaluation_on_one_device_reads_the_weights_of_a_distributed_checkpoint(runs):
    """``validate``/``test`` need no sharding: the weights are assembled whole from the ranks' shards."""
    root, full, _ = runs
    model = MoELanguageModel(d_model=32, n_heads=2, n_layers=2, max_seq_len=16, moe=MOE, warmup_steps=2)
    data = TextDataModule(source=corpus(root), seq_len=16, batch_size=4, cache_dir=str(root / "cache"))
    trainer = L.Trainer(
        accelerator="cpu", devices=1, limit_val_batches=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    use_atomic_checkpoint_io(trainer)
    trainer.validate(model, data, ckpt_path=root / "full_ckpt" / "last.ckpt")
    state = model.state_dict()
    assert state.keys() == full[0]["state"].keys()
    for key, value in full[0]["state"].items():  # what rank 0 gathered at the end of the run that wrote it
        assert torch.equal(state[key], value), key


def test_fit_under_a_strategy_that_does_not_shard_refuses_a_distributed_checkpoint_in_one_line(runs):
    real = str(runs[0] / "ckpt" / "last.ckpt")
    # fit under a strategy that does not shard would get the weights without the optimizer state.
    ddp = Namespace(ckpt_path=real, trainer=Namespace(strategy="ddp"))
    with pytest.raises(ConfigError) as caught:
        check_sharded_resume(ddp)
    message = str(caught.value)
    assert message.startswith(f"ckpt_path={real!r}") and "ModelParallelStrategy" in message and "'ddp'" in message
    assert "\n" not in message
    sharded = Namespace(class_path="lightning.pytorch.strategies.ModelParallelStrategy", init_args=Namespace())
    check_sharded_resume(Namespace(ckpt_path=real, trainer=Namespace(strategy=sharded)))


def test_sample_reads_a_distributed_checkpoint(runs, capsys):
    root, full, _ = runs
    main(["sample", str(root / "full_ckpt" / "last.ckpt"), "--max_new_tokens", "8", "--seed", "3"])
    # The same text from the weights rank 0 gathered at the end of the run that wrote the checkpoint
    # (seeded before the model is built, as sample does).
    torch.manual_seed(3)
    model = MoELanguageModel(d_model=32, n_heads=2, n_layers=2, max_seq_len=16, moe=MOE, warmup_steps=2)
    model.load_state_dict(full[0]["state"])
    assert capsys.readouterr().out == model.sample_text("def ", max_new_tokens=8, temperature=0.8, top_k=40) + "\n"


@pytest.mark.slow
def test_lightning_moe_fit_ckpt_path_last_resumes_the_distributed_checkpoint(tmp_path):
    """Through the real command, as a user runs it: FSDP2 over two processes (ModelParallelStrategy's own
    launcher starts rank 1), a DCP ``last.ckpt``, then ``--ckpt_path last`` continues it in its run folder."""
    (tmp_path / "corpus.txt").write_text(
        "".join(f"def g{i}(x, y):\n    return (x - {i}) * y // {i + 1}\n" for i in range(100))
    )
    tiny = [
        *("fit", "--config", str(RECIPES / "quickstart.yaml")),
        *("--model.d_model=32", "--model.n_heads=2", "--model.n_layers=1", "--model.max_seq_len=16"),
        *("--model.moe.num_experts=4", "--model.moe.ffn_hidden=32", "--data.source=corpus.txt"),
        *("--data.seq_len=16", "--data.batch_size=2", "--data.cache_dir=cache", "--trainer.limit_val_batches=0"),
        *("--trainer.enable_model_summary=false", "--trainer.logger.init_args.save_dir=runs"),
        *("--trainer.accelerator=cpu", "--trainer.devices=2"),
        "--trainer.strategy=lightning.pytorch.strategies.ModelParallelStrategy",
        *("--trainer.strategy.data_parallel_size=2", "--trainer.strategy.tensor_parallel_size=1"),
        "--trainer.strategy.save_distributed_checkpoint=true",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LIGHTNING_MOE_CACHE": str(tmp_path / "cache")}
    env.pop("LOCAL_RANK", None)  # a rank's variables would make the command think it is one

    def lightning_moe(*args):
        done = subprocess.run(
            [sys.executable, "-m", "lightning_moe.cli", *tiny, *args],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    lightning_moe("--trainer.max_steps=2")
    last = Path("runs", "quickstart", "version_0", "checkpoints", "last.ckpt")
    assert (tmp_path / last / ".metadata").is_file()
    resumed = lightning_moe("--trainer.max_steps=4", "--ckpt_path=last")
    assert f"Restored all states from the checkpoint at {last}" in resumed.stderr
    assert f"Last checkpoint: {last}" in resumed.stdout  # the same run folder, no version_1
    assert sorted(os.listdir(tmp_path / "runs" / "quickstart")) == ["version_0"]
    assert os.listdir(tmp_path / last.parent) == ["last.ckpt"]  # no temporary folder left beside it
    assert torch.load(tmp_path / last / "meta.pt", weights_only=True)["global_step"] == 4


def test_switching_the_estimator_on_a_sharded_resume_is_refused_in_one_line(runs):
    """The shards load into the model as built: a new estimator's state (Default MoE's EMA) is not among
    them, and torch.distributed.checkpoint would stop every rank with a traceback."""
    real = str(runs[0] / "ckpt" / "last.ckpt")
    sharded = Namespace(class_path="lightning.pytorch.strategies.ModelParallelStrategy", init_args=Namespace())
    config = Namespace(ckpt_path=real, trainer=Namespace(strategy=sharded), model=Namespace(), data=Namespace())
    with pytest.raises(ConfigError) as caught:
        resume_settings(config, Namespace(model=Namespace(estimator="default_moe")))
    message = str(caught.value)
    assert message.startswith(f"ckpt_path={real!r}") and "'sparsemixer_v2'" in message and "'default_moe'" in message
    assert "\n" not in message
    # A training setting may still change.
    settings = resume_settings(config, Namespace(model=Namespace(learning_rate=1e-4)))
    assert settings["model"]["learning_rate"] == 1e-4


def test_sample_reads_a_distributed_checkpoint_of_a_hugging_face_model(tmp_path, capsys):
    """HFMoELanguageModel builds itself from the model its checkpoint carries; from a distributed checkpoint
    too. The folder is written here with torch.distributed.checkpoint in one process, in Lightning's layout,
    from the .ckpt of the same model, whose sample is the reference."""
    pytest.importorskip("transformers")
    from torch.distributed.checkpoint import save

    from lightning_moe.hf.module import HFMoELanguageModel
    from lightning_moe.hf.tiny import build_tiny_model

    pretrained = build_tiny_model("olmoe", str(tmp_path / "tiny"), vocab_size=320)
    torch.manual_seed(0)
    module = HFMoELanguageModel(pretrained=pretrained, learning_rate=1e-3)
    with torch.no_grad():
        for parameter in module.parameters():  # not the pretrained weights: the checkpoint's must be used
            parameter.add_(0.05 * torch.randn_like(parameter))
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    checkpoint = torch.load(tmp_path / "model.ckpt", weights_only=False)
    folder = tmp_path / "last.ckpt"
    save({"state_dict": checkpoint.pop("state_dict")}, checkpoint_id=folder, no_dist=True)
    checkpoint.pop("optimizer_states", None)
    torch.save(checkpoint, folder / "meta.pt")
    shutil.rmtree(tmp_path / "tiny")  # the model must come from the checkpoint, not from `pretrained`

    args = ["--prompt", "a", "--max_new_tokens", "6", "--seed", "1"]
    main(["sample", str(tmp_path / "model.ckpt"), *args])
    expected = capsys.readouterr().out
    main(["sample", str(folder), *args])
    assert capsys.readouterr().out == expected
