"""The long-convolution benchmark end to end at a toy size: fast and reference paths measured in fresh
processes with the path option they name, a reference past its length limit skipped and said, and the
growth exponents and the mamba ratio computed from what was measured."""

import json
import math

import pytest

from benchmarks.long_conv import case_options, main


def test_each_path_sets_its_option_and_the_filter_length_follows_t():
    assert case_options("hyena", "fast", 96) == ("hyena", {"conv": "fft", "l_max": 96})
    assert case_options("rg_lru", "reference", 64) == ("rg_lru", {"scan": "reference"})
    assert case_options("base_conv/long", "reference", 64) == (
        "base_conv", {"implicit_long_conv": True, "conv": "reference", "l_max": 64})
    assert case_options("base_conv", "fast", 64) == ("base_conv", {})


def test_a_tiny_run_writes_its_table(tmp_path, monkeypatch):
    monkeypatch.setattr("benchmarks.long_conv.SLOW_MAX_T", 32)
    out = tmp_path / "lc"
    assert main(["--layers", "s4d", "base_conv", "mamba", "--lengths", "32", "64", "--repeats", "1",
                 "--threads", "1", "--out", str(out)]) == 0
    data = json.loads(out.with_name("lc.json").read_text())
    rows = {(r["layer"], r["path"], r["seq_len"]): r for r in data["rows"]}
    assert rows[("s4d", "fast", 64)]["backend"] == "fft"
    assert rows[("s4d", "reference", 32)]["backend"] == "reference"
    assert "run up to T=32" in rows[("s4d", "reference", 64)]["skipped"]
    assert ("base_conv", "reference", 32) not in rows  # a short convolution has one path
    md = out.with_name("lc.md").read_text()
    fast = [rows[("s4d", "fast", t)] for t in (32, 64)]
    expo = math.log(fast[1]["time_s"] / fast[0]["time_s"]) / math.log(2)
    (line,) = [x for x in md.splitlines() if x.startswith("| s4d | fast | ") and x.count("|") == 5]
    assert line.split("|")[3].strip() == f"{expo:.2f}"
    (row,) = [x for x in md.splitlines() if x.startswith("| s4d | fast | ") and x.count("|") > 5]
    ratio = rows[("mamba", "fast", 64)]["time_s"] / fast[1]["time_s"]
    assert row.rstrip(" |").endswith(f"{ratio:.2f}x")


def test_hugging_face_rglru_runs_as_the_peer():
    pytest.importorskip("transformers.models.recurrent_gemma")
    from benchmarks.long_conv import bench_hf_rglru

    r = bench_hf_rglru(seq_len=16, repeats=1, batch=1)
    assert r["time_s"] > 0 and r["lru_width"] == round(4 / 3 * 256)


def test_an_unmeasurable_memory_growth_is_said_not_crashed_on():
    from benchmarks.long_conv import render

    rows = [{"layer": "s4d", "path": "fast", "seq_len": t, "time_s": s, "peak_bytes": 0}
            for t, s in ((32, 0.01), (64, 0.02))]
    meta = {"command": "c", "date": "d", "machine": {"cpu": "x", "cpu_count": 2, "torch": "t"}, "threads": 1,
            "transformers": "v", "commit": "h", "lengths": [32, 64]}
    (line,) = [x for x in render(rows, meta).splitlines() if x.startswith("| s4d | fast | ") and x.count("|") == 5]
    assert [c.strip() for c in line.split("|")[3:5]] == ["1.00", "n/a"]
