"""Errors of the data layer. Every message names the problem and the fix."""

from __future__ import annotations

from experiments.errors import MixerlabError

__all__ = [
    "CorpusNotFoundError",
    "DataError",
    "EmptyCorpusError",
    "MissingDependencyError",
    "SplitTooSmallError",
    "UndecodableTextError",
]


class DataError(MixerlabError, ValueError):
    """Base class of every data-layer error."""


class CorpusNotFoundError(DataError, FileNotFoundError):
    """A path, directory or glob of a corpus does not exist or matched nothing."""


class EmptyCorpusError(DataError):
    """A corpus (or the train part of it) holds no text."""


class UndecodableTextError(DataError):
    """A file is not valid UTF-8 and errors="strict" was asked for."""

    def __init__(self, message: str, *, file: str, offset: int) -> None:
        super().__init__(message)
        self.file = file
        self.offset = offset


class SplitTooSmallError(DataError):
    """A split holds too few tokens for the requested sequence length."""

    def __init__(self, message: str, *, split: str, num_tokens: int, seq_len: int) -> None:
        super().__init__(message)
        self.split = split
        self.num_tokens = num_tokens
        self.seq_len = seq_len

    @property
    def max_seq_len(self) -> int:
        return max(self.num_tokens - 1, 0)


class MissingDependencyError(DataError, ImportError):
    """An optional dependency (e.g. `datasets` for the hf corpus) is not installed."""
