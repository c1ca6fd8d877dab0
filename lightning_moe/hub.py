"""Loading a Hugging Face Hub name from the local cache first, and asking the Hub once, without retries.

``transformers`` retries an unreachable Hub five times (~23 s) before it fails with a
network error that does not say what to do. :func:`load_cache_first` loads a Hub name from
the local cache without asking the Hub (so a cached model or tokenizer loads as it was
downloaded, even online); only when no complete cached copy exists, and ``HF_HUB_OFFLINE``
is not set, one request without retries asks the Hub, and the download starts only if it
answers. Anything else is one :class:`~lightning_moe.errors.ConfigError` line that names the
field and says how to fix it. Local folders are loaded as they are.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from lightning_moe.data.sources import first_line, honour_offline_env
from lightning_moe.errors import ConfigError

__all__ = ["hub_problem", "load_cache_first"]


def load_cache_first(name: str, load: Callable[..., Any], *, field: str, what: str, **kwargs: Any) -> Any:
    """``load(name, **kwargs)`` for a local folder; for a Hub name, the cache first, then the Hub if it answers.

    ``field`` names the setting in messages (e.g. ```pretrained```), ``what`` the kind of
    thing (e.g. "Hugging Face model"). ``load`` is a ``from_pretrained``-like callable that
    takes ``local_files_only``.
    """
    if os.path.isdir(name):
        try:
            return load(name, **kwargs)
        except OSError as err:  # a folder without the files it needs
            raise ConfigError(f"{field}={name!r} could not be loaded: {type(err).__name__}: {first_line(err)}") from err
    with honour_offline_env():
        from huggingface_hub import is_offline_mode

        try:
            return load(name, local_files_only=True, **kwargs)
        except OSError:
            pass  # not cached (or not completely): ask the Hub, if allowed
        offline = is_offline_mode()
        problem = "HF_HUB_OFFLINE is set, so the Hub was not asked" if offline else hub_problem(name)
        if problem is None:
            try:
                return load(name, **kwargs)
            except OSError as err:  # the connection dropped during the download, a file missing from the repo
                problem = f"{type(err).__name__}: {first_line(err)}"
    fix = (
        "download it once with network access (HF_HUB_OFFLINE unset)"
        if offline
        else "download it once with network access and then set HF_HUB_OFFLINE=1 to use the cached copy"
    )
    raise ConfigError(
        f"{field}={name!r}: could not load this {what}: {problem}; no complete cached copy of it exists and no"
        f" local folder of that name either. To fix: {fix}, or pass a local folder as {field}."
    )


def hub_problem(name: str) -> str | None:
    """Why the Hugging Face Hub cannot serve the repository ``name`` now, or ``None`` when it can.

    One request for its ``config.json``, without ``huggingface_hub``'s retries.
    """
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, HFValidationError, RepositoryNotFoundError

    try:
        get_hf_file_metadata(hf_hub_url(name, "config.json"))
    except GatedRepoError:
        return "it is a gated repository: accept its terms on the Hub, then log in (hf auth login)"
    except RepositoryNotFoundError:
        return "the Hugging Face Hub has no such repository (or it is private: log in with hf auth login)"
    except EntryNotFoundError:
        return None  # the repository exists (a tokenizer-only one may have no config.json): let load say more
    except HFValidationError as err:
        return f"not a Hub name ({first_line(err)})"
    except Exception as err:  # no network, DNS, proxy, TLS, timeouts, server errors: all "unreachable" here
        return f"the Hugging Face Hub could not be reached [{type(err).__name__}: {first_line(err)}]"
    return None
