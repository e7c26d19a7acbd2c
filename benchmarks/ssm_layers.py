"""SSM layers on CPU: forward and forward+backward time and peak memory vs sequence length, against peers.

    python -m benchmarks.ssm_layers                        # writes benchmarks/results/ssm_layers.{md,json}
    python -m benchmarks.ssm_layers --lengths 256 1024 --repeats 2 --out /tmp/ssm

The layer is a Mamba-1 block (d_model 256, d_state 16, d_conv 4, expand 2; in/out projections, convolution
and gate included), batch 4, fp32, 2 threads; every case (path x length x mode) runs in a fresh process
(`experiments.child.run_isolated`). Paths:

- ``mamba/chunked``, ``mamba/reference``: this repository's `mamba` mixer, chunked scan vs plain loop;
- ``hf/MambaMixer``: Hugging Face transformers' ``MambaMixer`` on CPU (its pure-PyTorch fallback), when
  installed; cases that would take minutes are skipped and marked so;
- ``mambapy/pscan``: mambapy's ``MambaBlock`` with its parallel (Blelloch) scan, when installed;
- ``mamba2`` (d_state 64, headdim 64) and ``attention`` (sdpa), by registry name, when registered.

A roofline-style lower bound for the Mamba-1 layer is printed from this machine's measured GEMM rate, exp
rate and memory bandwidth, and each Mamba-1 path's time is shown as a multiple of it.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from benchmarks import run_meta, write_results
from experiments.child import Isolation, run_isolated
from experiments.errors import MeasureError

LAYER = {"d_model": 256, "d_state": 16, "d_conv": 4, "expand": 2}
BATCH = 4
MODES = ("fwd", "fwdbwd")

#: (label, kind, what) — kind "mixer": a registry name and its options; kind "peer": a function below
CASES: list[tuple[str, str, Any]] = [
    ("mamba/chunked", "mixer", ("mamba", {"d_state": 16, "d_conv": 4, "expand": 2, "scan": "chunked"})),
    ("mamba/reference", "mixer", ("mamba", {"d_state": 16, "d_conv": 4, "expand": 2, "scan": "reference"})),
    ("hf/MambaMixer", "peer", "hf"),
    ("mambapy/pscan", "peer", "mambapy"),
    ("mamba2", "mixer", ("mamba2", {"d_state": 64, "headdim": 64})),
    ("attention/sdpa", "mixer", ("attention", {"impl": "sdpa"})),
]
MAMBA1 = ("mamba/chunked", "mamba/reference", "hf/MambaMixer", "mambapy/pscan")

#: peer cases skipped for taking minutes (measured here: transformers' fallback takes ~45 s fwd+bwd at T=256
#: and its backward grows faster than linearly); the longest allowed length per mode
PEER_MAX_T = {("hf", "fwd"): 1024, ("hf", "fwdbwd"): 256}
#: timed runs for peer cases that take most of a minute each (the peak-memory run and a warm run come first)
PEER_REPEATS = {("hf", "fwdbwd"): 1}


# child-process workers ----------------------------------------------------------------------------------

def _peer_module(peer: str, seed: int) -> Any:
    import torch

    torch.manual_seed(seed)
    if peer == "hf":
        from transformers import MambaConfig
        from transformers.models.mamba.modeling_mamba import MambaMixer

        cfg = MambaConfig(hidden_size=LAYER["d_model"], state_size=LAYER["d_state"], conv_kernel=LAYER["d_conv"],
                          expand=LAYER["expand"], use_bias=False, use_conv_bias=True, time_step_rank="auto",
                          num_hidden_layers=1)
        return MambaMixer(cfg, layer_idx=0)
    if peer == "mambapy":
        from mambapy.mamba import MambaBlock, MambaConfig

        cfg = MambaConfig(d_model=LAYER["d_model"], n_layers=1, d_state=LAYER["d_state"], d_conv=LAYER["d_conv"],
                          expand_factor=LAYER["expand"], pscan=True)
        return MambaBlock(cfg)
    raise ValueError(f"unknown peer {peer!r}")


def bench_peer(peer: str, *, seq_len: int, mode: str, repeats: int = 3, batch: int = BATCH,
               seed: int = 0) -> dict[str, Any]:
    """Time and peak memory of a peer's Mamba-1 layer (run it in a fresh process)."""
    import logging

    import torch

    from experiments.measure import time_and_peak

    logging.disable(logging.WARNING)  # transformers warns once per kernel that it falls back to PyTorch
    layer = _peer_module(peer, seed)
    layer.train(mode == "fwdbwd")

    def make_step(t: int):
        x = torch.randn(batch, t, LAYER["d_model"], requires_grad=mode == "fwdbwd")

        def step() -> None:
            if mode == "fwd":
                with torch.no_grad():
                    layer(x)
            else:
                layer(x).float().square().mean().backward()
                x.grad = None
                layer.zero_grad(set_to_none=True)

        return step

    out = time_and_peak(make_step(seq_len), repeats=repeats, warmup=make_step(min(seq_len, 32)))
    out.update(peer=peer, seq_len=seq_len, mode=mode, batch=batch, params=sum(p.numel() for p in layer.parameters()))
    return out


