"""A run's resumable checkpoints in storage: list, find the latest, prune, download.

    <storage.uri>/<name>/checkpoints/step-00000012/    one versioned folder per checkpoint (see store.py):
        _COMMITTED                                      the pointer; its meta holds step, epoch and loss
        commits/<id>/                                   DCP shards of every rank, progress.json, manifest

A checkpoint counts only once its pointer exists. What a writer killed mid-upload leaves behind (a
step folder with no pointer, or commits beside the live one) is listed as uncommitted, never used for
resume, and deleted by `prune` once older than its grace period.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fjordtune.errors import UserError
from fjordtune.storage.store import LEFTOVER_GRACE_S, CommitInfo, Location, Pointer, Store

CHECKPOINTS = "checkpoints"
STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoints_uri(run_uri: str) -> str:
    return f"{run_uri.rstrip('/')}/{CHECKPOINTS}"


def step_uri(run_uri: str, step: int) -> str:
    return f"{checkpoints_uri(run_uri)}/step-{step:08d}"


def resolve(uri: str) -> str:
    """The checkpoints folder for a run URI (`s3://bucket/runs/demo`) or the folder itself."""
    uri = uri.rstrip("/")
    return uri if uri.rsplit("/", 1)[-1] == CHECKPOINTS else checkpoints_uri(uri)


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    uri: str
    pointer: Pointer | None  # None: never committed
    commits: list[CommitInfo] = field(default_factory=list)

    @property
    def committed(self) -> bool:
        return self.pointer is not None

    @property
    def leftovers(self) -> list[CommitInfo]:
        """Commits of this step that are not live: failed or interrupted uploads, or superseded ones."""
        return [c for c in self.commits if c.status != "live"]

    @property
    def size(self) -> int:
        return self.pointer.bytes if self.pointer else 0

    @property
    def modified(self) -> float:
        if self.pointer:
            return self.pointer.time
        return max((c.modified for c in self.commits), default=0.0)

    def as_dict(self) -> dict[str, Any]:
        return {"step": self.step, "uri": self.uri, "committed": self.committed,
                "commit": self.pointer.commit if self.pointer else None, "bytes": self.size, "time": self.modified,
                "meta": self.pointer.meta if self.pointer else {},
                "leftovers": [{"commit": c.commit, "bytes": c.bytes, "modified": c.modified} for c in self.leftovers]}


def list_checkpoints(store: Store, uri: str, *, with_commits: bool = True) -> list[CheckpointInfo]:
    """Every step folder under the checkpoints folder `uri`, by step, committed or not."""
    out = []
    for name in store.subfolders(uri):
        m = STEP_DIR.match(name)
        if not m:
            continue
        child = f"{uri}/{name}"
        ptr = store.pointer(child)
        commits = store.commits(child) if with_commits or ptr is None else []
        if ptr is None and not commits:
            continue  # an empty "folder": some servers (SeaweedFS) list one after its objects are deleted
        out.append(CheckpointInfo(int(m.group(1)), child, ptr, commits))
    return sorted(out, key=lambda c: c.step)


def latest(store: Store, uri: str) -> CheckpointInfo | None:
    """The committed checkpoint with the highest step, or None."""
    committed = [c for c in list_checkpoints(store, uri, with_commits=False) if c.committed]
    return committed[-1] if committed else None


@dataclass
class PruneResult:
    deleted: list[CheckpointInfo] = field(default_factory=list)  # whole committed checkpoints
    kept: list[CheckpointInfo] = field(default_factory=list)
    cleaned: list[str] = field(default_factory=list)  # uncommitted leftovers deleted (uri or uri@commit)
    spared: list[str] = field(default_factory=list)  # leftovers younger than the grace period


def prune(store: Store, uri: str, *, keep: int, grace_s: float = LEFTOVER_GRACE_S, dry_run: bool = False) -> PruneResult:
    """Keep exactly the last `keep` committed checkpoints; delete older ones, and uncommitted leftovers
    older than `grace_s` (younger ones may still be uploading: they are spared and reported)."""
    if keep < 1:
        raise UserError(f"prune --keep {keep}: keep at least 1 checkpoint")
    result = PruneResult()
    infos = list_checkpoints(store, uri)
    committed = [c for c in infos if c.committed]
    result.kept = committed[-keep:]
    kept_uris = {c.uri for c in result.kept}
    now = time.time()
    for info in infos:
        if info.committed and info.uri not in kept_uris:
            result.deleted.append(info)
            if not dry_run:
                store.delete_folder(info.uri)
        elif not info.committed:
            if now - info.modified >= grace_s:
                result.cleaned.append(info.uri)
                if not dry_run:
                    store.delete_folder(info.uri)
            else:
                result.spared.append(info.uri)
        else:
            for c in info.leftovers:
                if c.status == "previous":
                    continue  # a reader may still hold it; it goes when the folder does
                target = f"{info.uri}@{c.commit}"
                if now - c.modified < grace_s:
                    result.spared.append(target)
                    continue
                result.cleaned.append(target)
                if not dry_run:  # from the listing above: no second listing of the folder
                    store.delete_commit(info.uri, c.commit)
    return result


def download(store: Store, uri: str, dest: str | Path) -> Path:
    """Copy a committed checkpoint (verified against its manifest) to `dest`."""
    return store.download_dir(uri, dest)


def find(store: Store, uri: str, step: int | None) -> CheckpointInfo:
    """The committed checkpoint at `step` (the latest if None) under the checkpoints folder `uri`."""
    infos = [c for c in list_checkpoints(store, uri, with_commits=False) if c.committed]
    if not infos:
        raise UserError(f"{uri}: no committed checkpoint")
    if step is None:
        return infos[-1]
    for c in infos:
        if c.step == step:
            return c
    raise UserError(f"{uri}: no committed checkpoint at step {step} (committed: {', '.join(str(c.step) for c in infos)})")


def is_checkpoint_uri(uri: str) -> bool:
    return bool(STEP_DIR.match(Location.parse(uri).key.rsplit("/", 1)[-1]))


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def format_table(infos: list[CheckpointInfo], *, now: float | None = None) -> str:
    """`fjordtune checkpoints ls`: one row per step folder, uncommitted leftovers flagged."""
    from fjordtune.storage.store import human_size

    now = time.time() if now is None else now
    rows = [("STEP", "STATE", "SAVED (UTC)", "SIZE", "COMMIT", "LOSS", "URI")]
    notes = []
    for c in infos:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(c.modified)) if c.modified else "-"
        if c.committed:
            loss = c.pointer.meta.get("loss")
            rows.append((str(c.step), "committed", when, human_size(c.size), c.pointer.commit,
                         f"{loss:.4f}" if isinstance(loss, (int, float)) else "-", c.uri))
        else:
            size = sum(x.bytes for x in c.commits)
            rows.append((str(c.step), "UNCOMMITTED", when, human_size(size), "-", "-", c.uri))
        for x in c.leftovers:
            kind = "previous version" if x.status == "previous" else "uncommitted leftover"
            notes.append(f"  step {c.step}: {kind} commit {x.commit} ({x.files} files, {human_size(x.bytes)}, "
                         f"{_age(now - x.modified)} old)")
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(v.rjust(w) if i == 0 else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths))).rstrip()
             for r in rows]
    if len(rows) == 1:
        lines.append("(no checkpoints)")
    if notes:
        lines += ["", "not used for resume (cleaned by `fjordtune checkpoints prune` after the grace period):", *notes]
    return "\n".join(lines)
