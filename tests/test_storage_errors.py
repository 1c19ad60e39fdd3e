"""Storage failures as users meet them: one `error:` line, exit 3, nothing written, no hang.

(a) Wrong credentials, no credentials at all, a bucket that does not exist and an endpoint nobody
listens on, for `checkpoints ls`, `eval`, `train` and `preflight`, each run as users run it (a
`python -m fjordtune` subprocess in the repository root). Every run must end with exactly one
`error:` line naming the endpoint or the bucket and saying what to check, exit 3, no traceback, no
Ray started, and not one object or bucket written to the session's S3 server.

(b) A frozen S3 server (SIGSTOP: the kernel still accepts connections, nothing is ever answered) in
the middle of `fjordtune train`: the log says so within one request's give-up time, and the run ends
with exit 3 and one line that says what happened and which checkpoint a rerun resumes from, within a
bound derived from the storage settings (see `test_frozen_server_during_training_...`).

Integration tier: SeaweedFS (the session's `s3_server`, and a private `FaultyS3` for the freeze) and,
in (b), a local Ray cluster started by the CLI itself.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest
from s3_faults import FaultyS3

from fjordtune.devstack import S3Server, free_port
from fjordtune.storage import Store
from fjordtune.storage import checkpoints as ckpts

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
BUCKET = "fjt-storage-errors"
TYPO = "fjt-typo-bukket"
MODEL = "models/tiny"
QUICK = ("--set", "storage.retries=2", "--set", "storage.timeout_s=2")
POOL = 3  # concurrent CLI runs: 2 cores, and most of a run is waiting on imports or on a dead endpoint


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a user's shell: no Ray cluster to join, this checkout's sources."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS", "RAY_API_SERVER"))}
    env.update(PYTHONPATH=str(REPO / "src"), RAY_AUTH_MODE="disabled", **extra)
    return env


def objects(server: S3Server) -> dict[str, dict[str, tuple[int, str]]]:
    """Every bucket of the server and every object in it (size, etag): what "nothing written" compares."""
    s3 = boto3.session.Session().client("s3", endpoint_url=server.endpoint_url, aws_access_key_id=server.access_key,
                                        aws_secret_access_key=server.secret_key, region_name="us-east-1")
    out: dict[str, dict[str, tuple[int, str]]] = {}
    for b in s3.list_buckets().get("Buckets", []):
        keys = out.setdefault(b["Name"], {})
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=b["Name"]):
            for o in page.get("Contents", []):
                keys[o["Key"]] = (int(o["Size"]), str(o["ETag"]))
    return out


# -- (a) bad credentials, missing bucket, unreachable endpoint ----------------------------------------

@dataclass(frozen=True)
class Condition:
    """One way storage is misconfigured: the environment it runs in, the bucket the job names, and what
    the one error line must contain (the cause, and what to check)."""

    name: str
    env: Callable[[S3Server, Path], dict[str, str]]
    bucket: str
    says: tuple[str, ...]


def _wrong_keys(server: S3Server, tmp: Path) -> dict[str, str]:
    return {**server.env, "AWS_SECRET_ACCESS_KEY": "not-the-secret-key"}


def _no_keys(server: S3Server, tmp: Path) -> dict[str, str]:
    # no keys, no profile files, no instance role: botocore has nothing to sign with
    return {"AWS_ENDPOINT_URL": server.endpoint_url, "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_CONFIG_FILE": str(tmp / "absent-config"), "AWS_SHARED_CREDENTIALS_FILE": str(tmp / "absent-credentials"),
            "AWS_EC2_METADATA_DISABLED": "true"}


def _unreachable(server: S3Server, tmp: Path) -> dict[str, str]:
    return {**server.env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}


CONDITIONS = {c.name: c for c in (
    Condition("wrong-credentials", _wrong_keys, BUCKET, ("refused the credentials", "AWS_SECRET_ACCESS_KEY")),
    Condition("no-credentials", _no_keys, BUCKET, ("no usable S3 credentials", "AWS_ACCESS_KEY_ID")),
    Condition("missing-bucket", lambda server, tmp: dict(server.env), TYPO,
              (f"bucket '{TYPO}' does not exist", "bucket name", "never creates buckets")),
    Condition("unreachable-endpoint", _unreachable, BUCKET, ("cannot reach the S3 server", "endpoint", "network")),
)}


def command(name: str, bucket: str, out: Path) -> list[str]:
    job = ("jobs/demo.yaml", "--set", "name=errs", "--set", f"storage.uri=s3://{bucket}/runs", *QUICK)
    return {
        "checkpoints-ls": ["checkpoints", "ls", f"s3://{bucket}/runs/errs"],
        "eval": ["eval", *job, "--output-dir", str(out / "eval-out")],
        "train": ["train", *job],
        "preflight": ["preflight", *job, "--set", f"model.path=s3://{bucket}/{MODEL}"],
    }[name]


COMMANDS = ("train", "preflight", "eval", "checkpoints-ls")  # the slow ones first: the pool packs better


@dataclass(frozen=True)
class Outcome:
    argv: list[str]
    env: dict[str, str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    folder: Path


@pytest.fixture(scope="module")
def misconfigured(s3_server: S3Server, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """Runs every (condition, command) pair once, `POOL` at a time; yields their outcomes and the server's
    buckets and objects before and after all of them."""
    with pytest.MonkeyPatch.context() as mp:
        for k, v in s3_server.env.items():
            mp.setenv(k, v)
        store = Store()
        store.ensure_bucket(f"s3://{BUCKET}")  # the real bucket, with a committed model in it
        if not store.is_committed(f"s3://{BUCKET}/{MODEL}"):
            store.upload_dir(tiny_model_dir, f"s3://{BUCKET}/{MODEL}")
    before = objects(s3_server)
    root = tmp_path_factory.mktemp("storage-errors")

    def run(cond: Condition, cmd: str) -> Outcome:
        folder = root / f"{cond.name}-{cmd}"
        folder.mkdir()
        env = cli_env(**cond.env(s3_server, folder), FJORDTUNE_CACHE=str(folder / "cache"))
        argv = [sys.executable, "-m", "fjordtune", *command(cmd, cond.bucket, folder)]
        start = time.monotonic()
        res = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        return Outcome(argv, env, res.returncode, res.stdout, res.stderr, time.monotonic() - start, folder)

    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=POOL) as pool:
        futures = {(c, m): pool.submit(run, CONDITIONS[c], m) for m in COMMANDS for c in CONDITIONS}
        outcomes = {key: f.result() for key, f in futures.items()}
    wall = time.monotonic() - start
    print(f"\n{len(outcomes)} CLI runs in {wall:.1f} s ({POOL} at a time): "
          + ", ".join(f"{c}/{m} {o.seconds:.1f} s" for (c, m), o in outcomes.items()))
    yield outcomes, before, objects(s3_server)


@pytest.mark.parametrize("cmd", COMMANDS)
@pytest.mark.parametrize("condition", list(CONDITIONS))
def test_misconfigured_storage_is_one_line_exit_3_and_writes_nothing(misconfigured, s3_server: S3Server,
                                                                     condition: str, cmd: str) -> None:
    outcomes, before, after = misconfigured
    cond, out = CONDITIONS[condition], outcomes[(condition, cmd)]
    shown = f"{' '.join(out.argv[3:])}\n--- stdout\n{out.stdout[-3000:]}\n--- stderr\n{out.stderr[-3000:]}"
    assert out.returncode == 3, shown
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, shown
    assert "Traceback" not in out.stderr + out.stdout, shown
    line = errors[0]
    for phrase in cond.says:
        assert phrase in line, f"{phrase!r} missing from: {line}"
    assert f"s3://{cond.bucket}/" in line, f"the line names no URI: {line}"
    if condition in ("wrong-credentials", "missing-bucket", "unreachable-endpoint"):  # the server was asked
        assert out.env["AWS_ENDPOINT_URL"] in line, f"the line names no endpoint: {line}"
    assert "Ray: connected" not in out.stdout, f"{cmd} got past the storage check and started Ray:\n{shown}"

    # nothing written: no bucket, no object on the server; no output folder, nothing in the node cache
    assert TYPO not in after, f"a job created the bucket {TYPO}"
    assert after == before, {b: sorted(set(after.get(b, {})) ^ set(before.get(b, {}))) for b in set(after) | set(before)}
    assert not (out.folder / "eval-out").exists()
    assert not [p for p in (out.folder / "cache").rglob("*") if p.is_file()], list((out.folder / "cache").rglob("*"))


# -- (b) a frozen server during training --------------------------------------------------------------

TIMEOUT_S, RETRIES = 3, 2
LOG_SLACK_S = 10.0
"""Ray forwards a worker's log lines to the driver's terminal in batches: seconds late on a busy 2-core
machine (measured up to ~5 s)."""


def request_give_up_s(timeout_s: float, retries: int) -> float:
    """How long one S3 request waits on a frozen server before it fails: `retries` attempts of `timeout_s`
    each (the kernel accepts the connection, the read times out), with botocore's standard-mode backoff
    between them (uniform in [0, 2^(k-1)) s before attempt k+1)."""
    return retries * timeout_s + sum(2 ** (k - 1) for k in range(1, retries))


def storage_give_up_s(timeout_s: float, retries: int) -> float:
    """The storage waits between the freeze and the CLI's error line; see the test's docstring."""
    r = request_give_up_s(timeout_s, retries)
    commit_backoff = sum(2 ** k for k in range(1, retries))  # checkpointing.backoff_s: 2^k * U(0.5, 1) s
    return r + retries * r + commit_backoff + r


class Lines:
    """A child's stdout and stderr, line by line, each with the monotonic time it arrived."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.out: list[tuple[float, str]] = []
        self.err: list[tuple[float, str]] = []
        self.threads = [threading.Thread(target=self._pump, args=(stream, sink), daemon=True)
                        for stream, sink in ((proc.stdout, self.out), (proc.stderr, self.err))]
        for t in self.threads:
            t.start()

    @staticmethod
    def _pump(stream, sink: list[tuple[float, str]]) -> None:
        for line in stream:
            sink.append((time.monotonic(), line.rstrip("\n")))

    def join(self) -> None:
        for t in self.threads:
            t.join(timeout=30)

    def all(self) -> list[tuple[float, str]]:
        return sorted(self.out + self.err)

    def text(self, since: float) -> str:
        return "\n".join(f"{t - since:+7.1f} {line}" for t, line in self.all())[-8000:]


