import json
import sys

import numpy as np
import pytest

from experiments.data import CorpusNotFoundError, DataError, MissingDependencyError, load_corpus

ROWS = [f"row number {i}: " + "lorem ipsum " * (i % 7 + 1) for i in range(40)]


@pytest.fixture
def offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("MIXERLAB_CACHE", str(tmp_path / "cache"))
    return tmp_path


def _all_text(c):
    return c.tokenizer.decode(np.concatenate([c.split(s) for s in ("train", "val", "test")]), skip_specials=True)


def test_hf_saved_to_disk(offline):
    datasets = pytest.importorskip("datasets")
    path = offline / "saved"
    datasets.Dataset.from_dict({"text": ROWS, "id": list(range(len(ROWS)))}).save_to_disk(str(path))
    c = load_corpus("hf", name=str(path), column="text", val_fraction=0.2, test_fraction=0.2)
    d = c.describe()
    assert d["files"] == len(ROWS) and d["source"]["rows"] == len(ROWS)
    assert d["bytes"] == sum(len(r.encode()) for r in ROWS)
    assert d["split_by"] == "file" and all(d["splits"][s]["files"] > 0 for s in ("train", "val", "test"))
    assert sorted(_all_text(c)) == sorted("".join(ROWS))
    again = load_corpus("hf", name=str(path), column="text", val_fraction=0.2, test_fraction=0.2)
    assert again.loaded_from_cache and again.content_hash == c.content_hash
    assert load_corpus("hf", name=str(path), max_rows=10).describe()["files"] == 10
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ROWS[:5]})})
    dd.save_to_disk(str(offline / "dd"))
    with pytest.raises(DataError, match=r"no split 'validation'; pass hf_split= one of \['train'\]"):
        load_corpus("hf", name=str(offline / "dd"), hf_split="validation")
    with pytest.raises(DataError, match=r"no column 'body'; pass column= one of \['text', 'id'\]"):
        load_corpus("hf", name=str(path), column="body")


def test_hf_json_data_files(offline):
    pytest.importorskip("datasets")
    f = offline / "rows.jsonl"
    f.write_text("".join(json.dumps({"content": r}) + "\n" for r in ROWS))
    c = load_corpus("hf", name="json", data_files=str(f), column="content", split_by="tokens")
    assert c.describe()["files"] == len(ROWS)
    assert _all_text(c) == "".join(ROWS)
    with pytest.raises(CorpusNotFoundError, match="could not load the Hugging Face dataset 'json'"):
        load_corpus("hf", name="json", data_files=str(offline / "missing.jsonl"))


def test_hf_missing_dependency_message(offline, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(MissingDependencyError, match=r"pip install 'mixerlab\[hf\]'"):
        load_corpus("hf", name="anything")
