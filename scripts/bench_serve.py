#!/usr/bin/env python
"""Load test of `fjordtune serve` on loopback: 50 concurrent chat requests against the served demo model.

Starts a private local Ray cluster, serves the demo job's tiny Mistral4 (random init, seed 0) with a random
adapter on attention and experts merged in the replica (the same path as `fjordtune serve jobs/demo.yaml`),
then per setting:
  - baseline: --sequential requests one after another (latency of one request on an idle server);
  - 50 requests at once (threads, one HTTP connection each), counting 200 / 503 / anything else, and the
    p50 / p95 latency of the answered ones, as ratios to the baseline's p50;
  - the server's /health and one more request afterwards (nothing hangs, it keeps serving).
Settings: the CLI defaults (--max-concurrent 4 --max-queued 16) and a queue long enough for all 50.

    python scripts/bench_serve.py [--max-tokens 16] [--sequential 10]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-tokens", type=int, default=16, help="new tokens per request (default 16)")
    ap.add_argument("--sequential", type=int, default=10, help="baseline requests, one at a time (default 10)")
    ap.add_argument("--concurrent", type=int, default=50, help="requests at once (default 50)")
    args = ap.parse_args()

    import ray
    from conftest import make_lora_adapter

    from fjordtune.config import load_job
    from fjordtune.devstack import free_port
    from fjordtune.model.load import save_builtin
    from fjordtune.serve import app

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    base = save_builtin("tiny-mistral4", tmp / "base", seed=0)
    adapter = make_lora_adapter(base, tmp / "adapter")
    job = load_job(str(REPO / "jobs/demo.yaml"), [f"model.path={base}", f"storage.cache_dir={tmp / 'cache'}"])
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    body = {"model": "demo", "temperature": 0, "max_tokens": args.max_tokens,
            "messages": [{"role": "user", "content": "Hva er hovedstaden i Norge?"}]}
    rows = []
    for max_concurrent, max_queued in ((4, 16), (4, 64)):
        port = free_port()
        options = app.ServeOptions(model_id="demo", port=port, max_concurrent=max_concurrent, max_queued=max_queued)
        app.deploy(job, app.resolve_source(job, adapter=str(adapter), merged=None, engine="transformers"), options)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"

        def ask(_: int) -> tuple[int, float]:
            t0 = time.perf_counter()
            r = requests.post(url, json=body, timeout=300)  # noqa: B023  the loop's url, used inside the loop
            return r.status_code, time.perf_counter() - t0

        ask(0)  # warm-up
        seq = [ask(i)[1] for i in range(args.sequential)]
        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(args.concurrent) as pool:
            results = list(pool.map(ask, range(args.concurrent)))
        wall = time.perf_counter() - t0
        ok = [s for code, s in results if code == 200]
        codes = {c: sum(1 for code, _ in results if code == c) for c in sorted({code for code, _ in results})}
        healthy = requests.get(f"http://127.0.0.1:{port}/health", timeout=30).status_code == 200 and ask(0)[0] == 200
        base_p50 = statistics.median(seq)
        rows.append((max_concurrent, max_queued, codes, base_p50, percentile(ok, 0.5), percentile(ok, 0.95), wall,
                     healthy))
        app.shutdown(options.app_name)
        from ray import serve

        serve.shutdown()
    ray.shutdown()
    print(f"\n{args.concurrent} concurrent chat requests, {args.max_tokens} new tokens each, tiny Mistral4 on CPU "
          f"(1 replica, 1 CPU), loopback HTTP")
    print("| --max-concurrent | --max-queued | answers | one at a time p50 | p50 (ratio) | p95 (ratio) | wall | "
          "healthy after |")
    print("|---:|---:|---|---:|---:|---:|---:|---|")
    for mc, mq, codes, b, p50, p95, wall, healthy in rows:
        answers = ", ".join(f"{n}x {c}" for c, n in codes.items())
        print(f"| {mc} | {mq} | {answers} | {b * 1000:.0f} ms | {p50 * 1000:.0f} ms ({p50 / b:.1f}x) | "
              f"{p95 * 1000:.0f} ms ({p95 / b:.1f}x) | {wall:.1f} s | {'yes' if healthy else 'NO'} |")
    return 0 if all(r[-1] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
