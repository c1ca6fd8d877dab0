"""Resuming through ``lightning-moe fit``: ``--ckpt_path last`` and extending a run's ``max_steps``.

Every run is the real entry point (``lightning_moe.cli.main``) on a shipped recipe, shrunk with
command-line overrides (tiny model, a corpus of a few KB, validation off) so a fit takes seconds.
Losses come from a CSV logger that writes every step; final states from ``last.ckpt``.
"""

import csv
import glob
import logging
import os
from pathlib import Path

import pytest
import torch
from helpers import assert_same_checkpoint
from jsonargparse import Namespace

from lightning_moe.cli import main
from lightning_moe.errors import ConfigError
from lightning_moe.resume import resolve_last_checkpoint

RECIPES = Path(__file__).parents[1] / "recipes"
BATCH, SEQ = 4, 32
# About 1,960 training tokens: 61 sequences of 32, so 15 batches of 4 per epoch.
EPOCH_LENGTH = 15
SMALL = [
    "--model.d_model=32",
    "--model.n_heads=2",
    "--model.n_layers=1",
    f"--model.max_seq_len={SEQ}",
    "--model.moe.ffn_hidden=32",
    f"--data.seq_len={SEQ}",
    f"--data.batch_size={BATCH}",
    "--data.max_bytes=2000",
    "--trainer.limit_val_batches=0",
    "--trainer.log_every_n_steps=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.accelerator=cpu",
]
# Every step's loss in <save_dir>/<name>/version_N/metrics.csv (instead of the recipe's TensorBoard logs).
CSV_LOGS = [
    "--trainer.logger.class_path=lightning.pytorch.loggers.CSVLogger",
    "--trainer.logger.init_args.flush_logs_every_n_steps=1",
]


def fit(tmp_path, recipe, save_dir, max_steps, *extra):
    main(
        [
            "fit",
            "--config",
            str(RECIPES / f"{recipe}.yaml"),
            *SMALL,
            f"--data.cache_dir={tmp_path / 'cache'}",
            f"--trainer.logger.init_args.save_dir={tmp_path / save_dir}",
            f"--trainer.max_steps={max_steps}",
            *extra,
        ]
    )


def versions(tmp_path, save_dir):
    """The run's version folders, oldest first."""
    found = glob.glob(str(tmp_path / save_dir / "*" / "version_*"))
    return sorted(found, key=lambda p: int(p.rsplit("_", 1)[1]))


def last_checkpoint(version):
    return os.path.join(version, "checkpoints", "last.ckpt")


def losses(*version_folders):
    """train/loss by step from the runs' metrics.csv files (later files win)."""
    by_step = {}
    for folder in version_folders:
        with open(os.path.join(folder, "metrics.csv")) as fh:
            for row in csv.DictReader(fh):
                if row.get("train/loss"):
                    by_step[int(row["step"])] = float(row["train/loss"])
    return by_step


@pytest.mark.slow
@pytest.mark.parametrize(
    "recipe, stops",
    [
        ("quickstart", [10, EPOCH_LENGTH]),  # mid-epoch, and exactly at the end of the first epoch
        ("grin", [10]),  # sampled routing (SparseMixer-v2 with jitter, input jitter)
    ],
)
def test_extending_max_steps_continues_like_one_uninterrupted_run(tmp_path, recipe, stops):
    total = 20  # the second epoch starts at step 15: the resumed runs cross an epoch boundary
    fit(tmp_path, recipe, "full", total, *CSV_LOGS)
    (full,) = versions(tmp_path, "full")
    reference = losses(full)
    assert sorted(reference) == list(range(total))
    expected = torch.load(last_checkpoint(full), weights_only=False)

    for stop in stops:
        run = f"stop{stop}"
        fit(tmp_path, recipe, run, stop, *CSV_LOGS)
        (first,) = versions(tmp_path, run)
        assert torch.load(last_checkpoint(first), weights_only=False)["global_step"] == stop
        fit(tmp_path, recipe, run, total, *CSV_LOGS, f"--ckpt_path={last_checkpoint(first)}")
        *_, second = versions(tmp_path, run)
        resumed = losses(second)
        assert sorted(resumed) == list(range(stop, total)), f"stopped at {stop}"
        for step in range(stop, total):
            assert resumed[step] == reference[step], f"stopped at {stop}: the loss of step {step} differs"
        assert_same_checkpoint(torch.load(last_checkpoint(second), weights_only=False), expected)


