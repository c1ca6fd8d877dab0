"""Train a byte-level BPE tokenizer on a local corpus, offline, with the `tokenizers` library.

    python -m lightning_moe.data.train_tokenizer --source stdlib --vocab-size 4096 --output tokenizers/bpe.json

The result is a ``tokenizer.json`` that ``TextDataModule(tokenizer=...)`` (``--data.tokenizer``)
loads; ``<|endoftext|>`` is its only special token and starts every document. Byte-level
(GPT-2 style) pre-tokenisation means any UTF-8 text round-trips through it.

With ``--chat-template chatml`` the output is instead a Hugging Face tokenizer folder: the same
BPE plus ChatML's turn tokens ``<|im_start|>``/``<|im_end|>`` (the last two of ``--vocab-size``
ids) and a ChatML chat template, so a model pretrained with it can be chat-tuned through
``PostTrainDataModule`` and exported with it::

    python -m lightning_moe.data.train_tokenizer --source stdlib --vocab-size 2048 \
        --chat-template chatml --output tokenizers/stdlib-chatml-2048
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Iterable
from typing import Any

from lightning_moe.data.sources import capped, resolve_source

END_OF_TEXT = "<|endoftext|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# ChatML, as Qwen and many others write it: each message between <|im_start|>role\n and
# <|im_end|>\n; the generation prompt opens an assistant turn.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHAT_TEMPLATES = ("chatml",)


def train_bpe(texts: Iterable[str], vocab_size: int, output: str) -> str:
    """Train a byte-level BPE tokenizer with ``vocab_size`` ids on ``texts`` and save it to ``output``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    tokenizer.save(output)
    return output


def with_chatml(tokenizer_file: str) -> Any:
    """The BPE of ``tokenizer_file`` as a ``PreTrainedTokenizerFast`` with ChatML's turn tokens and template.

    ``<|endoftext|>`` is its BOS, EOS and padding token; the two turn tokens take the next two ids.
    """
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=tokenizer_file, bos_token=END_OF_TEXT, eos_token=END_OF_TEXT, pad_token=END_OF_TEXT
    )
    tokenizer.add_special_tokens({"additional_special_tokens": [IM_START, IM_END]})
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="stdlib", help="as TextDataModule's source (default: stdlib)")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--max-bytes", type=int, default=None, help="train on the first this many bytes")
    parser.add_argument("--output", required=True, help="where to write tokenizer.json (a folder with --chat-template)")
    parser.add_argument(
        "--chat-template",
        choices=CHAT_TEMPLATES,
        default=None,
        help="add this template's turn tokens (within --vocab-size) and write a Hugging Face tokenizer folder",
    )
    args = parser.parse_args(argv)
    documents = resolve_source(args.source, "train", "text").documents(args.max_bytes)
    if args.max_bytes is not None:
        documents = capped(documents, args.max_bytes)
    texts = (data.decode("utf-8", errors="ignore") for _, data in documents)
    if args.chat_template is None:
        print(train_bpe(texts, args.vocab_size, args.output))
        return
    with tempfile.TemporaryDirectory() as tmp:  # two ids are left for the turn tokens
        tokenizer = with_chatml(train_bpe(texts, args.vocab_size - 2, os.path.join(tmp, "tokenizer.json")))
    tokenizer.save_pretrained(args.output)
    print(args.output)


if __name__ == "__main__":
    main()
