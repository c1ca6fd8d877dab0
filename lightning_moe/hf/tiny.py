"""A tiny, randomly initialised Hugging Face MoE causal LM and a matching tokenizer, built offline.

    python -m lightning_moe.hf.tiny --family qwen3_moe --output tiny-qwen3-moe [--vocab-size 512] [--seed 0]

The folder loads with ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained``
like any released model, so recipes and tests post-train a real transformers model without
a download. The model has 2 layers of width 64 with 8 experts, 2 per token, in float32. The
tokenizer is a byte-level BPE trained here on the synthetic chat set
(:func:`lightning_moe.data.chat.synthetic_chat`) with ChatML special tokens
(``<|im_start|>``, ``<|im_end|>``; ``<|endoftext|>`` is BOS, EOS and padding) and a ChatML
chat template; the model's ``vocab_size`` is the tokenizer's length and its special ids
are the tokenizer's. Generation stops at ``<|im_end|>`` or ``<|endoftext|>``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from typing import Any

from lightning_moe.data.train_tokenizer import CHATML_TEMPLATE, IM_END, IM_START, train_bpe, with_chatml
from lightning_moe.errors import ConfigError

__all__ = ["CHATML_TEMPLATE", "FAMILIES", "IM_END", "IM_START", "build_tiny_model", "build_tokenizer"]

_WIDTH = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              max_position_embeddings=1024, tie_word_embeddings=False)
FAMILIES = {
    # family: (transformers config class, its MoE arguments: 8 experts, top-2)
    "mixtral": ("MixtralConfig", dict(intermediate_size=64, num_local_experts=8, num_experts_per_tok=2)),
    "phimoe": ("PhimoeConfig", dict(intermediate_size=64, num_local_experts=8, num_experts_per_tok=2)),
    "olmoe": ("OlmoeConfig", dict(intermediate_size=64, num_experts=8, num_experts_per_tok=2)),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        dict(intermediate_size=128, moe_intermediate_size=64, shared_expert_intermediate_size=64, num_experts=8,
             num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[]),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        dict(intermediate_size=128, moe_intermediate_size=64, num_experts=8, num_experts_per_tok=2,
             norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[]),
    ),
    # GLM-4.5's layout (DeepSeek-V3 routing): sigmoid scores with a selection bias, 2 groups of 4
    # experts of which the best 1 competes, renormalised gates scaled by 2.5, one shared expert.
    "glm4_moe": (
        "Glm4MoeConfig",
        dict(intermediate_size=128, moe_intermediate_size=64, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
             topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True, n_shared_experts=1,
             first_k_dense_replace=0),
    ),
}
_TOKENIZER_TEXT_EXAMPLES = 4000


def build_tokenizer(vocab_size: int = 512) -> Any:
    """A ChatML ``PreTrainedTokenizerFast`` of ``vocab_size`` tokens, trained on the synthetic chat set."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 300:
        raise ConfigError(f"vocab_size must be an integer >= 300 (256 bytes, specials, merges), got {vocab_size!r}")
    import jinja2

    from lightning_moe.data.chat import synthetic_chat

    chatml = jinja2.Template(CHATML_TEMPLATE)  # the conversations as the tokenizer's template renders them
    texts = [chatml.render(messages=conversation) for conversation in synthetic_chat(_TOKENIZER_TEXT_EXAMPLES, seed=0)]
    with tempfile.TemporaryDirectory() as tmp:  # two ids are left for ChatML's turn tokens
        tokenizer = with_chatml(train_bpe(texts, vocab_size - 2, os.path.join(tmp, "tokenizer.json")))
    if len(tokenizer) != vocab_size:
        raise ConfigError(
            f"vocab_size={vocab_size}: the built-in corpus gives only {len(tokenizer)} tokens; use a smaller vocab_size"
        )
    return tokenizer


def build_tiny_model(family: str, output: str, vocab_size: int = 512, seed: int = 0) -> str:
    """Write a tiny ``family`` MoE causal LM and its tokenizer to the folder ``output``; return ``output``."""
    if family not in FAMILIES:
        raise ConfigError(f"family={family!r} is not supported; use one of {sorted(FAMILIES)}")
    import torch
    import transformers

    tokenizer = build_tokenizer(vocab_size)
    special = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    config_class, moe_args = FAMILIES[family]
    config = getattr(transformers, config_class)(
        vocab_size=len(tokenizer), bos_token_id=special, eos_token_id=special, pad_token_id=special,
        **_WIDTH, **moe_args,
    )
    torch.manual_seed(seed)
    # Every parameter, the routers included, keeps the family's own initialisation.
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = [tokenizer.convert_tokens_to_ids(IM_END), special]
    model.generation_config.pad_token_id = special
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    return output


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", required=True, choices=sorted(FAMILIES))
    parser.add_argument("--output", required=True, help="folder to write the model and tokenizer to")
    parser.add_argument("--vocab-size", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0, help="seeds the model's random weights")
    args = parser.parse_args(argv)
    try:
        print(build_tiny_model(args.family, args.output, args.vocab_size, args.seed))
    except ConfigError as err:
        parser.exit(2, f"error: {err}\n")


if __name__ == "__main__":
    main()
