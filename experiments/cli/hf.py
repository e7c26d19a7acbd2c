"""``mixerlab export`` and ``mixerlab import-hf``: runs to Hugging Face model directories and back."""

from __future__ import annotations

import argparse

from experiments.cli.base import command
from experiments.errors import UsageError


def _needs_transformers(what: str) -> None:
    import importlib.util

    if importlib.util.find_spec("transformers") is None:
        raise UsageError(f"{what} needs transformers: pip install 'mixerlab[hf]' (or pip install transformers)")


def _configure_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="a training run directory (spec.json + checkpoint.pt)")
    p.add_argument("out", help="the Hugging Face model directory to write (new or empty)")
    p.add_argument("--as", dest="target", choices=("auto", "mixerlab"), default="auto",
                   help="auto: a native transformers class (MambaForCausalLM, Mamba2ForCausalLM, LlamaForCausalLM) "
                        "where the model is exactly one, else MixerlabForCausalLM; mixerlab: always the latter")


@command("export", "write a run as a Hugging Face model directory (config.json, model.safetensors, tokenizer, "
                   "model card)")(_configure_export)
def _run_export(args: argparse.Namespace) -> int:
    _needs_transformers("mixerlab export")
    from experiments.hf.export import export_run

    done = export_run(args.run, args.out, native=args.target == "auto")
    print(f"exported {args.run} to {done.out} as {done.architecture}: {done.reason}")
    flag = ", trust_remote_code=True" if done.architecture == "MixerlabForCausalLM" else ""
    print(f"load it: AutoModelForCausalLM.from_pretrained({str(done.out)!r}{flag})")
    return 0


def _configure_import(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="a local Hugging Face directory of a MambaForCausalLM, Mamba2ForCausalLM or "
                               "LlamaForCausalLM (config.json + model.safetensors)")
    p.add_argument("out", help="the mixerlab run directory to write (new or empty)")


@command("import-hf", "turn a local Mamba, Mamba-2 or Llama checkpoint into a mixerlab run directory (for "
                      "measure, train)")(_configure_import)
def _run_import(args: argparse.Namespace) -> int:
    _needs_transformers("mixerlab import-hf")
    from experiments.hf.export import import_hf

    model, native = import_hf(args.src, args.out)
    print(f"imported {native.architecture} from {args.src} into {args.out}: {model.spec.layers_text}, "
          f"{model.num_params():,} parameters")
    return 0
