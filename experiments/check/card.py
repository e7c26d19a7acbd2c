"""A check's report card: ``check.json`` (everything measured, with the settings it was measured with),
``check.md`` (the verdicts and the tables) and the figures (``costs``, ``decode``, ``probe``, PNG and SVG).

The card is written when the check starts (status ``running``: the directory is then known to hold this
check), again after each stage, and last with the final status."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from experiments.check.costs import summarise_costs
from experiments.check.plan import PROBE_TASKS
from experiments.runs import write_json, write_text

if TYPE_CHECKING:
    from experiments.report.figures.base import Canvas

__all__ = ["draw_figures", "render_markdown", "write_card"]

CHANCE = {"mqar": lambda t: 2 / t["options"]["vocab_size"],  # values are half of the vocabulary
          "induction": lambda t: 1 / (t["options"]["vocab_size"] - 1)}  # any content token
MODE_NAMES = {"fwd": "forward", "fwdbwd": "forward+backward", "train": "training step"}


def _n(x: float | None, spec: str = ".3g") -> str:
    return "-" if x is None else format(x, spec)


def _mib(b: float | None) -> str:
    return "-" if b is None else f"{b / 2**20:,.1f}" if b >= 10 * 2**20 else f"{b / 2**20:.3g}"


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows])


def _contract_md(card: dict[str, Any]) -> list[str]:
    checks = card["contract"]
    failed = [c for c in checks if not c["passed"]]
    rows = [[c["name"], "PASS" if c["passed"] else "**FAIL**", c["figure"], c.get("where") or ""] for c in checks]
    verdict = (f"all {len(checks)} checks pass" if not failed
               else f"**{len(failed)} of {len(checks)} checks fail: {', '.join(c['name'] for c in failed)}**")
    return ["## Contract", "", f"{verdict} (`archs.contract`, d_model {card['settings']['d_model']}; the "
            "registry-wide tests run the same checks).", "", _md_table(["check", "verdict", "measured", "where"], rows),
            ""]


def _largest(m: dict[str, Any]) -> str:
    t, how = m.get("max_seq_len"), m.get("max_how")
    top = m.get("longest")
    if how == "extrapolated":  # every measured length fits: say so first, the fit's guess beside it
        return f"≥ {top:,} measured" + ("; memory flat in T" if t is None else f"; fit ~{t:,}")
    if t is None:
        return "none measured fits"
    return f"{t:,}" if how == "measured" else f"≥ {t:,} (all measured fit)"


def _costs_md(card: dict[str, Any]) -> list[str]:
    s = card["settings"]
    summary = card["cost_summary"]
    ref = next((r for r in summary if r["subject"] == "attention"), {})
    scaling = []
    for mode in s["modes"]:
        for r in summary:
            m = r.get(mode) or {}
            base = (ref.get(mode) or {}).get("time_s")
            scaling.append([f"`{r['subject']}`", MODE_NAMES[mode], _n(m.get("seq_len"), ","),
                            _n(m["time_s"] * 1e3 if m.get("time_s") else None),
                            _n(m["time_s"] / base if m.get("time_s") and base else None, ".2f"),
                            _n(m.get("time_exponent"), ".2f"), _mib(m.get("peak_bytes")),
                            _n(m.get("memory_exponent"), ".2f"), _largest(m),
                            ", ".join(map(str, m.get("failed") or [])) or "-"])
    base = (ref.get("decode") or {}).get("ms_per_token")
    decode = []
    for r in summary:
        d = r.get("decode") or {}
        k = d.get("cache_exponent")
        decode.append([f"`{r['subject']}`", _n(d.get("context"), ","), _n(d.get("ms_per_token"), ".3f"),
                       _n(d["ms_per_token"] / base if d.get("ms_per_token") and base else None, ".2f"),
                       "-" if d.get("cache_bytes") is None else f"{d['cache_bytes']:,}",
                       "-" if d.get("state_bytes") is None else f"{d['state_bytes']:,}",
                       "-" if k is None else "constant" if abs(k) < 0.05 else f"∝ L^{k:.2f}",
                       _n(d.get("growth"), ".2f")])
    return ["## Costs", "", f"Batch 1, float32, d_model {s['d_model']}, each point in a fresh process "
            f"({s['threads'] or 'default'} torch threads), the median of {s['repeats']} timed repeats; peak memory "
            "is the high-water mark above a post-warm-up baseline; exponents are least-squares fits over the "
            "points above the noise floor (4 MiB, 2 ms). Every point is in `check.json`.", "",
            "### Time and memory vs T", "", f"At the longest T every model reached; the largest T whose peak fits "
            f"{s['budget_gb']:g} GiB.", "",
            _md_table(["model", "pass", "T", "ms", "× attention", "time ∝ T^k", "peak MiB", "memory ∝ T^k",
                       f"largest T in {s['budget_gb']:g} GiB", "failed at T"], scaling), "",
            "![time and memory vs T](costs.png)", "", "### Decoding", "",
            f"The median of {s['decode_steps']} one-token steps after the longest prefill; the cache's measured "
            "bytes beside the mixer's `state_bytes`; growth: latency at the longest context over the shortest "
            f"(contexts {', '.join(f'{c:,}' for c in s['contexts'])}).", "",
            _md_table(["model", "context", "ms/token", "× attention", "cache bytes", "state_bytes says",
                       "cache vs context", "latency growth"], decode), "", "![decoding vs context](decode.png)", ""]


def _probe_md(card: dict[str, Any]) -> list[str]:
    s = card["settings"]
    rows = []
    for task, by_subject in card["probe"].items():
        for label, r in by_subject.items():
            by = r.get("by_seq_len") or {}
            longer = ", ".join(f"{k}: {v:.3f}" for k, v in by.items() if int(k) != PROBE_TASKS[task]["seq_len"])
            params = f"{r['params']:,}" if r.get("params") else "-"
            rows.append([task, f"`{label}`", params, _n(r.get("accuracy"), ".3f"),
                         str(r.get("target_reached_step") or "-"), longer or "-",
                         f"{r['train_seconds']:.0f}" if r.get("train_seconds") else "-",
                         r["status"] + (f": {r['error'].splitlines()[0]}" if r.get("error") else "")])
    tasks = "; ".join(f"**{t}**: {PROBE_TASKS[t]['what']}" for t in card["probe"])
    return ["## Quality probe", "", f"2 layers, d_model {s['d_model']}, a short convolution of 4 before each mixer, no "
            f"MLP; at most {s['probe_steps']} steps of {s['probe_batch']} sequences at lr {s['probe_lr']:g} "
            f"(warm-up, cosine decay), stopping once test accuracy reaches 0.99; one seed ({s['seed']}). {tasks}. "
            "Accuracy on 128 fixed test sequences; a short probe: it says whether a mixer can learn recall at "
            "all next to the baselines, not how well it would with a tuned budget.", "",
            _md_table(["task", "model", "params", "accuracy", "step reaching 0.99", "accuracy at longer T",
                       "train s", "status"], rows), "", "![accuracy vs step](probe.png)", ""]


def render_markdown(card: dict[str, Any]) -> str:
    m = card["machine"]
    lines = [f"# Report card: `{card['label']}`", "", f"Command: `{card['command']}` — {card['date']}, {m['cpu']}, "
             f"{m['cpu_count']} CPUs, torch {m['torch']}; mixer source {card['settings']['code']}. Status: "
             f"**{card['status']}**.", ""]
    lines += _contract_md(card)
    if card.get("costs") is not None:
        lines += _costs_md(card)
    if card.get("probe") is not None:
        lines += _probe_md(card)
    if card["settings"].get("contract_only") or (card.get("costs") is None and card["status"] == "complete"):
        lines += ["Costs and the quality probe were not run (`--contract-only`).", ""]
    return "\n".join(lines)


def write_card(out: Path, card: dict[str, Any]) -> None:
    """(Re)write ``check.json`` and ``check.md``; draw the figures once costs or probe results exist."""
    if card.get("costs") is not None:
        card["cost_summary"] = summarise_costs(card["costs"])
    if card.get("costs") is not None or card.get("probe") is not None:
        card["figures"] = draw_figures(out, card)
    write_json(out / "check.json", card)
    write_text(out / "check.md", render_markdown(card))


def draw_figures(out: Path, card: dict[str, Any]) -> list[str]:
    """``costs``, ``decode`` and ``probe`` figures (PNG and SVG) for what the card holds; their file names."""
    import matplotlib
    import matplotlib.style

    from experiments.report.figures.base import STYLE, Canvas

    canvas = Canvas(out, card["subjects"], [])
    with matplotlib.rc_context():
        matplotlib.style.use("default")
        matplotlib.rcParams.update(STYLE)
        if card.get("costs") is not None:
            _costs_figure(canvas, card)
            _decode_figure(canvas, card)
        if card.get("probe") is not None:
            _probe_figure(canvas, card)
    return sorted(p.name for p in canvas.paths.values())


def _finish(canvas: Canvas, axes: Any, xs: list[float], xlabel: str, ylabels: list[str], log_y: bool = True,
            bytes_axis: int | None = None) -> None:
    from experiments.report.figures.base import legend, length_axis, log_axis, si

    for i, (ax, ylabel) in enumerate(zip(axes, ylabels, strict=True)):
        if xs:
            length_axis(ax, xs)
        if log_y:
            log_axis(ax, "y", si if i == bytes_axis else lambda v: f"{v:.3g}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        legend(ax)


def _costs_figure(canvas: Canvas, card: dict[str, Any]) -> None:
    fig, axes = canvas.new(ncols=2, size=(6.0, 4.6))
    styles = {"fwd": "--", "fwdbwd": "-", "train": ":"}
    xs = []
    for label, by_mode in card["costs"]["scaling"].items():
        for mode, result in by_mode.items():
            ok = [r for r in result["rows"] if r.get("status") == "ok"]
            xs += [r["seq_len"] for r in ok]
            kw = {"color": canvas.colour(label), "ls": styles.get(mode, "-"), "marker": canvas.markers[label], "ms": 4,
                  "label": f"{label}, {MODE_NAMES[mode]}"}
            if ok:
                axes[0].plot([r["seq_len"] for r in ok], [r["time_s"] * 1e3 for r in ok], **kw)
                axes[1].plot([r["seq_len"] for r in ok], [r["peak_bytes"] / 2**20 for r in ok], **kw)
    _finish(canvas, axes, xs, "sequence length T (tokens, log scale)",
            ["time (ms, log scale)", "peak memory above baseline (MiB, log scale)"])
    axes[0].set_title(f"Time vs T (batch 1, d_model {card['settings']['d_model']})")
    axes[1].set_title("Peak memory vs T")
    canvas.save(fig, "costs")


def _decode_figure(canvas: Canvas, card: dict[str, Any]) -> None:
    fig, axes = canvas.new(ncols=2, size=(6.0, 4.6))
    xs = []
    for label, result in card["costs"]["decode"].items():
        ok = [r for r in result["rows"] if r.get("status") == "ok"]
        xs += [r["context"] for r in ok]
        kw = {"color": canvas.colour(label), "marker": canvas.markers[label], "ms": 4, "label": label}
        if ok:
            axes[0].plot([r["context"] for r in ok], [r["latency_s"] * 1e3 for r in ok], **kw)
            axes[1].plot([r["context"] for r in ok], [max(r["cache_bytes"], 1) for r in ok], **kw)
    _finish(canvas, axes, xs, "context length (tokens, log scale)",
            ["decoding latency (ms/token, log scale)", "cache/state (bytes, log scale)"], bytes_axis=1)
    axes[0].set_title("Per-token decoding latency vs context")
    axes[1].set_title("Decoding cache vs context")
    canvas.save(fig, "decode")


def _probe_figure(canvas: Canvas, card: dict[str, Any]) -> None:
    tasks = list(card["probe"])
    fig, axes = canvas.new(ncols=len(tasks), size=(6.0 if len(tasks) > 1 else 7.5, 4.6))
    for ax, task in zip(axes, tasks, strict=True):
        for label, r in card["probe"][task].items():
            pts = [(s, a) for s, a in r.get("curve", []) if a is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), color=canvas.colour(label), marker=canvas.markers[label], ms=3,
                        label=label)
        ax.axhline(0.99, color="grey", ls=":", lw=1, label="0.99 (stop)")
        ax.axhline(CHANCE[task](PROBE_TASKS[task]), color="grey", ls="--", lw=1, label="chance")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"{task}: test accuracy vs training step")
    _finish(canvas, axes, [], "training step", ["test accuracy"] * len(tasks), log_y=False)
    canvas.save(fig, "probe")
