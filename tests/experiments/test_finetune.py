"""Fine-tuning: a run that starts from another run's weights (`TrainSpec.init_from`, `mixerlab train
--init-from`) — a mixerlab run or a Hugging Face checkpoint brought in by `import-hf` — and the refusals
that keep it from starting from weights that do not fit."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from archs.model import ModelSpec
from experiments.cli import main
from experiments.config import DataSpec, TrainSpec
from experiments.errors import RunError
from experiments.runs import load_run
from experiments.train import train

MAMBA = ["--mixer", "mamba"], ["model.d_model=32", "model.n_layers=2"]
SHORT = ["train.batch_size=4", "train.seq_len=64", "train.eval_interval=10", "train.eval_batches=2",
         "train.log_interval=1", "train.warmup_steps=2"]


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "loss" in r and "val_loss" not in r]


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    """Ten stdlib modules as a text corpus (its cache kept in the test's directory)."""
    monkeypatch.setenv("MIXERLAB_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "texts"
    root.mkdir()
    for f in sorted(Path(json.__file__).parent.parent.glob("[a-c]*.py"))[:10]:
        shutil.copy(f, root / f.name)
    return root


def train_cli(out: Path, corpus: Path, options: list[str], overrides: list[str]) -> int:
    """`mixerlab train` on the corpus (options first: argparse takes KEY=VALUE overrides in one run)."""
    return main(["train", *options, "--corpus", "textfile", "--threads", "1", "--no-progress", "--out", str(out),
                 f"data.options.path={corpus}", *SHORT, *overrides])


@pytest.fixture
def pretrained(tmp_path, corpus):
    """A small Mamba trained 40 steps on the corpus."""
    run = tmp_path / "pretrained"
    assert train_cli(run, corpus, [*MAMBA[0], "--steps", "40"], [*MAMBA[1], "train.lr=1e-2"]) == 0
    return run


def test_a_fine_tune_starts_from_the_runs_weights_and_trains_on(tmp_path, corpus, pretrained):
    frozen = tmp_path / "frozen"  # one step at a vanishing rate: the weights are the pretrained run's
    init = ["--init-from", str(pretrained)]
    assert train_cli(frozen, corpus, [*init, "--steps", "1"], ["train.lr=1e-30", "train.weight_decay=0"]) == 0
    (theirs, _), (ours, specs) = load_run(pretrained), load_run(frozen)
    for (name, a), b in zip(theirs.state_dict().items(), ours.state_dict().values(), strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-6), name
    assert specs["train"]["init_from"] == str(pretrained.resolve())
    assert specs["model"] == json.loads((pretrained / "spec.json").read_text())["model"]

    tuned, fresh = tmp_path / "tuned", tmp_path / "fresh"
    assert train_cli(tuned, corpus, [*init, "--steps", "5"], ["train.lr=3e-3"]) == 0
    assert train_cli(fresh, corpus, [*MAMBA[0], "--steps", "5"], [*MAMBA[1], "train.lr=3e-3"]) == 0
    # its first batch is scored by the pretrained model: near where pretraining ended, far below a fresh model
    assert losses(tuned)[0] < losses(pretrained)[-1] + 0.5 < losses(fresh)[0] - 1.0
    assert train_cli(tuned, corpus, [*init, "--steps", "5"], ["train.lr=3e-3"]) == 0  # rerun: nothing again
    assert len(losses(tuned)) == 5


def test_an_imported_checkpoint_fine_tunes_with_its_own_tokenizer(tmp_path, corpus):
    pytest.importorskip("transformers")
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = corpus
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train([str(p) for p in texts.iterdir()], trainers.BpeTrainer(
        vocab_size=280, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=288, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=96, rms_norm_eps=1e-5)  # a vocabulary padded past 280
    hf_dir, imported, tuned = tmp_path / "llama", tmp_path / "imported", tmp_path / "tuned"
    transformers.LlamaForCausalLM(config).save_pretrained(hf_dir)
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(hf_dir)
    assert main(["import-hf", str(hf_dir), str(imported)]) == 0
    assert train_cli(tuned, corpus, ["--init-from", str(imported), "--steps", "4"], []) == 0
    _, specs = load_run(tuned)
    assert specs["data"]["tokenizer"] == str((imported / "tokenizer").resolve())
    assert specs["model"]["vocab_size"] == 288  # the checkpoint's embedding, not the tokenizer's 280
    summary = json.loads((tuned / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["final"]["val_bpb"] > 0
    assert summary["dataset"]["corpus"]["tokenizer"]["vocab_size"] == 280


def test_weights_that_do_not_fit_are_refused_before_anything_is_written(tmp_path, corpus, pretrained, capsys):
    out = tmp_path / "out"
    assert train_cli(out, corpus, ["--init-from", str(pretrained), *MAMBA[0]], []) == 2
    assert re.search(r"--init-from .* takes the model from .*spec.json; drop --mixer \(", capsys.readouterr().err)
    assert train_cli(out, corpus, ["--init-from", str(tmp_path / "nowhere")], []) == 2
    assert "is not a run directory (no spec.json); --init-from must name a run" in capsys.readouterr().err
    spec = ModelSpec.from_dict({**json.loads((pretrained / "spec.json").read_text())["model"], "d_model": 48})
    data = DataSpec(corpus="textfile", options={"path": str(corpus)})
    with pytest.raises(RunError, match=r"init_from=.*parameter blocks.0.mixer.A_log is of shape \(64, 16\) there "
                                       r"and of shape \(96, 16\) in this model; fine-tuning keeps the architecture"):
        train(spec, TrainSpec(steps=2, batch_size=4, seq_len=64, init_from=str(pretrained)), data, out)
    small = spec.replace(d_model=32, vocab_size=100)  # fewer embeddings than the byte tokenizer's ids
    with pytest.raises(RunError, match=r"the data has 2\d\d token ids but the model embeds 100.*tokenizer='bytes'"):
        train(small, TrainSpec(steps=2, batch_size=4, seq_len=64, init_from=str(pretrained)), data, out)
    assert not out.exists()
