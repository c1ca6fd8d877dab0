"""The collectives the router statistics and their checkpoints need."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch import Tensor


def data_parallel_sum(tensor: Tensor) -> Tensor:
    """``tensor`` summed over all ranks (in place) when torch.distributed runs with several."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (``[obj]`` without several ranks); every rank must call it."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, obj)
        return gathered
    return [obj]
