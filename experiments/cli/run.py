"""``mixerlab train`` and ``mixerlab generate``."""

from __future__ import annotations

import argparse
import os
import sys

from experiments.cli.base import command, table
from experiments.errors import UsageError


def _configure_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="override any field: model.d_model=256 train.lr=1e-3 data.options.num_kv_pairs=8")
    p.add_argument("--config", type=str, help="TOML file with [model], [train] and [data] tables")
    p.add_argument("--preset", help="a named model (classic-transformer, transformer, mamba, mamba2, jamba, "
                                    "nvidia-hybrid, hybrid)")
    p.add_argument("--mixer", help="every layer's mixer (a registered name or package.module:Class)")
    p.add_argument("--pattern", help="hybrid pattern tiled over the layers, e.g. MMMA")
    data = p.add_mutually_exclusive_group()
    data.add_argument("--corpus", help="train on a corpus: stdlib (default), textfile, hf")
    data.add_argument("--task", help="train on a synthetic task: mqar, selective_copy, induction, passkey")
    p.add_argument("--steps", type=int, help="optimiser steps (= train.steps=N)")
    p.add_argument("--init-from", metavar="RUN",
                   help="fine-tune: start from the weights of RUN (a training run, or one made by import-hf), with "
                        "its model and, for a corpus, its tokenizer; model.* overrides may change what keeps the "
                        "parameters' shapes (e.g. model.dropout); a fresh optimiser and schedule")
    p.add_argument("--out", default=None, help="run directory (default runs/train-<model>-<data>); rerunning "
                                               "into the same directory resumes from its checkpoint")
    p.add_argument("--threads", type=int, help="torch intra-op threads (per process)")
    p.add_argument("--nproc", type=int, default=1,
                   help="train one model over N processes on this machine (torchrun's elastic agent, gloo on CPU, "
                        "NCCL on GPUs; train.parallel=ddp|fsdp); the global batch stays train.batch_size. For "
                        "several machines run `torchrun --nnodes ... -m experiments train ...` on each")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--check", action="store_true",
                   help="validate everything (specs, data, the model built on the meta device, a memory bound) "
                        "and stop: nothing is trained or written")


@command("train", "train one model on a corpus or task; writes metrics.jsonl, checkpoint.pt, summary.json")(
    _configure_train)
def _run_train(args: argparse.Namespace) -> int:
    from experiments.config import apply_overrides, build_specs, load_toml
    from experiments.train import train

    config = load_toml(args.config) if args.config else {}
    config.setdefault("model", {})
    config.setdefault("data", {})
    source = _init_from(args, config) if args.init_from else None
    if args.preset:
        config["model"]["preset"] = args.preset
    if args.mixer:
        config["model"]["mixer"] = args.mixer
    if args.pattern:
        config["model"]["pattern"] = args.pattern
    if args.corpus:
        config["data"] = {"corpus": args.corpus, **{k: v for k, v in config["data"].items() if k == "options"}}
    if args.task:
        config["data"] = {"task": args.task, **{k: v for k, v in config["data"].items() if k == "options"}}
    if args.steps:
        config.setdefault("train", {})["steps"] = args.steps
    tokenizer = (source or {}).get("data", {}).get("tokenizer", "bytes")
    if "task" not in config["data"] and "tokenizer" not in config["data"] and tokenizer != "bytes":
        config["data"]["tokenizer"] = tokenizer  # a fine-tuned corpus is tokenized as the run's was
    model, train_spec, data = build_specs(apply_overrides(config, args.overrides))
    label = data.task or data.corpus
    out = args.out or f"runs/train-{args.preset or model.layer_pattern.lower()}-{label}"
    if args.nproc < 1:
        raise UsageError(f"--nproc {args.nproc}: must be a positive number of processes")
    from experiments.distributed import env_world_size

    if args.nproc > 1 and env_world_size() > 1:
        raise UsageError(f"--nproc {args.nproc} under torchrun (WORLD_SIZE={env_world_size()}): torchrun "
                         f"starts the processes already; drop --nproc")
    if args.check or args.nproc > 1:
        from experiments.train import plan

        checked = plan(model, train_spec, data, world_size=max(args.nproc, env_world_size()))
        if args.check:
            print(f"valid: {checked.model_spec.layers_text}, {checked.params:,} parameters, needs at least "
                  f"{checked.need_bytes / 2**20:,.0f} MiB; nothing was written")
            return 0
    if args.nproc > 1:  # everything is valid: start the ranks, each running this command without --nproc
        from experiments.distributed import launch

        launch(["train", *_without_nproc(args.argv[args.argv.index("train") + 1:]), "--out", out], args.nproc,
               threads=args.threads)
        return 0
    summary = train(model, train_spec, data, out, progress=not args.no_progress, threads=args.threads)
    if env_world_size() > 1 and os.environ.get("RANK", "0") != "0":  # rank 0 prints the run's table
        return 0
    final = summary.final
    rows = [["status", summary.status], ["steps", f"{summary.steps}/{summary.total_steps}"],
            ["params", f"{summary.params:,}"], ["layers", model.layers_text]]
    if "val_bpb" in final:
        rows += [["val loss (nats/token)", f"{final['val_loss']:.4f}"],
                 ["val bits per byte", f"{final['val_bpb']:.4f}"],
                 ["unigram baseline (bits per byte)", f"{summary.unigram_bpb:.4f}"]]
    if "accuracy" in final:
        rows += [["test accuracy", f"{final['accuracy']:.4f}"]]
        for attr, by in final.get("by", {}).items():
            rows += [[f"  accuracy by {attr}", ", ".join(f"{k}: " + ("n/a" if v is None else f"{v:.3f}")
                                                         for k, v in by.items())]]
        if final.get("not_applicable"):
            rows += [["  n/a", final["not_applicable"]]]
    if summary.peak_memory_mib is not None:
        rows += [["peak memory (training steps)", f"{summary.peak_memory_mib:,.1f} MiB"]]
    if summary.distributed:
        d = summary.distributed
        rows += [["processes", f"{d['world_size']} ({d['parallel']}, {d['backend']}; peak memory is rank 0's)"]]
    rows += [["tokens/s (train)", f"{summary.tokens_per_s:,.0f}"], ["wall time", f"{summary.wall_seconds:.1f} s"],
             ["backends", ", ".join(sorted({str(b) for b in summary.backends.values()}))], ["out", out]]
    print(table(rows, ["", "value"]))
    if summary.status == "interrupted":
        print(f"interrupted at step {summary.steps} (checkpoint written); rerun the same command to resume",
              file=sys.stderr)
        return 130
    return 0 if summary.status in ("completed", "stopped") else 1


