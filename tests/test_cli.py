"""The real entry point: every recipe parses and builds, and a tiny fit + sample runs end to end."""

import re
from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_moe.cli import main
from lightning_moe.progress import use_step_progress_bar
from lightning_moe.data import TextDataModule
from lightning_moe.module import MoELanguageModel

# Fit recipes; study_*.yaml are `lightning-moe compare` studies, checked in test_compare.py.
RECIPES = sorted(p for p in (Path(__file__).parents[1] / "recipes").glob("*.yaml") if not p.name.startswith("study_"))


def test_there_are_recipes():
    assert any(p.name == "quickstart.yaml" for p in RECIPES)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_parses_and_instantiates(recipe, tmp_path, capsys):
    if "tokenizer:" in recipe.read_text() or "pretrained:" in recipe.read_text():
        # A Hub tokenizer or model needs the network, and a local one a file made first: parsed
        # here; test_tokenizers.py and test_posttrain_recipe.py make those and fit the offline recipes.
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", "--config", str(recipe), "--print_config"])
        printed = capsys.readouterr().out
        assert exit_info.value.code == 0 and ("tokenizer:" in printed or "pretrained:" in printed)
        return
    cli = LightningCLI(
        MoELanguageModel,
        TextDataModule,
        run=False,
        args=["--config", str(recipe), f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false"],
    )
    assert isinstance(cli.model, MoELanguageModel)
    assert cli.trainer.max_steps > 0


def test_print_config_round_trips(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(RECIPES[0]), "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "num_experts: 8" in printed and "class_path: lightning_moe.callbacks.LoadBalancingLoss" in printed
    config = tmp_path / "printed.yaml"
    config.write_text(printed)
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(config), "--print_config"])
    assert capsys.readouterr().out == printed


@pytest.mark.slow
def test_quickstart_fit_writes_logs_and_checkpoint_then_samples(tmp_path, capsys):
    quickstart = next(p for p in RECIPES if p.name == "quickstart.yaml")
    main(
        [
            "fit",
            "--config",
            str(quickstart),
            "--model.d_model=32",
            "--model.n_heads=2",
            "--model.n_layers=2",
            "--model.moe.ffn_hidden=32",
            "--model.warmup_steps=2",
            "--data.seq_len=32",
            "--data.batch_size=4",
            "--data.max_bytes=200000",
            f"--data.cache_dir={tmp_path / 'cache'}",
            "--trainer.max_steps=4",
            "--trainer.val_check_interval=4",
            "--trainer.limit_val_batches=2",
            "--trainer.log_every_n_steps=1",
            "--trainer.enable_progress_bar=false",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
        ]
    )
    run_dir = tmp_path / "runs" / "quickstart" / "version_0"
    assert list(run_dir.glob("events.out.tfevents.*")), "no TensorBoard event file"
    last = run_dir / "checkpoints" / "last.ckpt"
    assert last.is_file()
    # fit ends by saying where its results are.
    printed = capsys.readouterr().out.splitlines()
    best = next(run_dir.glob("checkpoints/epoch=*.ckpt"))
    assert printed[-3:-1] == [f"Run folder: {run_dir}", f"Last checkpoint: {last}"]
    assert re.fullmatch(rf"Best checkpoint: {re.escape(str(best))} \(val/loss \d+\.\d{{4}}\)", printed[-1])
    main(["sample", str(last), "--prompt", "import ", "--max_new_tokens", "20"])
    out = capsys.readouterr().out
    assert out.startswith("import ")


def test_unknown_estimator_in_config_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="estimator='nope'"):
        MoELanguageModel(d_model=32, n_heads=2, n_layers=1, moe={"num_experts": 2, "top_k": 1, "estimator": "nope"})


