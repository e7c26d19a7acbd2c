"""Measurement primitives: time, throughput and peak memory of a mixer layer or a model.

Peak memory on CPU is the process's high-water resident size (VmHWM) minus a baseline taken after a
warm-up at a tiny size; the high-water mark is reset first (``echo 5 > /proc/self/clear_refs``). On CUDA
it is the allocator's peak (``max_memory_allocated``). Numbers taken one after another in one process drift
(the allocator keeps freed memory), so every measurement runs in its own process (`experiments.child`).
`StepPeak` is the training loop's figure: the first steps' peak above a baseline taken before the model
exists, so parameters, gradients, optimiser state and activations count, and the data does not.

What is measured is a *target*, a JSON-ready dict made by `resolve_target`: one registered mixer layer
(name + options + ``d_model``) or a whole model (a `ModelSpec` from a preset, a spec file or a run
directory). In the child process

- `bench(target, seq_len=..., mode="fwd"|"fwdbwd"|"train")`: median time, tokens/s and peak memory of a
  forward pass, a forward+backward pass, or a whole training step (the model built after the baseline, an
  AdamW step included: the same figure as a training run's);
- `bench_decode(target, context=L, steps=N)`: prefill ``L`` tokens into the target's cache, then time
  ``N`` single-token steps; the cache's measured bytes beside the analytic ``state_bytes(L)``.

Every result carries the analytic numbers (``flops_per_token``, ``state_bytes``) beside the measured ones.
The long-context probes built on these live in `experiments.probes`; the command in `experiments.cli.measure`.
"""

from __future__ import annotations

import gc
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

from experiments.errors import UsageError
from experiments.targets import build_target, resolve_target

__all__ = [
    "MODES",
    "PeakMemory",
    "StepPeak",
    "bench",
    "bench_decode",
    "bench_mixer",
    "bench_model",
    "calibrate",
    "memory_split",
    "precise_allocator",
    "rss_bytes",
    "time_and_peak",
]

MODES = ("fwd", "fwdbwd", "train")


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int:
    """Current resident set size of this process."""
    kb = _status_kb("VmRSS")
    if kb is not None:
        return kb * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # best effort off Linux


def _hwm_bytes() -> int:
    kb = _status_kb("VmHWM")
    return kb * 1024 if kb is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _mallopt(param: int, value: int) -> bool:
    """glibc's ``mallopt``; False where there is none (not glibc)."""
    try:
        import ctypes

        return bool(ctypes.CDLL(None).mallopt(param, value))
    except (OSError, AttributeError):
        return False


def precise_allocator(on: bool, threshold: int = 128 * 1024) -> bool:
    """Make CPU RSS track live memory (``on``), or favour speed again (``off``); False if not glibc.

    glibc serves blocks below its mmap threshold from a heap that keeps freed memory (the threshold grows
    with the blocks freed, up to 32 MiB), so a peak of RSS then counts allocator slack too: tens of MiB
    at mid sizes. ``on`` fixes the threshold (and the trim threshold) at ``threshold`` (128 KiB), so every
    tensor of note is its own mapping, returned to the system when freed; ``off`` sets them to 32 / 64 MiB
    (glibc's dynamic ceiling), since page-faulting fresh mappings slows mid-sized work by up to ~2x.
    """
    mmap, trim = (threshold, threshold) if on else (32 * 2**20, 64 * 2**20)
    return _mallopt(_M_MMAP_THRESHOLD, mmap) and _mallopt(_M_TRIM_THRESHOLD, trim)


