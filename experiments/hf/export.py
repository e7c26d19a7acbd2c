"""A run directory to a Hugging Face model directory and back.

`export_run(RUN, OUT)` writes ``config.json``, ``model.safetensors``, ``generation_config.json``, the
tokenizer files (byte-level corpus runs) and a model card (``README.md``: the spec, the corpus, the run's
metrics). A model that is exactly a native transformers class (`archs.hf.native_for`) becomes that class, so
it loads with no mixerlab installed; every other one becomes `MixerlabForCausalLM`, reachable through
``auto_map`` (``trust_remote_code=True``) or directly once `experiments.hf` is imported.

`import_hf(DIR, OUT)` turns a local `MambaForCausalLM`, `Mamba2ForCausalLM` or `LlamaForCausalLM` directory
into a mixerlab run directory (``spec.json``, ``checkpoint.pt``, and its tokenizer under ``tokenizer/``), so
``measure``, ``generate`` and ``train`` work on it.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from archs.hf import Native, load_hf_state, load_native, native_for, to_native
from experiments.errors import UsageError
from experiments.hf.tokenizer import byte_tokenizer

__all__ = ["Exported", "export_run", "import_hf", "load_hf_state"]

REMOTE_CODE = '''"""Loads this directory's model with mixerlab installed:
AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)."""
from experiments.hf.modeling import MixerlabConfig, MixerlabForCausalLM  # noqa: F401
'''


@dataclass(frozen=True)
class Exported:
    architecture: str  # the transformers class the directory loads as
    reason: str  # why that class
    out: Path


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out} exists and is not empty; export into a new directory (nothing was written)")


def export_run(run_dir: str | Path, out_dir: str | Path, *, native: bool = True) -> Exported:
    """Export the run's model (``native=False``: always as `MixerlabForCausalLM`)."""
    from experiments.config import DataSpec
    from experiments.runs import load_run

    out = Path(out_dir)
    _check_out(out)
    model, specs = load_run(run_dir)  # refuses a directory without a run or a checkpoint
    data = DataSpec.from_dict(specs["data"])
    target, why_not = native_for(model) if native else (None, "asked for MixerlabForCausalLM (--as mixerlab)")
    tokenizer = None
    if data.kind == "corpus":
        from experiments.data.tokenizer import load_tokenizer

        own = load_tokenizer(data.tokenizer)
        tokenizer = byte_tokenizer() if data.tokenizer == "bytes" else own.hf
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if target is not None:
        hf = _native_model(target, state)
        architecture, reason = target.architecture, target.reason
    else:
        from experiments.hf.modeling import MixerlabConfig, MixerlabForCausalLM

        hf = MixerlabForCausalLM(MixerlabConfig(spec=model.spec.to_dict()))
        hf.model.load_state_dict(state)
        hf.config.auto_map = {"AutoConfig": "modeling_mixerlab.MixerlabConfig",
                              "AutoModelForCausalLM": "modeling_mixerlab.MixerlabForCausalLM"}
        architecture, reason = "MixerlabForCausalLM", f"no native transformers class: {why_not}"
    _set_special_ids(hf, tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(out)
    if target is None:
        (out / "modeling_mixerlab.py").write_text(REMOTE_CODE)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    (out / "README.md").write_text(_card(run_dir, specs, architecture, reason, data))
    return Exported(architecture, reason, out)


def _native_model(target: Native, state: dict[str, torch.Tensor]) -> Any:
    """The native transformers model holding ``state`` (a strict load: every name must match)."""
    import transformers

    # the class itself, not AutoConfig: other libraries (fla) register configs of their own under "mamba"
    config = getattr(transformers, target.architecture.replace("ForCausalLM", "Config"))(**target.config)
    hf = getattr(transformers, target.architecture)(config)
    theirs = to_native(target, state)
    if target.config["tie_word_embeddings"]:
        theirs.pop("lm_head.weight")
    missing, unexpected = hf.load_state_dict(theirs, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and target.config["tie_word_embeddings"])]
    if missing or unexpected:
        raise RuntimeError(f"{target.architecture} names differ from the mapping: missing {missing}, "
                           f"unexpected {unexpected}")
    return hf.eval()


def _set_special_ids(hf: Any, tokenizer: Any) -> None:
    if tokenizer is None:
        return
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    for key, value in ids.items():
        setattr(hf.config, key, value)
        setattr(hf.generation_config, key, value)


def _card(run_dir: str | Path, specs: dict[str, Any], architecture: str, reason: str, data: Any) -> str:
    summary_path = Path(run_dir) / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    final = {k: v for k, v in (summary.get("final") or {}).items() if isinstance(v, (int, float))}
    corpus = (summary.get("dataset") or {}).get("corpus") or {}
    lines = [f"# A mixerlab model: {architecture}", "",
             f"Exported from the mixerlab run `{Path(run_dir).name}` ({reason}).", "",
             "| | |", "|---|---|",
             f"| layers | {summary.get('layer_pattern') or specs['model'].get('mixer')} |",
             f"| parameters | {summary.get('params', 'n/a')} |",
             f"| data | {data.task or data.corpus} |"]
    if corpus:
        lines.append(f"| corpus hash | {corpus.get('content_hash')} |")
    lines += [f"| steps | {summary.get('steps', specs.get('step'))} |",
              *[f"| {k} | {v:.4g} |" for k, v in final.items()], "",
              "The spec it was trained with:", "", "```json", json.dumps(specs["model"], indent=1), "```", ""]
    if architecture == "MixerlabForCausalLM":
        lines += ["Load it with mixerlab installed: `AutoModelForCausalLM.from_pretrained(DIR, "
                  "trust_remote_code=True)`, or `import experiments.hf` first and leave the flag out.", ""]
    return "\n".join(lines)


# import -----------------------------------------------------------------------------------------------------
def import_hf(src_dir: str | Path, out_dir: str | Path) -> tuple[Any, Native]:
    """A mixerlab run directory from a local native transformers directory; returns the model and what it
    was. Refuses, before writing, a config mixerlab cannot represent (the field named)."""
    from experiments.config import DataSpec, TrainSpec
    from experiments.runs import save_torch, write_json

    src, out = Path(src_dir), Path(out_dir)
    if not (src / "config.json").is_file():
        raise UsageError(f"{src} has no config.json: pass a Hugging Face model directory")
    _check_out(out)
    model, native = load_native(src)
    spec = model.spec
    out.mkdir(parents=True)
    tokenizer_files = [p for p in src.iterdir() if p.name.startswith(("tokenizer", "special_tokens", "vocab",
                                                                         "merges"))]
    if tokenizer_files:
        (out / "tokenizer").mkdir()
        for p in tokenizer_files:
            shutil.copy2(p, out / "tokenizer" / p.name)
    data = DataSpec(tokenizer=str((out / "tokenizer").resolve())) if tokenizer_files else DataSpec()
    specs = {"model": spec.to_dict(), "train": TrainSpec().to_dict(), "data": data.to_dict(),
             "imported_from": {"path": str(src.resolve()), "architecture": native.architecture}}
    write_json(out / "spec.json", specs)
    save_torch({"model": model.state_dict(), "step": 0, "imported_from": native.architecture}, out / "checkpoint.pt")
    return model, native
