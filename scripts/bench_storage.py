#!/usr/bin/env python
"""Checkpoint transfer speed: `fjordtune.storage.Store` against raw boto3, same bytes, same server, same process.

    .venv/bin/python scripts/bench_storage.py [--size-mib 1024] [--files 8] [--rounds 3] [--json out.json]

Starts a real SeaweedFS on loopback (`fjordtune.devstack.start_s3`), builds a checkpoint-like folder
(`--files` files of random bytes, `--size-mib` in all, plus a few small JSON files), then runs each
round, rotating which side goes first:

  upload    store    `Store.upload_dir`: a commit (files under commits/ID/, each checksummed (xxh3-128)
                     while it uploads, then the manifest and the pointer flip)
            raw      boto3 `client.upload_file` of each file in turn, same part size and concurrency
            raw-all  one boto3 transfer manager with every file in flight at once (the store's
                     scheduling without its hashing and commit)
  download  store    `Store.download_dir`: pointer, manifest, one transfer manager, every file's size
                     and its checksum checked once it lands
            raw      `client.download_file` of the same objects in turn
            raw-all  one transfer manager, the same objects all in flight

The figure that matters is the ratio store throughput / raw throughput (goal: >= 0.9 both ways);
store / raw-all isolates the cost of hashing and committing. The CPU seconds of this process (and how
many of them the kernel spent for it) and of the `weed` server are sampled per run: on a small machine
both share the same cores, so CPU per byte is what decides the speed.

Fair to every side: each reads the same source files (in the page cache after they are built);
downloaded copies are deleted after each run; before each timed run, untimed, `sync` runs and the
script waits until the server is idle, so no side pays for another's write-back or for the work
SeaweedFS goes on doing after a burst of writes. Uploaded objects are deleted after each round.
Everything lives in one temporary folder (`--tmp`), removed at the end; the free space is checked
first. Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20
MB = 1e6
BUCKET = "bench"
SIDES = ("store", "raw", "raw-all")


def build_folder(root: Path, *, size_mib: int, num_files: int) -> int:
    """A checkpoint-like folder: `num_files` shards of random bytes (`size_mib` in all) and small JSON
    files. Returns its size in bytes."""
    root.mkdir(parents=True)
    per_file = (size_mib * MiB) // num_files
    for i in range(num_files):
        with open(root / f"model-{i + 1:05d}-of-{num_files:05d}.safetensors", "wb") as fh:
            left = per_file
            while left:
                n = min(left, 8 * MiB)
                fh.write(os.urandom(n))
                left -= n
    weights = {f"layer.{i}.weight": f"model-{i % num_files + 1:05d}-of-{num_files:05d}.safetensors"
               for i in range(2000)}
    (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weights}, indent=1))
    (root / "config.json").write_text(json.dumps({"hidden_size": 1024, "num_hidden_layers": 6}))
    (root / "generation_config.json").write_text(json.dumps({"do_sample": False}))
    (root / "tokenizer.json").write_text(json.dumps({"vocab": {f"tok{i}": i for i in range(60000)}}))
    return sum(p.stat().st_size for p in root.iterdir())


class Cpu:
    """CPU seconds (user + system) of this process and of the S3 server process tree."""

    def __init__(self, server_pid: int) -> None:
        import psutil

        self.server = psutil.Process(server_pid)

    def _server(self) -> float:
        total = 0.0
        for p in [self.server, *self.server.children(recursive=True)]:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except Exception:  # noqa: BLE001 - a child that just exited
                pass
        return total

    def read(self) -> tuple[float, float, float]:
        """(client CPU seconds, of which system, server CPU seconds)."""
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return ru.ru_utime + ru.ru_stime, ru.ru_stime, self._server()

    def settle(self, *, idle: float = 0.05, timeout_s: float = 60.0) -> float:
        """Wait until the server is idle (under `idle` cores over half a second): after a burst of
        writes SeaweedFS can stay busy for a while, which would be billed to whichever side runs next.
        Returns the seconds waited."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            before = self._server()
            time.sleep(0.5)
            if self._server() - before < idle * 0.5:
                break
        return time.monotonic() - t0


