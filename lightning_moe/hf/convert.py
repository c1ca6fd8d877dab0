"""Hugging Face MoE models in and out: each sparse-MoE block becomes a block built on MoELayer.

Shape legend: D model width, F expert hidden width, E experts.

Layouts: Hugging Face keeps ``gate_up_proj`` [E, 2F, D] (gate rows first) and
``down_proj`` [E, D, F] and computes ``linear(x, W) = x W^T``; :class:`~lightning_moe.Experts`
keeps ``w1`` [E, D, 2F] (gate columns first) and ``w2`` [E, F, D] and computes ``x @ W``.
So ``w1 = gate_up_proj.T``, ``w2 = down_proj.T`` (per expert), and the router's ``weight`` [E, D] is shared as is.
gpt-oss's experts (biases, interleaved gate/up columns, a clamped SwiGLU) are read and written by
:mod:`lightning_moe.hf.biased_experts`; its router's ``bias`` becomes the layer router's. Conversion runs block by
block and frees each original tensor as soon as its copy exists, so a large model is
never held twice: at most about two thirds of one block's experts exist twice at once.
"""

from __future__ import annotations

import importlib.util
import inspect
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from lightning_moe.errors import ConfigError
from lightning_moe.estimators import ESTIMATOR_REGISTRY, Estimator
from lightning_moe.experts import Experts
from lightning_moe.hf.biased_experts import DOWN_BIAS, GATE_UP_BIAS, deinterleave, interleave, read_biased_experts
from lightning_moe.hf.blocks import (
    SHARED_EXPERT,
    SHARED_EXPERT_GATE,
    SUPPORTED,
    BlockSpec,
    UnsupportedBlock,
    eval_routing,
    find_blocks,
    inspect_block,
    probe_inputs,
    routings_agree,
)
from lightning_moe.hf.router_records import hooks_installed, install_record_hooks, recording_owner, router_records
from lightning_moe.hf.sigmoid_blocks import SHARED_EXPERTS, read_selection_bias, write_selection_bias
from lightning_moe.layer import MoELayer, moe_layers


class HFMoEBlock(nn.Module):
    """A Hugging Face sparse-MoE block running on :class:`~lightning_moe.MoELayer`.

    ``forward(hidden_states [..., D]) -> [..., D]``, as the block it replaced. With a
    shared expert (Qwen2-MoE) the output is ``moe(x) + sigmoid(shared_expert_gate(x)) *
    shared_expert(x)``; the shared expert and its gate are the original modules, moved
    here. Shared experts without a gate (DeepSeek-V3, GLM-4.5, dots1, ERNIE-4.5) are
    added as they are: ``moe(x) + shared_experts(x)``, the original module moved here too. The original block, emptied of its parameters, is kept (outside the module
    tree, so it is in no ``state_dict``) for :func:`to_hf` to refill.

    ``records``: the ``(key, index)`` outputs ``transformers`` records from the family's
    router (``router_logits`` at index 0), recorded from ``moe.router``'s logits instead
    (:mod:`lightning_moe.hf.router_records`); ``router_hooked``: whether the family's router
    already carries those recording hooks.
    """

    def __init__(
        self,
        moe: MoELayer,
        spec: BlockSpec,
        shell: nn.Module,
        records: tuple[tuple[str, int], ...] = (),
        router_hooked: bool = False,
    ) -> None:
        super().__init__()
        self.moe = moe
        self.spec = spec
        self.shared_expert = getattr(shell, SHARED_EXPERT) if spec.shared_expert else None
        self.shared_expert_gate = getattr(shell, SHARED_EXPERT_GATE) if spec.shared_expert else None
        self.shared_experts = getattr(shell, SHARED_EXPERTS) if spec.shared_experts else None
        object.__setattr__(self, "hf_shell", shell)  # not a submodule: no parameters, not saved
        self.records, self.router_hooked = tuple(records), router_hooked
        install_record_hooks(moe.router, list(self.records))

    def forward(self, hidden_states: Tensor) -> Tensor | tuple[Tensor, None]:
        """The block's output; as ``(output, None)`` where the original returned ``(output, router_scores)``
        (gpt-oss: its decoder layer discards the scores, and the router logits are recorded from ``moe.router``)."""
        out = self.moe(hidden_states)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(hidden_states)) * self.shared_expert(hidden_states)
        if self.shared_experts is not None:
            out = out + self.shared_experts(hidden_states)
        return (out, None) if self.spec.returns_router_scores else out

    def extra_repr(self) -> str:
        return f"hf_block={type(self.hf_shell).__name__}, routing={self.spec.describe()!r}"