def machine_rates(seconds: float = 0.3) -> dict[str, float]:
    """This machine's fp32 GEMM rate (GFLOP/s), exp rate (Gelem/s, cache-resident) and copy bandwidth (GB/s,
    read + write), best of a few runs each (run it in a fresh process with the benchmark's threads)."""
    import time

    import torch

    def best(fn, reps: int) -> float:
        fn()
        t_best = math.inf
        t_end = time.perf_counter() + seconds
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            t_best = min(t_best, time.perf_counter() - t0)
            if time.perf_counter() > t_end:
                break
        return t_best

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    gemm = 2 * 2048**3 / best(lambda: torch.mm(a, b), 10) / 1e9
    small = torch.randn(1 << 18)  # 1 MiB: in cache
    out = torch.empty_like(small)
    exp = 20 * small.numel() / best(lambda: [torch.exp(small, out=out) for _ in range(20)], 10) / 1e9
    src = torch.ones(64 << 20)  # 256 MiB
    dst = torch.empty_like(src)
    bw = 2 * src.numel() * 4 / best(lambda: dst.copy_(src), 5) / 1e9
    return {"gemm_gflops": gemm, "exp_gelems": exp, "bandwidth_gbs": bw}


# the roofline estimate ------------------------------------------------------------------------------------

def layer_costs(seq_len: int, batch: int = BATCH) -> dict[str, float]:
    """Forward work of the Mamba-1 layer: GEMM FLOPs, exps (one per b, t, e, n) and the bytes a fused
    implementation must move (every activation written once and read once, fp32; the (B, T, E, N) state
    never leaves the cache)."""
    d, n, k = LAYER["d_model"], LAYER["d_state"], LAYER["d_conv"]
    e = LAYER["expand"] * d
    r = math.ceil(d / 16)
    tokens = batch * seq_len
    gemm = 2 * tokens * (d * 2 * e + e * (r + 2 * n) + r * e + e * d)
    # x in, xz out+in, conv out+in, x_dbl out+in, delta out+in, y out+in, out
    per_token = d + 2 * (2 * e) + 2 * e + 2 * (r + 2 * n) + 2 * e + 2 * e + d
    return {"gemm_flops": gemm, "exps": tokens * e * n, "bytes": 4 * tokens * per_token,
            "conv_flops": 2 * tokens * e * k}


def bound_seconds(costs: dict[str, float], rates: dict[str, float], mode: str) -> dict[str, float]:
    """Lower bound: GEMMs at the measured rate + exps at the measured rate + bytes at the measured bandwidth,
    phases not overlapped. Forward+backward: 3x the GEMM FLOPs, the exps twice (the backward recomputes them,
    as mamba-ssm's kernel does), 3x the bytes (activations re-read, their gradients written and read)."""
    f = {"fwd": (1, 1, 1), "fwdbwd": (3, 2, 3)}[mode]
    parts = {"gemm_s": f[0] * costs["gemm_flops"] / (rates["gemm_gflops"] * 1e9),
             "exp_s": f[1] * costs["exps"] / (rates["exp_gelems"] * 1e9),
             "memory_s": f[2] * costs["bytes"] / (rates["bandwidth_gbs"] * 1e9)}
    parts["bound_s"] = sum(parts.values())
    return parts


