"""How ``lightning-moe fit`` shows training progress: Lightning's bars counting optimizer steps,
or, when stdout is not a terminal, one plain line every few steps (:class:`StepLog`).

Lightning's default bar is Rich's when ``rich`` is installed (the ``hf`` and ``test`` extras
install it), and Rich writes to a file only the bar's last state, when the run ends: a run
whose output was redirected to a log showed no progress until it ended. :func:`choose_progress_display` puts :class:`StepLog` in
place of that default bar; a bar the recipe sets itself is kept.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterable
from datetime import timedelta
from typing import Any, TextIO

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar

from lightning_moe.errors import ConfigError

#: :class:`StepLog` prints at most about this many training lines in a run with a known length.
MAX_LINES = 50


class _StepCount:
    """A training progress bar that counts optimizer steps of ``max_steps`` when the run has a step budget.

    Lightning's bars count batches of the current epoch, which for a run stopped by
    ``max_steps`` (``max_epochs`` unset, shown as -1) reads ``Epoch 0/-2``; the logger's
    version (``v_num``) is left out too, since the run folder is printed when ``fit`` ends.
    """

    def _counts_steps(self) -> bool:
        trainer = self.trainer
        return trainer.max_steps is not None and trainer.max_steps > 0 and trainer.max_epochs in (None, -1)

    @property
    def total_train_batches(self) -> int | float:
        return self.trainer.max_steps if self._counts_steps() else super().total_train_batches

    def on_train_epoch_start(self, trainer: Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        if self._counts_steps() and isinstance(self, TQDMProgressBar) and self.train_progress_bar is not None:
            self.train_progress_bar.set_description("Steps")

    def _get_train_description(self, current_epoch: int) -> str:  # RichProgressBar's
        return "Steps" if self._counts_steps() else super()._get_train_description(current_epoch)

    def on_train_batch_end(self, trainer: Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        # The bars show ``batch_idx + 1`` as done; here that is the optimizer steps taken so far.
        done = trainer.global_step if self._counts_steps() else batch_idx + 1
        super().on_train_batch_end(trainer, pl_module, outputs, batch, done - 1)

    def get_metrics(self, trainer: Trainer, pl_module: Any) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics


class StepTQDMProgressBar(_StepCount, TQDMProgressBar):
    """Lightning's ``TQDMProgressBar``, counting steps of ``max_steps`` in step-budgeted runs."""


class StepRichProgressBar(_StepCount, RichProgressBar):
    """Lightning's ``RichProgressBar``, counting steps of ``max_steps`` in step-budgeted runs."""


def use_step_progress_bar(trainer: Trainer) -> None:
    """Make Lightning's default progress bar count steps of ``max_steps`` (a bar of another class is kept).

    The bar's class is switched in place, so its settings (refresh rate, theme, ...) stay.
    """
    for callback in trainer.callbacks:
        if type(callback) is TQDMProgressBar:
            callback.__class__ = StepTQDMProgressBar
        elif type(callback) is RichProgressBar:
            callback.__class__ = StepRichProgressBar


class StepLog(ProgressBar):
    """Progress as plain lines, for output that goes to a file: no bar is redrawn, every line stays readable.

    A training line every :attr:`every` optimizer steps and at the last step, e.g.
    ``step 20/200 | train/loss 2.4131 | val/loss 2.5012 | 0:00:41, 0.49 steps/s``, with the
    metrics the model shows in a progress bar (``prog_bar=True``) and the time since this
    ``fit`` started (steps per second count this fit's steps, so a resumed run's rate is its
    own); and a line after each validation with its ``val`` metrics. Printed by rank 0 only.

    Args:
        every: steps between training lines. Default: ``trainer.log_every_n_steps`` (the
            metrics are as fresh as the logger's), widened to a multiple of it that keeps a run
            of known length to about :data:`MAX_LINES` lines.
    """

    def __init__(self, every: int | None = None) -> None:
        super().__init__()
        if every is not None and (not isinstance(every, int) or isinstance(every, bool) or every < 1):
            raise ConfigError(
                f"StepLog every={every!r}: give a number of optimizer steps >= 1, or null (log_every_n_steps)"
            )
        self.every = every
        self._enabled = True
        self._total: int | None = None  # this run's optimizer steps, if known
        self._interval = 1
        self._start = 0.0
        self._start_step = 0
        self._last_printed = -1

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def print(self, *args: Any, sep: str = " ", **kwargs: Any) -> None:
        if self._enabled:
            print(*args, sep=sep, flush=True, **kwargs)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        total = trainer.estimated_stepping_batches  # inf without a step or epoch budget
        self._total = int(total) if math.isfinite(total) else None
        if self.every is not None:
            self._interval = self.every
        else:
            base = max(1, trainer.log_every_n_steps)
            self._interval = base * math.ceil(self._total / (MAX_LINES * base)) if self._total else base
        self._start = time.monotonic()
        self._start_step = self._last_printed = trainer.global_step

    def on_train_batch_end(self, trainer: Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step  # runs once per batch: with gradient accumulation, a step repeats
        if step == self._last_printed or not (step % self._interval == 0 or step == self._total):
            return
        self._last_printed = step
        elapsed = time.monotonic() - self._start
        rate = (step - self._start_step) / elapsed if elapsed > 0 else 0.0
        metrics = self.get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        timing = f"{timedelta(seconds=round(elapsed))}, {rate:.2f} steps/s"
        self.print(" | ".join([self._step(step), *_formatted(metrics), timing]))

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        metrics = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("val")}
        self.print(" | ".join([f"validation at {self._step(trainer.global_step)}", *_formatted(metrics)]))

    def _step(self, step: int) -> str:
        return f"step {step}/{self._total}" if self._total else f"step {step}"


def _formatted(metrics: dict[str, Any]) -> list[str]:
    shown = []
    for name, value in metrics.items():
        value = value.item() if hasattr(value, "item") else value
        shown.append(f"{name} {value:.4f}" if isinstance(value, float) else f"{name} {value}")
    return shown


def choose_progress_display(trainer: Trainer, chosen: Iterable[Callback], stream: TextIO | None = None) -> None:
    """Show progress as :class:`StepLog` lines instead of Lightning's default bar when ``stream`` is not a terminal.

    ``chosen``: the callbacks the recipe or the command line gave; a progress bar among them
    is the user's and is kept. ``stream``: where the bar would draw (default ``sys.stdout``).
    Otherwise the default bar counts steps (:func:`use_step_progress_bar`).
    """
    bar = trainer.progress_bar_callback
    if bar is not None and not any(bar is callback for callback in chosen) and not _is_terminal(stream or sys.stdout):
        trainer.callbacks[trainer.callbacks.index(bar)] = StepLog()
        return
    use_step_progress_bar(trainer)


def _is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())
