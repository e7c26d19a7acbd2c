"""Byte-level tokenizer: ids 0..255 are the bytes of the UTF-8 text, a few named specials follow.

Nothing is downloaded and nothing is learned. `encode` never produces a special id; specials are placed
by the code that builds sequences (document boundaries in a corpus, markers in a synthetic task).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

__all__ = ["BOS", "BYTE_TOKENIZER", "ByteTokenizer", "EOS", "MASK", "PAD", "SEP", "SPECIALS"]

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

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size})"


BYTE_TOKENIZER = ByteTokenizer()