class Bench:
    """The three sides, each moving the whole folder one way."""

    def __init__(self, folder: Path, *, part_size_mib: int, concurrency: int) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        from fjordtune.storage import Store

        self.folder = folder
        self.store = Store(part_size_mib=part_size_mib, max_concurrency=concurrency)
        # plain boto3 as a user would write it; same addressing and connection pool size as the store
        self.client = boto3.session.Session().client(
            "s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"],
            config=Config(s3={"addressing_style": "path"}, max_pool_connections=concurrency + 4))
        part = part_size_mib * MiB
        self.config = TransferConfig(multipart_threshold=part, multipart_chunksize=part, max_concurrency=concurrency)
        self.files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())

    # -- one side, one direction; each returns after every byte is written -------------------------
    def upload(self, side: str, prefix: str) -> None:
        if side == "store":
            self.store.upload_dir(self.folder, f"s3://{BUCKET}/{prefix}")
        elif side == "raw":
            for rel in self.files:
                self.client.upload_file(str(self.folder / rel), BUCKET, f"{prefix}/{rel}", Config=self.config)
        else:
            from boto3.s3.transfer import create_transfer_manager

            with create_transfer_manager(self.client, self.config) as tm:
                futures = [tm.upload(str(self.folder / rel), BUCKET, f"{prefix}/{rel}") for rel in self.files]
                for f in futures:
                    f.result()

    def download(self, side: str, uri: str, dest: Path) -> None:
        if side == "store":
            self.store.download_dir(uri, dest)
            return
        keys = [f"{self.store.commit_uri(uri)[len(f's3://{BUCKET}/'):]}/{rel}" for rel in self.files]
        targets = [dest / rel for rel in self.files]
        for t in targets:
            t.parent.mkdir(parents=True, exist_ok=True)
        if side == "raw":
            for key, target in zip(keys, targets):
                self.client.download_file(BUCKET, key, str(target), Config=self.config)
        else:
            from boto3.s3.transfer import create_transfer_manager

            with create_transfer_manager(self.client, self.config) as tm:
                futures = [tm.download(BUCKET, key, str(t)) for key, t in zip(keys, targets)]
                for f in futures:
                    f.result()

    def delete_prefix(self, prefix: str) -> None:
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=f"{prefix}/"):
            objs = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if objs:
                self.client.delete_objects(Bucket=BUCKET, Delete={"Objects": objs, "Quiet": True})


def start_server(data_dir: Path, *, attempts: int = 3) -> Any:
    """`start_s3`, tried again on failure (free ports can be taken by another process before `weed`
    binds them); the log's last lines are shown, since the folder is deleted at the end."""
    from fjordtune.devstack import start_s3

    for attempt in range(1, attempts + 1):
        folder = data_dir.with_name(f"{data_dir.name}-{attempt}")
        try:
            return start_s3(folder)
        except RuntimeError as e:
            tail = (folder / "weed.log").read_text(errors="replace").strip().splitlines()[-3:]
            print(f"SeaweedFS did not start ({e}); its log ends with:\n  " + "\n  ".join(tail), flush=True)
            if attempt == attempts:
                raise
    raise AssertionError


def timed(fn: Any, cpu: Cpu) -> dict[str, float]:
    os.sync()
    settled = cpu.settle()
    c0, k0, s0 = cpu.read()
    t0 = time.perf_counter()
    fn()
    wall = time.perf_counter() - t0
    c1, k1, s1 = cpu.read()
    return {"s": wall, "cpu_client_s": c1 - c0, "cpu_client_sys_s": k1 - k0, "cpu_server_s": s1 - s0,
            "settle_s": settled}


def summarize(rounds: list[dict[str, Any]], nbytes: int) -> dict[str, Any]:
    """Per direction and side: median and best seconds, MB/s at the median, median client CPU; and the
    store's ratios (median of the per-round ratios, and best run against best run)."""
    out: dict[str, Any] = {}
    for d in ("upload", "download"):
        out[d] = {}
        for side in SIDES:
            runs = [r[d][side] for r in rounds]
            med = statistics.median(x["s"] for x in runs)
            out[d][side] = {"median_s": med, "best_s": min(x["s"] for x in runs), "MBps": nbytes / MB / med,
                            "cpu_client_s": statistics.median(x["cpu_client_s"] for x in runs),
                            "cpu_server_s": statistics.median(x["cpu_server_s"] for x in runs)}
        for base, key in (("raw", "ratio_store_raw"), ("raw-all", "ratio_store_raw_all")):
            out[d][key] = statistics.median(r[d][key] for r in rounds)
            out[d][f"best_{key}"] = out[d][base]["best_s"] / out[d]["store"]["best_s"]
    return out


