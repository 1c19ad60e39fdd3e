"""`fjordtune submit` against the demo's own stack, started the way scripts/demo starts it
(`python -m fjordtune.devstack up ... --env-file outputs/devstack.env`): SeaweedFS with a generated
secret and a Ray head with its job server. One stack for the module:

- `--address URL` talks to URL whatever RAY_ADDRESS / RAY_API_SERVER_ADDRESS say (they name the
  stack's cluster A here): a dead port is exit 3 with one `error:` line and nothing lands on A; a second
  live job server B (a small in-process Ray cluster, stopped right after) gets the job and A does not;
- without --address the environment chooses, and one line says so; the job runs to SUCCEEDED;
- after that run, the S3 secret is in no file under the outputs folder except owner-only ones, in no
  file under Ray's temp dir, and in nothing Ray's job API returns; nor is the Ray auth token.

Token authentication (the stack's head runs with RAY_AUTH_MODE=token, its token in an owner-only file
that the env file names by path): `ray job submit` and `fjordtune submit` work with the token and are
refused without it or with a wrong one, and nothing lands on the cluster then; `fjordtune submit` says
so in one line (exit 3). A private cluster that `connect_ray` starts gets a token of its own.

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
from fjordtune.telemetry.gpu import FAKE_NVML_ENV

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
    token: str  # the Ray auth token of cluster A (the env file names its file: RAY_AUTH_TOKEN_PATH)

    @property
    def auth_header(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    outputs = tmp_path_factory.mktemp("demo") / "outputs"
    outputs.mkdir()
    state, env_file = outputs / "devstack", outputs / "devstack.env"
    ray_temp_dir = Path(tempfile.mkdtemp(prefix="r", dir="/tmp"))  # unix socket paths must stay short
    devstack = [sys.executable, "-m", "fjordtune.devstack"]
    try:
        # every Ray process of the stack samples the fake NVML provider (no GPU here), and reports its
        # metrics every 2 s instead of 10 (the demo's workers live for seconds)
        up = subprocess.run([*devstack, "up", "--state-dir", str(state), "--ray-temp-dir", str(ray_temp_dir),
                             "--bucket", BUCKET, "--env-file", str(env_file)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, FAKE_NVML_ENV: "1", "RAY_metrics_report_interval_ms": "2000"})
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        exports = dict(re.findall(r"^export (\w+)=(.*)$", env_file.read_text(), flags=re.M))
        env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_TOKEN"}  # the env file unsets it too
        yield Stack(outputs, state, ray_temp_dir, {**env, **exports}, exports["RAY_API_SERVER_ADDRESS"],
                    exports["AWS_SECRET_ACCESS_KEY"], Path(exports["RAY_AUTH_TOKEN_PATH"]).read_text().strip())
    finally:
        subprocess.run([*devstack, "down", "--state-dir", str(state)], cwd=ROOT, capture_output=True, timeout=180)
        shutil.rmtree(ray_temp_dir, ignore_errors=True)


def submit(stack: Stack, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "fjordtune", "submit", str(DEMO), *args]
    for o in small("submitted", "train.max_steps=2", "eval.models=[tuned]"):
        cmd += ["--set", o]
    return subprocess.run(cmd, cwd=ROOT, env=stack.env, capture_output=True, text=True, timeout=timeout)


def job_client(url: str, token: str | None = None) -> Any:
    """Ray's job client for `url`; with `token`, it sends it (cluster A), without, nothing (cluster B)."""
    if token is None:
        with address_variables_cleared():
            return connect(url)
    from ray.job_submission import JobSubmissionClient

    with address_variables_cleared():  # an Authorization header of our own: Ray then adds none
        client = JobSubmissionClient(url, headers={"Authorization": f"Bearer {token}"})
    assert client.get_address().rstrip("/") == url
    return client


def submission_ids(url: str, token: str | None = None) -> set[str]:
    return {j.submission_id for j in job_client(url, token).list_jobs() if j.submission_id}


