"""DeepSeek-V3-style parts of Hugging Face MoE blocks: scored routing and ungated shared experts.

Shape legend: E experts.

DeepSeek-V3 and its descendants in ``transformers`` (``deepseek_v3``, ``glm4_moe``, ``dots1``,
``exaone_moe``, ...) route with sigmoid scores, a selection-only ``e_score_correction_bias``
(a buffer of the router, [E]), group-limited top-k and a routed scaling factor; ERNIE-4.5-MoE
keeps the same kind of bias ([1, E], a frozen parameter of ``gate.moe_statics``) on softmax
scores. Their ``shared_experts`` are added to the routed output without a gate. This module
reads those parts so :mod:`lightning_moe.hf.blocks` can offer them to its probe and
:mod:`lightning_moe.hf.convert` can move them: the group and scaling settings are read from
the router (the probe cannot be expected to find them), the score function and the
renormalisation are the probe's to decide, and the bias is probed with random values, so a
router that adds it anywhere but to the selection scores is refused.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_moe.routing import Scoring

#: The family's selection bias, wherever in the router it is held (DeepSeek-V3's name).
SELECTION_BIAS = "e_score_correction_bias"
#: A block's shared experts added to the routed output as they are (DeepSeek-V3, ERNIE-4.5, Cohere2-MoE).
SHARED_EXPERTS = "shared_experts"


class ScoredRoutingError(Exception):
    """Router settings that no :class:`Scoring` represents (one short phrase)."""


def selection_bias_name(router: nn.Module) -> str | None:
    """The name, inside ``router``, of its ``e_score_correction_bias`` tensor (buffer or parameter), if any."""
    num_experts = router.weight.shape[0]
    found = [
        name
        for name, tensor in (*router.named_buffers(), *router.named_parameters())
        if name.rpartition(".")[2] == SELECTION_BIAS
    ]
    if len(found) > 1:
        raise ScoredRoutingError(f"several selection biases ({', '.join(found)})")
    if found and _tensor(router, found[0]).numel() != num_experts:
        raise ScoredRoutingError(f"a selection bias {found[0]} without one entry per expert")
    return found[0] if found else None


def _tensor(router: nn.Module, name: str) -> Tensor:
    owner, _, leaf = name.rpartition(".")
    module = router.get_submodule(owner)
    return module._parameters[leaf] if leaf in module._parameters else module._buffers[leaf]


def read_selection_bias(router: nn.Module, name: str) -> Tensor:
    """The router's selection bias as float32 [E] (a copy)."""
    return _tensor(router, name).detach().float().reshape(-1).clone()


def write_selection_bias(router: nn.Module, name: str, bias_E: Tensor) -> None:
    """Set the router's selection bias to ``bias_E``, in its own shape, dtype and device.

    A tensor on the meta device (a model built to be filled later) is replaced by a real one.
    """
    owner, _, leaf = name.rpartition(".")
    module = router.get_submodule(owner)
    current = _tensor(router, name)
    value = bias_E.detach().reshape(current.shape).to(dtype=current.dtype)
    if current.is_meta:
        value = value.clone()
        if leaf in module._parameters:
            module._parameters[leaf] = nn.Parameter(value, requires_grad=current.requires_grad)
        else:
            module._buffers[leaf] = value
        return
    with torch.no_grad():
        current.copy_(value)


def router_scoring(router: nn.Module, score_function: str) -> Scoring:
    """The :class:`Scoring` of ``router`` with ``score_function``: groups and scaling read from its
    attributes (DeepSeek-V3 names: ``num_group`` or ``n_group``, ``topk_group``,
    ``routed_scaling_factor``; absent: one group, scale 1)."""
    n_group = getattr(router, "num_group", getattr(router, "n_group", None)) or 1
    topk_group = (getattr(router, "topk_group", None) or 1) if n_group > 1 else 1
    scale = getattr(router, "routed_scaling_factor", None)
    scoring = Scoring(score_function, n_group, topk_group, 1.0 if scale is None else float(scale))
    try:
        scoring.check(router.weight.shape[0], 1)
    except ValueError as err:
        raise ScoredRoutingError(f"router settings no MoELayer routes by ({err})") from err
    return scoring


def describe_scoring(scoring: Scoring) -> str:
    """The parts of ``scoring`` beyond its score function, e.g. ``", top-2 of 8 groups, scaled by 2.5"``."""
    words = ""
    if scoring.n_group > 1:
        words += f", top-{scoring.topk_group} of {scoring.n_group} groups"
    if scoring.routed_scaling_factor != 1.0:
        words += f", scaled by {scoring.routed_scaling_factor:g}"
    return words


def probe_selection_bias(num_experts: int) -> Tensor:
    """Random bias values for the probe, on the scale of a routing score, so they change some choices."""
    return torch.randn(num_experts, generator=torch.Generator().manual_seed(3)) * 0.1


def has_ungated_shared_experts(block: nn.Module) -> bool:
    """Whether ``block`` adds a ``shared_experts`` module to its routed output (no gate), after
    checking how it combines them where the block says (Cohere2-MoE may average instead of add)."""
    if not isinstance(getattr(block, SHARED_EXPERTS, None), nn.Module):
        return False
    combination = getattr(block, "shared_expert_combination_strategy", "sum")
    if combination != "sum":
        raise ScoredRoutingError(f"shared experts combined by {combination!r} (only added, 'sum', is supported)")
    return True
