"""Data: the byte-level tokenizer and corpora (the embedded ``stdlib`` default, local text, Hugging Face).

>>> corpus = load_corpus("stdlib")                        # cached, memory-mapped after the first load
>>> x, y = next(corpus.batches("train", 8, 256, seed=0))   # (B, T) int64, y = x shifted by one
>>> corpus.describe()["content_hash"]
"""

from experiments.data.corpus import (
    CORPUS_KINDS,
    SPLITS,
    Corpus,
    CorpusSpec,
    HFOptions,
    StdlibOptions,
    TextfileOptions,
    cache_dir,
    content_hash,
    load_corpus,
    split_of,
)
from experiments.data.errors import (
    CorpusNotFoundError,
    DataError,
    EmptyCorpusError,
    MissingDependencyError,
    SplitTooSmallError,
    UndecodableTextError,
)
from experiments.data.tokenizer import BOS, BYTE_TOKENIZER, EOS, MASK, PAD, SEP, SPECIALS, ByteTokenizer

__all__ = [
    "BOS",
    "BYTE_TOKENIZER",
    "CORPUS_KINDS",
    "EOS",
    "MASK",
    "PAD",
    "SEP",
    "SPECIALS",
    "SPLITS",
    "ByteTokenizer",
    "Corpus",
    "CorpusNotFoundError",
    "CorpusSpec",
    "DataError",
    "EmptyCorpusError",
    "HFOptions",
    "MissingDependencyError",
    "SplitTooSmallError",
    "StdlibOptions",
    "TextfileOptions",
    "UndecodableTextError",
    "cache_dir",
    "content_hash",
    "load_corpus",
    "split_of",
]
