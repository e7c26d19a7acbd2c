"""The README's examples are real: its study recipe validates (every range corner built into a model)."""

import re
from pathlib import Path

from experiments.study import Recipe

README = Path(__file__).resolve().parent.parent / "README.md"


def block_after(marker: str) -> str:
    match = re.search(re.escape(marker) + r"\s*```\w*\n(.*?)```", README.read_text(), re.S)
    assert match, f"no code block after {marker} in README.md"
    return match.group(1)


def test_example_recipe_validates(tmp_path):
    path = tmp_path / "my-hybrids.toml"
    path.write_text(block_after("<!-- example-recipe -->"))
    recipe = Recipe.load(str(path), "cpu")
    assert recipe.name == "my-hybrids" and not recipe.grid and recipe.trials == 20
    assert {p.path for p in recipe.space} == {"model.pattern", "model.n_layers", "model.d_model", "train.lr"}
    assert recipe.constraints == {"peak_memory_mib": 2000.0} and recipe.jobs == 2
