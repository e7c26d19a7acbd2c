"""Corpora: documents -> deterministic train/val/test split -> byte tokens cached as a memory-mapped array.

Three kinds, one machinery (`load_corpus(kind, **options)` or `CorpusSpec(kind, options).load()`):

- ``stdlib`` (the default): the running interpreter's standard-library ``.py`` sources, test suites and
  installed packages excluded (`experiments.data.sources.STDLIB_EXCLUDED_DIRS`);
- ``textfile``: a file, a directory (recursively, chosen suffixes) or a glob of text files;
- ``hf``: one split of a Hugging Face dataset (optional extra ``mixerlab[hf]``).

Identity. ``content_hash`` is the sha256 over the documents in sorted relative-path order, each written as
``len(path) path len(content) content`` (lengths as 8-byte little-endian). It changes when any file's
content or name changes, and only then. ``describe()`` records it with the split rule and sizes, so every
result can say exactly what it was measured on.

Split rule (``split_by="file"``): a document goes to val when ``u < val_fraction``, to test when
``val_fraction <= u < val_fraction + test_fraction``, else to train, where ``u`` is the first 8 bytes of
``sha256("mixerlab-split:" + relative_path)`` read as a big-endian integer divided by 2**64. The assignment
of a file never depends on the other files. ``split_by="tokens"`` instead cuts the concatenated token
stream into contiguous train | val | test parts of those fractions. ``split_by="auto"`` (the default) uses
"file" unless a split with a non-zero fraction would get no file (e.g. a single-file corpus), then "tokens".

Tokens. Byte-level (`ByteTokenizer`, ``data.tokenizer = "bytes"``) by default, or a local Hugging Face tokenizer
directory: each document's tokens followed by ``<eos>``; stored as uint16 (uint32 past 65 536 ids).
The array lives in ``$MIXERLAB_CACHE`` (default ``~/.cache/mixerlab``) under ``corpora/``, keyed by the
content hash, the tokenizer and the split settings, written atomically (temporary file, then rename), and
memory-mapped on every later load.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from experiments.data.errors import DataError, EmptyCorpusError, SplitTooSmallError
from experiments.data.sources import (
    DECODE_ERRORS,
    Document,
    hf_documents,
    stdlib_documents,
    textfile_documents,
)
from experiments.data.tokenizer import BYTE_TOKENIZER, ByteTokenizer, HFTokenizer, load_tokenizer, tokenise
from experiments.runs import atomic_write
from registry import check_values

Tokenizer = ByteTokenizer | HFTokenizer

__all__ = [
    "CORPUS_KINDS",
    "SPLITS",
    "Corpus",
    "CorpusSpec",
    "HFOptions",
    "StdlibOptions",
    "TextfileOptions",
    "cache_dir",
    "content_hash",
    "load_corpus",
    "split_of",
]

SPLITS = ("train", "val", "test")
SPLIT_BY = ("auto", "file", "tokens")
FORMAT_VERSION = 1
SPLIT_RULE = (
    "file: u = int(sha256('mixerlab-split:' + relative_path)[:8], big-endian) / 2**64; "
    "val if u < val_fraction, test if u < val_fraction + test_fraction, else train. "
    "tokens: contiguous train | val | test parts of the concatenated stream."
)


def _as_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


@dataclass(frozen=True, kw_only=True)
class _CommonOptions:
    val_fraction: float = 0.05
    test_fraction: float = 0.05
    split_by: str = "auto"  # "auto" | "file" | "tokens"
    errors: str = "strict"  # "strict" | "replace" | "bytes": what invalid UTF-8 does

    def __post_init__(self) -> None:
        for name in ("val_fraction", "test_fraction"):
            v = getattr(self, name)
            if not isinstance(v, int | float) or not 0.0 <= v < 1.0:
                raise DataError(f"{name}={v!r} must be a number in [0, 1)")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise DataError(
                f"val_fraction + test_fraction = {self.val_fraction + self.test_fraction} leaves nothing to train "
                f"on; keep their sum below 1"
            )
        if self.split_by not in SPLIT_BY:
            raise DataError(f"split_by={self.split_by!r} is not one of {', '.join(map(repr, SPLIT_BY))}")
        if self.errors not in DECODE_ERRORS:
            raise DataError(f"errors={self.errors!r} is not one of {', '.join(map(repr, DECODE_ERRORS))}")


@dataclass(frozen=True, kw_only=True)
class StdlibOptions(_CommonOptions):
    """Options of the ``stdlib`` corpus: only the split and decoding settings."""


@dataclass(frozen=True, kw_only=True)
class TextfileOptions(_CommonOptions):
    """Options of the ``textfile`` corpus. `path`: a file, a directory or a glob (``**`` allowed)."""

    path: str
    suffixes: tuple[str, ...] = (".txt", ".md", ".rst", ".py")

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", str(self.path))
        suffixes = (self.suffixes,) if isinstance(self.suffixes, str) else tuple(self.suffixes)
        object.__setattr__(self, "suffixes", suffixes)
        super().__post_init__()


@dataclass(frozen=True, kw_only=True)
class HFOptions(_CommonOptions):
    """Options of the ``hf`` corpus. `name`: hub name, builder (``"json"``/``"csv"``) or save_to_disk dir."""

    name: str
    hf_split: str = "train"
    column: str = "text"
    data_files: str | tuple[str, ...] | None = None
    config: str | None = None
    revision: str | None = None
    max_rows: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_files", _as_tuple(self.data_files))
        if self.max_rows is not None and (not isinstance(self.max_rows, int) or self.max_rows < 1):
            raise DataError(f"max_rows={self.max_rows!r} must be a positive integer or None")
        super().__post_init__()


CORPUS_KINDS: dict[str, type[_CommonOptions]] = {
    "stdlib": StdlibOptions,
    "textfile": TextfileOptions,
    "hf": HFOptions,
}


def _make_options(kind: str, options: dict[str, Any]) -> _CommonOptions:
    if kind not in CORPUS_KINDS:
        raise DataError(f"unknown corpus kind {kind!r}; the kinds are {', '.join(CORPUS_KINDS)}")
    cls = CORPUS_KINDS[kind]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise DataError(
            f"unknown option(s) {', '.join(unknown)} for the {kind!r} corpus; its options are {', '.join(fields)}"
        )
    missing = [
        n
        for n, f in fields.items()
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and n not in options
    ]
    if missing:
        raise DataError(f"the {kind!r} corpus needs the option(s) {', '.join(missing)} (on the command line: "
                        + " ".join(f"data.options.{n}=..." for n in missing) + ")")
    values = {k: _as_tuple(v) for k, v in options.items()}
    if isinstance(values.get("suffixes"), str):
        values["suffixes"] = (values["suffixes"],)
    return cls(**check_values("data.options.", cls, values, DataError))


@dataclass(frozen=True)
class CorpusSpec:
    """Which corpus, serialisable: ``CorpusSpec("textfile", {"path": "notes/"})``; round-trips through JSON.

    `options` may be given as a dict; it is validated and stored as the kind's options dataclass.
    """

    kind: str = "stdlib"
    options: Any = field(default_factory=dict)

    def __post_init__(self) -> None:
        opts = self.options
        if isinstance(opts, _CommonOptions):
            if type(opts) is not CORPUS_KINDS.get(self.kind):
                raise DataError(f"{type(opts).__name__} does not belong to the {self.kind!r} corpus")
        else:
            opts = _make_options(self.kind, dict(opts or {}))
        object.__setattr__(self, "options", opts)

    def to_dict(self) -> dict[str, Any]:
        """``{"kind": ..., <every option>: ...}`` with tuples as lists (JSON-ready)."""
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self.options).items()}
        return {"kind": self.kind, **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CorpusSpec:
        d = dict(d)
        kind = d.pop("kind", "stdlib")
        return cls(kind, d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CorpusSpec:
        return cls.from_dict(json.loads(text))

    def load(self, *, cache: str | os.PathLike | None = None) -> Corpus:
        return Corpus.load(self, cache=cache)


def load_corpus(kind: str = "stdlib", *, cache: str | os.PathLike | None = None, tokenizer: str = "bytes",
                **options: Any) -> Corpus:
    """Load (building and caching on first use) the corpus of `kind` with `options`, tokenised by
    ``tokenizer`` ("bytes" or a local Hugging Face tokenizer directory); see `CorpusSpec`."""
    return Corpus.load(CorpusSpec(kind, options), cache=cache, tokenizer=load_tokenizer(tokenizer))


def cache_dir(cache: str | os.PathLike | None = None) -> Path:
    """The cache directory: `cache`, else ``$MIXERLAB_CACHE``, else ``~/.cache/mixerlab``."""
    if cache is not None:
        return Path(cache)
    env = os.environ.get("MIXERLAB_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "mixerlab"


def content_hash(documents: list[Document]) -> str:
    """sha256 over the documents in order, each as ``len(path) path len(content) content`` (8-byte LE lengths)."""
    h = hashlib.sha256()
    for rel, data in documents:
        name = rel.encode("utf-8")
        h.update(struct.pack("<Q", len(name)))
        h.update(name)
        h.update(struct.pack("<Q", len(data)))
        h.update(data)
    return h.hexdigest()


def split_of(relative_path: str, val_fraction: float, test_fraction: float) -> str:
    """The split ("train", "val" or "test") of a document under the file rule (see the module docstring)."""
    digest = hashlib.sha256(("mixerlab-split:" + relative_path).encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < val_fraction:
        return "val"
    if u < val_fraction + test_fraction:
        return "test"
    return "train"


def _read_documents(spec: CorpusSpec) -> tuple[list[Document], dict[str, Any]]:
    o = spec.options
    if spec.kind == "stdlib":
        return stdlib_documents(errors=o.errors)
    if spec.kind == "textfile":
        return textfile_documents(o.path, suffixes=o.suffixes, errors=o.errors)
    return hf_documents(
        o.name,
        hf_split=o.hf_split,
        column=o.column,
        data_files=o.data_files,
        config=o.config,
        revision=o.revision,
        max_rows=o.max_rows,
        errors=o.errors,
    )


def _resolve_split_by(documents: list[Document], o: _CommonOptions) -> tuple[str, dict[str, list[Document]]]:
    by_file: dict[str, list[Document]] = {s: [] for s in SPLITS}
    for doc in documents:
        by_file[split_of(doc[0], o.val_fraction, o.test_fraction)].append(doc)
    fractions = {"train": 1.0 - o.val_fraction - o.test_fraction, "val": o.val_fraction, "test": o.test_fraction}
    if o.split_by == "file":
        return "file", by_file
    if o.split_by == "auto" and all(by_file[s] or fractions[s] == 0 for s in SPLITS):
        return "file", by_file
    return "tokens", {}


def _split_tokens(documents: list[Document], by_file: dict[str, list[Document]], split_by: str,
                  o: _CommonOptions, tok: Tokenizer) -> tuple[np.ndarray, dict[str, list[int]], dict[str, int]]:
    """The token array, each split's [start, stop) and each split's number of documents."""
    if split_by == "file":
        arrays = [tokenise(by_file[s], tok)[0] for s in SPLITS]
        bounds, start = {}, 0
        for s, a in zip(SPLITS, arrays, strict=True):
            bounds[s] = [start, start + len(a)]
            start += len(a)
        return np.concatenate(arrays), bounds, {s: len(by_file[s]) for s in SPLITS}
    tokens, lengths = tokenise(documents, tok)
    n = len(tokens)
    n_val, n_test = math.floor(n * o.val_fraction), math.floor(n * o.test_fraction)
    n_train = n - n_val - n_test
    bounds = {"train": [0, n_train], "val": [n_train, n_train + n_val], "test": [n_train + n_val, n]}
    doc_starts = np.cumsum([0] + lengths[:-1])
    return tokens, bounds, {s: int(((doc_starts >= a) & (doc_starts < b)).sum()) for s, (a, b) in bounds.items()}


class Corpus:
    """A tokenised corpus with train/val/test splits as read-only memory-mapped arrays of unsigned ints.

    Build it with `load_corpus` or `CorpusSpec.load`; the constructor is internal.
    """

    def __init__(
        self,
        spec: CorpusSpec,
        tokens: np.ndarray,
        meta: dict[str, Any],
        cache_path: Path,
        loaded_from_cache: bool,
        load_seconds: float,
        tokenizer: Tokenizer = BYTE_TOKENIZER,
    ) -> None:
        self.spec = spec
        self.tokenizer = tokenizer
        self.content_hash: str = meta["content_hash"]
        self.cache_path = cache_path
        self.loaded_from_cache = loaded_from_cache
        self.load_seconds = load_seconds
        self._tokens = tokens  # (N,) uint16 or uint32, memmap
        self._meta = meta
        self._unigram: dict[str, float] = {}

    @classmethod
    def load(cls, spec: CorpusSpec, *, cache: str | os.PathLike | None = None,
             tokenizer: Tokenizer = BYTE_TOKENIZER) -> Corpus:
        t0 = time.perf_counter()
        tok = tokenizer
        documents, source = _read_documents(spec)
        if not documents or all(len(d) == 0 for _, d in documents):
            where = source.get("root") or source.get("name") or spec.kind
            raise EmptyCorpusError(
                f"the {spec.kind!r} corpus at {where} holds no text ({len(documents)} document(s), all empty); "
                f"point it at files (or rows) that contain text"
            )
        chash = content_hash(documents)
        o = spec.options
        split_by, by_file = _resolve_split_by(documents, o)
        key_fields = {
            "format": FORMAT_VERSION,
            "content_hash": chash,
            "tokenizer": tok.describe(),
            "split_by": split_by,
            "val_fraction": o.val_fraction,
            "test_fraction": o.test_fraction,
        }
        key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:24]
        directory = cache_dir(cache) / "corpora"
        directory.mkdir(parents=True, exist_ok=True)
        npy, meta_path = directory / f"{spec.kind}-{key}.npy", directory / f"{spec.kind}-{key}.json"

        if npy.is_file() and meta_path.is_file():
            try:
                meta = json.loads(meta_path.read_text())
                tokens = np.load(npy, mmap_mode="r")
                if meta.get("key") == key and tokens.shape == (meta["tokens"],) and tokens.dtype.kind == "u":
                    return cls(spec, tokens, meta, npy, True, time.perf_counter() - t0, tok)
            except (OSError, ValueError, KeyError):
                pass  # a damaged cache entry is rebuilt below

        tokens, bounds, files = _split_tokens(documents, by_file, split_by, o, tok)
        token_bytes = tok.token_bytes()  # bits per byte count the bytes each token stands for
        splits = {}
        for s in SPLITS:
            a, b = bounds[s]
            part = tokens[a:b]
            splits[s] = {
                "files": files[s],
                "bytes": (sum(len(d) for _, d in by_file[s]) if split_by == "file"  # exact; else per token
                          else int(token_bytes[part.astype(np.int64)].sum())),
                "tokens": int(b - a),
                "start": int(a),
                "stop": int(b),
            }
        if splits["train"]["tokens"] == 0 or splits["train"]["bytes"] == 0:
            raise EmptyCorpusError(
                f"the train split of the {spec.kind!r} corpus is empty; add text or lower val_fraction/test_fraction"
            )
        meta = {
            "key": key,
            **key_fields,
            "kind": spec.kind,
            "source": source,
            "files": len(documents),
            "bytes": int(sum(len(d) for _, d in documents)),
            "tokens": int(len(tokens)),
            "splits": splits,
        }
        atomic_write(npy, lambda f: np.save(f, tokens, allow_pickle=False))
        atomic_write(meta_path, lambda f: f.write(json.dumps(meta, indent=1, sort_keys=True).encode()))
        return cls(spec, np.load(npy, mmap_mode="r"), meta, npy, False, time.perf_counter() - t0, tok)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def _check_split(self, split: str) -> None:
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; the splits are {', '.join(SPLITS)}")

    def split(self, split: str) -> np.ndarray:
        """The tokens of `split` ("train", "val" or "test"): a read-only memory-mapped (N,) array."""
        self._check_split(split)
        s = self._meta["splits"][split]
        return self._tokens[s["start"] : s["stop"]]

    def num_tokens(self, split: str) -> int:
        self._check_split(split)
        return self._meta["splits"][split]["tokens"]

    def tokens_per_byte(self, split: str) -> float:
        """Tokens per content byte of `split` (> 1 by the ``<eos>`` per document): bpb = nats/token / ln 2 * this."""
        s = self._meta["splits"][split]
        return s["tokens"] / max(s["bytes"], 1)

    def describe(self) -> dict[str, Any]:
        """Everything a result needs to say what it was measured on (JSON-ready)."""
        m = self._meta
        return {
            "kind": self.spec.kind,
            "spec": self.spec.to_dict(),
            "content_hash": self.content_hash,
            "tokenizer": m["tokenizer"],
            "split_by": m["split_by"],
            "split_rule": SPLIT_RULE,
            "val_fraction": m["val_fraction"],
            "test_fraction": m["test_fraction"],
            "files": m["files"],
            "bytes": m["bytes"],
            "tokens": m["tokens"],
            "splits": {s: {k: m["splits"][s][k] for k in ("files", "bytes", "tokens")} for s in SPLITS},
            "source": m["source"],
            "format": m["format"],
        }

    def __repr__(self) -> str:
        sizes = ", ".join(f"{s}={self.num_tokens(s):,}" for s in SPLITS)
        return f"Corpus({self.spec.kind!r}, hash={self.content_hash[:12]}, tokens: {sizes})"

    def _check_fits(self, split: str, seq_len: int, batch_size: int) -> np.ndarray:
        if not isinstance(seq_len, int) or seq_len < 1:
            raise DataError(f"seq_len={seq_len!r} must be a positive integer")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise DataError(f"batch_size={batch_size!r} must be a positive integer")
        arr = self.split(split)
        n = len(arr)
        if n < seq_len + 1:
            fits = f"the largest seq_len that fits is {n - 1}" if n >= 2 else "no seq_len fits"
            raise SplitTooSmallError(
                f"the {split!r} split of the {self.spec.kind!r} corpus has {n} tokens, but seq_len={seq_len} needs "
                f"{seq_len + 1} (inputs plus the shifted target); {fits}. Use a smaller seq_len, a larger "
                f"{'val_fraction' if split == 'val' else 'test_fraction' if split == 'test' else 'corpus'}, "
                f"or more text.",
                split=split,
                num_tokens=n,
                seq_len=seq_len,
            )
        return arr

    @staticmethod
    def _windows(arr: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = starts[:, None] + np.arange(seq_len + 1)[None, :]  # (B, T+1)
        w = torch.from_numpy(arr[idx].astype(np.int64))  # (B, T+1)
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()  # (B, T), (B, T)

    def sample_batch(
        self, split: str, batch_size: int, seq_len: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch of random windows: (inputs, targets), int64 (B, T), targets = inputs shifted by one."""
        arr = self._check_fits(split, seq_len, batch_size)
        starts = torch.randint(0, len(arr) - seq_len, (batch_size,), generator=generator).numpy()
        return self._windows(arr, starts, seq_len)

    def batches(
        self,
        split: str,
        batch_size: int,
        seq_len: int,
        *,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        num_batches: int | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Random training windows, endless unless `num_batches` is given.

        Randomness comes from `generator`, else from a fresh generator seeded with `seed` (default 0), so the
        same seed gives the same batches.
        """
        self._check_fits(split, seq_len, batch_size)
        if generator is None:
            generator = torch.Generator().manual_seed(0 if seed is None else seed)
        i = 0
        while num_batches is None or i < num_batches:
            yield self.sample_batch(split, batch_size, seq_len, generator)
            i += 1

    def num_eval_windows(self, split: str, seq_len: int) -> int:
        """How many non-overlapping windows `eval_batches` takes from `split`."""
        return max((self.num_tokens(split) - 1) // seq_len, 0)

    def eval_batches(
        self, split: str, batch_size: int, seq_len: int, max_batches: int | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The split in order as non-overlapping windows (starts 0, T, 2T, ...): every token predicted once.

        Deterministic; the last batch may be smaller; a tail shorter than a window is left out.
        """
        arr = self._check_fits(split, seq_len, batch_size)
        n_windows = self.num_eval_windows(split, seq_len)
        starts = np.arange(n_windows, dtype=np.int64) * seq_len
        for b, i in enumerate(range(0, n_windows, batch_size)):
            if max_batches is not None and b >= max_batches:
                return
            yield self._windows(arr, starts[i : i + batch_size], seq_len)

    def unigram_bits_per_byte(self, split: str = "val") -> float:
        """Cross-entropy of `split` under train's add-one-smoothed token distribution, in bits per content byte.

        The baseline a model must beat: no context at all. ``<eos>`` tokens are predicted (and counted) like
        any other token; the total is divided by the split's content bytes.
        """
        self._check_split(split)
        if split not in self._unigram:
            v = self.vocab_size
            counts = np.bincount(self.split("train"), minlength=v).astype(np.float64) + 1.0
            logp = np.log2(counts / counts.sum())
            target = np.bincount(self.split(split), minlength=v).astype(np.float64)
            n_bytes = self._meta["splits"][split]["bytes"]
            if n_bytes == 0:
                raise SplitTooSmallError(
                    f"the {split!r} split is empty, so it has no bits per byte; raise its fraction",
                    split=split,
                    num_tokens=self.num_tokens(split),
                    seq_len=0,
                )
            self._unigram[split] = float(-(target * logp).sum() / n_bytes)
        return self._unigram[split]
