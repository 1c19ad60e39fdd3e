"""GPU samples through NVML: utilisation, memory, power and temperature of this process's GPUs.

`NvmlSampler` takes the NVML module as an argument: the real `pynvml` (nvidia-ml-py) on a GPU node,
`FakeNvml` on machines without one. Both have the same interface. The fake is used only where a test
asks for it (`FJORDTUNE_FAKE_NVML`, see `open_sampler`): a CPU run otherwise reports no GPU telemetry
rather than invented numbers.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

log = logging.getLogger(__name__)

FAKE_NVML_ENV = "FJORDTUNE_FAKE_NVML"
"""Set (to anything but empty or 0) in a test's environment, workers sample `FakeNvml.of_this_process()`
instead of NVML. Never set it in a real job: its numbers describe CPU work, not a GPU."""

NVML_TEMPERATURE_GPU = 0  # pynvml.NVML_TEMPERATURE_GPU


@dataclass(frozen=True)
class GpuSample:
    index: int
    utilization_pct: float
    memory_used_bytes: int
    memory_total_bytes: int
    power_w: float | None = None
    temperature_c: float | None = None


class NvmlSampler:
    """Samples the GPUs at `indices` (NVML numbering; default all). NVML sees every GPU of the node
    whatever CUDA_VISIBLE_DEVICES says, so a Ray worker passes its own: see `visible_gpu_indices`."""

    def __init__(self, nvml: Any, indices: list[int] | None = None, *, source: str = "nvml") -> None:
        self.nvml, self.source = nvml, source
        nvml.nvmlInit()
        count = nvml.nvmlDeviceGetCount()
        self.indices = [i for i in (range(count) if indices is None else indices) if 0 <= i < count]
        self.handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in self.indices]

    def sample(self) -> list[GpuSample]:
        out = []
        for i, h in zip(self.indices, self.handles):
            util = self.nvml.nvmlDeviceGetUtilizationRates(h)
            mem = self.nvml.nvmlDeviceGetMemoryInfo(h)
            out.append(GpuSample(i, float(util.gpu), int(mem.used), int(mem.total), self._power(h), self._temperature(h)))
        return out

    def _power(self, h: Any) -> float | None:
        try:
            return self.nvml.nvmlDeviceGetPowerUsage(h) / 1000.0  # milliwatts
        except Exception:  # noqa: BLE001 (not every board reports power: leave it out)
            return None

    def _temperature(self, h: Any) -> float | None:
        try:
            return float(self.nvml.nvmlDeviceGetTemperature(h, NVML_TEMPERATURE_GPU))
        except Exception:  # noqa: BLE001
            return None

    def device_name(self) -> str | None:
        if not self.handles:
            return None
        try:
            name = self.nvml.nvmlDeviceGetName(self.handles[0])
        except Exception:  # noqa: BLE001
            return None
        return name.decode() if isinstance(name, bytes) else str(name)

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


def open_sampler(env: dict[str, str] | None = None) -> NvmlSampler | None:
    """An NVML sampler for this process's GPUs; the fake one where `FJORDTUNE_FAKE_NVML` asks for it;
    None where there is no NVML (CPU machines)."""
    env = os.environ if env is None else env
    if env.get(FAKE_NVML_ENV, "0") not in ("", "0"):
        return NvmlSampler(FakeNvml.of_this_process(), source="fake")
    try:
        import pynvml

        sampler = NvmlSampler(pynvml, visible_gpu_indices(env))
    except Exception as e:  # no driver, no library: telemetry is optional
        log.info("NVML unavailable (%s): GPU telemetry off", type(e).__name__)
        return None
    return sampler if sampler.handles else None


Value = list[float] | Callable[[int], float]


class FakeNvml:
    """Stands in for `pynvml` where no GPU exists. Utilisation and memory per device are fixed lists or
    functions of the device index (called at every sample)."""

    def __init__(self, *, utilization: Value, memory_used: list[int] | Callable[[int], int], memory_total: int,
                 count: int | None = None, power_w: float = 300.0, temperature_c: float = 45.0,
                 name: str = "FakeNvml GPU") -> None:
        self._util, self._used, self._total = utilization, memory_used, memory_total
        self._count = len(utilization) if count is None and isinstance(utilization, list) else (count or 0)
        self._power, self._temp, self._name = power_w, temperature_c, name
        self.initialized = False

    @classmethod
    def of_this_process(cls, memory_total: int = 80 << 30) -> FakeNvml:
        """One device whose utilisation is this process's CPU use since the previous sample (one core =
        100%) and whose memory used is this process's anonymous resident memory: numbers that move with
        the work the process really does, for tests on CPU machines."""
        from fjordtune.telemetry.rss import rss_anon_bytes

        last = [time.monotonic(), time.process_time()]

        def utilization(_: int) -> float:
            now, cpu = time.monotonic(), time.process_time()
            pct = 100.0 * (cpu - last[1]) / max(now - last[0], 1e-6)
            last[:] = [now, cpu]
            return max(0.0, min(100.0, pct))

        return cls(utilization=utilization, memory_used=lambda _: rss_anon_bytes() or 0, memory_total=memory_total,
                   count=1, name="FakeNvml (this process's CPU use and RssAnon)")

    def nvmlInit(self) -> None:
        self.initialized = True

    def nvmlShutdown(self) -> None:
        self.initialized = False

    def nvmlDeviceGetCount(self) -> int:
        return self._count

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        assert self.initialized, "nvmlInit not called"
        return i

    def _at(self, value: Any, h: int) -> Any:
        return value(h) if callable(value) else value[h]

    def nvmlDeviceGetUtilizationRates(self, h: int) -> Any:
        return SimpleNamespace(gpu=self._at(self._util, h), memory=0)

    def nvmlDeviceGetMemoryInfo(self, h: int) -> Any:
        used = self._at(self._used, h)
        return SimpleNamespace(used=used, total=self._total, free=self._total - used)

    def nvmlDeviceGetPowerUsage(self, h: int) -> int:
        return int(1000 * self._power)

    def nvmlDeviceGetTemperature(self, h: int, sensor: int) -> int:
        return int(self._temp)

    def nvmlDeviceGetName(self, h: int) -> str:
        return self._name
