"""The study engine: recipe validation, trial isolation and failure reasons, pruning, resume after a kill."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from experiments.child import Isolation
from experiments.runs import TrialSummary
from experiments.study import Action, Outcome, Recipe, RecipeError, StudyRunner, TrialProcess, ledger, recipe_names

TINY = {
    "base": {
        "model": {"d_model": 16, "n_layers": 1, "n_heads": 2, "mlp": "none", "positions": "none"},
        "train": {"steps": 4, "batch_size": 2, "seq_len": 16, "eval_interval": 2, "eval_batches": 1,
                  "warmup_steps": 1, "log_interval": 2},
        "data": {"corpus": "stdlib"},
    },
    "trial": {"threads": 1, "timeout_s": 120},
}


def recipe(**changes) -> Recipe:
    raw = json.loads(json.dumps(TINY))
    for key, value in changes.items():
        raw[key] = value
    raw.setdefault("name", "tiny")
    return Recipe.from_dict(raw, scale="cpu")


def trials_of(runner: StudyRunner) -> list:
    return runner.study.get_trials(deepcopy=False)


# validation --------------------------------------------------------------------------------------------------
def test_unknown_recipe_field_is_named_with_a_suggestion():
    with pytest.raises(RecipeError, match="no field 'objective'.*did you mean 'objectives'"):
        recipe(objective=["val_bpb"])


def test_unknown_metric_and_mismatched_objective():
    with pytest.raises(RecipeError, match="no field 'val_bbp'.*val_bpb"):
        recipe(objectives=["val_bbp"], sampler={"kind": "grid"})
    with pytest.raises(RecipeError, match="accuracy needs a task"):
        recipe(objectives=["accuracy"], sampler={"kind": "grid"})


def test_grid_needs_lists_and_multi_objective_cannot_prune():
    with pytest.raises(RecipeError, match="grid mode needs lists.*train.lr"):
        recipe(sampler={"kind": "grid"}, space={"train.lr": {"low": 1e-4, "high": 1e-2, "log": True}})
    with pytest.raises(RecipeError, match="cannot prune"):
        recipe(objectives=["val_bpb", "peak_memory_mb"], pruner={"kind": "median"}, budget={"trials": 2})
    with pytest.raises(RecipeError, match="needs budget.trials"):
        recipe(sampler={"kind": "tpe"})


def test_a_bad_cell_is_found_before_anything_runs(tmp_path):
    with pytest.raises(RecipeError, match=r"variant=typo.*no field 'n_layer'.*n_layers"):
        recipe(sampler={"kind": "grid"}, variants={"ok": {"model.n_layers": 1}, "typo": {"model.n_layer": 2}})
    assert not any(tmp_path.iterdir())


def test_a_cell_whose_model_does_not_build_or_holds_text_for_a_number_is_refused(tmp_path):
    """Every cell's model is built (on the meta device) when the recipe is checked, so a width its heads do
    not divide fails then, naming the cell and the layer; text in a number field names the field."""
    with pytest.raises(RecipeError, match=r"variant=bad.*layer 0 \(attention.*n_heads=3.*not divisible"):
        recipe(sampler={"kind": "grid"}, variants={"ok": {"model.n_heads": 2},
                                                  "bad": {"model.n_heads": 3, "model.d_model": 32}})
    base = json.loads(json.dumps(TINY["base"]))
    base["train"]["lr"] = "3e-3x"
    with pytest.raises(RecipeError, match=r"TrainSpec.lr='3e-3x': must be a number"):
        recipe(base=base, sampler={"kind": "grid"})
    with pytest.raises(RecipeError, match=r"trial.jobs='two': must be an integer"):
        recipe(sampler={"kind": "grid"}, trial={"jobs": "two"})


def test_scales_merge_over_the_base():
    r = Recipe.from_dict({**TINY, "name": "t", "sampler": {"kind": "grid"},
                          "scale": {"smoke": {"base": {"train": {"steps": 2}}}}}, scale="smoke")
    assert r.base["train"]["steps"] == 2 and r.base["train"]["batch_size"] == 2


def test_exclude_leaves_cells_out_of_the_grid_and_names_a_bad_entry():
    """A grid's ``exclude`` drops every cell matching all of an entry's keys (an axis by bundle name, a space
    field by value) — under one scale only when written there; a key or value that is not the recipe's own
    is named with its valid choices, before anything runs."""
    grid = {"sampler": {"kind": "grid"}, "axes": {"length": {"T8": {"train.seq_len": 8}, "T16": {"train.seq_len": 16}}},
            "space": {"model.d_model": [16, 24]}}
    r = recipe(**grid, exclude=[{"length": "T16", "model.d_model": 24}])
    assert sorted((c["length"], c["model.d_model"]) for c in r.grid_cells()) == [("T16", 16), ("T8", 16), ("T8", 24)]
    assert len(recipe(**grid, exclude=[{"model.d_model": 24}]).grid_cells()) == 2
    scaled = recipe(**grid, scale={"cpu": {"exclude": [{"length": "T8"}]}})
    assert [c["length"] for c in scaled.grid_cells()] == ["T16", "T16"]
    raw = {**json.loads(json.dumps(TINY)), **grid, "name": "t", "scale": {"cpu": {"exclude": [{"length": "T8"}]}}}
    assert len(Recipe.from_dict(raw, scale="smoke").grid_cells()) == 4  # another scale keeps every cell
    with pytest.raises(RecipeError, match=r"exclude\[0\].lenght: not an axis.*did you mean 'length'"):
        recipe(**grid, exclude=[{"lenght": "T16"}])
    with pytest.raises(RecipeError, match=r"exclude\[1\].model.d_model=32: not one of its values.*16, 24"):
        recipe(**grid, exclude=[{"length": "T8"}, {"model.d_model": 32}])
    with pytest.raises(RecipeError, match="leaves no cell"):
        recipe(**grid, exclude=[{"length": "T8"}, {"length": "T16"}])
    with pytest.raises(RecipeError, match="exclude = .*give a list of partial cells"):
        recipe(**grid, exclude={"length": "T8"})
    with pytest.raises(RecipeError, match="exclude leaves cells out of a grid.*tpe"):
        recipe(space={"model.d_model": [16, 24]}, budget={"trials": 2}, exclude=[{"model.d_model": 24}])


def test_a_study_begun_before_a_recipe_field_existed_resumes(tmp_path):
    """An older mixerlab wrote recipe.json without the fields added since: the study ran with their defaults."""
    r = recipe(sampler={"kind": "grid"})
    StudyRunner(r, tmp_path).open()
    saved = json.loads((tmp_path / "recipe.json").read_text())
    for newer in ("exclude", "report", "measure", "nproc"):
        del saved[newer]
    (tmp_path / "recipe.json").write_text(json.dumps(saved))
    StudyRunner(r, tmp_path).open()  # not "a different recipe"
    (tmp_path / "recipe.json").write_text(json.dumps({**saved, "report": {"best_over": ["train.lr"]}}))
    with pytest.raises(RecipeError, match="different recipe.*report"):  # a field it did save still counts
        StudyRunner(r, tmp_path).open()
    (tmp_path / "recipe.json").write_text(json.dumps(saved))
    with pytest.raises(RecipeError, match="different recipe.*exclude"):
        StudyRunner(recipe(sampler={"kind": "grid"}, space={"train.lr": [0.01, 0.02]},
                           exclude=[{"train.lr": 0.02}]), tmp_path).open()


@pytest.mark.parametrize("name", recipe_names())
@pytest.mark.parametrize("scale", ["smoke", "cpu", "gpu"])
def test_bundled_recipes_validate(name, scale):
    r = Recipe.load(name, scale)
    assert r.description and r.objectives


def test_a_different_recipe_in_the_same_directory_is_refused(tmp_path):
    StudyRunner(recipe(sampler={"kind": "grid"}), tmp_path).open()
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    other = recipe(sampler={"kind": "grid"}, space={"train.lr": [0.01]})
    with pytest.raises(RecipeError, match="different recipe.*space"):
        StudyRunner(other, tmp_path).open()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing was changed


# running -----------------------------------------------------------------------------------------------------
def test_grid_runs_every_cell_once_in_parallel_and_records_results(tmp_path):
    r = recipe(sampler={"kind": "grid"}, variants={"attention": {"model.mixer": "attention"},
                                                   "window": {"model.mixer": "sliding_window_attention"}},
               space={"model.d_model": [16, 24]})
    runner = StudyRunner(r, tmp_path, jobs=2, progress=False)
    counts = runner.run()
    assert counts["complete"] == 4 and counts["failed"] == 0
    cells = sorted(json.dumps(t.params, sort_keys=True) for t in trials_of(runner))
    assert cells == sorted(json.dumps(c, sort_keys=True) for c in r.grid_cells())
    for t in trials_of(runner):
        s = ledger.read_trial(t).summary
        assert s.status == "completed" and t.value == pytest.approx(s.final["val_bpb"])
        assert s.peak_memory_mib >= 0 and s.memory_scope == "training steps" and s.memory_split["params"] > 0
        assert s.corpus_hash and s.evals[-1]["step"] == 4 and s.d_model == t.params["model.d_model"]
        assert (tmp_path / "trials" / f"{t.number:04d}" / "summary.json").exists()
    # rerunning the finished study runs nothing more
    assert StudyRunner(r, tmp_path, progress=False).run()["complete"] == 4
    assert len(trials_of(runner)) == 4


def test_failures_are_isolated_and_explained(tmp_path):
    r = recipe(sampler={"kind": "grid"}, variants={
        "ok": {"model.mixer": "attention"},
        "crash": {"model.mixer": "toymix_plugin.bad:Exploding"},
        "oom": {"model.mixer": "toymix_plugin.bad:Suicidal"},
        "diverge": {"train.lr": 1e12, "train.grad_clip": 0.0, "train.warmup_steps": 0},
    })
    runner = StudyRunner(r, tmp_path, progress=False)
    counts = runner.run()
    by = {t.params["variant"]: t for t in trials_of(runner)}
    assert by["ok"].state == TrialState.COMPLETE
    assert by["crash"].state == TrialState.FAIL and "Exploding mixer: boom" in by["crash"].user_attrs["fail_reason"]
    assert by["oom"].state == TrialState.FAIL and "SIGKILL (out of memory?)" in by["oom"].user_attrs["fail_reason"]
    assert by["diverge"].state == TrialState.FAIL and "diverged" in by["diverge"].user_attrs["fail_reason"]
    assert counts == {"complete": 1, "pruned": 0, "failed": 3, "running": 0, "waiting": 0, "interrupted": 0}


def test_retry_failed_resumes_the_failed_trial_from_its_checkpoint(tmp_path, monkeypatch):
    """A trial fails at its final evaluation (longer inputs); after the "fix", --retry-failed runs it again
    from its last checkpoint: the failed trial stays, nothing else reruns, the retry finishes the steps left."""
    base = json.loads(json.dumps(TINY["base"]))
    base["data"] = {"task": "induction", "options": {"vocab_size": 8, "test_multipliers": [1, 2]}}
    base["train"].update(steps=6, eval_examples=4)
    r = recipe(base=base, objectives=["accuracy"], sampler={"kind": "grid"}, variants={
        "ok": {"model.mixer": "attention"}, "long": {"model.mixer": "toymix_plugin.bad:FailsWhenLong"}})
    monkeypatch.setenv("TOYMIX_FAIL_ABOVE", "16")
    first = StudyRunner(r, tmp_path, progress=False).run()
    assert first["complete"] == 1 and first["failed"] == 1
    assert StudyRunner(r, tmp_path, progress=False).run()["failed"] == 1  # a plain rerun does not retry it

    monkeypatch.delenv("TOYMIX_FAIL_ABOVE")
    runner = StudyRunner(r, tmp_path, progress=False, retry_failed=True)
    counts = runner.run()
    trials = {t.number: t for t in trials_of(runner)}
    assert len(trials) == 3 and counts["complete"] == 2 and counts["failed"] == 1
    failed = next(t for t in trials.values() if t.state == TrialState.FAIL)
    retry = next(t for t in trials.values() if t.user_attrs.get("retry_of") is not None)
    assert "FailsWhenLong: 32 tokens" in failed.user_attrs["fail_reason"]
    assert retry.user_attrs["retry_of"] == failed.number and retry.user_attrs["resumed_from"] == failed.number
    assert retry.state == TrialState.COMPLETE and retry.params == failed.params
    events = [json.loads(x) for x in (tmp_path / "trials" / f"{retry.number:04d}" / "metrics.jsonl").read_text()
              .splitlines()]
    assert [e["step"] for e in events if e["event"] == "eval"] == [2, 4, 6]  # steps 1-4 come from the checkpoint
    summary = ledger.read_trial(retry).summary
    assert summary.steps == 6 and summary.final["by"]["seq_len"]
    assert (tmp_path / "trials" / f"{failed.number:04d}" / "checkpoint.pt").exists()  # the failed trial's files stay
    again = StudyRunner(r, tmp_path, progress=False, retry_failed=True).run()  # retried once: nothing more
    assert again["complete"] == 2 and len(trials_of(runner)) == 3


def test_timeout_fails_the_trial(tmp_path):
    r = recipe(sampler={"kind": "grid"}, trial={"threads": 1, "timeout_s": 0.5})
    runner = StudyRunner(r, tmp_path, progress=False)
    runner.run()
    (t,) = trials_of(runner)
    assert t.state == TrialState.FAIL and "timed out after" in t.user_attrs["fail_reason"]


def test_pruning_stops_a_hopeless_trial(tmp_path):
    base = json.loads(json.dumps(TINY["base"]))
    base["train"].update(steps=12, eval_interval=3, lr=0.01)
    r = recipe(base=base, sampler={"kind": "grid"}, pruner={"kind": "median", "n_startup_trials": 1},
               variants={"good": {"train.lr": 0.01}, "hopeless": {"train.lr": 1e-9}})
    runner = StudyRunner(r, tmp_path, progress=False)
    runner.run()
    by = {t.params["variant"]: t for t in trials_of(runner)}
    assert by["good"].state == TrialState.COMPLETE
    assert by["hopeless"].state == TrialState.PRUNED
    assert ledger.read_trial(by["hopeless"]).summary.steps < 12


def test_multi_objective_with_a_constraint(tmp_path):
    r = recipe(objectives=["val_bpb", "peak_memory_mb"], sampler={"kind": "random", "seed": 1},
               budget={"trials": 2}, space={"model.d_model": [16, 24]}, constraints={"params": 1e9})
    runner = StudyRunner(r, tmp_path, progress=False)
    runner.run()
    done = [t for t in trials_of(runner) if t.state == TrialState.COMPLETE]
    assert len(done) == 2 and all(len(t.values) == 2 for t in done)
    assert all(t.system_attrs["constraints:params"] < 0 for t in done)
    assert runner.study.metric_names == ["val_bpb", "peak_memory_mb"]


@pytest.mark.parametrize(("answer", "state", "status"), [
    ("stop", "failed", "interrupted"), ("", "failed", "interrupted"), ("prune", "pruned", "pruned")])
def test_a_trial_process_ends_as_its_coordinator_answers(tmp_path, answer, state, status):
    """At its first evaluation the trial is told to stop (Ctrl-C), finds its coordinator gone (""), or is
    pruned: an interruption is a failure to redo with an "interrupted" summary, never a pruned trial."""
    config = recipe(sampler={"kind": "grid"}).config_for({})
    process = TrialProcess(config, tmp_path / "t", Isolation(threads=1, timeout=120, ignore_sigint=True))
    asked = []

    def on_eval(step, metrics):
        asked.append((step, sorted(metrics)))
        return answer

    outcome = process.run(on_eval, threading.Event())
    assert asked == [(2, ["val_bpb", "val_loss", "val_ppl", "val_tokens"])]
    assert outcome.state == state and outcome.summary.status == status and outcome.summary.steps == 2
    assert outcome.redo == (state == "failed") and ("interrupted" in outcome.reason) == (state == "failed")
    assert (tmp_path / "t" / "checkpoint.pt").exists()


def test_a_prune_answered_to_the_last_evaluation_leaves_the_trial_complete(tmp_path):
    """A pruner asked at a run's last evaluation (its step budget or target reached) has nothing left to
    save: the trial is complete, with its result, not relabelled pruned."""
    config = recipe(sampler={"kind": "grid"}).config_for({})
    process = TrialProcess(config, tmp_path / "t", Isolation(threads=1, timeout=120, ignore_sigint=True))
    asked = []

    def on_eval(step, metrics):
        asked.append(step)
        return "continue" if step < 4 else "prune"

    outcome = process.run(on_eval, threading.Event())
    assert asked == [2, 4]
    assert outcome.state == "complete" and outcome.summary.status == "completed" and outcome.summary.steps == 4


def _count_complete(db: Path) -> int:
    """Read-only poll (opening an Optuna storage here could race the coordinator creating the schema)."""
    import sqlite3

    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
            return con.execute("SELECT count(*) FROM trials WHERE state = 'COMPLETE'").fetchone()[0]
    except sqlite3.Error:
        return 0


def test_a_worker_that_finds_a_dead_workers_grid_trial_redoes_the_cell(tmp_path):
    """A grid cell whose worker died (its PID on this host is gone) is queued again by whichever process
    finds it — here a worker, which never enqueues the grid itself. (Seen in CI: the cell was lost.)"""
    from experiments.study import host_id

    r = recipe(sampler={"kind": "grid"}, space={"train.seed": [0, 1]})
    coordinator = StudyRunner(r, tmp_path, progress=False)
    coordinator.open(create=True)
    coordinator.queue.enqueue_grid()
    orphan = coordinator.study.ask()  # a trial some worker took, then died
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan.set_user_attr("worker", f"{host_id()}:{dead.pid}")

    counts = StudyRunner(r, tmp_path, progress=False).run(create=False)
    trials = trials_of(coordinator)
    assert counts["complete"] == 2 and counts["interrupted"] == 1
    assert sorted(t.params["train.seed"] for t in trials if t.state == TrialState.COMPLETE) == [0, 1]
    redo = next(t for t in trials if t.user_attrs.get("retry_of") == orphan.number)
    assert redo.state == TrialState.COMPLETE and "died" in trials[orphan.number].user_attrs["fail_reason"]


def _grid_runner(tmp_path, seeds=(0,), heartbeat=(60, 180)) -> StudyRunner:
    runner = StudyRunner(recipe(sampler={"kind": "grid"}, space={"train.seed": list(seeds)}), tmp_path,
                         progress=False, heartbeat=heartbeat, log=lambda msg: None)
    runner.open(create=True)
    runner.queue.enqueue_grid()
    return runner


def test_losing_the_race_for_a_queued_grid_cell_never_samples_a_new_one(tmp_path):
    """Two workers both see one queued cell; the one that loses the WAITING -> RUNNING update gets nothing
    (``study.ask()`` would have sampled a new trial: a cell run twice)."""
    a = _grid_runner(tmp_path)
    b = StudyRunner(a.recipe, tmp_path, progress=False, log=lambda msg: None)
    b.open(create=False)
    assert a.queue.next_action() == b.queue.next_action() == Action.TAKE
    won = a.queue.take(Action.TAKE)
    assert won is not None and won.number == 0
    assert b.queue.take(Action.TAKE) is None
    assert len(trials_of(a)) == 1 and b.queue.next_action() == Action.WAIT  # b waits; no new trial exists


def test_a_trial_whose_worker_died_as_it_took_it_is_redone(tmp_path):
    """Killed between taking the trial and recording itself (no worker, no heartbeat): once the grace period
    has passed, the trial is failed with that reason and its cell queued again."""
    runner = _grid_runner(tmp_path, heartbeat=(1, 2))
    orphan = runner.queue.take(Action.TAKE)  # taken, but not yet marked: the worker died here
    runner.queue.recover()
    assert trials_of(runner)[orphan.number].state == TrialState.RUNNING  # within the grace period: alive
    time.sleep(2.5)
    runner.queue.recover()
    trials = trials_of(runner)
    assert trials[orphan.number].state == TrialState.FAIL
    assert "no worker recorded" in trials[orphan.number].user_attrs["fail_reason"]
    (retry,) = [t for t in trials if t.state == TrialState.WAITING]
    assert retry.user_attrs["retry_of"] == orphan.number and retry.system_attrs["fixed_params"] == {"train.seed": 0}


def test_a_stale_heartbeat_queues_a_clean_retry(tmp_path):
    """A worker on another machine stops beating: its trial is failed and queued again with the same
    parameters, without the dead trial's attributes (its worker would mark the retry dead too)."""
    runner = _grid_runner(tmp_path, heartbeat=(1, 2))
    trial = runner.queue.take(Action.TAKE)
    ledger.mark_mine(runner.study, trial, "another-machine:123")
    trial.set_user_attr("config", {"x": 1})
    time.sleep(3.0)
    runner.queue.recover()
    trials = trials_of(runner)
    assert trials[trial.number].state == TrialState.FAIL
    (retry,) = [t for t in trials if t.state == TrialState.WAITING]
    assert retry.user_attrs == {"retry_of": trial.number, "retry_after": "dead worker"}
    # Optuna's check stores no reason with the failure (nor takes one after it); the record says what happened
    assert "fail_reason" not in trials[trial.number].user_attrs
    dead = ledger.read_trial(trials[trial.number])
    assert dead.fail_reason == ledger.STALE_REASON and "died" in dead.fail_reason and dead.interrupted


