"""The node-local model cache (`fjordtune.storage.cache`): one download per node, nothing partial
trusted, a clear error when the disk is too small, and a clear one when S3 credentials are missing.

The integration tests use a SeaweedFS server of this module's own, started with its access log on
(`start_s3(access_log=True)`), so they count on the server side how often each object was really
fetched: one log line per request, `"<identity>" GET "/<bucket>/<key>" 200 ...`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from fjordtune.devstack import S3Server, start_s3
from fjordtune.errors import UserError
from fjordtune.storage import COMMITS, MANIFESTS, MARKER, POINTER, Location, Store, cache_root
from fjordtune.storage import store as store_module
from fjordtune.storage.cache import MIN_FREE_ENV

REPO = Path(__file__).resolve().parents[1]
BUCKET = "fjordtune-cache-tests"
integration = pytest.mark.integration
log = logging.getLogger(__name__)

ACCESS_LINE = re.compile(r'stats\.go:\d+\]? "[^"]*" (?P<method>[A-Z]+) "(?P<path>[^"]*)" (?P<code>\d{3}) ')


@pytest.fixture(scope="module")
def logged_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = start_s3(tmp_path_factory.mktemp("s3-logged"), access_log=True)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3(logged_s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """This module's server, exported into os.environ (and so into subprocesses) for one test."""
    for key, value in logged_s3.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv(MIN_FREE_ENV, raising=False)
    Store().ensure_bucket(f"s3://{BUCKET}")
    return logged_s3


def gets(server: S3Server) -> Counter[str]:
    """Successful GET requests (whole or ranged) the server has served so far, by path `/<bucket>/<key>`."""
    text = (Path(server.data_dir) / "weed.log").read_text(errors="replace")
    # 206: s3transfer fetches an object of known size with a ranged GET
    return Counter(m["path"] for m in ACCESS_LINE.finditer(text) if m["method"] == "GET" and m["code"] in ("200", "206"))


def read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def object_path(uri: str, rel: str) -> str:
    loc = Location.parse(uri)
    return f"/{loc.bucket}/{loc.key}/{rel}"


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO / "src")}


# -- where the cache lives ---------------------------------------------------------------------------

def test_cache_root_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    """`storage.cache_dir`, else $FJORDTUNE_CACHE, else ~/.cache/fjordtune: never /tmp."""
    monkeypatch.setenv("HOME", "/home/fjord")
    monkeypatch.delenv("FJORDTUNE_CACHE", raising=False)
    assert cache_root() == "/home/fjord/.cache/fjordtune"
    monkeypatch.setenv("FJORDTUNE_CACHE", "")
    assert cache_root() == "/home/fjord/.cache/fjordtune", "an empty variable means unset"
    monkeypatch.setenv("FJORDTUNE_CACHE", "/scratch/from-env")
    assert cache_root() == cache_root(None) == "/scratch/from-env"
    assert cache_root("~/nvme/models") == "/home/fjord/nvme/models", "the job's setting wins"


# -- one download per node ---------------------------------------------------------------------------

STARTER = r"""
import json, logging, sys, time
from pathlib import Path
from fjordtune.model.load import local_model_dir
from fjordtune.storage import Store, cache_root

role, uri, root, ready, go = sys.argv[1:6]
messages = []

class Keep(logging.Handler):
    def emit(self, record):
        messages.append(record.getMessage())

logging.getLogger("fjordtune").addHandler(Keep())
logging.getLogger("fjordtune").setLevel(logging.INFO)
store = Store()
store.s3  # build the client before the start line, so the three really start together
Path(ready).touch()
while not Path(go).exists():
    time.sleep(0.002)
# what a training rank (train/ray_driver.py) and an eval actor (eval/ray_lm.py) call
path = local_model_dir(uri, store=store, cache_root=cache_root(root))
print(json.dumps({"role": role, "path": path, "log": messages}))
"""


