"""The training loop of one rank: data layout, schedule, steps, held-out loss, metrics and checkpoints.

Runs under Ray Train (`ray_driver.train_loop_per_worker`) and without Ray (torchrun, a benchmark, a GPU
box): everything Ray-specific comes in through `Hooks`. Every rank runs the same loop; the collectives
(steps, held-out loss, checkpoint commits) line up because every rank sees the same number of batches.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fjordtune.data.sft import (
    Example,
    LengthReport,
    eval_batches,
    fit_length,
    pack,
    step_batches,
    steps_per_epoch,
    token_efficiency,
)
from fjordtune.errors import UserError
from fjordtune.train.schedule import Schedule

log = logging.getLogger(__name__)

GiB = 2**30


REPORT_EVERY_S = 2.0
"""Metrics go to Ray Train at most this often (and at the last step):
`ray.train.report` blocks until Ray Train's controller collects the previous report, which it does every
2 s (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S), so a report per step capped the demo at one step per 2 s. Every
step is still logged, and exported to Ray metrics (telemetry)."""


@dataclass
class Hooks:
    """What the loop tells the outside world. Defaults do nothing (a test, a benchmark)."""

    report: Callable[[dict[str, Any]], None] = lambda metrics: None
    """A step's metrics, on every rank at the same steps (as `ray.train.report` wants): every REPORT_EVERY_S
    and at the last step. They carry the latest held-out loss (`eval_loss`, measured at `eval_step`)."""
    committed: Callable[[int], None] = lambda step: None
    """A checkpoint of `step` is committed, or the run resumed from it (rank 0)."""
    telemetry: Any = None
    """A `fjordtune.telemetry.monitor.Monitor` (or anything with `phase(name)` and `step(...)`): told the
    phase (train, eval, checkpoint) and every step's figures."""
    report_every_s: float = REPORT_EVERY_S
    """0: report every step."""


@dataclass
class TrainData:
    """This run's data as one rank lays it out. Global (`local=False`, from `prepare_data`): every rank holds
    every example and takes its slice of each step. Local (from `prepare_shard`): each rank holds only its
    own shard (Ray Data's, under Ray Train) and shuffles it by itself; `per_epoch` is the same on every rank."""

    items: list[Example]  # examples or packs
    eval: list[Example]
    lengths: LengthReport
    per_epoch: int
    total_steps: int
    efficiency: tuple[float, float] | None = None  # (packed, padded) real/total tokens, packing only
    notes: list[str] = field(default_factory=list)
    local: bool = False
    eval_batches: int = 0  # local: held-out batches per rank (the same on every rank)


def prepare_data(core: Any, rows: list[dict[str, Any]], eval_rows: list[dict[str, Any]], *, world: int) -> TrainData:
    """Tokenize, count and cut over-long rows, pack (if asked), and work out the step count."""
    job = core.job
    d, t = job.data, job.train
    whole = core.examples(rows, max_seq_len=None)
    examples, lengths = fit_length(whole, max_seq_len=d.max_seq_len, truncation=d.truncation)
    notes = list(lengths.lines())
    items, efficiency = examples, None
    if d.packing:
        items = pack(examples, max_seq_len=d.max_seq_len)
        kw = dict(batch_size=t.micro_batch_size, world_size=world, seed=d.shuffle_seed, accum=t.grad_accum_steps)
        packed, padded = token_efficiency(items, **kw), token_efficiency(examples, **kw)
        efficiency = (_ratio(packed), _ratio(padded))
        per_step = t.micro_batch_size * world * t.grad_accum_steps
        fill = sum(len(p.input_ids) for p in items) / (len(items) * d.max_seq_len)
        notes.append(f"packing: {len(examples)} rows -> {len(items)} sequences of up to {d.max_seq_len} tokens, "
                     f"{fill:.0%} full; {packed[0] / max(1, len(items) // per_step):.0f} real tokens per step "
                     f"(unpacked: {padded[0] / max(1, len(examples) // per_step):.0f}); real tokens "
                     f"{efficiency[0]:.0%} of those computed (unpacked: {efficiency[1]:.0%})")
    per_epoch = steps_per_epoch(len(items), batch_size=t.micro_batch_size, world_size=world, accum=t.grad_accum_steps)
    total = t.max_steps or per_epoch * t.epochs
    held_out: list[Example] = []
    if eval_rows:
        held_out, _ = fit_length(core.examples(eval_rows, max_seq_len=None), max_seq_len=d.max_seq_len,
                                 truncation="truncate")
    effective = world * t.micro_batch_size * t.grad_accum_steps
    notes.append(f"batch: {world} workers x micro_batch_size {t.micro_batch_size} x grad_accum_steps "
                 f"{t.grad_accum_steps} = {effective} {'packed ' if d.packing else ''}sequences per step; "
                 f"{per_epoch} steps per epoch, {total} steps"
                 + (f" (train.max_steps; {total / per_epoch:.2f} epochs)" if t.max_steps else ""))
    if held_out:
        notes.append(f"held-out: {len(held_out)} rows, loss before the first step (base model), "
                     f"every {t.eval_every_steps or per_epoch} steps and after the last")
    return TrainData(items, held_out, lengths, per_epoch, total, efficiency, notes)


