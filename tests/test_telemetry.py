"""`fjordtune.telemetry`: the NVML sampler (with `FakeNvml` where there is no GPU), the per-process
`Monitor` (phases, utilisation statistics, idle and memory warnings, Ray gauges), the run summary and the
MFU arithmetic.

The Ray part is the integration tier: one local Ray (1 CPU, no dashboard) for the module. That the
gauges reach Prometheus through a real Ray head is shown by tests/test_submit_e2e.py.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

from fjordtune.telemetry.gpu import FAKE_NVML_ENV, FakeNvml, GpuSample, NvmlSampler, open_sampler
from fjordtune.telemetry.monitor import METRICS, Monitor, job_id
from fjordtune.telemetry.summary import combine, log_lines, markdown

GIB = 1 << 30


def fake() -> FakeNvml:
    return FakeNvml(utilization=[30.0, 50.0, 85.5], memory_used=[10 * GIB, 61 * GIB, 3 * GIB], memory_total=80 * GIB)


def test_sampler_returns_the_fakes_numbers() -> None:
    nvml = fake()
    sampler = NvmlSampler(nvml)
    assert nvml.initialized
    assert sampler.sample() == [
        GpuSample(0, 30.0, 10 * GIB, 80 * GIB, 300.0, 45.0),
        GpuSample(1, 50.0, 61 * GIB, 80 * GIB, 300.0, 45.0),
        GpuSample(2, 85.5, 3 * GIB, 80 * GIB, 300.0, 45.0),
    ]
    sampler.close()
    assert not nvml.initialized


def test_sampler_leaves_out_what_a_board_does_not_report() -> None:
    class NoPower(FakeNvml):
        def nvmlDeviceGetPowerUsage(self, h: int) -> int:
            raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")

    s = NvmlSampler(NoPower(utilization=[5.0], memory_used=[1], memory_total=2)).sample()[0]
    assert s.power_w is None and s.temperature_c == 45.0


def test_sampler_with_no_devices() -> None:
    sampler = NvmlSampler(FakeNvml(utilization=[], memory_used=[], memory_total=0))
    assert sampler.handles == [] and sampler.sample() == []


def test_open_sampler_matches_this_machine() -> None:
    torch = pytest.importorskip("torch")
    sampler = open_sampler({})
    if not torch.cuda.is_available():
        assert sampler is None, "no CUDA here, yet NVML reported GPUs"
        return
    assert sampler is not None and sampler.source == "nvml", "CUDA is available but no NVML sampler opened"
    try:
        for s in sampler.sample():
            assert 0 <= s.utilization_pct <= 100
            assert 0 < s.memory_used_bytes <= s.memory_total_bytes
    finally:
        sampler.close()


def test_the_fake_provider_only_where_asked() -> None:
    sampler = open_sampler({FAKE_NVML_ENV: "1"})
    assert sampler is not None and sampler.source == "fake" and len(sampler.handles) == 1
    assert open_sampler({FAKE_NVML_ENV: "0"}) is None or open_sampler({FAKE_NVML_ENV: "0"}).source == "nvml"


def test_fake_of_this_process_follows_the_work_it_does() -> None:
    """Busy: close to one core = 100%; asleep: close to 0; memory: this process's RssAnon."""
    sampler = NvmlSampler(FakeNvml.of_this_process())
    sampler.sample()
    t_end = time.monotonic() + 0.4
    while time.monotonic() < t_end:
        sum(i * i for i in range(1000))
    busy = sampler.sample()[0]
    time.sleep(0.4)
    idle = sampler.sample()[0]
    assert busy.utilization_pct > 40, busy
    assert idle.utilization_pct < 10, idle
    assert 10 << 20 < busy.memory_used_bytes < busy.memory_total_bytes


def test_sampler_follows_cuda_visible_devices() -> None:
    """A Ray GPU worker sees one GPU through CUDA_VISIBLE_DEVICES, but NVML sees all of the node's:
    the sampler must report only the worker's own."""
    from fjordtune.telemetry.gpu import visible_gpu_indices

    nvml = FakeNvml(utilization=[10.0, 20.0, 30.0], memory_used=[1, 2, 3], memory_total=10)
    indices = visible_gpu_indices({"CUDA_VISIBLE_DEVICES": "2"})
    assert indices == [2]
    assert [(s.index, s.utilization_pct) for s in NvmlSampler(nvml, indices).sample()] == [(2, 30.0)]
    assert visible_gpu_indices({}) is None
    assert visible_gpu_indices({"CUDA_VISIBLE_DEVICES": "GPU-1a2b"}) is None
    assert len(NvmlSampler(nvml, None).sample()) == 3


