"""A run's identity for ``--ckpt_path last``, overrides on resume, and folders a resume writes.

The end-to-end tests run the real entry point (``lightning_moe.cli.main``) on the quickstart recipe
shrunk to a tiny model and a few KB of text (see ``test_cli_resume.py``), so each fit takes seconds;
what a run did is read back from its checkpoints and folders. The rules themselves are checked on
hand-made checkpoints and tiny models.
"""

import glob
import inspect
import os
import shutil

import pytest
import torch
from jsonargparse import Namespace
from test_cli_resume import RECIPES, SMALL

from lightning_moe.cli import main
from lightning_moe.errors import ConfigError
from lightning_moe.module import MoELanguageModel
from lightning_moe.resume import resolve_last_checkpoint

# The estimator's flag: top level where the model takes it there, else inside ``moe``.
TOP_LEVEL = "estimator" in inspect.signature(MoELanguageModel).parameters
ESTIMATOR = "--model.estimator" if TOP_LEVEL else "--model.moe.estimator"


def fit(tmp_path, max_steps, *extra, subcommand="fit"):
    main(
        [
            subcommand,
            "--config",
            str(RECIPES / "quickstart.yaml"),
            *SMALL,
            f"--data.cache_dir={tmp_path / 'cache'}",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
            *([f"--trainer.max_steps={max_steps}"] if max_steps is not None else []),
            *extra,
        ]
    )


def run_folder(tmp_path, version):
    return tmp_path / "runs" / "quickstart" / f"version_{version}"


def version_folders(tmp_path):
    return sorted(os.path.basename(p) for p in glob.glob(str(tmp_path / "runs" / "quickstart" / "version_*")))


def saved(tmp_path, version):
    """global_step and estimator of a version folder's last.ckpt."""
    checkpoint = torch.load(run_folder(tmp_path, version) / "checkpoints" / "last.ckpt", weights_only=False)
    return checkpoint["global_step"], checkpoint["hyper_parameters"]["moe"]["estimator"]


def user_error(capsys, call):
    """The one line ``lightning-moe`` printed for a user error (exit status 2)."""
    with pytest.raises(SystemExit) as caught:
        call()
    assert caught.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.slow
def test_last_resumes_the_run_of_the_same_configuration_not_the_newest_one(tmp_path, capsys):
    # The scenario: a DenseMixer run, then a Top-K baseline under the same logger name.
    fit(tmp_path, 3, f"{ESTIMATOR}=densemixer")
    fit(tmp_path, 5, f"{ESTIMATOR}=topk")
    baseline = (run_folder(tmp_path, 1) / "checkpoints" / "last.ckpt").read_bytes()
    assert saved(tmp_path, 0) == (3, "densemixer") and saved(tmp_path, 1) == (5, "topk")

    fit(tmp_path, 6, f"{ESTIMATOR}=densemixer", "--ckpt_path=last")
    assert saved(tmp_path, 0) == (6, "densemixer")  # continued from step 3, in its own folder
    assert (run_folder(tmp_path, 1) / "checkpoints" / "last.ckpt").read_bytes() == baseline
    assert version_folders(tmp_path) == ["version_0", "version_1"]

    # A configuration no run has: refused in one line naming the field, the folder and the ways out.
    line = user_error(capsys, lambda: fit(tmp_path, 8, f"{ESTIMATOR}=default_moe", "--ckpt_path=last"))
    assert "estimator" in line and "default_moe" in line
    assert str(run_folder(tmp_path, 0)) in line  # the newest checkpoint now
    assert "--ckpt_path" in line and "--trainer.logger.init_args.version" in line
    assert version_folders(tmp_path) == ["version_0", "version_1"]
    assert saved(tmp_path, 0) == (6, "densemixer") and saved(tmp_path, 1) == (5, "topk")


