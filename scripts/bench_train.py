#!/usr/bin/env python
"""Training speed: FSDP2 against one process, packed against padded, background checkpoints against none.

    .venv/bin/python scripts/bench_train.py [--rounds 3] [--every 3] [--json out.json]

Builds one random-init Mistral4 (MLA attention, fused routed experts, a shared expert; the shapes of
`builtin:tiny-mistral4` made wider: `--hidden`, `--layers`, `--experts`), LoRA rank `--lora-rank` on
the targets of jobs/demo.yaml (attention, experts, lm_head), fp32, activation checkpointing, the 60 demo
rows (max_seq_len 256). Every side is a long-lived process (or gloo process group) that sets up once,
takes `--warmup` untimed steps, then waits; the script then runs the timed rounds one side at a time,
rotating which side goes first, so no two sides ever share the CPU. Three comparisons, each a ratio
against a baseline run in the same script:

  throughput  fsdp     2 gloo ranks (FSDP2, `torch.set_num_threads(1)` each), 1 packed sequence per rank
              single   1 process without torch.distributed (a plain peft model, no FSDP),
                       `--single-threads` (default 2) threads, 2 packed sequences per micro-batch:
                       the same 2 sequences per step on the same two cores (2 ranks x 1 thread
                       against 1 process x 2 threads is the fair split of a 2-core machine);
                       activation checkpointing on both sides
  packing     packed   = single
              padded   1 process, `--single-threads` threads, data.packing false, 12 rows per micro-batch:
                       the same 60 rows per epoch in the same 5 steps (2 packs of ~6 rows each)
  checkpoint  none     2 gloo ranks, the real loop (`train.loop.train_loop`), checkpoint_every_steps
                       beyond the run (the loop still writes its final checkpoint: excluded, see below)
              bg       the same loop with a checkpoint every `--every` steps: DCP shard saved locally,
                       uploaded by `CheckpointWriter`'s thread to a real SeaweedFS S3 server while
                       training goes on, committed once every rank's upload is done
              sync     `save_checkpoint` (save locally, upload, commit, and wait), timed on its own

Throughput is real (non-padding) input tokens per second over the `core.train_step` calls of one
epoch per round (5 steps; `--epochs-per-round`); the ratio of each round is new / baseline, and the
median and range over rounds are printed. Packing efficiency is `data.sft.token_efficiency`: real
tokens / token slots (padding included) of one epoch's batches.

Checkpoint step time is the loop's own wall time between the metrics reports of consecutive steps
(`Hooks(report=..., report_every_s=0)`: everything the loop does per step, the local DCP save and the
upload's polls included), over a window of `--checkpoints` whole checkpoint periods: from the report of
step every-1 to that of step (checkpoints+1)*every-1. The run has one more step, the last, whose
synchronous final checkpoint is left out (both sides write it). Also shown: the mean `step_time_s` the
loop reports (the `train_step` alone: how much the upload slows the computation itself), the cost per
checkpoint (the window's extra seconds / its checkpoints), CPU seconds of the ranks and of the S3
server per window, and after how many steps each upload was committed. Before each timed loop, untimed:
`sync`, and a wait until the S3 server is idle.

Everything lives in one temporary folder (`--tmp`), removed at the end. `--parts` picks the comparisons.
Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import shutil
import socket
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "jobs" / "demo.yaml"
SFT = ROOT / "src" / "fjordtune" / "samples" / "sft" / "demo.jsonl"
MiB = 1 << 20
BUCKET = "bench-train"
PARTS = ("throughput", "packing", "checkpoint")
PACKED_PER_STEP = 2  # packed sequences per optimizer step, every throughput side
PADDED_MICRO = 12  # rows per step of the padded side: 60 rows in 5 steps, as the packed sides


# -- the model ---------------------------------------------------------------------------------------

def build_model(out: Path, *, hidden: int, layers: int, experts: int, seed: int = 0) -> tuple[Path, int]:
    """`builtin:tiny-mistral4` made wider and deeper, saved with the demo tokenizer as `save_builtin`
    saves a preset; returns (folder, parameters)."""
    import torch

    from fjordtune.model.load import builtin_config, causal_lm_class, load_tokenizer

    tok = load_tokenizer("builtin:demo")
    cfg = builtin_config("tiny-mistral4", vocab_size=len(tok))
    cfg.hidden_size, cfg.num_hidden_layers, cfg.n_routed_experts = hidden, layers, experts
    cfg.moe_intermediate_size, cfg.intermediate_size = hidden // 2, hidden
    cfg.num_attention_heads = cfg.num_key_value_heads = 8
    cfg.q_lora_rank, cfg.kv_lora_rank = hidden // 4, hidden // 8
    cfg.qk_nope_head_dim = cfg.qk_rope_head_dim = 32
    cfg.qk_head_dim = cfg.head_dim = cfg.v_head_dim = 64
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    cfg.architectures = [causal_lm_class(cfg).__name__]
    torch.manual_seed(seed)
    model = causal_lm_class(cfg)(cfg)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out, sum(p.numel() for p in model.parameters())


def _overrides(lora_rank: int, *, packing: bool, micro: int, extra: tuple[str, ...] = ()) -> list[str]:
    return [f"lora.rank={lora_rank}", f"lora.alpha={2 * lora_rank}", f"data.packing={str(packing).lower()}",
            f"train.micro_batch_size={micro}", "train.grad_accum_steps=1", "data.max_seq_len=256",
            "model.dtype=float32", "train.activation_checkpointing=true", *extra]


# -- the sides: long-lived worker processes -----------------------------------------------------------

def _worker(rank: int, world: int, port: int, kind: str, spec: dict[str, Any], cmds: Any, results: Any) -> None:
    """One process of one side: set up, warm up, say "ready", then run each command it receives."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(spec["threads"])
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        side = (_StepsSide if kind == "steps" else _LoopSide)(rank, world, spec)
        results.put({"rank": rank, **side.ready})
        while (cmd := cmds.get()) is not None:
            results.put({"rank": rank, **side.run(cmd)})
    except BaseException:  # noqa: BLE001 - reported to the parent, which stops the benchmark
        results.put({"rank": rank, "error": traceback.format_exc()})
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _core(spec: dict[str, Any], overrides: list[str]) -> tuple[Any, Any, list[dict[str, Any]]]:
    import torch

    from fjordtune.config import load_job
    from fjordtune.data.sft import read_rows
    from fjordtune.train.core import TrainerCore

    job = load_job(JOB, overrides)
    core = TrainerCore(job, model_dir=spec["model_dir"], device=torch.device("cpu"))
    return job, core, read_rows([str(SFT)])


