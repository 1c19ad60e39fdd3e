"""What a crashed S3 server does to commits, and the `fjordtune checkpoints` CLI, on a real SeaweedFS.

The server is SIGKILLed at a known moment (after the first part of an upload was served, read from its
access log) and restarted on the same ports and data, while fjordtune keeps talking to it:
- an interrupted commit is never listed as committed nor used for resume;
- the previous commit stays readable and intact (checksums verified);
- the next save succeeds; retention then deletes the leftovers;
- a training run rides out a server restart by retrying, and goes on to the end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from s3_faults import FaultyS3

from fjordtune.errors import InfraError
from fjordtune.storage import Store
from fjordtune.storage import checkpoints as ckpts

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
BUCKET = "fjt-faults"


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    s3 = FaultyS3.start(tmp_path / "s3")
    for k, v in s3.env.items():
        monkeypatch.setenv(k, v)
    Store().ensure_bucket(f"s3://{BUCKET}")
    try:
        yield s3
    finally:
        s3.stop()


def fast_store() -> Store:
    """Small parts (many requests: a kill lands mid-upload) and quick give-up against a dead server."""
    return Store(part_size_mib=5, max_concurrency=2, retries=2, timeout_s=3)


def write_files(folder: Path, sizes: dict[str, int], seed: int) -> Path:
    import random

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name, size in sizes.items():
        (folder / name).write_bytes(rng.randbytes(size))
    return folder


def read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def kill_during(server: FaultyS3, upload, *, first_put: str, prefix: str | None = None) -> BaseException | None:
    """Run `upload()` in a thread; SIGKILL the server once the first PUT matching `first_put` was
    served (and, with `prefix`, once an object under that key prefix is listed: a PUT in the access
    log is not yet a stored object); return what the upload raised (None if it finished)."""
    before = server.requests(first_put)
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            upload()
            outcome.append(None)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            outcome.append(e)

    t = threading.Thread(target=run)
    t.start()
    server.wait_for(first_put, count=before + 1, timeout=60)
    if prefix is not None:
        lister = fast_store().s3
        deadline = time.monotonic() + 60
        while not lister.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("KeyCount"):
            assert time.monotonic() < deadline, f"nothing under {prefix} within 60 s"
            time.sleep(0.005)
    server.kill()
    t.join(timeout=120)
    assert not t.is_alive(), "the upload never gave up on a dead server"
    return outcome[0]


def test_killed_adapter_reupload_leaves_the_previous_adapter_intact(server: FaultyS3, tmp_path: Path) -> None:
    store = fast_store()
    uri = f"s3://{BUCKET}/runs/demo/adapter"
    v1 = write_files(tmp_path / "v1", {"adapter_model.safetensors": 3 << 20, "adapter_config.json": 200}, seed=1)
    first = store.upload_dir(v1, uri)
    v2 = write_files(tmp_path / "v2", {"adapter_model.safetensors": 40 << 20, "adapter_config.json": 300}, seed=2)

    error = kill_during(server, lambda: store.upload_dir(v2, uri), first_put=r'PUT "/fjt-faults/runs/demo/adapter/commits/')
    assert isinstance(error, InfraError), error
    assert "\n" not in str(error) and server.endpoint_url in str(error), str(error)
    server.restart()

    store = fast_store()
    assert store.commit_id(uri) == first, "the interrupted commit never became live"
    assert read_tree(store.download_dir(uri, tmp_path / "after-kill")) == read_tree(v1), "previous adapter intact"
    status = {c.commit: c.status for c in store.commits(uri)}
    assert status[first] == "live" and sorted(status.values()) == ["live", "uncommitted"], status

    third = store.upload_dir(v2, uri)  # the next save succeeds
    assert store.commit_id(uri) == third
    assert read_tree(store.download_dir(uri, tmp_path / "v2-back")) == read_tree(v2)
    leftover = [c for c, s in status.items() if s == "uncommitted"]
    assert store.clean(uri, grace_s=0) == leftover, "retention deletes the interrupted commit"
    assert {c.commit: c.status for c in store.commits(uri)} == {first: "previous", third: "live"}


class BytesCore:
    """Stands in for the trainer in `save_checkpoint`: writes what a DCP save of one rank writes."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed = size, seed

    def save_resumable(self, directory: str) -> None:
        write_files(Path(directory), {"__0_0.distcp": self.size, ".metadata": 1000}, seed=self.seed)