class PeakMemory:
    """Context manager: peak memory above the level at entry (CPU: RSS high-water; CUDA: allocator).

    After exit: ``peak_bytes`` (above the baseline), ``baseline_bytes`` (RSS or allocated bytes at entry),
    ``method``; on CUDA also ``reserved_bytes`` (the allocator's reserved peak). On CPU with ``precise``
    the allocator returns freed blocks to the system while inside (`precise_allocator`), so the peak is
    that of live memory, not of the allocator's slack; it is set back to favour speed on exit.
    """

    def __init__(self, device: str = "cpu", precise: bool = True):
        self.device = str(device)
        self.precise = precise
        self.peak_bytes = 0
        self.baseline_bytes = 0
        self.method = ""

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            self.method = "cuda max_memory_allocated - baseline"
        else:
            self._precise = self.precise and precise_allocator(True)
            self._exact = _reset_hwm()
            self._base = rss_bytes()
            self.method = "VmHWM - baseline (clear_refs)" if self._exact else "ru_maxrss - baseline (no reset)"
            if self._precise:
                self.method += ", glibc mmap threshold 128 KiB"
        self.baseline_bytes = self._base
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            self.peak_bytes = max(0, torch.cuda.max_memory_allocated() - self._base)
            self.reserved_bytes = torch.cuda.max_memory_reserved()
        else:
            self.peak_bytes = max(0, _hwm_bytes() - self._base)
            if self._precise:
                precise_allocator(False)


class StepPeak:
    """The peak memory of a run's training steps above a baseline taken before its model exists.

    Create it once the data is ready and before the model is built: that takes the baseline (CPU: resident
    size with the allocator in `precise_allocator` mode; CUDA: allocated bytes). Build the model and the
    optimiser, load a checkpoint, then call `begin` just before the first measured step (it resets the
    high-water mark, so a checkpoint's transient copy is not counted) and `end` after the last one. The
    figure, ``peak_bytes``, counts parameters, gradients, optimiser state and activations; not the corpus, the
    evaluation set or the imports. Steps have the same shapes every time, so a few steps give the run's peak.
    """

    steps = 3  # training steps measured (fewer when an evaluation comes first)
    #: the glibc mmap threshold while measuring: a small model's tensors are often below 128 KiB, and served
    #: from a heap that may hold freed memory, its peak read 24-31 MiB in five runs at 128 KiB, 31-32 at 16 KiB
    threshold = 16 * 1024

    def __init__(self, device: str = "cpu"):
        self.device = str(device)
        self.peak_bytes: int | None = None
        self._open = False
        gc.collect()
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            self._base = torch.cuda.memory_allocated()
            self.method = "cuda max_memory_allocated - baseline before the model"
        else:
            self._precise = precise_allocator(True, self.threshold)
            self._exact = _reset_hwm()
            self._base = rss_bytes()
            self.method = ("VmHWM" if self._exact else "ru_maxrss") + " - baseline before the model" + (
                f", glibc mmap threshold {self.threshold // 1024} KiB" if self._precise else "")

    def begin(self) -> None:
        gc.collect()
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            _reset_hwm()
        self._open = True

    def end(self) -> int | None:
        """Read the peak (once; later calls return it again) and set the allocator back to favour speed."""
        if self._open:
            if self.device.startswith("cuda"):
                import torch

                torch.cuda.synchronize()
                self.peak_bytes = max(0, torch.cuda.max_memory_allocated() - self._base)
            else:
                self.peak_bytes = max(0, _hwm_bytes() - self._base)
            self._open = False
        if not self.device.startswith("cuda") and self._precise:
            precise_allocator(False)
            self._precise = False
        return self.peak_bytes


class SavedActivations:
    """Context manager: the bytes of the tensors autograd saves for backward inside it (a forward pass's
    activations), each storage counted once, the module's parameters left out. ``bytes`` after exit. An
    estimate: a saved tensor whose part of the graph is dropped during the pass is freed before the peak."""

    def __init__(self, module: Any):
        self.bytes = 0
        # a sharded (FSDP) parameter is a DTensor: its storage is the local shard's
        self._skip = {getattr(p, "_local_tensor", p).untyped_storage().data_ptr() for p in module.parameters()}
        self._seen: set[int] = set()

    def _pack(self, t: Any) -> Any:
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # a tensor without storage (e.g. a wrapper subclass)
            return t
        ptr = storage.data_ptr()
        if ptr not in self._skip and ptr not in self._seen:
            self._seen.add(ptr)
            self.bytes += storage.nbytes()
        return t

    def __enter__(self) -> SavedActivations:
        import torch

        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)