class _StepsSide:
    """Throughput and packing sides: `core.train_step` over one epoch's step batches per round."""

    def __init__(self, rank: int, world: int, spec: dict[str, Any]) -> None:
        from fjordtune.data.sft import step_batches, token_efficiency
        from fjordtune.train.loop import prepare_data

        micro = spec["micro"]
        job, self.core, rows = _core(spec, _overrides(spec["lora_rank"], packing=spec["packing"], micro=micro))
        data = prepare_data(self.core, rows, [], world=world)
        self.batches = list(step_batches(data.items, batch_size=micro, rank=rank, world_size=world, epoch=0,
                                         seed=job.data.shuffle_seed, pad_id=self.core.tokenizer.pad_token_id))
        real, slots = token_efficiency(data.items, batch_size=micro, world_size=world, seed=job.data.shuffle_seed)
        warm = [self._step(self.batches[i % len(self.batches)])[0] for i in range(spec["warmup"])]
        self.ready = {"steps_per_epoch": len(self.batches), "sequences": len(data.items), "efficiency": real / slots,
                      "warmup_s": warm, "trainable": sum(p.numel() for p in self.core.model.parameters()
                                                         if p.requires_grad)}

    def _step(self, batch: Any) -> tuple[float, int]:
        t0 = time.perf_counter()
        res = self.core.train_step(batch)
        return time.perf_counter() - t0, res.num_input_tokens

    def run(self, cmd: dict[str, Any]) -> dict[str, Any]:
        cpu0, times, tokens = time.process_time(), [], 0
        for _ in range(cmd["epochs"]):
            for batch in self.batches:
                dt, n = self._step(batch)
                times.append(dt)
                tokens += n
        return {"s": sum(times), "step_s": times, "tokens": tokens, "cpu_s": time.process_time() - cpu0}


