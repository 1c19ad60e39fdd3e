"""`ray job stop` on a running `fjordtune run`, then the same job submitted again (issue 9, must-show 3).

On the demo's own stack (`python -m fjordtune.devstack up`, as scripts/demo starts it): the demo job with
`eval.models=[]` and 40 steps, a checkpoint every 4, is stopped with `ray job stop` once a checkpoint is
committed. Then:

- the job is STOPPED, and no Ray Train worker, controller or driver of it is left, within 60 s of the stop
  request (measured here: about 3 s; Ray SIGKILLs the driver RAY_JOB_STOP_WAIT_TIME_S = 3 s after its
  SIGTERM), and its log says `stop requested` and, last, which checkpoint a rerun resumes from;
- every checkpoint `fjordtune checkpoints ls --json` calls committed is complete (downloaded and checked
  against its manifest), and an upload cut off mid-way (planted at step 37: what a worker killed while
  uploading leaves) is flagged UNCOMMITTED and is not what `checkpoints latest` names;
- the same job submitted again logs its resume from the committed step, not the planted one, trains to
  step 40 and SUCCEEDS, and `fjordtune submit` fetches its report.

Those three start the stack (integration); the last three need nothing running: SIGTERM under
`stop_on_sigterm` in this process, Ctrl-C while `fjordtune submit` follows a job, and a report that
cannot be fetched.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_pipeline_e2e import DEMO, ROOT, small

integration = pytest.mark.integration

BUCKET = "fjt-e2e"
NAME = "stopped"
RUN_URI = f"s3://{BUCKET}/runs/{NAME}"
OVERRIDES = small(NAME, "train.max_steps=40", "train.checkpoint_every_steps=4", "eval.models=[]")
PLANTED_STEP = 37  # past any step the first run reaches before the stop, before the last (40)
STOP_BOUND_S = 60
RAY = str(Path(sys.executable).with_name("ray"))


@dataclass(frozen=True)
class Stack:
    url: str
    env: dict[str, str]  # os.environ plus the stack's export lines, for subprocesses
    exports: dict[str, str]
    head_pgid: int  # the Ray head's process group: this stack's processes, not other Ray clusters'


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    state = tmp_path_factory.mktemp("stop") / "devstack"
    env_file = state.parent / "devstack.env"
    ray_temp_dir = tempfile.mkdtemp(prefix="r", dir="/tmp")  # unix socket paths must stay short
    devstack = [sys.executable, "-m", "fjordtune.devstack"]
    try:
        up = subprocess.run([*devstack, "up", "--state-dir", str(state), "--ray-temp-dir", ray_temp_dir,
                             "--bucket", BUCKET, "--env-file", str(env_file)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        exports = dict(re.findall(r"^export (\w+)=(.*)$", env_file.read_text(), flags=re.M))
        pgid = json.loads((state / "stack.json").read_text())["ray"]["pgid"]
        yield Stack(exports["RAY_API_SERVER_ADDRESS"], {**os.environ, **exports}, exports, pgid)
    finally:
        subprocess.run([*devstack, "down", "--state-dir", str(state)], cwd=ROOT, capture_output=True, timeout=180)
        shutil.rmtree(ray_temp_dir, ignore_errors=True)


def run(stack: Stack, *cmd: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), cwd=ROOT, env=stack.env, capture_output=True, text=True, timeout=timeout)


def fjordtune(stack: Stack, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return run(stack, sys.executable, "-m", "fjordtune", *args, timeout=timeout)


def submit(stack: Stack, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    sets = [a for o in OVERRIDES for a in ("--set", o)]
    return fjordtune(stack, "submit", str(DEMO), "--skip-preflight", *sets, *args, timeout=timeout)


@pytest.fixture(scope="module")
def store(stack: Stack) -> Iterator[object]:
    """A `Store` of the stack's S3, reading its keys from this process's environment as every command does."""
    from fjordtune.storage import Store

    with pytest.MonkeyPatch.context() as mp:
        for key, value in stack.exports.items():
            if key.startswith("AWS_"):
                mp.setenv(key, value)
        yield Store()


def train_processes(pgid: int) -> list[str]:
    """Ray Train workers and controllers and `fjordtune run` drivers among the processes of the Ray head's
    group and below it (a zombie holds nothing and counts as gone)."""
    import psutil

    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid:
                found.update({p.pid: p for p in [proc, *proc.children(recursive=True)]})
        except (psutil.Error, OSError):
            continue
    out = []
    for proc in found.values():
        try:
            line = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        if any(key in line for key in ("RayTrainWorker", "TrainController", "fjordtune run")):
            out.append(f"{proc.pid} {line[:100]}")
    return out


@dataclass(frozen=True)
class Stopped:
    sub_id: str
    stop: subprocess.CompletedProcess[str]
    stopped_s: float  # from the start of `ray job stop` to its return (it waits for a terminal status)
    gone_s: float | None  # from the start of `ray job stop` until no worker, controller or driver is left
    left: list[str]
    logs: str
    committed_before: int  # the step seen committed before the stop


@pytest.fixture(scope="module")
def stopped(stack: Stack, store) -> Stopped:
    from fjordtune.storage import checkpoints as ckpts

    proc = submit(stack, "--no-wait", timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sub_id = re.search(r"^submitted (\S+) to ", proc.stdout, flags=re.M).group(1)
    deadline = time.monotonic() + 300
    while (last := ckpts.latest(store, ckpts.checkpoints_uri(RUN_URI))) is None:
        assert time.monotonic() < deadline, "no checkpoint committed within 300 s"
        time.sleep(0.5)
    assert train_processes(stack.head_pgid), "no Ray Train process found where the test looks"

    t0 = time.monotonic()
    stop = run(stack, RAY, "job", "stop", sub_id, "--address", stack.url)
    stopped_s = time.monotonic() - t0
    gone_s, left = None, []
    while time.monotonic() - t0 < STOP_BOUND_S:
        left = train_processes(stack.head_pgid)
        if not left:
            gone_s = time.monotonic() - t0
            break
        time.sleep(0.2)
    logs = run(stack, RAY, "job", "logs", sub_id, "--address", stack.url).stdout
    print(f"ray job stop returned after {stopped_s:.1f} s; Ray Train processes gone after {gone_s} s")
    return Stopped(sub_id, stop, stopped_s, gone_s, left, logs, last.step)


@integration
def test_ray_job_stop_ends_the_job_and_its_workers_within_a_minute(stopped: Stopped, stack: Stack) -> None:
    assert stopped.stop.returncode == 0, stopped.stop.stdout[-2000:] + stopped.stop.stderr[-2000:]
    assert stopped.stopped_s < STOP_BOUND_S
    status = run(stack, RAY, "job", "status", stopped.sub_id, "--address", stack.url)
    assert f"Job '{stopped.sub_id}' was stopped" in status.stdout + status.stderr
    assert stopped.gone_s is not None, f"left after {STOP_BOUND_S} s: {stopped.left}"

    # the driver said what it did, and last where a rerun resumes
    assert "stop requested (SIGTERM): aborting the training workers" in stopped.logs, stopped.logs[-3000:]
    found = [line for line in stopped.logs.splitlines() if line.startswith("stopped (SIGTERM) on request: ")]
    assert found, stopped.logs[-3000:]
    step = int(re.search(r"the last committed checkpoint is step (\d+)", found[-1]).group(1))
    assert step >= stopped.committed_before
    assert "rerun the same job to resume from it" in found[-1]
    assert "Traceback" not in stopped.logs


@pytest.fixture(scope="module")
def planted(stopped: Stopped, store, tmp_path_factory: pytest.TempPathFactory) -> str:
    """What a worker killed mid-upload leaves: one shard uploaded into a commit that was never committed."""
    from fjordtune.storage import checkpoints as ckpts
    from fjordtune.storage.store import new_commit_id

    shard = tmp_path_factory.mktemp("leftover")
    (shard / "__0_0.distcp").write_bytes(os.urandom(4096))
    uri = ckpts.step_uri(RUN_URI, PLANTED_STEP)
    store.upload_files(shard, uri, new_commit_id())
    return uri


@integration
def test_only_complete_checkpoints_count_as_committed_and_a_cut_off_upload_is_flagged(
        stopped: Stopped, planted: str, stack: Stack, store, tmp_path: Path) -> None:
    ls = fjordtune(stack, "checkpoints", "ls", RUN_URI, "--json")
    assert ls.returncode == 0, ls.stderr[-2000:]
    infos = json.loads(ls.stdout)
    committed = [i for i in infos if i["committed"]]
    assert committed and all(i["step"] < PLANTED_STEP for i in committed)
    for info in committed:  # complete: every file of the commit is there and matches the manifest
        store.download_dir(info["uri"], tmp_path / str(info["step"]))
    cut_off = [i for i in infos if i["uri"] == planted]
    assert len(cut_off) == 1 and not cut_off[0]["committed"] and cut_off[0]["commit"] is None
    assert cut_off[0]["leftovers"] and cut_off[0]["leftovers"][0]["bytes"] == 4096

    table = fjordtune(stack, "checkpoints", "ls", RUN_URI).stdout
    row = next(line for line in table.splitlines() if line.split()[:1] == [str(PLANTED_STEP)])
    assert "UNCOMMITTED" in row
    assert "not used for resume" in table
    latest = fjordtune(stack, "checkpoints", "latest", RUN_URI).stdout.strip()
    assert latest == committed[-1]["uri"] != planted


@integration
def test_the_same_job_resubmitted_resumes_from_the_committed_step_and_succeeds(
        stopped: Stopped, planted: str, stack: Stack, tmp_path: Path) -> None:
    resume_from = int(re.findall(r"the last committed checkpoint is step (\d+)", stopped.logs)[-1])
    t0 = time.monotonic()
    proc = submit(stack, "--fetch-dir", str(tmp_path / "fetched"))
    print(f"resubmitted run: {time.monotonic() - t0:.0f} s")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert re.search(rf"resumed from checkpoint step {resume_from} \(", out), out[-4000:]
    assert f"resumed from checkpoint step {PLANTED_STEP}" not in out
    assert "step 40/40" in out and "SUCCEEDED" in out
    assert f"step {resume_from}/40 " not in out  # trained on from the checkpoint, not again
    assert (tmp_path / "fetched" / "report.md").is_file()

    final = json.loads(fjordtune(stack, "checkpoints", "ls", RUN_URI, "--json").stdout)
    assert [i["step"] for i in final if i["committed"]][-1] == 40
    assert [i["committed"] for i in final if i["uri"] == planted] == [False]


# -- without a stack -----------------------------------------------------------------------------------

def test_sigterm_is_one_line_then_stop_requested_naming_the_resume_point(tmp_path: Path, capsys,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from fjordtune import stopping
    from fjordtune.storage import Store

    monkeypatch.setattr(stopping._State, "requested", None)  # what `stop_was_requested` says after this test
    with pytest.raises(stopping.StopRequested) as stop:
        with stopping.stop_on_sigterm(run_uri=str(tmp_path / "run"), store=Store()):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)
    assert stop.value.exit_code == 143 and stopping.stop_was_requested()
    assert stop.value.line == ("stopped (SIGTERM) on request: no checkpoint of this run is committed yet: a rerun "
                               "starts from step 0")
    assert capsys.readouterr().out == "stop requested (SIGTERM): stopping\n"
    assert signal.getsignal(signal.SIGTERM) is not stopping._handler  # the previous handler is back


def test_ctrl_c_while_following_leaves_the_job_running_and_prints_the_stop_command(
        capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    from fjordtune import submit as submitting

    class Client:
        stopped: list[str] = []

        def submit_job(self, **_: object) -> str:
            return "raysubmit_x"

        def get_job_status(self, sub_id: str) -> str:
            raise KeyboardInterrupt

        def stop_job(self, sub_id: str) -> None:
            self.stopped.append(sub_id)

    client = Client()
    monkeypatch.setattr(submitting, "connect", lambda url: client)
    url = "http://127.0.0.1:1"
    assert submitting.submit(str(DEMO), overrides=OVERRIDES, address=url, skip_preflight=True) == 130
    out = capsys.readouterr().out
    assert not client.stopped
    assert f"job raysubmit_x keeps running on {url}" in out
    assert f"  stop it:   ray job stop raysubmit_x --address {url}\n" in out


def test_a_report_storage_will_not_give_is_one_line_and_not_a_failure(tmp_path: Path, capsys) -> None:
    from fjordtune.config import load_job
    from fjordtune.devstack import free_port
    from fjordtune.submit import fetch_report

    job = load_job(DEMO, [*OVERRIDES, f"storage.endpoint_url=http://127.0.0.1:{free_port()}", "storage.retries=1",
                          "storage.timeout_s=2"])
    assert fetch_report(job, tmp_path / "fetched") is None
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1, out
    assert out[0].startswith(f"report: {RUN_URI}/report/ could not be fetched from here (")
    assert out[0].endswith("; the job succeeded and the report stays in storage")
    assert not (tmp_path / "fetched").exists()
