"""The offline DeepSeek-V3-style recipe end to end: tiny GLM-4.5 folder -> fit with DenseMixer and
aux-loss-free balancing -> export -> plain transformers routes with the bias training moved."""

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lightning_moe.cli import main  # noqa: E402
from lightning_moe.hf.tiny import build_tiny_model  # noqa: E402

RECIPE = Path(__file__).parents[1] / "recipes" / "posttrain_tiny_glm4_moe_offline.yaml"


def biases(model):
    return [b.detach().clone() for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")]


@pytest.mark.slow  # an end-to-end fit, export and reload (~15 s)
def test_offline_glm4_moe_recipe_fits_moves_the_bias_and_exports_it(tmp_path):
    folder = build_tiny_model("glm4_moe", str(tmp_path / "tiny-glm4-moe"), vocab_size=320)
    before = biases(transformers.AutoModelForCausalLM.from_pretrained(folder))
    assert before and all(not b.any() for b in before)
    main(
        [
            "fit",
            "--config",
            str(RECIPE),
            f"--model.pretrained={folder}",
            "--data.max_examples=200",
            "--data.seq_len=64",
            "--data.batch_size=4",
            "--trainer.max_steps=6",
            "--trainer.val_check_interval=6",
            "--trainer.limit_val_batches=1",
            "--trainer.enable_progress_bar=false",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
        ]
    )
    checkpoint = tmp_path / "runs" / "posttrain_tiny_glm4_moe_offline" / "version_0" / "checkpoints" / "last.ckpt"
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    trained = [state[k] for k in sorted(state) if k.endswith("moe.selection_bias")]
    # 6 optimizer steps of gamma 1e-3 sign updates (recentred): every entry moved, by at most 6e-3 (+ recentring).
    assert len(trained) == len(before) and all(b.ne(0).all() and b.abs().max() <= 12e-3 for b in trained)
    main(["export", str(checkpoint), "--output", str(tmp_path / "sft")])
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "sft")
    assert type(model).__name__ == "Glm4MoeForCausalLM"
    exported = biases(model)
    assert all(torch.equal(a, b) for a, b in zip(exported, trained))
    ids = torch.randint(0, 320, (1, 16), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(model(ids).logits).all()
