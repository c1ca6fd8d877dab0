"""Post-training batches for a Hugging Face model, tokenised once with its own tokenizer (docs/posttrain_data.md)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn

from lightning_moe.data.cache import CacheDamaged
from lightning_moe.data.chat import SkippedExample, load_chat_tokenizer, synthetic_chat
from lightning_moe.data.chat_cache import (
    CACHE_VERSION,
    CachedRows,
    ExampleStream,
    build_rows_cache,
    open_rows_cache,
    token_dtype,
)
from lightning_moe.data.chat_examples import ExampleTokenizer, tokenized
from lightning_moe.data.loading import ResumableLoaders
from lightning_moe.data.module import _CACHE_ENV, _check_int
from lightning_moe.data.sft_tasks import TaskSet
from lightning_moe.data.sources import HubSource, resolve_source
from lightning_moe.errors import ConfigError

SYNTHETIC_CHAT = "synthetic:chat"
FORMATS = ("auto", "chat", "text")
SPLITS = ("train", "validation")
_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_SYNTHETIC_EXAMPLES = 4000
NO_TARGET_LEFT = "with no assistant token left within data.seq_len"


class PostTrainDataModule(ResumableLoaders):
    """Chat (supervised fine-tuning) or plain-text batches tokenised with the model's own tokenizer.

    Args:
        source: ``"synthetic:chat"`` (offline conversations drawn from ``seed``), a task set
            with held-out prompts validated on (``"synthetic:tasks?..."``, :mod:`~lightning_moe.data.sft_tasks`), a local
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
        packing: several whole examples per row, each attending only to itself
            (:mod:`~lightning_moe.data.packing`); ``False``: one example per row, right-padded.
        max_examples: read at most this many examples (of each split).
        max_skipped_fraction: refuse the data when more than this share of its examples is skipped.
        seed: seeds the synthetic source, the validation hold-out and the training shuffle.
        num_workers: DataLoader worker processes.
        num_proc: processes that render and tokenise the examples when the cache is built
            (the cache does not depend on it).
        cache_dir: where tokenised examples are cached; default ``$LIGHTNING_MOE_CACHE`` or
            ``~/.cache/lightning_moe``.

    Batches are ``(input_ids, targets)``, both ``[batch_size, seq_len]`` int64, ``targets``
    the next tokens with ``-100`` where there is no loss; packed batches are a
    :class:`~lightning_moe.data.packing.PackedBatch` that adds ``position_ids`` restarting at
    every example. Examples are rendered, tokenised and packed once, into a memory-mapped
    cache (:mod:`~lightning_moe.data.chat_cache`) that :meth:`prepare_data` builds on local
    rank 0 of each node and every rank then opens; a resumed run reopens it.
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
        max_skipped_fraction: float = 0.1,
        seed: int = 0,
        num_workers: int = 0,
        num_proc: int = 1,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(source, (str, os.PathLike)) or not str(source):
            raise ConfigError(f"data.source must be a non-empty string, got {source!r}")
        if format not in FORMATS:
            raise ConfigError(f"data.format={format!r} is unknown; use one of {list(FORMATS)}")
        for field, value, minimum in (("seq_len", seq_len, 1), ("batch_size", batch_size, 1),
                                      ("num_workers", num_workers, 0), ("num_proc", num_proc, 1)):
            _check_int(field, value, minimum)
        if max_examples is not None:
            _check_int("max_examples", max_examples, 1)
        if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
            raise ConfigError(f"data.val_fraction must be a number with 0 < val_fraction < 1, got {val_fraction!r}")
        if (isinstance(max_skipped_fraction, bool) or not isinstance(max_skipped_fraction, (int, float))
                or not 0 <= max_skipped_fraction <= 1):
            raise ConfigError(
                f"data.max_skipped_fraction must be a number from 0 to 1 (the share of examples that may be"
                f" skipped), got {max_skipped_fraction!r}"
            )
        self.save_hyperparameters()
        self.source = os.fspath(source)
        self.format = format
        self.chat_template = chat_template
        self.messages_field, self.text_field = messages_field, text_field
        self.split, self.val_split = split, val_split
        self.seq_len, self.batch_size, self.packing = int(seq_len), int(batch_size), bool(packing)
        self.val_fraction, self.max_examples = float(val_fraction), max_examples
        self.max_skipped_fraction = float(max_skipped_fraction)
        self.seed, self.num_workers, self.num_proc = int(seed), int(num_workers), int(num_proc)
        self.cache_dir = cache_dir
        self.tokenizer: Any = None
        """The ``transformers`` fast tokenizer (loaded in ``__init__`` when named, else in ``setup``)."""
        self.vocab_size: int | None = None
        """``len(tokenizer)``: the embedding size a model needs (``None`` until the tokenizer is known)."""
        self.skipped_examples = 0
        """Examples skipped (no or an empty assistant turn, rejected by the template, no target left, empty text)."""
        self.skip_reasons: dict[str, int] = {}
        """How many examples were skipped for each reason ("with no assistant turn", ...)."""
        self.truncated_examples = 0
        """Examples longer than ``seq_len`` that were cut (kept, unless nothing with a loss was left)."""
        self.truncated_tokens = 0
        """Tokens with a loss (assistant tokens; every token of text) lost to truncation."""
        self.cache_path: str | None = None
        """The cache folder of the tokenised rows (set by ``prepare_data``/``setup``)."""
        self.loaded_from_cache = False
        """True when the rows came from a cache built before, not by this process."""
        if tokenizer is not None:
            self._use_tokenizer(tokenizer)
        self.train_dataset: CachedRows | None = None
        self.val_dataset: CachedRows | None = None
        self._meta: dict[str, Any] | None = None
        self._datasets: dict[str, Any] = {}  # Hub splits loaded for their fingerprint, kept for the build

    # ----------------------------------------------------------------- lifecycle

    def prepare_data(self) -> None:
        """Tokenise the examples into the cache, or check the one there (Lightning calls this on local rank 0 per node)."""
        self._meta = self._open_or_build(verify=True)

    def setup(self, stage: str | None = None) -> None:
        """Open the cache (building it when ``prepare_data`` did not run), report what was skipped, make the datasets."""
        if self.train_dataset is not None:
            return
        meta = self._meta if self._meta is not None else self._open_or_build(verify=False)
        self._report(meta)
        self.train_dataset = CachedRows(self.cache_path, "train", meta, packed=self.packing)
        self.val_dataset = CachedRows(self.cache_path, "validation", meta, packed=self.packing)
        rank_zero_info(
            f"PostTrainDataModule: {len(self.train_dataset)} training and {len(self.val_dataset)} validation rows"
            f" of {self.seq_len} tokens ({meta['format']}, {'packed' if self.packing else 'padded'}) from"
            f" {self.source!r}, {'reopened' if self.loaded_from_cache else 'tokenised into'} {self.cache_path}"
        )

    def too_few_rows(self, rows: int, ranks: int) -> str:
        return (
            f"data.source={self.source!r}: {rows} training rows of data.seq_len={self.seq_len}, fewer than"
            f" the {ranks} data-parallel ranks; use more examples or a smaller seq_len"
        )

    # ----------------------------------------------------------------- the cache

    def _open_or_build(self, verify: bool) -> dict[str, Any]:
        """The cache's metadata, after opening it (CRCs checked when ``verify``) or building it."""
        self._require_tokenizer()
        key_material = self._key_material()
        key = hashlib.sha256(json.dumps(key_material, sort_keys=True).encode()).hexdigest()[:24]
        slug = re.sub(r"[^A-Za-z0-9]+", "_", self.source).strip("_")[-40:] or "source"
        path = os.path.join(self._resolved_cache_dir(), f"chat-{slug}-{key}")
        self.cache_path = path
        if os.path.isdir(path):
            try:
                meta = open_rows_cache(path, key, verify)
                self.loaded_from_cache = True
                return meta
            except CacheDamaged as err:
                rank_zero_warn(f"token cache {path!r} is damaged ({err}); rebuilding it")
        elif os.path.exists(path):
            os.unlink(path)  # a file where the cache folder belongs
        start = time.perf_counter()
        meta, built = build_rows_cache(path, {"key": key, "key_material": key_material}, self._write_rows)
        self.loaded_from_cache = not built  # another builder finished it while this one waited
        if built:
            examples = sum(split["examples"] for split in meta["splits"].values())
            rank_zero_info(f"PostTrainDataModule: {examples} examples tokenised in {time.perf_counter() - start:.1f}s")
        return meta

    def _resolved_cache_dir(self) -> str:
        if self.cache_dir is not None:
            return os.path.expanduser(os.fspath(self.cache_dir))
        env = os.environ.get(_CACHE_ENV)
        return os.path.expanduser(env) if env else os.path.join(Path.home(), ".cache", "lightning_moe")

    def _key_material(self) -> dict[str, Any]:
        """Everything the cached rows depend on (``max_skipped_fraction`` and the loader settings do not)."""
        tok = self.tokenizer
        template = tok.chat_template
        return {
            "version": CACHE_VERSION,
            "source": self.source,
            "identity": self._source_identity(),
            "settings": {name: getattr(self, name) for name in (  # num_proc: the rows do not depend on it
                "format", "messages_field", "text_field", "split", "val_split", "val_fraction", "max_examples",
                "seed", "seq_len", "packing")},
            "tokenizer": hashlib.sha256(tok.backend_tokenizer.to_str().encode()).hexdigest(),
            "special_tokens": [tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, len(tok)],
            "chat_template": template if template is None or isinstance(template, str) else json.dumps(template),
        }

    def _source_identity(self) -> Any:
        """What changes when the source's examples do: the files' sizes and times, or the Hub dataset's fingerprint."""
        if self.source == SYNTHETIC_CHAT:
            return "synthetic"  # drawn from seed and max_examples, which the key holds
        tasks = TaskSet.parse(self.source)
        if tasks is not None:
            return tasks.identity
        builder, files = _local_files(self.source)
        if builder is not None:
            return [[path, os.stat(path).st_size, os.stat(path).st_mtime_ns] for path in files]
        # The datasets library fingerprints every Arrow table it builds from the files of one
        # revision of the dataset: a new revision gives a new fingerprint.
        return {field: getattr(ds, "_fingerprint", None) or len(ds) for field, ds in self._hub_splits().items()}

    def _hub_splits(self) -> dict[str, Any]:
        for field, split in (("data.split", self.split), ("data.val_split", self.val_split)):
            if split is not None and field not in self._datasets:
                self._datasets[field] = self._dataset(field, split, None, None)
        return self._datasets

    # ----------------------------------------------------------------- tokenising

    def _write_rows(self, folder: str) -> dict[str, Any]:
        """Tokenise both splits into rows in ``folder``; the metadata: format, dtype, what was skipped per split."""
        sets = self._example_sets()
        fmt = self._resolve_format(sets[0][1][0])
        dtype = token_dtype(len(self.tokenizer))
        pad_id = self._pad_id() if not self.packing else self._pad_id(required=False)
        tokenize = ExampleTokenizer(self.tokenizer, fmt, self.messages_field, self.text_field)
        splits = {}
        for split, rows, indices in sets:
            stream = ExampleStream(folder, split, dtype, self.seq_len, split_long=fmt == "text" and self.packing)
            report: dict[str, Any] = {"examples": len(indices), "skipped": {}, "truncated": 0, "lost_tokens": 0}
            items = _progress(_indexed(rows, indices), len(indices), f"Tokenising {split} examples")
            for index, result in tokenized(tokenize, items, split, self.num_proc):
                if not isinstance(result, SkippedExample):
                    ids, labelled = result
                    windows, lost = stream.windows(ids, labelled)
                    if not any(labelled[start + 1 : start + length + 1].any() for start, length in windows):
                        result = SkippedExample(NO_TARGET_LEFT)
                if isinstance(result, SkippedExample):
                    reason = result.reason if type(result) is not SkippedExample else str(result)
                    count, first = report["skipped"].get(reason, (0, index))
                    report["skipped"][reason] = (count + 1, first)
                    continue
                if sum(length for _, length in windows) < len(ids) - 1:
                    report["truncated"] += 1
                    report["lost_tokens"] += lost
                stream.add(ids, labelled, windows)
            if not stream.lengths:
                raise ConfigError(f"data.source={self.source!r}: no usable {split} examples ({fmt} format)")
            report["rows"] = stream.write_rows(self.packing, pad_id)
            splits[split] = report
        return {"format": fmt, "dtype": dtype.name, "seq_len": self.seq_len, "packing": self.packing,
                "splits": splits}

    def _report(self, meta: dict[str, Any]) -> None:
        """One line on what was skipped and truncated; refuse the data when too much was skipped."""
        splits = meta["splits"]
        examples = sum(s["examples"] for s in splits.values())
        reasons: dict[str, list[Any]] = {}
        for split in SPLITS:  # the first example of each reason: training before validation
            for reason, (count, first) in splits[split]["skipped"].items():
                entry = reasons.setdefault(reason, [0, f"{split} example {first}"])
                entry[0] += count
        self.skip_reasons = {reason: count for reason, (count, _) in reasons.items()}
        self.skipped_examples = sum(self.skip_reasons.values())
        self.truncated_examples = sum(s["truncated"] for s in splits.values())
        self.truncated_tokens = sum(s["lost_tokens"] for s in splits.values())
        parts = []
        if self.skipped_examples:
            why = ", ".join(f"{count} {reason} (first: {first})"
                            for reason, (count, first) in sorted(reasons.items(), key=lambda kv: (-kv[1][0], kv[0])))
            parts.append(f"skipped {self.skipped_examples} of {examples} examples: {why}")
        if self.truncated_examples:
            what = "assistant tokens" if meta["format"] == "chat" else "tokens"
            parts.append(f"truncated {self.truncated_examples} examples to data.seq_len={self.seq_len},"
                         f" losing {self.truncated_tokens} {what}")
        if self.skipped_examples > self.max_skipped_fraction * examples:
            longer = ", use a larger data.seq_len" if NO_TARGET_LEFT in reasons else ""
            raise ConfigError(
                f"data.source={self.source!r}: {parts[0]}; that is {self.skipped_examples / examples:.1%}, more"
                f" than data.max_skipped_fraction={self.max_skipped_fraction:g}: fix the data{longer}, or raise"
                " the limit"
            )
        if parts:
            rank_zero_warn(f"data.source={self.source!r}: " + "; ".join(parts))

    # ----------------------------------------------------------------- reading

    def _require_tokenizer(self) -> None:
        """Load the model's tokenizer when none was named."""
        if self.tokenizer is not None:
            return
        module = self.trainer.lightning_module if self.trainer is not None else None
        source = getattr(module, "tokenizer_source", None)
        if not isinstance(source, str) or not source:
            raise ConfigError(
                "data.tokenizer is not set and the model names no tokenizer (no tokenizer_source);"
                " set data.tokenizer to a tokenizer folder, tokenizer.json or Hub name"
            )
        self._use_tokenizer(source)

    def _use_tokenizer(self, spec: str) -> None:
        self.tokenizer = load_chat_tokenizer(spec, self.chat_template)
        self.vocab_size = len(self.tokenizer)

    def _example_sets(self) -> list[tuple[str, Sequence[dict[str, Any]], list[int]]]:
        """``(split, rows, indices)`` for training and validation: the rows (a list or a ``datasets.Dataset``)
        and the indices of that split's examples among them, in order."""
        tasks = TaskSet.parse(self.source)
        if tasks is not None:  # validated on its held-out prompts: those the exact-match evaluation asks
            num_train = self.max_examples or _SYNTHETIC_EXAMPLES
            sets = []
            for split, drawn, num in (("train", "train", num_train),
                                      ("validation", "held_out", max(1, round(self.val_fraction * num_train)))):
                rows = [{self.messages_field: e.messages()} for e in tasks.examples(drawn, num, self.seed)]
                sets.append((split, rows, list(range(num))))
            return sets
        if self.source == SYNTHETIC_CHAT:
            conversations = synthetic_chat(self.max_examples or _SYNTHETIC_EXAMPLES, self.seed)
            rows: Any = [{self.messages_field: messages} for messages in conversations]
        else:
            builder, files = _local_files(self.source)
            if builder is None:
                hub = self._hub_splits()
                rows = hub["data.split"]
                if self.val_split is not None:
                    val = hub["data.val_split"]
                    return [("train", rows, list(range(len(rows)))), ("validation", val, list(range(len(val))))]
            else:
                if self.val_split is not None:
                    self._dataset("data.val_split", self.val_split, builder, files)  # refuses it, naming the field
                rows = self._dataset("data.split", self.split, builder, files)
        if self.val_split is not None:
            raise ConfigError(f"data.val_split applies to Hub datasets; {self.source!r} uses data.val_fraction")
        if len(rows) < 2:
            raise ConfigError(
                f"data.source={self.source!r} has {len(rows)} example(s); need at least 2 (one to train on,"
                " one to validate on), or name a validation split with data.val_split"
            )
        order = np.random.default_rng(self.seed).permutation(len(rows))
        held_out = np.zeros(len(rows), dtype=bool)
        held_out[order[: min(len(rows) - 1, max(1, round(self.val_fraction * len(rows))))]] = True
        return [("train", rows, np.flatnonzero(~held_out).tolist()),
                ("validation", rows, np.flatnonzero(held_out).tolist())]

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

    def _pad_id(self, required: bool = True) -> int:
        """The token padding fills rows with: the tokenizer's pad token, else its EOS (packed rows: else 0)."""
        pad_id = self.tokenizer.pad_token_id
        pad_id = self.tokenizer.eos_token_id if pad_id is None else pad_id
        if pad_id is None and required:
            raise ConfigError("data.packing=false pads rows, but data.tokenizer has neither a pad nor an EOS token")
        return 0 if pad_id is None else int(pad_id)


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


def _indexed(rows: Any, indices: list[int]) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(index, rows[index])`` for each of ``indices``; a ``datasets.Dataset`` is read in order through ``select``."""
    chosen = rows.select(indices) if hasattr(rows, "select") else (rows[i] for i in indices)
    return zip(indices, chosen)


def _progress(items: Iterator[Any], total: int, desc: str) -> Any:
    if total < 5000 or rank_zero_only.rank != 0:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, total=total, desc=desc, leave=False)
