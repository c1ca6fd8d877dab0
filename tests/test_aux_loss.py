"""Auxiliary losses: formulas on hand-made numbers, and injection == explicit addition."""

import math
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_moe import MoELayer, attach_aux_loss, load_balancing_loss, router_z_loss
from lightning_moe.callbacks import LoadBalancingLoss, RouterZLoss
from lightning_moe.callbacks.aux_loss import lightning_loss_scale


def test_load_balancing_loss_formula_on_hand_made_counts():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]])
    counts = torch.tensor([3, 1, 0])
    # E * sum_i f_i P_i with f = (3/4, 1/4, 0), P = (0.4, 0.4, 0.2)
    expected = 3 * (0.75 * 0.4 + 0.25 * 0.4 + 0.0 * 0.2)
    assert load_balancing_loss(probs_TE=probs, tokens_per_expert_E=counts).item() == pytest.approx(expected)
    uniform = torch.full((4, 4), 0.25)
    assert load_balancing_loss(probs_TE=uniform, tokens_per_expert_E=torch.ones(4)).item() == pytest.approx(1.0)


def test_router_z_loss_formula():
    logits = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    lse = [math.log(2.0), math.log(math.e + math.e**2)]
    expected = (lse[0] ** 2 + lse[1] ** 2) / 2
    assert router_z_loss(logits_TE=logits).item() == pytest.approx(expected, rel=1e-6)


def test_attach_aux_loss_adds_scaled_gradient():
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    act = w * 3
    out = attach_aux_loss(act, (w**2).sum(), grad_scale=lambda: 0.5)
    torch.testing.assert_close(out, act)
    out.sum().backward()
    torch.testing.assert_close(w.grad, torch.tensor([3.0, 3.0]) + 0.5 * 2 * w.detach())


class TinyMoEModule(L.LightningModule):
    """A user's own module: its training_step returns the task loss only."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.moe = MoELayer(16, 32, num_experts=4, top_k=2)
        self.head = nn.Linear(16, 1)

    def forward(self, x):
        h = self.inp(x)
        return self.head(h + self.moe(h))

    def training_step(self, batch, batch_idx):
        x, target = batch
        return nn.functional.mse_loss(self(x), target)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


class InPlaceResidualModule(TinyMoEModule):
    """Adds the residual to the MoE output in place, as many models do."""

    def forward(self, x):
        h = self.inp(x)
        y = self.moe(h)
        y += h
        return self.head(y)


class CaptureGrads(L.Callback):
    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == 0:
            self.grads = {n: p.grad.clone() for n, p in pl_module.named_parameters()}


@pytest.mark.parametrize("module_class", [TinyMoEModule, InPlaceResidualModule])
@pytest.mark.parametrize("accumulate", [1, 3])
def test_injected_aux_gradients_equal_explicit_loss_gradients(accumulate, module_class, tmp_path):
    torch.manual_seed(0)
    alpha, z_weight, batch = 0.3, 0.05, 6
    xs, ys = torch.randn(batch * accumulate, 8), torch.randn(batch * accumulate, 1)
    module = module_class()
    reference = module_class()
    reference.load_state_dict(module.state_dict())

    capture = CaptureGrads()
    trainer = L.Trainer(
        max_steps=1,
        accumulate_grad_batches=accumulate,
        callbacks=[LoadBalancingLoss(alpha=alpha), RouterZLoss(weight=z_weight), capture],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, DataLoader(TensorDataset(xs, ys), batch_size=batch))

    # Explicit: (task + alpha * LB + z * Z) of each micro-batch, averaged over the window.
    for x, y in zip(xs.split(batch), ys.split(batch)):
        h = reference.inp(x)
        logits = reference.moe.router(h)
        routing = reference.moe.estimator.route(logits, 2)
        counts = torch.bincount(routing.indices.reshape(-1), minlength=4)
        aux = alpha * load_balancing_loss(probs_TE=routing.probs, tokens_per_expert_E=counts)
        aux = aux + z_weight * router_z_loss(logits_TE=logits)
        loss = nn.functional.mse_loss(reference(x), y) + aux
        (loss / accumulate).backward()

    for name, p in reference.named_parameters():
        torch.testing.assert_close(capture.grads[name], p.grad, rtol=1e-5, atol=1e-7, msg=name)
    # The router must actually receive the aux gradient (else the test proves nothing).
    assert capture.grads["moe.router.weight"].abs().sum() > 0


def test_loss_scale_follows_accumulation_and_fp16_scaler():
    scaler = SimpleNamespace(is_enabled=lambda: True, get_scale=lambda: 1024.0)
    trainer = SimpleNamespace(
        lightning_module=SimpleNamespace(automatic_optimization=True),
        accumulate_grad_batches=4,
        precision_plugin=SimpleNamespace(scaler=scaler),
    )
    assert lightning_loss_scale(trainer)() == pytest.approx(256.0)
    trainer.lightning_module.automatic_optimization = False
    assert lightning_loss_scale(trainer)() == pytest.approx(1024.0)
    trainer.precision_plugin = SimpleNamespace()
    assert lightning_loss_scale(trainer)() == pytest.approx(1.0)


def test_bad_callback_arguments():
    with pytest.raises(ValueError, match="scope='local'"):
        LoadBalancingLoss(scope="local")
    with pytest.raises(ValueError, match="weight must be >= 0"):
        RouterZLoss(weight=-1.0)
