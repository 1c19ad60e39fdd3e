"""Folders in object storage (s3://) or on a local disk, committed atomically and never lost.

A folder `U` is written as versioned commits. A commit uploads its files under a fresh prefix, then its
manifest, then flips one small pointer object; the previous commit's files are never touched while
that happens, so a writer killed at any moment leaves the previous commit intact and readable:

    U/_COMMITTED                      the pointer: {"commit": ID, "previous": ID, "time", "files", "bytes", "meta"}
    U/commits/ID/<files...>           one commit's files, exactly the folder that was committed
    U/manifests/ID.json               size and checksum (xxh3-128) of every file of the commit

Readers follow the pointer and check every downloaded file against the manifest. Commits that are
neither live nor the previous one (superseded, or left by a writer that died) are garbage: retention
(`Store.clean`, `fjordtune checkpoints prune`) deletes them once they are older than a grace period,
never a writer in mid-flight. The commit id is what node caches key on.

Every failure of boto3, s3transfer, the network or the disk becomes one `InfraError` line (exit 3)
naming the endpoint, the bucket or path, and what to check. Requests time out (`storage.timeout_s`)
and are retried with backoff (`storage.retries`), each retry logged.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import fnmatch
import json
import logging
import os
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fjordtune.errors import FjordtuneError, InfraError, UserError

log = logging.getLogger(__name__)

MARKER = POINTER = "_COMMITTED"
COMMITS = "commits"
MANIFESTS = "manifests"
FORMAT = 1
CACHE_ENV = "FJORDTUNE_CACHE"
DEFAULT_CACHE = "~/.cache/fjordtune"
LEFTOVER_GRACE_S = 3600.0
"""Uncommitted or superseded commits younger than this are left alone by retention: another writer may
still be uploading one, or a reader still reading one."""
NOT_FOUND = ("404", "NoSuchKey", "NotFound")
CREDENTIAL_CODES = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "InvalidToken",
                    "ExpiredToken", "AuthorizationHeaderMalformed")
CHECK_CREDENTIALS = ("check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or the instance role) "
                     "in the environment of every process that reads or writes storage")
HASH_CHUNK = 1 << 20
CHECKSUM = "xxh3_128"
"""The manifest's checksum: xxHash3 128-bit, ~16 GB/s here against sha256's 1.7 GB/s. It guards
against corruption and truncation, not against an attacker who can write to the bucket."""


def cache_root(configured: str | None = None) -> str:
    """The node-local folder where models and adapters are downloaded once and shared by every process
    on the node: `configured` (the job's `storage.cache_dir`), else $FJORDTUNE_CACHE, else
    ~/.cache/fjordtune. Never /tmp: a 238 GB model does not belong on a RAM-backed or small /tmp."""
    return os.path.abspath(os.path.expanduser(configured or os.environ.get(CACHE_ENV) or DEFAULT_CACHE))


# -- errors ----------------------------------------------------------------------------------------

def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _error_code(e: Any) -> str:
    return str(getattr(e, "response", {}).get("Error", {}).get("Code", ""))


def _root_cause(e: BaseException) -> BaseException:
    """The botocore (or disk) error behind boto3's and s3transfer's wrappers (S3UploadFailedError,
    RetriesExceededError): the outermost botocore error in the chain, else the innermost OS error."""
    from botocore.exceptions import BotoCoreError, ClientError

    seen: set[int] = set()
    chain = []
    while isinstance(e, BaseException) and id(e) not in seen:
        seen.add(id(e))
        chain.append(e)
        e = getattr(e, "last_exception", None) or e.__cause__ or e.__context__
    for x in chain:
        if isinstance(x, (BotoCoreError, ClientError)):
            return x
    for x in reversed(chain):
        if isinstance(x, OSError):
            return x
    return chain[0]


def describe_failure(e: BaseException, *, where: str, endpoint: str | None, timeout_s: float | None = None,
                     attempts: int | None = None) -> str:
    """One line for a storage failure: what happened, at which endpoint and bucket or path, what to check."""
    from botocore.exceptions import (
        ClientError,
        ConnectionClosedError,
        ConnectTimeoutError,
        EndpointConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
        ProfileNotFound,
        ReadTimeoutError,
    )

    cause = _root_cause(e)
    at = f" at {endpoint}" if endpoint else ""
    tries = f" ({attempts} attempts)" if attempts else ""
    if isinstance(cause, (NoCredentialsError, PartialCredentialsError, ProfileNotFound)):
        return f"{where}: no usable S3 credentials ({_one_line(cause)}); {CHECK_CREDENTIALS}"
    if isinstance(cause, ClientError):
        code = _error_code(cause)
        if code in CREDENTIAL_CODES:
            return f"{where}: the S3 server{at} refused the credentials ({code}); {CHECK_CREDENTIALS}"
        if code == "NoSuchBucket":
            bucket = where[len("s3://"):].split("/", 1)[0] if where.startswith("s3://") else where
            return (f"{where}: bucket {bucket!r} does not exist{at}; check the bucket name in storage.uri or "
                    "model.path for a typo, and the endpoint (fjordtune never creates buckets: create it first)")
        return f"{where}: the S3 server{at} answered {code or 'an error'}: {_one_line(cause)}"
    if isinstance(cause, ReadTimeoutError):
        limit = f" within {timeout_s:g} s" if timeout_s else ""
        return (f"{where}: the S3 server{at} stopped answering (no reply{limit}{tries}); check that it is up "
                "and not overloaded, and the network (storage.timeout_s sets the wait)")
    if isinstance(cause, (EndpointConnectionError, ConnectTimeoutError, ConnectionClosedError)):
        return (f"{where}: cannot reach the S3 server{at}{tries} ({_one_line(cause)}); check storage.endpoint_url "
                "or AWS_ENDPOINT_URL, that the server is up, and the network")
    if isinstance(cause, OSError) and not type(cause).__module__.startswith(("botocore", "urllib3")):
        path = cause.filename or where
        if cause.errno == errno.ENOSPC:
            return (f"{where}: no space left on the device holding {path}; free space there or point "
                    "storage.cache_dir (or FJORDTUNE_CACHE, or TMPDIR) at a bigger volume")
        if cause.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return f"{where}: not allowed to write {path} ({cause.strerror}); check its permissions"
        return f"{where}: local file error on {path}: {cause.strerror or _one_line(cause)}"
    return f"{where}: storage error{at}: {type(cause).__name__}: {_one_line(cause)}"


def _is_storage_failure(e: BaseException) -> bool:
    if isinstance(e, FjordtuneError):
        return False
    if isinstance(e, OSError):
        return True
    module = type(e).__module__ or ""
    return module.startswith(("botocore", "boto3", "s3transfer", "urllib3"))


@contextlib.contextmanager
def s3_errors(uri: str, *, endpoint: str | None = None, timeout_s: float | None = None,
              attempts: int | None = None) -> Iterator[None]:
    """Turn boto3, s3transfer, network and disk failures into one-line `InfraError`s (exit 3)."""
    try:
        yield
    except BaseException as e:
        if not _is_storage_failure(e):
            raise
        raise InfraError(describe_failure(e, where=uri, endpoint=endpoint, timeout_s=timeout_s,
                                          attempts=attempts)) from None


# -- locations and commit records --------------------------------------------------------------------

@dataclass(frozen=True)
class Location:
    """A parsed storage URI: `s3://bucket/key/prefix` or a local path."""

    scheme: str  # "s3" or "file"
    bucket: str
    key: str  # without leading or trailing "/"

    @classmethod
    def parse(cls, uri: str) -> Location:
        if uri.startswith("s3://"):
            bucket, _, key = uri[len("s3://") :].partition("/")
            if not bucket:
                raise UserError(f"{uri}: an s3:// URI needs a bucket")
            return cls("s3", bucket, key.strip("/"))
        path = uri[len("file://") :] if uri.startswith("file://") else uri
        return cls("file", "", str(Path(path).expanduser().resolve()))

    def child(self, name: str) -> Location:
        key = f"{self.key}/{name}" if self.key else name
        return Location(self.scheme, self.bucket, key)

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}" if self.scheme == "s3" else self.key


@dataclass(frozen=True)
class FileEntry:
    size: int
    checksum: str  # CHECKSUM, hex


@dataclass(frozen=True)
class Pointer:
    """What `_COMMITTED` says: the live commit of a folder."""

    commit: str
    previous: str | None = None
    time: float = 0.0
    files: int = 0
    bytes: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> bytes:
        return json.dumps({"format": FORMAT, "commit": self.commit, "previous": self.previous, "time": self.time,
                           "files": self.files, "bytes": self.bytes, "meta": self.meta}, indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes, *, where: str) -> Pointer:
        try:
            raw = json.loads(data)
            return cls(str(raw["commit"]), raw.get("previous"), float(raw.get("time", 0)), int(raw.get("files", 0)),
                       int(raw.get("bytes", 0)), dict(raw.get("meta") or {}))
        except (ValueError, KeyError, TypeError):
            raise InfraError(f"{where}/{POINTER}: not a fjordtune commit pointer (written by another tool, or an "
                             "older fjordtune layout); write the folder again with fjordtune") from None


@dataclass(frozen=True)
class CommitInfo:
    """One commit folder under `U/commits/`, as listed by `Store.commits`."""

    commit: str
    status: str  # "live", "previous" or "uncommitted" (never live: failed, in flight, or superseded)
    files: int
    bytes: int
    modified: float  # newest object's time (epoch seconds)


PROGRESS_EVERY_S = 5.0
PROGRESS_MIN_BYTES = 256 << 20


class TransferProgress:
    """A transfer callback that counts bytes (from several threads) and logs every few seconds, so a
    26 GB checkpoint or a 238 GB model never moves in silence."""

    def __init__(self, verb: str, uri: str, *, total: int) -> None:
        self.verb, self.uri, self.total, self.done = verb, uri, total, 0
        self.start = self.last = time.monotonic()
        self.lock = threading.Lock()

    def __call__(self, num_bytes: int) -> None:
        with self.lock:
            self.done += num_bytes
            now = time.monotonic()
            if now - self.last < PROGRESS_EVERY_S:
                return
            self.last = now
        log.info("%s %s: %s of %s (%.0f%%)", self.verb, self.uri, human_size(self.done), human_size(self.total),
                 100 * self.done / max(self.total, 1))

    def finish(self, where: str = "") -> None:
        seconds = time.monotonic() - self.start
        past = {"uploading": "uploaded", "downloading": "downloaded"}.get(self.verb, self.verb)
        log.info("%s %s (%s) in %.1f s (%.0f MB/s)%s", past, self.uri, human_size(self.total), seconds,
                 self.total / 1e6 / max(seconds, 1e-3), f" {where}" if where else "")


def new_commit_id() -> str:
    """Sortable by time, unique, and safe as a file name: 20261201T233000Z-3f9a1c2b."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(4)


def checksum_bytes(data: bytes) -> str:
    import xxhash

    return xxhash.xxh3_128(data).hexdigest()


def checksum_file(path: str | Path) -> str:
    """The manifest checksum of a file read in 1 MiB chunks into one reused buffer (never the whole file
    in memory; xxhash drops the GIL). A fresh 8 MiB bytes per chunk cost twice the system CPU (page faults)."""
    import xxhash

    digest = xxhash.xxh3_128()
    buf = bytearray(HASH_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


# -- backends: the primitive operations per scheme ------------------------------------------------------

class _Local:
    """Folders on a local (or shared) filesystem: each file and the pointer appear by rename."""

    def put_files(self, pairs: list[tuple[Path, Location]], on_bytes: Callable[[int], None] | None) -> None:
        for src, dest in pairs:
            target = Path(dest.key)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(target.name + ".partial")
            shutil.copyfile(src, tmp)
            os.replace(tmp, target)
            if on_bytes:
                on_bytes(target.stat().st_size)

    def get_files(self, pairs: list[tuple[Location, Path, int]], on_bytes: Callable[[int], None] | None,
                  on_file: Callable[[Path], None]) -> None:
        for src, target, _ in pairs:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src.key, target)
            if on_bytes:
                on_bytes(target.stat().st_size)
            on_file(target)

    def put_bytes(self, loc: Location, data: bytes) -> None:
        p = Path(loc.key)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + f".{secrets.token_hex(4)}.partial")
        tmp.write_bytes(data)
        os.replace(tmp, p)

    def get_bytes(self, loc: Location) -> bytes | None:
        try:
            return Path(loc.key).read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None

    def list(self, loc: Location) -> dict[str, tuple[int, float]]:
        root = Path(loc.key)
        if not root.is_dir():
            return {}
        out = {}
        for p in sorted(root.rglob("*")):
            if p.is_file():
                st = p.stat()
                out[p.relative_to(root).as_posix()] = (st.st_size, st.st_mtime)
        return out

    def list_dirs(self, loc: Location) -> list[str]:
        root = Path(loc.key)
        return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []

    def delete(self, locs: list[Location]) -> None:
        for loc in locs:
            Path(loc.key).unlink(missing_ok=True)

    def delete_tree(self, loc: Location) -> None:
        shutil.rmtree(loc.key, ignore_errors=True)

    def bucket_exists(self, loc: Location) -> bool:
        return True


