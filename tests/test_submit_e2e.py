"""`fjordtune submit` against the demo's own stack, started the way scripts/demo starts it
(`python -m fjordtune.devstack up ... --env-file outputs/devstack.env`): SeaweedFS with a generated
secret and a Ray head with its job server. One stack for the module:

- `--address URL` talks to URL whatever RAY_ADDRESS / RAY_API_SERVER_ADDRESS say (they name the
  stack's cluster A here): a dead port is exit 3 with one `error:` line and nothing lands on A; a second
  live job server B (a small in-process Ray cluster, stopped right after) gets the job and A does not;
- without --address the environment chooses, and one line says so; the job runs to SUCCEEDED;
- after that run, the S3 secret is in no file under the outputs folder except owner-only ones, in no
  file under Ray's temp dir, and in nothing Ray's job API returns.

The stack's Ray head is stopped by its process group (`devstack down`), so other Ray clusters on the
machine live on; cluster B is stopped with `ray.shutdown()` before the long run starts.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from test_pipeline_e2e import DEMO, ROOT, small

from fjordtune.devstack import free_port, private_dir, write_private
from fjordtune.submit import address_variables_cleared, connect

pytestmark = pytest.mark.integration

BUCKET = "fjt-e2e"  # the bucket of small(...); fjordtune never creates buckets: `devstack up --bucket` does


@dataclass(frozen=True)
class Stack:
    outputs: Path  # what scripts/demo calls outputs/: the state dir, the env file and the run's output
    state_dir: Path
    ray_temp_dir: Path
    env: dict[str, str]  # os.environ plus the stack's export lines, for subprocesses
    url: str  # cluster A's job server
    secret: str


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    outputs = tmp_path_factory.mktemp("demo") / "outputs"
    outputs.mkdir()
    state, env_file = outputs / "devstack", outputs / "devstack.env"
    ray_temp_dir = Path(tempfile.mkdtemp(prefix="r", dir="/tmp"))  # unix socket paths must stay short
    devstack = [sys.executable, "-m", "fjordtune.devstack"]
    try:
        up = subprocess.run([*devstack, "up", "--state-dir", str(state), "--ray-temp-dir", str(ray_temp_dir),
                             "--bucket", BUCKET, "--env-file", str(env_file)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        exports = dict(re.findall(r"^export (\w+)=(.*)$", env_file.read_text(), flags=re.M))
        yield Stack(outputs, state, ray_temp_dir, {**os.environ, **exports}, exports["RAY_API_SERVER_ADDRESS"],
                    exports["AWS_SECRET_ACCESS_KEY"])
    finally:
        subprocess.run([*devstack, "down", "--state-dir", str(state)], cwd=ROOT, capture_output=True, timeout=180)
        shutil.rmtree(ray_temp_dir, ignore_errors=True)


def submit(stack: Stack, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "fjordtune", "submit", str(DEMO), *args]
    for o in small("submitted", "train.max_steps=2", "eval.models=[tuned]"):
        cmd += ["--set", o]
    return subprocess.run(cmd, cwd=ROOT, env=stack.env, capture_output=True, text=True, timeout=timeout)


def job_client(url: str) -> Any:
    with address_variables_cleared():
        return connect(url)


def submission_ids(url: str) -> set[str]:
    return {j.submission_id for j in job_client(url).list_jobs() if j.submission_id}


def submitted_id(proc: subprocess.CompletedProcess[str]) -> tuple[str, str]:
    found = re.search(r"^submitted (\S+) to (\S+);", proc.stdout, flags=re.M)
    assert found, proc.stdout[-2000:] + proc.stderr[-2000:]
    return found.group(1), found.group(2)


# -- --address wins over the environment -------------------------------------------------------------

def test_address_to_a_dead_port_is_refused_and_nothing_lands_on_the_environments_cluster(stack: Stack) -> None:
    assert stack.env["RAY_API_SERVER_ADDRESS"] == stack.url and stack.env["RAY_ADDRESS"]
    before = submission_ids(stack.url)
    dead = f"http://127.0.0.1:{free_port()}"
    proc = submit(stack, "--address", dead, "--skip-preflight", timeout=120)
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert errors[0].startswith(f"error: submit: cannot reach the Ray job server at {dead} ")
    assert "dashboard" in errors[0] and "port-forward" in errors[0]
    assert "Traceback" not in proc.stderr and "submitted" not in proc.stdout
    assert submission_ids(stack.url) == before


@pytest.fixture
def cluster_b() -> Iterator[str]:
    """A second live job server: a one-CPU Ray cluster in this process (about 6 s to start, 2 s to stop)."""
    import ray

    port, temp_dir = free_port(), tempfile.mkdtemp(prefix="r", dir="/tmp")
    saved = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(address="local", num_cpus=1, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port,
             _temp_dir=temp_dir, logging_level="ERROR")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        ray.shutdown()
        os.environ.pop("RAY_AUTH_MODE")
        if saved is not None:
            os.environ["RAY_AUTH_MODE"] = saved
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_address_to_another_live_cluster_submits_there_not_to_the_environments(stack: Stack, cluster_b: str) -> None:
    before = submission_ids(stack.url)
    proc = submit(stack, "--address", cluster_b, "--no-wait", "--skip-preflight", timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    sub_id, url = submitted_id(proc)
    client_b = job_client(cluster_b)
    try:
        assert url == cluster_b
        assert "cluster:" not in proc.stdout  # the flag chose: no line about where the address came from
        assert sub_id in submission_ids(cluster_b)
        assert submission_ids(stack.url) == before
    finally:
        client_b.stop_job(sub_id)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and str(client_b.get_job_status(sub_id)).rsplit(".", 1)[-1] not in (
                "STOPPED", "FAILED", "SUCCEEDED"):
            time.sleep(0.5)


# -- a whole submitted run, and where the secret went ------------------------------------------------

@pytest.fixture(scope="module")
def submitted_run(stack: Stack) -> tuple[subprocess.CompletedProcess[str], Path]:
    out = stack.outputs / "submitted"
    return submit(stack, "--output-dir", str(out)), out


def test_submit_runs_the_job_to_success_on_the_cluster_the_environment_names(submitted_run, stack: Stack) -> None:
    proc, out = submitted_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.splitlines()[0] == f"cluster: {stack.url} (from RAY_API_SERVER_ADDRESS)"
    sub_id, url = submitted_id(proc)
    assert url == stack.url and sub_id in submission_ids(stack.url)
    assert "SUCCEEDED" in proc.stdout
    assert "| NRK-Quiz-QA | nob |" in proc.stdout
    assert (out / "tuned" / "results.json").exists() and (out / "scores.png").exists()


def _files(root: Path) -> Iterator[Path]:
    for folder, _, names in os.walk(root):  # symlinks (session_latest) are not followed
        for name in names:
            path = Path(folder, name)
            if path.is_file() and not path.is_symlink():
                yield path


def _owner_only(path: Path, root: Path) -> bool:
    """0600 itself, or below a 0700 folder inside `root` (nobody else can reach it)."""
    if stat.S_IMODE(path.stat().st_mode) == 0o600:
        return True
    return any(stat.S_IMODE(d.stat().st_mode) == 0o700 for d in [*path.parents][: len(path.relative_to(root).parts)])


def test_the_s3_secret_stays_in_owner_only_files_and_out_of_ray(submitted_run, stack: Stack) -> None:
    proc, _ = submitted_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    secret = stack.secret.encode()
    assert len(secret) >= 20

    # the outputs folder: only the stack's own files hold it, and nobody else can read them
    holders = [p for p in _files(stack.outputs) if secret in p.read_bytes()]
    assert {p.relative_to(stack.outputs) for p in holders} >= {Path("devstack.env"), Path("devstack/stack.json")}
    exposed = [str(p) for p in holders if not _owner_only(p, stack.outputs)]
    assert not exposed, f"files holding the S3 secret readable by others: {exposed}"
    assert stat.S_IMODE(stack.state_dir.stat().st_mode) == 0o700
    for name in ("devstack.env", "devstack/stack.json"):
        assert stat.S_IMODE((stack.outputs / name).stat().st_mode) == 0o600, name

    # Ray's temp dir (session logs, job driver logs, uploaded working dir): not at all
    sub_id, _ = submitted_id(proc)
    files = list(_files(stack.ray_temp_dir))
    assert any(p.name == f"job-driver-{sub_id}.log" for p in files), "no driver log where the test looks"
    leaked = [str(p) for p in files if secret in p.read_bytes()]
    assert not leaked, f"the S3 secret is in Ray's temp dir: {leaked}"

    # what the job API returns (the dashboard shows the same)
    import requests

    client = job_client(stack.url)
    info, jobs = client.get_job_info(sub_id), client.list_jobs()
    api_text = [repr(info), repr(jobs), client.get_job_logs(sub_id),
                json.dumps([j.model_dump() for j in jobs], default=str),
                requests.get(f"{stack.url}/api/jobs/", timeout=30).text,
                requests.get(f"{stack.url}/api/jobs/{sub_id}", timeout=30).text]
    assert info.runtime_env and "env_vars" not in info.runtime_env
    assert not [i for i, text in enumerate(api_text) if stack.secret in text]
    assert stack.secret not in proc.stdout + proc.stderr


def test_private_files_are_owner_only_even_over_older_wider_ones(tmp_path: Path) -> None:
    """A rerun of scripts/demo meets an env file and a state dir left by an older version (0644, 0755)."""
    state, env_file = tmp_path / "outputs" / "devstack", tmp_path / "outputs" / "devstack.env"
    state.mkdir(parents=True, mode=0o755)
    env_file.write_text("export OLD=1\n")
    env_file.chmod(0o644)
    private_dir(state)
    write_private(env_file, "export NEW=1\n")
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600 and env_file.read_text() == "export NEW=1\n"
    assert sorted(p.name for p in env_file.parent.iterdir()) == ["devstack", "devstack.env"]  # no temp file left