def test_sample_names_a_missing_or_damaged_checkpoint_without_a_traceback(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["sample", str(tmp_path / "nowhere.ckpt")])
    assert exit_info.value.code == 2
    assert re.fullmatch(r"error: checkpoint='.*nowhere.ckpt': no such file; .*\n", capsys.readouterr().err)
    damaged = tmp_path / "last.ckpt"
    damaged.write_bytes(b"PK\x03\x04 cut off while writing")
    (tmp_path / "step=10.ckpt").write_bytes(b"")
    with pytest.raises(SystemExit) as exit_info:
        main(["sample", str(damaged)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert re.fullmatch(r"error: Cannot read the checkpoint .*last.ckpt.*truncated or corrupt.*step=10.*\n", err)


def test_top_level_help_lists_every_subcommand(capsys):
    main(["--help"])
    printed = capsys.readouterr().out
    for subcommand in ("fit", "validate", "test", "predict", "sample", "compare", "export"):
        assert re.search(rf"^  {subcommand} ", printed, re.M), subcommand
    assert "--debug" in printed and "LIGHTNING_MOE_DEBUG" in printed


@pytest.mark.parametrize("bar_class", [TQDMProgressBar, RichProgressBar])
def test_progress_bar_counts_steps_of_max_steps(bar_class, tmp_path):
    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            bar = trainer.progress_bar_callback
            if isinstance(bar, TQDMProgressBar):
                tqdm = bar.train_progress_bar
                seen.append((tqdm.desc.rstrip(": "), tqdm.n, tqdm.total))
            else:
                task = bar.progress.tasks[bar.train_progress_bar_id]
                seen.append((task.description.strip(), task.completed, task.total))
            metrics.update(bar.get_metrics(trainer, pl_module))

    seen, metrics = [], {}
    trainer = L.Trainer(
        max_steps=6,
        accumulate_grad_batches=2,  # 2 batches per step: the bar counts steps, not batches
        limit_val_batches=0,
        callbacks=[bar_class(), Record()],
        logger=TensorBoardLogger(tmp_path),  # version 0: Lightning would show v_num
        enable_checkpointing=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    use_step_progress_bar(trainer)
    trainer.fit(BoringModel())
    assert seen[-1] == ("Steps", 6, 6) and len(seen) == 12
    assert [completed for _, completed, _ in seen] == [0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6]
    assert "v_num" not in metrics


# ---- one spelling of the estimator for every recipe: --model.estimator ---------------------

TINY_MOE = {"num_experts": 4, "top_k": 2, "backend": "loop"}


def test_top_level_estimator_replaces_the_moe_one_and_hparams_agree():
    from lightning_moe.estimators.sparsemixer_v2 import SparseMixerV2
    from lightning_moe.layer import moe_layers

    model = MoELanguageModel(
        d_model=32, n_heads=2, n_layers=2, moe={**TINY_MOE, "estimator": "topk"},
        estimator="sparsemixer_v2", estimator_args={"jitter_eps": 0.05},
    )
    layers = [layer for _, layer in moe_layers(model)]
    assert len(layers) == 2
    assert all(isinstance(layer.estimator, SparseMixerV2) and layer.estimator.jitter_eps == 0.05 for layer in layers)
    assert model.hparams.estimator == model.hparams.moe["estimator"] == "sparsemixer_v2"
    assert model.hparams.estimator_args == model.hparams.moe["estimator_args"] == {"jitter_eps": 0.05}


def test_moe_estimator_is_still_accepted_and_saved_in_both_spellings():
    from lightning_moe.estimators.default_moe import DefaultMoE
    from lightning_moe.layer import moe_layers

    model = MoELanguageModel(
        d_model=32, n_heads=2, n_layers=1, moe={**TINY_MOE, "estimator": "default_moe", "estimator_args": {"beta": 0.5}}
    )
    (_, layer), = moe_layers(model)
    assert isinstance(layer.estimator, DefaultMoE) and layer.estimator.beta == 0.5
    assert model.hparams.estimator == "default_moe" and model.hparams.estimator_args == {"beta": 0.5}


def test_a_checkpoint_from_before_the_top_level_estimator_loads_with_its_estimator(tmp_path):
    import torch

    from lightning_moe.estimators.default_moe import DefaultMoE
    from lightning_moe.layer import moe_layers

    model = MoELanguageModel(d_model=32, n_heads=2, n_layers=1, moe={**TINY_MOE, "estimator": "default_moe"})
    trainer = L.Trainer(logger=False, enable_checkpointing=False, default_root_dir=tmp_path)
    trainer.strategy.connect(model)
    path = tmp_path / "old.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["hyper_parameters"]["estimator"], checkpoint["hyper_parameters"]["estimator_args"]
    torch.save(checkpoint, path)  # as written before `estimator` was a top-level argument
    loaded = MoELanguageModel.load_from_checkpoint(path)
    (_, layer), = moe_layers(loaded)
    assert isinstance(layer.estimator, DefaultMoE)
    assert loaded.hparams.estimator == "default_moe"


def test_estimator_without_moe_layers_is_one_line():
    with pytest.raises(ValueError, match=r"model.estimator=.topk.: a dense model \(model.moe is null\)"):
        MoELanguageModel(d_model=32, n_heads=2, n_layers=1, moe=None, estimator="topk")


def test_both_recipe_kinds_take_model_estimator(capsys):
    byte_level = next(p for p in RECIPES if p.name == "quickstart.yaml")
    posttrain = next(p for p in RECIPES if p.name == "posttrain_tiny_offline.yaml")
    for recipe in (byte_level, posttrain):
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", "--config", str(recipe), "--model.estimator=densemixer", "--print_config"])
        assert exit_info.value.code == 0
        assert re.search(r"^ +estimator: densemixer$", capsys.readouterr().out, re.M), recipe.name


def test_moe_estimator_on_a_class_path_model_is_one_line_pointing_at_model_estimator(capsys):
    posttrain = next(p for p in RECIPES if p.name == "posttrain_tiny_offline.yaml")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(posttrain), "--model.moe.estimator=topk", "--print_config"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert re.fullmatch(r"error: model\.moe\.estimator.* --model\.estimator NAME .*\n", err), err


def test_recipes_and_readme_use_the_canonical_estimator_spelling():
    root = Path(__file__).parents[1]
    for path in [*(root / "recipes").glob("*.yaml"), root / "README.md"]:
        text = path.read_text()
        assert "moe.estimator" not in text or "alias" in text, path.name
        assert not re.search(r"^\s+moe:(\n\s+\w+:.*)*\n\s+estimator", text, re.M), path.name


def test_the_moe_estimator_flag_overrides_a_recipe_that_sets_the_top_level_estimator(tmp_path):
    from lightning_moe.estimators.topk import TopK
    from lightning_moe.layer import moe_layers
    from lightning_moe.module import canonical_estimator_flags

    grin = next(p for p in RECIPES if p.name == "grin.yaml")
    assert "\n  estimator: sparsemixer_v2\n" in grin.read_text()
    args = ["--config", str(grin), "--model.moe.estimator", "topk", "--model.moe.estimator_args={}"]
    args += ["--model.d_model=32", "--model.n_heads=2", "--model.n_layers=1", "--trainer.logger=false"]
    cli = LightningCLI(MoELanguageModel, TextDataModule, run=False, args=canonical_estimator_flags(args))
    assert all(type(layer.estimator) is TopK for _, layer in moe_layers(cli.model))
    # Under LightningCLI too, the checkpoint's hyperparameters name the estimator built, in both spellings.
    assert cli.model.hparams.estimator == cli.model.hparams.moe["estimator"] == "topk"
    assert cli.model.hparams.estimator_args == cli.model.hparams.moe["estimator_args"] == {}