def submitted_id(proc: subprocess.CompletedProcess[str]) -> tuple[str, str]:
    found = re.search(r"^submitted (\S+) to (\S+);", proc.stdout, flags=re.M)
    assert found, proc.stdout[-2000:] + proc.stderr[-2000:]
    return found.group(1), found.group(2)


# -- --address wins over the environment -------------------------------------------------------------

def test_address_to_a_dead_port_is_refused_and_nothing_lands_on_the_environments_cluster(stack: Stack) -> None:
    assert stack.env["RAY_API_SERVER_ADDRESS"] == stack.url and stack.env["RAY_ADDRESS"]
    before = submission_ids(stack.url, stack.token)
    dead = f"http://127.0.0.1:{free_port()}"
    proc = submit(stack, "--address", dead, "--skip-preflight", timeout=120)
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert errors[0].startswith(f"error: submit: cannot reach the Ray job server at {dead} ")
    assert "dashboard" in errors[0] and "port-forward" in errors[0]
    assert "Traceback" not in proc.stderr and "submitted" not in proc.stdout
    assert submission_ids(stack.url, stack.token) == before


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
    before = submission_ids(stack.url, stack.token)
    proc = submit(stack, "--address", cluster_b, "--no-wait", "--skip-preflight", timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    sub_id, url = submitted_id(proc)
    client_b = job_client(cluster_b)
    try:
        assert url == cluster_b
        assert "cluster:" not in proc.stdout  # the flag chose: no line about where the address came from
        assert sub_id in submission_ids(cluster_b)
        assert submission_ids(stack.url, stack.token) == before
    finally:
        client_b.stop_job(sub_id)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and str(client_b.get_job_status(sub_id)).rsplit(".", 1)[-1] not in (
                "STOPPED", "FAILED", "SUCCEEDED"):
            time.sleep(0.5)


# -- token authentication: with the token it works, without it or with a wrong one it is refused ------

AUTH_VARIABLES = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def env_with_auth(stack: Stack, home: Path, **auth: str) -> dict[str, str]:
    """The stack's environment with the Ray auth variables replaced by `auth`, and a HOME of its own so
    that no ~/.ray/auth_token of this machine's user stands in for a missing token."""
    env = {k: v for k, v in stack.env.items() if k not in AUTH_VARIABLES}
    return {**env, **auth, "HOME": str(home)}


def no_token(stack: Stack, home: Path) -> dict[str, str]:  # token mode, no token anywhere
    return env_with_auth(stack, home, RAY_AUTH_MODE="token")


def no_auth(stack: Stack, home: Path) -> dict[str, str]:  # a client that sends nothing: the server refuses
    return env_with_auth(stack, home)


def wrong_token(stack: Stack, home: Path) -> dict[str, str]:
    import secrets

    return env_with_auth(stack, home, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))


REFUSALS = {"no-token": no_token, "no-auth-sent": no_auth, "wrong-token": wrong_token}


def test_the_stack_runs_with_token_auth_and_hands_out_only_the_token_path(stack: Stack) -> None:
    import requests

    from fjordtune.devstack import _cmdline, _process_tree

    env_file = (stack.outputs / "devstack.env").read_text()
    assert stack.env["RAY_AUTH_MODE"] == "token" and "unset RAY_AUTH_TOKEN\n" in env_file
    token_path = Path(stack.env["RAY_AUTH_TOKEN_PATH"])
    assert token_path.parent == stack.state_dir.resolve() and stat.S_IMODE(token_path.stat().st_mode) == 0o600
    assert re.fullmatch(r"[0-9a-f]{64}", stack.token) and stack.token not in env_file
    # the job server: 401 without a token, 403 with a wrong one, 200 with the stack's
    url = f"{stack.url}/api/jobs/"
    assert requests.get(url, timeout=30).status_code == 401
    assert requests.get(url, headers={"Authorization": "Bearer " + "0" * 64}, timeout=30).status_code == 403
    assert requests.get(url, headers=stack.auth_header, timeout=30).status_code == 200
    # the head's processes get the token's path, never the token, in their command lines and environments
    pgid = json.loads((stack.state_dir / "stack.json").read_text())["ray"]["pgid"]
    pids = _process_tree(pgid)
    assert len(pids) >= 3, pids  # gcs_server, raylet, dashboard, ...
    token, environs = stack.token.encode(), {}
    for pid in pids:
        try:
            environs[_cmdline(pid)] = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue  # exited since
        assert token not in _cmdline(pid) and token not in b"\0".join(environs[_cmdline(pid)]), _cmdline(pid)
    (gcs,) = [env for cmdline, env in environs.items() if b"gcs_server" in cmdline.split(b"\0")[0]]
    assert b"RAY_AUTH_MODE=token" in gcs and b"RAY_AUTH_TOKEN_PATH=" + str(token_path).encode() in gcs


