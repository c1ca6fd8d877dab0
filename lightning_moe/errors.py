"""Errors that mean "the user's configuration or input is wrong", not "the code is wrong".

The ``lightning-moe`` command prints a :class:`ConfigError` as one ``error: ...`` line on
stderr and exits with status 2 (no traceback); any other exception keeps its traceback.
Raise it with a message that names the bad field and says what would be valid, e.g.
``ConfigError("model.moe.top_k=9 is larger than model.moe.num_experts=8; use 1..8")``.
It subclasses :class:`ValueError`, so code that catches ``ValueError`` keeps working.
"""

from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """A bad configuration value or input (file, checkpoint, data source), named in the message."""
