"""Long-convolution, LTI and gated-RNN layers on CPU: forward+backward time and peak memory vs sequence length,
beside `mamba` and `attention` at the same width, and against Hugging Face's RG-LRU (RecurrentGemma).

    python -m benchmarks.long_conv                    # writes benchmarks/results/long_conv.{md,json}
    python -m benchmarks.long_conv --layers rg_lru hf/RecurrentGemma --lengths 512 --out /tmp/lc

One layer at d_model 256, batch 4, fp32, forward+backward, 2 threads; every case (layer x path x length)
runs in a fresh process (`experiments.child.run_isolated`). Layers and paths:

- ``s4d``, ``h3``, ``hyena``, ``base_conv/long`` (the implicit long filter, Zoology's — the default since
  2026-12-07), ``base_conv/long-hyena`` (the same with Hyena's filter, the default before): ``fast`` is the FFT
  long convolution (`archs.ops.long_conv`), ``reference`` the direct O(T^2) convolution (option ``conv``);
  Hyena's and BaseConv's filters take ``l_max`` = T (the training length);
- ``base_conv`` (kernel 3): one path, a short depthwise convolution;
- ``rg_lru``: ``fast`` is the chunked parallel scan (`archs.ops.diagonal_recurrence`), ``reference`` the
  per-token loop (option ``scan``);
- ``hf/RecurrentGemma``: transformers' ``RecurrentGemmaRecurrentBlock`` (the same Hawk block, same width
  and heads), the pure-PyTorch layer a CPU user would otherwise pick, when transformers is installed;
- ``mamba`` (d_state 16, expand 2) and ``attention`` (sdpa, 4 heads), for scale.

Reference paths and transformers' block are not run beyond T = 2048 (quadratic or per-token; marked).
Below the table, the growth exponent of time and of memory between the two longest lengths (log-ratio over
log-ratio of T): memory linear in T is 1.0; an FFT convolution's T log T time is about 1.1 from 2048 to 8192.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from benchmarks import package_version, run_meta, write_results
from experiments.child import Isolation, run_isolated
from experiments.errors import MeasureError

D_MODEL, BATCH, MODE = 256, 4, "fwdbwd"

#: layer label -> (registry name, options, option that picks the path or None, whether l_max follows T)
LAYERS: dict[str, tuple[str, dict[str, Any], str | None, bool]] = {
    "s4d": ("s4d", {}, "conv", False),
    "h3": ("h3", {}, "conv", False),
    "hyena": ("hyena", {}, "conv", True),
    "base_conv": ("base_conv", {}, None, False),
    "base_conv/long": ("base_conv", {"implicit_long_conv": True}, "conv", True),
    "base_conv/long-hyena": ("base_conv", {"implicit_long_conv": True, "long_filter": "hyena"}, "conv", True),
    "rg_lru": ("rg_lru", {}, "scan", False),
    "mamba": ("mamba", {}, None, False),
    "attention": ("attention", {"impl": "sdpa"}, None, False),
}
PEERS = ("hf/RecurrentGemma",)
FAST = {"conv": "fft", "scan": "chunked"}
PATHS = ("fast", "reference")
#: reference paths (direct convolution, per-token loop) are not run beyond this length
SLOW_MAX_T = 2048
#: transformers' RG-LRU is a per-token loop writing into one output tensor, and its backward grows ~T^2
#: (measured here: x14.7 from T = 512 to 2048, 4.9 s; a T = 8192 case did not finish in 15 minutes)
PEER_MAX_T = 2048


# child-process worker -------------------------------------------------------------------------------------

def bench_hf_rglru(*, seq_len: int, repeats: int = 3, batch: int = BATCH, seed: int = 0) -> dict[str, Any]:
    """Forward+backward time and peak memory of transformers' ``RecurrentGemmaRecurrentBlock`` (training mode,
    no cache) at our `rg_lru`'s default width: lru_width round(4/3 d_model), 1 head, conv width 4."""
    import logging

    import torch
    from transformers import RecurrentGemmaConfig
    from transformers.models.recurrent_gemma.modeling_recurrent_gemma import RecurrentGemmaRecurrentBlock

    import archs.mixers  # noqa: F401  (registers the built-ins)
    from experiments.measure import time_and_peak
    from registry import MIXERS

    logging.disable(logging.WARNING)
    width = MIXERS.create("rg_lru", d_model=D_MODEL).width
    cfg = RecurrentGemmaConfig(hidden_size=D_MODEL, lru_width=width, num_attention_heads=1, conv1d_width=4,
                               num_hidden_layers=1, attention_window_size=seq_len)
    torch.manual_seed(seed)
    block = RecurrentGemmaRecurrentBlock(cfg, layer_idx=0).train()

    def make_step(t: int):
        x = torch.randn(batch, t, D_MODEL, requires_grad=True)
        pos = torch.arange(t).expand(batch, t)

        def step() -> None:
            block(x, pos, None, use_cache=False)[0].square().mean().backward()
            x.grad = None
            block.zero_grad(set_to_none=True)

        return step

    out = time_and_peak(make_step(seq_len), repeats=repeats, warmup=make_step(64))
    out.update(seq_len=seq_len, batch=batch, lru_width=width, params=sum(p.numel() for p in block.parameters()))
    return out


