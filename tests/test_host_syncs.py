"""Host synchronisations in one training step of the MoE layer.

On a GPU the host stalls until every queued kernel has finished whenever it reads a
device value (``.item()``, ``int()``/``float()``/``bool()`` of a tensor, ``.tolist()``,
``.cpu()``) or runs an op whose output size or host-side check depends on the data
(``nonzero``, boolean-mask indexing, ``bincount``...). Once per layer and step, such a
stall keeps the GPU idle while the host launches the next kernels. This machine has no
GPU, so :class:`HostSyncCounter` counts, on CPU tensors, exactly the calls that would
synchronise on CUDA; a new one in the layer's training step fails here.

Expected counts per layer and training step (forward + backward, aux losses attached with
an fp16 loss scale, routing statistics recorded):

* ``torch`` backend on ``torch._grouped_mm`` (aligned shapes; on CUDA: sm90 and bf16): 0.
  CPU runs the per-segment matmul instead, so this is counted with CPU taken off
  ``PER_SEGMENT_DEVICES``, i.e. on the path a GPU takes.
* ``torch`` backend, per-segment matmul (CPU, any other GPU or dtype, odd shapes): 1, the
  segment sizes read once for ``Tensor.split``.
* ``megablocks`` backend (stand-in kernels): 1, grouped_gemm's ``gmm`` takes the segment
  sizes on the host.
* ``loop`` reference: 1, the per-expert row counts that size each expert's matmul.
"""

from __future__ import annotations

import collections
import contextlib
from types import SimpleNamespace

import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import lightning_moe.experts.megablocks as mb
from lightning_moe import MoELayer, available_estimators
from lightning_moe.callbacks import LoadBalancingLoss, RouterZLoss
from lightning_moe.experts import grouped_gemm
from lightning_moe.model import MoETransformer, TransformerConfig

from helpers import FakeKernels

