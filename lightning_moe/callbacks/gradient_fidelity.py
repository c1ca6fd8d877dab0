"""How close each estimator's router gradient is to the gradient of the dense mixture.

Shape legend: T tokens, D model width, E experts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule

from lightning_moe.callbacks.aux_loss import layer_tags
from lightning_moe.errors import ConfigError
from lightning_moe.layer import MoELayer


@contextmanager
def _probing(layers: list[MoELayer]) -> Iterator[dict[int, dict[str, Tensor]]]:
    """Capture every layer's input, router logits and output of one forward, without side effects.

    Only the layers' own ``training`` flags are switched off: their estimators and experts
    still route as in training (sampling, Default MoE's defaults), while the layers record
    no statistics (so EMA updates and telemetry do not see the probe), attach no auxiliary
    losses (the gradient compared is the task loss's) and apply no input jitter.
    """
    captured: dict[int, dict[str, Tensor]] = {id(layer): {} for layer in layers}
    handles = []
    for layer in layers:
        record = captured[id(layer)]

        def keep_io(module: nn.Module, args: tuple, output: Tensor, record: dict = record) -> None:
            record["x"], record["y"] = args[0], output

        def keep_logits(module: nn.Module, args: tuple, output: Tensor, record: dict = record) -> None:
            record["z"] = output

        handles += [layer.register_forward_hook(keep_io), layer.router.register_forward_hook(keep_logits)]
    modes = [layer.training for layer in layers]
    for layer in layers:
        layer.training = False
    try:
        yield captured
    finally:
        for layer, mode in zip(layers, modes):
            layer.training = mode
        for handle in handles:
            handle.remove()


@contextmanager
def _full_parameters(module: nn.Module, layer: MoELayer) -> Iterator[None]:
    """The layer's parameters as full tensors, for a call outside ``module``'s forward.

    Under FSDP2 (``fully_shard``) they are sharded DTensors except during the forward and
    backward of the FSDP module that holds them: that module is unsharded for the block and
    resharded after (an all-gather, which every rank joins: every rank probes).
    """
    holders = [m for m in module.modules() if isinstance(m, FSDPModule) and any(sub is layer for sub in m.modules())]
    if not holders:
        yield
        return
    holder = holders[-1]  # modules() visits ancestors first: the last is the innermost
    holder.unshard()
    try:
        yield
    finally:
        holder.reshard()


def _expert_output_products(layer: MoELayer, x_TD: Tensor, grad_y_TD: Tensor) -> Tensor:
    """``<dL/dy_t, E_i(x_t)>`` for every token t and expert i, [T, E] float32.

    Every (token, expert) pair goes through the layer's own experts backend with unit
    weights; the gradient of ``<dL/dy, y>`` with respect to those weights is the product
    sought, whatever the backend.
    """
    num_tokens, num_experts = x_TD.shape[0], layer.num_experts
    indices_TE = torch.arange(num_experts, device=x_TD.device).expand(num_tokens, num_experts)
    weights_TE = torch.ones(num_tokens, num_experts, device=x_TD.device, requires_grad=True)
    with torch.enable_grad():
        y_TD, _ = layer.experts(x_TD.detach(), indices_TE, weights_TE)
        (products_TE,) = torch.autograd.grad((y_TD.float() * grad_y_TD.float()).sum(), weights_TE)
    return products_TE


def _dense_router_gradient(layer: MoELayer, z_TE: Tensor, products_TE: Tensor) -> Tensor:
    """dL/dz of the layer's dense mixture ``y = sum_i w_i(z) E_i(x)`` over all E experts, [T, E] float32.

    ``w`` is the layer's gate function applied to every expert, i.e. its top-k gates at k = E
    (:meth:`~lightning_moe.routing.Scoring.gates` of the scores of all experts, renormalised when the
    estimator renormalises, times the routed scaling factor): softmax(z) under the default scoring;
    ``c * sigmoid(z_i)``, or ``c * s_i / sum_j s_j`` renormalised, under sigmoid scoring (DeepSeek-V3).
    With ``products_TE`` = <dL/dy, E_i(x)>, dL/dz = J_w(z)^T products. The default scoring keeps
    the closed form pi_i (s_i - sum_j pi_j s_j); other scorings take the vector-Jacobian product
    from autograd.
    """
    z_TE = z_TE.detach().float()
    scoring = layer.scoring
    if scoring.is_softmax_top_k:
        probs_TE = z_TE.softmax(dim=-1)
        return probs_TE * (products_TE - (probs_TE * products_TE).sum(dim=-1, keepdim=True))
    renormalize = bool(getattr(layer.estimator, "renormalize", False))
    with torch.enable_grad():
        z_TE.requires_grad_(True)
        weights_TE = scoring.gates(scoring.scores(z_TE), renormalize)
        (dense_TE,) = torch.autograd.grad(weights_TE, z_TE, products_TE.float())
    return dense_TE


def router_gradient_fidelity(module: nn.Module, loss_fn: Callable[[], Tensor]) -> dict[str, dict[str, Tensor]]:
    """Compare each MoELayer's router-logit gradient with the dense mixture's, on one loss.

    ``loss_fn`` runs ``module`` forward and returns the loss. For every layer, with z its
    router logits, pi = softmax(z) and G = dL/dy the gradient reaching the layer's output
    in that same pass:

    - the estimator's gradient is dL/dz as the layer's estimator computes it;
    - the dense gradient is that of the dense mixture ``y = sum_i pi_i E_i(x)`` over all
      E experts at the same z and G: ``pi_i (s_i - sum_j pi_j s_j)`` with
      ``s_i = <G, E_i(x)>`` — the quantity Default MoE and SparseMixer approximate. Under
      another :class:`~lightning_moe.routing.Scoring` (sigmoid scores, a routed scaling
      factor) pi is the layer's own gate function over all experts (:func:`_dense_router_gradient`).

    Returns ``{"layer_XX": {"router_grad_cosine": ..., "router_grad_norm_ratio": ...}}``:
    the cosine between the two [T, E] gradients and ``|estimator| / |dense|``; both are
    exactly 1 when the estimator is exact. Parameter ``.grad`` is not touched, the probe's
    forward is not recorded in routing statistics, and the global RNG state is restored
    afterwards, so training continues as if the probe had not run. Each layer must run
    once in the forward.

    Cost: one forward and backward of the loss, plus one forward and backward of every
    layer's experts on all E experts for every token (E / k times the experts' usual work).
    """
    tags = layer_tags(module)
    layers = [layer for _, layer in tags]
    devices = sorted({p.device.index for p in module.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices), _probing(layers) as captured, torch.enable_grad():
        loss = loss_fn()
        zs = [captured[id(layer)]["z"] for layer in layers]
        ys = [captured[id(layer)]["y"] for layer in layers]
        grads = torch.autograd.grad(loss, zs + ys, allow_unused=True)
    results = {}
    for index, (tag, layer) in enumerate(tags):
        z_TE, y = zs[index], ys[index]
        grad_z, grad_y = grads[index], grads[len(layers) + index]
        estimator_TE = torch.zeros_like(z_TE) if grad_z is None else grad_z.float()
        grad_y_TD = torch.zeros_like(y) if grad_y is None else grad_y
        x_TD = captured[id(layer)]["x"].reshape(-1, layer.d_model)
        with _full_parameters(module, layer):
            products_TE = _expert_output_products(layer, x_TD, grad_y_TD.reshape(-1, layer.d_model))
        dense_TE = _dense_router_gradient(layer, z_TE, products_TE)
        estimator, dense = estimator_TE.double().flatten(), dense_TE.double().flatten()
        estimator_norm, dense_norm = estimator.norm(), dense.norm()
        results[tag] = {
            "router_grad_cosine": (estimator @ dense / (estimator_norm * dense_norm)).float(),
            "router_grad_norm_ratio": (estimator_norm / dense_norm).float(),
        }
    return results


@contextmanager
def _muted_logging(pl_module: L.LightningModule) -> Iterator[None]:
    # The probe re-runs ``training_step``; what it logs must not replace the step's own values.
    pl_module.log = pl_module.log_dict = lambda *args, **kwargs: None
    try:
        yield
    finally:
        del pl_module.log, pl_module.log_dict


class RouterGradientFidelity(L.Callback):
    """Logs how well each MoELayer's router gradient matches the dense mixture's gradient.

    Every ``every_n_steps`` optimizer steps, before the step's first micro-batch trains,
    :func:`router_gradient_fidelity` runs that micro-batch through ``training_step`` once
    more (logging muted) and logs per layer ``XX``:

    - ``moe/layer_XX/router_grad_cosine``: cosine between the estimator's router-logit
      gradient and the gradient of the dense mixture (all experts computed, weights =
      softmax over all experts, or the layer's sigmoid gates over all of them under
      sigmoid scoring), over all tokens of the batch;
    - ``moe/layer_XX/router_grad_norm_ratio``: ``|estimator gradient| / |dense gradient|``.

    Both are 1 for an exact estimator (Top-K with k = E). Values come from the rank-0
    batch on rank 0 (no synchronisation).

    Cost: when on, each probe is one extra forward and backward of the batch plus, in
    every MoE layer, all E experts on every token (a dense MoE forward and backward,
    E / k times the experts' usual work) — about three training steps' worth for 8
    experts at k = 2, once every ``every_n_steps`` steps. Without this callback nothing
    is computed. The probe leaves parameter gradients, routing statistics and the RNG
    untouched, so training is the same with and without it.

    Args:
        every_n_steps: optimizer steps between probes; probes run on steps ``s`` with
            ``(s + 1) % every_n_steps == 0``, the steps :class:`RoutingMonitor` logs on, so
            make it a multiple of ``Trainer(log_every_n_steps=...)``.
        loss_fn: ``loss_fn(pl_module, batch) -> loss``; default: ``training_step``'s loss
            (a tensor or the ``"loss"`` entry of a dict). Needs automatic optimisation.
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        loss_fn: Callable[[L.LightningModule, Any], Tensor] | None = None,
    ) -> None:
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ConfigError(f"RouterGradientFidelity: every_n_steps must be an int >= 1, got {every_n_steps!r}")
        self.every_n_steps = every_n_steps
        self.loss_fn = loss_fn
        self._probed_step = -1

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._probed_step = -1
        if not layer_tags(pl_module):
            rank_zero_warn("RouterGradientFidelity: the model has no MoELayer; it logs nothing.")
        if self.loss_fn is None and not pl_module.automatic_optimization:
            raise ConfigError(
                "RouterGradientFidelity needs `loss_fn` with manual optimisation: training_step does its own backward."
            )
        if trainer.log_every_n_steps and self.every_n_steps % trainer.log_every_n_steps:
            rank_zero_warn(
                f"RouterGradientFidelity(every_n_steps={self.every_n_steps}) is not a multiple of"
                f" Trainer(log_every_n_steps={trainer.log_every_n_steps}): some probes would be written late or not at all."
            )

    def _loss(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> Tensor:
        if self.loss_fn is not None:
            return self.loss_fn(pl_module, batch)
        with _muted_logging(pl_module), trainer.precision_plugin.train_step_context():
            output = pl_module.training_step(batch, batch_idx)
        return output["loss"] if isinstance(output, dict) else output

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if (step + 1) % self.every_n_steps or step == self._probed_step or not layer_tags(pl_module):
            return
        self._probed_step = step
        results = router_gradient_fidelity(pl_module, lambda: self._loss(trainer, pl_module, batch, batch_idx))
        for tag, values in results.items():
            for name, value in values.items():
                pl_module.log(f"moe/{tag}/{name}", value, on_step=True, on_epoch=False)