def _ray_cli() -> str:
    return str(Path(sys.executable).with_name("ray"))


def ray_job_submit(env: dict[str, str], url: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`ray job submit` from the venv, a trivial entrypoint and no working dir to upload."""
    return subprocess.run([_ray_cli(), "job", "submit", "--address", url, "--", "python", "-c", "print(40 + 2)"],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=180)


def test_ray_job_submit_works_with_the_token(stack: Stack, tmp_path: Path) -> None:
    proc = ray_job_submit(stack.env, stack.url, tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    found = re.search(r"Job '(raysubmit_\w+)' succeeded", proc.stdout + proc.stderr)
    assert found and "42" in proc.stdout + proc.stderr, proc.stdout[-2000:] + proc.stderr[-2000:]
    client = job_client(stack.url, stack.token)
    assert str(client.get_job_status(found.group(1))).rsplit(".", 1)[-1] == "SUCCEEDED"


@pytest.mark.parametrize("refusal", REFUSALS, ids=list(REFUSALS))
def test_ray_job_submit_is_refused_without_the_token(stack: Stack, tmp_path: Path, refusal: str) -> None:
    before = submission_ids(stack.url, stack.token)
    proc = ray_job_submit(REFUSALS[refusal](stack, tmp_path), stack.url, tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-2000:]
    assert "AuthenticationError" in out and "succeeded" not in out, out[-2000:]
    expected = {"no-token": "couldn't find an authentication token", "no-auth-sent": "Authentication required",
                "wrong-token": "Invalid authentication token"}[refusal]
    assert expected in out, out[-2000:]
    assert submission_ids(stack.url, stack.token) == before
    assert not (tmp_path / ".ray" / "auth_token").exists()  # nothing made a token of its own


@pytest.mark.parametrize("refusal", REFUSALS, ids=list(REFUSALS))
def test_fjordtune_submit_is_refused_without_the_token_in_one_line(stack: Stack, tmp_path: Path,
                                                                   refusal: str) -> None:
    from dataclasses import replace

    before = submission_ids(stack.url, stack.token)
    proc = submit(replace(stack, env=REFUSALS[refusal](stack, tmp_path)), "--skip-preflight", "--no-wait",
                  timeout=180)
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    said = "refused the Ray auth token sent" if refusal == "wrong-token" else "requires a Ray auth token"
    assert errors[0].startswith(f"error: submit: the job server at {stack.url} {said}: "), errors[0]
    assert "RAY_AUTH_TOKEN_PATH" in errors[0] and "docs/security.md" in errors[0]
    assert "Traceback" not in proc.stderr and "submitted" not in proc.stdout
    assert submission_ids(stack.url, stack.token) == before


def test_connect_ray_gives_a_private_cluster_a_token_of_its_own(tmp_path: Path) -> None:
    """Without RAY_AUTH_MODE, the private cluster of `fjordtune run` runs with token auth, its token in an
    owner-only file removed at exit: no ~/.ray/auth_token (Ray's own is world-readable), no warning."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="r", dir="/tmp"))  # no cluster to join there; short socket paths
    env = {k: v for k, v in os.environ.items() if k not in (*AUTH_VARIABLES, "RAY_ADDRESS")}
    env.update(HOME=str(tmp_path), RAY_TMPDIR=str(ray_tmp), PYTHONPATH=str(ROOT / "src"))
    code = """if True:
        import os, stat, ray
        from fjordtune.pipeline import connect_ray
        connect_ray(None)
        path = os.environ["RAY_AUTH_TOKEN_PATH"]
        @ray.remote
        def mode():
            return os.environ["RAY_AUTH_MODE"], os.environ["RAY_AUTH_TOKEN_PATH"]
        print("worker", *ray.get(mode.remote()))
        print("driver", os.environ["RAY_AUTH_MODE"], path, oct(stat.S_IMODE(os.stat(path).st_mode)))
    """
    try:
        proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                              timeout=300)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    worker = re.search(r"^worker token (\S+)$", proc.stdout, flags=re.M)
    driver = re.search(r"^driver token (\S+) 0o600$", proc.stdout, flags=re.M)
    assert worker and driver and worker.group(1) == driver.group(1), proc.stdout
    assert not Path(driver.group(1)).exists(), "the private cluster's token outlived it"
    assert not (tmp_path / ".ray" / "auth_token").exists()
    assert "Token authentication" not in proc.stderr and "RAY_AUTH_MODE=disabled" not in proc.stderr, proc.stderr


# -- a whole submitted run, and where the secret went ------------------------------------------------

class Scraper:
    """Reads the Ray head's Prometheus endpoint every `every_s` on a thread, keeping every `ray_fjordtune_*`
    sample it ever saw: {metric name: {frozenset(labels): largest value}}."""

    def __init__(self, url: str, every_s: float = 1.0) -> None:
        import threading

        self.url, self.every_s = url, every_s
        self.seen: dict[str, dict[frozenset[tuple[str, str]], float]] = {}
        self.scrapes = self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scraper", daemon=True)

    def start(self) -> None:
        if not self._thread.is_alive() and not self._stop.is_set():
            self._thread.start()

    def stop(self) -> Scraper:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.scrape_once()
            self._stop.wait(self.every_s)

    def scrape_once(self) -> None:
        import requests
        from prometheus_client.parser import text_string_to_metric_families

        try:
            text = requests.get(self.url, timeout=10).text
        except requests.RequestException:
            self.errors += 1
            return
        self.scrapes += 1
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name.startswith("ray_fjordtune_"):
                    series = self.seen.setdefault(sample.name, {})
                    key = frozenset(sample.labels.items())
                    series[key] = max(series.get(key, float("-inf")), sample.value)

    def series(self, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
        return [(dict(k), v) for k, v in self.seen.get(name, {}).items()
                if all(dict(k).get(t) == want for t, want in labels.items())]


@pytest.fixture(scope="module")
def scraper(stack: Stack) -> Iterator[Scraper]:
    s = Scraper(stack.env["FJORDTUNE_METRICS_URL"])
    yield s
    s.stop()


@pytest.fixture(scope="module")
def submitted_run(stack: Stack, scraper: Scraper) -> tuple[subprocess.CompletedProcess[str], Path]:
    scraper.start()  # Prometheus scrapes while the job runs, as a Prometheus server would
    out = stack.outputs / "submitted"
    return submit(stack, "--output-dir", str(out), "--fetch-dir", str(stack.outputs / "fetched"),
                  "--set", "telemetry.peak_tflops=0.001"), out


def test_submit_runs_the_job_to_success_on_the_cluster_the_environment_names(submitted_run, stack: Stack) -> None:
    proc, out = submitted_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.splitlines()[0] == f"cluster: {stack.url} (from RAY_API_SERVER_ADDRESS)"
    sub_id, url = submitted_id(proc)
    assert url == stack.url and sub_id in submission_ids(stack.url, stack.token)
    assert "SUCCEEDED" in proc.stdout
    assert "| NRK-Quiz-QA | nob |" in proc.stdout
    assert (out / "tuned" / "results.json").exists() and (out / "scores.png").exists()

    # where the results land: the report's URI in storage, then the folder fetched to --fetch-dir (default
    # outputs/<name>/ where `fjordtune submit` ran: test_job_stop.py), byte for byte what the driver wrote
    report_uri = "s3://fjt-e2e/runs/submitted/report/"
    assert re.search(rf"^report: {re.escape(report_uri)} \(commit \S+; files under {re.escape(report_uri)}commits/",
                     proc.stdout, flags=re.M), proc.stdout[-2000:]
    fetched = stack.outputs / "fetched"
    assert f"fetched to {fetched}: report.md, scores.png, summary.json, tuned/results.json" in proc.stdout
    for rel in ("report.md", "scores.png", "summary.json", "tuned/results.json"):
        assert (fetched / rel).read_bytes() == (out / rel).read_bytes(), rel
    assert "| NRK-Quiz-QA | nob |" in (fetched / "report.md").read_text()
    assert (fetched / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((fetched / "summary.json").read_text())
    tuned = json.loads((fetched / "tuned" / "results.json").read_text())
    assert summary["base"] is None and summary["tuned"]["tasks"] == tuned["tasks"]
    assert tuned["model"] == "tuned" and "nrk_quiz_qa_nob_p0" in tuned["tasks"]


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

    client = job_client(stack.url, stack.token)
    info, jobs = client.get_job_info(sub_id), client.list_jobs()
    api_text = [repr(info), repr(jobs), client.get_job_logs(sub_id),
                json.dumps([j.model_dump() for j in jobs], default=str),
                requests.get(f"{stack.url}/api/jobs/", headers=stack.auth_header, timeout=30).text,
                requests.get(f"{stack.url}/api/jobs/{sub_id}", headers=stack.auth_header, timeout=30).text]
    assert info.runtime_env and "env_vars" not in info.runtime_env
    assert not [i for i, text in enumerate(api_text) if stack.secret in text]
    assert stack.secret not in proc.stdout + proc.stderr


def test_the_ray_token_stays_in_its_owner_only_file_and_out_of_ray(submitted_run, stack: Stack) -> None:
    proc, _ = submitted_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    token = stack.token.encode()
    holders = [p.relative_to(stack.outputs) for p in _files(stack.outputs) if token in p.read_bytes()]
    assert holders == [Path("devstack/ray-auth-token")], holders
    assert _owner_only(stack.outputs / holders[0], stack.outputs)
    leaked = [str(p) for p in _files(stack.ray_temp_dir) if token in p.read_bytes()]
    assert not leaked, f"the Ray auth token is in Ray's temp dir: {leaked}"
    sub_id, _ = submitted_id(proc)
    client = job_client(stack.url, stack.token)
    api_text = [repr(client.get_job_info(sub_id)), repr(client.list_jobs()), client.get_job_logs(sub_id)]
    assert not [text for text in api_text if stack.token in text]
    assert stack.token not in proc.stdout + proc.stderr


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


# -- telemetry: what a Prometheus server scraping the Ray head saw during the submitted run ----------

TRAIN_SERIES = ("gpu_utilization_pct", "gpu_memory_used_bytes", "gpu_memory_total_bytes", "gpu_power_watts",
                "gpu_temperature_celsius", "process_peak_memory_bytes", "predicted_peak_memory_bytes", "phase",
                "train_loss", "train_lr", "train_step", "train_tokens_per_s", "train_step_time_seconds")
EVAL_SERIES = ("gpu_utilization_pct", "process_peak_memory_bytes", "eval_items_per_s", "eval_items_done")


def test_ray_metrics_carry_our_series_with_tags_and_real_values(submitted_run, scraper: Scraper) -> None:
    """Must-show 1: the demo job through a Ray head with metrics export on; its Prometheus endpoint has our
    series, tagged with the Ray submission, the run, node, rank and GPU, with values that the run made."""
    proc, _ = submitted_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    scraper.stop()
    sub_id, _ = submitted_id(proc)
    assert scraper.scrapes >= 10, (scraper.scrapes, scraper.errors)
    mine = {"ray_job": sub_id, "run": "submitted"}
    for name in TRAIN_SERIES:
        got = scraper.series(f"ray_fjordtune_{name}", role="train", **mine)
        assert {labels["rank"] for labels, _ in got} == {"0", "1"}, (name, sorted(scraper.seen))
        assert all(labels["node"] and labels["node"] != "-" for labels, _ in got)
    for name in EVAL_SERIES:
        assert scraper.series(f"ray_fjordtune_{name}", role="eval", rank="0", **mine), (name, sorted(scraper.seen))
    for name in ("eval_requests_done", "eval_requests_total"):
        assert scraper.series(f"ray_fjordtune_{name}", model="tuned", **mine), name

    def top(name: str, **labels: str) -> float:
        return max(v for _, v in scraper.series(f"ray_fjordtune_{name}", **mine, **labels))

    gpu = scraper.series("ray_fjordtune_gpu_utilization_pct", role="train", **mine)
    assert {labels["gpu"] for labels, _ in gpu} == {"0"}
    assert 0 < top("gpu_utilization_pct", role="train") <= 100  # the fake: the rank's own CPU use
    assert 50 << 20 < top("gpu_memory_used_bytes", role="train") < top("gpu_memory_total_bytes", role="train")
    assert top("train_step", role="train") == 2 and top("train_tokens_per_s", role="train") > 0
    assert 0 < top("train_loss", role="train") < 100 and 0 < top("train_lr", role="train") < 1
    assert top("train_mfu", role="train") > 0  # telemetry.peak_tflops of the submission
    assert top("predicted_peak_memory_bytes", role="train") > 0
    assert top("process_peak_memory_bytes", role="train") > 50 << 20
    assert top("eval_items_done", role="eval") > 0
    assert top("eval_requests_done", model="tuned") == top("eval_requests_total", model="tuned") > 0
    phases = {labels["phase"] for labels, v in scraper.series("ray_fjordtune_phase", **mine) if v == 1}
    assert {"setup", "score"} <= phases, phases  # seen as current at some scrape


def test_every_series_the_grafana_dashboard_queries_was_scraped(submitted_run, scraper: Scraper) -> None:
    """Must-show 2."""
    from test_telemetry import dashboard_metrics

    proc, _ = submitted_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    missing = dashboard_metrics() - set(scraper.stop().seen)
    assert not missing, f"the dashboard queries series no scrape found: {sorted(missing)}"


def test_the_run_summarises_each_gpu_in_results_and_report(submitted_run) -> None:
    proc, out = submitted_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    train = json.loads((out / "run.json").read_text())["telemetry"]
    assert train["source"] == "fake" and "fake NVML" in train["note"]
    for p in train["processes"]:
        (g,) = p["gpus"]
        assert g["phase"] == "train" and g["samples"] >= 1
        assert 0 <= g["utilization_p5_pct"] <= g["utilization_mean_pct"] <= g["utilization_p95_pct"] <= 100
        assert 0 < g["memory_peak_bytes"] < g["memory_total_bytes"]
    tuned = json.loads((out / "tuned" / "results.json").read_text())["telemetry"]
    assert tuned["processes"][0]["gpus"][0]["phase"] == "score"
    md = (out / "report.md").read_text()
    assert "## GPU telemetry" in md and "| 0 |" in md and "fake NVML" in md
    assert re.search(r"telemetry train rank 1 GPU 0: utilisation during train mean \d+%", proc.stdout)
    assert re.search(r"^telemetry train: 2 GPU\(s\) \[fake NVML\], utilisation during train \d+-\d+%", proc.stdout, re.M)
    assert re.search(r"^telemetry eval tuned: 1 GPU\(s\) \[fake NVML\], utilisation during score", proc.stdout, re.M)