# aten ops that synchronise with the host on CUDA, with how many times.
_SYNCING_OPS = {
    "aten::_local_scalar_dense": 1,  # .item(), int(t), float(t), bool(t), `if t:`
    "aten::bincount": 2,  # the CUDA kernel reads the input's min and max to the host
    "aten::nonzero": 1,  # output size depends on the data
    "aten::masked_select": 1,
    "aten::_unique2": 1,
    "aten::unique_dim": 1,
    "aten::unique_consecutive": 1,
    "aten::equal": 1,
    "aten::allclose": 1,
}
# Ops that synchronise only with some arguments.
_BOOL_INDEXING_OPS = ("aten::index.Tensor", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_")
_HOST_COPY = "_counted_as_host_copy"  # attribute marking a tensor that would live in host memory


def _is_mask(index) -> bool:
    return isinstance(index, torch.Tensor) and index.dtype in (torch.bool, torch.uint8)


def _on_host(tensor: torch.Tensor) -> bool:
    return getattr(tensor, _HOST_COPY, False)


def _mark_host(tensor: torch.Tensor, on_host: bool = True) -> torch.Tensor:
    setattr(tensor, _HOST_COPY, on_host)
    return tensor


class HostSyncCounter(TorchDispatchMode):
    """Records every call inside the block that would synchronise host and device on CUDA.

    Every tensor counts as a device tensor, except copies made to the host inside the block
    (``.cpu()``, ``.to("cpu")``) and what is computed from those alone: reading those is
    free. ``syncs`` lists one name per synchronisation. Sees the forward and the backward
    (autograd runs the backward of CPU tensors on the calling thread). Calls made while
    :meth:`paused` are not counted (stand-in kernels checking their own inputs).
    """

    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[str] = []
        self.ops: collections.Counter[str] = collections.Counter()
        self._paused = 0
        self._patched: dict[str, object] = {}

    @contextlib.contextmanager
    def paused(self):
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def _record(self, name: str, times: int = 1) -> None:
        if not self._paused:
            self.syncs.extend([name] * times)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.name()
        if not self._paused:
            self.ops[name] += 1
        inputs = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if inputs and all(_on_host(t) for t in inputs):  # host arithmetic: no device involved
            out = func(*args, **kwargs)
            pytree.tree_map_only(torch.Tensor, _mark_host, out)
            return out
        if name in _SYNCING_OPS:
            self._record(name, _SYNCING_OPS[name])
        elif name == "aten::repeat_interleave.Tensor" and kwargs.get("output_size") is None:
            self._record(name)  # the output size is the sum of the repeats
        elif name == "aten::histc" and tuple(args[2:4]) in ((), (0, 0)):
            self._record(name, 2)  # min == max: the range is read from the data
        elif name in _BOOL_INDEXING_OPS and any(_is_mask(i) for i in args[1] if i is not None):
            self._record(name)  # a boolean mask is turned into indices with nonzero
        return func(*args, **kwargs)

    def __enter__(self):
        def patch(method, replacement):
            self._patched[method] = getattr(torch.Tensor, method)
            setattr(torch.Tensor, method, replacement)

        def read(method):
            original = getattr(torch.Tensor, method)

            def counting(tensor, *args, **kwargs):
                if not _on_host(tensor):
                    self._record(f"Tensor.{method}")
                return original(tensor, *args, **kwargs)

            return counting

        for method in ("tolist", "numpy"):
            patch(method, read(method))
        original_cpu, original_to = torch.Tensor.cpu, torch.Tensor.to

        def host_copy(tensor):
            with self.paused():  # on CPU the "copy" may be the tensor itself: clone it to mark it alone
                return _mark_host(tensor.clone())

        def cpu(tensor, *args, **kwargs):
            if _on_host(tensor):
                return original_cpu(tensor, *args, **kwargs)
            self._record("Tensor.cpu")
            return host_copy(original_cpu(tensor, *args, **kwargs))

        def to(tensor, *args, **kwargs):
            device = kwargs.get("device", next((a for a in args if isinstance(a, (str, torch.device))), None))
            out = original_to(tensor, *args, **kwargs)
            if device is None:
                return out
            if _on_host(tensor):  # an upload (here the device is the CPU as well): a device tensor again
                return _mark_host(host_copy(out), False)
            if torch.device(device).type == "cpu":
                if not kwargs.get("non_blocking", False):
                    self._record("Tensor.to(cpu)")
                return host_copy(out)
            return out

        patch("cpu", cpu)
        patch("to", to)
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            for method, original in self._patched.items():
                setattr(torch.Tensor, method, original)
            self._patched.clear()


def test_the_counter_sees_each_kind_of_host_read():
    t = torch.arange(1, 5)
    reads = {
        "item": lambda: t[0].item(),
        "int": lambda: int(t.max()),
        "bool": lambda: bool(t.any()),
        "if": lambda: 1 if t[0] else 0,
        "tolist": lambda: t.tolist(),
        "cpu": lambda: t.cpu(),
        "to": lambda: t.to("cpu"),
        "bincount": lambda: torch.bincount(t, minlength=8),
        "nonzero": lambda: (t > 2).nonzero(),
        "mask": lambda: t[t > 2],
        "mask_put": lambda: t.clone().index_put_((t > 2,), torch.tensor(0)),
    }
    for name, read in reads.items():
        with HostSyncCounter() as counter:
            read()
        assert counter.syncs, name
    with HostSyncCounter() as counter:  # device-side work only
        counts = torch.zeros(8, dtype=torch.long).scatter_add_(0, t, torch.ones_like(t))
        t[torch.tensor([0, 2])].cumsum(0).to(torch.float32)
        torch.topk(counts, 2)
    assert counter.syncs == []
    with HostSyncCounter() as counter:  # one read; what is computed from the host copy is free
        sizes = t.cpu()
        empty = sizes == 0
        if empty.any():
            empty.nonzero().tolist()
        sizes.to(t.device)  # uploaded again: reading it would count
    assert counter.syncs == ["Tensor.cpu"]


def fp16_trainer() -> SimpleNamespace:
    """What the aux-loss callbacks read from a Lightning trainer under ``precision="16-mixed"``."""
    return SimpleNamespace(
        lightning_module=SimpleNamespace(automatic_optimization=True),
        accumulate_grad_batches=2,
        precision_plugin=SimpleNamespace(scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10)),
    )


def layer_training_step(layer: MoELayer, counter: HostSyncCounter | None = None) -> HostSyncCounter:
    """Forward + backward of ``layer`` as inside a Lightning fp16 training step, counted."""
    trainer = fp16_trainer()
    holder = torch.nn.ModuleDict({"moe": layer})
    for callback in (LoadBalancingLoss(0.01), RouterZLoss(1e-3)):
        callback.on_fit_start(trainer, holder)
    if hasattr(layer.estimator, "attach_updater"):  # Default MoE records expert outputs for its EMA
        layer.estimator.attach_updater()
    layer.train()
    scaler = trainer.precision_plugin.scaler
    x = torch.randn(24, layer.d_model, requires_grad=True)
    counter = counter or HostSyncCounter()
    with counter:
        loss = layer(x).square().mean() / trainer.accumulate_grad_batches
        scaler.scale(loss).backward()
    assert layer.experts.w1.grad is not None and layer.router.weight.grad.abs().sum() > 0
    assert layer.routing_stats.num_forwards == 1
    return counter


