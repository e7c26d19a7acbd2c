"""The sweep pruner compares a trial with its siblings only (its cell with other swept values), at the same
step, from the warm-up on; a cell's leader is never stopped; the recipe check names what a sweep needs."""

import optuna
import pytest
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState, create_trial

from experiments.errors import RecipeError
from experiments.study.pruners import SweepPruner

DIST = {"variant": CategoricalDistribution(["mamba", "hyena"]), "model.d_model": CategoricalDistribution([64, 128]),
        "train.lr": CategoricalDistribution([3e-3, 1e-2])}


def study_with(*done):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", pruner=SweepPruner(["train.lr"], margin=0.3, n_warmup_steps=200))
    for params, curve, state in done:
        final = curve[max(curve)] if state == TrialState.COMPLETE else None
        study.add_trial(create_trial(params=params, distributions=DIST, intermediate_values=curve, state=state,
                                     value=final))
    return study


def ask(study, params):
    fixed = {k: CategoricalDistribution([v]) for k, v in params.items()}
    trial = study.ask(fixed)
    for k in params:
        trial.suggest_categorical(k, fixed[k].choices)
    return trial


CELL = {"variant": "mamba", "model.d_model": 64}


def test_a_trial_far_behind_its_sibling_at_the_same_step_is_pruned():
    study = study_with(({**CELL, "train.lr": 1e-2}, {100: 0.2, 200: 0.6, 300: 0.9}, TrialState.COMPLETE))
    t = ask(study, {**CELL, "train.lr": 3e-3})
    t.report(0.05, 100)
    assert not t.should_prune()  # still warming up
    t.report(0.25, 200)
    assert t.should_prune()  # 0.6 - 0.25 >= 0.3


def test_close_behind_or_ahead_is_kept_and_other_cells_do_not_count():
    other_cell = {"variant": "hyena", "model.d_model": 64, "train.lr": 1e-2}
    study = study_with(({**CELL, "train.lr": 1e-2}, {200: 0.5}, TrialState.RUNNING),
                       (other_cell, {200: 1.0}, TrialState.COMPLETE))
    t = ask(study, {**CELL, "train.lr": 3e-3})
    t.report(0.3, 200)
    assert not t.should_prune()  # 0.2 behind its sibling; the other cell's 1.0 is not compared


def test_a_sibling_that_finished_early_at_its_target_counts_with_its_final_value():
    study = study_with(({**CELL, "train.lr": 1e-2}, {100: 0.5, 200: 0.99}, TrialState.COMPLETE))
    t = ask(study, {**CELL, "train.lr": 3e-3})
    t.report(0.4, 400)
    assert t.should_prune()


def test_the_recipe_check_names_what_a_sweep_needs(tmp_path):
    from experiments.study import Recipe

    path = tmp_path / "r.toml"
    path.write_text('name = "r"\nobjectives = ["accuracy"]\nsampler = { kind = "grid" }\n'
                    'pruner = { kind = "sweep", margin = 0.3 }\n[base.data]\ntask = "mqar"\n'
                    '[base.model]\nd_model = 16\nn_layers = 1\n[space]\n"train.lr" = [1e-3, 1e-2]\n')
    with pytest.raises(RecipeError, match=r"best_over, e.g. \['train.lr'\]"):
        Recipe.load(str(path), "cpu")
    path.write_text(path.read_text().replace("margin = 0.3", "margin = 0") + '[report]\nbest_over = ["train.lr"]\n')
    with pytest.raises(RecipeError, match="pruner.margin=0"):
        Recipe.load(str(path), "cpu")

