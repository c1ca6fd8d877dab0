"""``lightning-moe --help`` and ``fit --help``: short, described, naming the subcommand, and light to import."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_moe.cli import main

QUICKSTART = str(Path(__file__).parents[1] / "recipes" / "quickstart.yaml")

# What importing a module does not do when it is never used: Python's own record of loaded modules.
IMPORTS_OF_HELP = """
import sys
from lightning_moe.cli import main
try:
    main({args!r})
except SystemExit as exit_:
    assert exit_.code in (0, None), exit_.code
heavy = sorted(m for m in ("torch", "lightning", "numpy") if m in sys.modules)
print("HEAVY:", ",".join(heavy))
"""


@pytest.mark.parametrize(
    "args", [["--help"], ["-h"], ["fit", "--help"], ["fit", "-h"], ["sample", "--help"], ["export", "--help"]]
)
def test_help_imports_neither_torch_nor_lightning(args):
    result = subprocess.run(
        [sys.executable, "-c", IMPORTS_OF_HELP.format(args=args)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "HEAVY: ", result.stdout


def test_installed_command_help_runs():
    result = subprocess.run(["lightning-moe", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("usage: lightning-moe SUBCOMMAND"), result.stdout


def fit_help(capsys):
    main(["fit", "--help"])
    return capsys.readouterr().out


def test_fit_help_is_short_names_the_subcommand_and_describes_the_common_options(capsys):
    printed = fit_help(capsys)
    lines = printed.splitlines()
    assert lines[0].startswith("usage: lightning-moe fit ")
    assert len(lines) <= 60, len(lines)
    for option in ("--model.estimator", "--model.estimator_args", "--model.d_model", "--model.n_layers"):
        # Each option is on a line of its own, followed by words saying what it is.
        assert re.search(rf"^  {re.escape(option)} \S+ +\w+ \w+", printed, re.M), option
    assert "--help=full" in printed and "--print_config" in printed


def test_fit_help_names_every_registered_estimator(capsys):
    from lightning_moe import available_estimators

    printed = fit_help(capsys)
    described = printed[printed.index("--model.estimator NAME") : printed.index("--model.estimator_args")]
    assert set(re.findall(r"\b[a-z_0-9]+\b", described)) >= set(available_estimators())


def curated_options(printed):
    return [o for o in re.findall(r"^  (--[\w.]+)", printed, re.M) if o not in ("--help", "--print_config", "--debug")]


# A value for every option fit --help lists, and how --print_config shows it: each option must be
# one the real parser accepts, with the meaning the help gives it.
SAMPLE_VALUES = {
    "--config": (QUICKSTART, None),
    "--model.d_model": ("96", "d_model: 96"),
    "--model.n_layers": ("3", "n_layers: 3"),
    "--model.n_heads": ("6", "n_heads: 6"),
    "--model.max_seq_len": ("64", "max_seq_len: 64"),
    "--model.estimator": ("sparsemixer_v2", "estimator: sparsemixer_v2"),
    "--model.estimator_args": ('{"jitter_eps": 0.05}', "jitter_eps: 0.05"),
    "--model.moe.num_experts": ("12", "num_experts: 12"),
    "--model.moe.top_k": ("3", "top_k: 3"),
    "--model.moe.ffn_hidden": ("80", "ffn_hidden: 80"),
    "--model.moe.backend": ("loop", "backend: loop"),
    "--model.learning_rate": ("0.0042", "learning_rate: 0.0042"),
    "--model.warmup_steps": ("17", "warmup_steps: 17"),
    "--data.source": ("corpus.txt", "source: corpus.txt"),
    "--data.seq_len": ("48", "seq_len: 48"),
    "--data.batch_size": ("5", "batch_size: 5"),
    "--trainer.max_steps": ("77", "max_steps: 77"),
    "--trainer.val_check_interval": ("11", "val_check_interval: 11"),
    "--trainer.accelerator": ("cpu", "accelerator: cpu"),
    "--trainer.devices": ("1", "devices: '1'"),  # Lightning's devices is int | str | list: kept as given
    "--trainer.precision": ("bf16-mixed", "precision: bf16-mixed"),
    "--ckpt_path": ("last", "ckpt_path: last"),
}


def test_every_option_fit_help_lists_is_accepted_by_the_real_parser(capsys):
    listed = curated_options(fit_help(capsys))
    assert set(listed) == set(SAMPLE_VALUES), set(listed) ^ set(SAMPLE_VALUES)
    args = ["fit"]
    for option in listed:
        args += [option, SAMPLE_VALUES[option][0]]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    for option, (_, shown) in SAMPLE_VALUES.items():
        if shown is not None:
            assert shown in printed, option


def test_full_fit_help_is_lightnings_own_and_shows_the_estimator(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/venv/bin/lightning-moe"])  # argparse's prog, as when installed
    with pytest.raises(SystemExit):
        main(["fit", "--help=full"])
    printed = capsys.readouterr().out
    assert "--trainer.max_steps" in printed and re.search(r"--model\.estimator ESTIMATOR", printed)
    assert re.search(r"^usage: lightning-moe .*fit", printed, re.M)
    # The model's fields are described (jsonargparse shows the docstring's Args), not bare names.
    for field in ("d_model", "n_layers", "n_heads", "max_seq_len", "estimator", "estimator_args"):
        assert re.search(rf"^  --model\.{field} \S+\n +[a-z`]", printed, re.M), field


@pytest.mark.parametrize("subcommand", ["sample", "export", "compare"])
def test_subcommand_usage_names_the_subcommand(subcommand, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([subcommand, "--help"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    usage = printed.split("\n\n")[0]
    assert usage.startswith(f"usage: lightning-moe {subcommand} "), usage
    tokens = usage.split()
    # A list-valued option shows ``[--seeds [ITEM,...]]``; a bare ``[ITEM,...]`` is a required positional.
    assert all(tokens[i - 1].startswith("[--") for i, t in enumerate(tokens) if t.startswith("[ITEM")), usage