def memory_split(module: Any, optimizer: Any, activations_saved: int | None) -> dict[str, int | None]:
    """What a training step's memory is made of, in bytes: parameters, their gradients, the optimiser's
    state, and the activations autograd saved (`SavedActivations`; None when not counted)."""
    import torch

    params = {id(p): p for p in module.parameters()}.values()
    nbytes = sum(p.numel() * p.element_size() for p in params)
    grads = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    state = sum(t.numel() * t.element_size() for st in optimizer.state.values() for t in st.values()
                if torch.is_tensor(t))
    return {"params": nbytes, "grads": grads, "optimizer": state, "activations_saved": activations_saved}


def time_and_peak(fn: Callable[[], Any], *, repeats: int = 3, warmup: Callable[[], Any] | None = None,
                  device: str = "cpu") -> dict[str, Any]:
    """Run ``warmup`` (tiny size); then ``fn`` once for the peak memory above the post-warm-up baseline
    (`PeakMemory`); then once more untimed (allocator growth) and ``repeats`` timed runs (median seconds)."""
    sync = _sync(device)
    if warmup is not None:
        warmup()
        sync()
    with PeakMemory(device) as pm:
        fn()
        sync()
    fn()
    sync()
    times = _times(fn, repeats, sync)
    out = {"time_s": statistics.median(times), "times_s": times, "peak_bytes": pm.peak_bytes,
           "baseline_bytes": pm.baseline_bytes, "memory_method": pm.method}
    if hasattr(pm, "reserved_bytes"):
        out["reserved_bytes"] = pm.reserved_bytes
    return out


def _times(fn: Callable[[], Any], repeats: int, sync: Callable[[], None]) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn`` (synchronised on CUDA)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def _sync(device: str) -> Callable[[], None]:
    if str(device).startswith("cuda"):
        import torch

        return torch.cuda.synchronize
    return lambda: None


