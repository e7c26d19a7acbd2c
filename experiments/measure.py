"""Measurement: time, throughput and peak memory, each taken in a fresh subprocess; the `mixerlab measure` command.

Peak memory on CPU is the process's high-water resident size (VmHWM) minus a baseline taken after a
warm-up at a tiny size; the high-water mark is reset first (``echo 5 > /proc/self/clear_refs``). On CUDA
it is the allocator's peak (``max_memory_allocated``). Numbers taken one after another in one process drift
(the allocator keeps freed memory), so every measurement runs in its own process: `run_isolated`.

What is measured is a *target*, a JSON-ready dict made by `resolve_target`: one registered mixer layer
(name + options + ``d_model``) or a whole model (a `ModelSpec` from a preset, a spec file or a run
directory). In the child process

- `bench(target, seq_len=..., mode="fwd"|"fwdbwd")`: median time, tokens/s and peak memory of a forward
  or forward+backward pass;
- `bench_decode(target, context=L, steps=N)`: prefill ``L`` tokens into the target's cache, then time
  ``N`` single-token steps; the cache's measured bytes beside the analytic ``state_bytes(L)``.

Every result carries the analytic numbers (``flops_per_token``, ``state_bytes``) beside the measured ones.
The long-context probes built on these live in `experiments.probes`.

    mixerlab measure memory --mixer attention --option impl=math --lengths 512,1024,2048,4096 --budget-gb 4
    mixerlab measure speed  --preset transformer --d-model 256 --mode fwd --lengths 256,1024
    mixerlab measure decode --preset mamba --d-model 256 --lengths 256,1024,4096 --steps 32
    mixerlab measure context --run runs/my-run --multipliers 1,2,4,8
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "MODES",
    "MeasureError",
    "PeakMemory",
    "bench",
    "bench_decode",
    "bench_mixer",
    "bench_model",
    "build_target",
    "calibrate",
    "configure_parser",
    "length_limit",
    "machine_info",
    "precise_allocator",
    "resolve_target",
    "rss_bytes",
    "run_cli",
    "run_isolated",
    "time_and_peak",
]

_RESULT = "@@mixerlab-result@@ "
MODES = ("fwd", "fwdbwd")


class MeasureError(RuntimeError):
    """A measurement subprocess failed; the message carries the end of its output."""


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


def precise_allocator(on: bool) -> bool:
    """Make CPU RSS track live memory (``on``), or favour speed again (``off``); False if not glibc.

    glibc serves blocks below its mmap threshold from a heap that keeps freed memory (the threshold grows
    with the blocks freed, up to 32 MiB), so a peak of RSS then counts allocator slack too: tens of MiB
    at mid sizes. ``on`` fixes the threshold (and the trim threshold) at 128 KiB, so every tensor of note
    is its own mapping, returned to the system when freed; ``off`` sets them to 32 / 64 MiB (glibc's
    dynamic ceiling), since page-faulting fresh mappings slows mid-sized work by up to ~2x.
    """
    mmap, trim = (128 * 1024, 128 * 1024) if on else (32 * 2**20, 64 * 2**20)
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
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    out = {"time_s": statistics.median(times), "times_s": times, "peak_bytes": pm.peak_bytes,
           "baseline_bytes": pm.baseline_bytes, "memory_method": pm.method}
    if hasattr(pm, "reserved_bytes"):
        out["reserved_bytes"] = pm.reserved_bytes
    return out


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


# targets ----------------------------------------------------------------------------------------------------
def resolve_target(*, mixer: str | None = None, options: dict[str, Any] | None = None, d_model: int | None = None,
                   preset: str | None = None, spec: str | os.PathLike | dict | None = None,
                   run: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Validate what to measure and return it as a JSON-ready target for the child processes.

    Exactly one of ``mixer`` (a registry name, with ``options`` and ``d_model``, default 256), ``preset``
    (a named `ModelSpec` preset), ``spec`` (a ModelSpec dict or JSON file; a run's ``spec.json`` works too)
    or ``run`` (a training run directory). ``d_model`` and ``overrides`` (ModelSpec fields) apply to a
    preset or spec. Raises the registry's or the spec's error before any work is done.
    """
    given = [k for k, v in (("mixer", mixer), ("preset", preset), ("spec", spec), ("run", run)) if v is not None]
    if len(given) != 1:
        raise ValueError("give exactly one of --mixer NAME, --preset NAME, --spec FILE.json or --run DIR"
                         + (f" (got {', '.join(given)})" if given else ""))
    options = dict(options or {})
    overrides = dict(overrides or {})
    if mixer is not None:
        from registry import MIXERS

        if overrides:
            raise ValueError(f"--set {', '.join(overrides)} applies to a model (--preset/--spec), not to --mixer")
        d = 256 if d_model is None else d_model
        layer = MIXERS.create(mixer, d_model=d, layer_idx=0, **options)  # validates name, options and d_model
        opts = ",".join(f"{k}={v}" for k, v in options.items())
        return {"kind": "mixer", "name": mixer, "options": options, "d_model": d,
                "label": f"{mixer}({opts})" if opts else mixer, "params": sum(p.numel() for p in layer.parameters())}
    from archs.model import ModelSpec

    if options:
        raise ValueError("--option applies to --mixer; for a model use --set field=value "
                         "(e.g. --set mixer_options='{\"attention\": {\"impl\": \"math\"}}')")
    if d_model is not None:
        overrides["d_model"] = d_model
    run_dir = None
    if run is not None:
        run_dir = Path(run)
        if not (run_dir / "spec.json").is_file():
            raise FileNotFoundError(f"{run_dir} is not a run directory (no spec.json)")
        if overrides:
            raise ValueError(f"a run's model is fixed; --d-model/--set ({', '.join(overrides)}) cannot change it")
        data = json.loads((run_dir / "spec.json").read_text())["model"]
        label = f"run {run_dir.name}"
        model_spec = ModelSpec.from_dict(data)
    elif preset is not None:
        model_spec = ModelSpec.from_preset(preset, **overrides)
        label = f"preset {preset}" + "".join(f" {k}={v}" for k, v in overrides.items())
    else:
        if isinstance(spec, dict):
            data, label = spec, "spec"
        else:
            path = Path(spec)  # type: ignore[arg-type]
            if not path.is_file():
                raise FileNotFoundError(f"--spec {path}: no such file")
            data, label = json.loads(path.read_text()), f"spec {path.name}"
        if "model" in data and isinstance(data["model"], dict):  # a run's spec.json
            data = data["model"]
        if overrides:
            data = {k: v for k, v in data.items() if k != "resolved_layers"}
            data.update(overrides)
            label += "".join(f" {k}={v}" for k, v in overrides.items())
        model_spec = ModelSpec.from_dict(data)
    mixers: dict[str, int] = {}
    for layer in model_spec.resolved_layers:
        mixers[layer.mixer] = mixers.get(layer.mixer, 0) + 1
    out = {"kind": "model", "spec": model_spec.to_dict(), "label": label,
           "layers": " ".join(f"{n}x{m}" for m, n in mixers.items())}
    if run_dir is not None:
        out["run"] = str(run_dir)
    return out


