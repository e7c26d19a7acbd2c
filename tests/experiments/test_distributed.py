"""One trial over several processes: real ranks over gloo, launched by torchrun's elastic agent
(`experiments.distributed.launch`), against the same run in one process.

The global batch is the same whatever the world size, so 2 ranks must follow 1 rank's loss curve and end at
its parameters, up to floating-point reassociation (the gradient all-reduce sums in another order)."""

import copy
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from experiments.cli import main
from experiments.config import build_specs
from experiments.distributed import launch
from experiments.errors import RunError
from experiments.train import train

HERE = Path(__file__).parent
CONFIG = {
    "model": {"n_layers": 3, "d_model": 32, "n_heads": 2, "pattern": "AMG",
              "legend": {"A": "attention", "M": "mamba", "G": "gated_deltanet"},
              "mixer_options": {"gated_deltanet": {"head_dim": 16, "num_heads": 2}}},
    "train": {"steps": 20, "batch_size": 8, "seq_len": 32, "log_interval": 1, "eval_interval": 10,
              "warmup_steps": 5, "eval_batches": 2},
    "data": {"corpus": "stdlib"},
}


@pytest.fixture(autouse=True)
def _ranks_see_the_helpers(monkeypatch):
    """The ranks import the test's plugin mixer and entry point from this directory; 1 thread each."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)


def with_train(**train_options):
    config = copy.deepcopy(CONFIG)
    config["train"].update(train_options)
    return config


def run_ranks(config, out, nproc, stop_at=0):
    launch([json.dumps(config), str(out), str(stop_at)], nproc, threads=1, module="distributed_helpers")


def curve(out):
    return [r["loss"] for r in map(json.loads, (Path(out) / "metrics.jsonl").read_text().splitlines())
            if r["event"] == "train"]


def weights(out):
    return torch.load(Path(out) / "checkpoint.pt", weights_only=False)["model"]


def assert_close_curves(got, want, rtol=1e-5):
    assert len(got) == len(want)
    for step, (a, b) in enumerate(zip(got, want, strict=True), 1):
        assert a == pytest.approx(b, rel=rtol), f"step {step}: {a} vs {b}"


def assert_close_weights(got, want):
    """atol 1e-5: AdamW divides by sqrt(v), so where a rare token's gradient is near zero a reassociation-sized
    difference in it moves that weight by a visible fraction of the step (measured: 1.3e-6 on one element of
    the tied embedding after 20 steps, on another CPU model than the one that ran 1e-6 clean)."""
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5, msg=name)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The run in one process, no process group: the curve the ranks must follow."""
    out = tmp_path_factory.mktemp("one") / "run"
    torch.set_num_threads(1)
    train(*build_specs(CONFIG), out, progress=False)
    return out


def test_two_ddp_ranks_follow_one_process(reference, tmp_path, capfd):
    out = tmp_path / "ddp"
    args = [f"{k}.{f}={json.dumps(v)}" for k in ("model", "train") for f, v in CONFIG[k].items()]
    assert main(["train", "--nproc", "2", "--threads", "1", "--no-progress", "--out", str(out), *args]) == 0
    assert_close_curves(curve(out), curve(reference))
    assert_close_weights(weights(out), weights(reference))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["distributed"] == {"world_size": 2, "backend": "gloo", "parallel": "ddp", "grad_accum": 1}
    assert summary["final"]["val_loss"] == pytest.approx(
        json.loads((reference / "summary.json").read_text())["final"]["val_loss"], rel=1e-5)
    assert capfd.readouterr().out.count("status  ") == 1  # rank 0 alone prints the run's table


def test_fsdp_with_micro_batches_checkpoints_for_any_world_size(reference, tmp_path):
    config = with_train(parallel="fsdp", grad_accum=2)
    out = tmp_path / "fsdp"
    run_ranks(config, out, 2, stop_at=10)  # interrupted at its step-10 checkpoint
    assert [p.name for p in out.glob("checkpoint.dcp-*")] == ["checkpoint.dcp-00000010"]
    assert_close_curves(curve(out), curve(reference)[:10])
    one = tmp_path / "resumed-on-one"
    shutil.copytree(out, one)

    run_ranks(config, out, 2)  # resumed on 2 ranks
    assert_close_curves(curve(out), curve(reference))
    assert [p.name for p in out.glob("checkpoint.dcp-*")] == ["checkpoint.dcp-00000020"]  # the old one gone

    train(*build_specs(config), one, progress=False)  # resumed in one process, no process group
    assert_close_curves(curve(one), curve(reference))
    from experiments.runs import load_run

    for run in (out, one):
        model, _ = load_run(run)  # a sharded checkpoint loads for generate and measure
        assert_close_weights(model.state_dict(), weights(reference))


def test_a_ddp_checkpoint_resumes_under_fsdp(reference, tmp_path):
    out = tmp_path / "ddp-then-fsdp"
    run_ranks(CONFIG, out, 2, stop_at=10)
    run_ranks(with_train(parallel="fsdp"), out, 2)  # the spec differs only in how it is parallelised
    assert_close_curves(curve(out), curve(reference))


def breaking(**options):
    """Attention then the plugin mixer that breaks on rank 1 (`distributed_helpers.BreakingMixer`)."""
    config = copy.deepcopy(CONFIG)
    config["model"].update(n_layers=2, pattern="AB", mixer_options={},
                           legend={"B": {"mixer": "distributed_helpers:BreakingMixer", "options": options}})
    return config


