"""Helpers shared by several test files (pytest puts this folder on sys.path)."""

import lightning as L
import torch

from lightning_moe.experts import get_backend


def run_backend(experts, backend, x, indices, weights, autocast_dtype=None):
    """Forward + backward of one backend with a fixed output gradient: (y, stats, grads)."""
    experts.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    weights = weights.detach().clone().requires_grad_(True)
    with torch.autocast(x.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        y, stats = get_backend(backend)(experts, x, indices, weights, True)
    grad_out = torch.linspace(-1, 1, y.numel(), device=y.device).reshape(y.shape)
    y.float().backward(grad_out)
    grads = {"x": x.grad, "weights": weights.grad}
    for name, p in experts.named_parameters():
        grads[name] = torch.zeros_like(p) if p.grad is None else p.grad.clone()
    return y.detach(), stats, grads


def routing_cases():
    g = torch.Generator().manual_seed(1)
    T, E = 13, 6
    yield "random_k2", E, torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(T)])
    yield "zero_token_experts", E, torch.randint(0, 2, (T, 1), generator=g)  # experts 2..5 get nothing
    yield "zero_token_experts_k2", E, torch.stack([torch.randperm(3, generator=g)[:2] + 3 for _ in range(T)])
    yield "single_token", E, torch.tensor([[3, 1]])
    yield "all_on_one_expert", E, torch.full((T, 1), 4)
    yield "k_equals_E", 4, torch.stack([torch.randperm(4, generator=g) for _ in range(5)])


def fit_quietly(module, data, callbacks, val_data=None, ckpt_path=None, **trainer_args):
    """``Trainer.fit`` on CPU without logger, checkpoints, progress bar or summary, unless asked."""
    trainer_args = {
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "accelerator": "cpu",
        **trainer_args,
    }
    trainer = L.Trainer(callbacks=callbacks, **trainer_args)
    trainer.fit(module, data, val_data, ckpt_path=ckpt_path)
    return trainer
