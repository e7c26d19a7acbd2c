import pytest

from archs.model import ModelSpec, SpecError
from archs.pattern import PatternError, ratio_placement, tile_pattern


def test_tiling():
    assert tile_pattern("MMMA", 12) == "MMMAMMMAMMMA"
    assert tile_pattern("MMMA", 6) == "MMMAMM"
    assert tile_pattern("A", 3) == "AAA"
    with pytest.raises(PatternError, match="empty"):
        tile_pattern("", 4)


@pytest.mark.parametrize("n, ratio, expected", [
    (8, 1 / 8, "MMMMAMMM"),  # Jamba's 1:7, attention at i % 8 == 4
    (12, 0.25, "MMAMMMAMMAMM"),
    (14, 1 / 7, "MMMMAMMMMAMMMM"),
    (4, 0.0, "MMMM"),
    (4, 1.0, "AAAA"),
    (1, 1.0, "A"),
])
def test_ratio_placement(n, ratio, expected):
    assert "".join("A" if f else "M" for f in ratio_placement(n, ratio)) == expected


@pytest.mark.parametrize("n", range(3, 40))
@pytest.mark.parametrize("ratio", [0.05, 0.1, 0.25, 0.5])
def test_ratio_placement_rules(n, ratio):
    flags = ratio_placement(n, ratio)
    assert sum(flags) == round(n * ratio)
    if 0 < sum(flags) <= n - 2:  # avoidable: attention never first or last
        assert not flags[0] and not flags[-1]


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), "half"])
def test_bad_ratio(bad):
    with pytest.raises(PatternError, match=r"attn_ratio must be a number in \[0, 1\]"):
        ratio_placement(8, bad)


def test_pattern_in_spec_with_legend_and_per_letter_options():
    spec = ModelSpec(n_layers=6, d_model=32, pattern="AW", positions="none",
                     legend={"W": {"mixer": "sliding_window_attention", "options": {"window": 8}}},
                     mixer_options={"attention": {"n_heads": 2}})
    layers = spec.resolved_layers
    assert [layer.mixer for layer in layers] == ["attention", "sliding_window_attention"] * 3
    assert layers[1].options["window"] == 8 and layers[0].options["n_heads"] == 2
    assert spec.layer_pattern == "AWAWAW"
    assert ModelSpec.from_json(spec.to_json()) == spec


def test_user_legend_can_name_a_plugin():
    spec = ModelSpec(n_layers=3, d_model=16, pattern="TA", legend={"T": "toymix"}, positions="none")
    assert [layer.mixer for layer in spec.resolved_layers] == ["toymix", "attention", "toymix"]


def test_pattern_errors():
    with pytest.raises(SpecError, match="letter\\(s\\) 'V'.*legend lacks"):
        ModelSpec(pattern="AV", n_layers=2)
    with pytest.raises(SpecError, match="unknown mixer 'mamba3'"):
        ModelSpec(pattern="AZ", legend={"Z": "mamba3"}, n_layers=2)
    with pytest.raises(SpecError, match="single letters"):
        ModelSpec(pattern="A", legend={"AB": "attention"}, n_layers=2)
    with pytest.raises(SpecError, match="at most one of pattern, attn_ratio and layers"):
        ModelSpec(pattern="A", attn_ratio=0.5)
    with pytest.raises(SpecError, match="layers lists 1 mixers but n_layers=2"):
        ModelSpec(layers=["attention"], n_layers=2)
    with pytest.raises(SpecError, match="attn_ratio must be a number"):
        ModelSpec(attn_ratio=2.0)


def test_explicit_layers_and_ratio_round_trip():
    for spec in (ModelSpec(n_layers=2, d_model=32, layers=["attention", {"mixer": "sliding_window_attention",
                                                                        "options": {"window": 4}}]),
                 ModelSpec(n_layers=8, d_model=32, mixer="sliding_window_attention", attn_ratio=0.25)):
        again = ModelSpec.from_dict(spec.to_dict())
        assert again == spec and again.resolved_layers == spec.resolved_layers
    assert ModelSpec(n_layers=8, mixer="sliding_window_attention", attn_ratio=0.25).layer_pattern == "WWAWWAWW"
