#!/usr/bin/env python
"""Telemetry overhead: training step time with the per-rank monitor running against without it.

    .venv/bin/python scripts/bench_telemetry.py [--rounds 8] [--steps 8] [--interval 1.0] [--json out.json]

One process, one local Ray (so that the monitor's gauges are really set, as in a Ray Train worker), one
random-init Mistral4 of bench_train.py's shapes with LoRA on the demo job's targets, fp32, `--threads`
torch threads (1: the other core runs the host's work, Ray's processes and the sampler, as a GPU node's
training process leaves cores to the host). Rounds alternate the side that goes first:

  off   `core.train_step` over `--steps` packed batches, nothing else
  on    the same steps with a started `Monitor` (sampler thread at `--interval` s, a GPU sampler over the
        fake NVML provider of this process: CPU time and RssAnon from /proc, the stand-in for NVML calls
        on a CPU machine), told every step as the training loop tells it (`Monitor.step`), exporting
        through `ray.util.metrics`

Printed: the median, range and bootstrap 95% interval over rounds of (median step time on) / (median
step time off), and two costs that do not depend on timing noise: one sample (`Monitor.sample_once`,
every gauge set) per `--interval`, and the per-step call (`Monitor.step`) against the step time.
Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import JOB, SFT, build_model  # noqa: E402


def setup(model_dir: Path, threads: int) -> tuple[Any, list[Any], Any]:
    import torch

    from fjordtune.config import load_job
    from fjordtune.data.sft import read_rows, step_batches
    from fjordtune.train.core import TrainerCore
    from fjordtune.train.loop import prepare_data

    torch.set_num_threads(threads)
    job = load_job(JOB, ["lora.rank=8", "lora.alpha=16", "data.packing=true", "train.micro_batch_size=1",
                         "data.max_seq_len=256", "model.dtype=float32", "train.activation_checkpointing=true"])
    core = TrainerCore(job, model_dir=str(model_dir), device=torch.device("cpu"))
    data = prepare_data(core, read_rows([str(SFT)]), [], world=1)
    batches = list(step_batches(data.items, batch_size=1, rank=0, world_size=1, epoch=0,
                                seed=job.data.shuffle_seed, pad_id=core.tokenizer.pad_token_id))
    return job, batches, core


def side(core: Any, batches: list[Any], steps: int, monitor: Any) -> list[float]:
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        res = core.train_step(batches[i % len(batches)])
        dt = time.perf_counter() - t0
        if monitor is not None:
            monitor.step(step=i + 1, loss=res.loss, lr=res.lr, tokens=res.num_input_tokens, seconds=dt)
        times.append(dt)
    return times


def new_monitor(interval: float) -> Any:
    from fjordtune.telemetry.gpu import FakeNvml, NvmlSampler
    from fjordtune.telemetry.monitor import Monitor

    return Monitor(role="train", rank=0, run="bench", job="bench", sampler=NvmlSampler(FakeNvml.of_this_process()),
                   interval_s=interval, predicted_peak_bytes=1 << 30, flops_per_token=1e6, peak_flops=1e12)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import ray

    ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level="ERROR")
    try:
        with tempfile.TemporaryDirectory(prefix="bench-telemetry-") as tmp:
            model_dir, params = build_model(Path(tmp) / "model", hidden=args.hidden, layers=args.layers,
                                            experts=args.experts)
            _, batches, core = setup(model_dir, args.threads)
            side(core, batches, args.warmup, None)
            # one sample's cost, every gauge set through Ray: the deterministic part of the overhead
            probe = new_monitor(3600.0)
            assert probe.gauges.enabled, "Ray gauges are off: the benchmark would not measure the export"
            probe.phase("train")
            n, t0 = 200, time.perf_counter()
            for _ in range(n):
                probe.sample_once()
            sample_s = (time.perf_counter() - t0) / n
            t0 = time.perf_counter()
            for i in range(n):  # what the loop adds to every step: six gauges set
                probe.step(step=i, loss=1.0, lr=1e-4, tokens=4096, seconds=0.3)
            step_call_s = (time.perf_counter() - t0) / n
            probe.close()
            ratios, on_all, off_all = [], [], []
            for r in range(args.rounds):
                order = ("off", "on") if r % 2 == 0 else ("on", "off")
                got: dict[str, list[float]] = {}
                for name in order:
                    mon = new_monitor(args.interval).start() if name == "on" else None
                    if mon is not None:
                        mon.phase("train")
                    got[name] = side(core, batches, args.steps, mon)
                    if mon is not None:
                        summary = mon.close()
                        assert summary["gpus"][0]["samples"] >= 1, "the monitor took no sample"
                on, off = statistics.median(got["on"]), statistics.median(got["off"])
                ratios.append(on / off)
                on_all += got["on"]
                off_all += got["off"]
                print(f"round {r + 1}/{args.rounds}: step off {off:.3f} s, on {on:.3f} s, on/off {on / off:.4f}",
                      flush=True)
    finally:
        ray.shutdown()
    step_s = statistics.mean(off_all)
    return {
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} CPUs", "params": params,
        "interval_s": args.interval, "rounds": args.rounds, "steps_per_side": args.steps,
        "step_s_off": step_s, "step_s_on": statistics.mean(on_all),
        "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
        "sample_cost_s": sample_s, "sample_bound": sample_s / args.interval, "step_call_s": step_call_s,
        "step_call_bound": step_call_s / step_s, "ratio_ci95": bootstrap_median_ci(ratios),
    }


def bootstrap_median_ci(xs: list[float], n: int = 5000, seed: int = 0) -> tuple[float, float]:
    """95% interval of the median of `xs` by resampling rounds."""
    import random

    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(xs, k=len(xs))) for _ in range(n))
    return meds[int(0.025 * n)], meds[int(0.975 * n) - 1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--steps", type=int, default=6, help="steps per side per round")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the other core is the host's, as "
                   "a GPU node's training process leaves cores to the rest)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--interval", type=float, default=1.0, help="sampling interval (telemetry.interval_s)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args()
    out = run(args)
    print(f"\nstep time {out['step_s_off']:.3f} s ({out['params']:,} parameters), monitor at {args.interval:g} s")
    print(f"on/off step time: median {out['ratio_median']:.4f} over {args.rounds} rounds "
          f"(range {out['ratio_min']:.4f}-{out['ratio_max']:.4f}; 95% interval of the median "
          f"{out['ratio_ci95'][0]:.4f}-{out['ratio_ci95'][1]:.4f}): overhead {100 * (out['ratio_median'] - 1):+.2f}%")
    print(f"one sample (sampler + every gauge): {1e6 * out['sample_cost_s']:.0f} us = "
          f"{100 * out['sample_bound']:.3f}% of a core at one sample per {args.interval:g} s")
    print(f"per step (Monitor.step, six gauges): {1e6 * out['step_call_s']:.0f} us = "
          f"{100 * out['step_call_bound']:.3f}% of a {out['step_s_off']:.3f} s step")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
