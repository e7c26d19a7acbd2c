"""The SSM-layer benchmark's Markdown: what was measured, what failed, and nothing about what was not asked."""

from benchmarks.ssm_layers import render

META = {"command": "python -m benchmarks.ssm_layers", "date": "2026-11-29",
        "machine": {"cpu": "test cpu", "cpu_count": 2, "torch": "2.13.0"}, "threads": 2}
RATES = {"gemm_gflops": 100.0, "exp_gelems": 2.0, "bandwidth_gbs": 40.0}


def row(label, mode, **result):
    return {"label": label, "seq_len": 256, "mode": mode, **result}


def test_render_lists_measured_and_failed_paths_only():
    rows = [row("mamba/chunked", "fwd", time_s=0.01, peak_bytes=2**20),
            row("mamba/chunked", "fwdbwd", time_s=0.03, peak_bytes=2**21),
            row("mamba2", "fwd", error="out of memory"), row("mamba2", "fwdbwd", error="out of memory")]
    md = render(rows, RATES, META, [256])
    lines = [line for line in md.splitlines() if line.startswith("| 256 |")]
    assert [line.split(" | ")[1] for line in lines] == ["*bound*", "mamba/chunked", "mamba2"]
    assert "| 0.030 |" in lines[1] and "failed: out of memory" in lines[2]
    assert "attention/sdpa" not in md and "mambapy" not in md  # not asked for in this run


def test_a_mode_not_asked_for_is_not_run_not_failed():
    """`--modes fwdbwd`: the forward cells say "not run", not "failed: ?"."""
    rows = [row("mamba/chunked", "fwdbwd", time_s=0.03, peak_bytes=2**21)]
    (line,) = [x for x in render(rows, RATES, META, [256]).splitlines() if x.startswith("| 256 | mamba/chunked")]
    assert "failed" not in line and line.split(" | ")[2] == "not run" and "| 0.030 |" in line
