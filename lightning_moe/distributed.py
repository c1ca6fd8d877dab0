"""The one collective the router statistics need."""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor


def data_parallel_sum(tensor: Tensor) -> Tensor:
    """``tensor`` summed over all ranks (in place) when torch.distributed runs with several."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor
