"""The router outputs ``transformers`` records (``output_router_logits``), kept across conversion.

``transformers`` 5 collects router logits with forward hooks: a model class lists what it
records in ``_can_record_outputs`` (``"router_logits": OutputRecorder(<family router class>,
index=0)``), and the first forward that asks for them installs one hook on every module of
a listed class, once per model (``_output_capturing_hooks_installed``). The family's
load-balancing loss (``load_balancing_loss_func``) is computed from what those hooks collected.

A converted block's router is this library's :class:`~lightning_moe.routing.Router`, of no
class the model lists, so nothing would be recorded. Matching by class cannot be arranged
without pretending to be the family's router, and it would not help where the hooks were
installed before conversion. So a hook recording the same way (:class:`RecordOutput`) is
installed explicitly: on our router when a block is converted (it returns the logits
themselves, which is what index 0 of the family's router output is), and on the family's
router when :func:`~lightning_moe.hf.to_hf` restores it, if the model installed its hooks
while converted. Every block then records exactly once, whenever the hooks were installed.
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn

_INSTALLED = "_output_capturing_hooks_installed"  # set by transformers on the model that installed its hooks


def recording_owner(model: nn.Module, block_name: str) -> nn.Module | None:
    """The ``PreTrainedModel`` whose ``_can_record_outputs`` applies to ``block_name``: its nearest
    such ancestor, as ``transformers`` dispatches hooks to nested models (``None`` when there is none)."""
    from transformers import PreTrainedModel

    owner, path = (model if isinstance(model, PreTrainedModel) else None), []
    for part in block_name.split(".")[:-1]:
        path.append(part)
        module = model.get_submodule(".".join(path))
        if isinstance(module, PreTrainedModel):
            owner = module
    return owner


def router_records(owner: nn.Module | None, router: nn.Module, router_name: str) -> list[tuple[str, int]]:
    """``(key, index)`` of each output ``owner`` records from ``router`` (named ``router_name`` in the model):
    ``transformers``' own matching (by class, or by the end of the module name) and index defaults."""
    if owner is None:
        return []
    from transformers.utils.output_capturing import OutputRecorder

    records = []
    for key, specs in (getattr(owner, "_can_record_outputs", None) or {}).items():
        for spec in specs if isinstance(specs, list) else [specs]:
            if not isinstance(spec, OutputRecorder):
                by_name = isinstance(spec, str)
                spec = OutputRecorder(
                    target_class=None if by_name else spec,
                    index=0 if "hidden_states" in key else 1,
                    class_name=spec if by_name else None,
                )
            by_class = spec.target_class is not None and isinstance(router, spec.target_class)
            by_name = spec.class_name is not None and router_name.endswith(spec.class_name)
            layer = spec.layer_name is None or f".{spec.layer_name.strip('.')}." in f".{router_name}."
            if (by_class or by_name) and layer:
                records.append((key, spec.index))
    return records


def hooks_installed(owner: nn.Module | None) -> bool:
    """Whether ``owner`` has installed its recording hooks (they are installed once, on first use)."""
    return bool(getattr(owner, _INSTALLED, False))


class RecordOutput:
    """A forward hook that does what ``transformers``' recording hook does for ``key``: append the
    module's output (``output[index]`` of a tuple) to the outputs the running forward collects.

    A class rather than ``transformers``' own hook (a closure), so a converted model still
    pickles (``torch.save(model)``, spawned worker processes) as it did before conversion.
    """

    def __init__(self, key: str, index: int) -> None:
        self.key, self.index = key, index

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> None:
        from transformers.utils.output_capturing import _active_collector

        collected = _active_collector.get()  # None outside a forward that records
        if collected is None or self.key not in collected:
            return
        value = output[self.index] if isinstance(output, tuple) else output
        if value is not None:
            collected[self.key].append(value)


def install_record_hooks(module: nn.Module, records: list[tuple[str, int]]) -> None:
    """Make ``module``'s output recorded under each key of ``records``, as ``transformers``' own hook does."""
    if not records:
        return
    try:
        from transformers.utils.output_capturing import _active_collector  # noqa: F401
    except ImportError:  # where transformers 5.25 collects; another version may collect elsewhere
        import transformers

        warnings.warn(
            f"transformers {transformers.__version__} has no output_capturing collector: a converted model's"
            " output_router_logits (and the family's aux loss) will record no router",
            stacklevel=3,
        )
        return
    for key, index in records:
        module.register_forward_hook(RecordOutput(key, index))
