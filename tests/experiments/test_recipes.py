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
    assert "smoke: " + str(cells) + " complete" in capsys.readouterr().out
