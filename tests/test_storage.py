"""`fjordtune.storage`: committed folders on a real S3 server (SeaweedFS on loopback) and on local disk.

Integration tier: uses the session's `s3_server` (tests/conftest.py). Each test writes under a
prefix of its own, so the tests do not depend on each other's objects or order.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import boto3
import pytest

from fjordtune.devstack import S3Server
from fjordtune.errors import InfraError, UserError
from fjordtune.storage import COMMITS, MANIFESTS, MARKER, Store

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
BUCKET = "fjordtune-tests"


def make_tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return root


def read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


FILES = {
    "config.json": b'{"a": 1}',
    "weights/shard-0.bin": os.urandom(3000),
    "weights/nested/deep.txt": "blåbær og fjord\n".encode(),
    "empty.txt": b"",
}


@pytest.fixture
def s3_prefix(s3_env: S3Server) -> str:
    """A fresh s3:// prefix in an existing bucket (so tests do not see each other's objects)."""
    Store().ensure_bucket(f"s3://{BUCKET}")
    return f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}"


@pytest.fixture(params=["s3", "local"])
def base_uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The same Store tests against s3:// and against a local folder."""
    if request.param == "s3":
        return request.getfixturevalue("s3_prefix")
    return str(tmp_path / "store")


def raw_client(server: S3Server, *, secret: str | None = None):
    return boto3.session.Session().client(
        "s3", endpoint_url=server.endpoint_url, aws_access_key_id=server.access_key,
        aws_secret_access_key=secret or server.secret_key, region_name="us-east-1",
    )


# -- round trips -------------------------------------------------------------------------------------

def test_upload_download_round_trip(base_uri: str, tmp_path: Path) -> None:
    store = Store()
    store.ensure_bucket(base_uri)
    src = make_tree(tmp_path / "src", FILES)
    uri = f"{base_uri}/model"
    assert not store.is_committed(uri)
    store.upload_dir(src, uri)
    assert store.is_committed(uri)
    out = store.download_dir(uri, tmp_path / "out")
    assert read_tree(out) == FILES


def test_local_view(base_uri: str, tmp_path: Path) -> None:
    store = Store()
    store.ensure_bucket(base_uri)
    uri = f"{base_uri}/adapter"
    store.upload_dir(make_tree(tmp_path / "src", FILES), uri)
    cache = tmp_path / "cache"
    view = store.local_view(uri, cache)
    got = read_tree(view)
    if uri.startswith("s3://"):
        assert got.pop(MARKER).decode() == store.commit_id(uri), "the node cache marks a complete copy with its commit"
    assert got == FILES
    if uri.startswith("s3://"):
        assert cache in view.parents, "an s3:// folder is viewed through the given cache root"
        assert store.local_view(uri, cache) == view, "the same commit is served from the cache"
    else:
        assert view == Path(uri) / COMMITS / store.commit_id(uri), "a local folder's live commit is its view (no copy)"


def test_write_and_read_bytes(base_uri: str) -> None:
    store = Store()
    store.ensure_bucket(base_uri)
    uri = f"{base_uri}/deep/er/results.json"
    payload = b'{"tasks": {}}\n' + os.urandom(100)
    store.write_bytes(uri, payload)
    assert store.read_bytes(uri) == payload
    store.write_bytes(uri, b"second")
    assert store.read_bytes(uri) == b"second"


def test_read_missing_object_is_user_error(base_uri: str) -> None:
    store = Store()
    store.ensure_bucket(base_uri)
    uri = f"{base_uri}/absent.json"
    with pytest.raises(UserError) as info:
        store.read_bytes(uri)
    assert uri in str(info.value)


def test_ensure_bucket_creates_and_is_idempotent(s3_env: S3Server, tmp_path: Path) -> None:
    name = f"fjt-{uuid.uuid4().hex[:10]}"
    store = Store()
    store.ensure_bucket(f"s3://{name}/some/prefix")
    store.ensure_bucket(f"s3://{name}/other")
    buckets = {b["Name"] for b in raw_client(s3_env).list_buckets()["Buckets"]}
    assert name in buckets
    local = tmp_path / "a" / "b"
    store.ensure_bucket(str(local))
    assert local.is_dir()