class _LoopSide:
    """The checkpoint sides: the real training loop on 2 ranks, with or without periodic checkpoints, and
    synchronous saves timed on their own."""

    def __init__(self, rank: int, world: int, spec: dict[str, Any]) -> None:
        from fjordtune.data.sft import step_batches
        from fjordtune.storage import Store
        from fjordtune.train.checkpointing import save_checkpoint

        self.rank, self.world, self.spec = rank, world, spec
        job, self.core, self.rows = _core(spec, self._overrides(every=1, total=2))
        self.store = Store.for_job(job)
        first = next(step_batches(self._data(job).items, batch_size=1, rank=rank, world_size=world, epoch=0,
                                  seed=job.data.shuffle_seed, pad_id=self.core.tokenizer.pad_token_id))
        warm = []
        for _ in range(spec["warmup"]):
            t0 = time.perf_counter()
            self.core.train_step(first)
            warm.append(time.perf_counter() - t0)
        # the first save pays one-time costs (DCP planner, the S3 client, the bucket check): untimed
        save_checkpoint(self.core, self.store, f"s3://{BUCKET}/warmup", step=1, epoch=0, metrics={}, keep=1)
        self.ready = {"warmup_s": warm, "trainable": sum(p.numel() for p in self.core.model.parameters()
                                                         if p.requires_grad)}
        self.server = None
        if rank == 0:
            import psutil

            self.server = psutil.Process(spec["server_pid"])

    def _overrides(self, *, every: int, total: int) -> list[str]:
        return _overrides(self.spec["lora_rank"], packing=True, micro=1,
                          extra=(f"storage.uri=s3://{BUCKET}/runs", f"train.checkpoint_every_steps={every}",
                                 f"train.max_steps={total}", "train.num_checkpoints_to_keep=2"))

    def _data(self, job: Any) -> Any:
        from fjordtune.train.loop import prepare_data

        self.core.job = job  # the loop reads the schedule, batch and checkpoint settings from core.job
        return prepare_data(self.core, self.rows, [], world=self.world)

    def _server_cpu(self) -> float:
        if self.server is None:
            return 0.0
        total = 0.0
        for p in [self.server, *self.server.children(recursive=True)]:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except Exception:  # noqa: BLE001 - a child that just exited
                pass
        return total

    def run(self, cmd: dict[str, Any]) -> dict[str, Any]:
        return self._loop(cmd) if cmd["op"] == "loop" else self._sync(cmd)

    def _loop(self, cmd: dict[str, Any]) -> dict[str, Any]:
        from fjordtune.config import load_job
        from fjordtune.train.loop import Hooks, train_loop

        job = load_job(JOB, self._overrides(every=cmd["every"], total=cmd["total"]))
        data = self._data(job)
        reports: list[dict[str, float]] = []
        commits: list[tuple[int, float]] = []

        def report(metrics: dict[str, Any]) -> None:
            reports.append({"step": metrics["step"], "t": time.perf_counter(), "cpu": time.process_time(),
                            "server_cpu": self._server_cpu(), "step_time_s": metrics["step_time_s"],
                            "tokens_per_s": metrics["tokens_per_s"]})

        def committed(step: int) -> None:
            # called from the poll after a step's train_step, before that step's report
            commits.append((step, reports[-1]["step"] + 1 if reports else 1))

        train_loop(self.core, data, store=self.store, run_uri=cmd["run_uri"], rank=self.rank, world=self.world,
                   hooks=Hooks(report=report, committed=committed, report_every_s=0))
        return {"reports": reports, "commits": commits}

    def _sync(self, cmd: dict[str, Any]) -> dict[str, Any]:
        from fjordtune.train.checkpointing import save_checkpoint

        tmp = tempfile.mkdtemp(prefix="fjt-bench-train-local-")
        try:
            t0 = time.perf_counter()
            self.core.save_resumable(tmp)  # the part of a checkpoint the loop always pays synchronously
            local_s = time.perf_counter() - t0
            local_bytes = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        t0, cpu0, server0 = time.perf_counter(), time.process_time(), self._server_cpu()
        save_checkpoint(self.core, self.store, cmd["run_uri"], step=cmd["step"], epoch=0, metrics={}, keep=2)
        return {"local_s": local_s, "local_bytes": local_bytes, "sync_s": time.perf_counter() - t0,
                "cpu_s": time.process_time() - cpu0, "server_cpu_s": self._server_cpu() - server0}