# driver ---------------------------------------------------------------------------------------------------

def case_options(layer: str, path: str, t: int) -> tuple[str, dict[str, Any]]:
    name, options, switch, follows_t = LAYERS[layer]
    opts = dict(options)
    if switch is not None:
        opts[switch] = FAST[switch] if path == "fast" else "reference"
    if follows_t:
        opts["l_max"] = t
    return name, opts


def run_case(layer: str, path: str, t: int, threads: int, timeout: float, repeats: int) -> dict[str, Any]:
    row: dict[str, Any] = {"layer": layer, "path": path, "seq_len": t, "threads": threads}
    iso = Isolation(threads=threads, timeout=timeout)
    if path == "reference" and t > SLOW_MAX_T:
        return {**row, "skipped": f"quadratic or per-token reference: run up to T={SLOW_MAX_T}"}
    if layer in PEERS and t > PEER_MAX_T:
        return {**row, "skipped": f"transformers' per-token loop, ~T^2 backward: run up to T={PEER_MAX_T}"}
    try:
        if layer in PEERS:
            import importlib.util

            if importlib.util.find_spec("transformers") is None:
                return {**row, "skipped": "transformers is not installed (see the README's compat set-up)"}
            r = run_isolated("benchmarks.long_conv:bench_hf_rglru", dict(seq_len=t, repeats=repeats), iso)
        else:
            name, opts = case_options(layer, path, t)
            r = run_isolated("experiments.measure:bench_mixer",
                             dict(name=name, options=opts, d_model=D_MODEL, batch=BATCH, seq_len=t, mode=MODE,
                                  repeats=1 if path == "reference" and t >= SLOW_MAX_T else repeats), iso)
    except MeasureError as exc:
        return {**row, "error": str(exc).splitlines()[0][:200]}
    return {**r, **row}


def growth(rows: list[dict[str, Any]], key: str) -> float | None:
    """d log(key) / d log(T) between the two longest measured lengths of one (layer, path)."""
    pts = sorted((r["seq_len"], r[key]) for r in rows if key in r and r[key] > 0)
    if len(pts) < 2:
        return None
    (t0, v0), (t1, v1) = pts[-2], pts[-1]
    return math.log(v1 / v0) / math.log(t1 / t0)


def _exponent(value: float | None) -> str:
    # a peak too small to register (0 MiB above the baseline at toy sizes) has no growth to report
    return "n/a" if value is None else f"{value:.2f}"


