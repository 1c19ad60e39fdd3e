"""Ray Train driver: runs `TrainerCore` on N workers with FSDP2, resumable checkpoints in storage.

Checkpoints are committed by fjordtune's own store to `<storage.uri>/<name>/checkpoints/step-N/`
(`fjordtune.train.checkpointing`: every rank uploads its DCP shard into one commit, rank 0 flips the
pointer); Ray Train reports metrics only, and keeps its own run state on the node's local disk. No
credential ever enters a Ray object: workers read theirs from their environment. The final adapter is
gathered and committed in peft format to `<storage.uri>/<name>/adapter/`.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fjordtune.config.load import dump_job, validate_raw
from fjordtune.config.schema import JobSpec
from fjordtune.errors import InfraError, find_fjordtune_error

log = logging.getLogger(__name__)

PROCESS_GROUP_TIMEOUT_S = 3 * 3600


@dataclass(frozen=True)
class TrainOutcome:
    adapter_uri: str
    final_loss: float | None
    num_steps: int
    metrics: dict[str, Any]


class LastCommitted:
    """A small actor the driver owns: the step of the newest checkpoint the workers committed or resumed
    from. When the run fails, the driver's error line names it even if Ray Train restarted the worker group
    and the new workers failed before they could say (storage not answering)."""

    def __init__(self) -> None:
        self.step: int | None = None

    def set(self, step: int) -> None:
        self.step = step if self.step is None else max(self.step, step)

    def get(self) -> int | None:
        return self.step


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Entry point on each Ray Train worker. Receives plain data and rebuilds the typed job."""
    import ray.train
    import ray.train.torch
    import torch

    from fjordtune.data.sft import epoch_batches, steps_per_epoch
    from fjordtune.model.load import local_model_dir, local_tokenizer_dir
    from fjordtune.storage import Store, cache_root
    from fjordtune.telemetry.gpu import MetricsExporter, open_sampler
    from fjordtune.train.checkpointing import find_resume_point, load_checkpoint, retrying, save_checkpoint
    from fjordtune.train.core import TrainerCore

    # Ray Train routes a worker's print through the root logger *and* the wrapped stdout (every line
    # twice): workers log instead
    logging.getLogger("fjordtune").setLevel(logging.INFO)
    job = validate_raw(config["job"], source="<ray worker>")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    store = Store.for_job(job)
    device = ray.train.torch.get_device() if job.resources.use_gpu else torch.device("cpu")

    # Config and tokenizer first: the model is built on the meta device and sharded before a single
    # weight is read, and a resumed run reads its checkpoint before it touches the base weights.
    cache = cache_root(job.storage.cache_dir)
    with tempfile.TemporaryDirectory(prefix="fjordtune-config-") as tmp:
        meta_dir = local_tokenizer_dir(config["model_uri"], store=store, dest=tmp)
        core = TrainerCore(job, model_dir=meta_dir, device=device, load_base=False)
    if rank == 0:
        log.info("%s", core.coverage.table())
    examples = core.examples(config["rows"])
    per_epoch = steps_per_epoch(len(examples), batch_size=job.train.micro_batch_size, world_size=world)
    total = per_epoch * job.train.epochs
    if job.train.max_steps:
        total = min(total, job.train.max_steps)

    start_step = 0
    resume = find_resume_point(store, job.run_uri)
    if resume:
        start_step = load_checkpoint(core, store, resume, cache_root=cache)
        core.step = start_step
        if rank == 0:
            log.info("resumed from checkpoint step %d (%s, commit %s)", start_step, resume.uri, resume.pointer.commit)
    last_committed = start_step
    if rank == 0:
        config["progress"].set.remote(start_step)
    if start_step < total:
        # one download per node (a file lock in the node cache), then each rank reads only its slices
        core.load_base_weights(local_model_dir(config["model_uri"], store=store, cache_root=cache))
    elif rank == 0:
        log.info("the checkpoint is at step %d of %d: nothing left to train, base weights not read", start_step, total)

    telemetry = None
    if job.telemetry.ray_metrics:
        sampler = open_sampler() if job.telemetry.nvml and job.resources.use_gpu else None
        telemetry = MetricsExporter(rank=rank, run=job.name, sampler=sampler, interval_s=job.telemetry.interval_s)

    every = job.train.checkpoint_every_steps or per_epoch
    step, t0, tokens = start_step, time.perf_counter(), 0
    for epoch in range(start_step // per_epoch, job.train.epochs):
        batches = epoch_batches(
            examples, batch_size=job.train.micro_batch_size, rank=rank, world_size=world,
            epoch=epoch, seed=job.data.shuffle_seed, pad_id=core.tokenizer.pad_token_id,
        )
        for i, batch in enumerate(batches):
            if epoch * per_epoch + i < start_step:
                continue  # already done before the resume
            if step >= total:
                break
            res = core.train_step(batch)
            step, tokens = step + 1, tokens + res.num_tokens
            tps = tokens / max(time.perf_counter() - t0, 1e-9)
            if telemetry:
                telemetry.set("train_loss", res.loss)
                telemetry.set("train_step", step)
                telemetry.set("train_tokens_per_s", tps)
            metrics = {"step": step, "epoch": epoch, "loss": res.loss, "grad_norm": res.grad_norm, "lr": res.lr,
                       "tokens_per_s": tps}
            if rank == 0:
                log.info("step %d/%d epoch %d loss %.4f grad_norm %.3f lr %.2e tok/s %.0f",
                         step, total, epoch, res.loss, res.grad_norm, res.lr, tps)
            if step % every == 0 or step == total:
                save_checkpoint(core, store, job.run_uri, step=step, epoch=epoch, metrics=metrics,
                                keep=job.train.num_checkpoints_to_keep, last_committed=last_committed)
                last_committed = step
                if rank == 0:
                    config["progress"].set.remote(step)
            ray.train.report(metrics)

    summary = telemetry.close() if telemetry else {}
    with tempfile.TemporaryDirectory(prefix="fjordtune-adapter-") as tmp:
        if core.save_adapter(tmp):
            retrying(lambda: store.upload_dir(tmp, config["adapter_uri"]), what=f"adapter upload to {config['adapter_uri']}",
                     attempts=store.retries)
            log.info("adapter written to %s", config["adapter_uri"])
    if rank == 0 and summary:
        log.info("telemetry: %s", summary)


def run_training(job: JobSpec, *, model_uri: str) -> TrainOutcome:
    """Train `job` on the connected Ray cluster; resumes from the latest checkpoint of a previous run."""
    import ray.train
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from fjordtune.data.sft import read_rows
    from fjordtune.storage import Store, cache_root
    from fjordtune.storage import checkpoints as ckpts

    store = Store.for_job(job)
    # Read (and check) the data here, before any worker starts: bad rows fail fast and cost no GPU,
    # and workers need no access to the submitter's files.
    rows = read_rows(job.data.train_files, store=store)
    adapter_uri = f"{job.run_uri}/adapter"
    res = job.resources
    progress = ray.remote(num_cpus=0)(LastCommitted).remote()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": dump_job(job), "model_uri": model_uri, "adapter_uri": adapter_uri, "rows": rows,
                           "progress": progress},
        # ranks that wait for their node's one model download (238 GB) meet the others at the first
        # collective only after it: a longer timeout than the 30-minute default
        torch_config=TorchConfig(backend="nccl" if res.use_gpu else "gloo", timeout_s=PROCESS_GROUP_TIMEOUT_S),
        scaling_config=ScalingConfig(
            num_workers=res.num_workers, use_gpu=res.use_gpu, resources_per_worker={"CPU": res.cpus_per_worker}
        ),
        run_config=RunConfig(
            # Ray's own run state only (no checkpoints: those are fjordtune's, in job.run_uri), on local disk
            name=job.name,
            storage_path=str(Path(cache_root(job.storage.cache_dir)) / "ray-train"),
            failure_config=FailureConfig(max_failures=1),
        ),
    )
    try:
        result = trainer.fit()
    except ray.train.WorkerGroupError as e:
        found = [f for f in map(find_fjordtune_error, e.worker_failures.values()) if f is not None]
        if found and not isinstance(found[0], InfraError):  # a user error on a worker stays a user error
            raise type(found[0])(*found[0].lines) from None
        first, *rest = found[0].lines if found else (f"training failed on a worker: {e}",)
        raise InfraError(_with_resume_point(first, progress, job.run_uri), *rest) from None
    except ray.train.ControllerError as e:
        raise InfraError(f"training failed: {e}") from None
    del result  # its metrics are those of the last report; the committed checkpoint is the record
    last = ckpts.latest(store, ckpts.checkpoints_uri(job.run_uri))
    if last is None:
        raise InfraError(f"training finished but no checkpoint is committed under {ckpts.checkpoints_uri(job.run_uri)}")
    meta = dict(last.pointer.meta)
    return TrainOutcome(adapter_uri, meta.get("loss"), int(meta.get("step", last.step)), meta)


def _with_resume_point(line: str, progress: Any, run_uri: str) -> str:
    """`line` and where a rerun resumes, from what the workers told `progress` (not from storage, which may be
    what failed); unchanged if the line says it already (a failed checkpoint save does) or nobody knows."""
    import ray

    from fjordtune.train.checkpointing import resume_note

    try:
        step = ray.get(progress.get.remote(), timeout=30)
    except Exception:  # the actor is gone with its node: say nothing rather than guess
        return line
    note = resume_note(run_uri, step) if step is not None else None
    return line if note is None or note in line else f"{line}; {note}"