def test_killed_checkpoint_upload_is_never_used_for_resume(server: FaultyS3, tmp_path: Path) -> None:
    from fjordtune.train.checkpointing import find_resume_point, save_checkpoint

    run = f"s3://{BUCKET}/runs/ckpt"
    store = fast_store()
    no_wait = lambda s: None  # noqa: E731 - commit-level backoff is not what this test measures
    save_checkpoint(BytesCore(2 << 20, 1), store, run, step=1, epoch=0, metrics={"loss": 2.0}, keep=3, sleep=no_wait)

    save = lambda: save_checkpoint(BytesCore(40 << 20, 2), store, run, step=2, epoch=0,  # noqa: E731
                                   metrics={"loss": 1.5}, keep=3, sleep=no_wait)
    error = kill_during(server, save, first_put=r'PUT "/fjt-faults/runs/ckpt/checkpoints/step-00000002/commits/',
                        prefix="runs/ckpt/checkpoints/step-00000002/commits/")
    # the server stays dead through every retry: the run would stop with this one line
    assert isinstance(error, InfraError), error
    msg = str(error)
    assert "checkpoint at step 2 could not be saved" in msg and "after 2 attempts" in msg, msg
    server.restart()

    store = fast_store()
    folder = ckpts.checkpoints_uri(run)
    infos = {i.step: i for i in ckpts.list_checkpoints(store, folder)}
    assert infos[1].committed and not infos[2].committed, infos
    assert ckpts.latest(store, folder).step == 1
    assert find_resume_point(store, run).step == 1, "resume never picks the interrupted commit"
    ls = cli("checkpoints", "ls", run)
    assert ls.returncode == 0, ls.stderr
    assert "UNCOMMITTED" in ls.stdout and "step-00000002" in ls.stdout, ls.stdout

    # the run saves step 2 again: it succeeds and the interrupted attempt's commits are deleted with it
    save_checkpoint(BytesCore(4 << 20, 3), store, run, step=2, epoch=0, metrics={"loss": 1.5}, keep=3, sleep=no_wait)
    after = {i.step: i for i in ckpts.list_checkpoints(store, folder)}
    assert after[2].committed and ckpts.latest(store, folder).step == 2
    got = store.download_dir(after[2].uri, tmp_path / "step2")
    assert (got / "__0_0.distcp").stat().st_size == 4 << 20
    assert after[2].leftovers and all(c.status == "uncommitted" for c in after[2].leftovers), after[2].commits
    ckpts.prune(store, folder, keep=3, grace_s=0)  # retention: the killed attempt's files go
    assert [(i.step, i.leftovers) for i in ckpts.list_checkpoints(store, folder)] == [(1, []), (2, [])]
    assert (store.download_dir(infos[1].uri, tmp_path / "step1") / "__0_0.distcp").stat().st_size == 2 << 20


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fjordtune", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {}), "PYTHONPATH": str(REPO / "src")})


