"""Experts split over an expert-parallel mesh dimension inside FSDP2: 4 gloo CPU ranks (2 x 2) against one process.

The ranks are forked (as tests/test_ddp.py does for ModelParallelStrategy); each writes its
losses, the full gradient of every parameter at every step and its final state to a file.
"""

import sys
from datetime import timedelta

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import StrategyRegistry

from lightning_moe.callbacks import LoadBalancingLoss
from lightning_moe.data import TextDataModule
from lightning_moe.errors import ConfigError
from lightning_moe.module import MoELanguageModel
from lightning_moe.strategies import ExpertParallelFSDP2Strategy

from helpers import _ForkLauncher

pytestmark = [
    pytest.mark.skipif(sys.platform == "win32", reason="forked ranks need fork"),
    pytest.mark.skipif(torch.cuda.is_initialized(), reason="fork cannot start once CUDA is initialised"),
]

STEPS = 3
WORLD, EP = 4, 2
TIMEOUT = timedelta(seconds=60)  # a collective one rank never joins fails the test instead of hanging


class ForkedExpertParallelFSDP2(ExpertParallelFSDP2Strategy):
    """The strategy started by forking: its own launcher would re-run the pytest command."""

    def _configure_launcher(self):
        super()._configure_launcher()
        self._launcher = _ForkLauncher(self, start_method="fork")


def full(tensor):
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


class Record(L.Callback):
    """Each rank's losses, full gradients (every step, before clipping) and final full state."""

    def __init__(self, out_dir):
        self.out_dir = out_dir
        self.losses, self.grads = {}, {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        # full_tensor is a collective: every rank gathers every gradient, in the same order.
        self.grads[trainer.global_step] = {
            name: full(p.grad).detach().clone() for name, p in pl_module.named_parameters() if p.grad is not None
        }

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses[trainer.global_step - 1] = outputs["loss"].item()

    def on_train_end(self, trainer, pl_module):
        state = {k: full(v).detach().clone() for k, v in pl_module.state_dict().items()}
        record = {"losses": self.losses, "grads": self.grads, "state": state}
        torch.save(record, f"{self.out_dir}/rank{trainer.global_rank}.pt")


def corpus(tmp_path):
    path = tmp_path / "corpus.py"
    if not path.exists():
        path.write_text("".join(f"def g{i}(x, y):\n    return (x - {i}) * y // {i + 1}\n" for i in range(40)))
    return str(path)


def fit(tmp_path, run, estimator, devices, strategy, batch_size, ckpt_path=None, callbacks=()):
    out_dir = tmp_path / run
    out_dir.mkdir()
    L.seed_everything(0)
    moe = {"num_experts": 4, "top_k": 2, "estimator": estimator, "backend": "torch"}
    model = MoELanguageModel(d_model=16, n_heads=2, n_layers=2, max_seq_len=8, moe=moe, warmup_steps=1)
    data = TextDataModule(source=corpus(tmp_path), seq_len=8, batch_size=batch_size, cache_dir=str(tmp_path / "cache"))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_steps=STEPS,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=bool(callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=0.5,
        callbacks=[Record(str(out_dir)), LoadBalancingLoss(alpha=0.01, scope="global"), *callbacks],
    )
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(devices)]


def ep_strategy(**kwargs):
    return ForkedExpertParallelFSDP2(expert_parallel_size=EP, timeout=TIMEOUT, **kwargs)


@pytest.mark.parametrize("estimator", ["topk", "default_moe"])
def test_losses_and_every_gradient_equal_one_process_with_the_same_global_batch(tmp_path, estimator):
    single = fit(tmp_path, "single", estimator, 1, "auto", batch_size=2 * WORLD)[0]
    ranks = fit(tmp_path, "ep", estimator, WORLD, ep_strategy(), batch_size=2)

    for step, loss in single["losses"].items():
        assert sum(r["losses"][step] for r in ranks) / WORLD == pytest.approx(loss, rel=1e-5), step
    for step, grads in single["grads"].items():
        assert grads.keys() == ranks[0]["grads"][step].keys()
        for name, grad in grads.items():
            for rank in ranks:
                torch.testing.assert_close(rank["grads"][step][name], grad, rtol=1e-4, atol=1e-6, msg=(step, name))
    for key, value in single["state"].items():
        for rank in ranks:
            torch.testing.assert_close(rank["state"][key], value, rtol=1e-5, atol=1e-6, msg=key)
