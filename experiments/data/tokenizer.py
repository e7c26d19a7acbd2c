"""Byte-level tokenizer: ids 0..255 are the bytes of the UTF-8 text, a few named specials follow.

Nothing is downloaded and nothing is learned. `encode` never produces a special id; specials are placed
by the code that builds sequences (document boundaries in a corpus, markers in a synthetic task).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

__all__ = ["BOS", "BYTE_TOKENIZER", "ByteTokenizer", "EOS", "HFTokenizer", "MASK", "PAD", "SEP", "SPECIALS",
           "load_tokenizer", "tokenise"]

SPECIALS: tuple[str, ...] = ("<pad>", "<bos>", "<eos>", "<sep>", "<mask>")
PAD, BOS, EOS, SEP, MASK = (256 + i for i in range(len(SPECIALS)))


class ByteTokenizer:
    """Bytes 0..255 map to ids 0..255; the specials `SPECIALS` take ids 256.. in order.

    >>> tok = ByteTokenizer()
    >>> tok.decode(tok.encode("héllo"))
    'héllo'
    """

    name = "bytes"
    num_bytes = 256

    def __init__(self) -> None:
        self._special_ids = {s: self.num_bytes + i for i, s in enumerate(SPECIALS)}

    @property
    def vocab_size(self) -> int:
        return self.num_bytes + len(SPECIALS)

    @property
    def specials(self) -> dict[str, int]:
        """Name -> id of every special token, e.g. ``{"<eos>": 258, ...}``."""
        return dict(self._special_ids)

    pad_id, bos_id, eos_id, sep_id, mask_id = PAD, BOS, EOS, SEP, MASK

    def special_id(self, name: str) -> int:
        """The id of a special given as ``"<eos>"`` or ``"eos"``."""
        key = name if name.startswith("<") else f"<{name}>"
        if key not in self._special_ids:
            raise KeyError(f"unknown special token {name!r}; the specials are {', '.join(SPECIALS)}")
        return self._special_ids[key]

    def is_special(self, token_id: int) -> bool:
        return self.num_bytes <= token_id < self.vocab_size

    def encode(self, text: str | bytes) -> np.ndarray:
        """UTF-8 bytes of `text` (or `text` itself when bytes) as a uint16 array of ids 0..255."""
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return np.frombuffer(data, dtype=np.uint8).astype(np.uint16)

    def decode(self, ids: Iterable[int] | np.ndarray | Sequence[int], *, skip_specials: bool = False) -> str:
        """Text of `ids`: bytes decoded as UTF-8 with errors="replace"; specials as their names unless skipped.

        Accepts a list, a numpy array or a 1-D torch tensor.
        """
        arr = np.asarray(ids.tolist() if hasattr(ids, "tolist") and not isinstance(ids, np.ndarray) else ids)
        arr = arr.reshape(-1).astype(np.int64)
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            bad = int(arr[(arr < 0) | (arr >= self.vocab_size)][0])
            raise ValueError(f"id {bad} is outside the vocabulary [0, {self.vocab_size})")
        parts: list[str] = []
        run: list[int] = []
        for i in arr.tolist():
            if i < self.num_bytes:
                run.append(i)
                continue
            if run:
                parts.append(bytes(run).decode("utf-8", errors="replace"))
                run = []
            if not skip_specials:
                parts.append(SPECIALS[i - self.num_bytes])
        if run:
            parts.append(bytes(run).decode("utf-8", errors="replace"))
        return "".join(parts)

    def describe(self) -> dict:
        return {"name": self.name, "vocab_size": self.vocab_size, "specials": self.specials}

    def token_bytes(self) -> np.ndarray:
        """The UTF-8 bytes each id stands for (1 for a byte, 0 for a special): bits per byte divide by these."""
        return np.array([1] * self.num_bytes + [0] * len(SPECIALS), dtype=np.int64)

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size})"


BYTE_TOKENIZER = ByteTokenizer()


class HFTokenizer:
    """A local Hugging Face tokenizer directory behind the `ByteTokenizer` interface that corpora use.

    Each document is encoded without added specials and followed by the tokenizer's end-of-sequence token
    (its ``eos_token``, else its ``sep_token``). `describe` carries the hash of the tokenizer's files, so a
    corpus cached with one tokenizer is never read back with another."""

    def __init__(self, path: str | Path):
        import hashlib

        from experiments.data.errors import DataError

        self.path = Path(path)
        if not self.path.is_dir() or not any(self.path.glob("tokenizer*")):
            raise DataError(f"data.tokenizer={str(path)!r}: not a Hugging Face tokenizer directory (no tokenizer.json "
                            f"or tokenizer_config.json there); give \"bytes\" or a directory saved by "
                            f"tokenizer.save_pretrained")
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise DataError(f"data.tokenizer={str(path)!r} needs transformers: pip install 'mixerlab[hf]'") from None
        self.hf = AutoTokenizer.from_pretrained(self.path)
        end = self.hf.eos_token_id if self.hf.eos_token_id is not None else self.hf.sep_token_id
        if end is None:
            raise DataError(f"data.tokenizer={str(path)!r} has neither an eos_token nor a sep_token to end "
                            f"documents with; set one (tokenizer.eos_token = ...) and save it again")
        self.eos_id = int(end)
        digest = hashlib.sha256()
        for f in sorted(p for p in self.path.iterdir() if p.is_file()):
            digest.update(f.name.encode() + f.read_bytes())
        self.hash = digest.hexdigest()[:16]
        self.name = f"hf:{self.path.name}"

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @property
    def specials(self) -> dict[str, int]:
        return {t: int(i) for t, i in zip(self.hf.all_special_tokens, self.hf.all_special_ids, strict=True)}

    @property
    def bos_id(self) -> int | None:
        return self.hf.bos_token_id

    def encode(self, text: str | bytes) -> np.ndarray:
        text = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text
        return np.asarray(self.hf(text, add_special_tokens=False)["input_ids"], dtype=np.int64)

    def decode(self, ids: Iterable[int] | np.ndarray | Sequence[int], *, skip_specials: bool = False) -> str:
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        return self.hf.decode(ids, skip_special_tokens=skip_specials, clean_up_tokenization_spaces=False)

    def token_bytes(self) -> np.ndarray:
        """The UTF-8 bytes of each id decoded on its own (0 for specials)."""
        special = set(self.hf.all_special_ids)
        return np.array([0 if i in special else len(self.decode([i]).encode("utf-8"))
                         for i in range(self.vocab_size)], dtype=np.int64)

    def describe(self) -> dict:
        return {"name": self.name, "path": str(self.path), "hash": self.hash, "vocab_size": self.vocab_size,
                "eos_id": self.eos_id}

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


def load_tokenizer(name: str = "bytes") -> ByteTokenizer | HFTokenizer:
    """``"bytes"`` (the default byte tokenizer) or the path of a local Hugging Face tokenizer directory."""
    return BYTE_TOKENIZER if name in ("bytes", "", None) else HFTokenizer(name)


def tokenise(documents: Sequence[tuple[str, bytes]], tok: ByteTokenizer | HFTokenizer) -> tuple[np.ndarray, list[int]]:
    """Every document's tokens followed by ``<eos>``, concatenated; and each document's token count."""
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
    if isinstance(tok, ByteTokenizer):  # the bytes are the ids
        lengths = [len(d) + 1 for _, d in documents]
        out = np.empty(sum(lengths), dtype=dtype)
        pos = 0
        for _, data in documents:
            out[pos : pos + len(data)] = np.frombuffer(data, dtype=np.uint8)
            out[pos + len(data)] = tok.eos_id
            pos += len(data) + 1
        return out, lengths
    parts = [np.append(tok.encode(data), tok.eos_id).astype(dtype) for _, data in documents]
    return (np.concatenate(parts) if parts else np.empty(0, dtype=dtype)), [len(p) for p in parts]
