"""Training survives losing a worker: a real run (`fjordtune train`, local Ray, 2 FSDP2 ranks over gloo,
checkpoints in SeaweedFS) has its worker processes SIGKILLed from outside, by PID, twice:

1. rank 1, mid-way between two checkpoints, after the first one committed;
2. rank 0, less than a second after the pointer of a newer checkpoint appeared in storage (the
   moment Ray Train's own bookkeeping used to lose: it resumed from the checkpoint before).

Ray Train restarts the worker group each time (`train.max_failures`); each restart resumes from the
newest committed checkpoint in storage, and the run ends with the final loss and adapter of an
uninterrupted run (within 1e-5). Nothing inside the training code knows about the kills.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fjordtune.storage import Store
from fjordtune.storage import checkpoints as ckpts

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
BUCKET = "fjt-kill"
STEPS = 60  # ~0.1 s a step on 2 CPU cores: wide enough windows for kills keyed on storage
EVERY = 15
TOL = 1e-5
STEP_LINE = re.compile(r"pid=(\d+).*\bstep (\d+)/(\d+) ")
RESUMED = re.compile(r"resumed from checkpoint step (\d+)")


class Run:
    """`fjordtune train` in a subprocess, its output collected line by line as it comes."""

    def __init__(self, name: str, tmp: Path, *extra: str) -> None:
        sets = [f"name={name}", f"storage.uri=s3://{BUCKET}/runs", f"train.max_steps={STEPS}",
                f"train.checkpoint_every_steps={EVERY}", "train.eval_every_steps=25", "train.num_checkpoints_to_keep=3",
                *extra]
        args = [sys.executable, "-m", "fjordtune", "train", str(REPO / "jobs" / "demo.yaml"), "--skip-preflight"]
        for s in sets:
            args += ["--set", s]
        env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "FJORDTUNE_CACHE": str(tmp / "cache"),
               "RAY_AUTH_MODE": "disabled"}
        env.pop("RAY_ADDRESS", None)
        self.run_uri = f"s3://{BUCKET}/runs/{name}"
        self.lines: list[str] = []
        self.proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def wait_line(self, pattern: re.Pattern[str], *, after: int = 0, timeout: float = 300) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines[after:]:
                if m := pattern.search(line):
                    return m
            if self.proc.poll() is not None and not self.reader.is_alive():
                break
            time.sleep(0.05)
        raise AssertionError(f"no line matching {pattern.pattern!r}; output:\n{self.text()[-4000:]}")

    def rank0_pid(self, after: int = 0) -> int:
        """Rank 0 alone logs the step lines; Ray prefixes each forwarded line with its process id."""
        self.wait_line(STEP_LINE, after=after)
        pids = [int(m[1]) for line in self.lines[after:] if (m := STEP_LINE.search(line))]
        assert pids, self.text()[-3000:]
        return pids[-1]

    def finish(self, timeout: float = 600) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.reader.join(timeout=30)
        return rc

    def text(self) -> str:
        return "".join(self.lines)


def train_workers() -> list[int]:
    """PIDs of live Ray Train worker processes on this machine (Ray names them `ray::RayTrainWorker...`)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if cmd.startswith("ray::RayTrainWorker"):
            pids.append(int(entry.name))
    return pids


def wait_committed(store: Store, run: Run, step: int, timeout: float = 300) -> None:
    """Poll storage (every 20 ms) until a checkpoint of `step` or later is committed."""
    deadline = time.monotonic() + timeout
    while latest_step(store, run.run_uri) < step:
        assert time.monotonic() < deadline and run.proc.poll() is None, run.text()[-4000:]
        time.sleep(0.02)


def latest_step(store: Store, run_uri: str) -> int:
    info = ckpts.latest(store, ckpts.checkpoints_uri(run_uri))
    return info.step if info else 0


def adapter(store: Store, run_uri: str, cache: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(store.local_view(f"{run_uri}/adapter", str(cache)) / "adapter_model.safetensors"))


