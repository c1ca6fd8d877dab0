"""One run of ``lightning-moe compare`` in a process of its own, on the one device it sees.

Started by :func:`lightning_moe.study.runner._run_on_devices` as
``python -m lightning_moe.study.worker SPEC`` (``SPEC``: JSON with the run's ``args``,
``run_dir``, ``device`` and ``num_threads``), with ``CUDA_VISIBLE_DEVICES`` naming that
device. The run is the same :func:`lightning_moe.study.runner._fit` as a run in the compare
process, so it leaves the same ``done.json`` or ``failed.txt``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from lightning_moe.study.runner import _fit


def main(spec: str) -> int:
    run = json.loads(spec)
    if run["num_threads"] is not None:
        torch.set_num_threads(run["num_threads"])
    # The record keeps the CUDA_VISIBLE_DEVICES this process saw, not the one it was meant to see.
    placement = {"device": run["device"], "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    # A recipe may ask for several devices; this process has one.
    record = _fit(run["args"], Path(run["run_dir"]), launch=["--trainer.devices=1"], placement=placement)
    return 0 if record["status"] == "done" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
