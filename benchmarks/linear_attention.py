"""Linear-attention layers on CPU: forward+backward time and peak memory vs sequence length, against the only
thing a CPU user of flash-linear-attention can run — its pure-PyTorch references — on the same weights.

    python -m benchmarks.linear_attention                    # writes benchmarks/results/linear_attention.{md,json}
    python -m benchmarks.linear_attention --layers gla --lengths 512 --threads 1 --out /tmp/la

One layer at d_model 256 in fla's default head layout (gated_deltanet: 4 heads of 64, expand_v 2), batch 4,
fp32; every case (layer x path x length x threads) runs in a fresh process (`experiments.child.run_isolated`).
Paths, for each of ``gla``, ``deltanet``, ``gated_deltanet``, ``retention``, ``linear_attention``, ``based``:

- ``chunked``, ``reference``: this repository's mixer, chunked op vs per-token loop;
- ``fla/recurrent`` (``fla/parallel`` for retention and based, whose only fla reference is the quadratic
  parallel form), ``fla/chunk`` (its naive chunked form, where fla 0.6 has one): fla's own layer, built with
  the same seed (so the same weights: tested), its kernels routed to ``fla/ops/*/naive.py``
  (`benchmarks.fla_cpu`);
- ``mamba``, ``mamba2`` (d_state 64, headdim 64) and ``attention`` (sdpa) at the same width, for scale.

Per-token loops and quadratic forms are not run at T = 8192 (minutes per case; marked). The bound is this
machine's measured GEMM rate applied to 3x the layer's analytic forward FLOPs, plus 3x the bytes of the
activations autograd saves (written once, read back, their gradients written) at the measured copy bandwidth.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from benchmarks import package_version, run_meta, write_results
from experiments.child import Isolation, run_isolated
from experiments.errors import MeasureError

D_MODEL, BATCH, MODE = 256, 4, "fwdbwd"

#: our mixer -> (fla layer class, options for both)
LAYERS: dict[str, tuple[str, dict[str, Any]]] = {
    "gla": ("GatedLinearAttention", {}),
    "deltanet": ("DeltaNet", {}),
    "gated_deltanet": ("GatedDeltaNet", {"head_dim": 64, "num_heads": 4}),
    "retention": ("MultiScaleRetention", {}),
    "linear_attention": ("LinearAttention", {}),
    "based": ("BasedLinearAttention", {}),
}
SCALE: dict[str, tuple[str, dict[str, Any]]] = {
    "mamba": ("mamba", {}),
    "mamba2": ("mamba2", {"d_state": 64, "headdim": 64}),
    "attention/sdpa": ("attention", {"impl": "sdpa"}),
}
PATHS = ("chunked", "reference", "fla/recurrent", "fla/chunk")
#: paths that are per-token loops or quadratic in T: not run beyond this length
SLOW_MAX_T = 2048
#: timed runs for the slowest cases (each takes most of a minute at T = 2048)
SLOW_REPEATS = 1


def fla_label(layer: str, path: str) -> str:
    return "fla/parallel" if path == "fla/recurrent" and layer in ("retention", "based") else path


# child-process workers ----------------------------------------------------------------------------------

def bench_fla(layer: str, options: dict[str, Any], ops: str, *, seq_len: int, repeats: int = 3,
              batch: int = BATCH, seed: int = 0) -> dict[str, Any]:
    """Forward+backward time and peak memory of fla's layer with its kernels routed to its naive references."""
    import warnings

    import torch

    from benchmarks.fla_cpu import install
    from experiments.measure import time_and_peak

    warnings.filterwarnings("ignore")
    layers = install(ops=ops)
    torch.manual_seed(seed)
    module = getattr(layers, layer)(hidden_size=D_MODEL, **options)

    def make_step(t: int):
        x = torch.randn(batch, t, D_MODEL, requires_grad=True)

        def step() -> None:
            y = module(x)
            (y[0] if isinstance(y, tuple) else y).square().mean().backward()
            x.grad = None
            module.zero_grad(set_to_none=True)

        return step

    out = time_and_peak(make_step(seq_len), repeats=repeats, warmup=make_step(64))
    out.update(layer=layer, ops=ops, seq_len=seq_len, batch=batch)
    return out


