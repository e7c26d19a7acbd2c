import subprocess
import sys
from pathlib import Path

import pytest
import torch

from archs.mixers import Mixer
from registry import MIXERS, MixerRegistry, Registry, RegistryError, import_object


class Tiny(Mixer):
    """A tiny mixer for registry tests."""

    def __init__(self, d_model: int, layer_idx: int = 0, scale: float = 1.0):
        super().__init__(d_model, layer_idx)
        self.scale = scale

    def forward(self, x):
        return x * self.scale


@pytest.fixture
def reg():
    r = MixerRegistry("mixer", entry_point_group="mixerlab.test-none")
    r.register("tiny", Tiny)
    return r


def test_register_get_create(reg):
    assert reg.get("tiny") is Tiny
    m = reg.create("tiny", d_model=8, layer_idx=3, scale=2.0)
    assert isinstance(m, Tiny) and m.layer_idx == 3 and m.scale == 2.0
    assert reg.entry("tiny").description == "A tiny mixer for registry tests."
    assert [str(o) for o in reg.options("tiny")] == ["scale=1.0"]


def test_decorator_form():
    r = Registry("widget")

    @r.register("blue_widget", description="a blue one")
    class Blue:
        pass

    assert r.get("blue_widget") is Blue and r.entry("blue_widget").description == "a blue one"


def test_duplicate_name_is_an_error(reg):
    with pytest.raises(RegistryError, match="already registered"):
        reg.register("tiny", Tiny)


def test_names_must_be_snake_case(reg):
    with pytest.raises(RegistryError, match="snake_case"):
        reg.register("Bad-Name", Tiny)


def test_unknown_name_lists_known_and_suggests():
    with pytest.raises(RegistryError) as err:
        MIXERS.get("atention")
    msg = str(err.value)
    assert "did you mean 'attention'" in msg
    for name in ("attention", "xformers_attention", "sliding_window_attention"):
        assert name in msg


def test_wildcards():
    assert MIXERS.names("*attention") == ["attention", "linear_attention", "sliding_window_attention",
                                          "xformers_attention"]
    assert MIXERS.names("xformers_*") == ["xformers_attention"]
    assert MIXERS.names("nothing*") == []
    assert "attention" in MIXERS and "nope" not in MIXERS


def test_unknown_option_names_valid_ones():
    with pytest.raises(RegistryError) as err:
        MIXERS.create("attention", d_model=32, n_head=4)
    msg = str(err.value)
    assert "no option 'n_head'" in msg and "did you mean 'n_heads'" in msg and "impl='sdpa'" in msg


def test_bad_option_value_fails_before_building():
    with pytest.raises(RegistryError, match="impl must be one of"):
        MIXERS.validate_options("attention", {"impl": "fast"})
    with pytest.raises(RegistryError, match="n_kv_heads=3 must divide n_heads=4"):
        MIXERS.create("attention", d_model=32, n_heads=4, n_kv_heads=3)


def test_model_owned_arguments_are_not_options(reg):
    with pytest.raises(RegistryError, match="set by the model"):
        reg.validate_options("tiny", {"d_model": 3})


def test_import_path_works_where_a_name_does():
    path = f"{__name__}:Tiny"
    assert MIXERS.get(path) is Tiny
    m = MIXERS.create(path, d_model=4, scale=3.0)
    assert torch.equal(m(torch.ones(1, 2, 4)), torch.full((1, 2, 4), 3.0))
    with pytest.raises(RegistryError, match="no option 'bogus'"):
        MIXERS.create(path, d_model=4, bogus=1)


def test_import_path_errors():
    with pytest.raises(RegistryError, match="cannot import module"):
        import_object("no_such_pkg.mod:Thing")
    with pytest.raises(RegistryError, match="has no attribute"):
        import_object("registry:NoSuchThing")
    with pytest.raises(RegistryError, match="subclass of archs.mixers.Mixer"):
        MIXERS.get("registry:Registry")


def _fake_dist(root: Path, dist: str, group: str, name: str, value: str) -> None:
    info = root / f"{dist}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{group}]\n{name} = {value}\n")


def test_broken_plugin_error_names_plugin_and_entry_point(tmp_path, monkeypatch):
    _fake_dist(tmp_path, "broken_plugin", "mixerlab.test-broken", "brokenmix", "broken_plugin_mod:Missing")
    monkeypatch.syspath_prepend(str(tmp_path))
    r = MixerRegistry("mixer", entry_point_group="mixerlab.test-broken")
    assert r.names() == ["brokenmix"]  # discovered without loading
    with pytest.raises(RegistryError) as err:
        r.get("brokenmix")
    msg = str(err.value)
    assert "broken_plugin" in msg and "brokenmix = broken_plugin_mod:Missing" in msg


def test_installed_plugin_is_discovered():
    """tests/plugins/toymix is pip-installed into a temporary directory by conftest.py."""
    entry = MIXERS.entry("toymix")
    assert entry.source.startswith("plugin toymix")
    assert "toymix = toymix_plugin.mixer:ToyMixer" in entry.source
    assert [o.name for o in MIXERS.options("toymix")] == ["gate"]
    m = MIXERS.create("toymix", d_model=8, gate=False)
    assert m(torch.randn(2, 5, 8)).shape == (2, 5, 8)


def test_mixerlab_list_shows_builtins_and_installed_plugin():
    import os

    env = dict(os.environ, PYTHONPATH=os.environ["MIXERLAB_TEST_PLUGIN_PATH"])
    out = subprocess.run([sys.executable, "-m", "experiments", "list"], capture_output=True, text=True,
                         env=env, check=True).stdout
    for name in ("attention", "xformers_attention", "sliding_window_attention", "toymix"):
        assert name in out
    assert "Causal running mean" in out  # the plugin's description
    assert "xformers" in out and "sdpa" in out  # backend availability
