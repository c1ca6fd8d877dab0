"""The module path by which every run of ``lightning-moe compare`` names its step timer.

``lightning-moe compare`` lives in :mod:`lightning_moe.study`. Its runs name their step timer
``lightning_moe.compare.StepTimer`` (``--trainer.callbacks+=...``, also in ``done.json`` and
``results.json``), and a finished run is recognised by its arguments, so this path stays:
studies run before the study package resume without training their runs again.
"""

from lightning_moe.study.runner import StepTimer

__all__ = ["StepTimer"]