def _init_from(args: argparse.Namespace, config: dict) -> dict:
    """``--init-from RUN``: the model is RUN's (its spec.json); returns RUN's specs."""
    from pathlib import Path

    from experiments.runs import run_specs

    given = [flag for flag, value in (("--preset", args.preset), ("--mixer", args.mixer), ("--pattern", args.pattern))
             if value] + (["--config's [model]"] if config["model"] else [])
    if given:
        raise UsageError(f"--init-from {args.init_from} takes the model from {args.init_from}/spec.json; drop "
                         f"{', '.join(given)} (model.* overrides may change fields that keep the weights' shapes)")
    source = run_specs(args.init_from, "--init-from must name a run directory (from train or import-hf)")
    config["model"] = dict(source["model"])
    config.setdefault("train", {})["init_from"] = str(Path(args.init_from).resolve())
    return source


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


# generate ---------------------------------------------------------------------------------------------------
def _configure_generate(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="a training run directory (spec.json + checkpoint.pt)")
    p.add_argument("--prompt", default="def ", help="text to continue (byte-level corpus runs)")
    p.add_argument("--tokens", type=int, default=200, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50, help="sample from the k most likely tokens")
    p.add_argument("--seed", type=int, default=0)


@command("generate", "continue a prompt with a trained corpus model, decoding with the layers' caches")(
    _configure_generate)
def _run_generate(args: argparse.Namespace) -> int:
    import torch

    from experiments.config import DataSpec
    from experiments.data.tokenizer import load_tokenizer
    from experiments.runs import load_run

    for flag, value, ok, what in (("--tokens", args.tokens, args.tokens >= 1, "a positive integer"),
                                  ("--temperature", args.temperature, args.temperature >= 0, ">= 0 (0: greedy)"),
                                  ("--top-k", args.top_k, args.top_k >= 1, "a positive integer"),
                                  ("--seed", args.seed, 0 <= args.seed < 2**63, "an integer in [0, 2^63)")):
        if not ok:
            raise UsageError(f"{flag} {value}: must be {what}")
    model, specs = load_run(args.run)
    if DataSpec.from_dict(specs["data"]).kind == "task":
        raise UsageError(f"{args.run} was trained on task {specs['data']['task']!r}, not text: it has no prompt "
                         f"to continue (evaluate it with `mixerlab measure context --run {args.run}`)")
    data = DataSpec.from_dict(specs["data"])
    tokenizer = load_tokenizer(data.tokenizer)  # the run's own: bytes, or its Hugging Face tokenizer
    start = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    ids = torch.tensor([list(tokenizer.encode(args.prompt)) or [start]], dtype=torch.long)  # "": from <bos>
    limit = model.spec.length_limit
    if limit is not None and ids.shape[1] + args.tokens > limit:
        room = limit - ids.shape[1]
        raise UsageError(f"--tokens {args.tokens} after a {ids.shape[1]}-token prompt needs "
                         f"{ids.shape[1] + args.tokens} positions, but this model has learned positions up to "
                         f"max_seq_len={limit}: " + (f"use --tokens {room} or fewer" if room > 0 else
                                                     "shorten the prompt"))
    out = model.generate(ids, args.tokens, temperature=args.temperature, top_k=args.top_k,
                         generator=torch.Generator().manual_seed(args.seed))
    print(tokenizer.decode(out[0].tolist(), skip_specials=True))
    return 0
