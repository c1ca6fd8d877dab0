"""The trainer subcommands of ``lightning-moe`` (``fit``, ``validate``, ``test``, ``predict``).

They are Lightning's own ``LightningCLI`` over :class:`MoELanguageModel` and
:class:`TextDataModule` (:class:`MoECLI`), here apart from the command's dispatch
(:mod:`lightning_moe.cli`) so that ``lightning-moe compare`` (:mod:`lightning_moe.study`)
runs its fits through the same code without importing the command. :func:`user_error`
says which errors are the user's, printed as one ``error: ...`` line.
"""

from __future__ import annotations

import inspect
import os
import warnings
from argparse import ArgumentError
from typing import Any

import yaml
from jsonargparse import Namespace
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_moe.checkpointing import CheckpointError, read_checkpoint_settings, use_atomic_checkpoint_io
from lightning_moe.data import TextDataModule
from lightning_moe.distributed_checkpoint import is_distributed_checkpoint
from lightning_moe.errors import ConfigError
from lightning_moe.module import MoELanguageModel, canonical_estimator_flags
from lightning_moe.progress import choose_progress_display
from lightning_moe.resume import (
    RunConfigSaver,
    check_sharded_resume,
    check_writable_folders,
    continue_in_run_folder,
    evaluate_without_run_folder,
    resolve_last_checkpoint,
    resume_settings,
)
from lightning_moe.strategies import ExpertParallelStrategy  # noqa: F401 - registers "moe_expert_parallel" for recipes

TRAINER_SUBCOMMANDS = ("fit", "validate", "test", "predict")


