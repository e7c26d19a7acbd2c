"""mixerlab's byte tokenizer as a Hugging Face tokenizer that gives the same ids.

Bytes 0..255 are ids 0..255 (the `tokenizers` library's byte-level alphabet, one token per byte, no
merges), and the specials ``<pad> <bos> <eos> <sep> <mask>`` follow as 256..260, as in
`experiments.data.tokenizer`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["byte_tokenizer"]


def byte_tokenizer() -> Any:
    """A `PreTrainedTokenizerFast` equal to `BYTE_TOKENIZER` on every text (ids and decoding)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from experiments.data.tokenizer import SPECIALS

    alphabet = pre_tokenizers.ByteLevel.alphabet()  # the 256 characters standing for the bytes
    byte_char = {b: c for b, c in zip(range(256), _bytes_to_unicode(), strict=True)}
    assert set(byte_char.values()) == set(alphabet)
    vocab = {byte_char[b]: b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIALS))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   sep_token="<sep>", mask_token="<mask>", clean_up_tokenization_spaces=False,
                                   padding_side="right")


def _bytes_to_unicode() -> list[str]:
    """The byte-level alphabet in byte order (GPT-2's map: printable bytes stand for themselves, the others
    for code points from 256 on), which `tokenizers`' ByteLevel pre-tokenizer applies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]