class Side:
    """A side's processes (1, or a gloo group), fed one command at a time; every rank answers."""

    def __init__(self, name: str, *, kind: str, world: int, spec: dict[str, Any]) -> None:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.name, self.world = name, world
        self.results = ctx.Queue()
        self.cmds = [ctx.Queue() for _ in range(world)]
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.procs = [ctx.Process(target=_worker, args=(r, world, port, kind, spec, self.cmds[r], self.results),
                                  name=f"bench-{name}-{r}", daemon=True) for r in range(world)]
        for p in self.procs:
            p.start()
        self.ready: list[dict[str, Any]] | None = None

    def collect(self, *, timeout_s: float = 1800) -> list[dict[str, Any]]:
        """One answer per rank, in rank order; raises if a rank failed or died."""
        got: dict[int, dict[str, Any]] = {}
        deadline = time.monotonic() + timeout_s
        while len(got) < self.world:
            try:
                msg = self.results.get(timeout=1.0)
            except queue.Empty:
                dead = [p.name for p in self.procs if not p.is_alive()]
                if dead or time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name}: {', '.join(dead) or 'no answer'}: "
                                       f"{'exited' if dead else 'timed out'} without an answer") from None
                continue
            if "error" in msg:
                raise RuntimeError(f"{self.name} rank {msg['rank']} failed:\n{msg['error']}")
            got[msg["rank"]] = msg
        return [got[r] for r in range(self.world)]

    def wait_ready(self) -> list[dict[str, Any]]:
        self.ready = self.collect()
        return self.ready

    def call(self, cmd: dict[str, Any]) -> list[dict[str, Any]]:
        for q in self.cmds:
            q.put(cmd)
        return self.collect()

    def close(self) -> None:
        for q in self.cmds:
            q.put(None)
        for p in self.procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()


# -- the comparisons ---------------------------------------------------------------------------------

def _spread(xs: list[float], fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(statistics.median(xs))} [{fmt.format(min(xs))}-{fmt.format(max(xs))}]"