@integration
def test_two_ranks_and_an_eval_actor_download_once(s3: S3Server, tiny_model_dir: Path, tmp_path: Path) -> None:
    # the tiny model plus 48 shards of 512 KiB, so the one download lasts long enough for the others to wait
    src = tmp_path / "model"
    shutil.copytree(tiny_model_dir, src)
    for i in range(48):
        (src / "shards" / f"shard-{i:03d}.bin").parent.mkdir(exist_ok=True)
        (src / "shards" / f"shard-{i:03d}.bin").write_bytes(os.urandom(512 * 1024))
    uri = f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}/model"
    store = Store()
    store.upload_dir(src, uri)
    commit = store.commit_id(uri)
    root = tmp_path / "node-cache"

    before = gets(s3)
    roles = ["rank-0", "rank-1", "eval-actor"]
    procs = [
        subprocess.Popen([sys.executable, "-c", STARTER, role, uri, str(root), str(tmp_path / f"ready-{role}"),
                          str(tmp_path / "go")], env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
        for role in roles
    ]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready-{role}").exists() for role in roles):
        assert time.monotonic() < deadline, "the starters did not get ready"
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.01)
    (tmp_path / "go").touch()
    outcomes = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        outcomes.append(json.loads(out.strip().splitlines()[-1]))
    after = gets(s3)

    downloaded = [o["role"] for o in outcomes if any(m.startswith(f"downloading {uri} (") for m in o["log"])]
    waited = [o["role"] for o in outcomes if any(m.startswith("waiting for another process") for m in o["log"])]
    log.info("downloaded: %s; waited: %s", downloaded, waited)
    for o in outcomes:
        log.info("%s: %s", o["role"], " | ".join(o["log"]))
    assert len(downloaded) == 1, outcomes
    assert waited and downloaded[0] not in waited, f"the starts did not overlap: {outcomes}"

    entry = root / BUCKET / Location.parse(uri).key / commit
    assert {o["path"] for o in outcomes} == {str(entry)}, "all three use the same copy"
    got = read_tree(entry)
    assert got.pop(MARKER) == commit.encode()
    assert got == read_tree(src), "byte-identical to the uploaded folder"
    assert sorted(p.name for p in entry.parent.iterdir()) == [commit, f"{commit}.lock"], "no partial left"

    paths = {rel: object_path(uri, f"{COMMITS}/{commit}/{rel}") for rel in read_tree(src)}
    fetched = {rel: after[path] - before[path] for rel, path in paths.items()}
    assert fetched == dict.fromkeys(fetched, 1), f"each file is fetched once per node: {fetched}"
    pointer, manifest = object_path(uri, POINTER), object_path(uri, f"{MANIFESTS}/{commit}.json")
    # each starter reads the pointer once; only the downloader reads the manifest, once
    assert after[pointer] - before[pointer] == len(roles)
    assert after[manifest] - before[manifest] == 1
    log.info("GETs per file: %s; pointer reads: %d", set(fetched.values()), after[pointer] - before[pointer])


# -- a killed download -------------------------------------------------------------------------------

DOWNLOADER = r"""
import logging, sys
from fjordtune.storage import Store
logging.basicConfig(level=logging.INFO)
Store().local_view(sys.argv[1], sys.argv[2])
"""


def partial_bytes(folder: Path) -> int:
    total = 0
    for dirpath, _, names in os.walk(folder):
        for name in names:
            try:
                total += os.stat(os.path.join(dirpath, name)).st_size
            except FileNotFoundError:
                pass
    return total


