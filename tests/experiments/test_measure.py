"""Measurement and long-context probes: the memory method, the fits, isolation, the probes and the CLI.

Tiny sizes only; no timing is asserted (the machines are shared). Run directories are written by hand in
the format `experiments.train` writes (spec.json with model/train/data, checkpoint.pt with the weights).
"""

import json
import math

import pytest
import torch

from archs.model import LanguageModel, ModelSpec
from experiments.child import run_isolated
from experiments.cli import main
from experiments.errors import MeasureError
from experiments.fits import fit_power_law, max_length_for_budget
from experiments.measure import PeakMemory, bench, bench_decode
from experiments.probes import decode_probe, loss_vs_length, scaling_probe, task_accuracy_vs_length
from experiments.targets import resolve_target
from registry import MIXERS

MiB = 2**20


def make_run(path, spec: ModelSpec, data: dict, seq_len: int = 32):
    """A run directory as `train` leaves it (untrained weights are enough for shapes)."""
    path.mkdir(parents=True)
    torch.manual_seed(0)
    model = LanguageModel(spec)
    (path / "spec.json").write_text(json.dumps({"model": spec.to_dict(), "train": {"seq_len": seq_len},
                                                "data": data}))
    torch.save({"model": model.state_dict(), "step": 0}, path / "checkpoint.pt")
    return path


@pytest.fixture(scope="module")
def corpus_run(tmp_path_factory):
    spec = ModelSpec(positions="learned", max_seq_len=64, d_model=32, n_layers=1, n_heads=2)
    return make_run(tmp_path_factory.mktemp("runs") / "corpus", spec, {"corpus": "stdlib", "task": None, "options": {}})


@pytest.fixture(scope="module")
def task_run(tmp_path_factory):
    spec = ModelSpec(vocab_size=16, positions="learned", max_seq_len=64, d_model=32, n_layers=1, n_heads=2)
    data = {"corpus": None, "task": "induction", "options": {"test_multipliers": [1, 2, 4]}}
    return make_run(tmp_path_factory.mktemp("runs") / "task", spec, data)


def cli(argv):
    return main(["measure", *argv])


# the memory method ------------------------------------------------------------------------------------------
def test_peak_memory_sees_a_known_allocation():
    with PeakMemory() as pm:
        t = torch.ones(50 * MiB)  # 200 MiB, touched
        del t
    assert abs(pm.peak_bytes - 200 * MiB) < 16 * MiB, pm.peak_bytes / MiB
    assert pm.method.startswith("VmHWM")


def test_calibrate_in_a_fresh_process():
    r = run_isolated("experiments.measure:calibrate", {"nbytes": 200 * MiB})
    assert abs(r["peak_bytes"] - 200 * MiB) < 16 * MiB, r


def test_run_isolated_raises_the_childs_error(tmp_path):
    with pytest.raises(MeasureError) as exc:
        run_isolated("experiments.runs:load_run", {"run_dir": str(tmp_path / "nowhere")})
    msg = str(exc.value)
    assert "experiments.runs:load_run" in msg and "RunError" in msg and "is not a run directory" in msg


# fits -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [0.5, 1.0, 2.0])
def test_fit_recovers_exact_power_laws(k):
    xs = [512, 1024, 2048, 4096, 8192]
    fit = fit_power_law(xs, [3.0 * x**k for x in xs])
    assert fit["exponent"] == pytest.approx(k, abs=1e-9)
    assert fit["coef"] == pytest.approx(3.0, rel=1e-9)
    assert fit["r2"] == pytest.approx(1.0)
    assert fit["used"] == xs and fit["dropped"] == []


def test_fit_leaves_out_values_below_the_noise_floor():
    xs = [64, 128, 256, 512, 1024]
    ys = [1.0, 1.0, 256.0**2, 512.0**2, 1024.0**2]  # the first two are noise
    fit = fit_power_law(xs, ys, floor=10.0)
    assert fit["exponent"] == pytest.approx(2.0) and fit["dropped"] == [64, 128]
    assert fit_power_law(xs, ys, floor=1e9) is None
    assert fit_power_law([1, 2], [None, 5.0]) is None


def test_budget_extrapolated_and_measured():
    xs = [512, 1024, 2048]
    ys = [x**2 for x in xs]
    fit = fit_power_law(xs, ys)
    far = max_length_for_budget(xs, ys, fit, budget=8192**2)
    assert far["how"] == "extrapolated" and abs(far["seq_len"] - 8192) <= 1
    inside = max_length_for_budget(xs, ys, fit, budget=1500**2)
    assert inside["how"] == "measured" and inside["seq_len"] == 1024 and abs(inside["estimate"] - 1500) <= 1
    flat = max_length_for_budget(xs, [5.0, 5.0, 5.0], fit_power_law(xs, [5.0, 5.0, 5.0]), budget=100)
    assert flat["seq_len"] is None and flat["how"] == "extrapolated"


# measurements and probes ------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
def test_bench_reports_measured_and_analytic(mode):
    target = resolve_target(preset="transformer", d_model=32, overrides={"n_layers": 1})
    r = bench(target, seq_len=16, batch=2, mode=mode, repeats=1)
    assert r["time_s"] > 0 and r["peak_bytes"] >= 0 and r["tokens_per_s"] > 0
    model = LanguageModel(ModelSpec.from_dict(target["spec"]))
    assert r["flops_per_token"] == model.flops_per_token(16)
    assert r["state_bytes"] == model.state_bytes(16, 2)
    assert r["backends"] == {"0:attention": "sdpa"}


