"""Resumable checkpoints of a training run in fjordtune's own store (not Ray Train's storage).

Saving is a collective: every rank writes its DCP shard to a local temporary folder and uploads it
into one shared commit of `<run>/checkpoints/step-N`; rank 0 then writes the manifest and flips the
pointer. If any rank's upload fails, every rank sees it (the results are gathered) and the whole commit
is tried again under a new id, up to `storage.retries` times with backoff, each retry logged. If it
still fails, the run stops with exit 3 and says which committed checkpoint a rerun will resume from.
An abandoned commit is never listed as committed, never used for resume, and is deleted once every rank
has finished with it.

Why Ray Train's checkpoint storage is not used: it needs the S3 keys inside a filesystem object that
Ray pickles into the run (secrets must not travel in Ray objects), its errors reach the user as Ray
tracebacks, and a checkpoint it never registered stays in storage looking like a real one.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from fjordtune.errors import InfraError
from fjordtune.storage import Store
from fjordtune.storage import checkpoints as ckpts
from fjordtune.storage.store import FileEntry, new_commit_id

log = logging.getLogger(__name__)

PROGRESS_FILE = "progress.json"
RNG_FILE = "rng-rank{rank:05d}.pt"
STAGING_PREFIX = "fjordtune-ckpt-"
BACKGROUND_CONCURRENCY = 4
"""Parts a background upload moves at once (a synchronous transfer uses `storage.max_concurrency`): ~3.7 GB
per rank at 119B still goes up in seconds, well inside the 200 steps between checkpoints."""
BACKGROUND_NICE = 10
"""Nice value of the upload thread (and the transfer threads it starts, which inherit it): when CPU is
short, the training threads come first."""
BACKOFF_S = 2.0
MAX_BACKOFF_S = 60.0
T = TypeVar("T")


def backoff_s(attempt: int, *, base: float = BACKOFF_S) -> float:
    """Exponential backoff with jitter: about 2, 4, 8 ... s, at most a minute."""
    return min(MAX_BACKOFF_S, base * 2 ** (attempt - 1)) * (0.5 + random.random() / 2)


def retrying(fn: Callable[[], T], *, what: str, attempts: int, sleep: Callable[[float], None] = time.sleep) -> T:
    """Run `fn`, retrying an `InfraError` up to `attempts` times in all, with backoff; log each retry."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except InfraError as e:
            if attempt == attempts:
                raise
            wait = backoff_s(attempt)
            log.warning("%s: attempt %d of %d failed: %s; retrying in %.0f s", what, attempt, attempts, e.lines[0], wait)
            sleep(wait)
    raise AssertionError("unreachable")


def _dist() -> Any:
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _broadcast(value: Any) -> Any:
    dist = _dist()
    if dist is None:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(value: Any) -> list[Any]:
    """Every rank's `value`, in rank order (a collective; `[value]` without a process group)."""
    dist = _dist()
    if dist is None:
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


