"""Folders in object storage (s3://) or on a local disk, committed atomically.

A folder counts as present only once its `_COMMITTED` marker exists; the marker is written last, so
a reader (a resume, an eval worker) never picks up a half-uploaded model or adapter.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fjordtune.errors import InfraError, UserError

log = logging.getLogger(__name__)

MARKER = "_COMMITTED"


def cache_root() -> str:
    """Where a node keeps downloaded models and adapters (FJORDTUNE_CACHE, default under /tmp)."""
    import tempfile

    return os.environ.get("FJORDTUNE_CACHE", os.path.join(tempfile.gettempdir(), "fjordtune-cache"))


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
        for key in self._guard(lambda: self._s3_keys(loc), uri):
            if key not in wanted:  # leftovers of a previous commit must not mix into this one
                self._guard(lambda key=key: self.s3.delete_object(Bucket=loc.bucket, Key=key), uri)
        for f in files:
            key = loc.child(f.relative_to(local_dir).as_posix()).key
            self._guard(lambda f=f, key=key: self.s3.upload_file(str(f), loc.bucket, key), uri)
        commit = uuid.uuid4().hex.encode()
        self._guard(lambda: self.s3.put_object(Bucket=loc.bucket, Key=loc.child(MARKER).key, Body=commit), uri)
        log.info("uploaded %d files to %s", len(files), uri)

    def download_dir(self, uri: str, local_dir: str | Path, *, exclude: tuple[str, ...] = ()) -> Path:
        """Copy a committed folder to `local_dir`; refuse an uncommitted (possibly partial) one.
        Files whose relative path matches a glob in `exclude` are left out (s3:// only)."""
        local_dir = Path(local_dir)
        if not self.is_committed(uri):
            raise UserError(f"{uri}: not found, or not completely written (no {MARKER} marker)")
        loc = Location.parse(uri)
        local_dir.mkdir(parents=True, exist_ok=True)
        if loc.scheme == "file":
            shutil.copytree(loc.key, local_dir, dirs_exist_ok=True)
            return local_dir
        for key in self._guard(lambda: self._s3_keys(loc), uri):
            rel = key[len(loc.key) + 1 :] if loc.key else key
            if any(fnmatch.fnmatch(rel, pat) for pat in exclude):
                continue
            target = local_dir / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            self._guard(lambda key=key, target=target: self.s3.download_file(loc.bucket, key, str(target)), uri)
        return local_dir

    def local_view(self, uri: str, cache_root: str | Path) -> Path:
        """A local path holding the committed folder `uri`: itself when local, else a cached download."""
        loc = Location.parse(uri)
        if loc.scheme == "file":
            if not self.is_committed(uri):
                raise UserError(f"{uri}: not found, or not completely written (no {MARKER} marker)")
            return Path(loc.key)
        # keyed by the commit id in the marker: a folder rewritten under the same URI is fetched anew
        if not self.is_committed(uri):
            raise UserError(f"{uri}: not found, or not completely written (no {MARKER} marker)")
        commit = self.read_bytes(str(loc.child(MARKER))).decode() or "none"
        target = Path(cache_root) / loc.bucket / loc.key / commit
        if not (target / MARKER).exists():
            tmp = target.with_name(target.name + f".partial-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            self.download_dir(uri, tmp)  # includes the marker, so `target` only ever appears whole
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(tmp, target)
            except OSError:  # another process on this node won the race
                shutil.rmtree(tmp, ignore_errors=True)
        return target

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
        from botocore.exceptions import ClientError

        try:
            return self.s3.get_object(Bucket=loc.bucket, Key=loc.key)["Body"].read()
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise UserError(f"{uri}: no such object") from None
            raise InfraError(f"{uri}: {e}") from None

    def ensure_bucket(self, uri: str) -> None:
        """Create the bucket of an s3:// URI if it does not exist (used by the demo and tests)."""
        loc = Location.parse(uri)
        if loc.scheme != "s3":
            Path(loc.key).mkdir(parents=True, exist_ok=True)
            return
        from botocore.exceptions import ClientError

        try:
            self.s3.head_bucket(Bucket=loc.bucket)
        except ClientError:
            self._guard(lambda: self.s3.create_bucket(Bucket=loc.bucket), uri)

    # -- helpers -------------------------------------------------------------------------------
    def _s3_exists(self, loc: Location) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.s3.head_object(Bucket=loc.bucket, Key=loc.key)
            return True
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise InfraError(f"{loc}: {e}") from None

    def _s3_keys(self, loc: Location) -> list[str]:
        prefix = f"{loc.key}/" if loc.key else ""
        keys = []
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=loc.bucket, Prefix=prefix):
            keys.extend(o["Key"] for o in page.get("Contents", []))
        return [k for k in keys if not k.endswith("/")]

    def _guard(self, fn, uri: str) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn()
        except (BotoCoreError, ClientError) as e:
            raise InfraError(f"{uri}: storage error: {e}") from None


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