def test_model_folder_through_s3(s3_prefix: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    """A real saved model (safetensors, tokenizer) survives upload and a cached view byte for byte."""
    store = Store()
    uri = f"{s3_prefix}/base-model"
    store.upload_dir(tiny_model_dir, uri)
    view = store.local_view(uri, tmp_path / "cache")
    got = read_tree(view)
    got.pop(MARKER)  # the node cache's own "complete copy" marker
    assert got == read_tree(tiny_model_dir)
    assert "model.safetensors" in got and "config.json" in got


# -- interrupted uploads -----------------------------------------------------------------------------

def test_uncommitted_s3_folder_is_refused(s3_env: S3Server, s3_prefix: str, tmp_path: Path) -> None:
    uri = f"{s3_prefix}/half-written"
    key = uri[len(f"s3://{BUCKET}/") :]
    client = raw_client(s3_env)
    # what an interrupted upload leaves: data objects, no marker
    client.put_object(Bucket=BUCKET, Key=f"{key}/config.json", Body=b"{}")
    client.put_object(Bucket=BUCKET, Key=f"{key}/model.safetensors", Body=b"\0" * 64)
    store = Store()
    assert not store.is_committed(uri)
    with pytest.raises(UserError) as info:
        store.download_dir(uri, tmp_path / "out")
    assert uri in str(info.value)
    with pytest.raises(UserError) as info:
        store.local_view(uri, tmp_path / "cache")
    assert uri in str(info.value)
    assert not any((tmp_path / "cache").rglob("config.json")), "nothing of a partial folder is cached"


def test_uncommitted_local_folder_is_refused(tmp_path: Path) -> None:
    folder = make_tree(tmp_path / "half", {"config.json": b"{}"})
    store = Store()
    assert not store.is_committed(str(folder))
    for call in (lambda: store.download_dir(str(folder), tmp_path / "out"),
                 lambda: store.local_view(str(folder), tmp_path / "cache")):
        with pytest.raises(UserError) as info:
            call()
        assert str(folder) in str(info.value)


# -- fresh content after a rewrite under the same URI ------------------------------------------------

def test_reupload_gives_fresh_local_view(base_uri: str, tmp_path: Path) -> None:
    store = Store()
    store.ensure_bucket(base_uri)
    uri = f"{base_uri}/adapter"
    cache = tmp_path / "cache"
    store.upload_dir(make_tree(tmp_path / "v1", {"adapter.bin": b"version one", "cfg.json": b"{}"}), uri)
    first = store.local_view(uri, cache)
    assert (first / "adapter.bin").read_bytes() == b"version one"
    marker_1 = store.read_bytes(f"{uri}/{MARKER}")

    store.upload_dir(make_tree(tmp_path / "v2", {"adapter.bin": b"version two", "cfg.json": b"{}"}), uri)
    assert store.read_bytes(f"{uri}/{MARKER}") != marker_1, "a rewrite is a new commit"
    second = store.local_view(uri, cache)
    assert (second / "adapter.bin").read_bytes() == b"version two"


def test_reupload_leaves_no_files_of_the_previous_commit(base_uri: str, tmp_path: Path) -> None:
    """A folder rewritten under the same URI must read back as exactly the new folder: a leftover
    file of the old commit (an old shard, a stale index) would be mixed into the new model."""
    store = Store()
    store.ensure_bucket(base_uri)
    uri = f"{base_uri}/model"
    store.upload_dir(make_tree(tmp_path / "v1", {"a.txt": b"1", "old-shard.bin": b"old"}), uri)
    store.upload_dir(make_tree(tmp_path / "v2", {"a.txt": b"2"}), uri)
    got = read_tree(store.download_dir(uri, tmp_path / "out"))
    assert got == {"a.txt": b"2"}


# -- failures outside us -----------------------------------------------------------------------------

EVERY_STORE_CALL = r"""
import sys
from fjordtune.errors import FjordtuneError
from fjordtune.storage import Store
store = Store()
calls = {
    "is_committed": lambda: store.is_committed("s3://fjordtune-tests/x"),
    "read_bytes": lambda: store.read_bytes("s3://fjordtune-tests/x/y.json"),
    "write_bytes": lambda: store.write_bytes("s3://fjordtune-tests/x/y.json", b"1"),
    "ensure_bucket": lambda: store.ensure_bucket("s3://fjordtune-tests/x"),
    "upload_dir": lambda: store.upload_dir(sys.argv[1], "s3://fjordtune-tests/x"),
    "download_dir": lambda: store.download_dir("s3://fjordtune-tests/x", sys.argv[1] + "/out"),
    "local_view": lambda: store.local_view("s3://fjordtune-tests/x", sys.argv[1] + "/cache"),
}
for name, call in calls.items():
    try:
        call()
        print(name, "no error")
    except FjordtuneError as e:
        print(name, type(e).__name__, e.exit_code, str(e).replace("\n", "<newline>"))
    except Exception as e:
        print(name, type(e).__module__ + "." + type(e).__name__)
"""


def _every_store_call(env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """Run every `Store` call against s3://fjordtune-tests/x in a fresh process (boto3 caches credentials
    per process) with `env`: {call: "<error class> <exit code> <message>" or what else happened}."""
    src = make_tree(tmp_path / "src", {"a.txt": b"x"})
    res = subprocess.run([sys.executable, "-c", EVERY_STORE_CALL, str(src)], env={**env, "PYTHONPATH": str(REPO / "src")},
                         capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr
    results = dict(line.split(" ", 1) for line in res.stdout.splitlines())
    assert len(results) == 7, res.stdout
    return results


def test_wrong_credentials_raise_infra_error(s3_server: S3Server, tmp_path: Path) -> None:
    """A wrong secret key: every call is an InfraError naming the URI."""
    results = _every_store_call({**os.environ, **s3_server.env, "AWS_SECRET_ACCESS_KEY": "definitely-wrong"}, tmp_path)
    for name, outcome in results.items():
        assert outcome.startswith("InfraError"), f"{name}: {outcome}"
        assert "fjordtune-tests" in outcome, f"{name}: the message should name the URI: {outcome}"



def test_credentials_are_read_when_the_store_is_made(s3_env: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Store made after the environment changed must use the new keys, not ones an earlier Store
    in this process resolved (a second S3 server in one test session, rotated keys in a worker)."""
    Store().ensure_bucket(f"s3://{BUCKET}")  # resolves credentials with the right keys first
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "definitely-wrong")
    with pytest.raises(InfraError):
        Store().is_committed(f"s3://{BUCKET}/anything")


def test_unreachable_endpoint_is_infra_error(s3_env: S3Server) -> None:
    from fjordtune.devstack import free_port

    store = Store(endpoint_url=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(InfraError):
        store.write_bytes(f"s3://{BUCKET}/x", b"1")


def test_download_can_leave_out_weight_files(s3_prefix: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    """The eval driver only needs a model's tokenizer: it must not fetch the weights (238 GB at 119B)."""
    from fjordtune.model.load import load_tokenizer, local_tokenizer_dir

    store = Store()
    store.upload_dir(tiny_model_dir, f"{s3_prefix}/model")
    got = Path(local_tokenizer_dir(f"{s3_prefix}/model", store=store, dest=tmp_path / "tok"))
    assert not list(got.glob("*.safetensors")) and (got / "config.json").exists()
    assert load_tokenizer(str(got)).encode("Hei på deg") == load_tokenizer(str(tiny_model_dir)).encode("Hei på deg")
    assert local_tokenizer_dir(str(tiny_model_dir), store=store, dest=tmp_path / "x") == str(tiny_model_dir)


def test_missing_credentials_are_a_one_line_infra_error_that_says_what_to_check(tmp_path: Path) -> None:
    """No keys, no profile, no instance role: every call is a one-line InfraError (exit 3) naming the URI
    and the variables to check, never botocore's NoCredentialsError. Nothing is listening at the endpoint:
    the request is refused before it is sent."""
    from fjordtune.devstack import free_port

    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}", AWS_CONFIG_FILE=str(tmp_path / "absent"),
               AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "absent"), AWS_EC2_METADATA_DISABLED="true")
    results = _every_store_call(env, tmp_path)
    for name, outcome in results.items():
        assert outcome.startswith("InfraError 3 s3://fjordtune-tests/"), f"{name}: {outcome}"
        assert "no usable S3 credentials" in outcome and "AWS_ACCESS_KEY_ID" in outcome, f"{name}: {outcome}"
        assert "<newline>" not in outcome


def test_unreachable_endpoint_is_a_one_line_infra_error(s3_env: S3Server) -> None:
    from fjordtune.devstack import free_port

    store = Store(endpoint_url=f"http://127.0.0.1:{free_port()}")
    for call in (lambda: store.read_bytes(f"s3://{BUCKET}/x"), lambda: store.local_view(f"s3://{BUCKET}/x", "/nowhere")):
        with pytest.raises(InfraError) as info:
            call()
        assert str(info.value).startswith(f"s3://{BUCKET}/x") and "\n" not in str(info.value)
        assert info.value.exit_code == 3


# -- versioned commits -------------------------------------------------------------------------------

def test_commit_layout_pointer_manifest_and_checksums(base_uri: str, tmp_path: Path) -> None:
    """Files live under commits/<id>/, the manifest holds each file's size and checksum, and the pointer
    names the live commit: what readers follow."""
    import json

    import xxhash

    store = Store()
    store.ensure_bucket(base_uri)
    uri = f"{base_uri}/adapter"
    commit = store.upload_dir(make_tree(tmp_path / "v1", FILES), uri, meta={"step": 3})
    ptr = store.pointer(uri)
    assert ptr is not None and ptr.commit == commit and ptr.meta == {"step": 3} and ptr.previous is None
    assert ptr.files == len(FILES) and ptr.bytes == sum(len(v) for v in FILES.values())
    manifest = json.loads(store.read_bytes(f"{uri}/{MANIFESTS}/{commit}.json"))
    assert manifest["checksum"] == "xxh3_128"
    assert {rel: e["xxh3_128"] for rel, e in manifest["files"].items()} == {
        rel: xxhash.xxh3_128(data).hexdigest() for rel, data in FILES.items()}
    assert store.read_bytes(f"{uri}/{COMMITS}/{commit}/weights/shard-0.bin") == FILES["weights/shard-0.bin"]
    assert store.read_file(uri, "config.json") == FILES["config.json"]


def test_rewrite_keeps_the_previous_commit_readable(base_uri: str, tmp_path: Path) -> None:
    """A rewrite never deletes the commit a reader may be downloading: the previous one stays whole."""
    store = Store()
    store.ensure_bucket(base_uri)
    uri = f"{base_uri}/adapter"
    first = store.upload_dir(make_tree(tmp_path / "v1", {"a.bin": b"one"}), uri)
    second = store.upload_dir(make_tree(tmp_path / "v2", {"a.bin": b"two"}), uri)
    third = store.upload_dir(make_tree(tmp_path / "v3", {"a.bin": b"three"}), uri)
    status = {c.commit: c.status for c in store.commits(uri)}
    assert status == {first: "uncommitted", second: "previous", third: "live"}  # first: superseded, in its grace period
    out = tmp_path / "old"
    store.download_files(uri, ["a.bin"], out, commit=second)
    assert (out / "a.bin").read_bytes() == b"two"
    assert store.clean(uri, grace_s=0) == [first]
    assert {c.commit for c in store.commits(uri)} == {second, third}


def test_corrupted_object_fails_the_download_and_is_named(s3_env: S3Server, s3_prefix: str, tmp_path: Path) -> None:
    store = Store()
    uri = f"{s3_prefix}/adapter"
    commit = store.upload_dir(make_tree(tmp_path / "v1", FILES), uri)
    key = f"{uri[len(f's3://{BUCKET}/'):]}/{COMMITS}/{commit}/weights/shard-0.bin"
    bad = bytearray(FILES["weights/shard-0.bin"])
    bad[100] ^= 0xFF  # same size, one byte flipped
    raw_client(s3_env).put_object(Bucket=BUCKET, Key=key, Body=bytes(bad))
    with pytest.raises(InfraError) as info:
        store.download_dir(uri, tmp_path / "out")
    assert f"s3://{BUCKET}/{key}" in str(info.value) and "checksum" in str(info.value)
    with pytest.raises(InfraError):
        store.local_view(uri, tmp_path / "cache")
    assert not any((tmp_path / "cache").rglob(MARKER)), "a corrupted copy is never cached as complete"


def test_missing_bucket_is_an_error_and_is_not_created(s3_env: S3Server) -> None:
    store = Store()
    with pytest.raises(InfraError) as info:
        store.check_bucket("s3://fjt-typo-bukket/runs")
    assert "fjt-typo-bukket" in str(info.value) and "does not exist" in str(info.value)
    with pytest.raises(InfraError) as info:
        store.upload_dir(make_tree(Path(os.environ.get("TMPDIR", "/tmp")) / uuid.uuid4().hex, {"a": b"1"}),
                         "s3://fjt-typo-bukket/runs/x")
    assert "fjt-typo-bukket" in str(info.value)
    names = [b["Name"] for b in raw_client(s3_env).list_buckets().get("Buckets", [])]
    assert "fjt-typo-bukket" not in names


def test_retries_are_logged_and_bounded(s3_env: S3Server, caplog: pytest.LogCaptureFixture) -> None:
    """An endpoint that refuses connections: each retry is a log line, the error one line after
    `retries` attempts."""
    import logging
    import time

    from fjordtune.devstack import free_port

    store = Store(endpoint_url=f"http://127.0.0.1:{free_port()}", retries=3, timeout_s=2)
    caplog.set_level(logging.WARNING, logger="fjordtune.storage.store")
    start = time.monotonic()
    with pytest.raises(InfraError) as info:
        store.read_bytes(f"s3://{BUCKET}/x")
    assert time.monotonic() - start < 30
    retries = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert len(retries) == 2, retries  # attempts 1 and 2 failed and were retried; the 3rd gave up
    assert "cannot reach the S3 server" in str(info.value) and "3 attempts" in str(info.value)


def test_large_uploads_log_progress(base_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    caplog: pytest.LogCaptureFixture) -> None:
    """A 26 GB checkpoint must not upload in silence: progress lines while it moves, a summary at the end
    (thresholds lowered so a few MiB stand in for gigabytes)."""
    import logging

    from fjordtune.storage import store as store_module

    monkeypatch.setattr(store_module, "PROGRESS_MIN_BYTES", 1 << 20)
    monkeypatch.setattr(store_module, "PROGRESS_EVERY_S", 0.0)
    caplog.set_level(logging.INFO, logger="fjordtune.storage.store")
    store = Store(part_size_mib=5)
    store.ensure_bucket(base_uri)
    uri = f"{base_uri}/ckpt"
    store.upload_dir(make_tree(tmp_path / "big", {"a.bin": os.urandom(12 << 20)}), uri)
    moving = [m for m in caplog.messages if m.startswith("uploading ") and " of 12.0 MiB (" in m]
    assert moving, caplog.messages
    assert any(m.startswith("uploaded ") and "(12.0 MiB) in " in m for m in caplog.messages), caplog.messages
