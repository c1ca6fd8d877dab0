"""The offline post-training recipe end to end: tiny model folder -> fit -> export -> plain transformers."""

import math
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from lightning_moe.cli import main  # noqa: E402
from lightning_moe.hf.tiny import build_tiny_model  # noqa: E402

RECIPES = Path(__file__).parents[1] / "recipes"


def val_losses(run_dir):
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return [(event.step, event.value) for event in accumulator.Scalars("val/loss")]


@pytest.mark.slow
def test_offline_recipe_fits_lowers_validation_loss_and_exports(tmp_path, capsys):
    vocab_size = 512
    folder = build_tiny_model("olmoe", str(tmp_path / "tiny-olmoe"), vocab_size=vocab_size)
    main(
        [
            "fit",
            "--config",
            str(RECIPES / "posttrain_tiny_offline.yaml"),
            f"--model.pretrained={folder}",
            "--trainer.max_steps=40",
            "--trainer.val_check_interval=20",
            "--trainer.limit_val_batches=4",
            "--trainer.enable_progress_bar=false",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
        ]
    )
    run_dir = tmp_path / "runs" / "posttrain_tiny_offline" / "version_0"
    losses = val_losses(run_dir)
    assert len(losses) == 2  # after 20 and 40 steps
    # A model that knows nothing pays log(V) nats per token; training goes well below and keeps going down.
    assert losses[0][1] < math.log(vocab_size) - 1.0
    assert losses[1][1] < losses[0][1]

    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    capsys.readouterr()
    main(["sample", str(checkpoint), "--prompt", "What is 2 + 3?", "--max_new_tokens", "6", "--temperature", "0"])
    assert capsys.readouterr().out.startswith("What is 2 + 3?")
    main(["export", str(checkpoint), "--output", str(tmp_path / "sft")])
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "sft")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "sft")
    assert type(model).__name__ == "OlmoeForCausalLM"
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True, return_tensors="pt"
    )
    ids = prompt["input_ids"] if hasattr(prompt, "keys") else prompt
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > ids.shape[1]
    assert torch.isfinite(model(ids).logits).all()
