"""Text data for MoE language models.

:class:`TextDataModule` turns a corpus into fixed-length next-token-prediction batches.
Corpora:

* ``"stdlib"`` (default): the ``.py`` files of the running Python's standard library
  (about 12 MB). Every machine has it, so training works offline with no download.
* a local file, folder (recursive) or glob pattern of text files.
* a Hugging Face dataset name, optionally ``"name:config"`` (``"hf:"`` prefix forces
  this reading), loaded with :func:`datasets.load_dataset`.
* ``"testbed"`` or ``"testbed:<domains>"``: a mixture of synthetic languages generated
  from the seed (:mod:`lightning_moe.testbed`), whose batches also carry each token's
  domain.

Tokens are raw UTF-8 bytes by default (ids 0..255 plus two specials, nothing to download:
:data:`BOS_ID` starts every document, :data:`EOS_ID` pads), or the ids of any Hugging Face
tokenizer (``tokenizer=``: a ``tokenizer.json``, a folder or a Hub name). The split is by
document and deterministic; the token streams are written once, in parallel, to
memory-mapped shards on disk that training reads without loading the corpus into memory,
so a second run starts in well under a second (docs/data.md).

Modules: :mod:`~lightning_moe.data.sources` (where text comes from),
:mod:`~lightning_moe.data.tokenizers` (text to token ids), :mod:`~lightning_moe.data.cache`
(the split and the on-disk token cache), :mod:`~lightning_moe.data.loading` (windows,
resumable sampler and loader), :mod:`~lightning_moe.data.module` (the data module) and
:mod:`~lightning_moe.data.train_tokenizer` (a BPE tokenizer trained locally).

:class:`PostTrainDataModule` (:mod:`~lightning_moe.data.posttrain`, :mod:`~lightning_moe.data.chat`)
makes post-training batches of the same format with a Hugging Face model's own tokenizer:
chat conversations with loss on the assistant's tokens only, or plain text (docs/posttrain_data.md),
tokenised once into a cache (:mod:`~lightning_moe.data.chat_cache`); packed rows come as a
:class:`PackedBatch` whose ``position_ids`` (:func:`position_ids_of`) keep examples apart
(:mod:`~lightning_moe.data.packing`). Its source ``"synthetic:tasks?kinds=...&difficulty=..."``
is a :class:`TaskSet` (:mod:`~lightning_moe.data.sft_tasks`): generated tasks with exact-match
answers and held-out prompts never trained on.
"""

from lightning_moe.data.cache import TokenStream
from lightning_moe.data.loading import ResumableDataLoader, ResumableSampler, TokenChunkDataset
from lightning_moe.data.module import TextDataModule
from lightning_moe.data.packing import PackedBatch, position_ids_of
from lightning_moe.data.posttrain import PostTrainDataModule
from lightning_moe.data.sft_tasks import TaskSet
from lightning_moe.data.tokenizers import (
    BOS_ID,
    BYTE_VOCAB_SIZE,
    EOS_ID,
    PAD_ID,
    VOCAB_SIZE,
    HFTokenizer,
    Tokenizer,
    decode,
    encode,
    load_tokenizer,
    tokenizer_from_state,
)
from lightning_moe.data.train_tokenizer import train_bpe

__all__ = [
    "BOS_ID",
    "BYTE_VOCAB_SIZE",
    "EOS_ID",
    "PAD_ID",
    "VOCAB_SIZE",
    "HFTokenizer",
    "PackedBatch",
    "PostTrainDataModule",
    "ResumableDataLoader",
    "ResumableSampler",
    "TaskSet",
    "TextDataModule",
    "TokenChunkDataset",
    "TokenStream",
    "Tokenizer",
    "decode",
    "encode",
    "load_tokenizer",
    "position_ids_of",
    "tokenizer_from_state",
    "train_bpe",
]
