"""lightning-moe export streams a checkpoint, distributed (DCP, written by two FSDP2 ranks) or whole,
into size-limited safetensors shards that plain from_pretrained loads with the trained model's logits."""

import json
import os
import sys
from datetime import timedelta

import pytest
import torch

transformers = pytest.importorskip("transformers")

import lightning as L  # noqa: E402
from safetensors import safe_open  # noqa: E402

from lightning_moe.cli import main  # noqa: E402
from lightning_moe.errors import ConfigError  # noqa: E402
from lightning_moe.hf.export import export_checkpoint, export_pretrained  # noqa: E402
from lightning_moe.hf.module import HFMoELanguageModel  # noqa: E402

from helpers import ForkedModelParallel, fit_quietly  # noqa: E402

VOCAB = 96
COMMON = dict(
    vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=64, tie_word_embeddings=False,
)
CONFIGS = {
    # tied embeddings; experts stored per expert by save_pretrained
    "qwen3_moe": dict(model_type="qwen3_moe", intermediate_size=24, moe_intermediate_size=16, num_experts=8,
                      num_experts_per_tok=2, norm_topk_prob=True, head_dim=8, tie_word_embeddings=True),
    # experts stored as w1/w3/w2 under block_sparse_moe
    "mixtral": dict(model_type="mixtral", intermediate_size=16, num_local_experts=4, num_experts_per_tok=2),
}
IDS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
TIMEOUT = timedelta(seconds=60)


def make_module(family):
    torch.manual_seed(0)
    config = {**COMMON, **CONFIGS[family]}
    return HFMoELanguageModel(config=config, estimator="topk", dtype="float32", attn_implementation="eager",
                              learning_rate=1e-2)


def batches():
    ids = torch.randint(0, VOCAB, (8, 8), generator=torch.Generator().manual_seed(0))
    return torch.utils.data.DataLoader(list(zip(ids, ids.roll(-1, dims=1))), batch_size=2)


class SaveAndRecord(L.Callback):
    """After training: the checkpoint (every rank takes part), the model's eval logits and full weights."""

    def __init__(self, out_dir):
        self.out_dir = out_dir

    def on_train_end(self, trainer, pl_module):
        trainer.save_checkpoint(os.path.join(self.out_dir, "checkpoint"))
        pl_module.eval()
        with torch.no_grad():
            logits = pl_module(IDS)
        weights = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).clone() for k, v in
                   pl_module.model.state_dict().items()}
        if trainer.global_rank == 0:
            torch.save({"logits": logits, "weights": weights}, os.path.join(self.out_dir, "trained.pt"))


def shard_files(folder):
    index = os.path.join(folder, "model.safetensors.index.json")
    with open(index) as fh:
        return sorted(set(json.load(fh)["weight_map"].values()))


def assert_loads_as_trained(folder, trained):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, trained["logits"], rtol=1e-5, atol=1e-5)
    # every weight, exactly, against the trained model's own (our expert layout is the transpose)
    ours = trained["weights"]
    for name, param in model.named_parameters():
        mine = name.replace(".mlp.gate.weight", ".mlp.moe.router.weight")
        mine = mine.replace("experts.gate_up_proj", "moe.experts.w1").replace("experts.down_proj", "moe.experts.w2")
        expected = ours[mine].transpose(1, 2) if ".moe.experts." in mine else ours[mine]
        assert torch.equal(param, expected), name
    return model


@pytest.mark.skipif(sys.platform == "win32", reason="forked ranks need fork")
def test_export_of_a_distributed_checkpoint_streams_into_size_limited_shards(tmp_path):
    if torch.cuda.is_initialized():
        pytest.skip("forking ranks is impossible once CUDA is initialised in this process")
    strategy = ForkedModelParallel(data_parallel_size=2, tensor_parallel_size=1, timeout=TIMEOUT,
                                   save_distributed_checkpoint=True)
    fit_quietly(make_module("qwen3_moe"), batches(), [SaveAndRecord(str(tmp_path))], devices=2, strategy=strategy,
                max_steps=2)
    checkpoint = tmp_path / "checkpoint"
    assert (checkpoint / ".metadata").is_file()  # a DCP folder, optimizer state included
    trained = torch.load(tmp_path / "trained.pt")

    out = tmp_path / "exported"
    limit = 20_000
    assert export_checkpoint(str(checkpoint), str(out), max_shard_size=limit) == str(out)
    files = shard_files(out)
    assert len(files) > 2
    for name in files:
        with safe_open(str(out / name), framework="pt") as fh:
            sizes = [fh.get_slice(k).get_shape() for k in fh.keys()]
            nbytes = sum(4 * torch.Size(s).numel() for s in sizes)
            assert nbytes <= limit or len(sizes) == 1, (name, nbytes)
    model = assert_loads_as_trained(str(out), trained)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied again, stored once
    assert json.loads((out / "config.json").read_text())["use_cache"] is True


def test_export_of_a_whole_checkpoint_streams_what_export_pretrained_writes(tmp_path):
    module = make_module("mixtral")
    record = SaveAndRecord(str(tmp_path))
    fit_quietly(module, batches(), [record], max_steps=2)
    checkpoint = str(tmp_path / "checkpoint")
    trained = torch.load(tmp_path / "trained.pt")
    main(["export", checkpoint, "--output", str(tmp_path / "streamed")])  # the command, default 5GB shards
    assert (tmp_path / "streamed" / "model.safetensors").is_file()  # one file: no index
    assert_loads_as_trained(str(tmp_path / "streamed"), trained)
    # the same files as the whole-model export writes (per-expert w1/w3/w2 under block_sparse_moe)
    export_pretrained(HFMoELanguageModel.load_from_checkpoint(checkpoint), str(tmp_path / "whole"))
    with safe_open(str(tmp_path / "streamed" / "model.safetensors"), "pt") as a, \
            safe_open(str(tmp_path / "whole" / "model.safetensors"), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        assert any(".block_sparse_moe.experts.3.w3." in k for k in a.keys())
        for key in a.keys():
            assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key


def test_bad_max_shard_size_is_one_line(tmp_path, capsys):
    with pytest.raises(ConfigError, match="max_shard_size"):
        export_checkpoint(str(tmp_path / "none.ckpt"), str(tmp_path / "out"), max_shard_size="lots")
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(tmp_path / "none.ckpt"), "--output", str(tmp_path / "out"), "--max_shard_size", "0GB"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().startswith("error: `max_shard_size` must be")


def test_a_distributed_checkpoint_of_another_model_is_refused_in_one_line(tmp_path, capsys):
    import torch.distributed.checkpoint as dcp

    folder = tmp_path / "dcp"
    with pytest.warns(UserWarning, match="single process"):
        dcp.save({"state_dict": {"model.w": torch.zeros(2)}}, checkpoint_id=str(folder), no_dist=True)
    torch.save({"hyper_parameters": {"hidden": 2}}, folder / "meta.pt")  # Lightning's non-tensor part
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(folder), "--output", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: checkpoint=") and "checkpoint of another model" in err, err
    assert not (tmp_path / "out").exists()
