"""The router and the routing result every estimator returns.

Shape legend: T tokens, D model width, E experts, K experts per token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class Routing:
    """What an estimator decided for a batch of tokens.

    ``weights`` carry the estimator's gradient to the router; ``probs`` is the plain
    softmax over all experts (with grad), used by balancing losses and telemetry.
    ``telemetry`` holds detached scalars the estimator wants to report, e.g. the share
    of tokens whose router gradient is exactly zero.
    """

    indices: Tensor  # [T, K] int64
    weights: Tensor  # [T, K] float32
    probs: Tensor  # [T, E] float32
    telemetry: dict[str, Tensor] = field(default_factory=dict)


class Router(nn.Module):
    """Linear map from hidden states to expert logits, always computed in float32.

    Router precision matters for every estimator (small logit gaps decide which expert
    wins and the jitter masks compare logits to within eps), so autocast is switched off
    here and the input and weight are promoted to float32.
    """

    def __init__(self, d_model: int, num_experts: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))
        nn.init.normal_(self.weight, std=d_model**-0.5)

    def forward(self, x_TD: Tensor) -> Tensor:
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            return F.linear(x_TD.float(), self.weight.float())