# -- the monitor, driven by a clock of our own ---------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def scripted(values: list[float], *, used: int = 10 * GIB, total: int = 80 * GIB) -> tuple[FakeNvml, list[float]]:
    """One GPU whose utilisation is whatever the test put last in the returned list."""
    current = [values[0]]
    return FakeNvml(utilization=lambda _: current[0], memory_used=lambda _: used, memory_total=total, count=1), current


def run_monitor(utils: list[tuple[str, float]], *, used: int = 10 * GIB, predicted: int | None = None,
                peak: int | None = None, idle_warning_s: float = 60.0) -> dict:
    """Feed (phase, utilisation) samples one second apart; return the summary."""
    clock = Clock()
    nvml, current = scripted([0.0], used=used)
    mon = Monitor(role="train", rank=3, run="r", job="raysubmit_x", node="10.0.0.7", sampler=NvmlSampler(nvml),
                  interval_s=1.0, export=False, predicted_peak_bytes=predicted, idle_warning_s=idle_warning_s,
                  process_peak=(lambda: peak) if peak else None, clock=clock)
    for phase, util in utils:
        clock.t += 1.0
        current[0] = util
        mon.current = phase  # set directly: phase() samples on change, which this test does itself
        mon.sample_once()
    return mon.summary()


def test_monitor_statistics_cover_the_working_phase_only() -> None:
    # 30 s of setup at 0% (loading weights), then 100 training samples 1..100%, 5 s checkpoint at 0%
    utils = [("setup", 0.0)] * 30 + [("train", float(u)) for u in range(1, 101)] + [("checkpoint", 0.0)] * 5
    s = run_monitor(utils)
    (g,) = s["gpus"]
    assert g["phase"] == "train" and g["samples"] == 100 and g["seconds"] == pytest.approx(100.0)
    assert g["utilization_mean_pct"] == pytest.approx(50.5)
    assert g["utilization_p5_pct"] == 5.0 and g["utilization_p95_pct"] == 95.0
    assert g["by_phase"]["setup"]["seconds"] == pytest.approx(30.0)
    assert g["by_phase"]["setup"]["utilization_mean_pct"] == 0.0
    assert g["longest_idle_s"] == pytest.approx(9.0)  # 1..9% in a row; setup and checkpoint do not count
    assert s["warnings"] == []
    assert (s["role"], s["rank"], s["node"]) == ("train", "3", "10.0.0.7")


def test_monitor_warns_of_a_long_idle_stretch_while_training() -> None:
    utils = [("train", 90.0)] * 10 + [("train", 2.0)] * 75 + [("train", 90.0)] * 10
    s = run_monitor(utils)
    assert s["gpus"][0]["longest_idle_s"] == pytest.approx(75.0)
    (w,) = s["warnings"]
    assert "GPU 0 below 10% utilisation for 75 s in a row during train" in w and "rank 3" in w
    # the same stretch under a longer threshold, or interrupted, is no warning
    assert run_monitor(utils, idle_warning_s=120)["warnings"] == []
    broken = [("train", 2.0)] * 40 + [("train", 50.0)] + [("train", 2.0)] * 40
    assert run_monitor(broken)["warnings"] == []


def test_monitor_warns_when_memory_passes_95_percent_and_when_the_prediction_is_passed() -> None:
    s = run_monitor([("train", 80.0)] * 3, used=77 * GIB)
    assert any("memory reached 96% of 80.0 GiB" in w for w in s["warnings"]), s["warnings"]
    assert run_monitor([("train", 80.0)] * 3, used=75 * GIB)["warnings"] == []
    s = run_monitor([("train", 80.0)] * 3, predicted=50 * GIB, peak=51 * GIB)
    assert s["process_peak_bytes"] == 51 * GIB and s["predicted_peak_bytes"] == 50 * GIB
    assert any("above preflight's prediction 50.00 GiB (1.02x)" in w for w in s["warnings"]), s["warnings"]
    assert run_monitor([("train", 80.0)] * 3, predicted=50 * GIB, peak=49 * GIB)["warnings"] == []


def test_monitor_state_does_not_grow_with_the_run() -> None:
    """A 1 Hz sampler over days: fixed-size histograms, no list of samples."""
    clock = Clock()
    nvml, current = scripted([0.0])
    mon = Monitor(role="train", rank=0, run="r", sampler=NvmlSampler(nvml), export=False, clock=clock)
    for i in range(20_000):
        clock.t += 1.0
        current[0] = float(i % 100)
        mon.sample_once()
    (g,) = mon.gpus.values()
    assert len(g.phases) == 1 and len(g.phases["setup"].hist) == 101
    assert not [v for v in vars(mon).values() if isinstance(v, list) and len(v) > 200]


