"""A multi-domain testbed corpus with ground-truth domains.

``TextDataModule(source="testbed")`` (or ``"testbed:<domains>"``) trains on a mixture of
several synthetic "languages", generated deterministically from the data seed, with the
domain of every token known. Routing specialisation can then be measured against ground
truth: :func:`~lightning_moe.callbacks.routing_monitor.mutual_information` of the (domain, chosen expert) counts that
:class:`~lightning_moe.callbacks.RoutingMonitor` logs as ``moe/layer_XX/domain_expert_mi``.

Each language has its own letter inventory (drawn from one shared alphabet, so single
bytes rarely give the domain away), syllable shapes, a Zipf-distributed lexicon, a
first-order word grammar (each word prefers a few successors), word separators,
sentence terminators and capitalisation. A document is written in one language; the
domains are equally likely.

"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from lightning_moe.errors import ConfigError

#: Bump whenever the generated text would change for the same arguments.
TESTBED_VERSION = 1
DEFAULT_NUM_DOMAINS = 4
#: Bytes generated when ``max_bytes`` is not given.
DEFAULT_NUM_BYTES = 2_000_000

_SOURCE = re.compile(r"^testbed(?::(\d+))?$")
_CONSONANTS = "bcdfghjklmnpqrstvwxz"
_VOWELS = "aeiouy"
_SEPARATORS = (" ", " ", "-", "_", " ", ".", "~", " ")
_TERMINATORS = (". ", "!\n", ";\n", " |\n", "?\n", ".\n\n", " //\n", ":: ")
_LEXICON_SIZE = 400
_SUCCESSORS = 4
_GRAMMAR_WEIGHT = 0.75  # probability that the next word is one of the current word's preferred successors
_DOC_BYTES = (400, 3000)


def parse_testbed_source(source: str) -> int | None:
    """The number of domains of a ``"testbed"`` / ``"testbed:<domains>"`` source, else ``None``."""
    match = _SOURCE.match(source)
    if match is None:
        return None
    num_domains = int(match.group(1) or DEFAULT_NUM_DOMAINS)
    if not 2 <= num_domains <= len(_TERMINATORS):
        raise ConfigError(f"source={source!r}: the testbed has 2 to {len(_TERMINATORS)} domains, got {num_domains}")
    return num_domains


@dataclass
class _Language:
    """One synthetic language: a lexicon with word frequencies, a word grammar and punctuation."""

    words: list[bytes]
    unigram_cdf: np.ndarray  # [W]
    successors: np.ndarray  # [W, _SUCCESSORS] preferred next words
    separator: bytes
    terminator: bytes
    capitalise: bool
    sentence_words: tuple[int, int]

    @classmethod
    def generate(cls, rng: np.random.Generator, index: int) -> _Language:
        consonants = rng.choice(list(_CONSONANTS), size=int(rng.integers(6, 11)), replace=False)
        vowels = rng.choice(list(_VOWELS), size=int(rng.integers(2, 4)), replace=False)
        # CV and CVC always: with at least 6 consonants, 2 vowels and 2 syllables they make
        # thousands of distinct words, so the lexicon always fills.
        shapes = ["CV", "CVC"] + [shape for shape in ("VC", "CCV", "CVV", "V") if rng.random() < 0.5]
        max_syllables = int(rng.integers(2, 5))
        words: set[bytes] = set()
        while len(words) < _LEXICON_SIZE:
            syllables = []
            for _ in range(int(rng.integers(1, max_syllables + 1))):
                shape = shapes[int(rng.integers(len(shapes)))]
                syllables.append("".join(rng.choice(consonants if ch == "C" else vowels) for ch in shape))
            words.add("".join(syllables).encode())
        ordered = sorted(words)
        rng.shuffle(ordered)
        zipf = 1.0 / np.arange(1, _LEXICON_SIZE + 1) ** rng.uniform(0.9, 1.3)
        low = int(rng.integers(3, 8))
        return cls(
            words=ordered,
            unigram_cdf=np.cumsum(zipf / zipf.sum()),
            successors=rng.integers(0, _LEXICON_SIZE, size=(_LEXICON_SIZE, _SUCCESSORS)),
            separator=_SEPARATORS[index % len(_SEPARATORS)].encode(),
            terminator=_TERMINATORS[index].encode(),
            capitalise=bool(index % 2),
            sentence_words=(low, low + int(rng.integers(4, 12))),
        )

    def document(self, rng: np.random.Generator, num_bytes: int) -> bytes:
        parts: list[bytes] = []
        size = 0
        while size < num_bytes:
            length = int(rng.integers(self.sentence_words[0], self.sentence_words[1] + 1))
            grammar = rng.random(length) < _GRAMMAR_WEIGHT
            choices = rng.integers(0, _SUCCESSORS, size=length)
            fresh = np.searchsorted(self.unigram_cdf, rng.random(length) * self.unigram_cdf[-1])
            word = int(fresh[0])
            sentence = []
            for i in range(length):
                if i and grammar[i]:
                    word = int(self.successors[word, choices[i]])
                elif i:
                    word = int(fresh[i])
                sentence.append(self.words[word])
            if self.capitalise:
                sentence[0] = sentence[0].capitalize()
            text = self.separator.join(sentence) + self.terminator
            parts.append(text)
            size += len(text)
        return b"".join(parts)[:num_bytes]


def testbed_documents(num_domains: int, seed: int, num_bytes: int) -> Iterator[tuple[str, bytes]]:
    """``(name, text)`` documents, ``num_bytes`` in total; a name is ``"domain<d>/<index>"``.

    Deterministic in ``(num_domains, seed, num_bytes)``: the languages depend only on
    ``(seed, domain)``, so a larger ``num_bytes`` extends the same documents.
    """
    languages = [_Language.generate(np.random.default_rng([seed, TESTBED_VERSION, d]), d) for d in range(num_domains)]
    rng = np.random.default_rng([seed, TESTBED_VERSION, num_domains, 1 << 20])
    total, index = 0, 0
    while total < num_bytes:
        domain = int(rng.integers(num_domains))
        size = min(int(rng.integers(*_DOC_BYTES)), num_bytes - total)
        yield f"domain{domain}/{index:06d}", languages[domain].document(rng, size)
        total += size
        index += 1


def document_domain(name: str) -> int:
    """The domain of a testbed document from its name (``"domain<d>/<index>"``)."""
    return int(name.split("/", 1)[0].removeprefix("domain"))


def domain_labels(tokens: np.ndarray, document_names: list[str], bos_id: int) -> np.ndarray:
    """The domain (int64) of every token of a stream of documents each opened by ``bos_id``."""
    starts = np.flatnonzero(tokens == bos_id)
    if len(starts) != len(document_names) or (len(starts) and starts[0] != 0):
        raise ValueError(f"{len(starts)} documents in the token stream, {len(document_names)} names")
    lengths = np.diff(np.append(starts, len(tokens)))
    return np.repeat(np.array([document_domain(n) for n in document_names], dtype=np.int64), lengths)


@dataclass
class TestbedSource:
    """The testbed as a corpus source of :class:`~lightning_moe.data.TextDataModule`."""

    source: str
    num_domains: int
    seed: int

    def describe(self) -> str:
        return f"the {self.num_domains}-domain synthetic testbed"

    def identity(self) -> dict[str, Any]:
        return {"kind": "testbed", "version": TESTBED_VERSION, "num_domains": self.num_domains, "seed": self.seed}

    def documents(self, max_bytes: int | None) -> Iterator[tuple[str, bytes]]:
        return testbed_documents(self.num_domains, self.seed, DEFAULT_NUM_BYTES if max_bytes is None else max_bytes)
