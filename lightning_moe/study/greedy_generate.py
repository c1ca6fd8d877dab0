"""Greedy answers of a Hugging Face folder to chat prompts, with nothing but ``torch`` and ``transformers``.

    python greedy_generate.py MODEL_FOLDER PROMPTS.json OUTPUT.json [--max-new-tokens N] [--batch-size B] [--device D]

:mod:`lightning_moe.study.exact_match` runs this file in a process of its own, by path, so an
exported model is scored exactly as a user of plain ``transformers`` would run it: no
``lightning_moe`` import (none of its conversions, registered classes or patched modules) can
touch the model that generates. It therefore imports nothing from ``lightning_moe`` itself, and
its output says whether anything did (``imported_lightning_moe``).

``PROMPTS.json`` holds ``{"conversations": [[{"role", "content"}, ...], ...]}``; each is rendered
with the tokenizer's chat template and the generation prompt, the batch is left-padded, and
``model.generate(do_sample=False)`` answers it. A reply ends at the model's end-of-turn token
(the token the chat template writes after an assistant message, e.g. ``<|im_end|>``) or at an EOS
of the tokenizer or the generation config. ``OUTPUT.json`` gets, per conversation, the reply's
token ids (up to and without the stop token) and its text without special tokens.
"""

import argparse
import json
import sys

import torch

_SENTINEL = "\u2063answer\u2063"


def stop_token_ids(tokenizer, model) -> list[int]:
    """The end-of-turn token the template writes after an assistant message, and every EOS id."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": _SENTINEL}], tokenize=False
    )
    after = text[text.rindex(_SENTINEL) + len(_SENTINEL) :].strip()
    ids = tokenizer(after, add_special_tokens=False)["input_ids"][:1] if after else []
    for eos in (model.generation_config.eos_token_id, tokenizer.eos_token_id):
        ids += eos if isinstance(eos, list) else [] if eos is None else [eos]
    return sorted(set(ids))


def generate(model, tokenizer, conversations, max_new_tokens: int, batch_size: int) -> list[list[int]]:
    """The greedy reply of each conversation, as token ids cut before the first stop token."""
    stops = stop_token_ids(tokenizer, model)
    tokenizer.padding_side = "left"  # generated tokens follow every prompt's last token directly
    if tokenizer.pad_token is None:  # any token: padding is masked out
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(stops[0])
    replies = []
    for start in range(0, len(conversations), batch_size):
        texts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False)
                 for c in conversations[start : start + batch_size]]
        batch = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt").to(model.device)
        with torch.no_grad():
            out = model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=stops,
                                 pad_token_id=tokenizer.pad_token_id)
        for row in out[:, batch["input_ids"].shape[1] :].tolist():
            cut = next((i for i, token in enumerate(row) if token in stops), len(row))
            replies.append(row[:cut])
    return replies


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model")
    parser.add_argument("prompts")
    parser.add_argument("output")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    with open(args.prompts, encoding="utf-8") as fh:
        conversations = json.load(fh)["conversations"]
    # Here rather than at the top, so importing lightning_moe's modules never imports transformers.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model).to(device).eval()
    replies = generate(model, tokenizer, conversations, args.max_new_tokens, args.batch_size)
    result = {
        "token_ids": replies,
        "texts": [tokenizer.decode(ids, skip_special_tokens=True) for ids in replies],
        "device": device,
        "imported_lightning_moe": any(name.split(".")[0] == "lightning_moe" for name in sys.modules),
    }
    with open(args.output, "w", encoding="utf-8") as fh:
        json.dump(result, fh)


if __name__ == "__main__":
    main()
