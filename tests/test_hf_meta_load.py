"""meta_init: HFMoELanguageModel built on the meta device, sharded by FSDP2, each rank filling its shards
from the checkpoint's safetensors; every tensor must equal what from_pretrained loads."""

import sys
from datetime import timedelta

import pytest
import torch

transformers = pytest.importorskip("transformers")

import lightning as L  # noqa: E402

from lightning_moe.errors import ConfigError  # noqa: E402
from lightning_moe.hf import from_hf  # noqa: E402
from lightning_moe.hf.module import HFMoELanguageModel  # noqa: E402

from helpers import ForkedModelParallel, fit_quietly  # noqa: E402

VOCAB = 96
COMMON = dict(
    vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=64, tie_word_embeddings=False,
)
FAMILIES = {
    # tied input and output embeddings: one tensor under two names, stored once in the checkpoint
    "qwen3_moe": dict(model_type="qwen3_moe", intermediate_size=24, moe_intermediate_size=16, num_experts=8,
                      num_experts_per_tok=2, norm_topk_prob=True, head_dim=8, tie_word_embeddings=True),
    # a shared expert and its gate beside the routed experts
    "qwen2_moe": dict(model_type="qwen2_moe", intermediate_size=24, moe_intermediate_size=16,
                      shared_expert_intermediate_size=20, num_experts=6, num_experts_per_tok=2, norm_topk_prob=False),
    # experts stored as w1/w3/w2 under block_sparse_moe: renamed and stacked on the way in
    "mixtral": dict(model_type="mixtral", intermediate_size=16, num_local_experts=5, num_experts_per_tok=2),
    "olmoe": dict(model_type="olmoe", intermediate_size=16, num_experts=8, num_experts_per_tok=2),
    "phimoe": dict(model_type="phimoe", intermediate_size=16, num_local_experts=4, num_experts_per_tok=2,
                   router_jitter_noise=0.1, input_jitter_noise=0.0),
}
TIMEOUT = timedelta(seconds=60)


def save_family(folder, family, dtype=torch.float32):
    fields = {**COMMON, **FAMILIES[family]}
    config = transformers.AutoConfig.for_model(fields.pop("model_type"), **fields)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():  # routers as trained ones are, not at their zero-ish initialisation
        for name, param in model.named_parameters():
            param.normal_(std=0.3 if "gate.weight" in name or "router" in name else 0.05)
    model.save_pretrained(folder, max_shard_size="40KB")  # several shards and an index
    return str(folder)


def reference(folder, estimator, dtype="auto"):
    """What the module holds when built the ordinary way: from_pretrained, then converted."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager", dtype=dtype)
    return from_hf(model, estimator=estimator)


def tensors(model):
    found = {name: t for name, t in model.named_parameters(remove_duplicate=False)}
    found.update(model.named_buffers(remove_duplicate=False))  # persistent or not
    return {name: (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone() for name, t in found.items()}


def assert_same_as_reference(ours, folder, estimator, dtype="auto"):
    ref = reference(folder, estimator, dtype)
    expected = tensors(ref)
    assert ours.keys() == expected.keys(), ours.keys() ^ expected.keys()
    for name, value in expected.items():
        assert ours[name].dtype == value.dtype, name
        assert torch.equal(ours[name], value), name
    # The experts against the checkpoint's own tensors, independently of the conversion code:
    # ours are [E, D, 2F] and [E, F, D], transformers' [E, 2F, D] and [E, D, F].
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    for name, param in hf.named_parameters():
        if name.endswith("experts.gate_up_proj"):
            assert torch.equal(ours[name.replace("experts.gate_up_proj", "moe.experts.w1")], param.transpose(1, 2))
        if name.endswith("experts.down_proj"):
            assert torch.equal(ours[name.replace("experts.down_proj", "moe.experts.w2")], param.transpose(1, 2))


class RecordAtFitStart(L.Callback):
    """Each rank's model as the strategy hands it to training (sharded and filled), before any step."""

    def __init__(self, out_dir):
        self.out_dir = out_dir

    def on_fit_start(self, trainer, pl_module):
        model = pl_module.model
        local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters())
        record = {
            "tensors": tensors(model),
            "local_numel": local,
            "numel": sum(p.numel() for p in model.parameters()),
            "tied": model.get_output_embeddings().weight is model.get_input_embeddings().weight,
        }
        torch.save(record, f"{self.out_dir}/rank{trainer.global_rank}.pt")
        trainer.should_stop = True  # loading is what is tested: no step


