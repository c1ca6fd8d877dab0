"""Every ```python block of README.md runs as written, so the README cannot rot.

Blocks run in order, each in a fresh namespace, in a scratch folder (anything they write
lands there, the token cache too). A block may be preceded by an invisible marker
``<!-- readme-test: replace "OLD" "NEW" -->`` that shrinks it for the test (fewer steps,
less data); the README shows the block as a reader would run it.
"""

import re
from pathlib import Path

import pytest

from lightning_moe.estimators import ESTIMATOR_REGISTRY

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"((?:<!-- readme-test: .*? -->\n)*)```python\n(.*?)```", re.S)
REPLACE = re.compile(r'<!-- readme-test: replace "(.*?)" "(.*?)" -->')


def python_blocks():
    blocks = []
    text = README.read_text()
    for match in BLOCK.finditer(text):
        code = match[2]
        for old, new in REPLACE.findall(match[1]):
            assert old in code, f"readme-test marker replaces {old!r}, which the block does not contain"
            code = code.replace(old, new)
        line = text[: match.start(2)].count("\n") + 1
        blocks.append(pytest.param(code, id=f"line{line}"))
    return blocks


def test_the_readme_has_python_blocks():
    assert len(python_blocks()) >= 4


@pytest.mark.parametrize("code", python_blocks())
def test_readme_python_block_runs(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LIGHTNING_MOE_CACHE", str(tmp_path / "cache"))
    registered = set(ESTIMATOR_REGISTRY)
    try:
        exec(compile(code, str(README), "exec"), {"__name__": "readme_block"})
    finally:  # an estimator a block registers does not outlive it
        for name in set(ESTIMATOR_REGISTRY) - registered:
            ESTIMATOR_REGISTRY.remove(name)