def _take(module: nn.Module, name: str) -> nn.Parameter:
    """Remove parameter ``name`` from ``module`` and return it (the module no longer holds it)."""
    param = module._parameters[name]
    setattr(module, name, None)
    return param


def _parameter(data: Tensor, like: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(data, requires_grad=like.requires_grad)


def _estimator_choice(
    estimator: str | Estimator | None, estimator_kwargs: dict[str, Any], spec: BlockSpec
) -> tuple[str | Estimator, dict[str, Any]]:
    """The estimator for one block: the family's own when None; a registered softmax estimator
    gets the family's renormalisation unless the caller set it."""
    if estimator is None:
        name, args = spec.native_estimator()
        return name, {**args, **estimator_kwargs}
    if isinstance(estimator, Estimator):
        if estimator_kwargs:
            raise ConfigError("estimator arguments are only used with an estimator name, not an Estimator instance")
        return estimator, {}
    if not isinstance(estimator, str):
        raise ConfigError(f"estimator must be a registered name or an Estimator, not {type(estimator).__name__}")
    args = dict(estimator_kwargs)
    cls = ESTIMATOR_REGISTRY[estimator]["estimator"] if estimator in ESTIMATOR_REGISTRY else None
    if cls is not None and spec.routing != "sparsemixer" and "renormalize" in inspect.signature(cls).parameters:
        args.setdefault("renormalize", spec.renormalize)
    return estimator, args


def _new_layer(spec: BlockSpec, estimator: str | Estimator, args: dict, backend: str, device: torch.device) -> MoELayer:
    """A MoELayer for ``spec`` whose expert parameters are not allocated (they are assigned after).

    Everything but the experts is built for real, so the layer's and the estimator's state
    start at their own initial values; the experts are built on the meta device.
    """
    with torch.device(device):
        layer = MoELayer(
            spec.d_model,
            1,  # placeholder width: these experts are replaced just below
            spec.num_experts,
            spec.top_k,
            estimator=estimator,
            backend=backend,
            input_jitter=spec.input_jitter,
            estimator_args=args,
            score_function=spec.scoring.score_function,
            n_group=spec.scoring.n_group,
            topk_group=spec.scoring.topk_group,
            routed_scaling_factor=spec.scoring.routed_scaling_factor,
            router_bias=spec.router_bias,
        )
    clamped = spec.clamped_swiglu
    with torch.device("meta"):
        if clamped is None:
            layer.experts = Experts(spec.d_model, spec.ffn_hidden, spec.num_experts, activation="swiglu", backend=backend)
        else:
            layer.experts = Experts(spec.d_model, spec.ffn_hidden, spec.num_experts, activation=clamped.name,
                                    backend=backend, bias=True, swiglu_alpha=clamped.alpha, swiglu_limit=clamped.limit)
    return layer


def _convert_block(
    block: nn.Module,
    spec: BlockSpec,
    estimator: str | Estimator,
    args: dict,
    backend: str,
    records: list[tuple[str, int]],
    router_hooked: bool,
) -> HFMoEBlock:
    experts = block.experts
    device = experts.gate_up_proj.device
    # On the meta device (a model to be filled shard by shard) the layer's own state is still built
    # for real, on the CPU: only the tensors a checkpoint fills stay empty.
    layer = _new_layer(spec, estimator, args, backend, torch.device("cpu") if device.type == "meta" else device)
    router = getattr(block, spec.router_name)
    layer.router.weight = _take(router, "weight")
    if spec.router_bias:
        layer.router.bias = _take(router, "bias")
    ours = layer.experts
    if spec.clamped_swiglu is not None:
        _take_biased_experts(experts, ours)
    else:
        gate_up = _take(experts, "gate_up_proj")
        ours.w1 = _parameter(gate_up.transpose(1, 2).contiguous(), gate_up)
        del gate_up  # freed here: its copy exists, nothing else refers to it
        down = _take(experts, "down_proj")
        ours.w2 = _parameter(down.transpose(1, 2).contiguous(), down)
        del down
    meta = [name for name, t in [*layer.named_parameters(), *layer.named_buffers()] if t.is_meta]
    if meta and device.type != "meta":
        raise RuntimeError(f"MoELayer tensors left unconverted: {meta}")
    _take_selection_bias(router, spec, layer)
    converted = HFMoEBlock(layer, spec, block, tuple(records), router_hooked)
    if spec.shared_expert:  # now owned by the converted block
        setattr(block, SHARED_EXPERT, None)
        setattr(block, SHARED_EXPERT_GATE, None)
    if spec.shared_experts:
        setattr(block, SHARED_EXPERTS, None)
    return converted


def _take_biased_experts(experts: nn.Module, ours: Experts) -> None:
    """gpt-oss's experts into ``ours``: gate/up columns de-interleaved (copies), ``down_proj`` and its bias moved."""
    w1, b1, _, _ = read_biased_experts(experts)
    for name, value, source in (("w1", w1, "gate_up_proj"), ("b1", b1, GATE_UP_BIAS)):
        setattr(ours, name, _parameter(value.detach(), _take(experts, source)))
    ours.w2, ours.b2 = _take(experts, "down_proj"), _take(experts, DOWN_BIAS)


def _restore_biased_experts(ours: Experts, experts: nn.Module) -> None:
    """The inverse of :func:`_take_biased_experts`."""
    for name, source in (("w1", "gate_up_proj"), ("b1", GATE_UP_BIAS)):
        ours_tensor = _take(ours, name)
        setattr(experts, source, _parameter(interleave(ours_tensor.detach()), ours_tensor))
    experts.down_proj = _take(ours, "w2")
    setattr(experts, DOWN_BIAS, _take(ours, "b2"))


def _take_selection_bias(router: nn.Module, spec: BlockSpec, layer: MoELayer) -> None:
    """The family's selection bias becomes the layer's (switched on, so it steers routing as it did).

    A bias on the meta device (a model to be filled later) has no values to copy: the layer
    keeps zeros until its ``selection_bias`` is filled from the checkpoint.
    """
    if spec.selection_bias is None:
        return
    layer.use_selection_bias = True
    bias_E = read_selection_bias(router, spec.selection_bias)
    if not bias_E.is_meta:
        layer.selection_bias.copy_(bias_E)


def _warn_if_eval_routing_differs(layer: MoELayer, spec: BlockSpec, family: str) -> None:
    name, _ = spec.native_estimator()
    logits_TE = probe_inputs(spec.num_experts, 64) * 2
    native = eval_routing(spec.build_native_estimator(), logits_TE, spec.top_k)
    if not routings_agree(eval_routing(layer.estimator, logits_TE, spec.top_k), native):
        warnings.warn(
            f"estimator {type(layer.estimator).__name__} routes differently at evaluation than {family}"
            f" ({spec.describe()}, estimator={name!r}): the exported model will run {family}'s own routing",
            stacklevel=3,
        )


def family_name(model: nn.Module) -> str:
    return getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__


def from_hf(
    model: nn.Module, estimator: str | Estimator | None = None, backend: str = "auto", **estimator_kwargs: Any
) -> nn.Module:
    """Replace each sparse-MoE block of a loaded ``transformers`` model by an :class:`HFMoEBlock`.

    In place; returns ``model``. Router and expert weights move into ``MoELayer``'s layout
    (same dtype, device and ``requires_grad``), keeping the family's routing exactly:
    ``estimator=None`` picks the family's own (``topk`` with its renormalisation, or
    ``sparsemixer_v2`` with the config's ``router_jitter_noise`` for PhiMoE); a named
    top-k estimator (``topk``, ``densemixer``, ...) gets the family's renormalisation
    unless ``renormalize`` is passed. Sigmoid routing over expert groups with a routed
    scaling factor (DeepSeek-V3 and its descendants) becomes the layer's
    :class:`~lightning_moe.routing.Scoring`, and the family's ``e_score_correction_bias``
    its ``selection_bias`` (switched on; :class:`~lightning_moe.callbacks.AuxLossFreeBalancing`
    moves it, :func:`to_hf` writes it back). Input jitter (Mixtral's ``router_jitter_noise``,
    PhiMoE's ``input_jitter_noise``) becomes ``MoELayer.input_jitter``. An estimator whose
    evaluation routing differs from the family's is allowed, with a warning.

    Nothing is changed when a block cannot be represented exactly: one :class:`ConfigError`
    names the family and what is missing. ``output_router_logits`` keeps working: the
    router logits ``transformers`` records come from each ``MoELayer``'s router, so the
    family's own load-balancing loss (``aux_loss``, and ``router_aux_loss_coef`` times it in
    ``loss``) is what the original model computes, with this library's estimators routing.
    """
    if importlib.util.find_spec("transformers") is None:
        raise ImportError("lightning_moe.hf needs the `transformers` package: pip install 'lightning-moe[hf]'")
    family = family_name(model)
    if any(isinstance(m, HFMoEBlock) for m in model.modules()):
        raise ConfigError(f"{family} model is already converted (it holds HFMoEBlock modules); call to_hf first")
    blocks = find_blocks(model)
    if not blocks:
        raise ConfigError(
            f"{family} has no sparse-MoE block to convert: expected modules with an `experts` child holding"
            " gate_up_proj [E, 2F, D] and down_proj [E, D, F] (transformers >= 5 layout)"
        )
    specs, records, problems = [], [], {}
    for name, block in blocks:
        try:
            specs.append(inspect_block(block))
            records.append(_router_records(model, name, block, specs[-1]))
        except UnsupportedBlock as missing:
            problems.setdefault(str(missing), type(block).__name__)
    if problems:
        listed = "; ".join(f"{block} has {what}" for what, block in problems.items())
        raise ConfigError(f"cannot convert {family}: {listed}; {SUPPORTED}")
    choices = [_estimator_choice(estimator, estimator_kwargs, spec) for spec in specs]
    for (name, args), spec in zip(choices, specs):  # fail before any block changes
        try:
            probe = MoELayer._build_estimator(name, args)
            probe.use_scoring(spec.scoring)
            probe.bind(num_experts=spec.num_experts, top_k=spec.top_k, d_model=spec.d_model)
        except (ValueError, TypeError) as err:
            raise ConfigError(f"estimator={name!r} cannot run {family} ({spec.describe()}): {err}") from err

    for i, ((name, block), spec, (chosen, args), (owner, kept)) in enumerate(zip(blocks, specs, choices, records)):
        converted = _convert_block(block, spec, chosen, args, backend, kept, hooks_installed(owner))
        model.set_submodule(name, converted)
        if i == 0:  # one warning per model, from its first block
            _warn_if_eval_routing_differs(converted.moe, spec, family)
    return model


def _router_records(
    model: nn.Module, name: str, block: nn.Module, spec: BlockSpec
) -> tuple[nn.Module | None, list[tuple[str, int]]]:
    """The model that records ``block``'s router outputs, and which outputs it records; refused
    where one is not the logits (the one output of the router a converted block has)."""
    owner = recording_owner(model, name)
    records = router_records(owner, getattr(block, spec.router_name), f"{name}.{spec.router_name}")
    others = sorted({f"{key} (output {index})" for key, index in records if index != 0})
    if others:
        raise UnsupportedBlock(f"router outputs other than its logits recorded by transformers: {', '.join(others)}")
    return owner, records


#: How one of our tensors lies in the Hugging Face model (:func:`hf_tensor_names`): the same values
#: (perhaps reshaped: a selection bias is [1, E] in ERNIE-4.5); the experts' dims 1 and 2 swapped;
#: gpt-oss's gate/up columns interleaved along the last dim (:mod:`lightning_moe.hf.biased_experts`).
AS_IS, TRANSPOSED, INTERLEAVED = "as_is", "transposed", "interleaved"


def from_hf_layout(value: Tensor, layout: str, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """A tensor as the Hugging Face model holds it, in our layout of ``shape`` (a view where one exists)."""
    if layout == TRANSPOSED:
        return value.transpose(1, 2)
    if layout == INTERLEAVED:
        return deinterleave(value)
    return value.reshape(shape)


def to_hf_layout(value: Tensor, layout: str, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """The inverse of :func:`from_hf_layout`: one of our tensors as the Hugging Face model holds it (``shape``)."""
    if layout == TRANSPOSED:
        return value.transpose(1, 2)
    if layout == INTERLEAVED:
        return interleave(value)
    return value.reshape(shape)


def hf_tensor_names(model: nn.Module) -> dict[str, tuple[str | None, str]]:
    """For each parameter and buffer name of a model converted by :func:`from_hf`: the name of the
    same tensor in the Hugging Face model (``None``: ``MoELayer`` state with no counterpart there),
    and how it lies there (:data:`AS_IS`, :data:`TRANSPOSED` or :data:`INTERLEAVED`).

    Every layout keeps the expert index first, so a slice of experts is the same slice in both.
    """
    blocks = {name: m for name, m in model.named_modules() if isinstance(m, HFMoEBlock)}
    names = {}
    for name, _ in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        prefix, _, rest = name.partition(".moe.")
        block = blocks.get(prefix) if rest else None
        if block is None:
            names[name] = (name, AS_IS)
        elif rest in ("router.weight", "router.bias"):
            names[name] = (f"{prefix}.{block.spec.router_name}.{rest.partition('.')[2]}", AS_IS)
        elif block.spec.clamped_swiglu is not None and rest.startswith("experts."):
            names[name] = _biased_expert_name(prefix, rest)
        elif rest in ("experts.w1", "experts.w2"):
            names[name] = (f"{prefix}.experts.{'gate_up_proj' if rest.endswith('w1') else 'down_proj'}", TRANSPOSED)
        elif rest == "selection_bias" and block.spec.selection_bias is not None:
            # The family's e_score_correction_bias: [E] ([1, E] in ERNIE-4.5, same values in the same order).
            names[name] = (f"{prefix}.{block.spec.router_name}.{block.spec.selection_bias}", AS_IS)
        else:
            names[name] = (None, AS_IS)
    return names


def _biased_expert_name(prefix: str, rest: str) -> tuple[str | None, str]:
    """gpt-oss's name and layout of one of its converted experts' tensors (``rest``: ``experts.w1`` ...)."""
    hf_names = {"experts.w1": ("gate_up_proj", INTERLEAVED), "experts.b1": (GATE_UP_BIAS, INTERLEAVED),
                "experts.w2": ("down_proj", AS_IS), "experts.b2": (DOWN_BIAS, AS_IS)}
    if rest not in hf_names:
        return None, AS_IS
    hf_name, layout = hf_names[rest]
    return f"{prefix}.experts.{hf_name}", layout


def _restore_block(block: HFMoEBlock) -> nn.Module:
    """Refill the original block from ``block``'s MoELayer, freeing each tensor once copied."""
    shell, spec, layer = block.hf_shell, block.spec, block.moe
    if layer.experts.expert_parallel is not None:
        raise ConfigError("to_hf needs every expert in this process; gather the expert-parallel shards first")
    setattr(getattr(shell, spec.router_name), "weight", _take(layer.router, "weight"))
    if spec.router_bias:
        getattr(shell, spec.router_name).bias = _take(layer.router, "bias")
    ours = layer.experts
    if spec.clamped_swiglu is not None:
        _restore_biased_experts(ours, shell.experts)
    else:
        w1 = _take(ours, "w1")
        shell.experts.gate_up_proj = _parameter(w1.transpose(1, 2).contiguous(), w1)
        del w1
        w2 = _take(ours, "w2")
        shell.experts.down_proj = _parameter(w2.transpose(1, 2).contiguous(), w2)
        del w2
    if spec.shared_expert:
        setattr(shell, SHARED_EXPERT, block.shared_expert)
        setattr(shell, SHARED_EXPERT_GATE, block.shared_expert_gate)
    if spec.shared_experts:
        setattr(shell, SHARED_EXPERTS, block.shared_experts)
    if spec.selection_bias is not None:
        bias_E = layer.selection_bias if layer.use_selection_bias else torch.zeros_like(layer.selection_bias)
        write_selection_bias(getattr(shell, spec.router_name), spec.selection_bias, bias_E)
    return shell


def to_hf(model: nn.Module) -> nn.Module:
    """Turn a model converted by :func:`from_hf` back into its Hugging Face form, in place.

    Returns ``model``, whose ``save_pretrained`` then writes an ordinary folder that
    ``AutoModelForCausalLM.from_pretrained`` loads without this library. What the Hugging
    Face format has no place for is dropped, with a warning when it was in use: an
    aux-loss-free selection bias (except in families that hold one, DeepSeek-V3's
    ``e_score_correction_bias``, which gets the layer's bias) and Default MoE's default
    outputs.
    """
    family = family_name(model)
    blocks = [(name, m) for name, m in model.named_modules() if isinstance(m, HFMoEBlock)]
    if not blocks:
        raise ConfigError(f"{family} model holds no HFMoEBlock: nothing to export (was it converted with from_hf?)")
    dropped = set()
    biased = {id(block.moe) for _, block in blocks if block.spec.selection_bias is not None}
    for _, layer in moe_layers(model):
        if id(layer) not in biased and layer.use_selection_bias and bool(layer.selection_bias.any()):
            dropped.add("the aux-loss-free selection bias")
        if layer.estimator.needs_expert_outputs:
            dropped.add(f"the {type(layer.estimator).__name__} estimator's state")
    if dropped:
        warnings.warn(f"{family} has no place for {' and '.join(sorted(dropped))}; not exported", stacklevel=2)
    for name, block in blocks:
        shell = _restore_block(block)
        model.set_submodule(name, shell)
        if not block.router_hooked and hooks_installed(recording_owner(model, name)):
            # The model installed its recording hooks while converted, on our routers only.
            install_record_hooks(getattr(shell, block.spec.router_name), list(block.records))
    return model