def render(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        "# Long-convolution, LTI and gated-RNN layers on CPU: forward+backward time and peak memory",
        "",
        f"Command: `{meta['command']}`  ",
        f"Date: {meta['date']}; machine: {meta['machine']['cpu']}, {meta['machine']['cpu_count']} cores, "
        f"{meta['threads']} torch threads, torch {meta['machine']['torch']}, transformers {meta['transformers']}; "
        f"commit {meta['commit']}.",
        "",
        f"One layer, d_model {D_MODEL}, batch {BATCH}, fp32, forward+backward, each case in a fresh process; time "
        "is the median of the repeats (one repeat for the references at T = 2048); memory is peak RSS above a "
        "post-warm-up baseline. `fast`: FFT long convolution (s4d, h3, hyena, base_conv/long, "
        "base_conv/long-hyena) or chunked scan (rg_lru); `reference`: the direct O(T^2) convolution or the "
        "per-token loop. `vs mamba` = our mamba's time / this row's (above 1: faster than mamba).",
        "",
        "| layer | path | " + " | ".join(f"T={t} (s)" for t in meta["lengths"]) + " | "
        + " | ".join(f"T={t} (MiB)" for t in meta["lengths"]) + f" | vs mamba (T={meta['lengths'][-1]}) |",
        "|---|---|" + "---:|" * (2 * len(meta["lengths"]) + 1),
    ]
    by = {(r["layer"], r["path"], r["seq_len"]): r for r in rows}
    mamba = by.get(("mamba", "fast", meta["lengths"][-1]), {}).get("time_s")
    exponents = []
    for layer in [*LAYERS, *PEERS]:
        for path in PATHS:
            mine = [r for k, r in by.items() if k[:2] == (layer, path)]
            if not mine:
                continue
            cells_t, cells_m = [], []
            for t in meta["lengths"]:
                r = by.get((layer, path, t), {})
                if "time_s" in r:
                    cells_t.append(f"{r['time_s']:.3f}")
                    cells_m.append(f"{r['peak_bytes'] / 2**20:.0f}")
                else:
                    cells_t.append("skipped" if "skipped" in r else f"failed: {r.get('error', 'not run')}")
                    cells_m.append("")
            last = by.get((layer, path, meta["lengths"][-1]), {}).get("time_s")
            vs = f"{mamba / last:.2f}x" if mamba and last else ""
            label = "transformers" if layer in PEERS else path
            lines.append(f"| {layer} | {label} | " + " | ".join(cells_t + cells_m) + f" | {vs} |")
            gt, gm = growth(mine, "time_s"), growth(mine, "peak_bytes")
            if gt is not None or gm is not None:
                exponents.append(f"| {layer} | {label} | {_exponent(gt)} | {_exponent(gm)} |")
    skipped = sorted({r["skipped"] for r in rows if "skipped" in r})
    if skipped:
        lines += ["", "Skipped: " + "; ".join(skipped) + "."]
    lines += ["", "Growth between the two longest lengths each path ran (exponent of T; 1.00 = linear):", "",
              "| layer | path | time | memory |", "|---|---|---:|---:|", *exponents]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.long_conv", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", nargs="+", default=[*LAYERS, *PEERS], choices=[*LAYERS, *PEERS], metavar="LAYER")
    p.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per case (median reported)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per case before it counts as failed")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "long_conv")
    args = p.parse_args(argv)

    rows = []
    for layer in args.layers:
        has_reference = layer in LAYERS and LAYERS[layer][2] is not None
        paths = [q for q in args.paths if q == "fast" or has_reference] or ["fast"]
        for path in paths:
            for t in args.lengths:
                r = run_case(layer, path, t, args.threads, args.timeout, args.repeats)
                rows.append(r)
                msg = (f"{r['time_s']:.3f} s {r['peak_bytes'] / 2**20:8.1f} MiB" if "time_s" in r
                       else r.get("skipped") or r.get("error"))
                print(f"{layer:18s} {path:9s} T={t:5d} {msg}", flush=True)
    meta = run_meta("benchmarks.long_conv", argv, transformers=package_version("transformers"),
                    lengths=args.lengths, threads=args.threads)
    write_results(args.out, rows, meta, render(rows, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
