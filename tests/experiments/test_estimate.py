"""The cost said before a study starts: trials x calibrated step time, packed onto the parallel slots."""

import pytest


def test_the_estimate_packs_trials_onto_the_slots_longest_first(tmp_path, monkeypatch):
    """Per-trial seconds = steps x the calibrated step time of its shape; the learning rate is not a shape;
    the wall time is the longest-first packing onto `jobs` slots; a second estimate reuses the calibration."""
    from experiments.study import Recipe
    from experiments.study import estimate as est

    recipe = Recipe.load("selective-copy", "cpu")
    calls = []

    def fake(call, kwargs, isolation):
        calls.append(len(kwargs["configs"]))
        return [0.1 if c["model"]["mixer"] == "mamba" else 0.05 for c in kwargs["configs"]]

    monkeypatch.setattr("experiments.child.run_isolated", fake)
    e = est.estimate(recipe, tmp_path, jobs=2)
    steps = recipe.base["train"]["steps"]
    lrs = len(next(p for p in recipe.space if p.path == "train.lr").choices)
    assert calls == [len(recipe.axes["variant"])] and e.trials == lrs * len(recipe.axes["variant"])
    assert sorted(e.trial_seconds) == sorted([0.1 * steps] * lrs + [0.05 * steps] * (e.trials - lrs))
    assert e.seconds == pytest.approx(sum(e.trial_seconds) / 2)  # evenly packable here
    again = est.estimate(recipe, tmp_path, jobs=2)
    assert calls == [len(recipe.axes["variant"])] and again.seconds == e.seconds and again.calibration_s == 0
