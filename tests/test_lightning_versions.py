"""A Lightning release whose loop internals were not tested is refused in one line before training."""

import contextlib
import io
import tomllib
from pathlib import Path

import lightning
import pytest
from packaging.requirements import Requirement

from lightning_moe.cli import main
from lightning_moe.errors import ConfigError
from lightning_moe.lightning_versions import PIP_REQUIREMENT, TESTED_LIGHTNING, require_tested_lightning

ROOT = Path(__file__).resolve().parents[1]


def test_the_installed_release_is_a_tested_one():
    require_tested_lightning("resume")  # the suite itself runs on a tested release


@pytest.mark.parametrize("version", ["2.7.0", "3.0.1", "2.4.0", "nightly"])
def test_other_releases_are_refused_naming_the_release_and_the_requirement(version):
    with pytest.raises(ConfigError, match=rf"lightning {version} .*{PIP_REQUIREMENT}") as err:
        require_tested_lightning("resume", version)
    assert "\n" not in str(err.value)


def test_the_package_requirement_admits_exactly_the_tested_releases():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (requirement,) = [Requirement(r) for r in project["dependencies"] if Requirement(r).name == "lightning"]
    assert str(requirement.specifier) == str(Requirement(PIP_REQUIREMENT).specifier)
    for major, minor in TESTED_LIGHTNING:
        assert requirement.specifier.contains(f"{major}.{minor}.0") and requirement.specifier.contains(f"{major}.{minor}.9")
    last_major, last_minor = TESTED_LIGHTNING[-1]
    first_major, first_minor = TESTED_LIGHTNING[0]
    assert not requirement.specifier.contains(f"{last_major}.{last_minor + 1}.0")
    assert not requirement.specifier.contains(f"{first_major}.{first_minor - 1}.9")


def test_a_fit_on_an_untested_release_stops_with_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(lightning, "__version__", "2.7.0")
    (tmp_path / "corpus.txt").write_text("".join(f"def f{i}(x):\n    return x * {i}\n\n" for i in range(300)))
    args = [
        "fit", "--config", str(ROOT / "recipes" / "quickstart.yaml"),
        "--model.d_model=32", "--model.n_heads=2", "--model.n_layers=1", "--model.max_seq_len=16",
        "--model.moe.num_experts=4", "--model.moe.ffn_hidden=32",
        "--data.source=corpus.txt", "--data.seq_len=16", "--data.batch_size=2", f"--data.cache_dir={tmp_path / 'cache'}",
        "--trainer.max_steps=2", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
    ]  # fmt: skip
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    lines = err.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: lightning 2.7.0 "), lines