# driver ---------------------------------------------------------------------------------------------------

def _available(kind: str, what: Any) -> str:
    """"yes", or why the case cannot run here."""
    if kind == "mixer":
        from registry import MIXERS

        return "yes" if what[0] in MIXERS else f"mixer {what[0]!r} is not registered"
    import importlib.util

    module = {"hf": "transformers", "mambapy": "mambapy"}[what]
    return "yes" if importlib.util.find_spec(module) else f"{module} is not installed (pip install {module})"


def run_case(label: str, kind: str, what: Any, seq_len: int, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    row: dict[str, Any] = {"label": label, "seq_len": seq_len, "mode": mode}
    why = _available(kind, what)
    if why != "yes":
        return {**row, "skipped": why}
    if kind == "peer" and seq_len > PEER_MAX_T.get((what, mode), math.inf):
        return {**row, "skipped": f"would take minutes (run only up to T={PEER_MAX_T[(what, mode)]})"}
    try:
        if kind == "mixer":
            name, options = what
            kwargs = dict(name=name, options=options, d_model=LAYER["d_model"], batch=BATCH, seq_len=seq_len,
                          mode=mode, repeats=args.repeats)
            r = run_isolated("experiments.measure:bench_mixer", kwargs,
                             Isolation(threads=args.threads, timeout=args.timeout))
        else:
            repeats = min(args.repeats, PEER_REPEATS.get((what, mode), args.repeats))
            kwargs = dict(peer=what, seq_len=seq_len, mode=mode, repeats=repeats)
            r = run_isolated("benchmarks.ssm_layers:bench_peer", kwargs,
                             Isolation(threads=args.threads, timeout=args.timeout))
    except MeasureError as exc:
        return {**row, "error": str(exc).splitlines()[0][:200]}
    return {**r, **row}


def render(rows: list[dict[str, Any]], rates: dict[str, float], meta: dict[str, Any], lengths: list[int]) -> str:
    by = {(r["label"], r["seq_len"], r["mode"]): r for r in rows}
    lines = [
        "# SSM layers on CPU: time and peak memory, forward and forward+backward",
        "",
        f"Command: `{meta['command']}`  ",
        f"Date: {meta['date']}; machine: {meta['machine']['cpu']}, {meta['machine']['cpu_count']} cores, "
        f"{meta['threads']} torch threads, torch {meta['machine']['torch']}.",
        "",
        f"Layer: Mamba-1, d_model {LAYER['d_model']}, d_state {LAYER['d_state']}, d_conv {LAYER['d_conv']}, "
        f"expand {LAYER['expand']}, batch {BATCH}, fp32; each case in a fresh process; time is the median of "
        "the repeats; memory is peak RSS above a post-warm-up baseline. `mamba2` (d_state 64, headdim 64) and "
        "`attention` (sdpa, 4 heads) are other layers of the same width, for scale.",
        "",
        f"Machine rates (measured): GEMM {rates['gemm_gflops']:.0f} GFLOP/s, exp {rates['exp_gelems']:.2f} "
        f"Gelem/s, copy bandwidth {rates['bandwidth_gbs']:.1f} GB/s. The bound is GEMMs + exp(delta*A) + "
        "activation traffic at those rates (see `bound_seconds`); `x bound` = time / bound.",
        "",
        "| T | path | fwd (s) | fwd x bound | fwd peak (MiB) | fwd+bwd (s) | fwd+bwd x bound | fwd+bwd peak (MiB) "
        "| fwd+bwd vs chunked |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for t in lengths:
        costs = layer_costs(t)
        bounds = {m: bound_seconds(costs, rates, m)["bound_s"] for m in MODES}
        lines.append(f"| {t} | *bound* | {bounds['fwd']:.3f} | 1.0 | | {bounds['fwdbwd']:.3f} | 1.0 | | |")
        ours = by.get(("mamba/chunked", t, "fwdbwd"), {}).get("time_s")
        for label, _, _ in CASES:
            if not any((label, t, m) in by for m in MODES):
                continue  # not asked for in this run (--paths, --modes)
            cells = []
            for m in MODES:
                r = by.get((label, t, m))
                if r is None:  # this mode was not asked for (--modes)
                    cells += ["not run", "", ""]
                elif "time_s" in r:
                    mult = f"{r['time_s'] / bounds[m]:.1f}" if label in MAMBA1 else "-"
                    cells += [f"{r['time_s']:.3f}", mult, f"{r['peak_bytes'] / 2**20:.0f}"]
                else:
                    cells += [f"skipped: {r['skipped']}" if "skipped" in r else f"failed: {r.get('error', '?')}",
                              "", ""]
            r = by.get((label, t, "fwdbwd"), {})
            vs = f"{r['time_s'] / ours:.2f}x" if ours and "time_s" in r else ""
            if all("skipped" in (by.get((label, t, m)) or {}) for m in MODES) and "not" in str(
                    by.get((label, t, "fwd"), {}).get("skipped", "")):
                continue  # not installed / not registered: one note below instead of a row per length
            lines.append(f"| {t} | {label} | " + " | ".join(cells) + f" | {vs} |")
    missing = sorted({f"{r['label']}: {r['skipped']}" for r in rows if "not" in str(r.get("skipped", ""))})
    if missing:
        lines += ["", "Not measured here: " + "; ".join(missing) + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ssm_layers", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096], help="sequence lengths T")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per case (median reported)")
    p.add_argument("--threads", type=int, default=2, help="torch threads in each measuring process")
    p.add_argument("--paths", nargs="+", default=[c[0] for c in CASES], choices=[c[0] for c in CASES],
                   metavar="PATH", help=f"paths to measure (default: all of {', '.join(c[0] for c in CASES)})")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--timeout", type=float, default=1800, help="seconds per case before it counts as failed")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "ssm_layers",
                   help="output path; PATH.md and PATH.json are written")
    args = p.parse_args(argv)

    rates = run_isolated("benchmarks.ssm_layers:machine_rates", {}, Isolation(threads=args.threads, timeout=600))
    print(f"machine: GEMM {rates['gemm_gflops']:.0f} GFLOP/s, exp {rates['exp_gelems']:.2f} Gelem/s, "
          f"bandwidth {rates['bandwidth_gbs']:.1f} GB/s", flush=True)
    for t in args.lengths:
        parts = {m: bound_seconds(layer_costs(t), rates, m) for m in MODES}
        print(f"bound T={t}: " + "; ".join(
            f"{m} {v['bound_s']:.3f} s (gemm {v['gemm_s']:.3f}, exp {v['exp_s']:.3f}, memory {v['memory_s']:.3f})"
            for m, v in parts.items()), flush=True)

    rows = []
    for t in args.lengths:
        for label, kind, what in CASES:
            if label not in args.paths:
                continue
            for mode in args.modes:
                r = run_case(label, kind, what, t, mode, args)
                rows.append(r)
                if "time_s" in r:
                    msg = f"{r['time_s']:.3f} s  {r['peak_bytes'] / 2**20:8.1f} MiB  backend={r.get('backend', '-')}"
                else:
                    msg = r.get("skipped") or r.get("error")
                print(f"T={t:5d} {label:16s} {mode:6s} {msg}", flush=True)

    meta = run_meta("benchmarks.ssm_layers", argv, threads=args.threads,
                    layer={**LAYER, "batch": BATCH, "dtype": "float32"}, rates=rates,
                    bounds={t: {m: bound_seconds(layer_costs(t), rates, m) for m in MODES} for t in args.lengths})
    write_results(args.out, rows, meta, render(rows, rates, meta, args.lengths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