class _S3:
    """S3 through one boto3 client and one s3transfer manager (multipart, parallel parts)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    @property
    def client(self) -> Any:
        return self.store.s3

    def _manager(self) -> Any:
        from boto3.s3.transfer import TransferConfig, create_transfer_manager

        part = self.store.part_size_mib << 20
        # io_chunksize stays s3transfer's 256 KiB: 1 MiB pieces looked cheaper in short runs, but after a few
        # GiB their allocation churn cost 2-4x the system CPU (docs/benchmarks.md)
        config = TransferConfig(multipart_threshold=part, multipart_chunksize=part, max_concurrency=self.store.max_concurrency,
                                num_download_attempts=max(2, min(self.store.retries, 3)), use_threads=True)
        return create_transfer_manager(self.client, config)

    def put_files(self, pairs: list[tuple[Path, Location]], on_bytes: Callable[[int], None] | None) -> None:
        subscribers = [_Progress(on_bytes)] if on_bytes else None
        with self._manager() as manager:
            futures = [manager.upload(str(src), dest.bucket, dest.key, subscribers=subscribers) for src, dest in pairs]
            for f in futures:
                f.result()

    def get_files(self, pairs: list[tuple[Location, Path, int]], on_bytes: Callable[[int], None] | None,
                  on_file: Callable[[Path], None]) -> None:
        with self._manager() as manager:
            futures = []
            for src, target, size in pairs:
                target.parent.mkdir(parents=True, exist_ok=True)
                subs = [_KnownSize(size), *([_Progress(on_bytes)] if on_bytes else [])]
                futures.append((manager.download(src.bucket, src.key, str(target), subscribers=subs), target))
            for f, target in futures:
                f.result()
                on_file(target)

    def put_bytes(self, loc: Location, data: bytes) -> None:
        self.client.put_object(Bucket=loc.bucket, Key=loc.key, Body=data)

    def get_bytes(self, loc: Location) -> bytes | None:
        from botocore.exceptions import ClientError

        try:
            return self.client.get_object(Bucket=loc.bucket, Key=loc.key)["Body"].read()
        except ClientError as e:
            if _error_code(e) in NOT_FOUND:
                return None
            raise

    def list(self, loc: Location) -> dict[str, tuple[int, float]]:
        prefix = f"{loc.key}/" if loc.key else ""
        out: dict[str, tuple[int, float]] = {}
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=loc.bucket, Prefix=prefix):
            for o in page.get("Contents", []):
                if not o["Key"].endswith("/"):
                    out[o["Key"][len(prefix):]] = (int(o["Size"]), o["LastModified"].timestamp())
        return out

    def list_dirs(self, loc: Location) -> list[str]:
        prefix = f"{loc.key}/" if loc.key else ""
        names: list[str] = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=loc.bucket, Prefix=prefix, Delimiter="/"):
            names += [p["Prefix"][len(prefix):].rstrip("/") for p in page.get("CommonPrefixes", [])]
        return sorted(names)

    def delete(self, locs: list[Location]) -> None:
        for i in range(0, len(locs), 1000):
            batch = locs[i:i + 1000]
            self.client.delete_objects(Bucket=batch[0].bucket, Delete={"Objects": [{"Key": x.key} for x in batch],
                                                                       "Quiet": True})

    def delete_tree(self, loc: Location) -> None:
        self.delete([loc.child(rel) for rel in self.list(loc)])

    def bucket_exists(self, loc: Location) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=loc.bucket)
            return True
        except ClientError as e:
            if _error_code(e) in (*NOT_FOUND, "NoSuchBucket"):
                return False
            raise


def _subscriber_base() -> type:
    from s3transfer.subscribers import BaseSubscriber

    return BaseSubscriber


class _Progress(_subscriber_base()):  # type: ignore[misc]
    def __init__(self, callback: Callable[[int], None]) -> None:
        self.callback = callback

    def on_progress(self, future: Any, bytes_transferred: int, **kwargs: Any) -> None:
        self.callback(bytes_transferred)


class _KnownSize(_subscriber_base()):  # type: ignore[misc]
    """Tell s3transfer the object's size (from the manifest) so a download skips its HeadObject."""

    def __init__(self, size: int) -> None:
        self.size = size

    def on_queued(self, future: Any, **kwargs: Any) -> None:
        future.meta.provide_transfer_size(self.size)


