"""Every recipe validates the model it saves last: its final optimizer step is followed by validation.

Lightning counts an integer ``val_check_interval`` in training batches of the current epoch,
restarting at every epoch, unless ``check_val_every_n_epoch: null``, when it counts every
training batch of the run. A run stopped by ``max_steps`` does not validate at its end by
itself. So a recipe validates its last step, whatever the size of its data, when it counts
across epochs and ``max_steps * accumulate_grad_batches`` is a multiple of the interval. The
rule is checked on every recipe; a shrunk real run shows Lightning behaves as the rule says,
with an epoch length the interval does not divide.
"""

from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_moe.cli import main
from lightning_moe.data import TextDataModule

RECIPES = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))


def fit_settings(path: Path) -> tuple[dict, int]:
    """The ``trainer`` section and the step budget of a fit recipe or of a study's runs."""
    recipe = yaml.safe_load(path.read_text())
    if "configurations" not in recipe:
        return recipe["trainer"], recipe["trainer"]["max_steps"]
    base = recipe["base"]
    if isinstance(base, str):
        base = yaml.safe_load((path.parents[1] / base).read_text())
    return base["trainer"], recipe.get("steps") or base["trainer"]["max_steps"]


def validates_last_step(trainer: dict, max_steps: int) -> bool:
    batches = max_steps * trainer.get("accumulate_grad_batches", 1)
    interval = trainer.get("val_check_interval", 1.0)
    return (
        trainer.get("limit_val_batches", 1.0) != 0
        and "check_val_every_n_epoch" in trainer
        and trainer["check_val_every_n_epoch"] is None
        and isinstance(interval, int)
        and batches % interval == 0
    )


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_validates_its_last_step(recipe):
    trainer, max_steps = fit_settings(recipe)
    assert validates_last_step(trainer, max_steps), (trainer, max_steps)


def test_a_shrunk_recipe_run_validates_and_saves_its_last_step(tmp_path):
    quickstart = next(p for p in RECIPES if p.name == "quickstart.yaml")
    trainer, _ = fit_settings(quickstart)
    data = {"source": "stdlib", "seq_len": 32, "batch_size": 8, "max_bytes": 6000, "cache_dir": str(tmp_path / "cache")}
    module = TextDataModule(**data)
    module.prepare_data()
    module.setup("fit")
    per_epoch = len(module.train_dataloader())
    # An interval that does not divide the epoch, and a run ending in the second epoch on a multiple of it:
    # counted per epoch, the last step would not be validated.
    interval = next(k for k in range(3, per_epoch) if per_epoch % k)
    steps = interval * (per_epoch // interval + 1)
    assert per_epoch < steps < 2 * per_epoch and (steps - per_epoch) % interval
    assert validates_last_step({**trainer, "val_check_interval": interval}, steps)
    main(
        [
            "fit",
            "--config",
            str(quickstart),
            "--model.d_model=32",
            "--model.n_heads=2",
            "--model.n_layers=1",
            "--model.moe.ffn_hidden=32",
            "--model.moe.num_experts=2",
            "--model.moe.top_k=1",
            *(f"--data.{key}={value}" for key, value in data.items()),
            f"--trainer.max_steps={steps}",
            f"--trainer.val_check_interval={interval}",
            "--trainer.limit_val_batches=1",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
        ]
    )
    run_dir = tmp_path / "runs" / "quickstart" / "version_0"
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    validated = [event.step for event in events.Scalars("val/loss")]
    # Lightning logs the validation after optimizer step s at step s - 1 (the steps taken before it began).
    assert validated == [k * interval - 1 for k in range(1, steps // interval + 1)], validated
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == steps
    (state,) = [s for key, s in last["callbacks"].items() if key.startswith("ModelCheckpoint")]
    assert state["current_score"] is not None and state["monitor"] == "val/loss"
