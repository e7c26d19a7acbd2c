"""Fixtures for the mixer tests: flash-linear-attention's layers with their kernels routed to pure PyTorch
(`benchmarks.fla_cpu`), for the compatibility tests; skipped when fla is not installed."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture
def fla(monkeypatch: pytest.MonkeyPatch) -> Any:
    """``fla.layers`` with its kernels routed to pure PyTorch (skips when fla is not installed)."""
    try:
        import fla.layers  # noqa: F401
    except Exception as exc:  # ImportError, or a broken triton install
        pytest.skip(f"flash-linear-attention not importable ({type(exc).__name__}: {exc}); install it as the "
                    f"README's compatibility set-up says")
    from benchmarks.fla_cpu import install

    return install(monkeypatch.setattr, monkeypatch.setitem)
