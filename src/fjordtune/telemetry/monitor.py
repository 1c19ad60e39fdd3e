"""Telemetry of one process (a training rank, an eval replica): what only fjordtune knows.

Ray already exports per-node series (`ray_node_gpus_utilization`, `ray_node_gram_used`, CPU, disk).
A `Monitor` adds what a node-level view cannot say: which rank or replica a GPU belongs to, which run
and phase it is in, the process's own peak allocated memory against preflight's prediction, tokens/s,
step time, MFU and eval throughput. Every series is a `ray.util.metrics.Gauge` tagged with ray_job (the
Ray submission), run (the job file's name), node, rank and role (train/eval); GPU series also with the
GPU index, the phase series with the phase.

A background thread samples at `interval_s` (1 s by default). Statistics are kept as running sums
and a 1%-wide utilisation histogram per GPU and phase, so memory stays constant over a run of days.
Works without Ray (a benchmark, a GPU box): then nothing is exported, the summary is still kept.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fjordtune.telemetry.gpu import GpuSample, NvmlSampler
from fjordtune.telemetry.rss import rss_anon_bytes

log = logging.getLogger(__name__)

IDLE_BELOW_PCT = 10.0
"""A GPU under this utilisation counts as idle."""
MEMORY_WARN_FRACTION = 0.95
WORK_PHASE = {"train": "train", "eval": "score"}
"""The phase whose utilisation the summary leads with, per role: setup (loading 238 GB of weights) and
checkpoints idle the GPUs by design."""

TAGS = ("ray_job", "run", "node", "rank", "role")
"""`ray_job`, not `job`: Prometheus keeps `job` for its scrape job and renames an exposed `job` label to
`exported_job` (honor_labels false, the default), which would break every query on it."""
METRICS: dict[str, tuple[str, tuple[str, ...]]] = {
    # name: (description, tags beyond TAGS)
    "gpu_utilization_pct": ("NVML GPU utilisation of a rank's GPU", ("gpu",)),
    "gpu_memory_used_bytes": ("NVML memory used on a rank's GPU (all processes on it)", ("gpu",)),
    "gpu_memory_total_bytes": ("NVML memory of a rank's GPU", ("gpu",)),
    "gpu_power_watts": ("NVML power draw of a rank's GPU", ("gpu",)),
    "gpu_temperature_celsius": ("NVML temperature of a rank's GPU", ("gpu",)),
    "process_peak_memory_bytes": ("Peak memory this process allocated: CUDA max_memory_allocated, "
                                  "or peak RssAnon on CPU", ()),
    "predicted_peak_memory_bytes": ("Preflight's predicted peak per worker", ()),
    "phase": ("1 for the phase a process is in (setup, train, checkpoint, eval, score), 0 for the others",
              ("phase",)),
    "train_loss": ("Training loss of the last step", ()),
    "train_lr": ("Learning rate of the last step", ()),
    "train_step": ("Optimizer steps done", ()),
    "train_tokens_per_s": ("Input tokens per second of all ranks together, last step", ()),
    "train_step_time_seconds": ("Seconds of the last optimizer step", ()),
    "train_mfu": ("Model FLOPs utilisation of the last step (0-1): model FLOPs / peak FLOPs of the rank's GPU",
                  ()),
    "eval_items_per_s": ("Requests this eval replica scored per second (last interval)", ()),
    "eval_items_done": ("Requests this eval replica scored so far", ()),
}


class Gauges:
    """The Ray gauges of `METRICS`, created on first use; no-ops without a Ray worker context.

    Ray drops a gauge's series from its Prometheus endpoint two report intervals after its last `set`
    (its recorder's TTL, so that dead workers' series age out), so every value is set again at each
    sample (`refresh`): a prediction set once, or a loss between two 119B steps, stays on the chart."""

    def __init__(self, tags: dict[str, str], *, export: bool = True) -> None:
        self.tags = tags
        self._gauges: dict[str, Any] = {}
        self._last: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self.enabled = export and _ray_ready()

    def set(self, name: str, value: float, **extra: str) -> None:
        description, keys = METRICS[name]  # KeyError: a name that is not declared above
        if not self.enabled:
            return
        self._last[(name, tuple(sorted(extra.items())))] = float(value)
        gauge = self._gauges.get(name)
        if gauge is None:
            from ray.util.metrics import Gauge

            gauge = self._gauges[name] = Gauge(f"fjordtune_{name}", description=description, tag_keys=TAGS + keys)
        gauge.set(float(value), tags={**self.tags, **extra})

    def refresh(self) -> None:
        """Set every series again to its last value."""
        for (name, extra), value in list(self._last.items()):
            self._gauges[name].set(value, tags={**self.tags, **dict(extra)})


def _ray_ready() -> bool:
    try:
        import ray

        return ray.is_initialized()
    except ImportError:
        return False


@dataclass
class _Phase:
    samples: int = 0
    seconds: float = 0.0
    util_sum: float = 0.0
    hist: list[int] = field(default_factory=lambda: [0] * 101)

    def add(self, util: float, dt: float) -> None:
        self.samples += 1
        self.seconds += dt
        self.util_sum += util
        self.hist[max(0, min(100, round(util)))] += 1

    def mean(self) -> float | None:
        return self.util_sum / self.samples if self.samples else None

    def percentile(self, q: float) -> float | None:
        """The q-th percentile (0-100) of the samples, to the histogram's 1% (nearest rank)."""
        if not self.samples:
            return None
        rank = max(1, -(-q * self.samples // 100))  # ceil
        seen = 0
        for pct, n in enumerate(self.hist):
            seen += n
            if seen >= rank:
                return float(pct)
        return 100.0


@dataclass
class _Gpu:
    index: int
    phases: dict[str, _Phase] = field(default_factory=dict)
    memory_peak: int = 0
    memory_total: int = 0
    power_sum: float = 0.0
    power_n: int = 0
    temperature_max: float | None = None
    idle_run_s: float = 0.0
    longest_idle_s: float = 0.0

    def add(self, s: GpuSample, phase: str, dt: float, work: str) -> None:
        self.phases.setdefault(phase, _Phase()).add(s.utilization_pct, dt)
        self.memory_peak = max(self.memory_peak, s.memory_used_bytes)
        self.memory_total = s.memory_total_bytes
        if s.power_w is not None:
            self.power_sum, self.power_n = self.power_sum + s.power_w, self.power_n + 1
        if s.temperature_c is not None:
            self.temperature_max = max(self.temperature_max or s.temperature_c, s.temperature_c)
        if phase == work and s.utilization_pct < IDLE_BELOW_PCT:
            self.idle_run_s += dt
            self.longest_idle_s = max(self.longest_idle_s, self.idle_run_s)
        else:
            self.idle_run_s = 0.0


class Monitor:
    """Samples this process's GPUs (and its own peak memory) every `interval_s` on a background thread,
    exports them with the training or eval figures the caller sets, and keeps a summary.

    `process_peak`: this process's peak allocated bytes (CUDA `max_memory_allocated`); default: the peak
    of the sampled `RssAnon`. `flops_per_token` and `peak_flops` (of one GPU) turn tokens/s into MFU.
    """

    def __init__(self, *, role: str, rank: int | str, run: str, job: str = "", node: str | None = None,
                 sampler: NvmlSampler | None = None, interval_s: float = 1.0,
                 predicted_peak_bytes: int | None = None, export: bool = True,
                 process_peak: Callable[[], int] | None = None, idle_warning_s: float = 60.0,
                 flops_per_token: float | None = None, peak_flops: float | None = None,
                 on_sample: Callable[[Monitor], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.role, self.rank, self.run = role, str(rank), run
        self.node = node or _node_ip()
        self.tags = {"ray_job": job or "-", "run": run, "node": self.node, "rank": self.rank, "role": role}
        self.gauges = Gauges(self.tags, export=export)
        self.sampler, self.interval_s = sampler, interval_s
        self.predicted_peak_bytes = predicted_peak_bytes
        self.process_peak, self.idle_warning_s = process_peak, idle_warning_s
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.on_sample, self.clock = on_sample, clock
        self.work_phase = WORK_PHASE.get(role, role)
        self.current = "setup"
        self.gpus: dict[int, _Gpu] = {}
        self.rss_peak = 0
        self.items_done = 0
        self._items_mark = (clock(), 0)
        self._last_sample: float | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.device_name = sampler.device_name() if sampler else None
        if predicted_peak_bytes:
            self.gauges.set("predicted_peak_memory_bytes", predicted_peak_bytes)
        self._publish_phase()

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> Monitor:
        self.sample_once()
        self._thread = threading.Thread(target=self._loop, name="fjordtune-telemetry", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sample_once()
            except Exception as e:  # noqa: BLE001 (telemetry never kills a run; say it once and stop)
                log.warning("telemetry sampling stopped: %s: %s", type(e).__name__, e)
                return

    def close(self) -> dict[str, Any]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.sample_once()
        if self.sampler is not None:
            try:
                self.sampler.close()
            except Exception:  # noqa: BLE001
                pass
        return self.summary()

    # -- what the caller tells us ------------------------------------------------------------------
    def phase(self, name: str) -> None:
        """Enter phase `name` (setup, train, checkpoint, eval; score for eval replicas)."""
        if name != self.current:
            self.sample_once()  # the time so far belongs to the phase that ends
            self.current = name
            self._publish_phase()

    def _publish_phase(self) -> None:
        for p in {"setup", "train", "checkpoint", "eval", "score", self.current}:
            self.gauges.set("phase", 1.0 if p == self.current else 0.0, phase=p)

    def step(self, *, step: int, loss: float, lr: float, tokens: int, seconds: float, world: int = 1) -> None:
        """One optimizer step: `tokens` input tokens of all `world` ranks in `seconds`."""
        g = self.gauges
        g.set("train_step", step)
        g.set("train_loss", loss)
        g.set("train_lr", lr)
        g.set("train_step_time_seconds", seconds)
        if seconds > 0:
            g.set("train_tokens_per_s", tokens / seconds)
            if self.flops_per_token and self.peak_flops:
                g.set("train_mfu", self.flops_per_token * tokens / seconds / (self.peak_flops * world))

    def items(self, n: int) -> None:
        """`n` more eval requests scored by this replica."""
        with self._lock:
            self.items_done += n

    def set(self, name: str, value: float) -> None:
        self.gauges.set(name, value)

    def notify(self) -> None:
        """Hand the current summary to `on_sample` now, not at the next sample (an eval replica after each
        unit, so that the driver's view is complete when the last unit comes back)."""
        if self.on_sample is not None:
            self.on_sample(self)

    # -- sampling ----------------------------------------------------------------------------------
    def sample_once(self) -> None:
        now = self.clock()
        samples = self.sampler.sample() if self.sampler else []
        rss = rss_anon_bytes() or 0
        with self._lock:
            dt = self.interval_s if self._last_sample is None else now - self._last_sample
            self._last_sample = now
            for s in samples:
                self.gpus.setdefault(s.index, _Gpu(s.index)).add(s, self.current, dt, self.work_phase)
            self.rss_peak = max(self.rss_peak, rss)
            (t0, n0), done = self._items_mark, self.items_done
            self._items_mark = (now, done)
        self.gauges.refresh()  # what is set below is set anyway
        for s in samples:
            gpu = str(s.index)
            self.gauges.set("gpu_utilization_pct", s.utilization_pct, gpu=gpu)
            self.gauges.set("gpu_memory_used_bytes", s.memory_used_bytes, gpu=gpu)
            self.gauges.set("gpu_memory_total_bytes", s.memory_total_bytes, gpu=gpu)
            if s.power_w is not None:
                self.gauges.set("gpu_power_watts", s.power_w, gpu=gpu)
            if s.temperature_c is not None:
                self.gauges.set("gpu_temperature_celsius", s.temperature_c, gpu=gpu)
        self.gauges.set("process_peak_memory_bytes", self.peak_bytes())
        if self.role == "eval":
            self.gauges.set("eval_items_done", done)
            if now > t0:
                self.gauges.set("eval_items_per_s", (done - n0) / (now - t0))
        if self.on_sample is not None:
            self.on_sample(self)

    def peak_bytes(self) -> int:
        if self.process_peak is not None:
            try:
                return int(self.process_peak())
            except Exception:  # noqa: BLE001 (a CUDA context torn down at exit)
                pass
        return self.rss_peak

    # -- summary -----------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """This process's figures: per GPU the work phase's mean, p5 and p95 utilisation, longest idle
        stretch, peak memory against the GPU's total; the process's peak against the prediction; warnings."""
        with self._lock:
            gpus = [self._gpu_summary(g) for g in sorted(self.gpus.values(), key=lambda g: g.index)]
        out: dict[str, Any] = {
            "role": self.role, "rank": self.rank, "node": self.node, "pid": os.getpid(),
            "source": self.sampler.source if self.sampler else None, "device": self.device_name,
            "interval_s": self.interval_s, "process_peak_bytes": self.peak_bytes(),
            "predicted_peak_bytes": self.predicted_peak_bytes, "gpus": gpus,
        }
        if self.role == "eval":
            out["items_done"] = self.items_done
        out["warnings"] = warnings_of(out, idle_warning_s=self.idle_warning_s)
        return out

    def _gpu_summary(self, g: _Gpu) -> dict[str, Any]:
        work = g.phases.get(self.work_phase, _Phase())
        return {
            "gpu": g.index, "phase": self.work_phase, "samples": work.samples, "seconds": round(work.seconds, 1),
            "utilization_mean_pct": _round(work.mean()), "utilization_p5_pct": work.percentile(5),
            "utilization_p95_pct": work.percentile(95), "longest_idle_s": round(g.longest_idle_s, 1),
            "memory_peak_bytes": g.memory_peak, "memory_total_bytes": g.memory_total,
            "power_mean_w": _round(g.power_sum / g.power_n if g.power_n else None),
            "temperature_max_c": g.temperature_max,
            "by_phase": {name: {"seconds": round(p.seconds, 1), "utilization_mean_pct": _round(p.mean())}
                         for name, p in g.phases.items()},
        }


def warnings_of(proc: dict[str, Any], *, idle_warning_s: float) -> list[str]:
    """The warnings of one process's summary: idle stretches, memory near full, peak above prediction."""
    who = f"{proc['role']} rank {proc['rank']} on {proc['node']}"
    out = []
    for g in proc["gpus"]:
        if g["longest_idle_s"] >= idle_warning_s:
            out.append(f"{who}: GPU {g['gpu']} below {IDLE_BELOW_PCT:.0f}% utilisation for {g['longest_idle_s']:.0f} s "
                       f"in a row during {g['phase']} (telemetry.idle_warning_s {idle_warning_s:g})")
        total = g["memory_total_bytes"]
        if total and g["memory_peak_bytes"] > MEMORY_WARN_FRACTION * total:
            out.append(f"{who}: GPU {g['gpu']} memory reached {g['memory_peak_bytes'] / total:.0%} of "
                       f"{total / 2**30:.1f} GiB (above {MEMORY_WARN_FRACTION:.0%}: close to OOM)")
    predicted, peak = proc.get("predicted_peak_bytes"), proc.get("process_peak_bytes")
    if predicted and peak and peak > predicted:
        out.append(f"{who}: peak memory {peak / 2**30:.2f} GiB is above preflight's prediction "
                   f"{predicted / 2**30:.2f} GiB ({peak / predicted:.2f}x)")
    return out


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 1)


def _node_ip() -> str:
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001
        pass
    import socket

    return socket.gethostname()


def job_id(environ: dict[str, str] | None = None) -> str:
    """The Ray job this process belongs to, as operators see it: the submission id of `ray job submit`
    (from the driver's job config), else Ray's job id, else "" (no Ray)."""
    import json

    env = os.environ if environ is None else environ
    try:
        meta = json.loads(env.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("metadata", {})
        if meta.get("job_submission_id"):
            return str(meta["job_submission_id"])
    except (ValueError, AttributeError):
        pass
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_job_id()
    except Exception:  # noqa: BLE001
        pass
    return ""
