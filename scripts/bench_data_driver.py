#!/usr/bin/env python
"""What the Ray driver holds for a job's training data, at two sizes: does it grow with the rows?

    .venv/bin/python scripts/bench_data_driver.py [--rows 10000,100000]

For each size it writes a JSON-lines file of distinct chat rows (the demo's, each made unique), then, in
a fresh process per side, measures the driver's peak memory growth (VmHWM, reset after start-up) for:

- fjordtune: plan the mixture and check it against the bundled NorEval samples (`plan_job_data`), then
  tokenize and fit on Ray Data into the object store and cut the per-worker shards (`prepare_datasets`,
  `shard_config`), on a local Ray cluster of 2 CPUs; plus the pickled size of the Ray Train config the
  driver ships (`train_loop_config` without the job).
- the baseline, what fjordtune did before: `read_rows` (every row in the driver) and the pickled size of
  those rows inside the config.

Printed: per size and side, the peak growth and the config bytes, and the growth per row; then the ratio
of growth between the two sizes (10x the rows: about 1 when the driver's memory does not grow with them).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fjordtune.telemetry.rss import reset_peak_rss, status_bytes

ROOT = Path(__file__).resolve().parents[1]
SFT = ROOT / "src" / "fjordtune" / "samples" / "sft" / "demo.jsonl"
MiB = 2**20






def write_rows(path: Path, n: int) -> None:
    base = [json.loads(line) for line in SFT.read_text().splitlines()]
    with path.open("w") as f:
        for i in range(n):
            row = json.loads(json.dumps(base[i % len(base)]))
            row["messages"][-1]["content"] += f" (svar {i})"  # distinct rows: dedup keeps them all
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def side(kind: str, path: str) -> dict:
    """One measurement, in this (fresh) process."""
    if kind == "baseline":
        from fjordtune.data.sft import read_rows

        reset_peak_rss()
        before = status_bytes("VmRSS")
        t0 = time.perf_counter()
        rows = read_rows([path])
        config = pickle.dumps({"rows": rows, "eval_rows": []})
        return {"peak_growth": status_bytes("VmHWM") - before, "config_bytes": len(config), "rows": len(rows),
                "seconds": time.perf_counter() - t0}
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    from fjordtune.config import load_job
    from fjordtune.data.prepare import plan_job_data, prepare_datasets, shard_config
    from fjordtune.storage import Store

    tmp = tempfile.mkdtemp(prefix="fjordtune-bench-")
    job = load_job(ROOT / "jobs" / "demo.yaml", [f"storage.uri={tmp}", f"data.train_files=[{path}]",
                                                  "data.eval_files=[]", "model.tokenizer=builtin:demo"])
    import fjordtune.data.contamination  # noqa: F401  (imports are not what is measured)
    import fjordtune.data.mixture  # noqa: F401

    reset_peak_rss()
    before = status_bytes("VmRSS")
    t0 = time.perf_counter()
    data = plan_job_data(job, store=Store.for_job(job), say=lambda line: None)
    prepared = prepare_datasets(job, data, model_uri="", say=lambda line: None)
    shards = shard_config(prepared.datasets, job.resources.num_workers)
    config = pickle.dumps({"model_uri": "", "adapter_uri": "", "lengths": prepared.lengths.__dict__,
                           "has_eval": False, "predicted_peak_bytes": None, "ray_job": ""})
    out = {"peak_growth": status_bytes("VmHWM") - before, "config_bytes": len(config), "rows": prepared.num_train,
           "seconds": time.perf_counter() - t0, "data_config_bytes": len(ray.cloudpickle.dumps(shards))}
    ray.shutdown()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="10000,100000", help="two row counts, comma-separated (default 10000,100000)")
    p.add_argument("--side", choices=("fjordtune", "baseline"), help=argparse.SUPPRESS)
    p.add_argument("--file", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.side:
        print(json.dumps(side(args.side, args.file)))
        return 0
    sizes = [int(x) for x in args.rows.split(",")]
    results: dict[tuple[str, int], dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            path = Path(tmp, f"rows-{n}.jsonl")
            write_rows(path, n)
            for kind in ("baseline", "fjordtune"):
                res = subprocess.run([sys.executable, __file__, "--side", kind, "--file", str(path)],
                                     capture_output=True, text=True, check=True)
                r = json.loads(res.stdout.strip().splitlines()[-1])
                results[kind, n] = r
                print(f"{kind:9s} {n:>8,} rows: driver peak +{r['peak_growth'] / MiB:7.1f} MiB "
                      f"({r['peak_growth'] / n:6.0f} B/row), Ray Train config {r['config_bytes']:>12,} B"
                      + (f", DataConfig {r['data_config_bytes']:,} B" if "data_config_bytes" in r else "")
                      + f", {r['seconds']:.1f} s", flush=True)
    if len(sizes) == 2:
        a, b = sizes
        for kind in ("baseline", "fjordtune"):
            g = results[kind, b]["peak_growth"] / max(1, results[kind, a]["peak_growth"])
            c = results[kind, b]["config_bytes"] / results[kind, a]["config_bytes"]
            print(f"{kind:9s} {b / a:g}x the rows: driver peak growth x{g:.2f}, config bytes x{c:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