def test_prune_keeps_exactly_the_last_k_and_download_names_a_corrupted_object(server: FaultyS3, tmp_path: Path) -> None:
    """`prune --keep K` keeps exactly the last K committed checkpoints (and cleans old leftovers);
    `download` verifies every checksum and fails naming the corrupted object."""
    from fjordtune.train.checkpointing import save_checkpoint

    run = f"s3://{BUCKET}/runs/prune"
    store = Store()
    for step in (2, 4, 6, 8, 10):
        save_checkpoint(BytesCore(64 << 10, step), store, run, step=step, epoch=0, metrics={"loss": 1.0 / step}, keep=10)
    # an upload that died before its pointer: files, no pointer
    dead = write_files(tmp_path / "dead", {"__0_0.distcp": 1000}, seed=9)
    store.upload_files(dead, ckpts.step_uri(run, 12), "20200101T000000Z-deadbeef")

    ls = cli("checkpoints", "ls", run, "--json")
    assert ls.returncode == 0, ls.stderr
    listed = json.loads(ls.stdout)
    assert [(c["step"], c["committed"]) for c in listed] == [(2, True), (4, True), (6, True), (8, True), (10, True),
                                                            (12, False)]
    assert all(c["commit"] and c["bytes"] > 0 for c in listed if c["committed"])

    res = cli("checkpoints", "prune", run, "--keep", "2", "--grace-s", "0")
    assert res.returncode == 0, res.stderr
    infos = ckpts.list_checkpoints(store, ckpts.checkpoints_uri(run))
    assert [i.step for i in infos] == [8, 10] and all(i.committed for i in infos), res.stdout
    assert "kept 2 committed: steps 8, 10" in res.stdout
    latest = cli("checkpoints", "latest", run)
    assert latest.stdout.strip() == ckpts.step_uri(run, 10)

    good = cli("checkpoints", "download", run, str(tmp_path / "good"), "--step", "8")
    assert good.returncode == 0 and "checksums verified" in good.stdout, good.stderr
    assert (tmp_path / "good" / "__0_0.distcp").stat().st_size == 64 << 10

    # flip one byte of step 10's shard in the bucket, same size: only the checksum can tell
    commit = store.commit_id(ckpts.step_uri(run, 10))
    key = f"runs/prune/checkpoints/step-00000010/commits/{commit}/__0_0.distcp"
    body = bytearray(store.s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    body[7] ^= 0x01
    store.s3.put_object(Bucket=BUCKET, Key=key, Body=bytes(body))
    bad = cli("checkpoints", "download", run, str(tmp_path / "bad"))
    assert bad.returncode == 3, bad.stdout + bad.stderr
    errors = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"s3://{BUCKET}/{key}" in errors[0] and "checksum" in errors[0], bad.stderr
    assert "Traceback" not in bad.stderr


def test_training_rides_out_a_server_restart(server: FaultyS3, tmp_path: Path) -> None:
    """SIGKILL the server while a real run (2 ranks, FSDP2 over gloo) uploads its step-2 checkpoint,
    restart it a few seconds later: the run retries (logged), finishes every step, and only complete
    checkpoints are listed; the adapter is committed."""
    demo = REPO / "jobs" / "demo.yaml"
    run_name = "restart"
    sets = [f"name={run_name}", f"storage.uri=s3://{BUCKET}/runs", "train.max_steps=4", "train.checkpoint_every_steps=1",
            "train.num_checkpoints_to_keep=5", "storage.timeout_s=5", "eval.num_workers=1",
            # 6 commit attempts back off ~2+4+8+16+32 s (jittered down to half): at least 31 s for the
            # server to come back. With 4 (7 s at least) a restart that was slow under CI load outlasted them
            "storage.retries=6"]
    args = [sys.executable, "-m", "fjordtune", "train", str(demo), "--skip-preflight"]
    for s in sets:
        args += ["--set", s]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "FJORDTUNE_CACHE": str(tmp_path / "cache"),
           "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    log_path = tmp_path / "train.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        try:
            step2 = rf'PUT "/fjt-faults/runs/{run_name}/checkpoints/step-00000002/commits/'
            server.wait_for(step2, timeout=600)
            pointer_puts = server.requests(rf'PUT "/fjt-faults/runs/{run_name}/checkpoints/step-00000002/_COMMITTED')
            server.kill()
            down = time.monotonic()
            time.sleep(3)
            server.restart()
            down = time.monotonic() - down
            rc = proc.wait(timeout=600)
        finally:
            if proc.poll() is None:
                proc.kill()
    out = log_path.read_text()
    assert rc == 0, f"the server was down {down:.1f} s\n" + out[-4000:]
    assert "retrying" in out, "the retry is in the log"
    store = Store()
    infos = ckpts.list_checkpoints(store, ckpts.checkpoints_uri(f"s3://{BUCKET}/runs/{run_name}"))
    assert [i.step for i in infos if i.committed] == [1, 2, 3, 4], infos
    assert store.is_committed(f"s3://{BUCKET}/runs/{run_name}/adapter")
    # the kill struck before step 2's pointer was written (else this test proved nothing about mid-upload)
    assert pointer_puts == 0
