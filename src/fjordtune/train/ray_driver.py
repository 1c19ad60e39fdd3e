"""Ray Train driver: runs `TrainerCore` on N workers with FSDP2, resumable checkpoints in storage.

Checkpoints are committed by fjordtune's own store to `<storage.uri>/<name>/checkpoints/step-N/`
(`fjordtune.train.checkpointing`: every rank uploads its DCP shard into one commit, rank 0 flips the
pointer); Ray Train reports metrics only, and keeps its own run state on the node's local disk. No
credential ever enters a Ray object: workers read theirs from their environment. The final adapter is
gathered and committed in peft format to `<storage.uri>/<name>/adapter/`.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
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
    telemetry: dict[str, Any] | None = None
    data: dict[str, Any] | None = None  # the mixture's manifest and the contamination check's result


class LastCommitted:
    """A small actor the driver owns: the step of the newest checkpoint the workers committed or resumed
    from. When the run fails, the driver's error line names it even if Ray Train restarted the worker group
    and the new workers failed before they could say (storage not answering). Rank 0 also leaves the
    workers' telemetry summary here at the end."""

    def __init__(self) -> None:
        self.step: int | None = None
        self.telemetry: dict[str, Any] | None = None

    def set(self, step: int) -> None:
        self.step = step if self.step is None else max(self.step, step)

    def get(self) -> int | None:
        return self.step

    def set_telemetry(self, block: dict[str, Any]) -> None:
        self.telemetry = block

    def get_telemetry(self) -> dict[str, Any] | None:
        return self.telemetry


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Entry point on each Ray Train worker. Receives plain data and rebuilds the typed job."""
    import ray.train
    import ray.train.torch
    import torch

    from fjordtune.data.prepare import read_shard
    from fjordtune.data.sft import LengthReport
    from fjordtune.model.load import local_model_dir, local_tokenizer_dir
    from fjordtune.storage import Store, cache_root
    from fjordtune.telemetry.flops import model_flops_per_token, peak_flops
    from fjordtune.telemetry.gpu import open_sampler
    from fjordtune.telemetry.monitor import Monitor
    from fjordtune.telemetry.summary import combine, log_lines
    from fjordtune.train.checkpointing import find_resume_point, gather_objects, load_checkpoint, retrying
    from fjordtune.train.core import TrainerCore, peak_memory_bytes
    from fjordtune.train.loop import Hooks, prepare_shard, train_loop

    # Ray Train routes a worker's print through the root logger *and* the wrapped stdout (every line
    # twice): workers log instead
    logging.getLogger("fjordtune").setLevel(logging.INFO)
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # not a line per report: our step lines say more
    job = validate_raw(config["job"], source="<ray worker>")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    store = Store.for_job(job)
    device = ray.train.torch.get_device() if job.resources.use_gpu else torch.device("cpu")
    if rank == 0:
        log.info("worker group: %d ranks, rank 0 pid %d", world, os.getpid())
    tel = job.telemetry
    # from the start: setup (the model download and load) is where GPUs idle longest
    monitor = Monitor(role="train", rank=rank, run=job.name, job=config.get("ray_job", ""),
                      sampler=open_sampler() if tel.nvml else None, interval_s=tel.interval_s,
                      predicted_peak_bytes=config.get("predicted_peak_bytes"), export=tel.ray_metrics,
                      idle_warning_s=tel.idle_warning_s).start()

    # Config and tokenizer first: the model is built on the meta device and sharded before a single
    # weight is read, and a resumed run reads its checkpoint before it touches the base weights.
    cache = cache_root(job.storage.cache_dir)
    with tempfile.TemporaryDirectory(prefix="fjordtune-config-") as tmp:
        meta_dir = local_tokenizer_dir(config["model_uri"], store=store, dest=tmp)
        core = TrainerCore(job, model_dir=meta_dir, device=device, load_base=False)
    if rank == 0:
        log.info("%s", core.coverage.table())
    if device.type == "cuda":  # what preflight predicts; on CPU the monitor's own RssAnon peak
        monitor.process_peak = lambda: peak_memory_bytes(device)
    monitor.flops_per_token = model_flops_per_token(core.model)
    monitor.peak_flops = peak_flops(monitor.device_name, tel.peak_tflops)
    # this rank's own shard of the rows Ray Data tokenized and fitted (no row travels in the config)
    items = read_shard("train")
    held = read_shard("eval") if config["has_eval"] else []
    data = prepare_shard(core, items, held, lengths=LengthReport(**config["lengths"]), world=world)
    if rank == 0:
        for note in data.notes:
            log.info("%s", note)

    resume = None
    found = find_resume_point(store, job.run_uri)
    if found:
        resume = load_checkpoint(core, store, found, cache_root=cache)
        if rank == 0:
            log.info("resumed from checkpoint step %d (%s, commit %s)", resume["step"], found.uri, found.pointer.commit)
    start = resume["step"] if resume else 0
    if rank == 0:
        config["progress"].set.remote(start)
    if start < data.total_steps:
        # one download per node (a file lock in the node cache), then each rank reads only its slices
        core.load_base_weights(local_model_dir(config["model_uri"], store=store, cache_root=cache))
        hooks = Hooks(report=ray.train.report, committed=lambda step: config["progress"].set.remote(step),
                      telemetry=monitor)
        train_loop(core, data, store=store, run_uri=job.run_uri, rank=rank, world=world, resume=resume, hooks=hooks,
                   predicted_peak_bytes=config.get("predicted_peak_bytes"),
                   staging_dir=str(Path(cache) / "checkpoint-staging"))
    elif rank == 0:
        log.info("the checkpoint is at step %d of %d: nothing left to train, base weights not read",
                 start, data.total_steps)
    block = combine(gather_objects(monitor.close()), role="train")  # a collective: every rank's summary
    if rank == 0:
        for line in log_lines(block):
            log.info("%s", line)
        config["progress"].set_telemetry.remote(block)

    with tempfile.TemporaryDirectory(prefix="fjordtune-adapter-") as tmp:
        if core.save_adapter(tmp):
            if config.get("data_record"):  # what the adapter learnt from travels with it (peft ignores the file)
                Path(tmp, "training_data.json").write_text(json.dumps(config["data_record"], indent=2) + "\n")
            retrying(lambda: store.upload_dir(tmp, config["adapter_uri"]), what=f"adapter upload to {config['adapter_uri']}",
                     attempts=store.retries)
            log.info("adapter written to %s", config["adapter_uri"])


def run_training(job: JobSpec, *, model_uri: str, predicted_peak_bytes: int | None = None,
                 data: Any = None) -> TrainOutcome:
    """Train `job` on the connected Ray cluster; resumes from the latest checkpoint of a previous run.
    `predicted_peak_bytes`: preflight's per-worker estimate, logged next to the measured peaks. `data`: the
    job's planned and checked data (`data.prepare.plan_job_data`), planned here when not given."""
    import dataclasses

    import ray.train
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from fjordtune.data.prepare import plan_job_data, prepare_datasets, shard_config
    from fjordtune.storage import Store, cache_root
    from fjordtune.storage import checkpoints as ckpts
    from fjordtune.telemetry.monitor import job_id

    store = Store.for_job(job)
    # Planned and checked here, before any worker starts: bad rows and contamination fail fast and cost no
    # GPU. The driver holds a few bytes per row; Ray Data reads, tokenizes and fits the rows on the cluster.
    if data is None:
        data = plan_job_data(job, store=store, say=lambda line: log.info("%s", line))
    prepared = prepare_datasets(job, data, model_uri=model_uri, say=lambda line: log.info("%s", line))
    adapter_uri = f"{job.run_uri}/adapter"
    res = job.resources
    progress = ray.remote(num_cpus=0)(LastCommitted).remote()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": dump_job(job), "model_uri": model_uri, "adapter_uri": adapter_uri,
                           "lengths": dataclasses.asdict(prepared.lengths), "has_eval": prepared.num_eval > 0,
                           "progress": progress, "predicted_peak_bytes": predicted_peak_bytes, "ray_job": job_id(),
                           "data_record": data.summary()},
        # each worker reads its own contiguous range of the sorted rows: the same on every run (resume)
        datasets=prepared.datasets,
        dataset_config=shard_config(prepared.datasets, res.num_workers),
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
            # a dead worker (OOM kill, lost node, SIGKILL) restarts the group, which resumes from the newest
            # checkpoint committed in storage (never from what Ray last saw reported)
            failure_config=FailureConfig(max_failures=job.train.max_failures),
        ),
    )
    try:
        result = trainer.fit()
    except ray.train.WorkerGroupError as e:
        found = [f for f in map(find_fjordtune_error, e.worker_failures.values()) if f is not None]
        if found and not isinstance(found[0], InfraError):  # a user error on a worker stays a user error
            raise type(found[0])(*found[0].lines) from None
        first, *rest = found[0].lines if found else (_failure_line(e, job.train.max_failures),)
        raise InfraError(_with_resume_point(first, progress, job.run_uri), *rest) from None
    except ray.train.ControllerError as e:
        raise InfraError(f"training failed: {e}") from None
    del result  # its metrics are those of the last report; the committed checkpoint is the record
    last = ckpts.latest(store, ckpts.checkpoints_uri(job.run_uri))
    if last is None:
        raise InfraError(f"training finished but no checkpoint is committed under {ckpts.checkpoints_uri(job.run_uri)}")
    meta = dict(last.pointer.meta)
    try:
        telemetry = ray.get(progress.get_telemetry.remote(), timeout=30)
    except Exception:  # noqa: BLE001 (the summary is a report, never a reason to fail a finished run)
        telemetry = None
    return TrainOutcome(adapter_uri, meta.get("loss"), int(meta.get("step", last.step)), meta, telemetry,
                        data.summary())


def _failure_line(e: Any, max_failures: int) -> str:
    """One line for a worker group that kept failing (a Ray dump is 20 lines): what each rank died of."""
    parts = []
    for rank, err in sorted(getattr(e, "worker_failures", {}).items()):
        text = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), "")
        parts.append(f"rank {rank}: {type(err).__name__}" + (f": {text[:160]}" if text else ""))
    what = "; ".join(parts[:2]) + (f"; and {len(parts) - 2} more" if len(parts) > 2 else "") if parts else \
        next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
    return (f"training failed on a worker and was restarted {max_failures} time(s) (train.max_failures) "
            f"before giving up: {what}")


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
