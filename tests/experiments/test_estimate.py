"""The cost said before a study starts: each trial's calibrated start-up, test set, steps and evaluations,
the trials left packed onto the parallel slots."""

import threading

import pytest


def _fake_calibration(monkeypatch, step_of):
    calls, active, peak = [], [0], [0]
    lock = threading.Lock()

    def fake(call, kwargs, isolation):
        assert call == "experiments.study.estimate:calibrate"
        with lock:
            calls.append(len(kwargs["configs"]))
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        threading.Event().wait(0.05)  # long enough for the other slot's process to start beside this one
        with lock:
            active[0] -= 1
        costs = [{"step_s": step_of(c), "eval_s": 0.5, "final_eval_s": 2.0, "prepare_s": 1.0}
                 for c in kwargs["configs"]]
        return {"costs": costs, "busy_s": 0.0}

    monkeypatch.setattr("experiments.child.run_isolated", fake)
    return calls, peak


def test_the_estimate_packs_trials_onto_the_slots_longest_first(tmp_path, monkeypatch):
    """Per trial: start-up + test set + steps x step + (evaluations - 1) x evaluation + the final evaluation,
    from its shape's calibration; the learning rate is not a shape; the shapes are calibrated on `jobs`
    processes at once; the wall time is the longest-first packing onto `jobs` slots; a second estimate
    reuses the calibration."""
    from experiments.config import TrainSpec
    from experiments.study import Recipe
    from experiments.study import estimate as est

    recipe = Recipe.load("selective-copy", "cpu")
    calls, peak = _fake_calibration(monkeypatch, lambda c: 0.1 if c["model"]["mixer"] == "mamba" else 0.05)
    e = est.estimate(recipe, tmp_path, jobs=2)
    train = TrainSpec.from_dict(recipe.base["train"])
    evals = -(-train.steps // train.eval_interval)
    variants = len(recipe.axes["variant"])
    lrs = len(next(p for p in recipe.space if p.path == "train.lr").choices)
    assert sorted(calls) == sorted([variants - variants // 2, variants // 2]) and peak[0] == 2
    assert e.trials == e.left == lrs * variants

    def cost(step):  # start-up is measured around the fake: a few milliseconds
        return 1.0 + train.steps * step + (evals - 1) * 0.5 + 2.0

    expected = [cost(0.1)] * lrs + [cost(0.05)] * (e.trials - lrs)
    assert sorted(e.trial_seconds) == pytest.approx(sorted(expected), abs=0.5)
    assert e.seconds == pytest.approx(sum(e.trial_seconds) / 2, rel=0.01)  # evenly packable here
    again = est.estimate(recipe, tmp_path, jobs=2)
    assert len(calls) == 2 and again.seconds == e.seconds and again.calibration_s == 0
    assert "calibrated earlier" in again.describe("x") and "if no trial stops early" in again.describe("x")
    # one slot competes with no other process: timed again, on its own
    alone = est.estimate(recipe, tmp_path, jobs=1)
    assert calls[2:] == [variants] and alone.seconds == pytest.approx(sum(e.trial_seconds), rel=0.01)


def test_a_resumed_study_is_estimated_for_its_trials_left(tmp_path, monkeypatch):
    """The trials a study has finished are not estimated again, and the line says how many are left."""
    from experiments.study import Recipe
    from experiments.study import estimate as est

    recipe = Recipe.load("selective-copy", "cpu")
    _fake_calibration(monkeypatch, lambda c: 0.1)
    cells = recipe.grid_cells()
    whole = est.estimate(recipe, tmp_path, jobs=2)
    part = est.estimate(recipe, tmp_path, jobs=2, finished=cells[:3])
    assert (part.trials, part.left) == (len(cells), len(cells) - 3)
    assert sum(part.trial_seconds) == pytest.approx(sum(whole.trial_seconds) * (len(cells) - 3) / len(cells))
    assert f"{len(cells)} trials ({len(cells) - 3} left)" in part.describe("s")
    assert est.estimate(recipe, tmp_path, finished=cells).describe("s") == f"s: {len(cells)} trials (0 left); " \
                                                                          "nothing left to run."


def test_finished_cells_reads_a_study_without_creating_one(tmp_path):
    """No study yet: nothing finished and nothing written; a study's complete and pruned trials are finished,
    its interrupted ones are not."""
    import optuna

    from experiments.study import Recipe, ledger
    from experiments.study.estimate import finished_cells

    recipe = Recipe.load("selective-copy", "smoke")
    url = f"sqlite:///{tmp_path / 'study.db'}"
    assert finished_cells(recipe, url) == [] and not (tmp_path / "study.db").exists()
    study = optuna.create_study(study_name=recipe.study_name, storage=ledger.make_storage(url, None),
                                direction="maximize")
    cells = recipe.grid_cells()
    for cell, state in zip(cells, ("complete", "pruned", "failed"), strict=False):
        ledger.enqueue(study, cell)
        trial = study.ask()
        ledger.tell(study, trial, state, 0.5 if state == "complete" else None)
    assert finished_cells(recipe, url) == cells[:2]
