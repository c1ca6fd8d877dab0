"""What makes two ``lightning-moe`` runs the same run, and which settings may change when one resumes.

A run is its model and its data, as saved in every checkpoint (Lightning's ``hyper_parameters``
and ``datamodule_hyper_parameters``). Their settings fall into three groups:

* **Training settings** (:data:`TRAINING_MODEL_FIELDS`, :data:`TRAINING_DATA_FIELDS`): the
  optimizer and schedule (``learning_rate``, ``weight_decay``, ``betas``, ``warmup_steps``,
  ``min_lr_ratio``), how the same math is computed (``backend``, ``compile``,
  ``activation_checkpointing``, ``attn_implementation``) and how batches are fed (``batch_size``,
  ``num_workers``, ``cache_dir``, ...). They are not part of a run's identity and any resume may
  change them; the change is applied and reported in one line. The trainer's settings
  (``max_steps``, callbacks, ...) are never compared.
* **Routing** (:data:`ROUTING_FIELDS`: the estimator, its arguments, GRIN's input jitter): part
  of a run's identity, so ``--ckpt_path last`` does not continue a Top-K run as a DenseMixer
  run, but an explicit ``--ckpt_path FILE --model.moe.estimator X`` switches the estimator of
  that checkpoint's run on purpose (applied and reported; the new estimator's state, e.g.
  Default MoE's EMA buffers, starts fresh: :func:`adapt_estimator_state`).
* **Everything else** (architecture: ``d_model``, ``n_layers``, ``moe.num_experts``, the
  pretrained model, ...; data: ``source``, ``tokenizer``, ``seq_len``, ``max_bytes``, ``seed``,
  ...): a run's identity. A resume refuses a different model architecture, naming the field;
  different data is applied and reported, since the weights still fit.

A setting only one side has (a field added after the checkpoint was written, ``vocab_size``
that ``lightning-moe`` links from the data) is not compared. Paths are compared by the file
they name.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from torch import nn

from lightning_moe.errors import ConfigError

__all__ = [
    "ROUTING_FIELDS",
    "TRAINING_DATA_FIELDS",
    "TRAINING_MODEL_FIELDS",
    "adapt_estimator_state",
    "config_differences",
    "describe",
    "plain_settings",
    "saved_config",
]

#: Model settings any resume may change (dotted names, as in ``--model.<name>``).
TRAINING_MODEL_FIELDS = frozenset(
    {
        "learning_rate",
        "weight_decay",
        "betas",
        "warmup_steps",
        "min_lr_ratio",
        "activation_checkpointing",
        "compile",
        "backend",
        "moe.backend",
        "attn_implementation",
    }
)
#: Data settings any resume may change: how batches are fed, not which text.
TRAINING_DATA_FIELDS = frozenset({"batch_size", "num_workers", "cache_dir", "num_proc", "hf_streaming"})
#: The router's gradient estimator: part of a run's identity, switchable by an explicit ``--ckpt_path``.
ROUTING_FIELDS = frozenset({"estimator", "estimator_args", "moe.input_jitter"})

#: Keys LightningCLI adds to saved hyperparameters that are not the class's arguments.
_CLI_KEYS = ("_instantiator", "_class_path")


def plain_settings(hparams: Any) -> dict[str, Any]:
    """Saved or parsed settings as a plain dict: ``class_path`` and the class's arguments side by side."""
    if hparams is None:
        return {}
    if hasattr(hparams, "as_dict"):  # a jsonargparse Namespace
        hparams = hparams.as_dict()
    plain = dict(hparams)
    init_args = plain.pop("init_args", None)
    if isinstance(init_args, Mapping):  # ``{class_path, init_args}`` as parsed for a model named by class path
        plain.update(init_args)
    if "_class_path" in plain:  # as LightningCLI saves it
        plain["class_path"] = plain["_class_path"]
    for key in (*_CLI_KEYS, "dict_kwargs"):
        plain.pop(key, None)
    if isinstance(plain.get("moe"), Mapping):
        # MoELanguageModel's estimator: ``estimator`` at the top level (the spelling every recipe
        # uses) replaces ``moe.estimator`` where given; compared and merged in one place, the top level.
        moe = dict(plain["moe"])
        for key in ("estimator", "estimator_args"):
            inner = moe.pop(key, None)
            if plain.get(key) is None and inner is not None:
                plain[key] = inner
        plain["moe"] = moe
    return plain


