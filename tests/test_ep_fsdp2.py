"""Experts split over an expert-parallel mesh dimension inside FSDP2: 4 gloo CPU ranks (2 x 2) against one process.

The ranks are forked (as tests/test_ddp.py does for ModelParallelStrategy); each writes its
losses, the full gradient of every parameter at every step and its final state to a file.
"""

import sys
from datetime import timedelta
from functools import partial

import lightning as L
import pytest
import torch
from helpers import _ForkLauncher
from lightning.fabric.utilities.load import _load_distributed_checkpoint
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import StrategyRegistry

from lightning_moe.callbacks import AuxLossFreeBalancing, LoadBalancingLoss
from lightning_moe.data import TextDataModule
from lightning_moe.errors import ConfigError
from lightning_moe.module import MoELanguageModel
from lightning_moe.strategies import ExpertParallelFSDP2Strategy

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

    def on_train_start(self, trainer, pl_module):
        # What this rank holds of each expert tensor: E / ep experts, FSDP2-sharded over the other ranks.
        self.local_shapes = {
            name: tuple(p.to_local().shape)
            for name, p in pl_module.named_parameters()
            if hasattr(p, "to_local") and ".experts." in name
        }

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        # full_tensor is a collective: every rank gathers every gradient, in the same order.
        self.grads[trainer.global_step] = {
            name: full(p.grad).detach().clone() for name, p in pl_module.named_parameters() if p.grad is not None
        }

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses[trainer.global_step - 1] = outputs["loss"].item()

    def on_train_end(self, trainer, pl_module):
        state = {k: full(v).detach().clone() for k, v in pl_module.state_dict().items()}
        record = {"losses": self.losses, "grads": self.grads, "state": state, "local_shapes": self.local_shapes}
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
        callbacks=[
            Record(str(out_dir)),
            LoadBalancingLoss(alpha=0.01, scope="global"),
            AuxLossFreeBalancing(0.01),
            *callbacks,
        ],
    )
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(devices)]


def ep_strategy(**kwargs):
    return ForkedExpertParallelFSDP2(expert_parallel_size=EP, timeout=TIMEOUT, **kwargs)


@pytest.mark.parametrize(("estimator", "ep"), [("topk", EP), ("default_moe", WORLD)])
def test_losses_and_every_gradient_equal_one_process_with_the_same_global_batch(tmp_path, estimator, ep):
    # 2 x 2: experts over 2 ranks, FSDP2 over the other 2; 1 x 4: experts over all ranks, FSDP2 over none.
    single = fit(tmp_path, "single", estimator, 1, "auto", batch_size=2 * WORLD)[0]
    strategy = ForkedExpertParallelFSDP2(expert_parallel_size=ep, timeout=TIMEOUT)
    ranks = fit(tmp_path, "ep", estimator, WORLD, strategy, batch_size=2)

    # A rank owns E / ep experts and stores 1 / (W / ep) of them: one expert in both layouts.
    for rank in ranks:
        for name, shape in rank["local_shapes"].items():
            assert shape == (1, *single["state"][name].shape[1:]) and single["state"][name].shape[0] == 4, name
    assert single["state"]["model.blocks.0.ffn.selection_bias"].abs().sum() > 0  # aux-loss-free balancing moved
    # The clipping threshold acts: the norm of the global gradient exceeds it.
    norm = torch.stack([g.norm() for g in single["grads"][0].values()]).norm()
    assert norm > 0.5
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


def test_densemixer_is_refused_in_one_line(tmp_path):
    # Its dense router gradient needs every expert on every token; a rank holds only its own.
    with pytest.raises(Exception, match="estimator='densemixer' does not support expert parallelism"):
        fit(tmp_path, "ep", "densemixer", WORLD, ep_strategy(), batch_size=2)


def checkpoints(tmp_path, name):
    return [ModelCheckpoint(dirpath=tmp_path / name, filename="{step}", every_n_train_steps=1, save_top_k=-1)]