def length_limit(target: dict[str, Any]) -> int | None:
    """The longest sequence the target can run (learned positions' ``max_seq_len``), or ``None``."""
    if target.get("kind") == "model" and target["spec"].get("positions") == "learned":
        return int(target["spec"]["max_seq_len"])
    return None


def build_target(target: dict[str, Any], device: str = "cpu", dtype: str = "float32") -> Any:
    """The module a target names (a mixer layer or a `LanguageModel`, fresh weights), on ``device``."""
    import torch

    dt = getattr(torch, dtype)
    if target["kind"] == "mixer":
        from registry import MIXERS

        module = MIXERS.create(target["name"], d_model=target["d_model"], layer_idx=0, **target["options"])
    elif target["kind"] == "model":
        from archs.model import LanguageModel, ModelSpec

        module = LanguageModel(ModelSpec.from_dict(target["spec"]))
    else:
        raise ValueError(f"unknown target kind {target.get('kind')!r}; make targets with resolve_target")
    return module.to(device=device, dtype=dt)


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


def bench(target: dict[str, Any], *, seq_len: int, batch: int = 1, mode: str = "fwdbwd", repeats: int = 3,
          device: str = "cpu", dtype: str = "float32", seed: int = 0) -> dict[str, Any]:
    """Time, tokens/s and peak memory of a target's forward (``fwd``) or forward+backward (``fwdbwd``) pass
    at ``(batch, seq_len)``; with the analytic FLOPs per token and cache bytes. Run it in a fresh process."""
    import torch

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    torch.manual_seed(seed)
    module = build_target(target, device, dtype)
    module.train(mode == "fwdbwd")
    dt = getattr(torch, dtype)

    def make_step(t: int) -> Callable[[], None]:
        if target["kind"] == "mixer":
            x = torch.randn(batch, t, target["d_model"], device=device, dtype=dt, requires_grad=mode == "fwdbwd")

            def loss() -> Any:
                return module(x).float().square().mean()

            def fwd() -> None:
                module(x)
        else:
            ids = torch.randint(module.spec.vocab_size, (batch, t), device=device)  # (B, T)

            def loss() -> Any:
                return module.loss(ids, ids)

            def fwd() -> None:
                module(ids)

        def step() -> None:
            if mode == "fwd":
                with torch.no_grad():
                    fwd()
            else:
                loss().backward()
                if target["kind"] == "mixer":
                    x.grad = None
                module.zero_grad(set_to_none=True)

        return step

    out = time_and_peak(make_step(seq_len), repeats=repeats, warmup=make_step(min(seq_len, 32)), device=device)
    tokens = batch * seq_len
    out.update(_analytic(module, target, seq_len, batch, dtype), label=target.get("label"), batch=batch,
               seq_len=seq_len, mode=mode, dtype=dtype, device=device, tokens_per_s=tokens / out["time_s"])
    if out["flops_per_token"] is not None:  # training ~ 3x the forward
        out["achieved_gflops"] = out["flops_per_token"] * (3 if mode == "fwdbwd" else 1) * tokens / out["time_s"] / 1e9
    return out


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
        raise ValueError(f"context and steps must be positive, got context={context}, steps={steps}")
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