def make_layer(estimator: str, backend: str, d_model: int = 16, ffn_hidden: int = 32) -> MoELayer:
    torch.manual_seed(0)
    top_k = 1 if estimator == "sparsemixer" else 2
    return MoELayer(d_model, ffn_hidden, 4, top_k, estimator=estimator, backend=backend)


@pytest.mark.parametrize("estimator", available_estimators())
def test_a_training_step_on_the_grouped_kernel_never_waits_for_the_device(estimator, monkeypatch):
    monkeypatch.setattr(grouped_gemm, "PER_SEGMENT_DEVICES", ())  # the kernel a GPU runs
    counter = layer_training_step(make_layer(estimator, "torch"))
    assert counter.ops["aten::_grouped_mm"] > 0  # the path counted is the grouped kernel's
    assert counter.syncs == []


@pytest.mark.parametrize("d_model,ffn_hidden", [(16, 32), (6, 10)])  # CPU; rows not 16-byte aligned
def test_the_per_segment_matmul_reads_the_segment_sizes_once(d_model, ffn_hidden):
    counter = layer_training_step(make_layer("topk", "torch", d_model=d_model, ffn_hidden=ffn_hidden))
    assert counter.ops["aten::_grouped_mm"] == 0
    assert counter.syncs == ["Tensor.tolist"]  # once for both projections, forward and backward


def test_the_loop_reference_reads_the_per_expert_row_counts_once():
    counter = layer_training_step(make_layer("default_moe", "loop"))
    assert counter.syncs == ["Tensor.tolist"]


def test_the_megablocks_backend_reads_only_the_segment_sizes_gmm_needs(monkeypatch):
    kernels, counter = FakeKernels(), HostSyncCounter()

    def uncounted(kernel):
        def run(*args, **kwargs):
            with counter.paused():  # the stand-ins check their inputs on the host; the real kernels do not
                return kernel(*args, **kwargs)

        return run

    stand_ins = mb.Kernels(*(uncounted(k) for k in (kernels.gather, kernels.scatter, kernels.gmm)))
    monkeypatch.setattr(mb, "load_kernels", lambda device, dtype: stand_ins)
    layer_training_step(make_layer("default_moe", "megablocks"), counter)
    assert kernels.gmm_dtypes  # the stand-in kernels ran
    assert counter.syncs == ["Tensor.cpu"]


def test_a_layer_without_tokens_never_waits_for_the_device():
    layer = make_layer("topk", "torch")
    with HostSyncCounter() as counter:
        layer(torch.randn(0, 16, requires_grad=True)).sum().backward()
    assert counter.syncs == []


def test_the_input_id_range_check_reads_nothing_back_from_an_accelerator():
    # Meta tensors stand in for an accelerator's: they hold no values, so a host read fails.
    with torch.device("meta"):
        model = MoETransformer(TransformerConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, moe=None))
        input_ids = torch.zeros(2, 8, dtype=torch.long)
    with HostSyncCounter() as counter:
        logits = model(input_ids)
    assert logits.shape == (2, 8, 32)
    assert counter.syncs == []
    assert counter.ops["aten::_assert_async"] == 1  # the range is still checked, on the device


def router_grad_with_fp16_scaler(scaler) -> tuple[HostSyncCounter, torch.Tensor]:
    """Two MoE layers, LoadBalancingLoss attached, one backward of the scaled loss."""
    layers = torch.nn.Sequential(make_layer("topk", "torch"), make_layer("topk", "torch"))
    trainer = fp16_trainer()
    trainer.precision_plugin.scaler = scaler
    LoadBalancingLoss(0.5).on_fit_start(trainer, layers)
    x = torch.randn(24, 16, generator=torch.Generator().manual_seed(0))
    with HostSyncCounter() as counter:
        (layers(x).sum() * 1024.0 / trainer.accumulate_grad_batches).backward()  # what scaler.scale does
    return counter, layers[0].router.weight.grad


def test_the_fp16_aux_loss_scale_stays_on_the_device_and_scales_as_the_host_value_did():
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(torch.ones(()))  # Lightning scales the loss before backward: the scale now lives in a tensor
    counter, grad = router_grad_with_fp16_scaler(scaler)
    assert "aten::_local_scalar_dense" not in counter.syncs  # not read back once per MoE layer
    host_scaler = lambda scale: SimpleNamespace(is_enabled=lambda: True, get_scale=lambda: scale)  # noqa: E731
    _, grad_from_host_value = router_grad_with_fp16_scaler(host_scaler(1024.0))
    torch.testing.assert_close(grad, grad_from_host_value, rtol=1e-6, atol=0)
    _, grad_unscaled_aux = router_grad_with_fp16_scaler(host_scaler(1.0))
    assert not torch.allclose(grad, grad_unscaled_aux)  # the scale reaches the aux gradient