@integration
def test_killed_download_is_never_trusted(s3: S3Server, tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "big"
    src.mkdir()
    for i in range(4):
        (src / f"model-{i:05d}-of-00004.safetensors").write_bytes(os.urandom(32 * 1024 * 1024))
    (src / "config.json").write_text('{"model_type": "mistral4"}')
    uri = f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}/big-model"
    store = Store()
    store.upload_dir(src, uri)
    commit = store.commit_id(uri)
    root = tmp_path / "node-cache"
    entry = root / BUCKET / Location.parse(uri).key / commit
    partial = entry.with_name(f"{commit}.partial")

    proc = subprocess.Popen([sys.executable, "-c", DOWNLOADER, uri, str(root)], env=child_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while partial_bytes(partial) < 2**20:  # inside a shard
        assert proc.poll() is None, f"the download ended before it could be killed: {proc.communicate()[1]}"
        assert time.monotonic() < deadline, "the download never started"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    left = partial_bytes(partial)
    log.info("killed the download with %d of %d bytes in %s", left, 4 * 32 * 1024 * 1024, partial)
    assert 0 < left < 4 * 32 * 1024 * 1024
    assert not entry.exists(), "a killed download leaves no complete entry"

    caplog.set_level(logging.INFO, logger="fjordtune")
    monkeypatch.setattr(store_module, "PROGRESS_EVERY_S", 0.05)
    view = Store().local_view(uri, root)
    assert view == entry
    assert any(f"removing {partial}, left by an interrupted download" in m for m in caplog.messages), caplog.messages
    got = read_tree(view)
    assert got.pop(MARKER) == commit.encode()
    assert got == read_tree(src)
    assert not partial.exists()
    line = re.compile(rf"downloading {re.escape(uri)}: [\d.]+ (B|KiB|MiB) of 128.0 MiB \(\d+%\)")
    progress = [m for m in caplog.messages if line.fullmatch(m)]
    assert progress, f"no progress lines: {caplog.messages}"


# -- too little disk ---------------------------------------------------------------------------------

@integration
def test_too_little_disk_is_a_clear_user_error(s3: S3Server, tiny_model_dir: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The real `shutil.disk_usage` check, moved by the reserve knob instead of filling the disk: asking
    to keep 1 GiB more free than the volume has refuses; asking for 1 GiB less than what is left after
    the download succeeds."""
    from fjordtune.model.load import local_model_dir

    uri = f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}/model"
    store = Store()
    store.upload_dir(tiny_model_dir, uri)
    needed = sum(p.stat().st_size for p in tiny_model_dir.rglob("*") if p.is_file())
    root = tmp_path / "node-cache"
    root.mkdir()

    before = gets(s3)
    monkeypatch.setenv(MIN_FREE_ENV, str(shutil.disk_usage(root).free + 2**30))
    with pytest.raises(UserError) as info:
        local_model_dir(uri, store=store, cache_root=cache_root(str(root)))
    message = str(info.value)
    log.info("%s", message)
    assert "\n" not in message
    folder = str(root / BUCKET / Location.parse(uri).key)
    assert f"in {folder}:" in message and f"needs {needed:,} bytes" in message
    assert re.search(r"has [\d,]+ bytes \([\d.]+ [KMGT]iB\) free", message)
    assert "storage.cache_dir" in message
    after = gets(s3)
    assert all(after[object_path(uri, p.name)] == before[object_path(uri, p.name)]
               for p in tiny_model_dir.iterdir() if p.is_file()), "nothing was fetched"
    assert not [p for p in Path(folder).iterdir() if not p.name.endswith(".lock")], "nothing was left behind"

    monkeypatch.setenv(MIN_FREE_ENV, str(shutil.disk_usage(root).free - needed - 2**30))
    got = Path(local_model_dir(uri, store=store, cache_root=cache_root(str(root))))
    assert (got / MARKER).is_file() and (got / "model.safetensors").stat().st_size > 0


# -- no credentials ----------------------------------------------------------------------------------

def test_preflight_without_credentials_says_so_in_one_line(tmp_path: Path) -> None:
    """With its model mirrored to S3, `jobs/norskmistral-119b.yaml` reads the model's config.json from
    there: without credentials that is exit 3 and one line saying what to set, not a botocore traceback."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_CONFIG_FILE=str(tmp_path / "absent-config"), AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "absent"),
               AWS_EC2_METADATA_DISABLED="true", PYTHONPATH=str(REPO / "src"))
    res = subprocess.run([sys.executable, "-m", "fjordtune", "preflight", "jobs/norskmistral-119b.yaml",
                          "--set", "model.path=s3://fjordtune-models/mistral-small-4-119b-2603"], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 3, res.stderr
    assert "Traceback" not in res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, res.stderr
    assert "s3://fjordtune-models/" in errors[0] and "no usable S3 credentials" in errors[0]
    assert "AWS_ACCESS_KEY_ID" in errors[0] and "AWS_PROFILE" in errors[0] and "instance role" in errors[0]


# --- hub ids: snapshot_download into <cache>/hub (no hub here: the cache is filled as the hub client does) --


def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_hub_id_is_read_from_the_node_cache(tmp_path: Path, tiny_model_dir: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:

    from fjordtune.model.load import load_causal_lm, local_model_dir

    _offline(monkeypatch)
    repo = tmp_path / "cache" / "hub" / "models--fjt--tiny-mistral4"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    shutil.copytree(tiny_model_dir, repo / "snapshots" / "0123abcd")
    got = local_model_dir("fjt/tiny-mistral4", store=Store(), cache_root=tmp_path / "cache")
    assert Path(got) == repo / "snapshots" / "0123abcd"
    assert load_causal_lm(got, dtype="float32") is not None


def test_unreachable_hub_id_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fjordtune.errors import UserError
    from fjordtune.model.load import local_model_dir

    _offline(monkeypatch)
    with pytest.raises(UserError, match="cannot download from the Hugging Face hub") as err:
        local_model_dir("mistralai/Mistral-Small-4-119B-2603", store=Store(), cache_root=tmp_path)
    assert len(err.value.lines) == 1 and "HF_TOKEN" in err.value.lines[0]