def calibrate(nbytes: int = 200 * 2**20) -> dict[str, Any]:
    """Allocate and touch a float32 tensor of ``nbytes`` inside `PeakMemory`: a check of the memory method
    (run it through `run_isolated`; ``peak_bytes`` should be close to ``nbytes``)."""
    import torch

    torch.zeros(16)  # first touch of the allocator outside the measurement
    with PeakMemory("cpu") as pm:
        t = torch.empty(nbytes // 4, dtype=torch.float32)
        t.fill_(1.0)
        del t
    return {"nbytes": nbytes, "peak_bytes": pm.peak_bytes, "baseline_bytes": pm.baseline_bytes,
            "memory_method": pm.method}


def _analytic(module: Any, target: dict[str, Any], seq_len: int, batch: int, dtype: str) -> dict[str, Any]:
    import torch

    flops = module.flops_per_token(seq_len)
    state = module.state_bytes(seq_len, batch, getattr(torch, dtype))
    out = {"flops_per_token": flops, "state_bytes": state, "params": sum(p.numel() for p in module.parameters()),
           "threads": torch.get_num_threads()}
    if target["kind"] == "mixer":
        out["backend"] = module.backend
    else:
        backends = module.backends()
        out["backends"] = backends
        out["backend"] = ",".join(sorted({str(b) for b in backends.values()}))
    return out


def _inputs(target: dict[str, Any], module: Any, batch: int, t: int, device: str, dtype: Any, grad: bool) -> Any:
    import torch

    if target["kind"] == "mixer":
        return torch.randn(batch, t, target["d_model"], device=device, dtype=dtype, requires_grad=grad)  # (B, T, D)
    return torch.randint(module.spec.vocab_size, (batch, t), device=device)  # (B, T)


def _loss(target: dict[str, Any], module: Any, x: Any) -> Any:
    return module(x).float().square().mean() if target["kind"] == "mixer" else module.loss(x, x)


def bench(target: dict[str, Any], *, seq_len: int, batch: int = 1, mode: str = "fwdbwd", repeats: int = 3,
          device: str = "cpu", dtype: str = "float32", seed: int = 0) -> dict[str, Any]:
    """Time, tokens/s and peak memory of a target at ``(batch, seq_len)``: its forward pass (``fwd``), its
    forward+backward pass (``fwdbwd``; the module exists before the baseline, so its weights are not in the
    peak), or a whole training step (``train``: forward, backward and an AdamW step, the module built after
    the baseline, as in a training run: parameters, gradients, optimiser state and activations count); with
    the analytic FLOPs per token and cache bytes. Run it in a fresh process."""
    import torch

    if mode not in MODES:
        raise UsageError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "train":
        out, module = _bench_train(target, seq_len=seq_len, batch=batch, repeats=repeats, device=device,
                                   dtype=dtype, seed=seed)
    else:
        torch.manual_seed(seed)
        module = build_target(target, device, dtype)
        module.train(mode == "fwdbwd")
        dt = getattr(torch, dtype)

        def make_step(t: int) -> Callable[[], None]:
            x = _inputs(target, module, batch, t, device, dt, grad=mode == "fwdbwd")

            def step() -> None:
                if mode == "fwd":
                    with torch.no_grad():
                        module(x)
                else:
                    _loss(target, module, x).backward()
                    x.grad = None
                    module.zero_grad(set_to_none=True)

            return step

        out = time_and_peak(make_step(seq_len), repeats=repeats, warmup=make_step(min(seq_len, 32)), device=device)
    tokens = batch * seq_len
    out.update(_analytic(module, target, seq_len, batch, dtype), label=target.get("label"), batch=batch,
               seq_len=seq_len, mode=mode, dtype=dtype, device=device, tokens_per_s=tokens / out["time_s"])
    if out["flops_per_token"] is not None:  # training ~ 3x the forward
        out["achieved_gflops"] = out["flops_per_token"] * (1 if mode == "fwd" else 3) * tokens / out["time_s"] / 1e9
    return out


def _bench_train(target: dict[str, Any], *, seq_len: int, batch: int, repeats: int, device: str, dtype: str,
                 seed: int) -> tuple[dict[str, Any], Any]:
    """`bench`'s ``train`` mode: warm up at a tiny size, take the baseline, build the module and its AdamW,
    run `StepPeak.steps` steps for the peak (the first counting the saved activations), then time
    ``repeats`` more."""
    import torch

    dt = getattr(torch, dtype)
    sync = _sync(device)

    def session(t: int) -> tuple[Any, Any, Callable[[], None]]:
        torch.manual_seed(seed)
        module = build_target(target, device, dtype).train()
        opt = torch.optim.AdamW(module.parameters(), lr=1e-4)
        x = _inputs(target, module, batch, t, device, dt, grad=False)

        def step() -> None:  # as a training run's: forward, backward, clipping, AdamW
            loss = _loss(target, module, x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
            opt.step()

        return module, opt, step

    _, _, warm = session(min(seq_len, 32))
    warm()
    del warm
    peak = StepPeak(device)
    module, opt, step = session(seq_len)
    peak.begin()
    with SavedActivations(module) as saved:
        step()
    for _ in range(StepPeak.steps - 1):
        step()
    sync()
    peak.end()
    times = _times(step, repeats, sync)
    return {"time_s": statistics.median(times), "times_s": times, "peak_bytes": peak.peak_bytes,
            "memory_method": peak.method, "memory_split": memory_split(module, opt, saved.bytes)}, module


def bench_mixer(name: str, options: dict | None = None, *, d_model: int = 256, batch: int = 4,
                seq_len: int = 1024, mode: str = "fwdbwd", repeats: int = 3, device: str = "cpu",
                dtype: str = "float32", seed: int = 0) -> dict[str, Any]:
    """Time and peak memory of one registered mixer layer, forward or forward+backward (see `bench`)."""
    target = {"kind": "mixer", "name": name, "options": dict(options or {}), "d_model": d_model, "label": name}
    out = bench(target, seq_len=seq_len, batch=batch, mode=mode, repeats=repeats, device=device, dtype=dtype,
                seed=seed)
    out.update(mixer=name, options=options or {}, d_model=d_model)
    return out


def bench_model(spec: dict[str, Any], *, batch: int = 1, seq_len: int = 256, mode: str = "fwdbwd",
                repeats: int = 3, device: str = "cpu", dtype: str = "float32", seed: int = 0) -> dict[str, Any]:
    """Time and peak memory of a whole model (a `ModelSpec` dict), forward or forward+backward (see `bench`)."""
    return bench(resolve_target(spec=spec), seq_len=seq_len, batch=batch, mode=mode, repeats=repeats,
                 device=device, dtype=dtype, seed=seed)


def bench_decode(target: dict[str, Any], *, context: int, steps: int = 32, batch: int = 1, device: str = "cpu",
                 dtype: str = "float32", seed: int = 0, warmup_steps: int = 4) -> dict[str, Any]:
    """Prefill ``context`` tokens into the target's decoding cache, then time ``steps`` single-token steps.

    Returns the median per-token latency (``latency_s``; ``latency_min_s``, the fastest step, is the
    steadier number on a busy machine), tokens/s (``batch / latency``), the prefill time,
    the cache's measured bytes after the prefill (``cache_bytes``, from ``cache.nbytes()``) beside the
    analytic ``state_bytes(context)``, and the peak memory of the prefill (the cache included; the prefill
    time is taken with the allocator in `PeakMemory`'s precise mode, so it is a little pessimistic).
    """
    import torch

    if context < 1 or steps < 1:
        raise UsageError(f"context and steps must be positive, got context={context}, steps={steps}")
    torch.manual_seed(seed)
    module = build_target(target, device, dtype).eval()
    dt = getattr(torch, dtype)
    sync = _sync(device)
    total = context + warmup_steps + steps

    if target["kind"] == "mixer":
        d = target["d_model"]

        def new_cache(n: int) -> Any:
            return module.init_cache(batch, n, torch.device(device), dt)

        def feed(x: Any, cache: Any) -> Any:
            return module.step(x, cache)

        def inputs(t: int) -> Any:
            return torch.randn(batch, t, d, device=device, dtype=dt)  # (B, t, D)
    else:
        def new_cache(n: int) -> Any:
            return module.init_cache(batch, n)

        def feed(x: Any, cache: Any) -> Any:
            return module(x, cache)

        def inputs(t: int) -> Any:
            return torch.randint(module.spec.vocab_size, (batch, t), device=device)  # (B, t)

    with torch.no_grad():
        warm = new_cache(16 + warmup_steps)  # kernels and allocator warm-up at a tiny size
        feed(inputs(16), warm)
        for _ in range(warmup_steps):
            feed(inputs(1), warm)
        del warm
        prompt = inputs(context)
        tokens = [inputs(1) for _ in range(warmup_steps + steps)]
        sync()
        with PeakMemory(device) as pm:
            cache = new_cache(total)
            t0 = time.perf_counter()
            feed(prompt, cache)
            sync()
            prefill_s = time.perf_counter() - t0
        cache_bytes = cache.nbytes()
        for tok in tokens[:warmup_steps]:
            feed(tok, cache)
        times = []
        for tok in tokens[warmup_steps:]:
            t0 = time.perf_counter()
            feed(tok, cache)
            sync()
            times.append(time.perf_counter() - t0)
        final_bytes = cache.nbytes()
    latency = statistics.median(times)
    out = _analytic(module, target, context, batch, dtype)
    out.update(label=target.get("label"), context=context, steps=steps, batch=batch, dtype=dtype, device=device,
               latency_s=latency, latency_min_s=min(times), latency_mean_s=statistics.fmean(times), latencies_s=times,
               tokens_per_s=batch / latency, prefill_s=prefill_s, prefill_tokens_per_s=batch * context / prefill_s,
               cache_bytes=cache_bytes, final_length=total, final_cache_bytes=final_bytes,
               final_state_bytes=module.state_bytes(total, batch, dt), peak_bytes=pm.peak_bytes,
               baseline_bytes=pm.baseline_bytes, memory_method=pm.method)
    out["decode_flops_per_token"] = _decode_flops(module, context)
    return out


def _decode_flops(module: Any, context: int) -> int | None:
    """FLOPs of one decoding step at ``context``: forward FLOPs/token at L+1 times (L+1) minus those at L."""
    a, b = module.flops_per_token(context + 1), module.flops_per_token(context)
    if a is None or b is None:
        return None
    return int(round(a * (context + 1) - b * context))