class CheckpointWriter:
    """Checkpoints that do not stall training: save locally, upload in the background, commit when every
    rank's upload is done. All methods except the upload thread are collectives, called by every rank in
    the same order (`start` at a checkpoint step, `poll` after each step, `wait` at the end).

    `start` writes this rank's DCP shard (adapter and optimizer), its RNG state and (rank 0) the progress
    file (step, epoch, schedule, `progress`) to a local folder, and hands the upload to a thread; training
    goes on. `poll` asks all ranks whether their uploads are done (one tiny all-reduce while one is in
    flight); once all are, rank 0 writes the manifest and flips the pointer: the checkpoint exists only from
    that moment, never half-written. A rank whose upload failed makes every rank retry the whole commit
    under a new id (synchronously), up to `storage.retries` attempts in all; then the run stops with exit
    3 and names the checkpoint a rerun resumes from. At most one checkpoint is in flight: `start` first
    waits for the previous one, so local disk holds at most two.
    """

    def __init__(self, store: Store, run_uri: str, *, keep: int, last_committed: int | None = 0,
                 on_commit: Callable[[int, dict[str, Any]], None] | None = None,
                 sleep: Callable[[float], None] = time.sleep, staging_dir: str | Path | None = None) -> None:
        self.store, self.run_uri, self.keep = store, run_uri, keep
        # where shards wait for their upload: the node's scratch volume (the cache root), not /tmp, which
        # a pod may keep in memory or on a small overlay (a 119B checkpoint is ~3.7 GB per rank)
        self.staging_dir = staging_dir
        if staging_dir is not None:
            _remove_orphans(Path(staging_dir))
        self.last_committed = last_committed
        self.on_commit = on_commit
        self.sleep = sleep
        self.rank = _dist().get_rank() if _dist() else 0
        self.pending: _Pending | None = None
        self.background_store = store.with_max_concurrency(min(store.max_concurrency, BACKGROUND_CONCURRENCY))
        self.retention: threading.Thread | None = None

    def start(self, core: Any, *, step: int, epoch: int, metrics: dict[str, Any],
              progress: dict[str, Any] | None = None) -> None:
        self.wait()
        uri = ckpts.step_uri(self.run_uri, step)
        meta = {"step": step, "epoch": epoch, **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}}
        if self.staging_dir is not None:
            Path(self.staging_dir).mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=self.staging_dir)
        t0 = time.perf_counter()
        try:
            core.save_resumable(tmp)
            if hasattr(core, "rng_state"):
                import torch

                torch.save(core.rng_state(), Path(tmp, RNG_FILE.format(rank=self.rank)))
            if self.rank == 0:
                Path(tmp, PROGRESS_FILE).write_text(json.dumps({"step": step, "epoch": epoch, **(progress or {})}))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        local_bytes = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())
        pending = _Pending(step=step, uri=uri, meta=meta, tmp=tmp, local_bytes=local_bytes,
                           save_s=time.perf_counter() - t0, commit=_broadcast(new_commit_id() if self.rank == 0 else None))
        pending.thread = threading.Thread(target=self._upload, args=(pending, True), name=f"ckpt-upload-{step}",
                                          daemon=True)
        pending.thread.start()
        self.pending = pending

    def _upload(self, p: _Pending, background: bool = False) -> None:
        t0 = time.perf_counter()
        try:
            if background:
                _lower_priority()
            store = self.background_store if background else self.store
            p.entries = store.upload_files(p.tmp, p.uri, p.commit)
        except InfraError as e:
            p.error = f"rank {self.rank}: {e.lines[0]}"
        except Exception as e:  # noqa: BLE001 - reported through the collective, never lost in a thread
            p.error = f"rank {self.rank}: {type(e).__name__}: {e}"
        finally:
            p.upload_s = time.perf_counter() - t0
            p.done.set()

    def poll(self) -> int | None:
        """After a training step: if every rank's upload is done, commit; returns the step committed now."""
        if self.pending is None:
            return None
        self.pending.steps_overlapped += 1
        if _all_ranks(self.pending.done.is_set()):
            return self._finish()
        return None

    def wait(self) -> int | None:
        """Wait for the checkpoint in flight (if any) and commit it; returns its step."""
        if self.pending is None:
            self._join_retention()
            return None
        self.pending.done.wait()
        step = self._finish()
        self._join_retention()
        return step

    def _join_retention(self) -> None:
        if self.retention is not None:
            self.retention.join()
            self.retention = None

    def _finish(self) -> int:
        p, self.pending = self.pending, None
        assert p is not None and p.thread is not None
        p.thread.join()
        abandoned: list[str] = []
        error: str | None = p.error
        try:
            for attempt in range(1, self.store.retries + 1):
                if attempt > 1:  # a failed attempt: every rank uploads again, synchronously, under a new id
                    p.commit = _broadcast(new_commit_id() if self.rank == 0 else None)
                    p.error, p.entries = None, {}
                    self._upload(p)
                parts = gather_objects((p.entries, p.error))
                error = next((err for _, err in parts if err), None)
                if error is None and self.rank == 0:
                    merged: dict[str, FileEntry] = {}
                    for part, _ in parts:
                        merged.update(part)
                    try:
                        self.store.finish_commit(p.uri, p.commit, merged, meta=p.meta)
                    except InfraError as e:
                        error = f"rank 0: {e.lines[0]}"
                    p.committed_bytes = sum(e.size for e in merged.values())
                error = _broadcast(error)
                if error is None:
                    break
                abandoned.append(p.commit)
                if attempt < self.store.retries:
                    wait = backoff_s(attempt)
                    if self.rank == 0:
                        log.warning("checkpoint step %d: commit attempt %d of %d failed (%s); retrying in %.0f s",
                                    p.step, attempt, self.store.retries, error, wait)
                    self.sleep(wait)
        finally:
            shutil.rmtree(p.tmp, ignore_errors=True)
        if error is not None:
            last = self.last_committed
            if last is None:  # not known here: ask storage (which may be what just failed)
                last = _broadcast(_last_committed(self.store, self.run_uri) if self.rank == 0 else None)
            raise InfraError(f"checkpoint at step {p.step} could not be saved to {p.uri} after {self.store.retries} "
                             f"attempts: {error}; {resume_note(self.run_uri, last)}")
        self.last_committed = p.step
        if self.rank == 0:
            log.info("checkpoint step %d committed: %s in %s (saved locally in %.1f s, uploaded in %.1f s%s)",
                     p.step, _mib(p.committed_bytes), p.uri, p.save_s, p.upload_s,
                     f" while {p.steps_overlapped} training step(s) ran" if p.steps_overlapped else "")
            # listing and deleting old checkpoints is rank 0's alone (no collective): off the training thread
            self._join_retention()
            self.retention = threading.Thread(target=_retention, args=(self.store, self.run_uri, p.uri, abandoned),
                                              kwargs={"keep": self.keep}, name=f"ckpt-retention-{p.step}", daemon=True)
            self.retention.start()
        if self.on_commit is not None:
            self.on_commit(p.step, p.meta)
        return p.step