def test_monitor_without_a_gpu_still_measures_its_own_memory() -> None:
    mon = Monitor(role="eval", rank=0, run="r", sampler=None, export=False).start()
    blob = bytearray(64 << 20)  # touched: resident
    blob[::4096] = b"x" * len(blob[::4096])
    mon.items(12)
    s = mon.close()
    assert s["gpus"] == [] and s["source"] is None
    assert s["process_peak_bytes"] > 64 << 20
    assert s["items_done"] == 12
    block = combine([s], role="eval")
    assert "no GPU telemetry" in block["note"]
    assert "no GPU sampled" in log_lines(block)[0]
    assert "| 0 |" in markdown(block, title="Eval")
    del blob


def test_phase_changes_sample_the_time_that_ends() -> None:
    clock = Clock()
    nvml, current = scripted([70.0])
    mon = Monitor(role="train", rank=0, run="r", sampler=NvmlSampler(nvml), export=False, clock=clock)
    mon.sample_once()
    clock.t += 4.0
    mon.phase("train")  # the 4 s before belong to setup
    clock.t += 2.0
    mon.phase("checkpoint")
    g = mon.summary()["gpus"][0]
    assert g["by_phase"]["setup"]["seconds"] == pytest.approx(1.0 + 4.0)  # first sample counts one interval
    assert g["by_phase"]["train"]["seconds"] == pytest.approx(2.0)


def test_combined_summary_orders_ranks_and_collects_warnings() -> None:
    a = run_monitor([("train", 95.0)] * 3, used=79 * GIB)
    b = dict(run_monitor([("train", 85.0)] * 3), rank="10")
    c = dict(run_monitor([("train", 85.0)] * 3), rank="2")
    block = combine([b, a, c], role="train")
    assert [p["rank"] for p in block["processes"]] == ["2", "3", "10"]
    assert len(block["warnings"]) == 1 and "note" not in block
    table = markdown(block, title="Training workers")
    assert table.count("\n| ") == 4 and "Warnings" in table  # header + 3 rows (the separator starts |-)
    assert "| 3 | 10.0.0.7 | 0 | 95% | 95% | 95% | 0 | 79.00 / 80.00 |" in table


def test_every_gauge_name_is_declared() -> None:
    mon = Monitor(role="train", rank=0, run="r", export=False)
    with pytest.raises(KeyError):
        mon.set("no_such_metric", 1.0)
    assert all(name.islower() and " " not in name for name in METRICS)


def test_job_id_is_the_submission_id_under_ray_job_submit() -> None:
    env = {"RAY_JOB_CONFIG_JSON_ENV_VAR": '{"runtime_env": {}, "metadata": {"job_submission_id": "raysubmit_ab"}}'}
    assert job_id(env) == "raysubmit_ab"


# -- MFU arithmetic ------------------------------------------------------------------------------------

def test_peak_flops_by_device_name_or_override() -> None:
    from fjordtune.telemetry.flops import peak_flops

    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("FakeNvml GPU") is None and peak_flops(None) is None
    assert peak_flops(None, 0.5) == 0.5e12


