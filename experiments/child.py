"""The one subprocess protocol: call a function in a fresh Python process and talk to it.

Trials and measurements each run in a process of their own (isolation, and honest peak memory). The parent
starts ``python -m experiments.child`` and writes one JSON line: the function to call (``"pkg.mod:func"``),
its keyword arguments and the `Isolation` settings. The child answers on stdout with prefixed JSON lines:

- ``{"kind": "result", "data": ...}``: the function's return value (the last line);
- ``{"kind": "error", "type", "message", "traceback"}``: it raised; the parent raises `MeasureError` with it;
- any other kind: a message the function sent through its `Channel` (``channel.ask`` then reads one line of
  the parent's answer from stdin: a trial reports each evaluation and waits for "continue", "prune" or
  "stop").

Everything else the child prints goes to the parent's stderr file untouched.

    result = run_isolated("experiments.measure:bench", {"target": ..., "seq_len": 1024}, Isolation(threads=1))
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import traceback
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import IO, Any

from experiments.errors import MeasureError

__all__ = ["Channel", "ChildProcess", "Isolation", "Message", "run_isolated"]

PREFIX = "@@mixerlab@@ "


@dataclass(frozen=True)
class Isolation:
    """How a child process runs: torch threads (None: torch's default), a wall-clock limit in seconds
    (None: none), the device and dtype its measurements use, whether it ignores Ctrl-C (a trial's
    coordinator handles Ctrl-C and stops its children itself), and the signal it gets if its parent dies, so
    that no child outlives a killed coordinator."""

    threads: int | None = None
    timeout: float | None = None
    device: str = "cpu"
    dtype: str = "float32"
    ignore_sigint: bool = False
    on_parent_death: str = "SIGKILL"  # the signal the child gets when its parent dies (Linux); a trial takes
    # SIGTERM, which it answers with a checkpoint of its current step
    environ: tuple[tuple[str, str], ...] = ()  # variables set for the child (a trial: its study, for trackers)

    def env(self) -> dict[str, str]:
        env = {**os.environ, **dict(self.environ)}
        if self.threads:
            env.update(OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads))
        return env


@dataclass(frozen=True)
class Message:
    kind: str
    data: Any


class ChildProcess:
    """A running child: iterate `messages`, `reply` to the ones that ask, then read `result`.

    ``stderr``: an open file for the child's own output (default: a temporary file, kept for the error
    message). The `Isolation` timeout kills the child; `timed_out` then says so.
    """

    def __init__(self, call: str, kwargs: dict[str, Any] | None = None, isolation: Isolation = Isolation(),
                 *, stderr: IO[str] | None = None, channel: bool = False):
        self.call = call
        self.isolation = isolation
        self._own_stderr = stderr is None
        self.stderr = stderr if stderr is not None else tempfile.TemporaryFile("w+")  # noqa: SIM115 — closed by close()
        job = {"call": call, "kwargs": kwargs or {}, "isolation": asdict(isolation), "channel": channel,
               "parent": os.getpid()}
        self.proc = subprocess.Popen([sys.executable, "-m", "experiments.child"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.stderr, text=True, bufsize=1,
                                     env=isolation.env())
        self.timed_out = threading.Event()
        self._timer = None
        if isolation.timeout:
            self._timer = threading.Timer(isolation.timeout, self._expire)
            self._timer.daemon = True
            self._timer.start()
        self.result: Any = None
        self.error: dict[str, Any] | None = None
        self._send(json.dumps(job))

    def _expire(self) -> None:
        self.timed_out.set()
        self.kill()

    def _send(self, line: str) -> None:
        try:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # the child is gone; its exit code says why

    def messages(self) -> Iterator[Message]:
        """The child's messages until it exits; its result and error are kept, not yielded."""
        try:
            for line in self.proc.stdout:
                if not line.startswith(PREFIX):
                    continue
                msg = json.loads(line[len(PREFIX):])
                if msg["kind"] == "result":
                    self.result = msg["data"]
                elif msg["kind"] == "error":
                    self.error = msg
                else:
                    yield Message(msg["kind"], msg.get("data"))
        except (OSError, ValueError):
            pass
        self.proc.wait()

    def reply(self, answer: str) -> None:
        self._send(answer)

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()

    def stderr_tail(self, lines: int = 15) -> list[str]:
        try:
            self.stderr.flush()
            self.stderr.seek(0)
            return self.stderr.read().strip().splitlines()[-lines:]
        except (OSError, ValueError):
            return []

    def close(self) -> None:
        """Kill the child if it still runs (no orphans), stop the timer, close what we opened."""
        self.kill()
        self.proc.wait()
        if self._timer is not None:
            self._timer.cancel()
        if self._own_stderr:
            self.stderr.close()

    def failure(self) -> str:
        """Why the child gave no result: its exception, a timeout, a signal, or its exit code and output."""
        if self.timed_out.is_set():
            return f"timed out after {self.isolation.timeout:.0f} s"
        if self.error is not None:
            return f"{self.error['type']}: {self.error['message']}"
        code = self.proc.returncode
        if code is not None and code < 0:
            sig = signal.Signals(-code).name
            return f"killed by {sig}" + (" (out of memory?)" if -code == signal.SIGKILL else "")
        return f"exit code {code}: " + " | ".join(self.stderr_tail(6))