def run_steps(args: argparse.Namespace, model_dir: Path, parts: set[str]) -> dict[str, Any]:
    """Throughput and packing: the sides set up together, then take turns."""
    base = {"model_dir": str(model_dir), "lora_rank": args.lora_rank, "warmup": args.warmup}
    one = {**base, "threads": args.single_threads}
    specs: dict[str, tuple[int, dict[str, Any]]] = {
        "single": (1, {**one, "packing": True, "micro": PACKED_PER_STEP})}
    if "throughput" in parts:
        specs["fsdp"] = (2, {**base, "threads": 1, "packing": True, "micro": PACKED_PER_STEP // 2})
    if "packing" in parts:
        specs["padded"] = (1, {**one, "packing": False, "micro": PADDED_MICRO})
    print(f"setting up {', '.join(specs)} (each warms up with {args.warmup} untimed steps) ...", flush=True)
    sides = {name: Side(name, kind="steps", world=world, spec=spec) for name, (world, spec) in specs.items()}
    try:
        info = {}
        for name, side in sides.items():
            r0 = side.wait_ready()[0]
            info[name] = r0
            print(f"  {name:<7} ready: {r0['sequences']} sequences, {r0['steps_per_epoch']} steps per epoch, "
                  f"token efficiency {r0['efficiency']:.1%}, warm-up steps "
                  + ", ".join(f"{s:.2f}" for s in r0["warmup_s"]) + " s", flush=True)
        names = list(sides)
        rounds: list[dict[str, Any]] = []
        for i in range(args.rounds):
            order = names[i % len(names):] + names[:i % len(names)]
            res: dict[str, Any] = {"round": i + 1, "order": order}
            for name in order:
                answers = sides[name].call({"epochs": args.epochs_per_round})
                wall = max(a["s"] for a in answers)  # the ranks step together; the slower one's time
                res[name] = {"s": wall, "tokens": answers[0]["tokens"], "tok_s": answers[0]["tokens"] / wall,
                             "steps": len(answers[0]["step_s"]), "cpu_s": sum(a["cpu_s"] for a in answers)}
                r = res[name]
                print(f"  round {i + 1} {name:<7} {r['steps']} steps {r['s']:6.2f} s  {r['tokens']} real tokens  "
                      f"{r['tok_s']:7.1f} tok/s  (cpu {r['cpu_s']:.1f} s, {r['cpu_s'] / r['s']:.2f} cores)", flush=True)
            rounds.append(res)
    finally:
        for side in sides.values():
            side.close()
    out: dict[str, Any] = {"rounds": rounds, "ready": info}
    for new, old in (("fsdp", "single"), ("single", "padded")):
        if new in sides and old in sides:
            out[f"{new}/{old}"] = [r[new]["tok_s"] / r[old]["tok_s"] for r in rounds]
    return out


def _window(reports: list[dict[str, float]], *, start: int, end: int) -> dict[str, float]:
    """The loop's figures between the reports of steps `start` and `end` (steps start+1 .. end)."""
    by_step = {r["step"]: r for r in reports}
    a, b = by_step[start], by_step[end]
    inside = [r for r in reports if start < r["step"] <= end]
    return {"s": b["t"] - a["t"], "steps": end - start, "cpu_s": b["cpu"] - a["cpu"],
            "server_cpu_s": b["server_cpu"] - a["server_cpu"],
            "step_time_s": statistics.fmean(r["step_time_s"] for r in inside)}


def run_checkpoint(args: argparse.Namespace, model_dir: Path, work: Path) -> dict[str, Any]:
    """Background checkpoints against none, on the real loop and a real S3 server; then synchronous saves."""
    from fjordtune.storage import Store

    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_storage import Cpu, start_server

    server = start_server(work / "seaweed")
    side = None
    try:
        os.environ.update(server.env)  # the ranks inherit it: Store() reads AWS_ENDPOINT_URL and the keys
        Store().ensure_bucket(f"s3://{BUCKET}")
        cpu = Cpu(server.pid)
        every, num = args.every, args.checkpoints
        total = (num + 1) * every  # + the last step, whose final checkpoint is synchronous: left out
        start, end = every - 1, (num + 1) * every - 1
        spec = {"model_dir": str(model_dir), "lora_rank": args.lora_rank, "warmup": args.warmup, "threads": 1,
                "server_pid": server.pid}
        print(f"checkpoint: SeaweedFS at {server.endpoint_url}; 2 gloo ranks, {total} steps per loop, timed "
              f"steps {start + 1}-{end} ({num} checkpoint periods of {every} steps) ...", flush=True)
        side = Side("loop", kind="loop", world=2, spec=spec)
        r0 = side.wait_ready()[0]
        print("  loop ready, warm-up steps " + ", ".join(f"{s:.2f}" for s in r0["warmup_s"]) + " s", flush=True)
        rounds: list[dict[str, Any]] = []
        modes = ("none", "bg")
        for i in range(args.rounds):
            order = modes if i % 2 == 0 else modes[::-1]
            res: dict[str, Any] = {"round": i + 1, "order": list(order)}
            for mode in order:
                os.sync()
                cpu.settle()
                answers = side.call({"op": "loop", "every": every if mode == "bg" else total + 1, "total": total,
                                     "run_uri": f"s3://{BUCKET}/runs/r{i + 1}-{mode}"})
                w = [_window(a["reports"], start=start, end=end) for a in answers]
                r = {"s": max(x["s"] for x in w), "steps": w[0]["steps"], "cpu_s": sum(x["cpu_s"] for x in w),
                     "server_cpu_s": w[0]["server_cpu_s"], "step_time_s": max(x["step_time_s"] for x in w),
                     "commits": answers[0]["commits"]}
                r["per_step_s"] = r["s"] / r["steps"]
                res[mode] = r
                lag = ", ".join(f"{s}@{at}" for s, at in r["commits"])
                print(f"  round {i + 1} {mode:<4} {r['steps']} steps {r['s']:6.2f} s  {r['per_step_s']:.3f} s/step "
                      f"(train_step {r['step_time_s']:.3f} s)  cpu: ranks {r['cpu_s']:.1f} s, server "
                      f"{r['server_cpu_s']:.1f} s;  committed (step@reported step): {lag}", flush=True)
            os.sync()
            cpu.settle()
            answers = side.call({"op": "sync", "step": 1000 + i, "run_uri": f"s3://{BUCKET}/runs/r{i + 1}-sync"})
            res["sync"] = {"sync_s": max(a["sync_s"] for a in answers), "local_s": max(a["local_s"] for a in answers),
                           "bytes": sum(a["local_bytes"] for a in answers), "cpu_s": sum(a["cpu_s"] for a in answers),
                           "server_cpu_s": answers[0]["server_cpu_s"]}
            s = res["sync"]
            print(f"  round {i + 1} sync save_checkpoint {s['sync_s']:.2f} s (a local DCP save alone: "
                  f"{s['local_s']:.2f} s), {s['bytes'] / MiB:.1f} MiB;  cpu: ranks {s['cpu_s']:.1f} s, "
                  f"server {s['server_cpu_s']:.1f} s", flush=True)
            rounds.append(res)
    finally:
        if side is not None:
            side.close()
        server.stop()
    for r in rounds:
        r["ratio"] = r["bg"]["s"] / r["none"]["s"]
        r["train_step_ratio"] = r["bg"]["step_time_s"] / r["none"]["step_time_s"]
        r["per_checkpoint_s"] = (r["bg"]["s"] - r["none"]["s"]) / num
    return {"rounds": rounds, "every": every, "checkpoints": num, "total_steps": total, "window": [start, end]}


# -- the report --------------------------------------------------------------------------------------

def summarize(steps: dict[str, Any] | None, ckpt: dict[str, Any] | None, *, threads: int) -> list[str]:
    lines = ["| comparison | baseline | new | new / baseline: median [range] of the per-round ratios |",
             "|---|---|---|---|"]
    if steps:
        rounds = steps["rounds"]

        def tok(name: str) -> str:
            return _spread([r[name]["tok_s"] for r in rounds], "{:.0f}") + " tok/s"

        if "fsdp/single" in steps:
            lines.append(f"| real tokens/s: FSDP2, 2 ranks x 1 thread vs 1 process x {threads} threads (no FSDP) | "
                         f"{tok('single')} | {tok('fsdp')} | "
                         f"**{_spread(steps['fsdp/single'])}** |")
        if "single/padded" in steps:
            eff = steps["ready"]
            lines.append(f"| real tokens/s: packed vs padded (1 process) | {tok('padded')} | {tok('single')} | "
                         f"**{_spread(steps['single/padded'])}** |")
            lines.append(f"| packing efficiency (real / slots) | {eff['padded']['efficiency']:.1%} | "
                         f"{eff['single']['efficiency']:.1%} | {eff['single']['efficiency'] / eff['padded']['efficiency']:.2f} |")
    if ckpt:
        rounds = ckpt["rounds"]
        k = ckpt["every"]
        none = _spread([r["none"]["per_step_s"] for r in rounds], "{:.3f}")
        bg = _spread([r["bg"]["per_step_s"] for r in rounds], "{:.3f}")
        lines.append(f"| loop s/step: background checkpoint every {k} steps vs none | {none} s | {bg} s | "
                     f"**{_spread([r['ratio'] for r in rounds], '{:.3f}')}** |")
        lines.append(f"| train_step alone (step_time_s), same runs | "
                     f"{_spread([r['none']['step_time_s'] for r in rounds], '{:.3f}')} s | "
                     f"{_spread([r['bg']['step_time_s'] for r in rounds], '{:.3f}')} s | "
                     f"{_spread([r['train_step_ratio'] for r in rounds], '{:.3f}')} |")
        per = [r["per_checkpoint_s"] for r in rounds]
        sync = [r["sync"]["sync_s"] for r in rounds]
        local = [r["sync"]["local_s"] for r in rounds]
        step = statistics.median(r["none"]["per_step_s"] for r in rounds)
        lines.append(f"| seconds of training lost per checkpoint: synchronous `save_checkpoint` vs background | "
                     f"{_spread(sync)} s (local DCP save {_spread(local)} s) | {_spread(per)} s | "
                     f"{statistics.median(per) / statistics.median(sync):.2f} |")
        n = ckpt["checkpoints"]
        extra = [((r["bg"]["cpu_s"] + r["bg"]["server_cpu_s"]) - (r["none"]["cpu_s"] + r["none"]["server_cpu_s"])) / n
                 for r in rounds]
        sync_cpu = [r["sync"]["cpu_s"] + r["sync"]["server_cpu_s"] for r in rounds]
        lines.append(f"| CPU seconds per checkpoint (ranks + S3 server): synchronous vs background (extra over none) | "
                     f"{_spread(sync_cpu)} s | {_spread(extra)} s | {statistics.median(extra) / statistics.median(sync_cpu):.2f} |")
        lines.append(f"| the same as overhead at one checkpoint every {k} steps ({step:.3f} s each) | "
                     f"+{statistics.median(sync) / (k * step):.0%} | +{statistics.median(per) / (k * step):.0%} | "
                     f"goal: background within +5% |")
    return lines


def run(args: argparse.Namespace) -> dict[str, Any]:
    parts = set(args.parts)
    work = Path(tempfile.mkdtemp(prefix="fjt-bench-train-", dir=args.tmp))
    try:
        t0 = time.perf_counter()
        model_dir, n = build_model(work / "model", hidden=args.hidden, layers=args.layers, experts=args.experts)
        print(f"model: Mistral4 hidden {args.hidden}, {args.layers} layers, {args.experts} experts top-2, "
              f"{n / 1e6:.1f}M parameters (fp32, {n * 4 / MiB:.0f} MiB); LoRA r={args.lora_rank} on jobs/demo.yaml's "
              f"targets; {os.cpu_count()} cores; built in {time.perf_counter() - t0:.0f} s", flush=True)
        steps = run_steps(args, model_dir, parts) if parts & {"throughput", "packing"} else None
        ckpt = run_checkpoint(args, model_dir, work) if "checkpoint" in parts else None
        trainable = None
        if steps:
            trainable = steps["ready"]["single"]["trainable"]
        if ckpt:
            b = ckpt["rounds"][0]["sync"]["bytes"]
            print(f"checkpoint: {b / MiB:.1f} MiB (adapter + AdamW state, DCP shards of both ranks + RNG/progress)")
        if trainable:
            print(f"LoRA: {trainable / 1e6:.2f}M trainable parameters")
        print(f"\nover {args.rounds} rounds, each side in turn (order rotating); total {time.perf_counter() - t0:.0f} s")
        for line in summarize(steps, ckpt, threads=args.single_threads):
            print(line)
        return {"machine": {"cores": os.cpu_count(), "python": platform.python_version()},
                "settings": vars(args), "parameters": n, "steps": steps, "checkpoint": ckpt}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per comparison (default 3)")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="comparisons to run (default all)")
    parser.add_argument("--hidden", type=int, default=512, help="hidden size (default 512)")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (default 4)")
    parser.add_argument("--experts", type=int, default=16, help="routed experts, top-2 (default 16)")
    parser.add_argument("--lora-rank", type=int, default=48, help="LoRA rank, alpha = 2 x rank (default 48)")
    parser.add_argument("--single-threads", type=int, default=2,
                        help="torch threads of the one-process sides (default 2: the cores the two ranks use)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per side before the rounds (default 2)")
    parser.add_argument("--epochs-per-round", type=int, default=1,
                        help="epochs of the 60 demo rows per throughput round (default 1: 5 steps)")
    parser.add_argument("--every", type=int, default=3, help="checkpoint every N steps, N >= 2 (default 3)")
    parser.add_argument("--checkpoints", type=int, default=3,
                        help="checkpoint periods in each timed loop window (default 3)")
    parser.add_argument("--tmp", default=None, help="folder for the temporary data (default: $TMPDIR or /tmp)")
    parser.add_argument("--json", metavar="PATH", default=None, help="also write every figure as JSON to PATH")
    args = parser.parse_args()
    if args.every < 2:
        parser.error("--every must be at least 2 (the timed window starts at the report of step every-1)")
    sys.path.insert(0, str(ROOT / "src"))
    result = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
