"""Measurement: time and peak memory, each taken in a fresh subprocess.

Peak memory on CPU is the process's high-water resident size (VmHWM) minus a baseline taken after a
warm-up at a tiny size; the high-water mark is reset first (``echo 5 > /proc/self/clear_refs``). On CUDA
it is the allocator's peak (``max_memory_allocated``). Numbers taken one after another in one process drift
(the allocator keeps freed memory), so every measurement runs in its own process: `run_isolated`.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

__all__ = [
    "MeasureError",
    "PeakMemory",
    "bench_mixer",
    "machine_info",
    "rss_bytes",
    "run_isolated",
    "time_and_peak",
]

_RESULT = "@@mixerlab-result@@ "


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


class PeakMemory:
    """Context manager: peak memory above the level at entry (CPU: RSS high-water; CUDA: allocator)."""

    def __init__(self, device: str = "cpu"):
        self.device = str(device)
        self.peak_bytes = 0
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
            self._exact = _reset_hwm()
            self._base = rss_bytes()
            self.method = "VmHWM - baseline (clear_refs)" if self._exact else "ru_maxrss - baseline (no reset)"
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            self.peak_bytes = max(0, torch.cuda.max_memory_allocated() - self._base)
            self.reserved_bytes = torch.cuda.max_memory_reserved()
        else:
            self.peak_bytes = max(0, _hwm_bytes() - self._base)


def time_and_peak(fn: Callable[[], Any], *, repeats: int = 3, warmup: Callable[[], Any] | None = None,
                  device: str = "cpu") -> dict[str, Any]:
    """Run ``warmup`` (tiny size), then ``fn`` ``repeats`` times; median seconds and peak bytes above the
    post-warm-up baseline. The first full-size run is timed but not counted (allocator growth)."""
    sync = _sync(device)
    if warmup is not None:
        warmup()
        sync()
    with PeakMemory(device) as pm:
        fn()
        sync()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
    return {"time_s": statistics.median(times), "times_s": times, "peak_bytes": pm.peak_bytes,
            "memory_method": pm.method}


def _sync(device: str) -> Callable[[], None]:
    if str(device).startswith("cuda"):
        import torch

        return torch.cuda.synchronize
    return lambda: None


def bench_mixer(name: str, options: dict | None = None, *, d_model: int = 256, batch: int = 4,
                seq_len: int = 1024, mode: str = "fwdbwd", repeats: int = 3, device: str = "cpu",
                dtype: str = "float32", seed: int = 0) -> dict[str, Any]:
    """Time and peak memory of one registered mixer layer, forward or forward+backward."""
    import torch

    from registry import MIXERS

    if mode not in ("fwd", "fwdbwd"):
        raise ValueError(f"mode must be 'fwd' or 'fwdbwd', got {mode!r}")
    torch.manual_seed(seed)
    dt = getattr(torch, dtype)
    layer = MIXERS.create(name, d_model=d_model, layer_idx=0, **(options or {})).to(device=device, dtype=dt)

    def make_step(t: int) -> Callable[[], None]:
        x = torch.randn(batch, t, d_model, device=device, dtype=dt, requires_grad=mode == "fwdbwd")

        def step() -> None:
            if mode == "fwd":
                with torch.no_grad():
                    layer(x)
            else:
                layer(x).square().mean().backward()
                x.grad = None
                layer.zero_grad(set_to_none=True)

        return step

    out = time_and_peak(make_step(seq_len), repeats=repeats, warmup=make_step(min(seq_len, 32)), device=device)
    out.update(mixer=name, options=options or {}, backend=layer.backend, d_model=d_model, batch=batch,
               seq_len=seq_len, mode=mode, dtype=dtype, device=device,
               tokens_per_s=batch * seq_len / out["time_s"])
    return out


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
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name()
    return info


def run_isolated(target: str, kwargs: dict | None = None, *, threads: int | None = None,
                 timeout: float | None = None) -> dict[str, Any]:
    """Call ``target`` (``"package.module:function"``) with ``kwargs`` in a fresh Python process and return
    the dict it returns. ``threads`` sets torch's intra-op threads there."""
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
    raise MeasureError(f"{target}({kwargs}) failed with exit code {proc.returncode}:\n" + "\n".join(tail))


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


if __name__ == "__main__":
    _worker()