def test_resume_from_a_full_checkpoint_is_exact_and_the_checkpoint_loads_into_one_process(tmp_path):
    strategy = partial(ep_strategy, save_distributed_checkpoint=False)
    whole = fit(tmp_path, "whole", "topk", WORLD, strategy(), batch_size=2, callbacks=checkpoints(tmp_path, "ep"))
    resumed = fit(
        tmp_path, "resumed", "topk", WORLD, strategy(), batch_size=2, ckpt_path=tmp_path / "ep" / "step=1.ckpt"
    )
    for rank in range(WORLD):
        assert resumed[rank]["losses"] == {s: whole[rank]["losses"][s] for s in range(1, STEPS)}
        for key, value in whole[rank]["state"].items():
            assert torch.equal(resumed[rank]["state"][key], value), key

    # The single-process layout: full [E, ...] experts and optimizer moments, equal to one process's checkpoint.
    single = fit(tmp_path, "single", "topk", 1, "auto", batch_size=2 * WORLD, callbacks=checkpoints(tmp_path, "one"))[0]
    got = torch.load(tmp_path / "ep" / "step=1.ckpt", weights_only=False)
    expected = torch.load(tmp_path / "one" / "step=1.ckpt", weights_only=False)
    assert got["state_dict"].keys() == expected["state_dict"].keys()
    for key, value in expected["state_dict"].items():
        torch.testing.assert_close(got["state_dict"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    moments = [
        {k: v for k, v in entry.items() if k != "step"} for entry in expected["optimizer_states"][0]["state"].values()
    ]
    got_moments = [
        {k: v for k, v in entry.items() if k != "step"} for entry in got["optimizer_states"][0]["state"].values()
    ]
    torch.testing.assert_close(got_moments, moments, rtol=1e-4, atol=1e-7)
    # ... and one process resumed from it trains as the uninterrupted single run.
    continued = fit(
        tmp_path, "continued", "topk", 1, "auto", batch_size=2 * WORLD, ckpt_path=tmp_path / "ep" / "step=1.ckpt"
    )[0]
    for key, value in single["state"].items():
        torch.testing.assert_close(continued["state"][key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_distributed_checkpoint_resumes_exactly_and_into_another_expert_parallel_size(tmp_path):
    # DCP stores every expert tensor once, in its global [E, ...] layout, whatever the mesh.
    whole = fit(tmp_path, "whole", "topk", WORLD, ep_strategy(), batch_size=2, callbacks=checkpoints(tmp_path, "ep"))
    # Read back independently of the strategy: the experts are stored whole, [E, ...].
    stored = _load_distributed_checkpoint(tmp_path / "ep" / "step=1.ckpt")
    assert (
        stored["state_dict"]["model.blocks.0.ffn.experts.w1"].shape
        == whole[0]["state"]["model.blocks.0.ffn.experts.w1"].shape
    )
    assert stored["state_dict"]["model.blocks.0.ffn.experts.w1"].shape[0] == 4
    resumed = fit(
        tmp_path, "resumed", "topk", WORLD, ep_strategy(), batch_size=2, ckpt_path=tmp_path / "ep" / "step=1.ckpt"
    )
    wider = ForkedExpertParallelFSDP2(expert_parallel_size=WORLD, timeout=TIMEOUT)
    resharded = fit(
        tmp_path, "resharded", "topk", WORLD, wider, batch_size=2, ckpt_path=tmp_path / "ep" / "step=1.ckpt"
    )
    for rank in range(WORLD):
        assert resumed[rank]["losses"] == {s: whole[rank]["losses"][s] for s in range(1, STEPS)}
        for key, value in whole[rank]["state"].items():
            assert torch.equal(resumed[rank]["state"][key], value), key
    # Under 1 x 4 the weights and AdamW's state come back whole: training goes on as the 2 x 2 run.
    for rank in range(WORLD):
        assert resharded[rank]["losses"][1] == pytest.approx(whole[rank]["losses"][1], rel=1e-6)
        for name, grad in whole[rank]["grads"][1].items():
            torch.testing.assert_close(resharded[rank]["grads"][1][name], grad, rtol=1e-4, atol=1e-6, msg=name)
        for key, value in whole[rank]["state"].items():
            torch.testing.assert_close(resharded[rank]["state"][key], value, rtol=1e-5, atol=1e-6, msg=key)


class RowsOfRank(L.LightningDataModule):
    """Rank r of W reads rows r, r + W, ...: every step sees the same global batch for any W."""

    def __init__(self, rows, batch_size):
        super().__init__()
        self.rows, self.batch_size = rows, batch_size

    def train_dataloader(self):
        world, rank = self.trainer.world_size, self.trainer.global_rank
        return torch.utils.data.DataLoader(self.rows[rank::world], batch_size=self.batch_size)


@pytest.mark.parametrize("meta_init", [False, True])
def test_a_hugging_face_model_trains_as_in_one_process_and_resumes_exactly(tmp_path, meta_init):
    pytest.importorskip("transformers")
    from helpers import fit_quietly
    from test_hf_meta_load import VOCAB, save_family

    from lightning_moe.hf.module import HFMoELanguageModel

    folder = save_family(tmp_path / "model", "olmoe")  # 8 experts, top-2
    ids = torch.randint(0, VOCAB, (2 * WORLD, 8), generator=torch.Generator().manual_seed(0))
    # Twice the same rows: both steps train on the same global batch, so a resumed run (whose plain
    # DataLoader starts over) sees what the uninterrupted one saw.
    rows = list(zip(ids, ids.roll(-1, dims=1))) * 2

    def run(name, devices, strategy, batch_size, callbacks=(), ckpt_path=None):
        (tmp_path / name).mkdir()
        module = HFMoELanguageModel(
            pretrained=folder,
            estimator="topk",
            attn_implementation="eager",
            meta_init=meta_init,
            warmup_steps=1,
            router_aux_loss=False,  # a per-micro-batch loss: the mean over ranks is not the global batch's
        )
        fit_quietly(
            module,
            RowsOfRank(rows, batch_size),
            [Record(str(tmp_path / name)), *callbacks],
            ckpt_path=ckpt_path,
            devices=devices,
            strategy=strategy,
            max_steps=2,
            gradient_clip_val=0.5,
            use_distributed_sampler=False,
            enable_checkpointing=bool(callbacks),
        )
        return [torch.load(tmp_path / name / f"rank{r}.pt") for r in range(devices)]

    single = run("single", 1, "auto", 2 * WORLD)[0]
    ranks = run("ep", WORLD, ep_strategy(), 2, callbacks=checkpoints(tmp_path, "ckpt"))
    assert ranks[0]["local_shapes"]["model.model.layers.0.mlp.moe.experts.w1"][0] == 2  # 8 experts / 2 / 2
    for step, loss in single["losses"].items():
        assert sum(r["losses"][step] for r in ranks) / WORLD == pytest.approx(loss, rel=1e-5), step
    for step, grads in single["grads"].items():
        for name, grad in grads.items():
            for rank in ranks:
                torch.testing.assert_close(rank["grads"][step][name], grad, rtol=1e-4, atol=1e-6, msg=(step, name))

    # A distributed checkpoint of the converted model resumes exactly.
    resumed = run("resumed", WORLD, ep_strategy(), 2, ckpt_path=tmp_path / "ckpt" / "step=1.ckpt")
    for rank, whole in zip(resumed, ranks):
        assert rank["losses"] == {1: whole["losses"][1]}
        for key, value in whole["state"].items():
            assert torch.equal(rank["state"][key], value), key


# ---- configuration ---------------------------------------------------------------------


def test_the_strategy_is_registered_by_name_and_takes_all_ranks_by_default():
    assert "moe_expert_parallel_fsdp2" in StrategyRegistry
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="moe_expert_parallel_fsdp2", logger=False)
    assert isinstance(trainer.strategy, ExpertParallelFSDP2Strategy)
    assert trainer.strategy.expert_parallel_size == 2


@pytest.mark.parametrize(
    ("size", "message"),
    [
        (3, r"expert_parallel_size=3 does not divide the world size 4 \(num_nodes x devices\)"),
        (0, r"expert_parallel_size must be a positive int or None \(all ranks\), got 0"),
    ],
)
def test_a_bad_expert_parallel_size_fails_when_the_trainer_is_built(size, message):
    with pytest.raises(ConfigError, match=message):
        L.Trainer(accelerator="cpu", devices=WORLD, strategy=ExpertParallelFSDP2Strategy(expert_parallel_size=size))


def test_experts_that_the_expert_parallel_size_does_not_divide_are_refused_naming_the_layer(tmp_path):
    model = MoELanguageModel(d_model=16, n_heads=2, n_layers=1, max_seq_len=8, moe={"num_experts": 3, "top_k": 1})
    data = TextDataModule(source=corpus(tmp_path), seq_len=8, batch_size=2, cache_dir=str(tmp_path / "cache"))
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=ForkedExpertParallelFSDP2(timeout=TIMEOUT), max_steps=1, logger=False
    )
    with pytest.raises(Exception, match="MoE layer 'blocks.0.ffn' has num_experts=3, which expert_parallel_size=2"):
        trainer.fit(model, data)


@pytest.mark.slow
def test_lightning_moe_fit_takes_the_strategy_from_yaml(tmp_path):
    # The real command, whose ranks ModelParallelStrategy's launcher starts as processes of their own.
    from test_multiprocess_cli import assert_ends_cleanly

    config = tmp_path / "strategy.yaml"
    config.write_text(
        "trainer:\n  strategy:\n    class_path: lightning_moe.strategies.ExpertParallelFSDP2Strategy\n"
        "    init_args:\n      expert_parallel_size: 2\n"
    )
    assert_ends_cleanly(tmp_path, ["--config", str(config)])
