"""The mixer contract as checks that measure: each returns its figure and whether it holds.

`check_mixer(name)` builds a registered mixer (or an import path) and runs every check on small, odd shapes:
output shape and dtype; causality (inputs after position t perturbed; the largest change at positions <= t);
finite forward and gradients in fp32 and bf16; batch independence (a sequence's output does not depend on its
batch neighbours); determinism under a fixed seed; decoding (a prefill of 1 or 6 tokens, then one-token steps,
against the full forward); ``state_bytes`` against the cache's real bytes (and whether it grows with context);
``flops_per_token`` stated or unknown. The registry-wide tests (``tests/archs/test_contract.py``) call these
same functions, so the suite and any other caller can never disagree about what the contract is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

__all__ = ["CHECKS", "Check", "check_mixer"]

B, T = 2, 13  # odd sizes
TOL = 1e-5  # absolute, on outputs of order one, for equalities that are exact in exact arithmetic
DECODE_RTOL = 1e-4


@dataclass(frozen=True)
class Check:
    """One check's verdict: ``figure`` is what was measured; ``where`` says at which position or size a
    failure happened (empty when it passed)."""

    name: str
    passed: bool
    figure: str
    where: str = ""

    def line(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        return f"{verdict}  {self.name:<20s} {self.figure}" + (f" — {self.where}" if self.where else "")


Builder = Callable[[], Any]


def check_shape(build: Builder, d: int) -> Check:
    m = build()
    x = torch.randn(B, T, d)
    with torch.no_grad():
        y = m(x)
    ok = tuple(y.shape) == (B, T, d) and y.dtype == x.dtype
    return Check("shape and dtype", ok, f"({B}, {T}, {d}) float32 -> {tuple(y.shape)} {str(y.dtype)[6:]}",
                 "" if ok else f"expected ({B}, {T}, {d}) float32")


def check_causal(build: Builder, d: int) -> Check:
    m = build()
    worst, where, ignores = 0.0, "", []
    for t_len in (T, 29):
        x = torch.randn(B, t_len, d)
        with torch.no_grad():
            y = m(x)
            for t in (0, t_len // 2, t_len - 2):
                x2 = x.clone()
                x2[:, t + 1:] = torch.randn_like(x2[:, t + 1:]) * 3
                y2 = m(x2)
                change = (y2[:, : t + 1] - y[:, : t + 1]).abs().amax(dim=(0, 2))  # per position <= t
                if change.max().item() > worst:
                    worst = change.max().item()
                    if worst > TOL:
                        bad = int((change > TOL).nonzero()[0])
                        where = (f"T={t_len}: changing inputs after position {t} changed the output at position "
                                 f"{bad} by {change[bad].item():.2e}")
                if torch.allclose(y2[:, t + 1:], y[:, t + 1:]):
                    ignores.append(f"T={t_len}, t={t}")
    if worst <= TOL and ignores:
        return Check("causality", False, f"max change at positions <= t: {worst:.1e}",
                     f"the output does not depend on later inputs ({', '.join(ignores)})")
    return Check("causality", worst <= TOL, f"max change at positions <= t: {worst:.1e} (T = {T}, 29)", where)


def _finite(build: Builder, d: int, dtype: torch.dtype) -> Check:
    label = f"finite {str(dtype)[6:]}"
    m = build().to(dtype).train()
    x = torch.randn(B, T, d, dtype=dtype, requires_grad=True)
    y = m(x)
    if not torch.isfinite(y).all():
        bad = (~torch.isfinite(y)).nonzero()[0].tolist()
        return Check(label, False, "forward not finite", f"first non-finite output at (batch, position, channel) "
                                                        f"= {tuple(bad)}")
    y.float().square().mean().backward()
    if x.grad is None or not torch.isfinite(x.grad).all() or x.grad.abs().sum() == 0:
        return Check(label, False, "input gradient missing, zero or not finite")
    for pname, p in m.named_parameters():
        if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all()):
            return Check(label, False, f"gradient of {pname} {'missing' if p.grad is None else 'not finite'}")
    return Check(label, True, "forward, input and parameter gradients finite")


def check_finite_fp32(build: Builder, d: int) -> Check:
    return _finite(build, d, torch.float32)


def check_finite_bf16(build: Builder, d: int) -> Check:
    return _finite(build, d, torch.bfloat16)


def check_batch_independence(build: Builder, d: int) -> Check:
    m = build()
    x = torch.randn(3, T, d)
    with torch.no_grad():
        a = m(x)
        x2 = x.clone()
        x2[1:] = torch.randn_like(x2[1:]) * 3
        b = m(x2)
    change = (a[0] - b[0]).abs().amax(-1)  # (T,)
    worst = change.max().item()
    where = "" if worst <= TOL else (f"sequence 0 changed by {worst:.2e} (first at position "
                                     f"{int((change > TOL).nonzero()[0])}) when its batch neighbours changed")
    return Check("batch independence", worst <= TOL, f"max change of a sequence: {worst:.1e}", where)


def check_determinism(build: Builder, d: int) -> Check:
    m1, m2 = build(), build()
    same = all(torch.equal(p, q) for p, q in zip(m1.state_dict().values(), m2.state_dict().values(), strict=True))
    x = torch.randn(B, T, d)
    with torch.no_grad():
        y1, y2, y3 = m1(x), m1(x), m2(x)
    err = max((y1 - y2).abs().max().item(), (y1 - y3).abs().max().item())
    ok = same and err == 0.0
    where = "" if ok else ("two builds under one seed hold different parameters" if not same
                           else f"two runs on the same input differ by {err:.2e}")
    return Check("determinism", ok, f"same seed: equal weights {same}, max output difference {err:.1e}", where)


def check_decoding(build: Builder, d: int) -> Check:
    m = build().eval()
    x = torch.randn(B, T, d)
    worst, where = 0.0, ""
    with torch.no_grad():
        full = m(x)
        for prefill in (1, 6):
            cache = m.init_cache(B, T)
            outs = [m.step(x[:, :prefill], cache)] + [m.step(x[:, t: t + 1], cache) for t in range(prefill, T)]
            stepped = torch.cat(outs, 1)
            err = (stepped - full).abs().amax(dim=(0, 2)) / full.abs().max().clamp_min(1e-12)  # per position
            if err.max().item() > worst:
                worst = err.max().item()
                if worst > DECODE_RTOL:
                    bad = int((err > DECODE_RTOL).nonzero()[0])
                    where = f"prefill {prefill}: position {bad} differs from the forward by {err[bad].item():.2e}"
            if cache.length != T:
                return Check("decoding", False, f"cache.length {cache.length} after {T} tokens")
    return Check("decoding", worst <= DECODE_RTOL, f"max relative error vs forward: {worst:.1e} (prefill 1, 6)",
                 where)


def check_state_bytes(build: Builder, d: int) -> Check:
    m = build()
    cache = m.init_cache(B, T)
    with torch.no_grad():
        m.step(torch.randn(B, T, d), cache)
    said, held = m.state_bytes(T, batch_size=B), cache.nbytes()
    if said is None:
        return Check("state bytes", False, f"state_bytes says unknown; the cache holds {held} bytes")
    later = m.state_bytes(4 * T, batch_size=B)
    grows = "constant in context" if later == said else f"grows with context ({said} -> {later} at {4 * T})"
    ok = said == held
    return Check("state bytes", ok, f"{held} bytes after {T} tokens, {grows}",
                 "" if ok else f"state_bytes says {said}, the cache holds {held}")


def check_flops(build: Builder, d: int) -> Check:
    f = build().flops_per_token(T)
    ok = f is None or (isinstance(f, int) and not isinstance(f, bool) and f > 0)
    return Check("flops per token", ok, "unknown" if f is None else f"{f:,}" if ok else repr(f),
                 "" if ok else "flops_per_token must be a positive int or None")


CHECKS: dict[str, Callable[[Builder, int], Check]] = {
    "shape": check_shape,
    "causality": check_causal,
    "finite_fp32": check_finite_fp32,
    "finite_bf16": check_finite_bf16,
    "batch_independence": check_batch_independence,
    "determinism": check_determinism,
    "decoding": check_decoding,
    "state_bytes": check_state_bytes,
    "flops": check_flops,
}


def check_mixer(mixer: str | type, options: dict[str, Any] | None = None, *, d_model: int = 32, seed: int = 0,
                only: tuple[str, ...] | None = None) -> list[Check]:
    """Every check (or ``only`` those) on ``mixer`` (a registered name, ``package.module:Class``, or a Mixer
    class) built at ``d_model`` with ``options``; each check builds the mixer afresh under ``seed`` and draws
    its inputs after seeding with ``seed + 1``."""
    import archs.mixers  # noqa: F401  (registers the built-ins)
    from registry import MIXERS

    def build() -> Any:
        torch.manual_seed(seed)
        if isinstance(mixer, type):
            return mixer(d_model=d_model, layer_idx=0, **(options or {})).eval()
        return MIXERS.create(mixer, d_model=d_model, layer_idx=0, **(options or {})).eval()

    results = []
    for key, fn in CHECKS.items():
        if only is None or key in only:
            torch.manual_seed(seed + 1)
            try:
                results.append(replace(fn(build, d_model), name=key))
            except Exception as exc:  # a check the mixer cannot even run fails, saying why
                results.append(Check(key, False, f"raised {type(exc).__name__}: {exc}"))
    return results
