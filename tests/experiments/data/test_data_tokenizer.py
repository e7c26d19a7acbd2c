import numpy as np
import pytest
import torch

from experiments.data import BOS, EOS, PAD, SPECIALS, ByteTokenizer


def test_round_trip_text_and_bytes():
    tok = ByteTokenizer()
    for text in ["", "hello", "héllo wörld ✓ 😀", "line\nbreak\ttab\x00nul"]:
        ids = tok.encode(text)
        assert isinstance(ids, np.ndarray)
        assert ids.tolist() == list(text.encode("utf-8"))
        assert tok.decode(ids) == text
        assert tok.decode(ids.tolist()) == text
        assert tok.decode(torch.tensor(ids.astype(np.int64))) == text
    assert tok.encode(b"\xff\x00").tolist() == [255, 0]


def test_vocab_and_specials():
    tok = ByteTokenizer()
    assert tok.vocab_size == 256 + len(SPECIALS)
    assert tok.specials == {"<pad>": PAD, "<bos>": BOS, "<eos>": EOS, "<sep>": 259, "<mask>": 260}
    assert tok.special_id("eos") == tok.special_id("<eos>") == EOS == tok.eos_id
    assert all(tok.is_special(i) for i in tok.specials.values())
    assert not tok.is_special(255)
    with pytest.raises(KeyError, match="the specials are"):
        tok.special_id("cls")


def test_encode_never_produces_specials():
    tok = ByteTokenizer()
    ids = tok.encode(bytes(range(256)) + b"<eos><pad>")
    assert ids.max() < 256


def test_decode_specials_and_invalid_bytes():
    tok = ByteTokenizer()
    ids = [BOS, *tok.encode("ab").tolist(), EOS, 0xFF, *tok.encode("c").tolist()]
    assert tok.decode(ids) == "<bos>ab<eos>\ufffdc"
    assert tok.decode(ids, skip_specials=True) == "ab\ufffdc"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])
