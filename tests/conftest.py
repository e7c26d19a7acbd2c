"""Shared test set-up.

A real third-party plugin distribution (tests/plugins/toymix) is installed with pip into a temporary
directory and put on sys.path before collection, so the registry-wide tests check it like a built-in.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

PLUGIN_SRC = Path(__file__).parent / "plugins" / "toymix"


def install_plugin(target: Path) -> None:
    """pip-install the toy plugin distribution into ``target`` (no network, no build isolation), built from a
    private copy of its source: the build leaves files beside the source, and pytest-xdist's workers each
    install it at once."""
    with tempfile.TemporaryDirectory(prefix="mixerlab-plugin-src-") as tmp:
        src = Path(tmp) / PLUGIN_SRC.name
        shutil.copytree(PLUGIN_SRC, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
               "--no-index", "--target", str(target), str(src)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"installing the test plugin failed:\n{proc.stdout}\n{proc.stderr}")


def pytest_configure(config: pytest.Config) -> None:
    target = Path(tempfile.mkdtemp(prefix="mixerlab-plugin-"))
    install_plugin(target)
    sys.path.insert(0, str(target))
    os.environ["MIXERLAB_TEST_PLUGIN_PATH"] = str(target)
    # subprocesses (trials, measurements) see the plugin too
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(target), os.environ.get("PYTHONPATH")) if p)
    from registry import MIXERS

    MIXERS.refresh_plugins()
    torch.set_flush_denormal(True)
    if os.environ.get("PYTEST_XDIST_WORKER"):  # one core each: the workers share the machine's cores
        torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (marked gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def mamba_ssm_on_cpu(monkeypatch):
    """Make ``import mamba_ssm`` work without a GPU: its CUDA extension ``selective_scan_cuda`` is replaced by
    an empty stand-in module (its kernels are never called; tests use mamba-ssm's pure-PyTorch references).
    Skips when mamba-ssm is not installed."""
    import types

    pytest.importorskip("einops")
    if not torch.cuda.is_available():
        try:
            import selective_scan_cuda  # noqa: F401
        except ImportError:
            monkeypatch.setitem(sys.modules, "selective_scan_cuda", types.ModuleType("selective_scan_cuda"))
    before = set(sys.modules)
    try:
        import mamba_ssm
    except ImportError as exc:
        pytest.skip(f"mamba_ssm not importable: {exc}")
    yield mamba_ssm
    # leave no mamba_ssm imported over the stand-in behind: a later import (transformers' kernel lookup) must
    # see that the CUDA extension is missing and take its PyTorch path
    for name in [m for m in sys.modules if m not in before and m.split(".")[0] in ("mamba_ssm", "selective_scan_cuda")]:
        del sys.modules[name]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def pytest_unconfigure(config: pytest.Config) -> None:
    target = os.environ.pop("MIXERLAB_TEST_PLUGIN_PATH", None)
    if target:
        shutil.rmtree(target, ignore_errors=True)