def ranks_alive(marker):
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return [line for line in ps.splitlines() if marker in line and "ps -eo" not in line]


def test_a_rank_that_raises_ends_the_run_and_is_named(tmp_path, capsys):
    config = breaking(at=3)
    config["train"]["collective_timeout_s"] = 60
    out = tmp_path / "breaks"
    with pytest.raises(RunError, match=r"rank 1 failed: .*BreakingMixer breaks on rank 1 at forward 3"):
        run_ranks(config, out, 2)
    assert not ranks_alive(str(out))  # torchrun stopped rank 0 too: no orphans
    assert not (out / "summary.json").exists()


def test_a_non_finite_loss_on_one_rank_ends_every_rank_as_diverged(tmp_path):
    config = breaking(at=4, mode="nan")
    out = tmp_path / "nan"
    run_ranks(config, out, 2)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["steps"] == 3
    assert summary["final"]["diverged_at_step"] == 4 and summary["final"]["diverged_on_ranks"] == [1]


def test_the_batch_must_split_over_ranks_and_micro_batches_before_anything_starts(tmp_path, capsys):
    out = tmp_path / "odd"
    code = main(["train", "--nproc", "2", "--out", str(out), "train.batch_size=6", "train.grad_accum=2",
                 "model.d_model=16", "model.n_layers=1"])
    assert code == 2 and not out.exists()
    err = capsys.readouterr().err
    assert "train.batch_size=6 does not split into 2 rank(s) x train.grad_accum=2" in err
    assert "train.batch_size=4" in err or "train.batch_size=8" in err


def test_a_study_whose_trials_span_two_ranks(tmp_path):
    """`[trial] nproc = 2`: each trial trains over two ranks; rank 0 reports every evaluation through the
    trial's pipes, the pruner's answer reaches both ranks, and the summary says how the trial ran."""
    from optuna.trial import TrialState

    from experiments.study import Recipe, StudyRunner, ledger

    r = Recipe.from_dict({
        "name": "two-ranks", "sampler": {"kind": "grid"},
        "pruner": {"kind": "median", "n_startup_trials": 1, "n_warmup_steps": 0},
        "space": {"train.lr": [1e-2, 1e-7]},
        "base": {"model": {"d_model": 16, "n_layers": 1, "n_heads": 2, "mlp": "none", "mixer": "attention"},
                 "train": {"steps": 8, "batch_size": 4, "seq_len": 16, "eval_interval": 4, "eval_batches": 1,
                           "warmup_steps": 1, "log_interval": 2},
                 "data": {"corpus": "stdlib"}},
        "trial": {"threads": 1, "timeout_s": 300, "nproc": 2},
    }, scale="cpu")
    runner = StudyRunner(r, tmp_path, progress=False)
    runner.run()
    by = {t.params["train.lr"]: t for t in runner.study.get_trials(deepcopy=False)}
    good, bad = by[1e-2], by[1e-7]
    assert good.state == TrialState.COMPLETE and sorted(good.intermediate_values) == [4, 8]
    summary = ledger.read_trial(good).summary
    assert summary.distributed == {"world_size": 2, "backend": "gloo", "parallel": "ddp", "grad_accum": 1}
    assert good.value == pytest.approx(summary.final["val_bpb"])
    assert bad.state == TrialState.PRUNED and sorted(bad.intermediate_values) == [4]
    bad_summary = json.loads((tmp_path / "trials" / f"{bad.number:04d}" / "summary.json").read_text())
    assert bad_summary["status"] == "pruned" and bad_summary["steps"] == 4  # both ranks stopped there


def test_sigterm_to_the_launcher_stops_every_rank_at_one_step_with_a_checkpoint(tmp_path):
    """A scheduler's preemption of `mixerlab train --nproc 2`: the ranks agree on the step to stop at, rank 0
    checkpoints it, nothing is left running, and the same command resumes and logs every step once."""
    import signal
    import sys
    import time

    out = tmp_path / "preempted"
    cmd = [sys.executable, "-m", "experiments", "train", "--nproc", "2", "--threads", "1", "--no-progress",
           "--out", str(out), "--pattern", "AM", "--steps", "3000", "model.d_model=16", "model.n_layers=2",
           "train.batch_size=4", "train.seq_len=32", "train.eval_interval=5000", "train.log_interval=1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics, deadline = out / "metrics.jsonl", time.time() + 120
    while time.time() < deadline and (not metrics.exists() or metrics.read_text().count("\n") < 20):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0 and "interrupted at step" in output, output[-2000:]
    step = torch.load(out / "checkpoint.pt", weights_only=False)["step"]
    assert 20 <= step < 3000 and json.loads(metrics.read_text().splitlines()[-1])["step"] == step
    assert not ranks_alive(str(out))
    # resume only to just past the stop (stop_at), not the whole schedule
    config = {"model": {"d_model": 16, "n_layers": 2, "pattern": "AM"},
              "train": {"steps": 3000, "batch_size": 4, "seq_len": 32, "eval_interval": 5000, "log_interval": 1},
              "data": {"corpus": "stdlib"}}
    run_ranks(config, out, 2, stop_at=step + 5)
    steps = [r["step"] for r in map(json.loads, metrics.read_text().splitlines()) if r["event"] == "train"]
    assert steps == list(range(1, step + 6))
