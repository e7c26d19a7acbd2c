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


def test_every_relative_link_resolves():
    """Links and images in the README point at files of the repository (no file cited that is not here)."""
    text = README.read_text()
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [t for t in targets if "://" not in t and not t.startswith("mailto:")]
    assert len(local) > 10
    missing = [t for t in local if not (README.parent / t).exists()]
    assert missing == []
    assert "REFERENCE.md" not in text  # the design notes live outside the repository
