"""Post-training batches for a Hugging Face model, tokenised with its own tokenizer (docs/posttrain_data.md)."""

from __future__ import annotations

import os
import warnings
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from torch.utils.data import Dataset

from lightning_moe.data.chat import SkippedExample, load_chat_tokenizer, messages_of, synthetic_chat, tokenize_chat
from lightning_moe.data.loading import IGNORE_INDEX, ResumableLoaders
from lightning_moe.data.module import _check_int
from lightning_moe.data.sources import HubSource, resolve_source
from lightning_moe.errors import ConfigError

SYNTHETIC_CHAT = "synthetic:chat"
FORMATS = ("auto", "chat", "text")
_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_SYNTHETIC_EXAMPLES = 4000


class RowDataset(Dataset):
    """Rows of a ``[N, T]`` inputs array and its targets, served as int64 tensors."""

    def __init__(self, inputs_NT: np.ndarray, targets_NT: np.ndarray) -> None:
        self.inputs_NT, self.targets_NT = inputs_NT, targets_NT

    def __len__(self) -> int:
        return len(self.inputs_NT)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.from_numpy(self.inputs_NT[index].astype(np.int64)),
                torch.from_numpy(self.targets_NT[index].astype(np.int64)))


class PostTrainDataModule(ResumableLoaders):
    """Chat (supervised fine-tuning) or plain-text batches tokenised with the model's own tokenizer.

    Args:
        source: ``"synthetic:chat"`` (offline conversations drawn from ``seed``), a local
            ``.jsonl`` / ``.json`` / ``.parquet`` file, folder or glob, or a Hugging Face
            dataset ``"name"`` / ``"name:config"``, read with :func:`datasets.load_dataset`.
        format: ``"chat"`` (a column of messages; loss on assistant tokens only), ``"text"``
            (a text column; loss on every token) or ``"auto"`` (chat when the messages
            column exists, else text when the text column does).
        tokenizer: a tokenizer folder, ``tokenizer.json`` or Hub name; ``None`` takes the
            model's: ``trainer.lightning_module.tokenizer_source``, read in :meth:`setup`.
        chat_template: a Jinja chat template (string or file) that replaces the tokenizer's.
        messages_field: the column of messages (``[{role, content}]``, or ShareGPT ``[{from, value}]``).
        text_field: the column of text for ``format="text"``.
        split: the dataset split to read.
        val_split: a split of the same Hub dataset to validate on; ``None`` holds out
            ``val_fraction`` of the examples (at least one), chosen from ``seed``.
        seq_len: tokens per row.
        batch_size: rows per batch.
        packing: concatenate examples into ``seq_len`` windows (no padding); ``False``:
            one example per row, truncated to ``seq_len`` and right-padded to it.
        max_examples: read at most this many examples (of each split).
        seed: seeds the synthetic source, the validation hold-out and the training shuffle.
        num_workers: DataLoader worker processes.

    Batches are ``(input_ids, targets)``, both ``[batch_size, seq_len]`` int64, ``targets``
    the next tokens with ``-100`` where there is no loss. Examples are tokenised in memory
    in :meth:`setup` (post-training sets are small); rows without any target are dropped.
    """

    def __init__(
        self,
        source: str = SYNTHETIC_CHAT,
        format: str = "auto",
        tokenizer: str | None = None,
        chat_template: str | None = None,
        messages_field: str = "messages",
        text_field: str = "text",
        split: str = "train",
        val_split: str | None = None,
        seq_len: int = 512,
        batch_size: int = 8,
        packing: bool = True,
        val_fraction: float = 0.05,
        max_examples: int | None = None,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(source, (str, os.PathLike)) or not str(source):
            raise ConfigError(f"data.source must be a non-empty string, got {source!r}")
        if format not in FORMATS:
            raise ConfigError(f"data.format={format!r} is unknown; use one of {list(FORMATS)}")
        for field, value, minimum in (("seq_len", seq_len, 1), ("batch_size", batch_size, 1),
                                      ("num_workers", num_workers, 0)):
            _check_int(field, value, minimum)
        if max_examples is not None:
            _check_int("max_examples", max_examples, 1)
        if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
            raise ConfigError(f"data.val_fraction must be a number with 0 < val_fraction < 1, got {val_fraction!r}")
        self.save_hyperparameters()
        self.source = os.fspath(source)
        self.format = format
        self.chat_template = chat_template
        self.messages_field, self.text_field = messages_field, text_field
        self.split, self.val_split = split, val_split
        self.seq_len, self.batch_size, self.packing = int(seq_len), int(batch_size), bool(packing)
        self.val_fraction, self.max_examples = float(val_fraction), max_examples
        self.seed, self.num_workers = int(seed), int(num_workers)
        self.tokenizer: Any = None
        """The ``transformers`` fast tokenizer (loaded in ``__init__`` when named, else in ``setup``)."""
        self.vocab_size: int | None = None
        """``len(tokenizer)``: the embedding size a model needs (``None`` until the tokenizer is known)."""
        self.skipped_examples = 0
        """Examples skipped with a warning (no or an empty assistant turn, rejected by the template, empty text)."""
        self.skip_reasons: dict[str, int] = {}
        """How many examples were skipped for each reason ("with no assistant turn", ...)."""
        if tokenizer is not None:
            self._use_tokenizer(tokenizer)
        self.train_dataset: RowDataset | None = None
        self.val_dataset: RowDataset | None = None

    # ----------------------------------------------------------------- lifecycle

    def prepare_data(self) -> None:
        """Download a Hub dataset once (Lightning calls this on one process) before every rank reads it."""
        if self.source != SYNTHETIC_CHAT and _local_files(self.source)[0] is None:
            for field, split in (("data.split", self.split), ("data.val_split", self.val_split)):
                if split is not None:
                    self._dataset(field, split, None, None)

    def setup(self, stage: str | None = None) -> None:
        """Load the tokenizer (the model's when none was named), read and tokenise both splits."""
        if self.train_dataset is not None:
            return
        if self.tokenizer is None:
            module = self.trainer.lightning_module if self.trainer is not None else None
            source = getattr(module, "tokenizer_source", None)
            if not isinstance(source, str) or not source:
                raise ConfigError(
                    "data.tokenizer is not set and the model names no tokenizer (no tokenizer_source);"
                    " set data.tokenizer to a tokenizer folder, tokenizer.json or Hub name"
                )
            self._use_tokenizer(source)
        train_rows, val_rows = self._read_examples()
        fmt = self._resolve_format(train_rows[0])
        self.skipped_examples, self.skip_reasons = 0, {}
        self.train_dataset = self._rows(train_rows, fmt, "train")
        self.val_dataset = self._rows(val_rows, fmt, "validation")
        if self.skipped_examples:
            reasons = sorted(self.skip_reasons.items(), key=lambda item: (-item[1], item[0]))
            why = (f" {reasons[0][0]}" if len(reasons) == 1
                   else ": " + ", ".join(f"{count} {reason}" for reason, count in reasons))
            warnings.warn(f"data.source={self.source!r}: skipped {self.skipped_examples} examples{why}", stacklevel=2)
        rank_zero_info(
            f"PostTrainDataModule: {len(self.train_dataset)} training and {len(self.val_dataset)} validation rows"
            f" of {self.seq_len} tokens ({fmt}, {'packed' if self.packing else 'padded'}) from {self.source!r}"
        )

    def too_few_rows(self, rows: int, ranks: int) -> str:
        return (
            f"data.source={self.source!r}: {rows} training rows of data.seq_len={self.seq_len}, fewer than"
            f" the {ranks} data-parallel ranks; use more examples or a smaller seq_len"
        )

    # ----------------------------------------------------------------- reading

    def _use_tokenizer(self, spec: str) -> None:
        self.tokenizer = load_chat_tokenizer(spec, self.chat_template)
        self.vocab_size = len(self.tokenizer)

    def _read_examples(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Training and validation examples (rows as dicts), in a deterministic order."""
        if self.source == SYNTHETIC_CHAT:
            conversations = synthetic_chat(self.max_examples or _SYNTHETIC_EXAMPLES, self.seed)
            rows = [{self.messages_field: messages} for messages in conversations]
        else:
            builder, files = _local_files(self.source)
            rows = self._dataset("data.split", self.split, builder, files).to_list()
            if self.val_split is not None:
                return rows, self._dataset("data.val_split", self.val_split, builder, files).to_list()
        if self.val_split is not None:
            raise ConfigError(f"data.val_split applies to Hub datasets; {self.source!r} uses data.val_fraction")
        if len(rows) < 2:
            raise ConfigError(
                f"data.source={self.source!r} has {len(rows)} example(s); need at least 2 (one to train on,"
                " one to validate on), or name a validation split with data.val_split"
            )
        order = np.random.default_rng(self.seed).permutation(len(rows))
        held_out = set(order[: min(len(rows) - 1, max(1, round(self.val_fraction * len(rows))))].tolist())
        return [r for i, r in enumerate(rows) if i not in held_out], [r for i, r in enumerate(rows) if i in held_out]

    def _dataset(self, field: str, split: str, builder: str | None, files: list[str] | None) -> Any:
        """One split of a local (``builder`` and ``files``) or Hub dataset, at most ``max_examples`` rows."""
        import datasets

        from lightning_moe.data.sources import first_line, honour_offline_env

        if builder is not None and (field != "data.split" or split != "train"):
            raise ConfigError(
                f"{field}={split!r}: a local data.source has the one split 'train';"
                " data.split and data.val_split name splits of Hub datasets (use data.val_fraction)"
            )
        try:
            with honour_offline_env():
                if builder is not None:
                    ds = datasets.load_dataset(builder, data_files=files, split="train")
                else:
                    hub = resolve_source(self.source, hf_split=split, hf_text_field="text")  # name[:config]
                    ds = datasets.load_dataset(hub.name, hub.config, split=split)
        except (ConnectionError, OSError) as err:
            raise ConfigError(
                f"data.source={self.source!r}: no such local file or folder, and the Hugging Face dataset could not"
                f" be loaded ({type(err).__name__}: {first_line(err)}); pass a .jsonl/.json/.parquet file, folder or"
                f" glob, {SYNTHETIC_CHAT!r}, or a Hub name (with network access or HF_HUB_OFFLINE=1 and a cached copy)"
            ) from None
        except Exception as err:  # an unknown split, or a file the builder cannot parse
            raise ConfigError(
                f"data.source={self.source!r}, {field}={split!r} cannot be read:"
                f" {type(err).__name__}: {first_line(err)}"
            ) from None
        if self.max_examples is not None:
            ds = ds.select(range(min(len(ds), self.max_examples)))
        if len(ds) == 0:
            raise ConfigError(f"data.source={self.source!r} ({field}={split!r}) holds no examples")
        return ds

    def _resolve_format(self, row: dict[str, Any]) -> str:
        columns = sorted(row)
        fmt = self.format
        if fmt == "auto":
            fmt = "chat" if self.messages_field in row else "text" if self.text_field in row else None
            if fmt is None:
                hint = " (ShareGPT data: set data.messages_field='conversations')" if "conversations" in row else ""
                raise ConfigError(
                    f"data.format='auto' found neither data.messages_field={self.messages_field!r} nor"
                    f" data.text_field={self.text_field!r} among the columns {columns}{hint}"
                )
        field, column = ("messages_field", self.messages_field) if fmt == "chat" else ("text_field", self.text_field)
        if column not in row:
            raise ConfigError(
                f"data.{field}={column!r} is not a column of data.source={self.source!r} (format {fmt!r});"
                f" columns found: {columns}"
            )
        if fmt == "chat" and not self.tokenizer.chat_template:
            raise ConfigError(
                "data.chat_template is not set and the tokenizer has no chat template; format 'chat' needs one"
            )
        return fmt

    # ----------------------------------------------------------------- tokenising

    def _rows(self, examples: list[dict[str, Any]], fmt: str, split: str) -> RowDataset:
        tokens, masks = [], []
        for index, example in enumerate(_progress(examples, f"Tokenising {split} examples")):
            if fmt == "chat":
                try:
                    ids, mask = tokenize_chat(self.tokenizer, messages_of(example, self.messages_field))
                except SkippedExample as skipped:
                    self._skip(skipped.reason)
                    continue
                except ConfigError as err:
                    raise ConfigError(f"{err} ({split} example {index})") from None
            else:
                ids, mask = self._tokenize_text(example.get(self.text_field))
                if not len(ids):
                    self._skip("with no text")
                    continue
            tokens.append(ids)
            masks.append(mask)
        if not tokens:
            raise ConfigError(f"data.source={self.source!r}: no usable {split} examples ({fmt} format)")
        if self.packing:
            inputs_NT, targets_NT = pack(tokens, masks, self.seq_len)
        else:
            inputs_NT, targets_NT = pad(tokens, masks, self.seq_len, self._pad_id())
        keep = (targets_NT != IGNORE_INDEX).any(axis=1)
        if not keep.any():
            raise ConfigError(
                f"data.source={self.source!r}: the {split} examples ({len(tokens)}, {sum(map(len, tokens))} tokens)"
                f" give no row of data.seq_len={self.seq_len} tokens with a loss target; use more data, a smaller"
                " seq_len or a larger val_fraction"
            )
        return RowDataset(inputs_NT[keep], targets_NT[keep])

    def _skip(self, reason: str) -> None:
        self.skipped_examples += 1
        self.skip_reasons[reason] = self.skip_reasons.get(reason, 0) + 1

    def _tokenize_text(self, text: Any) -> tuple[np.ndarray, np.ndarray]:
        # The tokenizer's own encoding (with its BOS when it adds one) and an EOS that ends the document.
        if not text:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool)
        ids = list(self.tokenizer(str(text))["input_ids"])
        eos = self.tokenizer.eos_token_id
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        return np.asarray(ids, dtype=np.int64), np.ones(len(ids), dtype=bool)

    def _pad_id(self) -> int:
        pad_id = self.tokenizer.pad_token_id
        pad_id = self.tokenizer.eos_token_id if pad_id is None else pad_id
        if pad_id is None:
            raise ConfigError("data.packing=false pads rows, but data.tokenizer has neither a pad nor an EOS token")
        return int(pad_id)


def pack(tokens: list[np.ndarray], masks: list[np.ndarray], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Examples concatenated, cut into windows of ``seq_len + 1`` tokens advancing by ``seq_len``.

    Row ``i`` predicts ``stream[i*L + 1 : i*L + L + 1]`` from ``stream[i*L : i*L + L]``; a
    target has loss when its token is labelled. Attention crosses example boundaries (no
    per-document masking), as in pretraining; the stream's ragged tail is dropped.
    """
    stream, labelled = np.concatenate(tokens), np.concatenate(masks)
    rows = max(0, (len(stream) - 1) // seq_len)
    starts = np.arange(rows)[:, None] * seq_len + np.arange(seq_len)[None, :]
    inputs_NT = stream[starts]
    targets_NT = np.where(labelled[starts + 1], stream[starts + 1], IGNORE_INDEX)
    return inputs_NT.astype(np.int32), targets_NT.astype(np.int32)


def pad(
    tokens: list[np.ndarray], masks: list[np.ndarray], seq_len: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """One example per row: its first ``seq_len + 1`` tokens, right-padded to ``seq_len`` (padding has no loss)."""
    inputs_NT = np.full((len(tokens), seq_len), pad_id, dtype=np.int32)
    targets_NT = np.full((len(tokens), seq_len), IGNORE_INDEX, dtype=np.int32)
    for row, (ids, mask) in enumerate(zip(tokens, masks)):
        ids, mask = ids[: seq_len + 1], mask[: seq_len + 1]
        inputs_NT[row, : len(ids) - 1] = ids[:-1]
        targets_NT[row, : len(ids) - 1] = np.where(mask[1:], ids[1:], IGNORE_INDEX)
    return inputs_NT, targets_NT


def _local_files(source: str) -> tuple[str | None, list[str] | None]:
    """The ``datasets`` builder and files of a local source; ``(None, None)`` for a Hub name.

    What is a file, folder, glob or Hub name is decided as for ``TextDataModule``
    (:func:`~lightning_moe.data.sources.resolve_source`); a folder contributes its
    .jsonl / .json / .parquet files, a file or glob must hold only those.
    """
    try:
        resolved = resolve_source(source, hf_split="train", hf_text_field="text")
    except ConfigError:  # its hint names TextDataModule's sources
        raise ConfigError(
            f"data.source={source!r}: no such file or folder: {os.path.abspath(os.path.expanduser(source))!r};"
            f" pass a .jsonl/.json/.parquet file, folder or glob, {SYNTHETIC_CHAT!r}, or a Hub dataset name"
        ) from None
    if isinstance(resolved, HubSource):
        return None, None
    files = [path for path, _ in resolved.files]
    if resolved.kind == "folder":
        files = [f for f in files if os.path.splitext(f)[1] in _BUILDERS]
    extensions = {os.path.splitext(f)[1] for f in files}
    builders = {_BUILDERS.get(extension) for extension in extensions}
    if not files or None in builders or len(builders) > 1:
        raise ConfigError(
            f"data.source={source!r}: found {len(files)} file(s) of types {sorted(extensions)};"
            " need .jsonl / .json files or .parquet files (one kind)"
        )
    return builders.pop(), files


def _progress(items: list[Any], desc: str) -> Any:
    if len(items) < 5000 or rank_zero_only.rank != 0:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, leave=False)