def test_a_trial_that_keeps_killing_its_worker_is_retried_at_most_max_retry_times(tmp_path):
    from experiments.study import requeue_dead

    runner = _grid_runner(tmp_path)
    queued = []
    for _ in range(4):
        trial = runner.queue.take(Action.TAKE)
        assert ledger.fail_running(runner.study, trial.number, "its worker died")
        queued.append(requeue_dead(runner.study, ledger.stored(runner.study, trial.number), max_retry=2))
        if not queued[-1]:
            break
    assert queued == [True, True, False]
    assert [t.state for t in trials_of(runner)] == [TrialState.FAIL] * 3


def test_a_result_for_a_trial_failed_elsewhere_is_not_told(tmp_path):
    """A live worker whose trial was failed as stale (a long stall) keeps its hands off: storing its outcome
    raises, the trial stays failed, and its retry redoes it."""
    runner = _grid_runner(tmp_path)
    _, trial = runner.queue.claim()
    assert ledger.fail_running(runner.study, trial.number, "its worker died")  # another worker's recovery
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        runner.store(trial, Outcome("complete", summary=TrialSummary(status="completed", final={"val_bpb": 1.0})))
    (stored,) = trials_of(runner)
    assert stored.state == TrialState.FAIL and stored.user_attrs["fail_reason"] == "its worker died"
    assert ledger.read_trial(stored).summary is None  # nothing of the late result was written