@dataclass
class _Pending:
    step: int
    uri: str
    meta: dict[str, Any]
    tmp: str
    local_bytes: int
    save_s: float
    commit: str
    thread: threading.Thread | None = None
    done: threading.Event = field(default_factory=threading.Event)
    entries: dict[str, FileEntry] = field(default_factory=dict)
    error: str | None = None
    upload_s: float = 0.0
    committed_bytes: int = 0
    steps_overlapped: int = 0


def _lower_priority() -> None:
    """Linux keeps a nice value per thread: lower this one's (threads it starts inherit it)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICE)
    except (AttributeError, OSError):  # not Linux, or not allowed: run at normal priority
        pass


def _remove_orphans(staging: Path) -> None:
    """Delete staged shards whose process is gone (a worker killed mid-upload leaves ~3.7 GB at 119B);
    the folders of live processes, e.g. the node's other ranks, are left alone."""
    if not staging.is_dir():
        return
    for folder in staging.glob(f"{STAGING_PREFIX}*"):
        try:
            pid = int(folder.name[len(STAGING_PREFIX):].split("-", 1)[0])
            os.kill(pid, 0)
        except ValueError:
            continue
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
            log.info("removed %s, left by process %d that is gone", folder, pid)
        except PermissionError:
            continue  # alive, another user's


def _all_ranks(flag: bool) -> bool:
    dist = _dist()
    if dist is None:
        return flag
    import torch

    device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([0 if flag else 1], dtype=torch.int32, device=device)
    dist.all_reduce(t)
    return int(t.item()) == 0


