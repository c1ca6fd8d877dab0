"""Helpers shared by several test files (pytest puts this folder on sys.path)."""

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher

import lightning_moe.experts.megablocks as mb
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


# ---- plain-torch stand-ins for the megablocks backend's kernels -------------------------


class FakeKernels:
    """Plain-torch versions of the three kernels, asserting the inputs the real ones need."""

    def __init__(self, indices_TK: torch.Tensor | None = None, nan_for_empty_experts: bool = False):
        self.expert_ids_N = None if indices_TK is None else indices_TK.reshape(-1)
        self.nan_for_empty_experts = nan_for_empty_experts
        self.gmm_dtypes = []

    def check_routing(self, indices_N, bin_ids_N, bins_E, top_k, num_pairs):
        for t in (indices_N, bin_ids_N, bins_E):
            assert t.dtype == torch.int32 and t.dim() == 1 and t.is_contiguous()
        assert indices_N.numel() == bin_ids_N.numel() == num_pairs
        assert torch.equal(
            indices_N.long().sort().values, torch.arange(num_pairs, device=indices_N.device)
        )  # a permutation of the pairs
        if self.expert_ids_N is not None:
            assert torch.equal(bin_ids_N.long(), self.expert_ids_N[indices_N.long()])  # bin of each sorted pair
        assert bool((bin_ids_N[1:] >= bin_ids_N[:-1]).all())
        counts = torch.bincount(bin_ids_N.long(), minlength=bins_E.numel())
        assert torch.equal(bins_E.long(), counts.cumsum(0))

    def gather(self, x_TD, indices_N, bin_ids_N, bins_E, top_k):
        assert x_TD.dim() == 2 and x_TD.is_contiguous()
        self.check_routing(indices_N, bin_ids_N, bins_E, top_k, x_TD.shape[0] * top_k)
        return x_TD[indices_N.long() // top_k]

    def scatter(self, x_ND, indices_N, bin_ids_N, weights_N, bins_E, top_k):
        assert x_ND.dim() == 2 and x_ND.is_contiguous()
        assert weights_N.dim() == 1 and weights_N.is_contiguous() and weights_N.dtype == x_ND.dtype
        self.check_routing(indices_N, bin_ids_N, bins_E, top_k, x_ND.shape[0])
        pairs = indices_N.long()
        # Row indices_N[i] of the pair buffer holds sorted row i scaled by that pair's weight.
        out_ND = torch.zeros_like(x_ND).index_copy(0, pairs, x_ND * weights_N[pairs, None])
        return out_ND.view(-1, top_k, x_ND.shape[1]).sum(dim=1)

    def gmm(self, a_ND, b_EAB, batch_sizes_E, trans_b=False):
        assert not trans_b
        assert batch_sizes_E.device.type == "cpu" and batch_sizes_E.dtype == torch.int64
        assert batch_sizes_E.shape == (b_EAB.shape[0],) and int(batch_sizes_E.sum()) == a_ND.shape[0]
        assert a_ND.is_contiguous() and b_EAB.is_contiguous() and a_ND.dtype == b_EAB.dtype
        self.gmm_dtypes.append(a_ND.dtype)
        if self.nan_for_empty_experts:
            return UninitialisedWeightGradGMM.apply(a_ND, b_EAB, batch_sizes_E)
        return torch.cat([seg @ b_EAB[e] for e, seg in enumerate(a_ND.split(batch_sizes_E.tolist()))])


class UninitialisedWeightGradGMM(torch.autograd.Function):
    """A gmm whose weight gradient for zero-token experts is garbage (NaN), as from ``torch.empty``."""

    @staticmethod
    def forward(ctx, a_ND, b_EAB, batch_sizes_E):
        ctx.save_for_backward(a_ND, b_EAB)
        ctx.sizes = batch_sizes_E.tolist()
        return torch.cat([seg @ b_EAB[e] for e, seg in enumerate(a_ND.split(ctx.sizes))])

    @staticmethod
    def backward(ctx, grad_NB):
        a_ND, b_EAB = ctx.saved_tensors
        grad_a = torch.cat([g @ b_EAB[e].T for e, g in enumerate(grad_NB.split(ctx.sizes))])
        grad_b = torch.full_like(b_EAB, float("nan"))
        for e, (seg, g) in enumerate(zip(a_ND.split(ctx.sizes), grad_NB.split(ctx.sizes))):
            if seg.shape[0]:
                grad_b[e] = seg.T @ g
        return grad_a, grad_b, None


def use_fake_kernels(monkeypatch, kernels: FakeKernels) -> None:
    """The megablocks backend runs ``kernels`` (on any device and dtype) until the test ends."""
    monkeypatch.setattr(
        mb, "load_kernels", lambda device, dtype: mb.Kernels(kernels.gather, kernels.scatter, kernels.gmm)
    )


class InterruptAtStep(L.Callback):
    """Sends this process SIGINT (a Ctrl-C) at the end of training step ``step``."""

    def __init__(self, step: int = 1) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGINT)