def batches():
    ids = torch.randint(0, VOCAB, (8, 8), generator=torch.Generator().manual_seed(0))
    return torch.utils.data.DataLoader(list(zip(ids, ids.roll(-1, dims=1))), batch_size=2)


@pytest.mark.skipif(sys.platform == "win32", reason="forked ranks need fork")
@pytest.mark.parametrize("family", list(FAMILIES))
def test_two_fsdp2_ranks_fill_their_shards_with_exactly_what_from_pretrained_loads(tmp_path, family):
    if torch.cuda.is_initialized():
        pytest.skip("forking ranks is impossible once CUDA is initialised in this process")
    folder = save_family(tmp_path / "model", family)
    module = HFMoELanguageModel(pretrained=folder, estimator="topk", attn_implementation="eager", meta_init=True)
    assert all(p.is_meta for p in module.parameters())  # nothing read or allocated before sharding
    strategy = ForkedModelParallel(data_parallel_size=2, tensor_parallel_size=1, timeout=TIMEOUT)
    fit_quietly(module, batches(), [RecordAtFitStart(str(tmp_path))], devices=2, strategy=strategy, max_steps=1)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for rank in ranks:
        assert rank["tied"] == FAMILIES[family].get("tie_word_embeddings", False)
        assert rank["local_numel"] < 0.6 * rank["numel"]  # each rank allocated its half only
        assert_same_as_reference(rank["tensors"], folder, "topk")


def test_one_process_fills_the_whole_model_in_configure_model(tmp_path):
    folder = save_family(tmp_path / "model", "qwen2_moe", dtype=torch.bfloat16)
    module = HFMoELanguageModel(pretrained=folder, estimator="densemixer", meta_init=True, attn_implementation="eager")
    module.configure_model()  # what a Trainer calls first, under any strategy
    ours = tensors(module.model)
    assert ours["lm_head.weight"].dtype == torch.bfloat16  # dtype auto: the checkpoint's
    assert_same_as_reference(ours, folder, "densemixer")
    x = torch.randint(0, VOCAB, (2, 8))
    ref = reference(folder, "densemixer").eval()
    torch.testing.assert_close(module.eval()(x), ref(input_ids=x, use_cache=False).logits, rtol=0, atol=0)
    # another dtype than the checkpoint's: each tensor cast on the way, as from_pretrained casts it
    module = HFMoELanguageModel(pretrained=folder, estimator="densemixer", meta_init=True, dtype="float32",
                                attn_implementation="eager")
    module.configure_model()
    assert_same_as_reference(tensors(module.model), folder, "densemixer", dtype=torch.float32)


def test_meta_init_needs_safetensors(tmp_path):
    folder = save_family(tmp_path / "model", "olmoe")
    for name in tmp_path.joinpath("model").glob("model*.safetensors*"):
        name.unlink()
    with pytest.raises(ConfigError, match="safetensors"):
        HFMoELanguageModel(pretrained=folder, meta_init=True)


def test_a_hub_name_is_read_from_its_cached_snapshot(tmp_path, monkeypatch):
    from huggingface_hub import constants

    snapshot = tmp_path / "hub" / "models--someone--tiny-moe" / "snapshots" / "0123abcd"
    save_family(snapshot, "olmoe")
    (tmp_path / "hub" / "models--someone--tiny-moe" / "refs").mkdir()
    (tmp_path / "hub" / "models--someone--tiny-moe" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the cache only: no request
    module = HFMoELanguageModel(pretrained="someone/tiny-moe", estimator="topk", meta_init=True)
    module.configure_model()
    assert_same_as_reference(tensors(module.model), str(snapshot), "topk")
