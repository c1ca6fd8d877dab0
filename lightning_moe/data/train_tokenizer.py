"""Train a byte-level BPE tokenizer on a local corpus, offline, with the `tokenizers` library.

    python -m lightning_moe.data.train_tokenizer --source stdlib --vocab-size 4096 --output tokenizers/bpe.json

The result is a ``tokenizer.json`` that ``TextDataModule(tokenizer=...)`` (``--data.tokenizer``)
loads; ``<|endoftext|>`` is its only special token and starts every document. Byte-level
(GPT-2 style) pre-tokenisation means any UTF-8 text round-trips through it.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable

from lightning_moe.data.sources import capped, resolve_source

END_OF_TEXT = "<|endoftext|>"


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="stdlib", help="as TextDataModule's source (default: stdlib)")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--max-bytes", type=int, default=None, help="train on the first this many bytes")
    parser.add_argument("--output", required=True, help="where to write tokenizer.json")
    args = parser.parse_args(argv)
    documents = resolve_source(args.source, "train", "text").documents(args.max_bytes)
    if args.max_bytes is not None:
        documents = capped(documents, args.max_bytes)
    texts = (data.decode("utf-8", errors="ignore") for _, data in documents)
    print(train_bpe(texts, args.vocab_size, args.output))


if __name__ == "__main__":
    main()