def train_bpe_tokenizer(path, texts, vocab_size=300):
    """A byte-level BPE tokenizer (special token ``<|endoftext|>``) trained on ``texts``, saved to ``path``."""
    from lightning_moe.data.train_tokenizer import train_bpe

    train_bpe(texts, vocab_size, str(path))
    return path


def write_corpus(root, texts: dict):
    """A folder ``root`` holding one UTF-8 text file per ``{name: text}`` entry."""
    root.mkdir()
    for name, text in texts.items():
        (root / name).write_text(text, encoding="utf-8")
    return root


def ready_datamodule(source, cache_dir, **kwargs):
    """A :class:`TextDataModule` over ``source`` (16-token windows, batches of 4 unless given), set up for fit."""
    from lightning_moe.data import TextDataModule

    kwargs.setdefault("seq_len", 16)
    kwargs.setdefault("batch_size", 4)
    dm = TextDataModule(source=str(source), cache_dir=str(cache_dir), **kwargs)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def assert_same(a, b):
    """``a`` and ``b`` equal exactly, through nested dicts, lists and tensors."""
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


def assert_same_checkpoint(got, expected):
    """Two checkpoint dicts of MoELanguageModel runs hold the same training state, bit for bit: step,
    weights, optimizer, schedule, RNG streams and routing monitor."""
    assert got["global_step"] == expected["global_step"]
    assert got["state_dict"].keys() == expected["state_dict"].keys()
    for key, value in expected["state_dict"].items():
        assert torch.equal(got["state_dict"][key], value), key
    assert_same(got["optimizer_states"], expected["optimizer_states"])  # every state entry and group setting
    assert got["lr_schedulers"] == expected["lr_schedulers"]
    for name in ("ResumableRNG", "RoutingMonitor"):
        assert_same(got["callbacks"][name], expected["callbacks"][name])


# ---- FSDP2 in forked CPU processes ------------------------------------------------------


class ForkedModelParallel(ModelParallelStrategy):
    """ModelParallelStrategy started by forking, as ``ddp_fork`` does.

    Its own launcher starts subprocesses that would re-run the pytest command.
    """

    def _configure_launcher(self):
        self._launcher = _ForkLauncher(self, start_method="fork")


class _ForkLauncher(_MultiProcessingLauncher):
    def _recover_results_in_main_process(self, worker_output, trainer):
        # The ranks' FSDP2 (DTensor) weights do not load back into this process's plain
        # module; the tests read what the ranks wrote instead.
        trainer.state = worker_output.trainer_state


# ---- what each rank of a multi-process fit saw --------------------------------------------

#: RoutingMonitor's global token counts, appended by test_ddp's ``record_monitor_tokens`` fixture.
MONITOR_TOKENS = []


class RankRecord(L.Callback):
    """Writes each rank's losses, final state and the routing monitor's global token counts."""

    def __init__(self, out_dir):
        self.out_dir = out_dir
        self.losses = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses[trainer.global_step - 1] = outputs["loss"].item()

    def on_train_end(self, trainer, pl_module):
        state = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in pl_module.state_dict().items()}
        record = {"losses": self.losses, "state": {k: v.detach().clone() for k, v in state.items()}}
        record["monitor_tokens"] = list(MONITOR_TOKENS)
        record["metrics"] = {k: float(v) for k, v in trainer.callback_metrics.items()}
        torch.save(record, f"{self.out_dir}/rank{trainer.global_rank}.pt")


#: A tiny quickstart fit on ``corpus.txt`` in the working folder (flags after ``--config
#: recipes/quickstart.yaml``): 2 optimizer steps, one validation at the end, logs in ``runs``.
TINY_QUICKSTART = [
    "--model.d_model=32",
    "--model.n_heads=2",
    "--model.n_layers=1",
    "--model.max_seq_len=16",
    "--model.moe.num_experts=4",
    "--model.moe.ffn_hidden=32",
    "--data.source=corpus.txt",
    "--data.seq_len=16",
    "--data.batch_size=2",
    "--data.cache_dir=cache",
    "--trainer.max_steps=2",
    "--trainer.limit_val_batches=1",
    "--trainer.val_check_interval=2",
    "--trainer.enable_model_summary=false",
    "--trainer.logger.init_args.save_dir=runs",
]


def record_hub_retries(monkeypatch) -> list:
    """The sleeps of huggingface_hub's retry backoff, recorded instead of waited for (empty: no retries)."""
    import time
    import types

    import huggingface_hub.utils._http as hub_http

    sleeps: list = []
    monkeypatch.setattr(hub_http, "time", types.SimpleNamespace(**{**vars(time), "sleep": sleeps.append}))
    return sleeps
