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

Tokens are raw UTF-8 bytes (ids 0..255) plus two specials, so no tokenizer has to be
downloaded: :data:`BOS_ID` starts every document, :data:`EOS_ID` is reserved for
padding / end of sequence. The train/validation split is by document, and the token
streams are cached on disk so that a second run starts in well under a second.

Modules: :mod:`~lightning_moe.data.sources` (where text comes from),
:mod:`~lightning_moe.data.tokenizers` (text to token ids), :mod:`~lightning_moe.data.cache`
(the split and the on-disk token cache), :mod:`~lightning_moe.data.loading` (windows,
resumable sampler and loader) and :mod:`~lightning_moe.data.module` (the data module).
"""

from lightning_moe.data.loading import ResumableDataLoader, ResumableSampler, TokenChunkDataset
from lightning_moe.data.module import TextDataModule
from lightning_moe.data.tokenizers import BOS_ID, BYTE_VOCAB_SIZE, EOS_ID, PAD_ID, VOCAB_SIZE, decode, encode

__all__ = [
    "BOS_ID",
    "BYTE_VOCAB_SIZE",
    "EOS_ID",
    "PAD_ID",
    "VOCAB_SIZE",
    "ResumableDataLoader",
    "ResumableSampler",
    "TextDataModule",
    "TokenChunkDataset",
    "decode",
    "encode",
]
