"""The mixer contract, and the base class that gives a minimal mixer working defaults for everything else.

A mixer maps ``x: (B, T, D) -> (B, T, D)`` causally: output ``t`` depends on inputs ``<= t`` only. It is built
as ``Cls(d_model=..., layer_idx=..., **options)``. Beyond ``forward`` a mixer may offer

- a decoding cache: ``init_cache(...)`` and ``step(x, cache)``, where ``step`` consumes the next ``T >= 1``
  tokens (a prompt prefill or one-token steps) and returns their outputs, equal to what ``forward`` gives
  for those positions of the whole sequence;
- analytic costs: ``state_bytes(seq_len)`` (bytes its cache holds after ``seq_len`` tokens) and
  ``flops_per_token(seq_len)`` (forward FLOPs per token, averaged over a sequence of ``seq_len``);
- ``available_backends()`` and ``backend``, the backend that actually ran last (recorded with results).

A plugin subclasses `Mixer` and implements ``__init__`` and ``forward`` only. The defaults then decode by
re-running ``forward`` over the cached inputs (correct for any causal mixer, O(T) per token) and report
FLOPs as unknown (``None``).
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

__all__ = ["Mixer", "MixerCache", "PrefixCache", "cuda_kernel_status", "dtype_bytes", "log_backend_once"]

logger = logging.getLogger("mixerlab")
_logged_backends: set[tuple[str, str, str]] = set()


def log_backend_once(mixer: str, backend: str, why: str = "") -> None:
    """Log (at INFO, once per process) that ``mixer`` ran on ``backend``; ``why`` explains a fallback."""
    key = (mixer, backend, why)
    if key not in _logged_backends:
        _logged_backends.add(key)
        logger.info("%s: using backend %r%s", mixer, backend, f" ({why})" if why else "")


def cuda_kernel_status(imported: bool, why: str, package: str) -> str:
    """A CUDA-kernel backend's availability: "yes", or why not (``why``: the import error when not imported)."""
    if not imported:
        return why
    if not torch.cuda.is_available():
        return f"{package} imports, but its kernels need a CUDA device"
    return "yes"


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class MixerCache:
    """Per-layer decoding state. ``length`` counts the tokens consumed so far."""

    length: int = 0

    def tensors(self) -> list[Tensor]:
        """The tensors that hold the state (for `nbytes`)."""
        return [v for v in vars(self).values() if isinstance(v, Tensor)]

    def nbytes(self) -> int:
        """Bytes of state held for the tokens consumed so far."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    @property
    def batch_size(self) -> int | None:
        """The batch the state was made for (the leading size of its tensors); None while it holds none."""
        tensors = self.tensors()
        return tensors[0].shape[0] if tensors else None


class PrefixCache(MixerCache):
    """The default cache: the inputs seen so far, ``(B, L, D)``."""

    def __init__(self) -> None:
        self.x: Tensor | None = None
        self.length = 0


class Mixer(nn.Module):
    """Base class for sequence mixers: ``(B, T, D) -> (B, T, D)``, causal."""

    #: frozen dataclass of the mixer's options (validated by the registry before anything is built)
    Options: ClassVar[type | None] = None
    #: the name it was registered under (set by the registry)
    registered_name: ClassVar[str] = ""

    def __init__(self, d_model: int, layer_idx: int = 0) -> None:
        super().__init__()
        if not isinstance(d_model, int) or d_model <= 0:
            raise ValueError(f"d_model must be a positive int, got {d_model!r}")
        self.d_model = d_model
        self.layer_idx = layer_idx
        self.backend: str | None = None

    @property
    def mixer_name(self) -> str:
        return type(self).registered_name or type(self).__name__

    def forward(self, x: Tensor) -> Tensor:  # (B, T, D) -> (B, T, D)
        raise NotImplementedError(f"{type(self).__name__} must implement forward(x)")

    # backends ----------------------------------------------------------------------------------------
    @classmethod
    def available_backends(cls) -> dict[str, str]:
        """Backend name → "yes" if it can run on this machine, else the reason it cannot."""
        return {"torch": "yes"}

    def _ran(self, backend: str, why: str = "") -> None:
        """Record (and log once) the backend that ran."""
        self.backend = backend
        log_backend_once(self.mixer_name, backend, why)

    # decoding ----------------------------------------------------------------------------------------
    def _check_cache(self, cache: MixerCache, cls: type[MixerCache], x: Tensor) -> None:
        """Raise unless ``cache`` is this mixer's ``cls`` (from `init_cache`) made for ``x``'s batch size."""
        if not isinstance(cache, cls):
            raise TypeError(f"{self.mixer_name}.step needs its {cls.__name__} (from init_cache), "
                            f"got {type(cache).__name__}")
        batch_size = cache.batch_size
        if batch_size is not None and batch_size != x.shape[0]:
            raise ValueError(f"{self.mixer_name}.step: the cache holds batch size {batch_size}, the input has "
                             f"{x.shape[0]}; make it with init_cache(batch_size={x.shape[0]}, ...)")

    def init_cache(
        self, batch_size: int, max_len: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> MixerCache:
        """An empty cache for decoding up to ``max_len`` tokens."""
        return PrefixCache()

    def step(self, x: Tensor, cache: MixerCache) -> Tensor:
        """Consume the next tokens ``x: (B, T, D)`` (T >= 1), update ``cache``, return their outputs.

        The default re-runs ``forward`` over every input so far and keeps the last ``T`` outputs.
        """
        if not isinstance(cache, PrefixCache):
            raise TypeError(f"{type(self).__name__}.step got a {type(cache).__name__}; override step() too")
        cache.x = x if cache.x is None else torch.cat([cache.x, x], dim=1)
        cache.length = cache.x.shape[1]
        return self.forward(cache.x)[:, -x.shape[1]:]

    # costs -------------------------------------------------------------------------------------------
    def _dtype(self, dtype: torch.dtype | None) -> torch.dtype:
        if dtype is not None:
            return dtype
        p = next(self.parameters(), None)
        return p.dtype if p is not None else torch.get_default_dtype()

    def state_bytes(self, seq_len: int, batch_size: int = 1, dtype: torch.dtype | None = None) -> int | None:
        """Bytes the decoding cache holds after ``seq_len`` tokens (``None`` if unknown)."""
        if type(self).init_cache is Mixer.init_cache:  # the default PrefixCache: every input so far
            return batch_size * seq_len * self.d_model * dtype_bytes(self._dtype(dtype))
        return None

    def flops_per_token(self, seq_len: int) -> int | None:
        """Forward FLOPs per token, averaged over a sequence of ``seq_len`` tokens (``None`` if unknown)."""
        return None

    def extra_repr(self) -> str:
        opts: Any = getattr(self, "opts", None)
        return f"d_model={self.d_model}, layer_idx={self.layer_idx}" + (f", {opts}" if opts is not None else "")
