"""A corpus tokenised by a local Hugging Face tokenizer (built here with the `tokenizers` library): its ids,
its cache key, and bits per byte still over the corpus's bytes."""

import json
import math
import shutil
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from experiments.config import DataSpec, TrainSpec, build_specs  # noqa: E402
from experiments.data import load_corpus  # noqa: E402
from experiments.data.errors import DataError  # noqa: E402
from experiments.errors import RunError  # noqa: E402
from experiments.train import train  # noqa: E402


@pytest.fixture
def texts(tmp_path, monkeypatch):
    """Twelve stdlib modules as a text corpus, and a 300-token BPE tokenizer trained on them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    monkeypatch.setenv("MIXERLAB_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "texts"
    root.mkdir()
    for f in sorted(Path(json.__file__).parent.parent.glob("[a-c]*.py"))[:12]:
        shutil.copy(f, root / f.name)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train([str(p) for p in root.iterdir()], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path = tmp_path / "tok"
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(path)
    return root, path


def test_a_corpus_takes_the_tokenizers_ids_and_counts_its_own_bytes(texts):
    root, path = texts
    hf = load_corpus("textfile", path=str(root), tokenizer=str(path), split_by="tokens", val_fraction=0.2,
                     test_fraction=0.1)
    raw = load_corpus("textfile", path=str(root), split_by="tokens", val_fraction=0.2, test_fraction=0.1)
    assert hf.vocab_size == 300 and hf.cache_path != raw.cache_path  # keyed by the tokenizer
    assert hf.describe()["tokenizer"]["hash"] and hf.describe()["tokenizer"]["vocab_size"] == 300
    n_bytes = sum(len(p.read_bytes()) for p in root.iterdir())
    counted = sum(hf.describe()["splits"][s]["bytes"] for s in ("train", "val", "test"))
    assert counted == n_bytes  # ASCII sources: every token decodes to its own bytes
    total = {c: sum(c.num_tokens(s) for s in ("train", "val", "test")) for c in (hf, raw)}
    assert total[hf] < 0.8 * total[raw]  # the merges shorten the text
    first = sorted(root.iterdir())[0].read_text()
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(path)(first, add_special_tokens=False)["input_ids"]
    assert hf.split("train")[: len(ids)].tolist() == ids  # the first document, as the tokenizer encodes it


def test_a_run_on_it_reports_bits_per_byte_over_bytes(texts, tmp_path):
    root, path = texts
    config = {"model": {"d_model": 32, "n_layers": 1, "n_heads": 2, "mixer": "attention"},
              "train": {"steps": 6, "batch_size": 4, "seq_len": 32, "eval_interval": 6, "eval_batches": 2},
              "data": {"corpus": "textfile", "tokenizer": str(path),
                       "options": {"path": str(root), "split_by": "tokens", "val_fraction": 0.2}}}
    summary = train(*build_specs(config), tmp_path / "run", progress=False)
    final = summary.final
    splits = summary.dataset["corpus"]["splits"]["val"]
    assert summary.model["vocab_size"] == 300
    assert final["val_bpb"] == pytest.approx(final["val_loss"] / math.log(2) * splits["tokens"] / splits["bytes"])
    assert summary.dataset["corpus"]["tokenizer"]["name"] == "hf:tok"


def test_a_bad_tokenizer_is_refused_before_anything_runs(tmp_path):
    with pytest.raises(DataError, match=r"data.tokenizer='.*nowhere'.*not a Hugging Face tokenizer directory"):
        load_corpus("stdlib", tokenizer=str(tmp_path / "nowhere"))
    with pytest.raises(RunError, match="synthetic tasks make their own token ids"):
        DataSpec(task="mqar", tokenizer=str(tmp_path))
    assert TrainSpec()  # untouched