def prepare_shard(core: Any, items: list[Example], held_out: list[Example], *, lengths: LengthReport, world: int,
                  gather: Callable[[Any], list[Any]] | None = None) -> TrainData:
    """This rank's layout from its own shard of fitted examples (`items`, `held_out`: already tokenized and cut
    by the Ray Data preprocessing, whose `lengths` report covers every rank). Packs locally (if asked); the
    step count is the smallest any rank can fill, so every rank takes the same number of steps. `gather`: the
    all-gather of small objects across ranks (default `checkpointing.gather_objects`), run twice here."""
    from fjordtune.train.checkpointing import gather_objects

    gather = gather or gather_objects
    job = core.job
    d, t = job.data, job.train
    notes = list(lengths.lines())
    packed_items, efficiency = items, None
    kw = dict(batch_size=t.micro_batch_size, world_size=1, seed=d.shuffle_seed, accum=t.grad_accum_steps)
    if d.packing:
        packed_items = pack(items, max_seq_len=d.max_seq_len)
    # what every rank holds: step counts must agree, and the notes speak for the whole run
    local = (len(items), len(packed_items), len(held_out),
             token_efficiency(packed_items, **kw) if len(packed_items) >= t.micro_batch_size * t.grad_accum_steps
             else (0, 0),
             token_efficiency(items, **kw) if d.packing and len(items) >= t.micro_batch_size * t.grad_accum_steps
             else (0, 0),
             sum(len(p.input_ids) for p in packed_items))
    every = gather(local)
    per_epoch = min(n for _, n, *_ in every) // (t.micro_batch_size * t.grad_accum_steps)
    if per_epoch == 0:
        raise UserError(
            f"{min(n for _, n, *_ in every)} training {'sequences' if d.packing else 'rows'} on the smallest "
            f"shard are fewer than one step needs (micro_batch_size {t.micro_batch_size} x train.grad_accum_steps "
            f"{t.grad_accum_steps}); {sum(n for n, *_ in every)} rows in all over {world} workers")
    if d.packing:
        rows, seqs = sum(e[0] for e in every), sum(e[1] for e in every)
        packed = tuple(map(sum, zip(*(e[3] for e in every), strict=True)))
        padded = tuple(map(sum, zip(*(e[4] for e in every), strict=True)))
        efficiency = (_ratio(packed), _ratio(padded))
        fill = sum(e[5] for e in every) / (seqs * d.max_seq_len)
        notes.append(f"packing: {rows} rows -> {seqs} sequences of up to {d.max_seq_len} tokens (packed on each "
                     f"worker's shard), {fill:.0%} full; real tokens {efficiency[0]:.0%} of those computed "
                     f"(unpacked: {efficiency[1]:.0%})")
    total = t.max_steps or per_epoch * t.epochs
    effective = world * t.micro_batch_size * t.grad_accum_steps
    shards = sorted(e[1] for e in every)
    notes.append(f"batch: {world} workers x micro_batch_size {t.micro_batch_size} x grad_accum_steps "
                 f"{t.grad_accum_steps} = {effective} {'packed ' if d.packing else ''}sequences per step; "
                 f"{per_epoch} steps per epoch, {total} steps"
                 + (f" (train.max_steps; {total / per_epoch:.2f} epochs)" if t.max_steps else "")
                 + f"; shards of {shards[0]}-{shards[-1]} per worker")
    most_held = max(e[2] for e in every)
    eval_n = math.ceil(most_held / t.micro_batch_size) if most_held else 0
    if most_held:
        notes.append(f"held-out: {sum(e[2] for e in every)} rows, loss before the first step (base model), "
                     f"every {t.eval_every_steps or per_epoch} steps and after the last")
    return TrainData(packed_items, list(held_out), lengths, per_epoch, total, efficiency, notes, local=True,
                     eval_batches=eval_n)


