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
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from fjordtune.errors import InfraError
from fjordtune.storage import Store
from fjordtune.storage import checkpoints as ckpts
from fjordtune.storage.store import FileEntry, new_commit_id

log = logging.getLogger(__name__)

PROGRESS_FILE = "progress.json"
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


def _gather(value: Any) -> list[Any]:
    dist = _dist()
    if dist is None:
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def save_checkpoint(core: Any, store: Store, run_uri: str, *, step: int, epoch: int, metrics: dict[str, Any],
                    keep: int, last_committed: int | None = None, sleep: Callable[[float], None] = time.sleep) -> str:
    """Save and commit the checkpoint of `step` (a collective: every rank calls it). Returns its URI.

    `last_committed`: the step of the last checkpoint this run committed or resumed from (0: none), what
    the error names as the resume point if this save fails; None: look it up in storage then."""
    rank = _dist().get_rank() if _dist() else 0
    uri = ckpts.step_uri(run_uri, step)
    meta = {"step": step, "epoch": epoch, **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}}
    abandoned: list[str] = []
    with tempfile.TemporaryDirectory(prefix="fjordtune-ckpt-") as tmp:
        core.save_resumable(tmp)
        if rank == 0:
            Path(tmp, PROGRESS_FILE).write_text(json.dumps({"step": step, "epoch": epoch}))
        error: str | None = None
        for attempt in range(1, store.retries + 1):
            commit = _broadcast(new_commit_id() if rank == 0 else None)
            entries: dict[str, FileEntry] = {}
            try:
                entries, error = store.upload_files(tmp, uri, commit), None
            except InfraError as e:
                error = f"rank {rank}: {e.lines[0]}"
            parts = _gather((entries, error))
            error = next((err for _, err in parts if err), None)
            if error is None and rank == 0:
                merged: dict[str, FileEntry] = {}
                for part, _ in parts:
                    merged.update(part)
                try:
                    store.finish_commit(uri, commit, merged, meta=meta)
                except InfraError as e:
                    error = f"rank 0: {e.lines[0]}"
            error = _broadcast(error)
            if error is None:
                break
            abandoned.append(commit)
            if attempt < store.retries:
                wait = backoff_s(attempt)
                if rank == 0:
                    log.warning("checkpoint step %d: commit attempt %d of %d failed (%s); retrying in %.0f s",
                                step, attempt, store.retries, error, wait)
                sleep(wait)
    if error is not None:
        if last_committed is None:  # not known here: ask storage (which may be what just failed)
            last_committed = _broadcast(_last_committed(store, run_uri) if rank == 0 else None)
        raise InfraError(f"checkpoint at step {step} could not be saved to {uri} after {store.retries} attempts: "
                         f"{error}; {resume_note(run_uri, last_committed)}")
    if rank == 0:
        _retention(store, run_uri, uri, abandoned, keep=keep)
    return uri


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


def load_checkpoint(core: Any, store: Store, info: ckpts.CheckpointInfo, *, cache_root: str) -> int:
    """Load a committed checkpoint into `core` (via the node cache: one verified download per node and
    commit, shared by the node's ranks); return its step."""
    directory = store.local_view(info.uri, cache_root)
    core.load_resumable(directory)
    return int(json.loads((Path(directory) / PROGRESS_FILE).read_text())["step"])