def run_isolated(call: str, kwargs: dict[str, Any] | None = None, isolation: Isolation = Isolation()) -> Any:
    """Call ``call`` (``"package.module:function"``) with ``kwargs`` in a fresh process; return its result.
    A failure raises `MeasureError` naming the call and the child's exception (with its traceback's end)."""
    child = ChildProcess(call, kwargs, isolation)
    try:
        for _ in child.messages():
            pass
        if child.error is None and child.result is not None and not child.timed_out.is_set():
            return child.result
        detail = child.failure()
        tail = child.error["traceback"].strip().splitlines()[-6:] if child.error else child.stderr_tail()
    finally:
        child.close()
    short = {k: v for k, v in (kwargs or {}).items() if k != "target"}
    raise MeasureError(f"{call}({short}) failed: {detail}\n" + "\n".join(tail))


class Channel:
    """What a function running in a child uses to talk to its parent."""

    def __init__(self, out: IO[str] = sys.stdout, inp: IO[str] = sys.stdin):
        self._out, self._in = out, inp

    def send(self, kind: str, data: Any = None) -> None:
        self.emit({"kind": kind, "data": data})

    def emit(self, message: dict[str, Any]) -> None:
        self._out.write(PREFIX + json.dumps(message, default=str) + "\n")
        self._out.flush()

    def ask(self, kind: str, data: Any = None) -> str:
        """Send a message and wait for the parent's one-line answer ("" when the parent is gone)."""
        self.send(kind, data)
        return self._in.readline().strip()


def _die_with_parent(sig: str, parent: int | None) -> None:
    """Have this process get ``sig`` once when its parent goes (Linux ``PR_SET_PDEATHSIG``); if the parent
    is already gone, exit. The kernel sends the parent-death signal again each time the process is
    re-parented (to another thread of the dying parent, to a subreaper), so a catchable ``sig`` arrives
    through SIGUSR1, passed on once: a trial checkpoints once and then finishes, not dies mid-write."""
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux: the trial's pipe to its parent breaks at its next report
        return
    if sig == "SIGKILL":
        prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG = 1
    else:
        passed: list[bool] = []

        def once(signum: int, frame: Any) -> None:
            if not passed:
                passed.append(True)
                os.kill(os.getpid(), signal.Signals[sig])

        signal.signal(signal.SIGUSR1, once)
        prctl(1, int(signal.SIGUSR1))
    if parent is not None and os.getppid() != parent:
        raise SystemExit(1)


def _main() -> None:
    job = json.loads(sys.stdin.readline())
    isolation = Isolation(**job["isolation"])
    _die_with_parent(isolation.on_parent_death, job.get("parent"))
    if isolation.ignore_sigint:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    channel = Channel()
    try:
        import torch

        from registry import import_object

        if isolation.threads:
            torch.set_num_threads(int(isolation.threads))
        torch.set_flush_denormal(True)  # denormals slowed CPU work by up to ~20x here
        fn = import_object(job["call"])
        kwargs = dict(job["kwargs"], **({"channel": channel} if job.get("channel") else {}))
        result = fn(**kwargs)
    except Exception as exc:  # to the parent, which raises it as a MeasureError or fails the trial with it
        traceback.print_exc()
        _tell_or_leave(channel, {"kind": "error", "type": type(exc).__name__, "message": str(exc),
                                 "traceback": traceback.format_exc()})
        raise SystemExit(1) from None
    _tell_or_leave(channel, {"kind": "result", "data": result})


def _tell_or_leave(channel: Channel, message: dict[str, Any]) -> None:
    """Send the last message; when the parent is gone (a killed coordinator), leave at once: what the work
    produced is on disk already, and there is no one to tell."""
    try:
        channel.emit(message)
    except (BrokenPipeError, OSError):
        sys.stderr.flush()
        os._exit(1)


if __name__ == "__main__":
    _main()
