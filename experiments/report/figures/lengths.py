"""Long-context figures from the trials' measurements: peak memory and time vs sequence length, decoding
latency and cache vs context, and loss vs evaluation length."""

from __future__ import annotations

from experiments.report.figures.base import Canvas, Context, figure, labeller, legend, length_axis, log_log_pair
from experiments.report.records import decode_rows, loss_len_rows, memory_rows, num


@figure("memory_time_vs_len", 40)
def memory_time_vs_len(ctx: Context, canvas: Canvas) -> str | None:
    mem = [(r, m) for r in ctx.rows if (m := memory_rows(ctx.record(r)))]
    if not mem:
        return "no trial has measure.memory"
    curves, fits = [], len(mem) <= 10  # exponents in the legend while it stays readable
    for r, m in mem:
        mem_pts = [(p["seq_len"], p["peak_bytes"] / 2**20) for p in m if num(p.get("peak_bytes"))]
        time_pts = [(p["seq_len"], p["time_s"]) for p in m if num(p.get("time_s"))]
        suffixes = [f" ($\\propto T^{{{k:.2f}}}$)" if fits and k is not None else ""
                    for k in (r.get("memory_exponent"), r.get("time_exponent"))]
        curves.append((r, list(zip((mem_pts, time_pts), suffixes, strict=True))))
    log_log_pair(canvas, "memory_time_vs_len", curves, [p["seq_len"] for _, m in mem for p in m],
                 "sequence length T (tokens, log scale)",
                 (("peak memory (MiB)", "Peak memory vs sequence length"),
                  ("time per step (s)", "Time vs sequence length")))
    return None


@figure("decode_vs_context", 50)
def decode_vs_context(ctx: Context, canvas: Canvas) -> str | None:
    dec = [(r, d) for r in ctx.rows if (d := decode_rows(ctx.record(r)))]
    if not dec:
        return "no trial has measure.decode"
    curves = [(r, [([(p["context"], p["latency_ms"]) for p in d if p["latency_ms"] is not None], ""),
                   ([(p["context"], p["cache_bytes"] / 2**20) for p in d if p["cache_bytes"]], "")])
              for r, d in dec]
    log_log_pair(canvas, "decode_vs_context", curves, [p["context"] for _, d in dec for p in d],
                 "context length (tokens, log scale)",
                 (("decode latency (ms/token)", "Per-token decoding latency vs context"),
                  ("cache/state size (MiB)", "Decoding cache vs context")))
    return None


@figure("loss_vs_len", 60)
def loss_vs_len(ctx: Context, canvas: Canvas) -> str | None:
    lvl = [(r, d) for r in ctx.rows if (d := loss_len_rows(ctx.record(r)))]
    if not lvl:
        return "no trial has measure.context (loss vs length)"
    fig, (ax,) = canvas.new()
    train_lens = set()
    label = labeller(len(lvl))
    for r, d in lvl:
        ax.plot([p["seq_len"] for p in d], [p["loss"] for p in d], color=canvas.colour(r["family"]),
                marker=canvas.markers[r["family"]], ms=4, lw=canvas.width(r), label=label(r))
        seq = (ctx.record(r).config.get("train") or {}).get("seq_len")
        if seq:
            train_lens.add(seq)
    for i, t in enumerate(sorted(train_lens)):
        ax.axvline(t, color="grey", ls=":", lw=1, label="training length" if i == 0 else None)
    length_axis(ax, [p["seq_len"] for _, d in lvl for p in d])
    ax.set_xlabel("evaluation length (tokens, log scale)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("Loss vs evaluation length (extrapolation beyond the training length)")
    legend(ax)
    canvas.save(fig, "loss_vs_len")
    return None
