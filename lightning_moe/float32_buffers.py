"""Router state buffers that stay float32 whatever dtype their module is cast to."""

from __future__ import annotations

from typing import Callable, ClassVar

import torch
from torch import Tensor, nn


class Float32Buffers(nn.Module):
    """Keeps the buffers named in :attr:`float32_buffers` in float32 through ``module.to(dtype)``.

    The selection bias of aux-loss-free balancing and Default MoE's default outputs move
    by small steps once per optimizer step (DeepSeek-V3's bias by gamma = 1e-3). Lightning's
    ``precision="bf16-true"`` (and ``"16-true"``) casts every floating buffer with
    ``module.to(dtype)``; in bfloat16 such a step rounds away once |value| >= 0.5, so the
    bias would stop moving. Casts (``.to``, ``.half()``, ``.bfloat16()``, ``.double()``)
    still move these buffers to the new device, but keep their exact float32 values.
    """

    float32_buffers: ClassVar[tuple[str, ...]] = ()

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True):
        originals = {name: self._buffers[name] for name in self.float32_buffers if self._buffers.get(name) is not None}
        super()._apply(fn, recurse)
        for name, original in originals.items():
            converted = self._buffers[name]
            if converted is not None and converted.dtype != torch.float32 and original.dtype == torch.float32:
                self._buffers[name] = original.to(device=converted.device)
        return self
