#!/usr/bin/env python
"""Mixture planning at scale: the driver's memory and time for `plan_mixture` over a big JSON-lines file.

    .venv/bin/python scripts/bench_mixture.py [--rows 1000000] [--baseline] [--tmp DIR] [--json out.json]

Writes `--rows` small chat rows (about 180 bytes a line; 1% exact repeats of the row before and 1% that
differ from it only in case and punctuation) into one local JSON-lines file, then plans a mixture of it
in a fresh Python process (`data.dedup: normalised`, the costliest setting, weight 1 so every row is
kept: the most the plan can hold) and builds its chunks, as the Ray driver does; then, outside the
measured peak, reads every chunk back in that process (what the Ray tasks share). With `--baseline` a
second fresh process reads the same file the old way (`fjordtune.data.sft.read_rows`, every row a
Python dict on the driver).

Memory is the process's resident set: each child first runs the same code on a tiny file (so every
lazy import is done), resets the kernel's peak counter (`/proc/self/clear_refs`), reads its RSS, runs,
then reads the peak (`VmHWM`). The growth (peak minus the RSS before) is what the work itself cost.
Results: docs/benchmarks.md, "Mixture planning".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fjordtune.telemetry.rss import reset_peak_rss, status_bytes

ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20
WORDS = ["fjord", "fjell", "bre", "elv", "skog", "øy", "vidde", "dal", "bekk", "myr"]


def write_rows(path: Path, num_rows: int) -> int:
    """`num_rows` chat rows, with 1% exact repeats and 1% normalised near-repeats. Returns the bytes."""
    with open(path, "w", encoding="utf-8") as f:
        for i in range(num_rows):
            j = i - 1 if i % 100 in (7, 13) else i  # these rows repeat the row before
            w = WORDS[j % len(WORDS)]
            question = f"Spørsmål {j}: hva er en {w}, og hvor finner man den?"
            answer = f"En {w} er et landskapstrekk nummer {j}; den finnes mange steder i Norge."
            if j != i and i % 100 == 13:  # the near-repeat: other case and punctuation
                answer = answer.upper().replace(";", " -")
            f.write(json.dumps({"messages": [{"role": "user", "content": question},
                                             {"role": "assistant", "content": answer}]}, ensure_ascii=False) + "\n")
    return path.stat().st_size






def child(mode: str, big: str, tiny: str) -> dict[str, Any]:
    """Run in a fresh process: warm up on `tiny`, then measure `mode` on `big`."""
    from fjordtune.config.schema import DataSection
    from fjordtune.data.mixture import plan_mixture
    from fjordtune.data.sft import read_rows
    from fjordtune.storage import Store

    store = Store()

    def run(path: str) -> dict[str, Any]:
        if mode == "read_rows":
            return {"rows": len(read_rows([path], store=store))}
        lines: list[str] = []
        plan = plan_mixture(DataSection(train_files=[path], dedup="normalised"), store=store, progress=lines.append)
        chunks = plan.chunks()
        return {"rows": plan.num_rows, "chunks": len(chunks), "chunk_json_bytes": len(json.dumps(chunks)),
                "manifest": plan.manifest, "progress": lines, "plan": plan}

    run(tiny).pop("plan", None)
    reset = reset_peak_rss()
    before = status_bytes("VmRSS")
    start = time.perf_counter()
    out = run(big)
    seconds = time.perf_counter() - start
    peak = status_bytes("VmHWM")
    if mode == "plan":  # after the peak is taken: what the Ray tasks will do, here in one process
        start_read = time.perf_counter()
        out["read_back"] = sum(1 for _ in out.pop("plan").rows(store=store))
        out["read_seconds"] = time.perf_counter() - start_read
    return {**out, "mode": mode, "seconds": seconds, "rss_before": before, "rss_peak": peak,
            "growth": peak - before, "peak_reset": reset}


def measure(mode: str, big: Path, tiny: Path) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, "--child", mode, str(big), str(tiny)], check=True,
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--baseline", action="store_true", help="also measure the old whole-file read_rows")
    ap.add_argument("--tmp", default=None, help="folder for the generated file (default: a temporary one)")
    ap.add_argument("--json", default=None, help="write the results here too")
    ap.add_argument("--child", nargs=3, metavar=("MODE", "BIG", "TINY"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        big, tiny = Path(tmp) / "rows.jsonl", Path(tmp) / "tiny.jsonl"
        t = time.perf_counter()
        size = write_rows(big, args.rows)
        write_rows(tiny, 200)
        print(f"wrote {args.rows:,} rows, {size / MiB:.1f} MiB, in {time.perf_counter() - t:.1f} s")
        results = {"rows": args.rows, "file_bytes": size, "python": platform.python_version(),
                   "plan": measure("plan", big, tiny)}
        if args.baseline:
            results["read_rows"] = measure("read_rows", big, tiny)
    for mode in ("plan", "read_rows"):
        r = results.get(mode)
        if not r:
            continue
        print(f"{mode:9s}: {r['seconds']:6.1f} s ({args.rows / r['seconds']:,.0f} rows/s), RSS {r['rss_before'] / MiB:.0f}"
              f" -> peak {r['rss_peak'] / MiB:.0f} MiB: grew {r['growth'] / MiB:.1f} MiB = {r['growth'] / size:.2f}x the "
              f"file, {r['growth'] / args.rows:.0f} bytes a row")
        for line in r.get("progress", []):
            print("   ", line)
        if "chunks" in r:
            print(f"    {r['chunks']:,} chunks, {r['chunk_json_bytes'] / MiB:.1f} MiB as JSON; all read back chunk by "
                  f"chunk in {r['read_seconds']:.1f} s ({r['read_back'] / r['read_seconds']:,.0f} rows/s)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