def shard_seed(seed: int, rank: int) -> int:
    """The shuffle seed of one rank's own shard: a different order on each rank, the same on every run."""
    return seed * 1_000_003 + rank


def _ratio(pair: tuple[int, int]) -> float:
    real, slots = pair
    return real / slots if slots else 0.0


def train_loop(core: Any, data: TrainData, *, store: Any, run_uri: str, rank: int, world: int,
               resume: dict[str, Any] | None = None, hooks: Hooks | None = None,
               predicted_peak_bytes: int | None = None, pad_id: int | None = None,
               staging_dir: str | None = None) -> dict[str, Any]:
    """Train from `resume` (the progress record of the checkpoint already loaded into `core`, or None) to
    the last step; returns the last step's metrics. The base weights must already be loaded. Checkpoint
    shards wait for their upload in `staging_dir` (default: the system's temporary folder)."""
    from fjordtune.train.checkpointing import CheckpointWriter, gather_objects
    from fjordtune.train.core import peak_memory_bytes

    hooks = hooks or Hooks()
    job = core.job
    t = job.train
    pad = core.tokenizer.pad_token_id if pad_id is None else pad_id
    schedule = Schedule.for_job(t, data.total_steps)
    core.schedule = schedule
    start = int(resume["step"]) if resume else 0
    base_eval = resume.get("base_eval_loss") if resume else None
    if resume and resume.get("schedule"):
        saved = Schedule.from_dict(resume["schedule"])
        if saved != schedule and rank == 0:
            log.warning("the job's schedule differs from checkpoint step %d's (%s): continuing on the job's",
                        start, "; ".join(schedule.differences(saved)))
    core.step = start
    if rank == 0:
        log.info("schedule: %s", schedule.describe())

    if data.local:
        held = eval_batches(data.eval, batch_size=t.micro_batch_size, rank=0, world_size=1, pad_id=pad,
                            num_batches=data.eval_batches) if data.eval_batches else []
    else:
        held = eval_batches(data.eval, batch_size=t.micro_batch_size, rank=rank, world_size=world,
                            pad_id=pad) if data.eval else []

    tel = hooks.telemetry

    def phase(name: str) -> None:
        if tel is not None:
            tel.phase(name)

    def held_out_loss() -> float:
        t0 = time.perf_counter()
        phase("eval")
        loss, tokens = core.eval_loss(held)
        phase("train")
        if rank == 0:
            log.info("held-out loss %.4f at step %d (%d tokens, %.1f s)", loss, core.step, tokens,
                     time.perf_counter() - t0)
        return loss

    phase("train")
    if held and base_eval is None and start == 0:
        base_eval = held_out_loss()  # LoRA B starts at zero: this is the base model's loss

    writer = CheckpointWriter(store, run_uri, keep=t.num_checkpoints_to_keep, last_committed=start,
                              on_commit=(lambda step, meta: hooks.committed(step)) if rank == 0 else None,
                              staging_dir=staging_dir)
    every_ckpt = t.checkpoint_every_steps or data.per_epoch
    every_eval = t.eval_every_steps or data.per_epoch
    step, metrics = start, {}
    run_t0, run_tokens = time.perf_counter(), 0
    last_report = -float("inf")
    last_eval: dict[str, Any] = {}
    epoch = start // data.per_epoch
    while step < data.total_steps:
        if data.local:  # this rank's own shard, in an order of its own
            batches = step_batches(data.items, batch_size=t.micro_batch_size, rank=0, world_size=1, epoch=epoch,
                                   seed=shard_seed(job.data.shuffle_seed, rank), pad_id=pad, accum=t.grad_accum_steps)
        else:
            batches = step_batches(data.items, batch_size=t.micro_batch_size, rank=rank, world_size=world,
                                   epoch=epoch, seed=job.data.shuffle_seed, pad_id=pad, accum=t.grad_accum_steps)
        # a bigger shard than the smallest must not take more steps: every rank runs per_epoch of them
        for i, micro in enumerate(itertools.islice(batches, data.per_epoch)):
            if epoch * data.per_epoch + i < start:
                continue  # done before the resume: same data order, same position
            if step >= data.total_steps:
                break
            t0 = time.perf_counter()
            res = core.train_step(micro)
            dt = time.perf_counter() - t0
            step += 1
            run_tokens += res.num_input_tokens
            writer.poll()
            # one small collective per step: every rank's peak memory, and whether any rank's last report
            # to Ray is REPORT_EVERY_S old (so that all ranks report at the same steps)
            gathered = gather_objects((peak_memory_bytes(core.device), time.monotonic() - last_report >= hooks.report_every_s))
            peaks = [int(p) for p, _ in gathered]
            report_due = any(due for _, due in gathered)
            metrics = {
                "step": step, "epoch": epoch, "loss": res.loss, "lr": res.lr, "grad_norm": res.grad_norm,
                "tokens_per_s": res.num_input_tokens / dt, "label_tokens_per_s": res.num_tokens / dt,
                "step_time_s": dt, "peak_memory_bytes": max(peaks), "peak_memory_bytes_per_rank": peaks,
            }
            if predicted_peak_bytes:
                metrics["predicted_peak_bytes"] = predicted_peak_bytes
            if base_eval is not None:
                metrics["base_eval_loss"] = base_eval
            measured = held and (step % every_eval == 0 or step == data.total_steps)
            if measured:
                last_eval = {"eval_loss": held_out_loss(), "eval_step": step}
            metrics.update(last_eval)  # the latest held-out loss rides along until the next one
            if rank == 0:
                log.info("step %d/%d epoch %d loss %.4f lr %.2e grad_norm %.3f tok/s %.0f (label %.0f) step %.2f s "
                         "peak %s%s%s", step, data.total_steps, epoch, res.loss, res.lr, res.grad_norm,
                         metrics["tokens_per_s"], metrics["label_tokens_per_s"], dt, _gib(max(peaks)),
                         f" (preflight {_gib(predicted_peak_bytes)})" if predicted_peak_bytes else "",
                         f" eval_loss {metrics['eval_loss']:.4f}" if measured else "")
            if tel is not None:
                tel.step(step=step, loss=res.loss, lr=res.lr, tokens=res.num_input_tokens, seconds=dt,
                         world=world)
            if step % every_ckpt == 0 or step == data.total_steps:
                phase("checkpoint")  # the local save; its upload runs beside the next steps
                writer.start(core, step=step, epoch=epoch, metrics=metrics,
                             progress={"schedule": schedule.as_dict(), "base_eval_loss": base_eval,
                                       "world_size": world})
                if step == data.total_steps:
                    writer.wait()  # the last checkpoint is the run's record: it must be committed
                phase("train")
            if report_due or step == data.total_steps:
                hooks.report(metrics)
                last_report = time.monotonic()
        epoch += 1
    phase("checkpoint")
    writer.wait()
    if rank == 0 and step > start:
        elapsed = time.perf_counter() - run_t0
        peaks = metrics.get("peak_memory_bytes_per_rank", [])
        log.info("trained steps %d-%d in %.1f s, %.0f tokens/s; peak memory per rank %s%s", start + 1, step, elapsed,
                 run_tokens / elapsed, ", ".join(_gib(p) for p in peaks),
                 f" against preflight's {_gib(predicted_peak_bytes)} per worker "
                 f"(measured/predicted {max(peaks) / predicted_peak_bytes:.2f})" if predicted_peak_bytes and peaks else "")
    return metrics


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / GiB:.2f} GiB"