def saved_config(checkpoint: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The ``model`` and ``data`` settings a checkpoint was trained with (plain dicts)."""
    return {
        "model": plain_settings(checkpoint.get("hyper_parameters")),
        "data": plain_settings(checkpoint.get("datamodule_hyper_parameters")),
    }


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if a == b:
        return True
    if isinstance(a, (str, os.PathLike)) and isinstance(b, (str, os.PathLike)):
        a, b = os.fspath(a), os.fspath(b)
        return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)
    return False


def _differences(saved: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any, Any]]:
    found = []
    for key in saved.keys() & new.keys():
        if key == "estimator_args":  # compared whole: one estimator's arguments
            pass
        elif isinstance(saved[key], Mapping) and isinstance(new[key], Mapping):
            found += _differences(saved[key], new[key], f"{prefix}{key}.")
            continue
        if not _same(saved[key], new[key]):
            found.append((f"{prefix}{key}", saved[key], new[key]))
    return sorted(found, key=lambda entry: entry[0])


def field_kind(section: str, name: str) -> str:
    """``"training"``, ``"routing"`` or ``"identity"`` for setting ``name`` of ``section`` (``"model"``/``"data"``)."""
    if section == "model":
        if name in TRAINING_MODEL_FIELDS:
            return "training"
        if name in ROUTING_FIELDS:
            return "routing"
    elif section == "data" and name in TRAINING_DATA_FIELDS:
        return "training"
    return "identity"


def config_differences(
    saved: Mapping[str, Mapping[str, Any]], new: Mapping[str, Mapping[str, Any]]
) -> list[tuple[str, str, Any, Any]]:
    """``(kind, "model.<field>"/"data.<field>", saved value, new value)`` for every setting that differs.

    ``kind`` is :func:`field_kind`'s answer. Settings only one side has are left out.
    """
    return [
        (field_kind(section, name), f"{section}.{name}", old, value)
        for section in ("model", "data")
        for name, old, value in _differences(plain_settings(saved.get(section)), plain_settings(new.get(section)))
    ]


def describe(differences: list[tuple[str, str, Any, Any]], there: str = "checkpoint", here: str = "this run") -> str:
    """``model.moe.estimator 'topk' in the checkpoint, 'densemixer' in this run; ...`` for one line."""
    return "; ".join(f"{name} {old!r} in the {there}, {new!r} in {here}" for _, name, old, new in differences)


def adapt_estimator_state(module: nn.Module, checkpoint: dict[str, Any]) -> None:
    """Let a checkpoint load into ``module`` whose MoE layers use another estimator than the checkpoint's.

    Switching the estimator on resume is supported: the old estimator's buffers are dropped from
    ``checkpoint["state_dict"]`` and the new one's are added with the values ``module`` holds now
    (fresh: e.g. Default MoE's EMA starts uninitialised), in place. Only checkpoints whose saved
    routing settings differ from ``module.hparams`` are touched; a missing buffer otherwise means
    a damaged or foreign checkpoint, which the strict load reports. A switch that adds or removes
    *parameters* (SparseMixer's ``learnable_omega``) raises :class:`ConfigError`: the optimizer
    state would no longer fit the parameters.
    """
    from lightning_moe.layer import moe_layers

    state = checkpoint.get("state_dict")
    saved = plain_settings(checkpoint.get("hyper_parameters"))
    ours = plain_settings(getattr(module, "hparams", None))
    switched = [d for d in config_differences({"model": saved}, {"model": ours}) if d[0] == "routing"]
    if not isinstance(state, dict) or not switched:
        return
    prefixes = tuple(f"{name}.estimator." if name else "estimator." for name, _ in moe_layers(module))
    current = module.state_dict()
    parameters = {name for name, _ in module.named_parameters()}
    stale = [key for key in state if key.startswith(prefixes) and key not in current]
    fresh = [key for key in current if key.startswith(prefixes) and key not in state]
    # An estimator parameter the checkpoint lacks, or one it has (its optimizer state counts it).
    added_or_removed = [key for key in fresh if key in parameters]
    optimizers = checkpoint.get("optimizer_states") or []
    saved_count = sum(len(group["params"]) for opt in optimizers[:1] for group in opt.get("param_groups", []))
    if optimizers and saved_count != sum(p.requires_grad for p in module.parameters()):
        added_or_removed += [key for key in stale if state[key].ndim > 0] or ["a parameter"]
    if added_or_removed:
        raise ConfigError(
            f"switching the estimator on resume ({describe(switched)}) adds or removes estimator parameters"
            f" ({', '.join(sorted(added_or_removed)[:3])}), which the checkpoint's optimizer state cannot follow;"
            " keep the checkpoint's estimator settings, or start a new run from its weights"
        )
    for key in stale:
        del state[key]
    for key in fresh:
        state[key] = current[key].detach().clone()
