import json
import os
import time

import numpy as np
import pytest
import torch

from experiments.data import (
    EOS,
    CorpusNotFoundError,
    CorpusSpec,
    DataError,
    EmptyCorpusError,
    SplitTooSmallError,
    UndecodableTextError,
    load_corpus,
    split_of,
)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("MIXERLAB_CACHE", str(d))
    return d


@pytest.fixture(scope="module")
def stdlib_pair(tmp_path_factory):
    cache = tmp_path_factory.mktemp("stdlib-cache")
    first = load_corpus("stdlib", cache=cache)
    second = load_corpus("stdlib", cache=cache)
    return first, second, cache


def _write_tree(root, files):
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return root


def _many_files(root, n=60, size=400):
    return _write_tree(root, {f"doc{i:03d}.txt": (f"file {i} " * size)[:size] for i in range(n)})


# stdlib


def test_stdlib_is_deterministic_and_cached(stdlib_pair):
    first, second, cache = stdlib_pair
    assert not first.loaded_from_cache and second.loaded_from_cache
    assert first.content_hash == second.content_hash and len(first.content_hash) == 64
    for s in ("train", "val", "test"):
        assert np.array_equal(first.split(s), second.split(s))
    assert first.cache_path == second.cache_path
    assert isinstance(second.split("train"), np.memmap)
    assert len(list((cache / "corpora").glob("*.npy"))) == 1
    assert not list((cache / "corpora").glob("*.tmp"))


def test_stdlib_describe_and_sizes(stdlib_pair):
    c = stdlib_pair[0]
    d = c.describe()
    json.dumps(d)
    assert d["content_hash"] == c.content_hash and d["split_by"] == "file"
    assert d["files"] == sum(v["files"] for v in d["splits"].values()) > 100
    assert d["tokens"] == sum(v["tokens"] for v in d["splits"].values()) == d["bytes"] + d["files"]
    assert d["bytes"] > 1_000_000
    for s in ("train", "val", "test"):
        assert d["splits"][s]["tokens"] == c.num_tokens(s) == len(c.split(s))
        assert c.split(s).dtype == np.uint16
    assert d["splits"]["train"]["tokens"] > 10 * d["splits"]["val"]["tokens"] > 0
    assert int((c.split("val") == EOS).sum()) == d["splits"]["val"]["files"]


def test_stdlib_excludes_tests_and_packages(stdlib_pair):
    from experiments.data.sources import stdlib_documents

    docs, _ = stdlib_documents()
    rels = [r for r, _ in docs]
    assert rels == sorted(rels)
    bad = [r for r in rels if {"test", "tests", "idle_test", "site-packages", "dist-packages"} & set(r.split("/")[:-1])]
    assert bad == []
    assert "os.py" in rels and "json/decoder.py" in rels


def test_batches_shapes_shift_and_seed(stdlib_pair):
    c = stdlib_pair[0]
    x, y = next(c.batches("train", 4, 32, seed=7))
    assert x.shape == y.shape == (4, 32) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    x2, y2 = next(c.batches("train", 4, 32, seed=7))
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x3, _ = next(c.batches("train", 4, 32, seed=8))
    assert not torch.equal(x, x3)
    g = torch.Generator().manual_seed(7)
    assert torch.equal(c.sample_batch("train", 4, 32, g)[0], x)
    assert len(list(c.batches("val", 2, 16, seed=0, num_batches=3))) == 3
    assert int(x.max()) < c.vocab_size


def test_eval_batches_sequential(stdlib_pair):
    c = stdlib_pair[0]
    val = c.split("val")
    batches = list(c.eval_batches("val", 8, 128, max_batches=3))
    assert len(batches) == 3
    x0, y0 = batches[0]
    assert torch.equal(x0[0], torch.from_numpy(val[:128].astype(np.int64)))
    assert torch.equal(x0[1], torch.from_numpy(val[128:256].astype(np.int64)))
    assert torch.equal(y0[0], torch.from_numpy(val[1:129].astype(np.int64)))
    again = list(c.eval_batches("val", 8, 128, max_batches=3))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again, strict=True))


def test_unigram_bits_per_byte(stdlib_pair):
    c = stdlib_pair[0]
    bpb = c.unigram_bits_per_byte("val")
    assert 3.0 < bpb < 8.0
    assert c.unigram_bits_per_byte("train") <= bpb + 0.5


# textfile


def test_textfile_dir_file_glob(tmp_path, cache):
    root = _write_tree(
        tmp_path / "corpus",
        {"a.txt": "alpha\n", "sub/b.md": "beta\n", "sub/c.py": "gamma = 1\n", "d.bin": "no", ".hidden/e.txt": "x"},
    )
    c = load_corpus("textfile", path=str(root), split_by="tokens", val_fraction=0.2, test_fraction=0.2)
    assert c.describe()["files"] == 3
    all_tokens = np.concatenate([c.split(s) for s in ("train", "val", "test")])
    assert c.tokenizer.decode(all_tokens) == "alpha\n<eos>beta\n<eos>gamma = 1\n<eos>"
    only_txt = load_corpus("textfile", path=str(root), suffixes=[".txt"], split_by="tokens")
    assert only_txt.describe()["files"] == 1
    single = load_corpus("textfile", path=str(root / "sub" / "b.md"))
    assert single.describe()["split_by"] == "tokens" and single.describe()["files"] == 1
    glob = load_corpus("textfile", path=str(root / "**" / "*.md"), split_by="tokens")
    assert glob.describe()["files"] == 1
    assert glob.content_hash != single.content_hash  # relative paths differ: sub/b.md vs b.md
    same = load_corpus("textfile", path=str(root / "sub" / "*.md"), split_by="tokens")
    assert same.content_hash == single.content_hash  # both b.md with the same bytes


