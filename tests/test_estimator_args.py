"""Every registered estimator's arguments are checked for type (and range) with one line naming them."""

import inspect
import re
import typing
from pathlib import Path

import pytest

from lightning_moe import ESTIMATOR_REGISTRY, available_estimators
from lightning_moe.cli import main
from lightning_moe.errors import ConfigError

# A value of the wrong type for each annotation the estimators use, and the words the
# message must use for the type that was expected.
WRONG = {float: ("0.1", "a number"), bool: ("yes", "true or false"), str: (1, "a string"), int: ("1", "an integer")}


def arguments():
    for name in available_estimators():
        cls = ESTIMATOR_REGISTRY[name]["estimator"]
        hints = typing.get_type_hints(cls.__init__)
        for arg, param in inspect.signature(cls).parameters.items():
            if param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                yield name, arg, hints[arg]


def test_every_estimator_argument_is_annotated_with_a_checked_type():
    args = list(arguments())
    assert {name for name, _, _ in args} >= {"topk", "sparsemixer", "sparsemixer_v2", "default_moe", "densemixer"}
    assert all(hint in WRONG for _, _, hint in args), [(n, a, h) for n, a, h in args if h not in WRONG]


@pytest.mark.parametrize("name,arg,hint", list(arguments()), ids=lambda v: getattr(v, "__name__", str(v)))
def test_a_wrong_type_is_one_line_naming_the_argument_estimator_and_type(name, arg, hint):
    wrong, expected = WRONG[hint]
    with pytest.raises(ConfigError) as info:
        ESTIMATOR_REGISTRY.get(name, **{arg: wrong})
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"estimator_args for estimator={name!r}: {arg} must be {expected}, got "), message
    assert repr(wrong) in message


@pytest.mark.parametrize("name", available_estimators())
def test_an_unknown_argument_is_one_line_listing_the_accepted_ones(name):
    with pytest.raises(ConfigError) as info:
        ESTIMATOR_REGISTRY.get(name, no_such_argument=1)
    message = str(info.value)
    accepted = [arg for estimator, arg, _ in arguments() if estimator == name]
    assert "\n" not in message and message.startswith(f"estimator_args for estimator={name!r}: ")
    assert "no_such_argument" in message and all(arg in message for arg in accepted), message


def test_the_issue_example():
    with pytest.raises(ConfigError) as info:
        ESTIMATOR_REGISTRY.get("sparsemixer_v2", jitter_eps="0.1")
    assert str(info.value) == (
        "estimator_args for estimator='sparsemixer_v2': jitter_eps must be a number, got the string '0.1'"
    )


@pytest.mark.parametrize(
    "name,args",
    [
        ("topk", {"jitter_eps": 0}),  # an integer is a number
        ("topk", {"renormalize": True, "jitter_eps": 0.5}),
        ("sparsemixer_v2", {"jitter_eps": 1}),
        ("default_moe", {"beta": 0, "weighted": True, "weighted_normalizer": "token_count"}),
    ],
)
def test_values_of_the_right_type_are_accepted(name, args):
    estimator = ESTIMATOR_REGISTRY.get(name, **args)
    for arg, value in args.items():
        assert getattr(estimator, arg) == value


@pytest.mark.parametrize(
    "name,arg,value",
    [
        ("topk", "jitter_eps", 1.5),
        ("densemixer", "jitter_eps", -0.1),
        ("sparsemixer", "jitter_eps", float("nan")),
        ("sparsemixer_v2", "jitter_eps", -1),
        ("default_moe", "beta", 1.0),
        ("default_moe", "weighted_normalizer", "mean"),
    ],
)
def test_an_out_of_range_value_names_the_estimator_and_argument(name, arg, value):
    with pytest.raises(ConfigError) as info:
        ESTIMATOR_REGISTRY.get(name, **{arg: value})
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"estimator_args for estimator={name!r}: ") and arg in message


def test_the_command_prints_one_line_for_a_wrong_typed_estimator_argument(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "fit",
                "--config",
                str(Path(__file__).parents[1] / "recipes" / "quickstart.yaml"),
                "--model.moe.estimator=sparsemixer_v2",
                '--model.moe.estimator_args={"jitter_eps": "0.1"}',
                f"--trainer.default_root_dir={tmp_path}",
                "--trainer.logger=false",
            ]
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert re.fullmatch(r"error: .*jitter_eps must be a number, got the string '0.1'\n", err), err
