"""Optuna studies over mixers, hybrids, depth and width: recipes, the trial queue, trial processes, storage.

- `recipe`: a study as TOML, validated into a `Recipe` (every grid cell or range corner built into specs);
- `ledger`: what the study stores on each trial (`TrialRecord`), storage, and every use of Optuna's internals;
- `queue`: which trial a worker takes next (`TrialQueue`, `Action`), and recovery of dead workers' trials;
- `trial`: one trial in its own process (`TrialProcess` -> `Outcome`; `run_trial` in the child);
- `runner`: `StudyRunner`, the coordinator or a worker, ``jobs`` trials at a time.
"""

from experiments.errors import RecipeError
from experiments.metrics import METRICS
from experiments.study.ledger import (
           TrialRecord,
           host_id,
           make_storage,
           open_study,
           read_trial,
           read_trials,
           requeue_dead,
           retried_trial,
)
from experiments.study.queue import Action, Counts, TrialQueue
from experiments.study.recipe import RECIPES_DIR, SCALES, Param, Recipe, find_recipe, recipe_names
from experiments.study.runner import StudyRunner
from experiments.study.trial import Outcome, TrialProcess

__all__ = ["METRICS", "RECIPES_DIR", "SCALES", "Action", "Counts", "Outcome", "Param", "Recipe", "RecipeError",
           "StudyRunner", "TrialProcess", "TrialQueue", "TrialRecord", "find_recipe", "host_id", "make_storage",
           "open_study", "read_trial", "read_trials", "recipe_names", "requeue_dead", "retried_trial"]