@pytest.mark.parametrize("name", MIXERS.names())
def test_decode_cache_bytes_equal_the_analytic_state(name):
    layer = MIXERS.create(name, d_model=32)
    if layer.state_bytes(8) is None:
        pytest.skip(f"{name} does not state its cache size")
    target = {"kind": "mixer", "name": name, "options": {}, "d_model": 32, "label": name}
    r = bench_decode(target, context=9, steps=2, batch=2, warmup_steps=1)
    assert r["cache_bytes"] == r["state_bytes"] == layer.state_bytes(9, 2)
    assert r["final_cache_bytes"] == r["final_state_bytes"]
    assert len(r["latencies_s"]) == 2 and r["latency_s"] > 0


def test_decode_of_a_model_cache_equals_analytic():
    target = resolve_target(preset="transformer", d_model=32, overrides={"n_layers": 2, "short_conv": 3})
    r = bench_decode(target, context=12, steps=3, batch=1, warmup_steps=1)
    assert r["cache_bytes"] == r["state_bytes"] > 0
    assert r["final_cache_bytes"] == r["final_state_bytes"]
    assert r["decode_flops_per_token"] > 0


def test_learned_positions_beyond_max_seq_len_are_na_not_crashes():
    target = resolve_target(preset="classic-transformer", d_model=32)  # learned, max_seq_len=256
    scan = scaling_probe(target, [512, 1024], budget_bytes=2**30)
    assert [r["status"] for r in scan["rows"]] == ["n/a — learned positions, max_seq_len=256"] * 2
    assert scan["fit"]["memory"] is None
    dec = decode_probe(target, [300])
    assert dec["rows"][0]["status"] == "n/a — learned positions, max_seq_len=256"


def test_loss_vs_length_and_position(corpus_run):
    r = loss_vs_length(corpus_run, multipliers=(1, 2, 4), bins=4, tokens=256, batch=4)
    ok, na = r["rows"][:2], r["rows"][2]
    assert [row["seq_len"] for row in r["rows"]] == [32, 64, 128]
    assert all(row["status"] == "ok" and math.isfinite(row["loss"]) for row in ok)
    assert len(ok[0]["by_position"]) == 4 and ok[0]["by_position"][-1]["end"] == 32
    assert ok[0]["loss_beyond_train_len"] is None and ok[1]["loss_beyond_train_len"] is not None
    assert na["status"] == "n/a — learned positions, max_seq_len=64" and "loss" not in na


def test_task_accuracy_vs_length(task_run):
    r = task_accuracy_vs_length(task_run, examples=4, batch=4)
    assert [row["seq_len"] for row in r["rows"]] == [32, 64, 128]
    assert all(0.0 <= row["accuracy"] <= 1.0 for row in r["rows"][:2])
    assert r["rows"][2]["status"] == "n/a — learned positions, max_seq_len=64"
    assert [b["status"] for b in r["by_seq_len"]] == ["ok", "ok", "n/a — learned positions, max_seq_len=64"]


# the command ------------------------------------------------------------------------------------------------
def test_cli_rejects_bad_input_before_any_work(tmp_path, capsys):
    assert cli(["memory", "--mixer", "attenton", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "attenton" in err and "attention" in err  # the registry's error, with the close match
    assert cli(["memory", "--mixer", "attention", "--lengths", "512,abc", "--out", str(tmp_path / "b")]) == 2
    assert "--lengths: 'abc' is not a positive integer" in capsys.readouterr().err
    assert cli(["speed", "--mixer", "attention", "--option", "impl=nope", "--out", str(tmp_path / "c")]) == 2
    assert cli(["decode", "--preset", "transformer", "--mixer", "attention"]) == 2
    assert not any(tmp_path.iterdir())


def test_cli_memory_writes_results(tmp_path, capsys):
    out = tmp_path / "mem"
    rc = cli(["memory", "--mixer", "attention", "--option", "impl=math", "--d-model", "32", "--lengths", "16",
              "32", "--repeats", "1", "--budget-gb", "1", "--threads", "1", "--out", str(out)])
    assert rc == 0
    rec = json.loads((out / "results.json").read_text())
    assert rec["command"].startswith("mixerlab measure memory --mixer attention") and rec["machine"]["torch"]
    rows = rec["result"]["rows"]
    assert [r["seq_len"] for r in rows] == [16, 32] and all(r["status"] == "ok" for r in rows)
    assert rows[0]["backend"] == "math" and rows[0]["flops_per_token"] > 0 and rows[0]["state_bytes"] > 0
    assert rec["result"]["budget"]["budget_bytes"] == 2**30
    md = (out / "results.md").read_text()
    assert "| T |" in md and "peak memory ∝ T^" in md
    assert "attention(impl=math)" in capsys.readouterr().out


def test_cli_decode_and_context(tmp_path, corpus_run, capsys):
    out = tmp_path / "dec"
    assert cli(["decode", "--preset", "transformer", "--set", "n_layers=1", "--d-model", "32", "--lengths", "8",
                "--steps", "2", "--threads", "1", "--out", str(out)]) == 0
    row = json.loads((out / "results.json").read_text())["result"]["rows"][0]
    assert row["status"] == "ok" and row["cache_bytes"] == row["state_bytes"]
    out = tmp_path / "ctx"
    assert cli(["context", "--run", str(corpus_run), "--multipliers", "1,4", "--tokens", "128", "--bins", "2",
                "--threads", "1", "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())["result"]["rows"]
    assert rows[0]["status"] == "ok" and rows[1]["status"].startswith("n/a — learned positions")
    assert "n/a — learned positions, max_seq_len=64" in (out / "results.md").read_text()
