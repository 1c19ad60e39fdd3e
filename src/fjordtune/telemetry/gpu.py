"""GPU telemetry through NVML, exported as Ray metrics while a job runs.

`NvmlSampler` takes the NVML module as an argument: the real `pynvml` (nvidia-ml-py) on a GPU node,
`FakeNvml` in tests on machines without one. Both have the same interface.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuSample:
    index: int
    utilization_pct: float
    memory_used_bytes: int
    memory_total_bytes: int


class NvmlSampler:
    """Samples the GPUs at `indices` (NVML numbering; default all). NVML sees every GPU of the node
    whatever CUDA_VISIBLE_DEVICES says, so a Ray worker passes its own: see `visible_gpu_indices`."""

    def __init__(self, nvml: Any, indices: list[int] | None = None) -> None:
        self.nvml = nvml
        nvml.nvmlInit()
        count = nvml.nvmlDeviceGetCount()
        self.indices = [i for i in (range(count) if indices is None else indices) if 0 <= i < count]
        self.handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in self.indices]

    def sample(self) -> list[GpuSample]:
        out = []
        for i, h in zip(self.indices, self.handles):
            util = self.nvml.nvmlDeviceGetUtilizationRates(h)
            mem = self.nvml.nvmlDeviceGetMemoryInfo(h)
            out.append(GpuSample(i, float(util.gpu), int(mem.used), int(mem.total)))
        return out

    def close(self) -> None:
        self.nvml.nvmlShutdown()


def visible_gpu_indices(env: dict[str, str] | None = None) -> list[int] | None:
    """GPU indices named by CUDA_VISIBLE_DEVICES (Ray sets it per worker); None if unset or not numeric."""
    value = (os.environ if env is None else env).get("CUDA_VISIBLE_DEVICES")
    if not value:
        return None
    try:
        return [int(x) for x in value.split(",") if x.strip()]
    except ValueError:  # UUIDs: sample every GPU rather than guess
        return None


def open_sampler() -> NvmlSampler | None:
    """An NVML sampler for this process's GPUs, or None where there is no NVML (CPU machines)."""
    try:
        import pynvml

        sampler = NvmlSampler(pynvml, visible_gpu_indices())
    except Exception as e:  # no driver, no library: telemetry is optional
        log.info("NVML unavailable (%s): GPU telemetry off", type(e).__name__)
        return None
    return sampler if sampler.handles else None


class FakeNvml:
    """Stands in for `pynvml` where no GPU exists: fixed utilisation and memory per device."""

    def __init__(self, *, utilization: list[float], memory_used: list[int], memory_total: int) -> None:
        self._util, self._used, self._total = utilization, memory_used, memory_total
        self.initialized = False

    def nvmlInit(self) -> None:
        self.initialized = True

    def nvmlShutdown(self) -> None:
        self.initialized = False

    def nvmlDeviceGetCount(self) -> int:
        return len(self._util)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        assert self.initialized, "nvmlInit not called"
        return i

    def nvmlDeviceGetUtilizationRates(self, h: int) -> Any:
        return SimpleNamespace(gpu=self._util[h], memory=0)

    def nvmlDeviceGetMemoryInfo(self, h: int) -> Any:
        return SimpleNamespace(used=self._used[h], total=self._total, free=self._total - self._used[h])


class MetricsExporter:
    """Ray gauges for training progress and (optionally) GPU samples, set from a background thread."""

    def __init__(self, *, rank: int, run: str, sampler: NvmlSampler | None, interval_s: float) -> None:
        from ray.util.metrics import Gauge

        tags = ("run", "rank")
        self.tags = {"run": run, "rank": str(rank)}
        self.gauges = {
            name: Gauge(f"fjordtune_{name}", description=desc, tag_keys=tags)
            for name, desc in [
                ("train_loss", "Training loss (mean over tokens of all ranks)"),
                ("train_step", "Optimizer steps done"),
                ("train_tokens_per_s", "Label tokens per second, all ranks"),
                ("gpu_utilization_pct", "NVML GPU utilisation of this worker's GPU(s)"),
                ("gpu_memory_used_bytes", "NVML memory used on this worker's GPU(s)"),
            ]
        }
        self.sampler, self.interval_s = sampler, interval_s
        self.peak_memory = 0
        self.util_samples: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if sampler is not None:
            self._thread = threading.Thread(target=self._loop, name="fjordtune-nvml", daemon=True)
            self._thread.start()

    def set(self, name: str, value: float) -> None:
        self.gauges[name].set(value, tags=self.tags)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample_once()

    def sample_once(self) -> None:
        for s in self.sampler.sample() if self.sampler else []:
            self.set("gpu_utilization_pct", s.utilization_pct)
            self.set("gpu_memory_used_bytes", s.memory_used_bytes)
            self.util_samples.append(s.utilization_pct)
            self.peak_memory = max(self.peak_memory, s.memory_used_bytes)

    def close(self) -> dict[str, float]:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        summary = {}
        if self.util_samples:
            summary["gpu_utilization_mean_pct"] = sum(self.util_samples) / len(self.util_samples)
            summary["gpu_memory_peak_bytes"] = float(self.peak_memory)
        return summary