@pytest.fixture
def kill_bucket(s3_env):
    Store().ensure_bucket(f"s3://{BUCKET}")
    return s3_env


def test_sigkilled_workers_resume_from_the_newest_committed_checkpoint(kill_bucket, tmp_path):
    store = Store()
    straight = Run("straight", tmp_path)
    assert straight.finish() == 0, straight.text()[-4000:]

    run = Run("killed", tmp_path)
    # 1. after the first checkpoint, mid-interval: SIGKILL rank 1 (a worker that is not rank 0)
    wait_committed(store, run, EVERY)
    time.sleep(0.5)
    rank0 = run.rank0_pid()
    others = [p for p in train_workers() if p != rank0]
    assert len(others) == 1, (rank0, train_workers())
    mark = len(run.lines)
    os.kill(others[0], signal.SIGKILL)
    first = int(run.wait_line(RESUMED, after=mark)[1])
    assert first >= EVERY and first % EVERY == 0

    # 2. the fast case: rank 0 dies within a second after a newer checkpoint's pointer appeared
    mark = len(run.lines)
    run.wait_line(STEP_LINE, after=mark)
    rank0 = run.rank0_pid(after=mark)
    target = (first // EVERY + 1) * EVERY
    wait_committed(store, run, target)
    seen = time.monotonic()
    os.kill(rank0, signal.SIGKILL)
    assert time.monotonic() - seen < 1.0
    newest = latest_step(store, run.run_uri)  # rank 0 flips pointers: nothing newer can appear now
    second = int(run.wait_line(RESUMED, after=mark)[1])
    assert second == newest >= target, (second, newest, target)

    assert run.finish() == 0, run.text()[-4000:]
    out = run.text()
    assert out.count("resumed from checkpoint step") == 2, out[-4000:]
    # the final loss and adapter equal the uninterrupted run's
    a = ckpts.latest(store, ckpts.checkpoints_uri(straight.run_uri)).pointer.meta
    b = ckpts.latest(store, ckpts.checkpoints_uri(run.run_uri)).pointer.meta
    assert a["step"] == b["step"] == STEPS
    assert abs(a["loss"] - b["loss"]) < TOL, (a, b)
    assert abs(a["eval_loss"] - b["eval_loss"]) < TOL, (a, b)
    wa, wb = adapter(store, straight.run_uri, tmp_path / "cache-a"), adapter(store, run.run_uri, tmp_path / "cache-b")
    assert wa.keys() == wb.keys()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < TOL
    # only complete checkpoints were ever used; retention kept the last 3 committed
    infos = ckpts.list_checkpoints(store, ckpts.checkpoints_uri(run.run_uri))
    assert [i.step for i in infos if i.committed][-1] == STEPS
    assert sum(i.committed for i in infos) <= 3, infos


def test_a_worker_lost_more_often_than_max_failures_ends_in_one_line(kill_bucket, tmp_path):
    """`train.max_failures: 0`: the first SIGKILL ends the run with exit 3 and one error line that names
    the limit and the checkpoint a rerun resumes from (not a Ray dump)."""
    store = Store()
    run = Run("fragile", tmp_path, "train.max_failures=0")
    wait_committed(store, run, EVERY)
    rank0 = run.rank0_pid()
    os.kill(rank0, signal.SIGKILL)
    newest = latest_step(store, run.run_uri)
    assert run.finish() == 3, run.text()[-4000:]
    errors = [line for line in run.lines if line.startswith("error:")]
    assert len(errors) == 1, run.text()[-4000:]
    (line,) = errors
    assert "train.max_failures" in line and "restarted 0 time(s)" in line, line
    named = re.search(r"checkpoint is step (\d+) \(", line)
    assert named and int(named[1]) == newest and "rerun the same job to resume from it" in line, (line, newest)
    assert "Traceback" not in line