# -- the store -------------------------------------------------------------------------------------

def s3_client(endpoint_url: str | None = None, *, timeout_s: float = 30, retries: int = 5,
              max_pool: int = 10) -> Any:
    """A boto3 S3 client with bounded timeouts and standard-mode retries that say when they happen."""
    import boto3
    from botocore.config import Config

    endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
    # a fresh session: boto3's default session would keep the first credentials it ever read
    client = boto3.session.Session().client(
        "s3", endpoint_url=endpoint,
        config=Config(connect_timeout=timeout_s, read_timeout=timeout_s, max_pool_connections=max_pool,
                      retries={"max_attempts": retries, "mode": "standard"}, s3={"addressing_style": "path"},
                      # every file is checked against the commit's manifest: botocore's own CRC32 on each
                      # upload, and the HeadObject s3transfer sends before each download to validate one,
                      # would only repeat that work
                      request_checksum_calculation="when_required", response_checksum_validation="when_required"),
    )
    client.meta.events.register("needs-retry.s3", _RetryLogger(client.meta.endpoint_url, retries))
    return client


class _RetryLogger:
    """Logs each failed S3 attempt that botocore's standard retry mode will retry (a warning per retry)."""

    RETRIED_STATUS = (429, 500, 502, 503, 504)

    def __init__(self, endpoint: str, max_attempts: int) -> None:
        self.endpoint, self.max_attempts = endpoint, max_attempts

    def __call__(self, attempts: int, response: Any = None, caught_exception: Any = None, operation: Any = None,
                 request_dict: Any = None, **kwargs: Any) -> None:
        if attempts >= self.max_attempts:
            return None
        if caught_exception is not None:
            why = f"{type(caught_exception).__name__}: {_one_line(caught_exception)}"
        elif response is not None and response[0].status_code in self.RETRIED_STATUS:
            why = f"HTTP {response[0].status_code}"
        else:
            return None
        url = (request_dict or {}).get("url", self.endpoint)
        log.warning("S3 %s %s: attempt %d of %d failed (%s); retrying", getattr(operation, "name", "request"),
                    url, attempts, self.max_attempts, why[:300])
        return None


