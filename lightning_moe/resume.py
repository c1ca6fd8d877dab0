"""Before ``lightning-moe`` runs a subcommand: which checkpoint ``--ckpt_path`` means, the settings a
resume keeps and changes, the folders it writes, and that they can be written.

**A run's identity.** A run is its model and data configuration (estimator included;
:mod:`lightning_moe.run_identity` says which settings count and which are training settings
only). ``--ckpt_path last`` means the newest ``last*.ckpt`` (a file, or the folder of a
distributed checkpoint, :mod:`lightning_moe.distributed_checkpoint`) of a run *of the same
configuration*: Lightning itself would take the newest one in the new run's own (empty)
``version_N/checkpoints`` folder, or, once found, whatever run wrote it. Here the candidates
are the checkpoint folders of every earlier version of the run's logger
(``<save_dir>/<name>/version_*/checkpoints``, Lightning's default logger too), of a logger with a
fixed ``version`` or no logger, and of ``ModelCheckpoint`` callbacks with a fixed ``dirpath``;
each candidate's saved ``hyper_parameters`` and ``datamodule_hyper_parameters`` are compared
with the new configuration, and the newest that matches wins. When checkpoints exist but none
matches, :class:`~lightning_moe.errors.ConfigError` names what differs and the folder of the
newest, and says how to resume a specific run (``--ckpt_path PATH``) or start a new one; with
no checkpoint at all it says where it looked. A run never starts over silently and never
continues in another configuration's folder. An incomplete distributed checkpoint (a folder
without ``.metadata`` or ``meta.pt``: its writer was killed part-way) is passed over with a
warning that names it. ``validate``/``test``/``predict --ckpt_path last`` choose the same way.

**Overrides on resume.** Lightning reloads the checkpoint's model hyperparameters over the parsed
ones, so a ``--model.*`` flag given with ``--ckpt_path`` used to vanish. Here
(:func:`resume_settings`) the checkpoint's model and data settings are the base and every
setting given explicitly (recipe or command line) goes on top: a training setting or the
estimator (an intended switch, which ``last`` would not choose) is applied and reported in one
line; a different architecture is refused in one line naming the field.

**Folders.** ``fit`` resuming a run's newest last checkpoint (by ``last`` or by its path)
continues in that run's ``version_N`` folder; from an older checkpoint it starts a new version
folder, so nothing of the run is overwritten. The configuration is saved without overwriting
(:class:`RunConfigSaver`): ``config.yaml`` for the first run in a folder, ``config-resume-1.yaml``,
``-2``, ... for each resume. ``validate``/``test``/``predict`` write no version folder and no
configuration (:func:`evaluate_without_run_folder`): their metrics are printed.

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
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_moe.checkpointing import read_checkpoint_settings
from lightning_moe.distributed_checkpoint import checkpoint_time, is_distributed_checkpoint, missing_parts
from lightning_moe.errors import ConfigError
from lightning_moe.run_identity import config_differences, describe, plain_settings, saved_config

__all__ = [
    "RunConfigSaver",
    "check_sharded_resume",
    "check_writable_folders",
    "continue_in_run_folder",
    "evaluate_without_run_folder",
    "resolve_last_checkpoint",
    "resume_settings",
]

#: What Lightning takes for a last checkpoint: ``last.ckpt``, ``last-v1.ckpt``, ... (files or folders)
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


def _incomplete(path: str) -> bool:
    """Whether ``path`` is a folder that is not a complete distributed checkpoint (a killed writer's)."""
    return os.path.isdir(path) and bool(missing_parts(path))


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


def _first_logger(trainer: Any) -> Any:
    loggers = trainer.get("logger")
    return (loggers[0] if loggers else False) if isinstance(loggers, list) else loggers


def _use_version(trainer: Any, version: str) -> None:
    """Point the first logger of a parsed trainer configuration at ``version`` (Lightning's default logger too)."""
    first, loggers = _first_logger(trainer), trainer.get("logger")
    if hasattr(first, "class_path"):
        first.init_args.version = version
    else:
        logger = _default_logger(os.fspath(trainer.get("default_root_dir") or os.getcwd()), version)
        trainer.logger = [logger, *loggers[1:]] if isinstance(loggers, list) else logger


def _checkpoint_folders(trainer: Any) -> tuple[list[tuple[str, str | None]], list[str]] | None:
    """The folders a run's last checkpoints are in, ``[(folder, logger version or None)]``, and the
    patterns searched (for messages); None when a logger or folder is left to Lightning."""
    default_root = os.fspath(trainer.get("default_root_dir") or os.getcwd())
    callbacks = [
        cb
        for cb in (trainer.get("callbacks") or [])
        if hasattr(cb, "class_path") and issubclass(_class(cb.class_path) or object, ModelCheckpoint)
    ]
    fixed = [os.fspath(cb.init_args.dirpath) for cb in callbacks if cb.init_args.get("dirpath")]
    folders: list[tuple[str, str | None]] = [(folder, None) for folder in fixed]
    searched = list(fixed)
    if len(fixed) < len(callbacks) or (not callbacks and trainer.get("enable_checkpointing") is not False):
        where = _log_folder(_first_logger(trainer), default_root)
        if where is None:
            return None
        kind, folder = where
        if kind == "fixed":
            folders.append((os.path.join(folder, "checkpoints"), None))
            searched.append(folders[-1][0])
        else:
            versions = [v for v in (os.listdir(folder) if os.path.isdir(folder) else []) if _VERSION.match(v)]
            folders += [(os.path.join(folder, v, "checkpoints"), v) for v in versions]
            searched.append(os.path.join(folder, "version_*", "checkpoints"))
    if any("://" in folder for folder in searched):
        return None
    return folders, searched


def _saved(path: str) -> dict[str, dict[str, Any]]:
    """The model and data settings of checkpoint ``path`` (its tensors are not read)."""
    checkpoint = read_checkpoint_settings(path)
    return saved_config(checkpoint if isinstance(checkpoint, dict) else {})


def _run_config(config: Any) -> dict[str, Any]:
    return {section: config.get(section) for section in ("model", "data")}


def resolve_last_checkpoint(config: Any, subcommand: str = "fit") -> None:
    """Replace ``ckpt_path="last"`` by the newest last checkpoint of a run of the same configuration.

    ``config`` is LightningCLI's namespace of the subcommand (``ckpt_path``, ``model``, ``data``,
    ``trainer``). Folders searched: the ``dirpath`` of every ``ModelCheckpoint`` that sets one;
    for those that do not, ``<save_dir>/<name>/version_*/checkpoints`` of the first logger
    (TensorBoard or CSV without a fixed ``version``, or Lightning's default logger), or the
    checkpoint folder of a logger with a fixed version or of a run without a logger. Among the
    checkpoints whose model and data settings match ``config``'s on every identity setting
    (:mod:`lightning_moe.run_identity`), the newest by modification time (as Lightning chooses)
    wins, incomplete distributed checkpoints passed over with a warning; for ``fit``, when it lies in a version folder, the logger's ``version`` is set to it.
    Other loggers and remote folders are left to Lightning. Raises :class:`ConfigError` when
    there is no checkpoint, or none of this configuration.
    """
    if config.get("ckpt_path") != "last":
        return
    found = _checkpoint_folders(config.trainer)
    if found is None:
        return
    folders, searched = found
    candidates = {path: version for folder, version in folders for path in _last_checkpoints(folder)}
    incomplete = sorted(path for path in candidates if _incomplete(path))
    for path in incomplete:
        del candidates[path]
        rank_zero_warn(
            f"ckpt_path='last': passing over {path}, an incomplete distributed checkpoint (no"
            f" {' or '.join(missing_parts(path))}; its writer was killed part-way)"
        )
    if not candidates:
        found_only = (
            f"only incomplete distributed checkpoints ({', '.join(incomplete)})" if incomplete else "no last*.ckpt"
        )
        raise ConfigError(
            f"ckpt_path='last': no checkpoint to resume; {found_only} in {', '.join(searched)}"
            " (a ModelCheckpoint with save_last: true writes one). Run without --ckpt_path to start a new run,"
            " or give a checkpoint's path."
        )
    ours = _run_config(config)
    newest_first = sorted(candidates, key=checkpoint_time, reverse=True)
    differing = {}  # identity settings that differ, by checkpoint
    for path in newest_first:
        differing[path] = [d for d in config_differences(_saved(path), ours) if d[0] != "training"]
        if not differing[path]:
            break
    else:
        newest = newest_first[0]
        others = f" (and {len(newest_first) - 1} more, none of this configuration)" if len(newest_first) > 1 else ""
        raise ConfigError(
            f"ckpt_path='last': no run of this configuration to resume; the newest checkpoint, {newest}{others},"
            f" is of another one: {describe(differing[newest], here='this configuration')}. Resume a specific run"
            " with --ckpt_path PATH (its estimator and training settings may differ), or start a new run: leave"
            " out --ckpt_path, or give it a folder of its own with --trainer.logger.init_args.version NAME"
        )
    config.ckpt_path = path
    if subcommand == "fit" and candidates[path] is not None:
        _use_version(config.trainer, candidates[path])


def continue_in_run_folder(config: Any) -> None:
    """For ``fit --ckpt_path PATH``: continue in PATH's version folder when PATH is that run's newest last checkpoint.

    Only a version folder of the run's own logger counts (``<save_dir>/<name>/version_N/checkpoints``);
    a checkpoint elsewhere, or an older one of the run (a branch), leaves the logger to start a new
    version folder, so no checkpoint of the run is overwritten.
    """
    path = config.get("ckpt_path")
    found = _checkpoint_folders(config.trainer) if path and os.path.exists(path) else None
    if found is None:
        return
    for folder, version in found[0]:
        lasts = [last for last in _last_checkpoints(folder) if not _incomplete(last)]
        if version is not None and lasts and os.path.samefile(max(lasts, key=checkpoint_time), path):
            _use_version(config.trainer, version)
            return


def _loads_shards(trainer: Any) -> bool:
    """Whether a parsed trainer configuration's strategy loads distributed checkpoints shard by shard."""
    strategy = trainer.get("strategy")
    cls = _class(strategy.class_path) if hasattr(strategy, "class_path") else None
    return cls is not None and issubclass(cls, ModelParallelStrategy)


def check_sharded_resume(config: Any) -> None:
    """For ``fit --ckpt_path PATH``: refuse to resume a distributed checkpoint under a strategy that cannot load its shards.

    Only ``ModelParallelStrategy`` (or a subclass) restores the sharded optimizer state; any other
    strategy would get the weights alone and fail in Lightning with a message about
    ``save_weights_only``. ``validate``/``test``/``predict`` read the weights of such a checkpoint
    under any strategy.
    """
    path = config.get("ckpt_path")
    if not (path and is_distributed_checkpoint(path)):
        return
    if not _loads_shards(config.trainer):
        strategy = config.trainer.get("strategy")
        shown = strategy.class_path if hasattr(strategy, "class_path") else strategy
        raise ConfigError(
            f"ckpt_path={os.fspath(path)!r} is a distributed checkpoint (a folder of shards), which only"
            f" lightning.pytorch.strategies.ModelParallelStrategy resumes; trainer.strategy is {shown!r}: resume with"
            " --trainer.strategy=lightning.pytorch.strategies.ModelParallelStrategy (as the run that wrote it), or"
            " evaluate its weights with validate/test"
        )


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        both_dicts = isinstance(merged.get(key), dict) and isinstance(value, dict) and key != "estimator_args"
        merged[key] = _merge(merged[key], value) if both_dicts else value
    return merged


def _as_parsed(settings: dict[str, Any], like: Any) -> dict[str, Any]:
    """Settings in the shape the parser holds them: ``{class_path, init_args}`` when ``like`` has a class path."""
    if "class_path" not in settings and not (hasattr(like, "get") and like.get("class_path")):
        return settings
    settings = dict(settings)
    class_path = settings.pop("class_path", None) or like.get("class_path")
    return {"class_path": class_path, "init_args": settings}


def resume_settings(config: Any, explicit: Any) -> dict[str, dict[str, Any]]:
    """The model and data settings a run resumed from ``config.ckpt_path`` (a file or a distributed checkpoint) builds with.

    The checkpoint's settings, with every setting given explicitly (``explicit``: the subcommand's
    namespace parsed without defaults, i.e. the recipe and the command line) on top. A different
    model architecture raises :class:`ConfigError` naming the fields; other changes (training
    settings, the estimator, the data) are applied and reported in one line, except an estimator
    switch on a distributed checkpoint loaded by ``ModelParallelStrategy`` (refused). Returns
    ``{"model": ..., "data": ...}`` to parse over ``config`` (sections the checkpoint has no
    settings for are left out).
    """
    path = os.fspath(config.ckpt_path)
    saved = _saved(path)
    settings, changes = {}, []
    for section in ("model", "data"):
        if not saved[section]:
            continue
        given = plain_settings(explicit.get(section))
        merged = _merge(saved[section], given)
        changes += config_differences({section: saved[section]}, {section: merged})
        settings[section] = _as_parsed(merged, config.get(section))
    refused = [change for change in changes if change[0] == "identity" and change[1].startswith("model.")]
    if refused:
        raise ConfigError(
            f"ckpt_path={path!r}: {describe(refused, here='this configuration')}; a run's model (architecture,"
            " pretrained weights, trainable parameters) cannot change on resume, only its training settings and"
            " estimator: drop these settings to resume it, or leave out --ckpt_path to start a new run"
        )
    switched = [change for change in changes if change[0] == "routing"]
    if switched and is_distributed_checkpoint(path) and _loads_shards(config.trainer):
        raise ConfigError(
            f"ckpt_path={path!r}: {describe(switched, here='this configuration')}; switching the estimator is not"
            " supported when resuming a distributed checkpoint (its shards load into the model as built, and a new"
            " estimator's state is not among them): keep the checkpoint's estimator settings, or switch from a .ckpt"
            " file (save_distributed_checkpoint: false)"
        )
    if changes:
        rank_zero_info(f"Resuming {path} with settings changed: {describe(changes, here='this run')}")
    return settings


def evaluate_without_run_folder(config: Any) -> None:
    """For ``validate``/``test``/``predict``: drop loggers that would create a new ``version_N`` run folder.

    Those are TensorBoard and CSV loggers without a fixed ``version`` and Lightning's default
    logger; their metrics are printed instead. Loggers with a fixed folder and others are kept.
    """
    trainer = config.trainer
    loggers = trainer.get("logger")
    kept = [
        logger
        for logger in (loggers if isinstance(loggers, list) else [loggers])
        if logger is not False and (_log_folder(logger, "") or ("fixed",))[0] != "versions"
    ]
    trainer.logger = kept if isinstance(loggers, list) else (kept[0] if kept else False)


class RunConfigSaver(SaveConfigCallback):
    """Saves a fit's configuration into its run folder without overwriting an earlier one.

    The first run in a folder writes ``config.yaml``; a run that continues in it (a resume)
    writes ``config-resume-1.yaml``, ``config-resume-2.yaml``, ..., so the folder keeps every
    configuration it was trained with, in order.
    """

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if not self.already_saved and self.save_to_log_dir:
            log_dir = trainer.log_dir  # broadcast by Lightning
            name = "config.yaml"
            if trainer.is_global_zero:
                fs, n = get_filesystem(log_dir), 0
                while fs.exists(os.path.join(log_dir, name)):
                    n += 1
                    name = f"config-resume-{n}.yaml"
            self.config_filename = trainer.strategy.broadcast(name)
        super().setup(trainer, pl_module, stage)


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
