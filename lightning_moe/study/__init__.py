"""``lightning-moe compare``: a study of several estimator configurations over paired seeds."""

from lightning_moe.study.runner import Configuration, compare, main

__all__ = ["Configuration", "compare", "main"]