def saved_bytes(name: str, options: dict[str, Any], *, seq_len: int, batch: int = BATCH) -> dict[str, Any]:
    """Bytes of the activations autograd saves in one forward of our chunked mixer, and its analytic FLOPs."""
    import torch

    import archs.mixers  # noqa: F401  (registers the built-ins)
    from experiments.measure import SavedActivations
    from registry import MIXERS

    torch.manual_seed(0)
    m = MIXERS.create(name, d_model=D_MODEL, **options)
    x = torch.randn(batch, seq_len, D_MODEL, requires_grad=True)
    with SavedActivations(m) as saved:
        m(x)
    return {"saved_bytes": saved.bytes, "flops_per_token": m.flops_per_token(seq_len)}


# driver ---------------------------------------------------------------------------------------------------

def bound_s(traffic: dict[str, Any], rates: dict[str, float], seq_len: int) -> float:
    tokens = BATCH * seq_len
    gemm = 3 * traffic["flops_per_token"] * tokens / (rates["gemm_gflops"] * 1e9)
    memory = 3 * traffic["saved_bytes"] / (rates["bandwidth_gbs"] * 1e9)
    return gemm + memory


def run_case(layer: str, path: str, t: int, threads: int, timeout: float, repeats: int) -> dict[str, Any]:
    fla_layer, options = LAYERS.get(layer, (None, {}))
    row: dict[str, Any] = {"layer": layer, "path": fla_label(layer, path), "seq_len": t, "threads": threads}
    iso = Isolation(threads=threads, timeout=timeout)
    slow = path in ("reference", "fla/recurrent")
    if slow and t > SLOW_MAX_T:
        return {**row, "skipped": f"per-token loop or quadratic form: minutes per case (run up to T={SLOW_MAX_T})"}
    try:
        if path in ("chunked", "reference"):
            name, opts = (layer, {**options, "impl": path}) if layer in LAYERS else SCALE[layer]
            kw = dict(name=name, options=opts, d_model=D_MODEL, batch=BATCH, seq_len=t, mode=MODE,
                      repeats=min(repeats, SLOW_REPEATS) if slow and t >= SLOW_MAX_T else repeats)
            r = run_isolated("experiments.measure:bench_mixer", kw, iso)
        else:
            import importlib.util

            if importlib.util.find_spec("fla") is None:
                return {**row, "skipped": "flash-linear-attention is not installed (see the README's compat set-up)"}
            from benchmarks.fla_cpu import CHUNKED_LAYERS

            if path == "fla/chunk" and fla_layer not in CHUNKED_LAYERS:
                return {**row, "skipped": "fla 0.6 has no pure-PyTorch chunked form for this layer"}
            kw = dict(layer=fla_layer, options=options, ops=path.split("/")[1], seq_len=t,
                      repeats=min(repeats, SLOW_REPEATS) if slow and t >= SLOW_MAX_T else repeats)
            r = run_isolated("benchmarks.linear_attention:bench_fla", kw, iso)
    except MeasureError as exc:
        return {**row, "error": str(exc).splitlines()[0][:200]}
    return {**r, **row}


