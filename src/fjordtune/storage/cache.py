"""The node-local cache of committed s3:// folders: one download per node, shared by every process.

Every training rank and eval actor on a node asks for the same 238 GB model at the same moment. The
first one to take the entry's file lock downloads it; the others wait on the lock, then use that copy.
Layout under the cache root (`cache_root()`: `storage.cache_dir`, $FJORDTUNE_CACHE or ~/.cache/fjordtune):

    <bucket>/<key>/<commit-id>/           a complete copy: appears only by rename, with its marker
    <bucket>/<key>/<commit-id>.partial/   the download in progress, or what a killed one left behind
    <bucket>/<key>/<commit-id>.lock       flock'ed while downloading (the kernel releases it if the holder dies)

Nothing partial is trusted: a `.partial` folder found by the lock holder is deleted, never resumed.
The cache must be on a local filesystem with working `flock` (not a network mount shared by nodes).
Complete copies are never deleted here (another process may be reading one): prune them by hand.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fjordtune.errors import UserError
from fjordtune.storage.store import MARKER, Location, TransferProgress

log = logging.getLogger(__name__)

MIN_FREE_ENV = "FJORDTUNE_CACHE_MIN_FREE"
DEFAULT_MIN_FREE_BYTES = 1 << 30
WAIT_LOG_EVERY_S = 60.0
_SAFE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,128}")


def min_free_bytes(configured: int | None = None) -> int:
    """Disk space that must stay free in the cache after a download: `configured`, else
    $FJORDTUNE_CACHE_MIN_FREE (bytes), else 1 GiB (room for logs, Ray spilling, checkpoints)."""
    if configured is not None:
        return configured
    raw = os.environ.get(MIN_FREE_ENV, "").strip()
    if not raw:
        return DEFAULT_MIN_FREE_BYTES
    try:
        value = int(raw)
    except ValueError:
        raise UserError(f"{MIN_FREE_ENV}={raw!r}: expected a number of bytes, e.g. 10737418240") from None
    if value < 0:
        raise UserError(f"{MIN_FREE_ENV}={raw!r}: must not be negative")
    return value


def cached_folder(store: Any, uri: str, root: str | Path, *, min_free_bytes: int | None = None) -> Path:
    """This node's complete copy of the committed s3:// folder `uri` under `root`, downloading it
    if no process on the node has (keyed by commit id: a folder rewritten under `uri` is fetched anew)."""
    loc = Location.parse(uri)
    commit = store.commit_id(uri)
    name = commit if _SAFE_NAME.fullmatch(commit) and commit not in (".", "..") else _digest(commit)
    entry = Path(root) / loc.bucket / loc.key / name
    if (entry / MARKER).is_file():
        log.info("using %s from the node cache %s", uri, entry)
        return entry
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{uri}: cannot create the cache folder {entry.parent} ({e.strerror}); point "
                        "storage.cache_dir (or FJORDTUNE_CACHE) at a writable node-local volume") from None
    with _exclusive(entry.with_name(name + ".lock"), uri=uri, entry=entry):
        if (entry / MARKER).is_file():
            log.info("using %s, downloaded by another process into %s", uri, entry)
            return entry
        _download(store, uri, commit, entry, min_free=min_free_bytes)
    return entry


def check_free_space(directory: str | Path, needed: int, *, uri: str, min_free: int | None = None) -> None:
    """Raise a UserError unless `needed` bytes fit in `directory` with `min_free` bytes left over."""
    reserve = min_free_bytes(min_free)
    free = shutil.disk_usage(directory).free
    if needed + reserve > free:
        raise UserError(
            f"{uri}: not enough disk to cache it in {directory}: needs {_size(needed)} plus {_size(reserve)} "
            f"kept free ({MIN_FREE_ENV}), has {_size(free)} free; point storage.cache_dir (or FJORDTUNE_CACHE) "
            "at a bigger node-local volume, or free space there"
        )


# -- internals ---------------------------------------------------------------------------------------

@contextlib.contextmanager
def _exclusive(lock_path: Path, *, uri: str, entry: Path) -> Iterator[None]:
    """Hold the entry's lock; the lock file stays (deleting a lock file others may hold is a race)."""
    with open(lock_path, "a") as fh:
        if not _try_lock(fh):
            log.info("waiting for another process to finish downloading %s into %s", uri, entry)
            start = last = time.monotonic()
            while not _try_lock(fh):
                time.sleep(0.5)
                if time.monotonic() - last >= WAIT_LOG_EVERY_S:
                    last = time.monotonic()
                    log.info("still waiting for the download of %s (%.0f s)", uri, last - start)
            log.info("waited %.1f s for the download of %s", time.monotonic() - start, uri)
        yield  # closing the file releases the lock


def _try_lock(fh: Any) -> bool:
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _download(store: Any, uri: str, commit: str, entry: Path, *, min_free: int | None) -> None:
    """Fetch into `<entry>.partial`, then rename; only called while holding the entry's lock."""
    partial = entry.with_name(entry.name + ".partial")
    if partial.exists():
        log.info("removing %s, left by an interrupted download", partial)
        shutil.rmtree(partial)
    if entry.exists():  # a folder without its marker was never a complete copy: nobody reads it
        log.warning("removing %s: it has no %s marker", entry, MARKER)
        shutil.rmtree(entry)
    _remove_abandoned_partials(entry.parent)
    manifest = store.manifest(uri, commit)
    files = {rel: entry.size for rel, entry in manifest.items()}
    total = sum(files.values())
    check_free_space(entry.parent, total, uri=uri, min_free=min_free)
    log.info("downloading %s (%d files, %s) into %s", uri, len(files), _size(total), entry)
    progress = TransferProgress("downloading", uri, total=total)
    partial.mkdir()
    try:
        # this very commit, verified file by file: a rewrite of `uri` meanwhile flips the pointer but keeps
        # this commit (the previous one) in storage, so the copy stays consistent
        store.download_files(uri, sorted(files), partial, commit=commit, manifest=manifest, on_bytes=progress)
        (partial / MARKER).write_text(commit)  # last: the marker says every file above is complete
        os.rename(partial, entry)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    progress.finish(f"into {entry}")


def _remove_abandoned_partials(folder: Path) -> None:
    """Delete other commits' `.partial` folders whose download died (their lock is free)."""
    for partial in folder.glob("*.partial"):
        lock = partial.with_name(partial.name[: -len(".partial")] + ".lock")
        with open(lock, "a") as fh:
            if _try_lock(fh):
                log.info("removing %s, left by an interrupted download", partial)
                shutil.rmtree(partial, ignore_errors=True)


def _size(num_bytes: int) -> str:
    units = ("KiB", "MiB", "GiB", "TiB")
    value, index = num_bytes / 1024, 0
    while value >= 1024 and index < len(units) - 1:
        value, index = value / 1024, index + 1
    return f"{num_bytes:,} bytes ({value:.1f} {units[index]})"


def _digest(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()[:32]