def test_frozen_server_during_training_is_reported_within_the_bound_and_exits_3(tmp_path: Path,
                                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """`fjordtune train` (2 gloo workers, a checkpoint every step) against a server frozen right after the
    first checkpoint's pointer was written. The bound on the give-up time, from the design:

    One request against a frozen server gives up after r = A*T + sum_{k<A} 2^(k-1) s, with T =
    storage.timeout_s and A = storage.retries (A attempts of a full read timeout: the stopped server's
    kernel still accepts connections; botocore's standard backoff between them). T=3, A=2: r = 7 s.
    After the freeze the run waits on storage, one request at a time, for:
      - rank 0's retention after the step-1 commit: its first listing fails, retention is skipped (r);
      - the step-2 checkpoint: A commit attempts, each failing at its first request (the bucket check:
        A*r), with `checkpointing.backoff_s` between them (2^k * U(0.5, 1) s: at most 2^A - 2 s). The
        error names the resume point from what the run committed, without asking storage again;
      - Ray Train restarts the worker group once (`train.max_failures=1` here; each further restart the
        default 3 allows adds r and one more worker-group start); the new workers fail at their first
        request (the base model's pointer: r), and the driver reports the last failure with the step the
        first workers committed (a small actor the driver owns keeps it).
    Storage waits: S = (A + 2) * r + 2^A - 2 = 30 s. On top come one training step, Ray's restart of
    the worker group (process start, imports, process group) and Ray's shutdown. The run's own start
    (imports, staging, Ray start, worker start, base-model load, step 1 and its commit: t_first, measured
    here) contains all of that, so the bound is S + t_first + LOG_SLACK_S. The first log line that names
    the endpoint and says it stopped answering or is being retried comes within r + LOG_SLACK_S.
    """
    server = FaultyS3.start(tmp_path / "s3")
    run_uri = "s3://fjt-frozen/runs/frozen"
    pointer = r'PUT "/fjt-frozen/runs/frozen/checkpoints/step-00000001/_COMMITTED" 200'
    proc: subprocess.Popen | None = None
    try:
        for k, v in server.env.items():
            monkeypatch.setenv(k, v)
        Store().ensure_bucket("s3://fjt-frozen")
        argv = [sys.executable, "-m", "fjordtune", "train", "jobs/demo.yaml", "--skip-preflight",
                "--set", "name=frozen", "--set", "storage.uri=s3://fjt-frozen/runs",
                "--set", f"storage.timeout_s={TIMEOUT_S}", "--set", f"storage.retries={RETRIES}",
                "--set", "train.checkpoint_every_steps=1", "--set", "train.max_steps=8",
                "--set", "train.max_failures=1"]
        env = cli_env(**server.env, FJORDTUNE_CACHE=str(tmp_path / "cache"))
        launched = time.monotonic()
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)  # its local Ray goes with it if the test kills it
        lines = Lines(proc)
        while not server.requests(pointer):
            assert proc.poll() is None, f"train ended before its first checkpoint:\n{lines.text(launched)}"
            assert time.monotonic() - launched < 600, f"no first checkpoint in 600 s:\n{lines.text(launched)}"
            time.sleep(0.005)
        server.freeze()
        frozen = time.monotonic()
        t_first = frozen - launched

        r = request_give_up_s(TIMEOUT_S, RETRIES)
        bound = storage_give_up_s(TIMEOUT_S, RETRIES) + t_first + LOG_SLACK_S
        try:
            proc.wait(timeout=bound + 120)
        except subprocess.TimeoutExpired:
            pytest.fail(f"train still running {bound + 120:.0f} s after the freeze (a hang):\n{lines.text(frozen)}")
        ended = time.monotonic()
        lines.join()
        log = lines.text(frozen)

        endpoint = server.endpoint_url
        noticed = [t - frozen for t, line in lines.all() if t > frozen and endpoint in line
                   and ("stopped answering" in line or "retrying" in line)]
        errors = [(t - frozen, line) for t, line in lines.err if line.startswith("error:")]
        print(f"\nfrozen {t_first:.1f} s after launch; first notice +{noticed[0] if noticed else float('nan'):.1f} s "
              f"(bound {r + LOG_SLACK_S:.0f}); error line +{errors[0][0] if errors else float('nan'):.1f} s; exit "
              f"+{ended - frozen:.1f} s (bound {bound:.0f} = storage {storage_give_up_s(TIMEOUT_S, RETRIES):.0f} "
              f"+ start {t_first:.0f} + slack {LOG_SLACK_S:.0f})")

        assert proc.returncode == 3, log
        assert len(errors) == 1, log
        line = errors[0][1]
        assert endpoint in line and "stopped answering" in line, line
        assert f"step 1 ({ckpts.step_uri(run_uri, 1)})" in line and "rerun the same job to resume" in line, line
        assert noticed and noticed[0] <= r + LOG_SLACK_S, f"no log line naming {endpoint} within {r + LOG_SLACK_S} s:\n{log}"
        assert ended - frozen <= bound, f"gave up {ended - frozen:.1f} s after the freeze, bound {bound:.1f} s:\n{log}"
    finally:
        server.thaw()
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        try:
            # lost nothing: step 1 is still the committed resume point, step 2 never became one
            store = Store(timeout_s=10, retries=3)
            if proc is not None and proc.returncode == 3:
                infos = {i.step: i for i in ckpts.list_checkpoints(store, ckpts.checkpoints_uri(run_uri))}
                assert infos[1].committed and not (2 in infos and infos[2].committed), infos
                assert ckpts.latest(store, ckpts.checkpoints_uri(run_uri)).step == 1
                store.download_dir(infos[1].uri, tmp_path / "step1")  # every checksum verified
        finally:
            server.stop()

