"""Attention layers, forward+backward: time and peak memory vs sequence length, each case in a fresh process.

    python -m benchmarks.attention            # writes benchmarks/results/attention.{md,json}
    python -m benchmarks.attention --cases alibi --lengths 1024 --out /tmp/alibi   # a subset

The layer is the full mixer (QKV and output projections included): d_model 256 = 4 heads x head dim 64,
batch 1, fp32, 2 threads. ``attention/math`` materialises the (T, T) softmax; ``attention/sdpa`` calls
torch's fused kernel; ``xformers_attention`` runs its CPU path here (torch's flash kernel), the xformers
kernel on CUDA. The ALiBi rows add a per-head bias (an explicit mask for SDPA); the sliding-window rows
(window 256) compare our chunked kernel with masked SDPA. "memory vs math" divides by the math row of the
same attention (with ALiBi for ALiBi; full causal attention for the windows).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

from experiments.child import Isolation, run_isolated
from experiments.errors import MeasureError
from experiments.runs import machine_info

# label, mixer, options, the row whose memory is the "math" baseline
CASES = [
    ("attention/math", "attention", {"impl": "math"}, "attention/math"),
    ("attention/sdpa", "attention", {"impl": "sdpa"}, "attention/math"),
    ("xformers_attention", "xformers_attention", {}, "attention/math"),
    ("attention/math, ALiBi", "attention", {"impl": "math", "positions": "alibi"}, "attention/math, ALiBi"),
    ("attention/sdpa, ALiBi", "attention", {"impl": "sdpa", "positions": "alibi"}, "attention/math, ALiBi"),
    ("sliding_window/chunked", "sliding_window_attention", {"impl": "chunked", "window": 256}, "attention/math"),
    ("sliding_window/sdpa", "sliding_window_attention", {"impl": "sdpa", "window": 256}, "attention/math"),
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 8192])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--cases", nargs="+", default=None, metavar="TEXT",
                   help="only the cases whose label contains one of these (case-insensitive), e.g. alibi window")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "attention")
    args = p.parse_args(argv)
    cases = [c for c in CASES if args.cases is None or any(w.lower() in c[0].lower() for w in args.cases)]
    if not cases:
        p.error(f"no case matches {args.cases}; cases: {', '.join(c[0] for c in CASES)}")

    rows = []
    for t in args.lengths:
        for label, name, opts, _ in cases:
            kwargs = dict(name=name, options={**opts, "n_heads": 4}, d_model=256, batch=1, seq_len=t,
                          mode="fwdbwd", repeats=args.repeats, device=args.device)
            try:
                r = run_isolated("experiments.measure:bench_mixer", kwargs,
                                 Isolation(threads=args.threads, timeout=1800))
            except MeasureError as exc:
                r = {"error": str(exc).splitlines()[0]}
            r.update(label=label, seq_len=t)
            rows.append(r)
            print(f"T={t:6d} {label:22s} " + (f"{r['time_s']:.3f} s  {r['peak_bytes'] / 2**20:9.1f} MiB  "
                                                f"backend={r['backend']}" if "error" not in r else r["error"]),
                  flush=True)

    cmd = "python -m benchmarks.attention " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = {"command": cmd.strip(), "date": datetime.date.today().isoformat(), "machine": machine_info(),
            "threads": args.threads}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [
        "# Attention layers: forward+backward time and peak memory",
        "",
        f"Command: `{meta['command']}` — {meta['date']}, {meta['machine']['cpu']}, "
        f"{args.threads} threads, torch {meta['machine']['torch']}.",
        "Layer: d_model 256 (4 heads x 64), batch 1, fp32, projections included; each case in a fresh process; "
        "time is the median of the repeats; memory is peak RSS above a post-warm-up baseline.",
        "",
        "| T | layer | backend | fwd+bwd (s) | peak memory (MiB) | memory vs math |",
        "|---:|---|---|---:|---:|---:|",
    ]
    for t in args.lengths:
        by = {r["label"]: r for r in rows if r["seq_len"] == t}
        for label, _, _, baseline in cases:
            r, base = by[label], by.get(baseline, {}).get("peak_bytes")
            if "error" in r:
                lines.append(f"| {t} | {label} | - | failed: {r['error']} | | |")
                continue
            ratio = f"{r['peak_bytes'] / base:.3f}" if base else "-"
            lines.append(f"| {t} | {label} | {r['backend']} | {r['time_s']:.3f} | "
                         f"{r['peak_bytes'] / 2**20:.1f} | {ratio} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
