"""`CheckpointWriter` in one process on a local store: background upload, commit on poll, staging
folders cleaned, and orphans of dead processes removed (unit tier, no server, no process group)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fjordtune.errors import InfraError
from fjordtune.storage import Store
from fjordtune.storage import checkpoints as ckpts
from fjordtune.train.checkpointing import STAGING_PREFIX, CheckpointWriter


class FakeCore:
    """Stands in for the trainer: writes what one rank's DCP save writes, and has RNG state."""

    def save_resumable(self, directory: str) -> None:
        Path(directory, "__0_0.distcp").write_bytes(b"x" * 4096)
        Path(directory, ".metadata").write_bytes(b"m")

    def rng_state(self) -> dict:
        return {"torch": None}


def test_upload_runs_in_the_background_and_commits_on_poll(tmp_path: Path) -> None:
    run = str(tmp_path / "runs" / "r")
    committed: list[int] = []
    staging = tmp_path / "staging"
    writer = CheckpointWriter(Store(), run, keep=2, on_commit=lambda step, meta: committed.append(step),
                              staging_dir=staging)
    writer.start(FakeCore(), step=5, epoch=0, metrics={"loss": 1.5, "per_rank": [1, 2]}, progress={"world_size": 1})
    assert not Store().is_committed(ckpts.step_uri(run, 5)), "nothing is committed before a poll"
    deadline = time.monotonic() + 30
    while (step := writer.poll()) is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert step == 5 and committed == [5]
    info = ckpts.latest(Store(), ckpts.checkpoints_uri(run))
    assert info.step == 5 and info.pointer.meta == {"step": 5, "epoch": 0, "loss": 1.5}
    files = Store().list_files(info.uri)
    assert {"__0_0.distcp", ".metadata", "progress.json", "rng-rank00000.pt"} <= set(files)
    assert json.loads(Store().read_file(info.uri, "progress.json")) == {"step": 5, "epoch": 0, "world_size": 1}
    assert list(staging.iterdir()) == [], "the staged shard is deleted once committed"
    assert writer.poll() is None and writer.wait() is None, "nothing in flight"


def test_a_second_start_waits_for_the_first_and_retention_keeps_the_last(tmp_path: Path) -> None:
    run = str(tmp_path / "r")
    writer = CheckpointWriter(Store(), run, keep=1)
    writer.start(FakeCore(), step=1, epoch=0, metrics={})
    writer.start(FakeCore(), step=2, epoch=0, metrics={})  # commits step 1 first
    assert [i.step for i in ckpts.list_checkpoints(Store(), ckpts.checkpoints_uri(run))] == [1]
    assert writer.wait() == 2
    assert [i.step for i in ckpts.list_checkpoints(Store(), ckpts.checkpoints_uri(run))] == [2]


class FailingStore(Store):
    def __init__(self, failures: int) -> None:
        super().__init__(retries=3)
        self.failures, self.tried = failures, []

    def upload_files(self, local, uri, commit, only=None):
        self.tried.append(commit)
        if len(self.tried) <= self.failures:
            raise InfraError(f"{uri}: connection refused (test)")
        return super().upload_files(local, uri, commit, only=only)


def test_a_failed_upload_is_retried_as_a_new_commit_then_gives_up_naming_the_resume_point(tmp_path: Path) -> None:
    run = str(tmp_path / "r")
    store = FailingStore(failures=1)
    writer = CheckpointWriter(store, run, keep=3, last_committed=0, sleep=lambda s: None)
    writer.start(FakeCore(), step=3, epoch=0, metrics={})
    assert writer.wait() == 3
    assert len(set(store.tried)) == 2 and store.commit_id(ckpts.step_uri(run, 3)) == store.tried[-1]

    store = FailingStore(failures=99)
    writer = CheckpointWriter(store, run, keep=3, last_committed=3, sleep=lambda s: None)
    writer.start(FakeCore(), step=6, epoch=0, metrics={})
    with pytest.raises(InfraError) as info:
        writer.wait()
    line = info.value.lines[0]
    assert "checkpoint at step 6 could not be saved" in line and "after 3 attempts" in line, line
    assert "the last committed checkpoint is step 3" in line, line
    assert ckpts.latest(Store(), ckpts.checkpoints_uri(run)).step == 3


def test_orphans_of_dead_processes_are_removed_live_ones_kept(tmp_path: Path) -> None:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    staging = tmp_path / "staging"
    dead = staging / f"{STAGING_PREFIX}{dead_pid}-abc"
    live = staging / f"{STAGING_PREFIX}1-def"  # pid 1 is alive (init, or this container's first process)
    other = staging / "something-else"
    for d in (dead, live, other):
        d.mkdir(parents=True)
    CheckpointWriter(Store(), str(tmp_path / "r"), keep=1, staging_dir=staging)
    assert not dead.exists() and live.exists() and other.exists()
