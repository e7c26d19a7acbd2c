"""Registry-wide contract tests: every registered mixer — built-in or plugin — is checked here."""

import pytest
import torch

from archs.contract import CHECKS, check_mixer
from archs.mixers import Mixer
from archs.model import LanguageModel, ModelSpec
from registry import MIXERS

D = 32
B, T = 2, 13


def names():
    return MIXERS.names()


@pytest.fixture(params=names())
def name(request):
    return request.param


def test_describes_itself(name):
    entry = MIXERS.entry(name)
    assert entry.description, f"{name} has no one-line description (give its class a docstring)"
    assert issubclass(entry.obj, Mixer)
    backends = MIXERS.backends(name)
    assert backends and any(ok == "yes" for ok in backends.values()), f"{name}: no backend runs here"


@pytest.mark.parametrize("check", list(CHECKS))
def test_contract(name, check):
    """Each check of `archs.contract` (shape, causality, finite fp32/bf16, batch independence, determinism,
    decoding, state bytes, FLOPs) on every registered mixer."""
    (result,) = check_mixer(name, d_model=D, only=(check,))
    assert result.passed, f"{name}: {result.line()}"


def test_in_a_language_model(name):
    spec = ModelSpec(vocab_size=50, d_model=D, n_layers=2, layers=[name, name], positions="none")
    model = LanguageModel(spec).eval()
    ids = torch.randint(0, 50, (B, T))
    assert model(ids).shape == (B, T, 50)
    assert model.generate(ids[:, :4], 3).shape == (B, 7)
