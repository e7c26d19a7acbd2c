"""Every bundled recipe end to end at --scale smoke: its study, table.md, table.csv and figures."""

import csv
import json

import pytest

from experiments.cli import main
from experiments.study import Recipe, recipe_names


@pytest.mark.slow
@pytest.mark.parametrize("name", recipe_names())
def test_reproduce_smoke(name, tmp_path, capsys):
    out = tmp_path / name
    assert main(["reproduce", name, "--scale", "smoke", "--out", str(out), "--jobs", "2", "--no-progress"]) == 0
    text = capsys.readouterr().out
    recipe = Recipe.load(name, "smoke")
    # the cost is said before anything runs: the trials, the slots, the wall time from a measured calibration
    first = text.splitlines()[0]
    assert first.startswith(f"{recipe.study_name}: {len(recipe.grid_cells())} trials, 2 at a time; estimated ")
    assert "evaluations and start-up timed for" in first and (out / "estimate.json").exists()
    (timed,) = json.loads((out / "estimate.json").read_text()).values()  # one (jobs, threads) context
    parts = ("step_s", "eval_s", "final_eval_s", "prepare_s", "startup_s")
    assert all(all(shape[p] > 0 for p in parts) for shape in timed.values()), timed
    rows = list(csv.DictReader((out / "table.csv").open()))
    cells = len(recipe.grid_cells())
    sweep = recipe.report.get("best_over", [])
    shown = {json.dumps({k: v for k, v in c.items() if k not in sweep}, sort_keys=True) for c in recipe.grid_cells()}
    assert len(rows) == len(shown)  # one row per cell (the best of a sweep where the recipe has one)
    assert all(r["status"] == "complete" for r in rows), rows
    table = (out / "table.md").read_text()
    assert f"mixerlab reproduce {name} --scale smoke" in table and table in text
    assert list(out.glob("*.png")) and list(out.glob("*.svg"))
    # rerunning the finished study resumes it: nothing runs again
    assert main(["study", "run", name, "--scale", "smoke", "--out", str(out), "--no-progress"]) == 0
    again = capsys.readouterr().out
    assert "smoke: " + str(cells) + " complete" in again
    assert again.splitlines()[0] == f"{recipe.study_name}: {cells} trials (0 left); nothing left to run."


def test_the_linear_attention_family_in_a_search_space():
    """The six linear-attention mixers, by name and by pattern letter, are choices of a study's space; the
    recipe check builds every grid cell (so an option that does not fit d_model fails here, naming the cell)."""
    family = ["retention", "gla", "linear_attention", "based", "deltanet", "gated_deltanet"]
    raw = {"name": "family", "sampler": {"kind": "grid"},
           "base": {"model": {"d_model": 48, "n_layers": 2},
                    "train": {"steps": 2, "batch_size": 2, "seq_len": 32}},
           "space": {"model.mixer": family}}
    recipe = Recipe.from_dict(raw)
    assert [dict(c)["model.mixer"] for c in recipe.configs_to_validate()] == family
    raw["space"] = {"model.pattern": ["GDA", "RNLB", "GM"]}
    assert len(list(Recipe.from_dict(raw).configs_to_validate())) == 3
    raw["base"]["model"]["mixer_options"] = {"gated_deltanet": {"head_dim": 16, "num_heads": 2, "num_v_heads": 3}}
    raw["space"] = {"model.pattern": ["AN"]}
    with pytest.raises(Exception, match="num_v_heads"):
        Recipe.from_dict(raw)