@pytest.mark.slow
def test_ckpt_path_last_resumes_the_newest_checkpoint_of_the_run_in_its_own_folder(tmp_path, caplog):
    fit(tmp_path, "quickstart", "runs", 4)
    fit(tmp_path, "quickstart", "runs", 6, "--ckpt_path=last")  # a second run of the same recipe
    (version,) = versions(tmp_path, "runs")  # it continued in the first run's folder ...
    assert torch.load(last_checkpoint(version), weights_only=False)["global_step"] == 6
    assert len(glob.glob(os.path.join(version, "events.out.tfevents.*"))) == 2  # ... and its TensorBoard logs

    # A newer folder without a checkpoint (a run that died before its first one) is passed over.
    os.makedirs(os.path.join(os.path.dirname(version), "version_1", "checkpoints"))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        fit(tmp_path, "quickstart", "runs", 8, "--ckpt_path=last")
    assert f"Restored all states from the checkpoint at {last_checkpoint(version)}" in caplog.text
    assert torch.load(last_checkpoint(version), weights_only=False)["global_step"] == 8
    assert not os.listdir(os.path.join(os.path.dirname(version), "version_1", "checkpoints"))


def test_ckpt_path_last_without_a_previous_run_is_refused(tmp_path, capsys):
    with pytest.raises((ConfigError, SystemExit)) as caught:
        fit(tmp_path, "quickstart", "empty", 4, "--ckpt_path=last")
    # main() may print the ConfigError as one line and exit with status 2.
    message = str(caught.value) if caught.type is ConfigError else capsys.readouterr().err
    if caught.type is SystemExit:
        assert caught.value.code == 2
    assert "ckpt_path" in message and "no checkpoint" in message and str(tmp_path / "empty") in message
    assert not glob.glob(str(tmp_path / "empty" / "**" / "*.ckpt"), recursive=True)


def fit_config(tmp_path, logger, callbacks=()):
    """A parsed ``fit`` configuration as LightningCLI hands it over (only the fields looked at)."""
    trainer = Namespace(default_root_dir=str(tmp_path), logger=logger, callbacks=list(callbacks))
    return Namespace(ckpt_path="last", trainer=trainer)


def touch(path, mtime, model=None, data=None):
    """A checkpoint file at ``path`` with modification time ``mtime`` and these saved settings."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    checkpoint = {"state_dict": {}, "hyper_parameters": model or {}}
    if data is not None:
        checkpoint["datamodule_hyper_parameters"] = data
    torch.save(checkpoint, path)
    os.utime(path, (mtime, mtime))
    return path


def test_last_is_the_newest_last_checkpoint_of_the_default_loggers_versions(tmp_path):
    old = touch(str(tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"), 1000)
    new = touch(str(tmp_path / "lightning_logs" / "version_2" / "checkpoints" / "last-v1.ckpt"), 2000)
    touch(str(tmp_path / "lightning_logs" / "version_2" / "checkpoints" / "epoch=0-step=9.ckpt"), 3000)
    os.makedirs(tmp_path / "lightning_logs" / "version_3")
    config = fit_config(tmp_path, None)
    resolve_last_checkpoint(config)
    assert config.ckpt_path == new != old
    # Lightning's default logger, now with the version that holds the checkpoint.
    assert config.trainer.logger.init_args.version == "version_2"
    assert config.trainer.logger.init_args.save_dir == str(tmp_path)


def test_last_without_a_logger_and_in_a_fixed_checkpoint_folder(tmp_path):
    no_logger = touch(str(tmp_path / "checkpoints" / "last.ckpt"), 1000)
    config = fit_config(tmp_path, False)
    resolve_last_checkpoint(config)
    assert config.ckpt_path == no_logger and config.trainer.logger is False

    fixed = touch(str(tmp_path / "elsewhere" / "last.ckpt"), 1000)
    checkpoint = Namespace(
        class_path="lightning.pytorch.callbacks.ModelCheckpoint", init_args=Namespace(dirpath=os.path.dirname(fixed))
    )
    config = fit_config(tmp_path, False, [checkpoint])
    resolve_last_checkpoint(config)
    assert config.ckpt_path == fixed


def test_last_with_nothing_to_resume_names_the_folders_searched(tmp_path):
    logger = Namespace(
        class_path="lightning.pytorch.loggers.TensorBoardLogger",
        init_args=Namespace(save_dir=str(tmp_path / "runs"), name="quickstart", version=None),
    )
    with pytest.raises(ConfigError, match=r"ckpt_path='last': no checkpoint to resume; no last\*\.ckpt in .*"):
        resolve_last_checkpoint(fit_config(tmp_path, logger))
    with pytest.raises(ConfigError) as caught:
        resolve_last_checkpoint(fit_config(tmp_path, logger))
    assert os.path.join(str(tmp_path / "runs"), "quickstart", "version_*", "checkpoints") in str(caught.value)
    assert "\n" not in str(caught.value)
