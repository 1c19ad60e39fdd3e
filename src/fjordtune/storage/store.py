"""Folders in object storage (s3://) or on a local disk, committed atomically.

A folder counts as present only once its `_COMMITTED` marker exists; the marker is written last, so
a reader (a resume, an eval worker) never picks up a half-uploaded model or adapter.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fjordtune.errors import InfraError, UserError

log = logging.getLogger(__name__)

MARKER = "_COMMITTED"
CACHE_ENV = "FJORDTUNE_CACHE"
DEFAULT_CACHE = "~/.cache/fjordtune"
NOT_FOUND = ("404", "NoSuchKey", "NotFound")
NO_CREDENTIALS = ("no S3 credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, "
                  "or run where an instance role provides them")


def cache_root(configured: str | None = None) -> str:
    """The node-local folder where models and adapters are downloaded once and shared by every process
    on the node: `configured` (the job's `storage.cache_dir`), else $FJORDTUNE_CACHE, else
    ~/.cache/fjordtune. Never /tmp: a 238 GB model does not belong on a RAM-backed or small /tmp."""
    return os.path.abspath(os.path.expanduser(configured or os.environ.get(CACHE_ENV) or DEFAULT_CACHE))


@contextlib.contextmanager
def s3_errors(uri: str) -> Iterator[None]:
    """Turn boto3/botocore failures into one-line fjordtune errors: missing credentials are the user's
    to fix (exit 2); anything else the store or the network did is an infrastructure error (exit 3)."""
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        NoCredentialsError,
        PartialCredentialsError,
        ProfileNotFound,
    )

    try:
        yield
    except NoCredentialsError:
        raise UserError(f"{uri}: {NO_CREDENTIALS}") from None
    except (PartialCredentialsError, ProfileNotFound) as e:
        raise UserError(f"{uri}: {_one_line(e)}; {NO_CREDENTIALS.replace('no S3 credentials found: ', '')}") from None
    except (BotoCoreError, ClientError, S3UploadFailedError) as e:
        raise InfraError(f"{uri}: storage error: {_one_line(e)}") from None


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def _error_code(e: Any) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))


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


def s3_client(endpoint_url: str | None = None) -> Any:
    import boto3
    from botocore.config import Config

    endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
    # a fresh session: boto3's default session would keep the first credentials it ever read
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        config=Config(retries={"max_attempts": 5, "mode": "standard"}, s3={"addressing_style": "path"}),
    )


class Store:
    """Upload, download and list committed folders under s3:// or local URIs."""

    def __init__(self, *, endpoint_url: str | None = None) -> None:
        self.endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
        self._client: Any = None

    @property
    def s3(self) -> Any:
        if self._client is None:
            self._client = s3_client(self.endpoint_url)
        return self._client

    # -- folders -------------------------------------------------------------------------------
    def is_committed(self, uri: str) -> bool:
        loc = Location.parse(uri)
        if loc.scheme == "file":
            return (Path(loc.key) / MARKER).exists()
        return self._s3_exists(loc.child(MARKER))

    def upload_dir(self, local_dir: str | Path, uri: str) -> None:
        """Copy every file of `local_dir` to `uri`, then write the commit marker."""
        local_dir = Path(local_dir)
        files = sorted(p for p in local_dir.rglob("*") if p.is_file() and p.name != MARKER)
        loc = Location.parse(uri)
        if loc.scheme == "file":
            dest = Path(loc.key)
            (dest / MARKER).unlink(missing_ok=True)
            wanted = {dest / f.relative_to(local_dir) for f in files}
            for old in [p for p in dest.rglob("*") if p.is_file()] if dest.exists() else []:
                if old not in wanted:  # leftovers of a previous commit must not mix into this one
                    old.unlink()
            for f in files:
                target = dest / f.relative_to(local_dir)
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(target.name + ".partial")
                shutil.copyfile(f, tmp)
                os.replace(tmp, target)
            (dest / MARKER).write_text(uuid.uuid4().hex)
            return
        self._guard(lambda: self.s3.delete_object(Bucket=loc.bucket, Key=loc.child(MARKER).key), uri)
        wanted = {loc.child(f.relative_to(local_dir).as_posix()).key for f in files}
        for key in self._guard(lambda: self._s3_objects(loc), uri):
            if key not in wanted:  # leftovers of a previous commit must not mix into this one
                self._guard(lambda key=key: self.s3.delete_object(Bucket=loc.bucket, Key=key), uri)
        for f in files:
            key = loc.child(f.relative_to(local_dir).as_posix()).key
            self._guard(lambda f=f, key=key: self.s3.upload_file(str(f), loc.bucket, key), uri)
        commit = uuid.uuid4().hex.encode()
        self._guard(lambda: self.s3.put_object(Bucket=loc.bucket, Key=loc.child(MARKER).key, Body=commit), uri)
        log.info("uploaded %d files to %s", len(files), uri)

    def commit_id(self, uri: str) -> str:
        """The id in the folder's commit marker; a UserError if the folder is absent or uncommitted."""
        loc = Location.parse(uri)
        marker = loc.child(MARKER)
        if loc.scheme == "file":
            path = Path(marker.key)
            data = path.read_bytes() if path.is_file() else None
        else:
            data = self._s3_get(marker, uri)
        if data is None:
            raise UserError(f"{uri}: not found, or not completely written (no {MARKER} marker)")
        return data.decode().strip() or "none"

    def list_files(self, uri: str) -> dict[str, int]:
        """Size in bytes of every file under `uri` (marker included), by path relative to `uri`."""
        loc = Location.parse(uri)
        if loc.scheme == "file":
            root = Path(loc.key)
            if not root.is_dir():
                return {}
            return {p.relative_to(root).as_posix(): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}
        with s3_errors(uri):
            objects = self._s3_objects(loc)
        return {key[len(loc.key) + 1 :] if loc.key else key: size for key, size in objects.items()}

    def download_files(self, uri: str, rel_paths: Iterable[str], local_dir: str | Path, *,
                       on_bytes: Callable[[int], None] | None = None) -> None:
        """Copy the given files of the folder `uri` into `local_dir`; `on_bytes(n)` is called as bytes
        arrive (from transfer threads). Checks no marker: see `download_dir` and `local_view`."""
        loc = Location.parse(uri)
        local_dir = Path(local_dir)
        for rel in rel_paths:
            target = local_dir / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if loc.scheme == "file":
                shutil.copyfile(Path(loc.key) / rel, target)
                if on_bytes:
                    on_bytes(target.stat().st_size)
                continue
            with s3_errors(uri):
                self.s3.download_file(loc.bucket, loc.child(rel).key, str(target), Callback=on_bytes)

    def download_dir(self, uri: str, local_dir: str | Path, *, exclude: tuple[str, ...] = ()) -> Path:
        """Copy a committed folder to `local_dir`; refuse an uncommitted (possibly partial) one.
        Files whose relative path matches a glob in `exclude` are left out."""
        self.commit_id(uri)
        local_dir = Path(local_dir)
        local_dir.mkdir(parents=True, exist_ok=True)
        files = [rel for rel in self.list_files(uri) if not any(fnmatch.fnmatch(rel, pat) for pat in exclude)]
        self.download_files(uri, files, local_dir)
        return local_dir

    def local_view(self, uri: str, cache_root: str | Path, *, min_free_bytes: int | None = None) -> Path:
        """A local path holding the committed folder `uri`: itself when local, else this node's cached
        copy, downloaded once per node and commit (see `fjordtune.storage.cache`). `min_free_bytes`:
        disk space that must stay free after a download (default: $FJORDTUNE_CACHE_MIN_FREE, else 1 GiB)."""
        loc = Location.parse(uri)
        if loc.scheme == "file":
            self.commit_id(uri)
            return Path(loc.key)
        from fjordtune.storage.cache import cached_folder

        return cached_folder(self, uri, cache_root, min_free_bytes=min_free_bytes)

    # -- single objects ------------------------------------------------------------------------
    def write_bytes(self, uri: str, data: bytes) -> None:
        loc = Location.parse(uri)
        if loc.scheme == "file":
            p = Path(loc.key)
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_name(p.name + ".partial")
            tmp.write_bytes(data)
            os.replace(tmp, p)
            return
        self._guard(lambda: self.s3.put_object(Bucket=loc.bucket, Key=loc.key, Body=data), uri)

    def read_bytes(self, uri: str) -> bytes:
        loc = Location.parse(uri)
        if loc.scheme == "file":
            try:
                return Path(loc.key).read_bytes()
            except FileNotFoundError:
                raise UserError(f"{uri}: no such file") from None
        data = self._s3_get(loc, uri)
        if data is None:
            raise UserError(f"{uri}: no such object")
        return data

    def ensure_bucket(self, uri: str) -> None:
        """Create the bucket of an s3:// URI if it does not exist (used by the demo and tests)."""
        loc = Location.parse(uri)
        if loc.scheme != "s3":
            Path(loc.key).mkdir(parents=True, exist_ok=True)
            return
        from botocore.exceptions import ClientError

        with s3_errors(uri):
            try:
                self.s3.head_bucket(Bucket=loc.bucket)
            except ClientError:
                self.s3.create_bucket(Bucket=loc.bucket)

    # -- helpers -------------------------------------------------------------------------------
    def _s3_exists(self, loc: Location) -> bool:
        from botocore.exceptions import ClientError

        with s3_errors(str(loc)):
            try:
                self.s3.head_object(Bucket=loc.bucket, Key=loc.key)
                return True
            except ClientError as e:
                if _error_code(e) in NOT_FOUND:
                    return False
                raise

    def _s3_get(self, loc: Location, uri: str) -> bytes | None:
        """The object's bytes, or None if there is no such object."""
        from botocore.exceptions import ClientError

        with s3_errors(uri):
            try:
                return self.s3.get_object(Bucket=loc.bucket, Key=loc.key)["Body"].read()
            except ClientError as e:
                if _error_code(e) in NOT_FOUND:
                    return None
                raise

    def _s3_objects(self, loc: Location) -> dict[str, int]:
        prefix = f"{loc.key}/" if loc.key else ""
        objects: dict[str, int] = {}
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=loc.bucket, Prefix=prefix):
            objects.update((o["Key"], int(o["Size"])) for o in page.get("Contents", []) if not o["Key"].endswith("/"))
        return objects

    def _guard(self, fn: Callable[[], Any], uri: str) -> Any:
        with s3_errors(uri):
            return fn()


def pyarrow_filesystem(uri: str, *, endpoint_url: str | None = None) -> tuple[Any, str]:
    """(pyarrow filesystem, path) for Ray Train's `RunConfig(storage_filesystem=..., storage_path=...)`."""
    loc = Location.parse(uri)
    if loc.scheme == "file":
        return None, loc.key
    from pyarrow import fs

    endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
    kwargs: dict[str, Any] = {}
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        kwargs.update(access_key=os.environ["AWS_ACCESS_KEY_ID"], secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY"))
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    return fs.S3FileSystem(**kwargs), f"{loc.bucket}/{loc.key}".rstrip("/")