def render(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    rates = meta["rates"]
    lines = [
        "# Linear-attention layers on CPU: forward+backward time and peak memory",
        "",
        f"Command: `{meta['command']}`  ",
        f"Date: {meta['date']}; machine: {meta['machine']['cpu']}, {meta['machine']['cpu_count']} cores, "
        f"torch {meta['machine']['torch']}, fla {meta['fla']}.",
        "",
        f"One layer, d_model {D_MODEL}, fla's default head layout (gated_deltanet: 4 heads of 64), batch {BATCH}, "
        "fp32, forward+backward; each case in a fresh process; time is the median of the repeats (one repeat "
        "for the per-token loops at T = 2048); memory is peak RSS above a post-warm-up baseline. "
        f"Machine rates (measured, per thread count): {meta['rates_text']}. `x bound` = time / (3 x analytic "
        "forward FLOPs at the GEMM rate + 3 x saved-activation bytes at the copy bandwidth); `vs fla` = the "
        "fastest fla path's time / ours (chunked).",
        "",
        "| layer | T | threads | path | fwd+bwd (s) | peak (MiB) | x bound | vs fla |",
        "|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    by = {(r["layer"], r["seq_len"], r["threads"], r["path"]): r for r in rows}
    order = {p: i for i, p in enumerate(("chunked", "reference", "fla/recurrent", "fla/parallel", "fla/chunk"))}
    for layer in [*LAYERS, *SCALE]:
        for t in meta["lengths"]:
            for th in meta["threads"]:
                mine = [r for k, r in by.items() if k[:3] == (layer, t, th)]
                ours = by.get((layer, t, th, "chunked"), {}).get("time_s")
                fla = [r["time_s"] for r in mine if r["path"].startswith("fla/") and "time_s" in r]
                traffic = meta["traffic"].get(f"{layer}/{t}")
                for r in sorted(mine, key=lambda r: order.get(r["path"], 9)):
                    if "time_s" in r:
                        cells = [f"{r['time_s']:.3f}", f"{r['peak_bytes'] / 2**20:.0f}"]
                        b = bound_s(traffic, rates[str(th)], t) if traffic and r["path"] == "chunked" else None
                        cells.append(f"{r['time_s'] / b:.1f}" if b else "")
                        cells.append(f"{min(fla) / ours:.1f}x" if r["path"] == "chunked" and fla and ours else "")
                    else:
                        why = r.get("skipped") or f"failed: {r.get('error', '?')}"
                        cells = [why, "", "", ""]
                    path = r["path"] if layer in LAYERS else "chunked (ours)" if layer != "attention/sdpa" else "sdpa"
                    lines.append(f"| {layer} | {t} | {th} | {path} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.linear_attention", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", nargs="+", default=[*LAYERS, *SCALE], choices=[*LAYERS, *SCALE], metavar="LAYER")
    p.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=3, help="timed runs per case (median reported)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per case before it counts as failed")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "linear_attention")
    args = p.parse_args(argv)

    rates = {str(th): run_isolated("benchmarks.ssm_layers:machine_rates", {},
                                   Isolation(threads=th, timeout=600)) for th in args.threads}
    traffic = {f"{layer}/{t}": run_isolated("benchmarks.linear_attention:saved_bytes",
                                            dict(name=layer, options={**LAYERS[layer][1], "impl": "chunked"},
                                                 seq_len=t), Isolation(threads=1, timeout=600))
               for layer in args.layers if layer in LAYERS for t in args.lengths}
    rows = []
    for layer in args.layers:
        paths = args.paths if layer in LAYERS else ["chunked"]
        for t in args.lengths:
            for th in args.threads:
                for path in paths:
                    r = run_case(layer, path, t, th, args.timeout, args.repeats)
                    rows.append(r)
                    msg = (f"{r['time_s']:.3f} s {r['peak_bytes'] / 2**20:8.1f} MiB" if "time_s" in r
                           else r.get("skipped") or r.get("error"))
                    print(f"{layer:18s} T={t:5d} threads={th} {r['path']:14s} {msg}", flush=True)
    meta = run_meta("benchmarks.linear_attention", argv, fla=package_version("flash-linear-attention"),
                    lengths=args.lengths, threads=args.threads, rates=rates,
                    rates_text="; ".join(f"{th} thread(s): GEMM {r['gemm_gflops']:.0f} GFLOP/s, copy "
                                         f"{r['bandwidth_gbs']:.1f} GB/s" for th, r in rates.items()),
                    traffic=traffic)
    write_results(args.out, rows, meta, render(rows, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