def _line(direction: str, side: str, r: dict[str, float], nbytes: int) -> str:
    return (f"  {direction:<8} {side:<7} {r['s']:6.2f} s  {nbytes / MB / r['s']:7.1f} MB/s   "
            f"cpu: client {r['cpu_client_s']:4.1f} s (sys {r['cpu_client_sys_s']:3.1f}), server {r['cpu_server_s']:4.1f} s "
            f"({(r['cpu_client_s'] + r['cpu_server_s']) / r['s']:.2f} cores busy; server idle after {r['settle_s']:.1f} s)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from fjordtune.storage import Store

    work = Path(tempfile.mkdtemp(prefix="fjt-bench-storage-", dir=args.tmp))
    server = None
    try:
        need = args.size_mib * MiB * (3 + len(SIDES) * args.rounds) + 512 * MiB
        free = shutil.disk_usage(work).free
        if free < need:
            raise SystemExit(f"{work}: {free / 2**30:.1f} GiB free, the benchmark needs about {need / 2**30:.1f} GiB "
                             "(source, server copies, downloads); use --tmp elsewhere or a smaller --size-mib")
        print(f"building {args.files} x {args.size_mib / args.files:.0f} MiB + small files in {work} ...", flush=True)
        folder = work / "src"
        nbytes = build_folder(folder, size_mib=args.size_mib, num_files=args.files)
        server = start_server(work / "seaweed")
        os.environ.update(server.env)
        Store().ensure_bucket(f"s3://{BUCKET}")
        bench = Bench(folder, part_size_mib=args.part_size_mib, concurrency=args.concurrency)
        cpu = Cpu(server.pid)
        print(f"folder: {len(bench.files)} files, {nbytes / MB:.0f} MB ({nbytes / 2**30:.2f} GiB); SeaweedFS at "
              f"{server.endpoint_url}; part {args.part_size_mib} MiB, concurrency {args.concurrency}; "
              f"{os.cpu_count()} cores", flush=True)
        # warm-up, untimed: connections, the bucket's first volumes
        warm = work / "warm"
        warm.mkdir()
        (warm / "w.bin").write_bytes(os.urandom(8 * MiB))
        bench.store.upload_dir(warm, f"s3://{BUCKET}/warm")
        bench.client.upload_file(str(warm / "w.bin"), BUCKET, "warm-raw/w.bin", Config=bench.config)

        rounds: list[dict[str, Any]] = []
        for i in range(args.rounds):
            order = SIDES[i % len(SIDES):] + SIDES[:i % len(SIDES)]
            print(f"round {i + 1}/{args.rounds} (order: {', '.join(order)})", flush=True)
            res: dict[str, Any] = {"round": i + 1, "order": list(order), "upload": {}, "download": {}}
            store_uri = f"s3://{BUCKET}/r{i}/store"
            for side in order:
                prefix = f"r{i}/{side}"
                res["upload"][side] = timed(partial(bench.upload, side, prefix), cpu)
                print(_line("upload", side, res["upload"][side], nbytes), flush=True)
            for side in order:
                dest = work / "dl" / side
                res["download"][side] = timed(partial(bench.download, side, store_uri, dest), cpu)
                print(_line("download", side, res["download"][side], nbytes), flush=True)
                if sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()) != bench.files:
                    raise RuntimeError(f"download {side}: the files differ from the source")
                shutil.rmtree(dest)
            for d in ("upload", "download"):
                res[d]["ratio_store_raw"] = res[d]["raw"]["s"] / res[d]["store"]["s"]
                res[d]["ratio_store_raw_all"] = res[d]["raw-all"]["s"] / res[d]["store"]["s"]
                print(f"  {d:<8} ratio store / raw {res[d]['ratio_store_raw']:.2f}, "
                      f"store / raw-all {res[d]['ratio_store_raw_all']:.2f}", flush=True)
            rounds.append(res)
            bench.store.delete_folder(store_uri)
            for side in SIDES[1:]:
                bench.delete_prefix(f"r{i}/{side}")

        summary = summarize(rounds, nbytes)
        print(f"over {args.rounds} rounds ({nbytes / MB:.0f} MB each way); ratio = store MB/s / baseline MB/s, "
              "the median of the per-round ratios, and the ratio of the best runs:")
        for d in ("upload", "download"):
            s = summary[d]
            sides = ", ".join(f"{side} {s[side]['median_s']:.2f} s ({s[side]['MBps']:.0f} MB/s, best {s[side]['best_s']:.2f} s, "
                              f"client cpu {s[side]['cpu_client_s']:.1f} s)" for side in SIDES)
            verdict = "ok" if min(s["ratio_store_raw"], s["best_ratio_store_raw"]) >= 0.9 else "BELOW 0.9"
            print(f"  {d:<8} median {sides}")
            print(f"  {d:<8} store / raw {s['ratio_store_raw']:.2f} (best runs {s['best_ratio_store_raw']:.2f}) "
                  f"[{verdict}]; store / raw-all {s['ratio_store_raw_all']:.2f} (best runs {s['best_ratio_store_raw_all']:.2f})")
        return {"machine": {"cores": os.cpu_count(), "python": platform.python_version(),
                            "server": "SeaweedFS weed mini on loopback"},
                "settings": {"size_mib": args.size_mib, "files": len(bench.files), "bytes": nbytes,
                             "part_size_mib": args.part_size_mib, "concurrency": args.concurrency,
                             "rounds": args.rounds},
                "rounds": rounds, "summary": summary}
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=1024, help="size of the big files in all, MiB (default 1024)")
    parser.add_argument("--files", type=int, default=8, help="number of big files (default 8, of 128 MiB each)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds; the order of the sides rotates, so a multiple of 3 puts each side in each "
                             "position equally often (default 3)")
    parser.add_argument("--part-size-mib", type=int, default=64, help="multipart part size, every side (default 64)")
    parser.add_argument("--concurrency", type=int, default=10, help="transfer threads, every side (default 10)")
    parser.add_argument("--tmp", default=None, help="folder for the temporary data (default: $TMPDIR or /tmp)")
    parser.add_argument("--json", metavar="PATH", default=None, help="also write every figure as JSON to PATH")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    result = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