def _mib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def save_checkpoint(core: Any, store: Store, run_uri: str, *, step: int, epoch: int, metrics: dict[str, Any],
                    keep: int, last_committed: int | None = None, progress: dict[str, Any] | None = None,
                    sleep: Callable[[float], None] = time.sleep) -> str:
    """Save and commit the checkpoint of `step` and wait for it (a collective: every rank calls it).
    Returns its URI. `last_committed`: the step of the last checkpoint this run committed or resumed from
    (0: none), what the error names as the resume point if this save fails; None: look it up in storage."""
    writer = CheckpointWriter(store, run_uri, keep=keep, last_committed=last_committed, sleep=sleep)
    writer.start(core, step=step, epoch=epoch, metrics=metrics, progress=progress)
    writer.wait()
    return ckpts.step_uri(run_uri, step)


def resume_note(run_uri: str, last_committed: int | None) -> str:
    """Where a rerun of the same job starts: `last_committed` is a step (0: none committed), None: unknown."""
    if last_committed is None:
        return (f"the committed checkpoints could not be listed: a rerun resumes from the latest committed one "
                f"(`fjordtune checkpoints ls {run_uri}` once storage answers)")
    if last_committed == 0:
        return "no checkpoint of this run is committed yet: a rerun starts from step 0"
    return (f"the last committed checkpoint is step {last_committed} ({ckpts.step_uri(run_uri, last_committed)}): "
            "rerun the same job to resume from it")


def _last_committed(store: Store, run_uri: str) -> int | None:
    try:
        last = ckpts.latest(store, ckpts.checkpoints_uri(run_uri))
    except InfraError:
        return None
    return last.step if last else 0


def _retention(store: Store, run_uri: str, uri: str, abandoned: list[str], *, keep: int) -> None:
    """After a commit: delete this step's abandoned commits (every rank is done with them) and all but the
    last `keep` checkpoints. A failure here costs disk, not the run: it is logged and left to `prune`."""
    try:
        for commit in abandoned:
            store.delete_commit(uri, commit)
            log.info("deleted %s commit %s, abandoned by a failed attempt", uri, commit)
        result = ckpts.prune(store, ckpts.checkpoints_uri(run_uri), keep=keep)
        for info in result.deleted:
            log.info("retention: deleted checkpoint step %d (%s); keeping the last %d", info.step, info.uri, keep)
    except InfraError as e:
        log.warning("checkpoint retention skipped: %s (run `fjordtune checkpoints prune` later)", e.lines[0])


def find_resume_point(store: Store, run_uri: str) -> ckpts.CheckpointInfo | None:
    """The checkpoint every rank resumes from: rank 0 looks, then tells the others (one listing, one answer)."""
    rank = _dist().get_rank() if _dist() else 0
    found = ckpts.latest(store, ckpts.checkpoints_uri(run_uri)) if rank == 0 else None
    return _broadcast(found)


def load_checkpoint(core: Any, store: Store, info: ckpts.CheckpointInfo, *, cache_root: str) -> dict[str, Any]:
    """Load a committed checkpoint into `core` (via the node cache: one verified download per node and
    commit, shared by the node's ranks): adapter, optimizer and this rank's RNG state. Returns its
    progress record: step, epoch, and what the loop saved with it (schedule, base held-out loss)."""
    directory = Path(store.local_view(info.uri, cache_root))
    core.load_resumable(directory)
    progress = json.loads((directory / PROGRESS_FILE).read_text())
    rank = _dist().get_rank() if _dist() else 0
    rng = directory / RNG_FILE.format(rank=rank)
    if rng.exists() and hasattr(core, "set_rng_state"):
        import torch

        core.set_rng_state(torch.load(rng, weights_only=False))
    elif rank == 0:
        log.warning("checkpoint %s has no RNG state for rank %d (saved by another number of workers?): "
                    "LoRA dropout draws differ from an uninterrupted run", info.uri, rank)
    return progress
