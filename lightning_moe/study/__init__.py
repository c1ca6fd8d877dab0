"""``lightning-moe compare``: train one recipe with several estimator configurations over
paired seeds, then report what the run logs say.

Every run is an ordinary ``lightning-moe fit`` (:func:`lightning_moe.trainer_cli.run`) of the base
recipe with the configuration's overrides, one after the other in this process on one
device. When the runs use CUDA and several devices are visible (or ``--devices`` lists
ids), they are spread over the devices instead, one run per device at a time, each in a
process of its own that sees only its device and logs to ``<run_dir>/log.txt``. Each run
writes its TensorBoard events to ``<output_dir>/runs/<configuration>/seed_<seed>/`` (its
``<run_dir>``) and, once finished, ``done.json`` there; a finished run whose command line
has not changed is not run again, however it was run, so an interrupted study continues
where it stopped. Ctrl-C (or SIGTERM, with runs in processes of their own) stops the
study and its running runs; those runs start afresh when the study is resumed. Each run
gets a line when it starts and when it ends (or that it finished earlier and is skipped). A
study whose runs would log no ``val/loss`` (too few steps for the validation interval,
validation off) is refused before anything trains. The report reads every number from the
event files (validation loss, routing telemetry, step time), and writes ``results.json``,
``runs.csv``, ``summary.csv``, ``report.md`` and PNG plots to ``<output_dir>``.

Usage::

    lightning-moe compare --config recipes/study_estimators.yaml
    lightning-moe compare --config recipes/study_estimators.yaml --seeds '[0]' --steps 50
    lightning-moe compare --config recipes/study_estimators.yaml --devices '[0, 1]'
    lightning-moe compare --config recipes/study_estimators.yaml --report_only true

The package: :mod:`~lightning_moe.study.command` (the command, its checks),
:mod:`~lightning_moe.study.runner` (running the runs, ``done.json``/``failed.txt``),
:mod:`~lightning_moe.study.worker` (a run in a process of its own),
:mod:`~lightning_moe.study.records` (reading the runs' event files, statistics over seeds),
:mod:`~lightning_moe.study.report` (``report.md``, CSV files, plots) and
:mod:`~lightning_moe.study.exact_match` (with ``generation``: every run's exported model and the
base scored by exact match of greedy answers to held-out task prompts) and
:mod:`~lightning_moe.study.routing_stats` (on the same prompts: each run's routing change against
the base, routing entropy and task-kind/expert mutual information).
"""

from lightning_moe.study.command import compare, main
from lightning_moe.study.exact_match import GenerationEval
from lightning_moe.study.routing_stats import kind_expert_mutual_information, routing_statistics
from lightning_moe.study.runner import Configuration, StepTimer

__all__ = ["Configuration", "GenerationEval", "StepTimer", "compare", "kind_expert_mutual_information", "main",
           "routing_statistics"]