class MoECLI(LightningCLI):
    """LightningCLI whose trainer writes checkpoints atomically (:class:`AtomicCheckpointIO`).

    Added to the trainer after it is built rather than as a ``trainer.plugins`` default, so
    recipes and ``--print_config`` stay unchanged; a checkpoint IO of another class that a recipe
    sets (``trainer.plugins``) is kept.
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The embedding size follows the data's tokenizer, so a recipe never states it twice.
        if not self.subclass_mode_model:
            parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        self._args = args  # parsed again without defaults when a checkpoint is resumed
        super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        """Choose the checkpoint ``--ckpt_path`` means and the settings the run resumes with (:mod:`lightning_moe.resume`).

        Replaces LightningCLI's step of the same name, which puts the checkpoint's model
        hyperparameters over the parsed ones, dropping every ``--model.*`` override. Runs before
        any class is built, so before the logger picks a new version folder.
        """
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        resolve_last_checkpoint(config, subcommand)  # "last": the newest checkpoint of this configuration
        check_checkpoint(config.get("ckpt_path"), "ckpt_path")
        if not (config.get("ckpt_path") and os.path.exists(config.ckpt_path)):
            return
        if subcommand == "fit":
            check_sharded_resume(config)
            continue_in_run_folder(config)
        # What the recipe and command line set, without defaults: those settings override the checkpoint's.
        parse = self.parser.parse_object if isinstance(self._args, (dict, Namespace)) else self.parser.parse_args
        explicit = parse(self._args, defaults=False)[subcommand]
        self.config = self.parser.parse_object({subcommand: resume_settings(config, explicit)}, self.config)

    def before_instantiate_classes(self) -> None:
        # Evaluating a checkpoint is not a training run: no new version folder, no saved configuration.
        if self.subcommand not in (None, "fit"):
            evaluate_without_run_folder(self.config[self.subcommand])
            self.save_config_callback = None

    def before_fit(self) -> None:
        # An unwritable log, checkpoint or cache folder fails now, not at the first log or checkpoint.
        check_writable_folders(self.trainer, self.datamodule)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        # A progress bar among the recipe's callbacks is the user's; Lightning's default one may be
        # replaced. Listed now: the Trainer appends its default bar to this very list.
        chosen = self._get(self.config_init, "trainer", default={}).get("callbacks")
        chosen = list(chosen) if isinstance(chosen, list) else [chosen]
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except (ValueError, MisconfigurationException) as err:  # Trainer(...) only checks its arguments
            raise ConfigError(f"trainer: {err}") from err
        use_atomic_checkpoint_io(trainer)
        choose_progress_display(trainer, chosen)
        self.summary = FitSummary()
        trainer.callbacks.append(self.summary)
        if self.subcommand == "fit":
            fix_run_folder(trainer)
        return trainer


# --------------------------------------------------------------------------- checkpoints given by the user

#: ``ckpt_path`` values Lightning resolves itself rather than reading a file.
_SPECIAL_CKPT_PATHS = ("last", "best", "hpc", "registry")


def check_checkpoint(path: str | None, field: str) -> type[LightningModule] | None:
    """Refuse ``path`` unless it is a readable checkpoint of :class:`MoELanguageModel` or ``HFMoELanguageModel``.

    Returns the class whose constructor takes the checkpoint's hyperparameters, or None for
    a path passed unchecked. A checkpoint is a ``.ckpt`` file or the folder of a distributed
    checkpoint (:mod:`lightning_moe.distributed_checkpoint`).

    Missing files, other folders, files that are not ``torch.save`` archives and checkpoints of
    another LightningModule raise :class:`ConfigError`; a damaged archive or an incomplete
    distributed checkpoint raises :class:`CheckpointError` (naming the checkpoints beside it).
    ``None``, Lightning's special values (``last``, ``best``, ...) and remote URLs pass
    unchecked. Tensors are not read (the archive is memory-mapped; of a folder only ``meta.pt``
    is read), so checking a large checkpoint reads little of it.
    """
    if path is None or str(path).split(":")[0] in _SPECIAL_CKPT_PATHS or "://" in str(path):
        return None
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ConfigError(f"{field}={path!r}: no such file; give a .ckpt written by lightning-moe fit")
    distributed = is_distributed_checkpoint(path)
    if not (distributed or os.path.isfile(path)):
        raise ConfigError(f"{field}={path!r} is a folder; give a .ckpt file in it (e.g. checkpoints/last.ckpt)")
    if not distributed:
        with open(path, "rb") as fh:
            is_zip = fh.read(4) == b"PK\x03\x04"
        if not is_zip:  # torch.save writes zip archives; a damaged one still starts like one
            raise ConfigError(
                f"{field}={path!r} is not a checkpoint (not a torch.save archive); give a .ckpt written by lightning-moe"
                " fit"
            )
    checkpoint = read_checkpoint_settings(path)
    hparams = dict(checkpoint.get("hyper_parameters") or {}) if isinstance(checkpoint, dict) else {}
    hparams.pop("_instantiator", None)
    hparams.pop("_class_path", None)  # recorded by LightningCLI for a model named by class_path
    if not isinstance(checkpoint, dict) or not (distributed or "state_dict" in checkpoint):
        raise ConfigError(f"{field}={path!r} is not a Lightning checkpoint (it has no state_dict)")
    from lightning_moe.hf.module import HFMoELanguageModel

    for cls in (MoELanguageModel, HFMoELanguageModel):
        if hparams and hparams.keys() <= set(inspect.signature(cls.__init__).parameters):
            return cls
    raise ConfigError(
        f"{field}={path!r} is a checkpoint of another model"
        f" (hyperparameters: {', '.join(sorted(hparams)) or 'none'}),"
        " not of lightning-moe's MoELanguageModel or HFMoELanguageModel; give a .ckpt written by lightning-moe fit"
    )


# --------------------------------------------------------------------------- running a subcommand


def run(argv: list[str]) -> None:
    """Run ``lightning-moe ARGV`` for a trainer subcommand (``ARGV[0]``, or options only); errors propagate as raised."""
    if names_classes(argv):
        classes = (None, None)
    else:
        classes, argv = (MoELanguageModel, TextDataModule), canonical_estimator_flags(argv)
    with warnings.catch_warnings():
        # The args given here are sys.argv's own (less --debug); Lightning warns when given both.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        cli = MoECLI(
            *classes,
            seed_everything_default=0,
            save_config_callback=RunConfigSaver,  # never over an earlier run's config.yaml
            # Raise parse errors (for lightning-moe to print in one line) instead of printing the full usage.
            parser_kwargs={"exit_on_error": False, **{c: {"exit_on_error": False} for c in TRAINER_SUBCOMMANDS}},
            args=argv,
        )
    if cli.subcommand == "fit" and cli.trainer.is_global_zero:
        summary = cli.summary.text
        if summary is None and cli.trainer.state.finished:
            # The ranks were processes this one started (ddp_spawn, ddp_fork): no process group
            # here, so Trainer.log_dir is no collective in this process.
            summary = fit_summary(cli.trainer)
        if summary is not None:
            print(summary, flush=True)


def names_classes(argv: list[str]) -> bool:
    """Whether the recipe names its model's class (``model: {class_path: ...}``) or the command line does.

    Such a recipe (a Hugging Face model's, :class:`~lightning_moe.hf.HFMoELanguageModel`) runs
    with any LightningModule and data module by ``class_path``, both named; otherwise ``model``
    and ``data`` are :class:`MoELanguageModel` and :class:`TextDataModule`, unnamed.
    """
    for index, arg in enumerate(argv):
        if arg.startswith(("--model=", "--model.class_path")) or (arg == "--model" and index + 1 < len(argv)):
            return True
        path = None
        if arg in ("--config", "-c") and index + 1 < len(argv):
            path = argv[index + 1]
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        if path is None or not os.path.isfile(path):
            continue
        try:
            with open(path) as fh:
                recipe = yaml.safe_load(fh)
        except (OSError, yaml.YAMLError):
            continue  # the parser reports it
        model = recipe.get("model") if isinstance(recipe, dict) else None
        if isinstance(model, dict) and "class_path" in model:
            return True
    return False


class FitSummary(Callback):
    """Notes :func:`fit_summary` at the end of ``fit``, on every rank, for :func:`run` to print on rank 0.

    ``Trainer.log_dir`` is a collective under DDP and ``ModelParallelStrategy`` (rank 0's
    value, broadcast). Read after ``fit`` returned, on rank 0 alone, it waited for ranks that
    had already exited, and the run ended in "Connection closed by peer" and exit 1.
    ``on_fit_end`` runs on every rank after the last checkpoint is written and before the
    ranks part, so every rank joins the broadcast and they agree on the text. Reading the
    logger's folder without a collective would work too, but would copy ``Trainer.log_dir``'s
    rule for which logger's folder counts.
    """

    def __init__(self) -> None:
        self.text: str | None = None

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.text = fit_summary(trainer)


def fix_run_folder(trainer: Trainer) -> None:
    """Choose the run's version folder now, in the process that starts the ranks.

    TensorBoardLogger and CSVLogger (the loggers whose folder ``Trainer.log_dir`` names) pick
    their ``version_N`` at first use. Under ``ddp_spawn`` or ``ddp_fork`` the ranks picked it in
    their own processes, and this one, asked after ``fit``, picked the next free folder, not the
    run's. Picked here, the ranks receive it with the trainer. Other loggers are left alone:
    asking some of them their version starts a run on their server.
    """
    logger = trainer.loggers[0] if trainer.loggers else None
    if isinstance(logger, (TensorBoardLogger, CSVLogger)):
        logger.version  # noqa: B018 - the property picks the version and keeps it


def fit_summary(trainer: Trainer) -> str:
    """Where a finished ``fit`` left its results: the run folder and the last/best checkpoints.

    Call it on every rank of a multi-process run (:class:`FitSummary`).
    """
    lines = [f"Run folder: {os.path.normpath(trainer.log_dir)}"]
    for callback in trainer.checkpoint_callbacks:
        if getattr(callback, "last_model_path", ""):
            lines.append(f"Last checkpoint: {callback.last_model_path}")
        if getattr(callback, "best_model_path", ""):
            score = callback.best_model_score
            monitored = f" ({callback.monitor} {float(score):.4f})" if callback.monitor and score is not None else ""
            lines.append(f"Best checkpoint: {callback.best_model_path}{monitored}")
    return "\n".join(lines)


def user_error(err: BaseException) -> str | None:
    """The one-line message for an error that is the user's (bad config or input), else ``None``.

    Follows the chain of direct causes (``raise ... from``), since jsonargparse re-raises an
    error from ``__init__`` inside its own (a :class:`ConfigError` in a dataclass field comes
    back wrapped in its union error, for instance); Lightning re-raises errors from its hooks
    as they are. An error merely raised while handling another (``__context__``) is not the
    user's: it keeps its traceback.
    """
    current: BaseException | None = err
    while current is not None:
        if isinstance(current, (ConfigError, CheckpointError, ArgumentError, MisconfigurationException)):
            return " ".join(line.strip() for line in str(current).splitlines() if line.strip())
        current = current.__cause__
    return None
