"""Before ``lightning-moe fit`` trains: the checkpoint ``--ckpt_path last`` means, and folders it can write.

``fit --ckpt_path last`` finds the newest checkpoint of the same run and continues in its folder.

Lightning looks for ``last`` in the folders of the new run's ``ModelCheckpoint`` callbacks. A
recipe that logs with a ``TensorBoardLogger`` or ``CSVLogger`` gives every run a new
``<save_dir>/<name>/version_N/`` folder, and its checkpoints go to ``version_N/checkpoints/``,
so the new run looks in its own empty folder, warns and trains from step 0. Here ``last``
is resolved on the run's configuration before anything is built: the newest ``last*.ckpt``
among the checkpoint folders of every earlier version (and of ``ModelCheckpoint`` callbacks
with a fixed ``dirpath``) becomes ``ckpt_path``, and the logger is pointed at that checkpoint's
version, so logs and checkpoints continue in the same folder. When there is nothing to
resume, :class:`~lightning_moe.errors.ConfigError` says where it looked; a run never starts
over silently.

:func:`check_writable_folders` refuses log, checkpoint and cache folders that cannot be written
(read-only disk, no permission, a file in the way) with a :class:`ConfigError` naming the
setting, before any data is read or step taken, rather than failing at the first log or
checkpoint.
"""

from __future__ import annotations

import errno
import importlib
import importlib.util
import os
import re
import tempfile
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from lightning_moe.errors import ConfigError

__all__ = ["check_writable_folders", "resolve_last_checkpoint"]

#: What Lightning takes for a last checkpoint: ``last.ckpt``, ``last-v1.ckpt``, ...
_LAST = re.compile(r"^last.*\.ckpt$")
_VERSION = re.compile(r"^version_(\d+)$")