class Store:
    """Versioned, committed folders under s3:// or local URIs, and single objects.

    `timeout_s`: per-request connect and read timeout; `retries`: attempts per request; `part_size_mib`
    and `max_concurrency`: multipart transfers. `Store.for_job(job)` takes them from the job's storage
    section. Credentials come from the environment, a profile or an instance role, never from here.
    """

    def __init__(self, *, endpoint_url: str | None = None, timeout_s: float = 30, retries: int = 5,
                 part_size_mib: int = 64, max_concurrency: int = 10) -> None:
        self.endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
        self.timeout_s, self.retries = float(timeout_s), int(retries)
        self.part_size_mib, self.max_concurrency = int(part_size_mib), int(max_concurrency)
        self._client: Any = None
        self._lock = threading.Lock()

    @classmethod
    def for_job(cls, job: Any) -> Store:
        s = job.storage
        return cls(endpoint_url=s.endpoint_url, timeout_s=s.timeout_s, retries=s.retries, part_size_mib=s.part_size_mib,
                   max_concurrency=s.max_concurrency)

    def with_max_concurrency(self, n: int) -> Store:
        """This store (same client and settings) moving at most `n` parts at once: for background uploads,
        which should take bandwidth and CPU from training gently."""
        other = copy.copy(self)
        other.max_concurrency = n
        return other

    def settings(self) -> dict[str, Any]:
        """Plain, secret-free settings to rebuild this store in another process: `Store(**settings)`."""
        return {"endpoint_url": self.endpoint_url, "timeout_s": self.timeout_s, "retries": self.retries,
                "part_size_mib": self.part_size_mib, "max_concurrency": self.max_concurrency}

    @property
    def s3(self) -> Any:
        with self._lock:
            if self._client is None:
                self._client = s3_client(self.endpoint_url, timeout_s=self.timeout_s, retries=self.retries,
                                         max_pool=self.max_concurrency + 4)
            return self._client

    @property
    def endpoint(self) -> str:
        if self._client is not None:
            return str(self._client.meta.endpoint_url)
        return self.endpoint_url or "the default AWS endpoint"

    def errors(self, uri: str) -> contextlib.AbstractContextManager[None]:
        return s3_errors(uri, endpoint=self.endpoint, timeout_s=self.timeout_s, attempts=self.retries)

    def _backend(self, loc: Location) -> _Local | _S3:
        return _S3(self) if loc.scheme == "s3" else _Local()

    # -- pointers and manifests ----------------------------------------------------------------------
    def pointer(self, uri: str) -> Pointer | None:
        """The folder's live commit, or None if nothing was ever committed there."""
        loc = Location.parse(uri)
        with self.errors(uri):
            data = self._backend(loc).get_bytes(loc.child(POINTER))
        return None if data is None else Pointer.from_json(data, where=uri)

    def is_committed(self, uri: str) -> bool:
        return self.pointer(uri) is not None

    def commit_id(self, uri: str) -> str:
        """The folder's live commit id; a UserError if the folder is absent or was never committed."""
        ptr = self.pointer(uri)
        if ptr is None:
            raise UserError(f"{uri}: not found, or never completely written (no {POINTER} pointer)")
        return ptr.commit

    def commit_uri(self, uri: str, commit: str | None = None) -> str:
        """Where a commit's files are (the live one by default)."""
        commit = commit or self.commit_id(uri)
        return str(Location.parse(uri).child(f"{COMMITS}/{commit}"))

    def manifest(self, uri: str, commit: str | None = None) -> dict[str, FileEntry]:
        """Size and checksum of every file of a commit (the live one by default), by relative path."""
        commit = commit or self.commit_id(uri)
        loc = Location.parse(uri).child(f"{MANIFESTS}/{commit}.json")
        with self.errors(uri):
            data = self._backend(loc).get_bytes(loc)
        if data is None:
            raise InfraError(f"{uri}: commit {commit} has no manifest ({loc}): it was deleted behind fjordtune's "
                             "back; write the folder again")
        try:
            return {rel: FileEntry(int(e["size"]), str(e[CHECKSUM])) for rel, e in json.loads(data)["files"].items()}
        except (ValueError, KeyError, TypeError):
            raise InfraError(f"{loc}: unreadable manifest") from None

    def list_files(self, uri: str) -> dict[str, int]:
        """Size of every file of the live commit, by path relative to the folder."""
        return {rel: e.size for rel, e in self.manifest(uri).items()}

    def read_file(self, uri: str, rel: str) -> bytes:
        """One file of the folder's live commit (e.g. a model's config.json), checked against the manifest."""
        entries = self.manifest(uri)
        if rel not in entries:
            raise UserError(f"{uri}: has no file {rel}")
        data = self.read_bytes(f"{self.commit_uri(uri)}/{rel}")
        if checksum_bytes(data) != entries[rel].checksum:
            raise InfraError(f"{uri}/{rel}: corrupted in storage (its {CHECKSUM} checksum differs from the manifest)")
        return data

    # -- writing ---------------------------------------------------------------------------------
    def upload_dir(self, local_dir: str | Path, uri: str, *, meta: dict[str, Any] | None = None,
                   on_bytes: Callable[[int], None] | None = None) -> str:
        """Commit every file of `local_dir` as a new version of the folder `uri`; return its commit id.

        The files go under a fresh commit prefix, the pointer flips last: until then readers see the
        previous commit, and after a failure they still do. Then retention cleans old commits."""
        commit = new_commit_id()
        entries = self.upload_files(local_dir, uri, commit, on_bytes=on_bytes)
        self.finish_commit(uri, commit, entries, meta=meta)
        self.clean(uri)
        return commit

    def upload_files(self, local_dir: str | Path, uri: str, commit: str, *, only: Iterable[str] | None = None,
                     on_bytes: Callable[[int], None] | None = None) -> dict[str, FileEntry]:
        """Upload files of `local_dir` (all, or the relative paths in `only`) into commit `commit` of
        `uri`, hashing them while they upload. Returns their manifest entries. Commits nothing: several
        processes may each upload their part of one commit; one then calls `finish_commit`."""
        local_dir = Path(local_dir)
        if only is None:
            rels = sorted(p.relative_to(local_dir).as_posix() for p in local_dir.rglob("*") if p.is_file())
        else:
            rels = sorted(only)
        rels = [r for r in rels if r != POINTER]
        base = Location.parse(uri).child(f"{COMMITS}/{commit}")
        pairs = [(local_dir / rel, base.child(rel)) for rel in rels]
        self.check_bucket(uri)  # some S3 servers (SeaweedFS) create a missing bucket on the first PUT
        progress = None
        if on_bytes is None:
            total = sum((local_dir / rel).stat().st_size for rel in rels)
            if total >= PROGRESS_MIN_BYTES:
                progress = on_bytes = TransferProgress("uploading", str(base), total=total)
        with self.errors(uri), ThreadPoolExecutor(max_workers=2, thread_name_prefix="fjordtune-hash") as pool:
            hashes = {rel: pool.submit(checksum_file, local_dir / rel) for rel in rels}
            self._backend(base).put_files(pairs, on_bytes)
            entries = {rel: FileEntry((local_dir / rel).stat().st_size, h.result()) for rel, h in hashes.items()}
        if progress:
            progress.finish()
        log.debug("uploaded %d files (%d bytes) to %s", len(rels), sum(e.size for e in entries.values()), base)
        return entries

    def finish_commit(self, uri: str, commit: str, entries: dict[str, FileEntry], *,
                      meta: dict[str, Any] | None = None) -> Pointer:
        """Write the commit's manifest, then flip the folder's pointer to it: the one atomic step."""
        loc = Location.parse(uri)
        backend = self._backend(loc)
        manifest = {"format": FORMAT, "commit": commit, "checksum": CHECKSUM,
                    "files": {rel: {"size": e.size, CHECKSUM: e.checksum} for rel, e in sorted(entries.items())}}
        with self.errors(uri):
            backend.put_bytes(loc.child(f"{MANIFESTS}/{commit}.json"), json.dumps(manifest, indent=1).encode())
            old = backend.get_bytes(loc.child(POINTER))
            previous = Pointer.from_json(old, where=uri).commit if old else None
            ptr = Pointer(commit, previous, time.time(), len(entries), sum(e.size for e in entries.values()), meta or {})
            backend.put_bytes(loc.child(POINTER), ptr.to_json())
        log.info("committed %s (commit %s, %d files, %s)", uri, commit, ptr.files, human_size(ptr.bytes))
        return ptr

    # -- listing and retention ----------------------------------------------------------------------
    def commits(self, uri: str) -> list[CommitInfo]:
        """Every commit folder of `uri`, oldest first, with whether it is live, the previous one or uncommitted."""
        loc = Location.parse(uri)
        ptr = self.pointer(uri)
        with self.errors(uri):
            objects = self._backend(loc).list(loc.child(COMMITS))
            manifests = self._backend(loc).list(loc.child(MANIFESTS))
        grouped: dict[str, list[tuple[int, float]]] = {}
        for rel, info in objects.items():
            grouped.setdefault(rel.split("/", 1)[0], []).append(info)
        for rel, (_, mtime) in manifests.items():  # a manifest counts for the time, not as a file
            if rel.endswith(".json") and "/" not in rel:
                grouped.setdefault(rel[: -len(".json")], []).append((-1, mtime))
        out = []
        for commit, infos in sorted(grouped.items()):
            status = ("live" if ptr and commit == ptr.commit else
                      "previous" if ptr and commit == ptr.previous else "uncommitted")
            files = [s for s, _ in infos if s >= 0]
            out.append(CommitInfo(commit, status, len(files), sum(files), max(t for _, t in infos)))
        return out

    def clean(self, uri: str, *, grace_s: float = LEFTOVER_GRACE_S) -> list[str]:
        """Retention: delete the commits that are neither live nor previous and older than `grace_s`
        (superseded, or left by a writer that died). Returns the deleted commit ids."""
        now = time.time()
        doomed = [c for c in self.commits(uri) if c.status == "uncommitted" and now - c.modified >= grace_s]
        with self.errors(uri):
            for c in doomed:
                self.delete_commit(uri, c.commit)
                log.info("retention: deleted %s commit %s (%s, not live)", uri, c.commit, human_size(c.bytes))
        return [c.commit for c in doomed]

    def delete_commit(self, uri: str, commit: str) -> None:
        """Delete one commit's files and manifest (never the live one: callers check)."""
        loc = Location.parse(uri)
        backend = self._backend(loc)
        with self.errors(uri):
            backend.delete_tree(loc.child(f"{COMMITS}/{commit}"))
            backend.delete([loc.child(f"{MANIFESTS}/{commit}.json")])

    def delete_folder(self, uri: str) -> None:
        """Delete a whole folder: the pointer first (from then on it is not committed), then its commits."""
        loc = Location.parse(uri)
        backend = self._backend(loc)
        with self.errors(uri):
            backend.delete([loc.child(POINTER)])
            backend.delete_tree(loc)

    def subfolders(self, uri: str) -> list[str]:
        """Names of the immediate subfolders of `uri` (committed or not)."""
        loc = Location.parse(uri)
        with self.errors(uri):
            return self._backend(loc).list_dirs(loc)

    # -- reading ---------------------------------------------------------------------------------
    def download_files(self, uri: str, rel_paths: Iterable[str], local_dir: str | Path, *, commit: str | None = None,
                       manifest: dict[str, FileEntry] | None = None,
                       on_bytes: Callable[[int], None] | None = None) -> None:
        """Copy the given files of a commit of `uri` (the live one by default) into `local_dir`, checking
        each against the manifest's size and checksum as it lands (`manifest`: that commit's, if the caller
        has read it already). `on_bytes(n)` is called as bytes arrive."""
        commit = commit or self.commit_id(uri)
        entries = manifest if manifest is not None else self.manifest(uri, commit)
        rels = list(rel_paths)
        missing = [r for r in rels if r not in entries]
        if missing:
            raise UserError(f"{uri}: commit {commit} has no file {missing[0]}")
        local_dir = Path(local_dir)
        base = Location.parse(uri).child(f"{COMMITS}/{commit}")
        pairs = [(base.child(rel), local_dir / rel, entries[rel].size) for rel in rels]
        bad: list[str] = []

        with self.errors(uri), ThreadPoolExecutor(max_workers=2, thread_name_prefix="fjordtune-verify") as pool:
            checks = []

            def verify(target: Path) -> None:
                rel = target.relative_to(local_dir).as_posix()
                checks.append(pool.submit(self._verify, target, rel, entries[rel], base, bad))

            self._backend(base).get_files(pairs, on_bytes, verify)
            for c in checks:
                c.result()
        if bad:
            raise InfraError(f"{uri}: commit {commit}: {bad[0]}" + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "")
                             + "; the object is corrupted in storage: write it again, or use another checkpoint")

    @staticmethod
    def _verify(target: Path, rel: str, entry: FileEntry, base: Location, bad: list[str]) -> None:
        size = target.stat().st_size
        if size != entry.size:
            bad.append(f"{base.child(rel)} has {size} bytes, the manifest says {entry.size}")
        elif checksum_file(target) != entry.checksum:
            bad.append(f"{base.child(rel)} does not match its {CHECKSUM} checksum in the manifest")

    def download_dir(self, uri: str, local_dir: str | Path, *, exclude: tuple[str, ...] = (),
                     on_bytes: Callable[[int], None] | None = None) -> Path:
        """Copy the live commit of `uri` to `local_dir`, verified; refuse a folder never committed.
        Files whose relative path matches a glob in `exclude` are left out."""
        commit = self.commit_id(uri)
        local_dir = Path(local_dir)
        with self.errors(str(local_dir)):
            local_dir.mkdir(parents=True, exist_ok=True)
        manifest = self.manifest(uri, commit)
        files = [rel for rel in manifest if not any(fnmatch.fnmatch(rel, pat) for pat in exclude)]
        self.download_files(uri, files, local_dir, commit=commit, manifest=manifest, on_bytes=on_bytes)
        return local_dir

    def local_view(self, uri: str, cache_root: str | Path, *, min_free_bytes: int | None = None) -> Path:
        """A local path holding the live commit of `uri`: the commit folder itself when local (sizes
        checked), else this node's cached copy, downloaded and verified once per node and commit (see
        `fjordtune.storage.cache`). `min_free_bytes`: disk space that must stay free after a download
        (default: $FJORDTUNE_CACHE_MIN_FREE, else 1 GiB)."""
        loc = Location.parse(uri)
        if loc.scheme == "file":
            commit = self.commit_id(uri)
            path = Path(loc.key) / COMMITS / commit
            for rel, entry in self.manifest(uri, commit).items():
                f = path / rel
                if not f.is_file() or f.stat().st_size != entry.size:
                    raise InfraError(f"{uri}: commit {commit}: {f} is missing or has the wrong size")
            return path
        from fjordtune.storage.cache import cached_folder

        return cached_folder(self, uri, cache_root, min_free_bytes=min_free_bytes)

    # -- single objects ------------------------------------------------------------------------
    def write_bytes(self, uri: str, data: bytes) -> None:
        loc = Location.parse(uri)
        self.check_bucket(uri)
        with self.errors(uri):
            self._backend(loc).put_bytes(loc, data)

    def read_bytes(self, uri: str) -> bytes:
        loc = Location.parse(uri)
        with self.errors(uri):
            data = self._backend(loc).get_bytes(loc)
        if data is None:
            raise UserError(f"{uri}: no such file" if loc.scheme == "file" else f"{uri}: no such object")
        return data

    def read_range(self, uri: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of one file or object, fewer at its end (b"" from there on): a local seek and
        read, or one S3 GET with a Range header. botocore retries the request; a body that breaks off or
        comes back short is read again, up to `retries` attempts in all, each retry logged: training data is
        read a chunk at a time, and a connection lost midway should cost that chunk, not the job."""
        from botocore.exceptions import BotoCoreError, ClientError

        loc = Location.parse(uri)
        if end <= start:
            return b""
        if loc.scheme == "file":
            with self.errors(uri):
                try:
                    with open(loc.key, "rb") as fh:
                        fh.seek(start)
                        return fh.read(end - start)
                except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                    raise UserError(f"{uri}: no such file") from None
        from urllib3.exceptions import HTTPError

        for attempt in range(1, self.retries + 1):
            with self.errors(uri):
                try:  # botocore itself retries the request (standard mode), not the reading of its body
                    resp = self.s3.get_object(Bucket=loc.bucket, Key=loc.key, Range=f"bytes={start}-{end - 1}")
                except ClientError as e:
                    if _error_code(e) in NOT_FOUND:
                        raise UserError(f"{uri}: no such object") from None
                    if _error_code(e) == "InvalidRange":  # start at or past the end
                        return b""
                    raise
                total = int(str(resp.get("ContentRange", "")).rpartition("/")[2] or end)
                expected = min(end, total) - start
                try:
                    data = resp["Body"].read()
                    why = f"got {len(data)} of {expected} bytes"
                except (BotoCoreError, HTTPError, OSError) as e:
                    if attempt == self.retries:
                        raise
                    data, why = b"", f"{type(e).__name__}: {_one_line(e)}"
                if len(data) == expected:
                    return data
                if attempt == self.retries:
                    raise InfraError(f"{uri}: bytes {start}-{end - 1}: {why} after {attempt} attempts at "
                                     f"{self.endpoint}; check the server and the network")
            log.warning("S3 ranged read %s bytes %d-%d: attempt %d of %d failed (%s); retrying", uri, start, end - 1,
                        attempt, self.retries, why[:300])
            time.sleep(min(0.2 * 2 ** (attempt - 1), 5.0))
        raise AssertionError("unreachable")

    def put_object(self, uri: str, data: bytes) -> None:
        """Write one small object without checking its bucket first (for many small writes into a bucket
        already checked, e.g. eval results as batches finish)."""
        loc = Location.parse(uri)
        with self.errors(uri):
            self._backend(loc).put_bytes(loc, data)

    def get_object(self, uri: str) -> bytes | None:
        """One object's bytes, or None when there is no such object."""
        loc = Location.parse(uri)
        with self.errors(uri):
            return self._backend(loc).get_bytes(loc)

    def list_objects(self, uri: str) -> dict[str, tuple[int, float]]:
        """(size, modification time) of every object under `uri/`, by path relative to it (one request per
        1,000 objects)."""
        loc = Location.parse(uri)
        with self.errors(uri):
            return self._backend(loc).list(loc)

    def check_bucket(self, uri: str) -> None:
        """An InfraError (exit 3) naming the bucket and endpoint if the bucket of an s3:// URI does not
        exist: fjordtune never creates buckets (a typo would silently get one)."""
        loc = Location.parse(uri)
        if loc.scheme != "s3":
            return
        with self.errors(uri):
            exists = self._backend(loc).bucket_exists(loc)
        if not exists:
            raise InfraError(f"{uri}: bucket {loc.bucket!r} does not exist at {self.endpoint}; check the bucket name "
                             "in storage.uri for a typo, and the endpoint (fjordtune never creates buckets: create it "
                             "first, e.g. `aws s3 mb`)")

    def ensure_bucket(self, uri: str) -> None:
        """Create the bucket of an s3:// URI if it does not exist. Only the demo's own stack and tests do
        this; jobs never create buckets (`check_bucket`)."""
        loc = Location.parse(uri)
        if loc.scheme != "s3":
            Path(loc.key).mkdir(parents=True, exist_ok=True)
            return
        with self.errors(uri):
            if not self._backend(loc).bucket_exists(loc):
                self.s3.create_bucket(Bucket=loc.bucket)


def human_size(num_bytes: int) -> str:
    value, unit = float(num_bytes), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            break
        value /= 1024
    return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
