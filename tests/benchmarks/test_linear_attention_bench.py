"""The linear-attention benchmark end to end at a toy size: our chunked layer and fla's recurrent reference
measured on the same weights in fresh processes, the skipped and the missing said, and the Markdown's
ratio and bound computed from what was measured."""

import json

from benchmarks.linear_attention import main


def test_a_tiny_run_writes_its_table(tmp_path):
    out = tmp_path / "la"
    assert main(["--layers", "gla", "mamba2", "--paths", "chunked", "fla/recurrent", "fla/chunk",
                 "--lengths", "64", "--threads", "1", "--repeats", "1", "--out", str(out)]) == 0
    data = json.loads(out.with_name("la.json").read_text())
    rows = {(r["layer"], r["path"]): r for r in data["rows"]}
    ours = rows[("gla", "chunked")]
    assert ours["time_s"] > 0 and ours["backend"] == "chunked"
    assert "no pure-PyTorch chunked form" in rows[("gla", "fla/chunk")]["skipped"]
    fla = rows[("gla", "fla/recurrent")]
    md = out.with_name("la.md").read_text()
    (line,) = [x for x in md.splitlines() if x.startswith("| gla | 64 | 1 | chunked |")]
    if "time_s" in fla:  # fla installed: the ratio is theirs over ours
        assert line.endswith(f"| {fla['time_s'] / ours['time_s']:.1f}x |")
    else:
        assert "not installed" in fla["skipped"]
    assert "| mamba2 | 64 | 1 | chunked (ours) |" in md
    assert data["meta"]["traffic"]["gla/64"]["saved_bytes"] > 0