def _class(class_path: str) -> type | None:
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def _last_checkpoints(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        return []
    return [os.path.join(folder, f) for f in os.listdir(folder) if _LAST.match(f)]


def _log_folder(logger: Any, default_root: str) -> tuple[str, Any] | None:
    """Where the first logger of a configuration writes: ``("versions", root)`` for a TensorBoard/CSV
    logger without a fixed version (Lightning's default logger too), ``("fixed", folder)`` when the
    folder is known, None for other loggers."""
    if logger is False:
        return "fixed", default_root
    if logger is None or logger is True:  # Lightning's default logger
        return "versions", os.path.join(default_root, "lightning_logs")
    cls = _class(logger.class_path) if hasattr(logger, "class_path") else None
    if cls is None or not issubclass(cls, (TensorBoardLogger, CSVLogger)):
        return None
    args = logger.init_args
    root = os.path.join(os.fspath(args.get("save_dir") or default_root), args.get("name") or "")
    version = args.get("version")
    if version is None:
        return "versions", root
    return "fixed", os.path.join(root, version if isinstance(version, str) else f"version_{version}")


def _default_logger(save_dir: str, version: str) -> Namespace:
    """Lightning's default logger (TensorBoard when installed, else CSV), with its version fixed."""
    tensorboard = any(importlib.util.find_spec(m) for m in ("tensorboard", "tensorboardX"))
    cls = TensorBoardLogger if tensorboard else CSVLogger
    return Namespace(
        class_path=f"{cls.__module__}.{cls.__name__}",
        init_args=Namespace(save_dir=save_dir, name="lightning_logs", version=version),
    )


def resolve_last_checkpoint(config: Any) -> None:
    """Replace ``ckpt_path="last"`` in a parsed ``fit`` configuration by the run's newest last checkpoint.

    ``config`` is LightningCLI's namespace of the subcommand (``ckpt_path``, ``trainer``, ...).
    Folders searched: the ``dirpath`` of every ``ModelCheckpoint`` that sets one; for those
    that do not, ``<save_dir>/<name>/version_*/checkpoints`` of the first logger (TensorBoard
    or CSV without a fixed ``version``, or Lightning's default logger), or the checkpoint
    folder of a logger with a fixed version or of a run without a logger. The newest file (by
    modification time, as Lightning chooses) wins; when it lies in a version folder, the
    logger's ``version`` is set to it. Other loggers and remote folders are left to Lightning.
    Raises :class:`ConfigError` when there is no checkpoint to resume.
    """
    if config.get("ckpt_path") != "last":
        return
    trainer = config.trainer
    default_root = os.fspath(trainer.get("default_root_dir") or os.getcwd())
    callbacks = [
        cb
        for cb in (trainer.get("callbacks") or [])
        if hasattr(cb, "class_path") and issubclass(_class(cb.class_path) or object, ModelCheckpoint)
    ]
    fixed = [os.fspath(cb.init_args.dirpath) for cb in callbacks if cb.init_args.get("dirpath")]
    folders: list[tuple[str, str | None]] = [(folder, None) for folder in fixed]  # (folder, logger version)
    searched = list(fixed)
    loggers = trainer.get("logger")
    first = (loggers[0] if loggers else False) if isinstance(loggers, list) else loggers
    if len(fixed) < len(callbacks) or (not callbacks and trainer.get("enable_checkpointing") is not False):
        where = _log_folder(first, default_root)
        if where is None:
            return
        kind, folder = where
        if kind == "fixed":
            folders.append((os.path.join(folder, "checkpoints"), None))
            searched.append(folders[-1][0])
        else:
            versions = [v for v in (os.listdir(folder) if os.path.isdir(folder) else []) if _VERSION.match(v)]
            folders += [(os.path.join(folder, v, "checkpoints"), v) for v in versions]
            searched.append(os.path.join(folder, "version_*", "checkpoints"))
    if any("://" in folder for folder in searched):
        return
    found = {path: version for folder, version in folders for path in _last_checkpoints(folder)}
    if not found:
        raise ConfigError(
            f"ckpt_path='last': no checkpoint to resume; no last*.ckpt in {', '.join(searched)}"
            " (a ModelCheckpoint with save_last: true writes one). Run without --ckpt_path to start a new run,"
            " or give a checkpoint's path."
        )
    newest = max(found, key=os.path.getmtime)
    config.ckpt_path = newest
    version = found[newest]
    if version is not None:
        if hasattr(first, "class_path"):
            first.init_args.version = version
        else:
            logger = _default_logger(default_root, version)
            trainer.logger = [logger, *loggers[1:]] if isinstance(loggers, list) else logger


def _write_error(folder: str) -> OSError | None:
    """Why a file cannot be created in ``folder`` (created if missing), or None if it can."""
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        return err
    return None


def check_writable_folders(trainer: Any, datamodule: Any = None) -> None:
    """Raise :class:`ConfigError` unless every folder the fit will write to can be written.

    Checked: the loggers' ``save_dir`` (``trainer.default_root_dir`` without a logger), the
    ``dirpath`` of every ``ModelCheckpoint`` that sets one, and the datamodule's ``cache_dir``
    when it is set. Missing folders are created, as the run would create them; remote
    (``s3://``-style) folders are not checked.
    """
    folders = [
        (f"trainer.logger {type(logger).__name__} save_dir", getattr(logger, "save_dir", None))
        for logger in trainer.loggers
    ]
    if not trainer.loggers:
        folders.append(("trainer.default_root_dir", trainer.default_root_dir))
    folders += [("ModelCheckpoint dirpath", getattr(cb, "dirpath", None)) for cb in trainer.checkpoint_callbacks]
    folders.append(("data.cache_dir", getattr(datamodule, "cache_dir", None)))
    for field, folder in folders:
        if folder is None or "://" in os.fspath(folder):
            continue
        folder = os.path.expanduser(os.fspath(folder))
        err = _write_error(folder)
        if err is not None:
            reason = os.strerror(err.errno) if err.errno else str(err)
            code = f" ({errno.errorcode[err.errno]})" if err.errno in errno.errorcode else ""
            raise ConfigError(
                f"{field}={folder!r} is not writable: {reason}{code}; choose a folder this process can write to"
            )
