"""The Lightning releases whose loop internals lightning-moe reads, and the one-line refusal of others.

Exact mid-epoch resume needs two things Lightning keeps private: the training data loader
skips the batches already trained on by reading ``trainer.fit_loop.epoch_loop.batch_progress``
(:func:`~lightning_moe.data.loading.train_loader`), and
:class:`~lightning_moe.checkpointing.ResumableEpochEnd` rewrites the fit loop's progress
counters inside a checkpoint (``checkpoint["loops"]["fit_loop"]``). Their layout is not a
public contract, so a release that changes it would resume at the wrong batch without an
error. :func:`require_tested_lightning` stops such a run at its start instead;
``pyproject.toml`` admits the same releases.
"""

from __future__ import annotations

import lightning

from lightning_moe.errors import ConfigError

__all__ = ["TESTED_LIGHTNING", "require_tested_lightning"]

#: (major, minor) releases of ``lightning`` the resume tests passed on.
TESTED_LIGHTNING = ((2, 6),)
PIP_REQUIREMENT = "lightning>=2.6,<2.7"


def _major_minor(version: str) -> tuple[int, int] | None:
    parts = version.split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return None


def require_tested_lightning(feature: str, version: str | None = None) -> None:
    """Raise :class:`ConfigError` unless the installed ``lightning`` is a tested release.

    ``feature`` names what needs the internals, for the message; ``version`` defaults to
    the installed ``lightning.__version__``.
    """
    version = lightning.__version__ if version is None else version
    if _major_minor(version) in TESTED_LIGHTNING:
        return
    tested = ", ".join(f"{major}.{minor}.x" for major, minor in TESTED_LIGHTNING)
    raise ConfigError(
        f"lightning {version} is not a release lightning-moe was tested with ({tested}): {feature} reads"
        f" Lightning's loop progress counters, whose layout other releases may change;"
        f" install {PIP_REQUIREMENT!r}"
    )
