"""Host memory of processes, sampled from outside: anonymous resident memory (`RssAnon`).

`RssAnon` counts what a process allocated itself (tensors, Python objects) and not file-backed pages,
such as a memory-mapped safetensors file that the kernel can drop at any time. It is the number that
says whether a loader holds the whole model: `VmRSS` would also count the page cache of every shard
the process has read. Linux only (`/proc/<pid>/status`).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field


def status_bytes(field: str, pid: int | str = "self") -> int | None:
    """A memory field of `/proc/<pid>/status` in bytes (`RssAnon`, `VmRSS`, `VmHWM`: the peak RSS), or None
    once the process has exited (or off Linux)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return None


def rss_anon_bytes(pid: int | str = "self") -> int | None:
    """`RssAnon` of a process in bytes, or None once it has exited (or off Linux)."""
    return status_bytes("RssAnon", pid)


def reset_peak_rss() -> bool:
    """Set this process's peak RSS (`VmHWM`) back to its current RSS, so that a benchmark measures the peak of
    one phase only; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@dataclass
class RssSampler:
    """Samples `RssAnon` of some processes every `interval_s` on a background thread.

    Use as a context manager; `add(pid)` registers processes started later. Times are
    `time.monotonic()`, the same clock in every process of the machine, so phases that a process marks
    itself can be matched with the samples.
    """

    interval_s: float = 0.05
    samples: list[tuple[float, int, int]] = field(default_factory=list)  # (time, pid, bytes)
    _pids: set[int] = field(default_factory=set)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def add(self, pid: int) -> None:
        self._pids.add(pid)

    def __enter__(self) -> RssSampler:
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            for pid in list(self._pids):
                value = rss_anon_bytes(pid)
                if value is not None:
                    self.samples.append((now, pid, value))
            self._stop.wait(self.interval_s)

    def at(self, pid: int, t: float) -> int:
        """The last sample of `pid` taken at or before `t`."""
        before = [b for s, p, b in self.samples if p == pid and s <= t]
        if not before:
            raise ValueError(f"no sample of pid {pid} at or before {t}")
        return before[-1]

    def peak(self, pid: int, start: float, end: float) -> int:
        """The largest sample of `pid` taken in `[start, end]`."""
        inside = [b for s, p, b in self.samples if p == pid and start <= s <= end]
        if not inside:
            raise ValueError(f"no sample of pid {pid} between {start} and {end}")
        return max(inside)