@pytest.mark.slow
def test_overrides_on_resume_are_applied_and_reported_or_refused(tmp_path, capsys, caplog):
    fit(tmp_path, 3)  # the recipe's Top-K, learning rate 2e-3
    path = str(run_folder(tmp_path, 0) / "checkpoints" / "last.ckpt")
    first_config = (run_folder(tmp_path, 0) / "config.yaml").read_text()
    older = str(run_folder(tmp_path, 0) / "checkpoints" / "step3.ckpt")
    shutil.copy(path, older)

    # Switching the estimator (to one with state of its own) and the learning rate: both applied.
    with caplog.at_level("INFO", logger="lightning.pytorch"):
        fit(tmp_path, 4, f"--ckpt_path={path}", f"{ESTIMATOR}=default_moe", "--model.learning_rate=1e-3")
    report = [r.getMessage() for r in caplog.records if "settings changed" in r.getMessage()]
    assert len(report) == 1 and "estimator" in report[0] and "model.learning_rate" in report[0]
    checkpoint = torch.load(path, weights_only=False)  # the run's newest: continued in its own folder
    assert checkpoint["global_step"] == 4 and checkpoint["hyper_parameters"]["moe"]["estimator"] == "default_moe"
    assert checkpoint["state_dict"]["model.blocks.0.ffn.estimator.default_initialised"].all()  # trained a step
    assert checkpoint["lr_schedulers"][0]["base_lrs"] == [1e-3] * len(checkpoint["optimizer_states"][0]["param_groups"])
    # The schedule's warmup (30 steps, linear: (step + 1) / 30) of the new peak rate, after 4 steps.
    for group in checkpoint["optimizer_states"][0]["param_groups"]:
        assert group["lr"] == pytest.approx(1e-3 * 5 / 30)
    assert version_folders(tmp_path) == ["version_0"]
    # The run's first configuration is kept; the resume's is beside it.
    assert (run_folder(tmp_path, 0) / "config.yaml").read_text() == first_config
    resumed = (run_folder(tmp_path, 0) / "config-resume-1.yaml").read_text()
    assert "estimator: default_moe" in resumed and "learning_rate: 0.001" in resumed

    # An architecture change is refused in one line naming the field; nothing is written.
    before = os.path.getmtime(path)
    line = user_error(capsys, lambda: fit(tmp_path, 5, f"--ckpt_path={path}", "--model.d_model=64"))
    assert "model.d_model" in line and "32" in line and "64" in line
    assert os.path.getmtime(path) == before and version_folders(tmp_path) == ["version_0"]
    assert not (run_folder(tmp_path, 0) / "config-resume-2.yaml").exists()

    # From an older checkpoint of the run: a branch, in a new version folder; the run is left as it was.
    fit(tmp_path, 4, f"--ckpt_path={older}")
    assert os.path.getmtime(path) == before and version_folders(tmp_path) == ["version_0", "version_1"]
    assert torch.load(run_folder(tmp_path, 1) / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4
    assert (run_folder(tmp_path, 1) / "config.yaml").exists()


@pytest.mark.slow
def test_validate_and_test_with_last_evaluate_that_run_and_write_no_run_folder(tmp_path, caplog, monkeypatch):
    fit(tmp_path, 3, f"{ESTIMATOR}=densemixer")
    fit(tmp_path, 2, f"{ESTIMATOR}=topk")  # newer, of another configuration
    monkeypatch.chdir(tmp_path)  # where a logger-less run would put lightning_logs/ or config.yaml
    before = sorted(os.listdir(tmp_path))
    for subcommand in ("validate", "test"):
        caplog.clear()
        with caplog.at_level("INFO", logger="lightning.pytorch"):
            fit(tmp_path, None, f"{ESTIMATOR}=densemixer", "--ckpt_path=last", "--trainer.limit_val_batches=2",
                "--trainer.limit_test_batches=2", subcommand=subcommand)
        last = str(run_folder(tmp_path, 0) / "checkpoints" / "last.ckpt")
        assert f"Loaded model weights from the checkpoint at {last}" in caplog.text, subcommand
        assert version_folders(tmp_path) == ["version_0", "version_1"]
        assert sorted(os.listdir(tmp_path)) == before
        assert not glob.glob(str(tmp_path / "runs" / "quickstart" / "version_*" / "config-*.yaml"))


# --------------------------------------------------------------------------- the rules, without training


def checkpoint_file(path, mtime, model, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"state_dict": {}, "hyper_parameters": model, "datamodule_hyper_parameters": data}, path)
    os.utime(path, (mtime, mtime))
    return str(path)