def test_textfile_file_split_is_by_path_hash(tmp_path, cache):
    root = _many_files(tmp_path / "many")
    c = load_corpus("textfile", path=str(root), val_fraction=0.1, test_fraction=0.1)
    d = c.describe()
    assert d["split_by"] == "file"
    expected = {s: 0 for s in ("train", "val", "test")}
    for i in range(60):
        expected[split_of(f"doc{i:03d}.txt", 0.1, 0.1)] += 1
    assert {s: d["splits"][s]["files"] for s in expected} == expected
    assert d["splits"]["val"]["files"] > 0 and d["splits"]["test"]["files"] > 0


def test_hash_changes_with_content_and_names(tmp_path, cache):
    root = _many_files(tmp_path / "h", n=5)
    h1 = load_corpus("textfile", path=str(root)).content_hash
    assert load_corpus("textfile", path=str(root)).content_hash == h1
    (root / "doc002.txt").write_text("changed")
    h2 = load_corpus("textfile", path=str(root)).content_hash
    assert h2 != h1
    (root / "doc002.txt").rename(root / "renamed.txt")
    h3 = load_corpus("textfile", path=str(root)).content_hash
    assert h3 not in (h1, h2)
    moved = tmp_path / "moved"
    root.rename(moved)
    assert load_corpus("textfile", path=str(moved)).content_hash == h3  # relative paths: moving keeps the hash


def test_cache_reused_not_rebuilt(tmp_path, cache, monkeypatch):
    root = _many_files(tmp_path / "c")
    first = load_corpus("textfile", path=str(root))
    stat = os.stat(first.cache_path)
    import experiments.data.corpus as corpus_mod

    def boom(*a, **k):
        raise AssertionError("re-tokenised although the cache was valid")

    monkeypatch.setattr(corpus_mod, "tokenise", boom)
    time.sleep(0.01)
    second = load_corpus("textfile", path=str(root))
    assert second.loaded_from_cache and second.cache_path == first.cache_path
    assert os.stat(second.cache_path).st_mtime_ns == stat.st_mtime_ns
    assert np.array_equal(first.split("train"), second.split("train"))


def test_spec_json_round_trip(tmp_path, cache):
    spec = CorpusSpec("textfile", {"path": str(tmp_path), "suffixes": (".txt",), "val_fraction": 0.1})
    again = CorpusSpec.from_json(spec.to_json())
    assert again == spec and again.options.suffixes == (".txt",)
    assert CorpusSpec().kind == "stdlib"
    assert CorpusSpec.from_dict({"kind": "hf", "name": "x", "data_files": ["a.json"]}).options.data_files == ("a.json",)


# errors


def test_error_missing_path(tmp_path, cache):
    with pytest.raises(CorpusNotFoundError, match="does not exist.*pass an existing file, a directory, or a glob"):
        load_corpus("textfile", path=str(tmp_path / "nope"))
    with pytest.raises(CorpusNotFoundError, match="matched no files"):
        load_corpus("textfile", path=str(tmp_path / "*.nothing"))


def test_error_empty_corpus(tmp_path, cache):
    (tmp_path / "e").mkdir()
    with pytest.raises(EmptyCorpusError, match=r"no files ending in \.txt.*pass suffixes="):
        load_corpus("textfile", path=str(tmp_path / "e"))
    (tmp_path / "e" / "empty.txt").write_text("")
    with pytest.raises(EmptyCorpusError, match="holds no text"):
        load_corpus("textfile", path=str(tmp_path / "e"))


def test_error_undecodable(tmp_path, cache):
    root = _write_tree(tmp_path / "u", {"good.txt": "fine", "bad.txt": b"ok\n\xff\xfe rest"})
    with pytest.raises(
        UndecodableTextError, match=r"bad\.txt: not valid UTF-8 at byte offset 3.*errors='replace'"
    ) as e:
        load_corpus("textfile", path=str(root))
    assert e.value.offset == 3 and e.value.file.endswith("bad.txt")
    c = load_corpus("textfile", path=str(root), errors="replace", split_by="tokens")
    text = c.tokenizer.decode(np.concatenate([c.split(s) for s in ("train", "val", "test")]))
    assert "\ufffd" in text
    raw = load_corpus("textfile", path=str(root), errors="bytes", split_by="tokens")
    assert 0xFF in np.concatenate([raw.split(s) for s in ("train", "val", "test")])


def test_error_split_too_small(tmp_path, cache):
    root = _write_tree(tmp_path / "s", {"a.txt": "x" * 999})
    c = load_corpus("textfile", path=str(root), split_by="tokens", val_fraction=0.05, test_fraction=0.05)
    n = c.num_tokens("val")
    with pytest.raises(SplitTooSmallError, match=f"has {n} tokens.*the largest seq_len that fits is {n - 1}") as e:
        next(c.batches("val", 2, 64))
    assert e.value.max_seq_len == n - 1
    with pytest.raises(SplitTooSmallError):
        next(c.eval_batches("val", 2, n))
    next(c.eval_batches("val", 2, n - 1))


def test_error_bad_options(tmp_path, cache):
    with pytest.raises(DataError, match="unknown corpus kind 'nope'; the kinds are stdlib, textfile, hf"):
        load_corpus("nope")
    with pytest.raises(DataError, match="unknown option.*bogus.*its options are"):
        load_corpus("stdlib", bogus=1)
    with pytest.raises(DataError, match="needs the option.*path"):
        load_corpus("textfile")
    with pytest.raises(DataError, match="leaves nothing to train"):
        load_corpus("stdlib", val_fraction=0.5, test_fraction=0.5)
    with pytest.raises(DataError, match="unknown split"):
        load_corpus("textfile", path=str(_many_files(tmp_path / "o", n=3))).split("dev")