def test_sigkill_of_the_coordinator_then_resume_loses_and_repeats_nothing(tmp_path):
    raw = json.loads(json.dumps(TINY))
    raw["base"]["train"].update(steps=30, eval_interval=5)
    raw.update(name="tiny", sampler={"kind": "grid"}, space={"train.seed": [0, 1, 2, 3]})
    path = tmp_path / "tiny.toml"
    path.write_text(_to_toml(raw))
    out, db = tmp_path / "run", tmp_path / "run" / "study.db"
    # heartbeats every 5 s: a kill in the instant a trial is taken (no worker recorded yet) is recovered after
    # 15 s rather than the default 180
    cmd = [sys.executable, "-m", "experiments", "study", "run", str(path), "--out", str(out), "--no-progress",
           "--heartbeat", "5"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not (db.exists() and _count_complete(db) >= 1):
        time.sleep(0.5)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    study = optuna.load_study(study_name="tiny-cpu", storage=f"sqlite:///{db}")
    before = {t.number: (t.params["train.seed"], t.value) for t in study.get_trials() if t.state == TrialState.COMPLETE}
    assert before, "no trial completed before the kill"

    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
    study = optuna.load_study(study_name="tiny-cpu", storage=f"sqlite:///{db}")
    trials = study.get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert sorted(t.params["train.seed"] for t in complete) == [0, 1, 2, 3]  # every cell once, none twice
    for number, (seed, value) in before.items():  # nothing completed was lost or rerun
        assert trials[number].state == TrialState.COMPLETE and trials[number].value == value
        assert trials[number].params["train.seed"] == seed
    assert len({t.number for t in trials}) == len(trials)
    for t in trials:  # found dead by its PID (the study's check) or its stale heartbeat (Optuna's), whichever first
        if t.state == TrialState.FAIL:
            assert "died" in ledger.read_trial(t).fail_reason


def _trial_children(pid: int) -> list[int]:
    """The trial processes (``python -m experiments.child``) the process ``pid`` started."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        for child in (task / "children").read_text().split():
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
            if b"experiments.child" in cmdline:
                found.append(int(child))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


# A subreaper for the coordinator: orphans are re-parented to it (and reaped) rather than to this machine's
# init, which may kill them itself and so hide whether they stop on their own.
SUBREAPER = """
import ctypes, os, subprocess, sys, time
ctypes.CDLL(None).prctl(36, 1)  # PR_SET_CHILD_SUBREAPER
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print(proc.pid, flush=True)
while True:
    try:
        os.wait()
    except ChildProcessError:
        time.sleep(0.05)
"""


def test_a_killed_coordinator_leaves_no_trial_training(tmp_path):
    """SIGKILL of a study coordinator: its trial process gets SIGTERM from the kernel (PR_SET_PDEATHSIG),
    checkpoints the step it is on (no evaluation was due for thousands of steps), records itself as
    interrupted and is gone within 2 s."""
    raw = json.loads(json.dumps(TINY))
    raw["base"]["train"].update(steps=100000, eval_interval=100000, log_interval=1)
    raw.update(name="tiny", sampler={"kind": "grid"}, space={"train.seed": [0]})
    path = tmp_path / "tiny.toml"
    path.write_text(_to_toml(raw))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "experiments", "study", "run", str(path), "--out", str(out), "--no-progress"]
    reaper = subprocess.Popen([sys.executable, "-c", SUBREAPER, *cmd], stdout=subprocess.PIPE, text=True)
    try:
        coordinator = int(reaper.stdout.readline())
        metrics, deadline = out / "trials" / "0000" / "metrics.jsonl", time.time() + 120
        while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 20):
            time.sleep(0.1)
        children = _trial_children(coordinator)
        assert len(children) == 1, "no trial process found"
        os.kill(coordinator, signal.SIGKILL)
        killed = time.time()
        while time.time() - killed < 2.0 and any(_alive(c) for c in children):
            time.sleep(0.05)
        assert not any(_alive(c) for c in children), "a trial process outlived its coordinator by 2 s"
    finally:
        reaper.kill()
        reaper.wait()
    import torch

    ckpt = torch.load(out / "trials" / "0000" / "checkpoint.pt", weights_only=False)
    logged = [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
    assert ckpt["step"] >= 20 and ckpt["step"] == max(logged)  # the step it was on, not a last evaluation
    assert json.loads((out / "trials" / "0000" / "summary.json").read_text())["status"] == "interrupted"


def test_sigterm_stops_the_study_like_ctrl_c_and_the_rerun_resumes_the_trial(tmp_path):
    """A scheduler's SIGTERM: the coordinator stops its running trial (marked interrupted, not failed for a
    reason of its own) and exits; the same command then resumes that trial from its checkpoint."""
    raw = json.loads(json.dumps(TINY))
    raw["base"]["train"].update(steps=400, eval_interval=5)
    raw.update(name="tiny", sampler={"kind": "grid"}, space={"train.seed": [0]})
    path = tmp_path / "tiny.toml"
    path.write_text(_to_toml(raw))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "experiments", "study", "run", str(path), "--out", str(out), "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ckpt, deadline = out / "trials" / "0000" / "checkpoint.pt", time.time() + 240
    while time.time() < deadline and not ckpt.exists():
        time.sleep(0.2)
    assert ckpt.exists(), "the trial never wrote a checkpoint"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Rerun the same command to resume" in err, err
    study = optuna.load_study(study_name="tiny-cpu", storage=f"sqlite:///{out / 'study.db'}")
    (stopped,) = study.get_trials()
    assert stopped.state == TrialState.FAIL and "interrupted" in stopped.user_attrs["fail_reason"], err

    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
    trials = optuna.load_study(study_name="tiny-cpu", storage=f"sqlite:///{out / 'study.db'}").get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert trials[1].user_attrs["retry_of"] == 0 and trials[1].user_attrs["resumed_from"] == 0
    events = [json.loads(x) for x in (out / "trials" / "0001" / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "eval"] == list(range(5, 401, 5))  # no step twice


def _to_toml(raw: dict) -> str:
    lines = []

    def emit(table: dict, prefix: str) -> None:
        scalars = {k: v for k, v in table.items() if not isinstance(v, dict)}
        if prefix:
            lines.append(f"[{prefix}]")
        for k, v in scalars.items():
            lines.append(f'"{k}" = {json.dumps(v)}')
        for k, v in table.items():
            if isinstance(v, dict):
                emit(v, f"{prefix}.{k}" if prefix else k)

    emit(raw, "")
    return "\n".join(lines) + "\n"
