"""`fjordtune.telemetry.gpu`: the NVML sampler (with `FakeNvml` where there is no GPU), and the Ray
metrics exporter inside a real local Ray.

The Ray part is the integration tier: one local Ray (1 CPU, no dashboard) for the module.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from fjordtune.telemetry.gpu import (
    FakeNvml,
    GpuSample,
    MetricsExporter,
    NvmlSampler,
    open_sampler,
)

GIB = 1 << 30


def fake() -> FakeNvml:
    return FakeNvml(utilization=[30.0, 50.0, 85.5], memory_used=[10 * GIB, 61 * GIB, 3 * GIB], memory_total=80 * GIB)


def test_sampler_returns_the_fakes_numbers() -> None:
    nvml = fake()
    sampler = NvmlSampler(nvml)
    assert nvml.initialized
    assert sampler.sample() == [
        GpuSample(0, 30.0, 10 * GIB, 80 * GIB),
        GpuSample(1, 50.0, 61 * GIB, 80 * GIB),
        GpuSample(2, 85.5, 3 * GIB, 80 * GIB),
    ]
    sampler.close()
    assert not nvml.initialized


def test_sampler_with_no_devices() -> None:
    sampler = NvmlSampler(FakeNvml(utilization=[], memory_used=[], memory_total=0))
    assert sampler.handles == [] and sampler.sample() == []


def test_open_sampler_matches_this_machine() -> None:
    torch = pytest.importorskip("torch")
    sampler = open_sampler()
    if not torch.cuda.is_available():
        assert sampler is None, "no CUDA here, yet NVML reported GPUs"
        return
    assert sampler is not None, "CUDA is available but no NVML sampler opened"
    try:
        samples = sampler.sample()
        assert len(samples) >= torch.cuda.device_count()
        for s in samples:
            assert 0 <= s.utilization_pct <= 100
            assert 0 < s.memory_used_bytes <= s.memory_total_bytes
    finally:
        sampler.close()


def test_exporter_without_ray_or_sampler_summary_is_empty() -> None:
    pytest.importorskip("ray")
    exporter = MetricsExporter(rank=0, run="unit", sampler=None, interval_s=3600)
    exporter.sample_once()  # no sampler: nothing to record
    assert exporter.close() == {}


# -- inside a real local Ray -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if ray.is_initialized():  # another fixture of this session already started one: use it as is
        yield
        return
    # address="local": always a fresh private instance, never a cluster another process started here
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.mark.integration
def test_exporter_inside_ray_worker(local_ray: None) -> None:
    import ray

    # defined here, not at module level, so Ray ships it by value: workers cannot import this test module
    def _exporter_in_worker(utilization: list[float], memory_used: list[int], memory_total: int) -> dict:
        """Runs in a Ray worker process: what a training worker does with its exporter."""
        import os

        exporter = MetricsExporter(
            rank=1, run="telemetry-test",
            sampler=NvmlSampler(FakeNvml(utilization=utilization, memory_used=memory_used, memory_total=memory_total)),
            interval_s=3600,  # the background thread stays idle: samples are taken explicitly
        )
        exporter.set("train_loss", 2.5)
        exporter.set("train_step", 3)
        exporter.set("train_tokens_per_s", 1234.5)
        exporter.sample_once()
        exporter.sample_once()
        return {"summary": exporter.close(), "tags": exporter.tags, "pid": os.getpid()}

    task = ray.remote(num_cpus=1)(_exporter_in_worker)
    out = ray.get(task.remote([30.0, 50.0, 85.5], [10 * GIB, 61 * GIB, 3 * GIB], 80 * GIB), timeout=120)
    assert out["pid"] != os.getpid(), "ran in a Ray worker process, not the driver"
    assert out["tags"] == {"run": "telemetry-test", "rank": "1"}
    summary = out["summary"]
    assert summary["gpu_utilization_mean_pct"] == pytest.approx((30.0 + 50.0 + 85.5) / 3)
    assert summary["gpu_memory_peak_bytes"] == float(61 * GIB)


@pytest.mark.integration
def test_exporter_in_driver(local_ray: None) -> None:
    exporter = MetricsExporter(rank=0, run="driver", sampler=NvmlSampler(fake()), interval_s=3600)
    exporter.set("train_loss", 1.0)
    with pytest.raises(KeyError):
        exporter.set("no_such_metric", 1.0)
    exporter.sample_once()
    summary = exporter.close()
    assert summary == {
        "gpu_utilization_mean_pct": pytest.approx((30.0 + 50.0 + 85.5) / 3),
        "gpu_memory_peak_bytes": float(61 * GIB),
    }


@pytest.mark.integration
def test_exporter_background_thread_samples(local_ray: None) -> None:
    import time

    exporter = MetricsExporter(rank=0, run="thread", sampler=NvmlSampler(fake()), interval_s=0.05)
    deadline = time.monotonic() + 10
    while not exporter.util_samples and time.monotonic() < deadline:
        time.sleep(0.05)
    summary = exporter.close()
    assert exporter._thread is not None and not exporter._thread.is_alive(), "close() stops the sampler thread"
    assert summary["gpu_memory_peak_bytes"] == float(61 * GIB)
    assert summary["gpu_utilization_mean_pct"] == pytest.approx((30.0 + 50.0 + 85.5) / 3)


def test_sampler_follows_cuda_visible_devices():
    """A Ray GPU worker sees one GPU through CUDA_VISIBLE_DEVICES, but NVML sees all of the node's:
    the sampler must report only the worker's own."""
    from fjordtune.telemetry.gpu import FakeNvml, NvmlSampler, visible_gpu_indices

    fake = FakeNvml(utilization=[10.0, 20.0, 30.0], memory_used=[1, 2, 3], memory_total=10)
    indices = visible_gpu_indices({"CUDA_VISIBLE_DEVICES": "2"})
    assert indices == [2]
    samples = NvmlSampler(fake, indices).sample()
    assert [(s.index, s.utilization_pct) for s in samples] == [(2, 30.0)]
    assert visible_gpu_indices({}) is None
    assert visible_gpu_indices({"CUDA_VISIBLE_DEVICES": "GPU-1a2b"}) is None
    assert len(NvmlSampler(fake, None).sample()) == 3
