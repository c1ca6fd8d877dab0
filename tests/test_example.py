import importlib.util
import re
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "own_module.py"


def load_example():
    spec = importlib.util.spec_from_file_location("own_module_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("estimator", "balancing"), [("topk", "loss"), ("default_moe", "aux_free")])
def test_own_module_example_trains_and_writes_tensorboard_events(tmp_path, estimator, balancing):
    example = load_example()
    trainer = example.main(
        max_steps=4,
        root_dir=str(tmp_path / "runs"),
        estimator=estimator,
        balancing=balancing,
        max_bytes=100_000,
        cache_dir=str(tmp_path / "cache"),
    )
    assert trainer.global_step == 4
    events = EventAccumulator(trainer.logger.log_dir, size_guidance={"histograms": 0, "images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    assert {"train/loss", "val/loss", "moe/layer_00/entropy", "moe/layer_01/load_cv"} <= set(tags["scalars"])
    balancing_tag = "moe/layer_00/load_balancing_loss" if balancing == "loss" else "moe/layer_00/selection_bias_max_abs"
    assert balancing_tag in tags["scalars"]
    assert {"moe/layer_00/expert_load", "moe/layer_01/expert_load"} <= set(tags["histograms"])
    assert tags["images"] == ["moe/load_heatmap"]


def test_example_refuses_an_unknown_balancing():
    with pytest.raises(ValueError, match="balancing"):
        load_example().make_callbacks("topk", "both")


def load_script(path):
    spec = importlib.util.spec_from_file_location(path.stem + "_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("script", [EXAMPLE, EXAMPLE.parents[1] / "benchmarks" / "scaling.py"], ids=lambda p: p.name)
def test_help_mentions_only_options_that_exist(script):
    parser = load_script(script).make_parser()
    mentioned = set(re.findall(r"(?<![\w-])--[a-z][\w-]*", parser.format_help()))
    assert mentioned <= set(parser._option_string_actions), mentioned - set(parser._option_string_actions)


def test_example_offers_only_estimators_that_run_in_it():
    example = load_example()
    offered = next(a for a in example.make_parser()._actions if a.dest == "estimator").choices
    assert "topk" in offered and "sparsemixer_v2" in offered and "default_moe" in offered
    assert "sparsemixer" not in offered  # top-1 only; the example routes top-2
    with pytest.raises(SystemExit):
        example.make_parser().parse_args(["--estimator", "sparsemixer"])