def test_model_flops_count_routed_experts_by_their_share() -> None:
    torch = pytest.importorskip("torch")
    from fjordtune.telemetry.flops import model_flops_per_token

    class Experts(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate_up_proj = torch.nn.Parameter(torch.zeros(8, 4, 6), requires_grad=False)  # 8 experts

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = type("C", (), {"num_local_experts": 8, "num_experts_per_tok": 2})()
            self.embed_tokens = torch.nn.Embedding(100, 4)
            self.proj = torch.nn.Linear(4, 4, bias=False).requires_grad_(False)
            self.lora = torch.nn.Linear(4, 2, bias=False)  # trainable
            self.mlp = torch.nn.Module()
            self.mlp.experts = Experts()

    # proj 16 x 4 + lora 8 x 6 + experts 192 x 2/8 x 4; the embedding is a lookup
    assert model_flops_per_token(Tiny()) == pytest.approx(16 * 4 + 8 * 6 + 192 * 0.25 * 4)


# -- inside a real local Ray -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    ray = pytest.importorskip("ray")
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
def test_monitor_inside_a_ray_worker_exports_and_summarises(local_ray: None) -> None:
    import ray

    # defined here, not at module level, so Ray ships it by value: workers cannot import this test module
    def in_worker() -> dict:
        import os
        import time

        from fjordtune.telemetry.gpu import FakeNvml, NvmlSampler
        from fjordtune.telemetry.monitor import Monitor

        gib = 1 << 30
        nvml = FakeNvml(utilization=[30.0, 50.0, 85.5], memory_used=[10 * gib, 61 * gib, 3 * gib],
                        memory_total=80 * gib)
        mon = Monitor(role="train", rank=1, run="telemetry-test", job="j",
                      sampler=NvmlSampler(nvml), interval_s=0.05, predicted_peak_bytes=gib).start()
        mon.phase("train")
        for step in range(1, 4):
            mon.step(step=step, loss=2.5, lr=1e-4, tokens=4096, seconds=0.5, world=2)
        deadline = time.monotonic() + 10
        while mon.gpus.get(2) is None or mon.gpus[2].phases.get("train", None) is None:
            assert time.monotonic() < deadline, "the background thread took no sample"
            time.sleep(0.05)
        mon.phase("checkpoint")
        return {"summary": mon.close(), "exported": mon.gauges.enabled, "names": sorted(mon.gauges._gauges),
                "pid": os.getpid(), "alive": mon._thread.is_alive()}

    out = ray.get(ray.remote(num_cpus=1)(in_worker).remote(), timeout=120)
    assert out["pid"] != os.getpid(), "ran in a Ray worker process, not the driver"
    assert out["exported"] and not out["alive"], "close() stops the sampler thread"
    assert {"gpu_utilization_pct", "phase", "train_tokens_per_s", "predicted_peak_memory_bytes"} <= set(out["names"])
    assert "train_mfu" not in out["names"], "no MFU without a known peak"
    s = out["summary"]
    assert [g["gpu"] for g in s["gpus"]] == [0, 1, 2]
    assert [g["utilization_mean_pct"] for g in s["gpus"]] == [30.0, 50.0, 85.5]
    assert s["gpus"][1]["memory_peak_bytes"] == 61 * GIB and s["predicted_peak_bytes"] == GIB


# -- the Grafana dashboard (that a live scrape finds every series: tests/test_submit_e2e.py) ----------

def dashboard_metrics() -> set[str]:
    import json
    import re
    from pathlib import Path

    import fjordtune

    path = Path(fjordtune.__file__).resolve().parents[2] / "cluster" / "grafana" / "fjordtune-dashboard.json"
    dash = json.loads(path.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    return {m for e in exprs for m in re.findall(r"\bray_fjordtune_[a-z0-9_]*[a-z0-9]", e)}


def test_dashboard_queries_only_series_fjordtune_declares() -> None:
    declared = {f"ray_fjordtune_{name}" for name in METRICS}
    declared |= {f"ray_fjordtune_eval_{n}" for n in ("requests_done", "requests_total", "eta_seconds")}
    used = dashboard_metrics()
    assert used and used <= declared, used - declared
    # what the issue asks the dashboard to show
    for needed in ("gpu_utilization_pct", "gpu_memory_used_bytes", "predicted_peak_memory_bytes",
                   "train_tokens_per_s", "train_loss", "train_lr", "eval_requests_done"):
        assert f"ray_fjordtune_{needed}" in used, needed


def test_dashboard_is_importable_beside_rays() -> None:
    import json
    from pathlib import Path

    import fjordtune

    path = Path(fjordtune.__file__).resolve().parents[2] / "cluster" / "grafana" / "fjordtune-dashboard.json"
    dash = json.loads(path.read_text())
    assert dash["uid"] == "fjordtune-runs" and not dash["uid"].startswith("rayDefault")
    names = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "job", "run"} <= names
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        for t in p.get("targets", []):
            assert t["datasource"]["uid"] == "${datasource}"
            assert 'run=~"$run"' in t["expr"], t["expr"]  # every query follows the run picker


def test_headline_says_how_busy_and_lists_warnings() -> None:
    from fjordtune.telemetry.summary import headline

    busy = run_monitor([("train", 80.0)] * 3, used=77 * GIB)
    line = headline(combine([busy, dict(run_monitor([("train", 90.0)] * 3), rank="4")], role="train"), label="train")
    first, *rest = line.splitlines()
    assert first.startswith("telemetry train: 2 GPU(s), utilisation during train 80-90% (mean per GPU)")
    assert first.endswith("1 warning(s)") and len(rest) == 1 and "memory reached 96%" in rest[0]
    none = headline(combine([Monitor(role="eval", rank=0, run="r", export=False).summary()], role="eval"), label="eval")
    assert none.startswith("telemetry eval: 1 process(es), no GPU sampled; process peak")


@pytest.mark.integration
def test_every_series_is_set_again_at_each_sample(local_ray: None) -> None:
    """Ray ages a gauge's series out two report intervals after its last set: the monitor sets all of
    them again at every sample, the prediction (set once) and the last step's loss included."""
    mon = Monitor(role="train", rank=0, run="refresh", sampler=None, predicted_peak_bytes=GIB)
    assert mon.gauges.enabled
    mon.step(step=1, loss=2.0, lr=1e-4, tokens=10, seconds=1.0)
    calls: list[tuple[str, float]] = []
    for name, gauge in mon.gauges._gauges.items():
        gauge.set = lambda value, tags, name=name: calls.append((name, value))  # noqa: B023
    mon.sample_once()
    got = dict(calls)
    assert got["predicted_peak_memory_bytes"] == GIB and got["train_loss"] == 2.0 and got["train_step"] == 1
    assert ("phase", 1.0) in calls and ("phase", 0.0) in calls
