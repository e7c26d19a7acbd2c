"""Hugging Face export and import, offline: random weights made here, transformers' own classes loading them.

A native export must load in a process that imports no mixerlab module, with logits equal to ours; every
other model loads as `MixerlabForCausalLM` and generates as `LanguageModel.generate` does; an import of a
native checkpoint gives its logits, and exporting it again gives back every tensor."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from archs.model import LanguageModel, ModelSpec, SpecError  # noqa: E402
from experiments.cli import main  # noqa: E402
from experiments.config import DataSpec, TrainSpec  # noqa: E402
from experiments.data.tokenizer import BYTE_TOKENIZER  # noqa: E402
from experiments.errors import UsageError  # noqa: E402
from experiments.hf.export import export_run, import_hf, load_hf_state  # noqa: E402
from experiments.runs import load_run, save_torch, write_json  # noqa: E402

NATIVE = {
    "mamba": {"mixer": "mamba", "mlp": "none", "positions": "none"},
    "mamba-no-conv-bias": {"mixer": "mamba", "mlp": "none", "positions": "none",
                           "mixer_options": {"mamba": {"conv_bias": False}}},
    "mamba2": {"mixer": "mamba2", "mlp": "none", "positions": "none",
               "mixer_options": {"mamba2": {"headdim": 16, "d_state": 16, "chunk_size": 8}}},
    "attention": {"mixer": "attention", "mlp": "swiglu", "positions": "rope",
                  "mixer_options": {"attention": {"n_kv_heads": 2, "rope_base": 500.0}}},
}
HYBRID = {"pattern": "AMN", "n_layers": 3, "mlp": "swiglu", "positions": "rope"}


def make_run(tmp_path, name, model_options, seed=0):
    """A run directory holding a randomly initialised model (as `train` writes one)."""
    torch.manual_seed(seed)
    spec = ModelSpec.from_dict({"n_layers": 2, "d_model": 32, "n_heads": 4, "vocab_size": 261, **model_options})
    model = LanguageModel(spec)
    with torch.no_grad():  # weights away from their initial symmetries (norm weights of 1, zero biases)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    run = tmp_path / f"run-{name}"
    run.mkdir()
    write_json(run / "spec.json", {"model": spec.to_dict(), "train": TrainSpec().to_dict(),
                                   "data": DataSpec().to_dict()})
    save_torch({"model": model.state_dict(), "step": 7}, run / "checkpoint.pt")
    return run, model.eval()


def ids(batch=2, length=21):
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(1))


def relative(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


LOAD_NATIVE = """
import sys, torch
from transformers import AutoModelForCausalLM
out = {}
for name, path in zip(sys.argv[1::2], sys.argv[2::2]):
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        out[name] = [type(model).__name__, model(torch.load(path + "/ids.pt")).logits]
mine = sorted(m for m in sys.modules if m.split(".")[0] in ("archs", "experiments", "registry"))
torch.save({"out": out, "mixerlab_modules": mine}, sys.argv[-1])
"""


def test_native_exports_load_without_mixerlab_and_give_our_logits(tmp_path):
    args, want = [], {}
    for name, options in NATIVE.items():
        run, model = make_run(tmp_path, name, options)
        out = tmp_path / f"hf-{name}"
        done = export_run(run, out)
        assert done.architecture == {"mamba": "MambaForCausalLM", "mamba-no-conv-bias": "MambaForCausalLM",
                                     "mamba2": "Mamba2ForCausalLM", "attention": "LlamaForCausalLM"}[name]
        x = ids()
        torch.save(x, out / "ids.pt")
        with torch.no_grad():
            want[name] = model(x)
        args += [name, str(out)]
        assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "README.md"} <= {
            p.name for p in out.iterdir()}
    result = tmp_path / "result.pt"
    subprocess.run([sys.executable, "-c", LOAD_NATIVE, *args, str(result)], check=True, cwd=tmp_path)
    loaded = torch.load(result, weights_only=False)
    assert loaded["mixerlab_modules"] == []  # transformers alone
    for name, (cls, logits) in loaded["out"].items():
        assert relative(logits, want[name]) <= 1e-5, (name, cls)


def test_a_hybrid_exports_as_mixerlab_for_causal_lm_and_generates_with_its_caches(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run, model = make_run(tmp_path, "hybrid", HYBRID)
    out = tmp_path / "hf-hybrid"
    done = export_run(run, out)
    assert done.architecture == "MixerlabForCausalLM" and "attention, gated_deltanet, mamba" in done.reason
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert type(hf).__name__ == "MixerlabForCausalLM"
    x = ids()
    with torch.no_grad():
        assert relative(hf(x).logits, model(x)) <= 1e-5  # RoPE frequencies (a non-persistent buffer) rebuilt
        labels_loss = hf(x, labels=x).loss
    assert labels_loss.item() == pytest.approx(model.loss(x[:, :-1], x[:, 1:]).item(), rel=1e-5)
    tok = AutoTokenizer.from_pretrained(out)
    prompt = tok("def main(", return_tensors="pt")["input_ids"]
    want = model.generate(prompt, 16, temperature=0)
    assert hf.generate(prompt, max_new_tokens=16, do_sample=False).tolist() == want.tolist()
    assert hf.generate(prompt, max_new_tokens=16, do_sample=False, use_cache=False).tolist() == want.tolist()
    with pytest.raises(ValueError, match="left-padded"):
        hf(x, attention_mask=torch.tensor([[0] * 3 + [1] * 18, [1] * 21]))


def test_why_a_model_is_not_native_is_said(tmp_path):
    run, _ = make_run(tmp_path, "mamba-mlp", {"mixer": "mamba", "mlp": "swiglu", "positions": "none"})
    done = export_run(run, tmp_path / "hf")
    assert done.architecture == "MixerlabForCausalLM" and "mlp='swiglu' (native: 'none')" in done.reason
    run, _ = make_run(tmp_path, "attn-alibi", {"mixer": "attention", "mlp": "swiglu", "positions": "alibi"})
    done = export_run(run, tmp_path / "hf-alibi")
    assert "positions='alibi' (native: 'rope')" in done.reason


def native_checkpoint(tmp_path, kind):
    """A random transformers model of ``kind``, saved as a local directory; its logits on `ids`."""
    import transformers

    torch.manual_seed(0)
    config = {"mamba": transformers.MambaConfig(vocab_size=300, hidden_size=48, num_hidden_layers=2, state_size=8,
                                                time_step_rank=5),
              "mamba2": transformers.Mamba2Config(vocab_size=300, hidden_size=48, num_hidden_layers=2, state_size=16,
                                                  num_heads=6, head_dim=16, n_groups=2, chunk_size=16,
                                                  tie_word_embeddings=True),
              "llama": transformers.LlamaConfig(vocab_size=300, hidden_size=48, num_hidden_layers=2,
                                                num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                                                rms_norm_eps=1e-5, tie_word_embeddings=False)}[kind]
    model = getattr(transformers, {"mamba": "MambaForCausalLM", "mamba2": "Mamba2ForCausalLM",
                                   "llama": "LlamaForCausalLM"}[kind])(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        logits = model(ids()).logits
    path = tmp_path / f"native-{kind}"
    model.save_pretrained(path)
    return path, logits


@pytest.mark.parametrize("kind", ["mamba", "mamba2", "llama"])
def test_import_gives_the_native_logits_and_exports_back_every_tensor(tmp_path, kind):
    path, logits = native_checkpoint(tmp_path, kind)
    run = tmp_path / "imported"
    assert main(["import-hf", str(path), str(run)]) == 0
    model, specs = load_run(run)
    with torch.no_grad():
        assert relative(model(ids()), logits) <= 1e-5
    assert specs["imported_from"]["architecture"].lower().startswith(kind)
    with torch.no_grad():  # the same model, in plain Python: LanguageModel.from_hf
        assert relative(LanguageModel.from_hf(path).eval()(ids()), logits) <= 1e-5
    again = tmp_path / "again"
    assert export_run(run, again).architecture == json.loads((path / "config.json").read_text())["architectures"][0]
    original, round_trip = load_hf_state(path), load_hf_state(again)
    assert original.keys() == round_trip.keys()
    for name in original:
        assert torch.equal(original[name], round_trip[name]), name


def test_an_unrepresentable_config_is_refused_naming_the_field(tmp_path):
    path, _ = native_checkpoint(tmp_path, "llama")
    config = json.loads((path / "config.json").read_text())
    config["hidden_act"] = "gelu"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(SpecError, match=r"config.json hidden_act='gelu'.*hidden_act='silu'"):
        import_hf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    config["model_type"] = "gpt2"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(SpecError, match="model_type='gpt2'"):
        import_hf(path, tmp_path / "out")


def test_export_refuses_a_directory_that_holds_something(tmp_path):
    run, _ = make_run(tmp_path, "mamba", NATIVE["mamba"])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(UsageError, match="not empty"):
        export_run(run, tmp_path / "full")
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]


def test_the_exported_tokenizer_gives_the_byte_tokenizers_ids():
    import json as json_module

    from experiments.hf.tokenizer import byte_tokenizer

    tok = byte_tokenizer()
    text = Path(json_module.__file__).read_text() + "héllo ✓ \x00\x7f\ttabs\r\n"
    got = tok(text, add_special_tokens=False)["input_ids"]
    assert got == BYTE_TOKENIZER.encode(text).tolist()
    assert tok.decode(got) == text
    for name, value in BYTE_TOKENIZER.specials.items():
        assert tok.convert_tokens_to_ids(name) == value
    assert len(tok) == BYTE_TOKENIZER.vocab_size


@pytest.mark.parametrize("name", ["attention", "hybrid"])
def test_lm_eval_harness_scores_an_export_as_we_do(tmp_path, name):
    """lm-evaluation-harness's HFLM (`lm_eval --model hf --model_args pretrained=OUT[,trust_remote_code=True]`)
    gives a hand-written request the log-likelihood our model gives it."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    run, model = make_run(tmp_path, name, NATIVE["attention"] if name == "attention" else HYBRID)
    out = tmp_path / "hf"
    export_run(run, out)
    lm = HFLM(pretrained=str(out), trust_remote_code=name == "hybrid", device="cpu", batch_size=1)
    context, continuation = "def add(a, b):\n    return", " a + b\n"
    (got, greedy), = lm.loglikelihood([Instance("loglikelihood", {}, (context, continuation), 0)],
                                      disable_tqdm=True)
    ctx, cont = BYTE_TOKENIZER.encode(context).tolist(), BYTE_TOKENIZER.encode(continuation).tolist()
    x = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(x[:, :-1]).double(), -1)[0, len(ctx) - 1:]
    want = logp.gather(-1, torch.tensor(cont)[:, None]).sum().item()
    assert got == pytest.approx(want, rel=1e-5)
    assert greedy == bool((logp.argmax(-1) == torch.tensor(cont)).all())