def test_last_compares_identity_settings_and_ignores_training_settings(tmp_path):
    moe = {"num_experts": 8, "estimator": "densemixer"}
    model = {"d_model": 32, "learning_rate": 2e-3, "betas": [0.9, 0.95], "moe": moe}
    data = {"source": "stdlib", "seq_len": 32, "batch_size": 4, "cache_dir": "/elsewhere"}
    versions = tmp_path / "lightning_logs"
    densemixer = checkpoint_file(versions / "version_0" / "checkpoints" / "last.ckpt", 1000, model, data)
    topk = {**model, "moe": {"num_experts": 8, "estimator": "topk"}}
    checkpoint_file(versions / "version_1" / "checkpoints" / "last.ckpt", 2000, topk, data)

    def config(**changes):
        """A parsed ``fit`` configuration: the saved one with training settings changed, and ``changes``."""
        ours = {"model": {**model, "learning_rate": 1e-3, "betas": (0.8, 0.9)}, "data": {**data, "batch_size": 8}}
        for key, value in changes.items():
            section, _, name = key.partition("__")
            ours[section] = {**ours[section], name: value}
        trainer = Namespace(default_root_dir=str(tmp_path), logger=None, callbacks=[])
        parsed_model, parsed_data = Namespace(**ours["model"]), Namespace(**ours["data"])
        return Namespace(ckpt_path="last", trainer=trainer, model=parsed_model, data=parsed_data)

    chosen = config()
    resolve_last_checkpoint(chosen)
    assert chosen.ckpt_path == densemixer and chosen.trainer.logger.init_args.version == "version_0"
    chosen = config(model__moe={"num_experts": 8, "estimator": "topk"})
    resolve_last_checkpoint(chosen)
    assert chosen.ckpt_path == str(versions / "version_1" / "checkpoints" / "last.ckpt")
    # Other text is another run, as is another architecture.
    for change, field in (({"data__seq_len": 64}, "data.seq_len 32"), ({"model__d_model": 64}, "model.d_model 32")):
        with pytest.raises(ConfigError) as caught:
            resolve_last_checkpoint(config(**change))
        assert field in str(caught.value) and "version_1" in str(caught.value)
    # validate/test/predict choose alike but leave the logger alone.
    chosen = config()
    resolve_last_checkpoint(chosen, "validate")
    assert chosen.ckpt_path == densemixer and chosen.trainer.logger is None


def tiny_model(estimator, **estimator_args):
    moe = {"num_experts": 4, "top_k": 1, "ffn_hidden": 16, "estimator": estimator, "estimator_args": estimator_args}
    return MoELanguageModel(vocab_size=64, d_model=16, n_heads=2, n_layers=1, max_seq_len=8, moe=moe)


def checkpoint_of(model):
    params = [p for p in model.parameters() if p.requires_grad]
    return {
        "state_dict": {key: value.clone() for key, value in model.state_dict().items()},
        "hyper_parameters": dict(model.hparams),
        "optimizer_states": [{"state": {}, "param_groups": [{"params": list(range(len(params)))}]}],
    }


def test_switching_the_estimator_on_resume_loads_strictly_with_fresh_estimator_state():
    torch.manual_seed(0)
    default_moe = tiny_model("default_moe")
    default_moe.model.blocks[0].ffn.estimator.default_outputs.normal_()  # as if trained
    default_moe.model.blocks[0].ffn.estimator.default_initialised.fill_(True)
    topk = tiny_model("topk")
    checkpoint = checkpoint_of(default_moe)
    topk.on_load_checkpoint(checkpoint)
    topk.load_state_dict(checkpoint["state_dict"], strict=True)  # the EMA buffers were dropped
    for key, value in topk.state_dict().items():
        assert torch.equal(value, default_moe.state_dict()[key]), key

    back = tiny_model("default_moe")
    checkpoint = checkpoint_of(topk)
    back.on_load_checkpoint(checkpoint)
    back.load_state_dict(checkpoint["state_dict"], strict=True)
    estimator = back.model.blocks[0].ffn.estimator
    assert not estimator.default_initialised.any() and not estimator.default_outputs.any()  # starts afresh

    # SparseMixer's learnable omega is a parameter the optimizer state has no entry for, and back.
    with pytest.raises(ConfigError, match="estimator parameters"):
        tiny_model("sparsemixer", learnable_omega=True).on_load_checkpoint(checkpoint_of(topk))
    with pytest.raises(ConfigError, match="estimator parameters"):
        tiny_model("topk").on_load_checkpoint(checkpoint_of(tiny_model("sparsemixer", learnable_omega=True)))