def machine_info() -> dict[str, Any]:
    """Where a result was measured."""
    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as f:
            info["memory_gb"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name()
    return info


def run_isolated(target: str, kwargs: dict | None = None, *, threads: int | None = None,
                 timeout: float | None = None) -> dict[str, Any]:
    """Call ``target`` (``"package.module:function"``) with ``kwargs`` in a fresh Python process and return
    the dict it returns. ``threads`` sets torch's intra-op threads there. A failure raises `MeasureError`
    with the end of the child's output (its exception message last)."""
    payload = json.dumps({"target": target, "kwargs": kwargs or {}, "threads": threads})
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    try:
        proc = subprocess.run([sys.executable, "-m", "experiments.measure"], input=payload, text=True,
                              capture_output=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as exc:
        raise MeasureError(f"{target} did not finish within {timeout} s") from exc
    for line in proc.stdout.splitlines():
        if line.startswith(_RESULT):
            return json.loads(line[len(_RESULT):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
    why = f"exit code {proc.returncode}" + (" (killed: out of memory?)" if proc.returncode in (-9, 137) else "")
    short = {k: v for k, v in (kwargs or {}).items() if k != "target"}
    raise MeasureError(f"{target}({short}) failed with {why}:\n" + "\n".join(tail))


def _worker() -> None:
    from registry import import_object

    job = json.loads(sys.stdin.read())
    import torch

    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    torch.set_flush_denormal(True)
    result = import_object(job["target"])(**job["kwargs"])
    sys.stdout.write(_RESULT + json.dumps(result) + "\n")
    sys.stdout.flush()


# the `mixerlab measure` command -----------------------------------------------------------------------------
DEFAULT_LENGTHS = {"memory": "512,1024,2048,4096", "speed": "512,1024,2048,4096", "decode": "256,1024,4096"}


def _add_target_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("what to measure (one of)")
    g.add_argument("--mixer", metavar="NAME", help="one registered mixer layer (see `mixerlab list`)")
    g.add_argument("--preset", metavar="NAME", help="a whole model from a named preset (e.g. transformer, mamba)")
    g.add_argument("--spec", metavar="FILE.json",
                   help="a whole model from a ModelSpec JSON file (or a run's spec.json)")
    g.add_argument("--run", metavar="DIR", help="the model of a training run directory")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a mixer option (repeatable; values parse as JSON, else as text), e.g. --option impl=math")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a ModelSpec field of a --preset/--spec model (repeatable), e.g. --set n_layers=2")
    p.add_argument("--d-model", type=int, default=None,
                   help="width: of the mixer layer (default 256) or of a --preset/--spec model")
    p.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu) | cpu | cuda[:N]")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))


def _add_common_args(p: argparse.ArgumentParser, lengths: str | None) -> None:
    if lengths is not None:
        p.add_argument("--lengths", nargs="+", default=[lengths], metavar="T",
                       help=f"sequence/context lengths, comma- or space-separated (default {lengths})")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads in each measurement process")
    p.add_argument("--timeout", type=float, default=1800, help="seconds allowed per measurement process")
    p.add_argument("--out", type=Path, default=None,
                   help="results directory (default runs/measure/<what>-<date-time>); gets results.json and .md")


def configure_parser(p: argparse.ArgumentParser) -> None:
    """Add the ``memory | speed | decode | context`` subcommands of ``mixerlab measure`` to ``p``."""
    p.description = ("Measure time, memory and long-context behaviour, each measurement in a fresh process. "
                     "Results (with the analytic FLOPs and cache bytes beside the measured numbers) go to "
                     "--out as results.json and results.md.")
    sub = p.add_subparsers(dest="measure_command", metavar="WHAT")
    helps = {
        "memory": "peak memory and time vs sequence length, fitted exponents, the largest T within --budget-gb",
        "speed": "time and tokens/s vs sequence length (forward or forward+backward), fitted time exponent",
        "decode": "per-token decoding latency and cache bytes vs context length (prefill L, then N steps)",
        "context": "a trained run: loss vs position and vs length (1x..8x training), or task accuracy vs length",
    }
    for name in ("memory", "speed", "decode"):
        q = sub.add_parser(name, help=helps[name], description=helps[name])
        _add_target_args(q)
        _add_common_args(q, DEFAULT_LENGTHS[name])
        if name != "decode":
            q.add_argument("--mode", default="fwdbwd" if name == "memory" else "fwd", choices=MODES,
                           help="fwd (inference) or fwdbwd (a training step's forward+backward)")
            q.add_argument("--repeats", type=int, default=3, help="timed repeats per length (median reported)")
        if name == "memory":
            q.add_argument("--budget-gb", type=float, default=None,
                           help="memory budget (GiB) for the largest-T estimate (peak above the baseline)")
        if name == "decode":
            q.add_argument("--steps", type=int, default=32, help="single-token steps timed after the prefill")
    q = sub.add_parser("context", help=helps["context"], description=helps["context"])
    q.add_argument("--run", metavar="DIR", required=True, help="a training run directory (spec.json, checkpoint.pt)")
    q.add_argument("--multipliers", nargs="+", default=["1,2,4,8"], metavar="M",
                   help="evaluation lengths as multiples of the training length (corpus runs; default 1,2,4,8)")
    q.add_argument("--bins", type=int, default=8, help="position bins per length (default 8)")
    q.add_argument("--tokens", type=int, default=32768, help="validation tokens per length (default 32768)")
    q.add_argument("--examples", type=int, default=None, help="test examples per slice (task runs)")
    q.add_argument("--batch", type=int, default=8, help="evaluation batch size (default 8)")
    q.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    _add_common_args(q, None)


class _UsageError(ValueError):
    pass


def _numbers(items: list[str], what: str, cast: type = int) -> list[Any]:
    out = []
    for item in items:
        for part in str(item).replace(",", " ").split():
            try:
                v = cast(part)
            except ValueError:
                v = None
            if v is None or v <= 0:
                raise _UsageError(f"{what}: {part!r} is not a positive {'integer' if cast is int else 'number'} "
                                  f"(give e.g. {what} 512,1024,2048)")
            out.append(v)
    if not out:
        raise _UsageError(f"{what}: give at least one value")
    return sorted(set(out))


def _pairs(items: list[str], flag: str) -> dict[str, Any]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise _UsageError(f"{flag} {item!r}: expected KEY=VALUE, e.g. {flag} impl=math")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise _UsageError(f"--device {name}: no CUDA device is available here; use --device cpu")
    if name != "cpu" and not name.startswith("cuda"):
        raise _UsageError(f"--device {name!r}: use auto, cpu or cuda[:N]")
    return name


def _positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        v = getattr(args, name, None)
        if v is not None and v <= 0:
            raise _UsageError(f"--{name.replace('_', '-')} must be positive, got {v}")


def _command_line(args: argparse.Namespace) -> str:
    skip = {"measure_command", "command", "verbose"}
    parts = ["mixerlab", "measure", args.measure_command]
    for key, value in vars(args).items():
        if key in skip or key.startswith("_") or value is None or value == [] or callable(value):
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, list):
            if key in ("option", "set"):
                parts += [x for v in value for x in (flag, str(v))]
            else:
                parts += [flag, ",".join(map(str, value))]
        else:
            parts += [flag, str(value)]
    return shlex.join(parts)


def _mib(b: float | None) -> str:
    if b is None:
        return "-"
    m = b / 2**20
    return f"{m:,.1f}" if m >= 10 or m == 0 else f"{m:.3g}"


def _fmt(v: float | None, spec: str = ".3g") -> str:
    return "-" if v is None else format(v, spec)


def _fit_line(name: str, fit: dict[str, Any] | None, unit: str = "T") -> str:
    if fit is None:
        return f"{name} ∝ {unit}^k: not enough points above the noise floor to fit"
    dropped = f"; left out (below noise): {fit['dropped']}" if fit["dropped"] else ""
    return (f"{name} ∝ {unit}^{fit['exponent']:.2f} (least squares over {unit} = {fit['used']}, "
            f"R² = {fit['r2']:.3f}{dropped})")


def _render(what: str, result: dict[str, Any]) -> tuple[list[str], list[list[str]], list[str]]:
    """(header, rows, notes) of the short table for a result."""
    notes: list[str] = []
    if what in ("memory", "speed"):
        header = ["T", "time (s)", "tokens/s", "peak MiB", "state MiB (analytic)", "GFLOP/token (analytic)",
                  "status"]
        rows = [[str(r["seq_len"]), _fmt(r.get("time_s")), _fmt(r.get("tokens_per_s"), ",.0f"),
                 _mib(r.get("peak_bytes")), _mib(r.get("state_bytes")),
                 _fmt(r["flops_per_token"] / 1e9 if r.get("flops_per_token") is not None else None, ".4g"),
                 r["status"]] for r in result["rows"]]
        notes.append(_fit_line("peak memory", result["fit"]["memory"]))
        notes.append(_fit_line("time", result["fit"]["time"]))
        b = result.get("budget")
        if b:
            t = "unbounded" if b["seq_len"] is None else f"T = {b['seq_len']:,}"
            est = f" (fit's estimate {b['estimate']:,})" if b.get("estimate") and b["how"] == "measured" else ""
            notes.append(f"largest T within {b['budget_bytes'] / 2**30:g} GiB: {t}, {b['how']}{est}"
                         + (f"; {b['note']}" if b.get("note") else ""))
    elif what == "decode":
        header = ["context", "ms/token (median)", "ms/token (min)", "tokens/s", "prefill (s)",
                  "cache MiB (measured)", "cache MiB (analytic)", "MFLOP/step (analytic)", "prefill peak MiB",
                  "status"]
        rows = [[str(r["context"]), _fmt(r["latency_s"] * 1e3 if "latency_s" in r else None, ".3f"),
                 _fmt(r["latency_min_s"] * 1e3 if "latency_min_s" in r else None, ".3f"),
                 _fmt(r.get("tokens_per_s"), ",.1f"), _fmt(r.get("prefill_s")), _mib(r.get("cache_bytes")),
                 _mib(r.get("state_bytes")),
                 _fmt(r["decode_flops_per_token"] / 1e6 if r.get("decode_flops_per_token") else None, ".4g"),
                 _mib(r.get("peak_bytes")), r["status"]] for r in result["rows"]]
        notes.append(_fit_line("per-token latency (median)", result["fit"]["latency"], "L"))
        notes.append(_fit_line("per-token latency (min)", result["fit"]["latency_min"], "L"))
        notes.append(_fit_line("cache bytes", result["fit"]["cache_bytes"], "L"))
        if result.get("growth") is not None:
            notes.append(f"latency at the longest context / at the shortest: {result['growth']:.2f}x (median), "
                         f"{result['growth_min']:.2f}x (min)")
    elif result["probe"] == "loss_vs_length":
        header = ["length", "x train", "loss", "ppl", "loss ≤ train len", "loss > train len", "status"]
        rows = [[str(r["seq_len"]), f"{r['multiplier']:g}", _fmt(r.get("loss"), ".4f"), _fmt(r.get("ppl"), ".3f"),
                 _fmt(r.get("loss_within_train_len"), ".4f"), _fmt(r.get("loss_beyond_train_len"), ".4f"),
                 r["status"]] for r in result["rows"]]
        for r in result["rows"]:
            if r["status"] == "ok":
                notes.append(f"loss by position at {r['seq_len']}: " + ", ".join(
                    f"[{b['start']},{b['end']}) {_fmt(b['loss'], '.3f')}" for b in r["by_position"]))
    else:
        header = ["slice", "length", "x train", "accuracy", "exact match", "status"]
        rows = [[r["slice"], str(r["seq_len"]), f"{r['multiplier']:g}", _fmt(r.get("accuracy"), ".3f"),
                 _fmt(r.get("exact_match"), ".3f"), r["status"]] for r in result["rows"]]
        notes.append("accuracy by length: " + ", ".join(
            f"{b['seq_len']}: {_fmt(b.get('accuracy'), '.3f') if b['status'] == 'ok' else b['status']}"
            for b in result["by_seq_len"]))
    return header, rows, notes


def _text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _plan(args: argparse.Namespace) -> dict[str, Any]:
    """Validate every input and say what to run; raises before any measurement starts."""
    what = args.measure_command
    if what is None:
        raise _UsageError("say what to measure: mixerlab measure memory|speed|decode|context (see --help)")
    _positive(args, "batch", "threads", "timeout", "repeats", "steps", "budget_gb", "bins", "tokens", "examples",
              "d_model")
    device = _device(args.device)
    if what == "context":
        if not (Path(args.run) / "spec.json").is_file():
            raise _UsageError(f"--run {args.run}: not a run directory (no spec.json)")
        if not (Path(args.run) / "checkpoint.pt").is_file():
            raise _UsageError(f"--run {args.run}: no checkpoint.pt (the run saved no evaluation yet)")
        return {"kwargs": {"run": str(args.run), "multipliers": _numbers(args.multipliers, "--multipliers", float),
                           "bins": args.bins, "tokens": args.tokens, "examples": args.examples,
                           "batch": args.batch, "device": device}}
    lengths = _numbers(args.lengths, "--lengths")
    target = resolve_target(mixer=args.mixer, options=_pairs(args.option, "--option"), d_model=args.d_model,
                            preset=args.preset, spec=args.spec, run=args.run, overrides=_pairs(args.set, "--set"))
    return {"target": target, "lengths": lengths, "device": device}


def run_cli(args: argparse.Namespace) -> int:
    """Run ``mixerlab measure WHAT`` from parsed arguments; write ``results.json`` and ``results.md`` to
    ``--out``; print a short table. Returns 0, 1 when nothing could be measured, 2 on bad input."""
    what = getattr(args, "measure_command", None)
    try:
        plan = _plan(args)
    except (ValueError, KeyError, FileNotFoundError, TypeError) as exc:
        print(f"mixerlab measure{' ' + what if what else ''}: error: {exc}", file=sys.stderr)
        return 2
    command = _command_line(args)
    started = time.time()

    def show(row: dict[str, Any]) -> None:
        key = "seq_len" if "seq_len" in row else "context"
        extra = ""
        if row.get("status") == "ok":
            if "latency_s" in row:
                extra = f"{row['latency_s'] * 1e3:.3f} ms/token, cache {_mib(row['cache_bytes'])} MiB"
            else:
                extra = f"{row['time_s']:.4f} s, peak {_mib(row['peak_bytes'])} MiB"
        print(f"  {key}={row[key]}: {extra or row.get('status')}", file=sys.stderr, flush=True)

    if what in ("memory", "speed"):
        print(f"measuring {plan['target']['label']} at T = {plan['lengths']} ({args.mode}, batch {args.batch}) ...",
              file=sys.stderr, flush=True)
        budget = args.budget_gb * 2**30 if getattr(args, "budget_gb", None) else None
        result = _probes().scaling_probe(plan["target"], plan["lengths"], mode=args.mode, batch=args.batch,
                                         repeats=args.repeats, budget_bytes=budget, device=plan["device"],
                                         dtype=args.dtype, threads=args.threads, timeout=args.timeout, on_row=show)
        ok = any(r["status"] == "ok" for r in result["rows"])
    elif what == "decode":
        print(f"decoding {plan['target']['label']} after contexts {plan['lengths']} ({args.steps} steps, "
              f"batch {args.batch}) ...", file=sys.stderr, flush=True)
        result = _probes().decode_probe(plan["target"], plan["lengths"], steps=args.steps, batch=args.batch,
                                        device=plan["device"], dtype=args.dtype, threads=args.threads,
                                        timeout=args.timeout, on_row=show)
        ok = any(r["status"] == "ok" for r in result["rows"])
    else:
        print(f"evaluating {args.run} vs length ...", file=sys.stderr, flush=True)
        try:
            result = run_isolated("experiments.probes:context_probe", plan["kwargs"], threads=args.threads,
                                  timeout=args.timeout)
        except MeasureError as exc:
            print(f"mixerlab measure context: error: {exc}", file=sys.stderr)
            return 1
        ok = any(r["status"] == "ok" for r in result["rows"])

    out = args.out or Path("runs") / "measure" / f"{what}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"command": command, "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "machine": machine_info(), "what": what, "wall_s": time.time() - started, "result": result}
    (out / "results.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    header, rows, notes = _render(what, result)
    title = {"memory": "Peak memory and time vs length", "speed": "Time and throughput vs length",
             "decode": "Decoding latency and cache vs context", "context": "Long-context quality vs length"}[what]
    subject = result.get("target", {}).get("label") or result.get("run")
    m = record["machine"]
    setup = ""
    if what in ("memory", "speed"):
        setup = f"mode {result['mode']}, batch {result['batch']}, {result['dtype']}, {result['device']}. "
    elif what == "decode":
        setup = f"{result['steps']} timed steps, batch {result['batch']}, {result['dtype']}, {result['device']}. "
    md = [f"# {title}: {subject}", "", f"Command: `{command}` — {record['date']}, {m['cpu']}, "
          f"{m['cpu_count']} CPUs, torch {m['torch']}" + (f", {m['cuda_device']}" if "cuda_device" in m else "")
          + ".", "", setup + "Memory is the peak above a post-warm-up baseline, each length in a fresh process; "
          "analytic columns come from the mixers' cost formulas.", "", _md_table(header, rows), ""]
    md += [f"- {n}" for n in notes]
    (out / "results.md").write_text("\n".join(md) + "\n")
    print(f"{title}: {subject}")
    print(_text_table(header, rows))
    for n in notes:
        print(n)
    print(f"results: {out / 'results.json'}, {out / 'results.md'}")
    return 0 if ok else 1


def _probes() -> Any:
    from experiments import probes

    return probes


if __name__ == "__main__":
    _worker()
