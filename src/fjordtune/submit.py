"""Submit a job file to a Ray cluster: validate and preflight here, then `fjordtune run` there.

This is what `ray job submit --working-dir . -- python -m fjordtune run JOB` does, plus the checks
that should refuse a job before the cluster allocates a single GPU.

The cluster is the one named by --address, else `submit.address` of the job file, else
RAY_API_SERVER_ADDRESS, else RAY_ADDRESS when it is an http(s):// URL; without --address one line
says which of them chose it. Ray's own client lets RAY_API_SERVER_ADDRESS / RAY_ADDRESS win over the
address it is given (`ray.dashboard.utils.get_address_for_submission_client`), so the client is built
with both variables out of the environment: a job meant for one cluster never lands on another.

Credentials never travel with the job: the runtime_env carries only the job file's `submit` section
(whose `env_vars` the loader has already checked for credentials) and the metadata only the job name;
the job reads its keys from the cluster's own environment.

The job's files land in storage, not here: `fjordtune run` on the cluster commits the report, the chart,
summary.json and each model's results.json to `<storage.uri>/<name>/report/`. After a job that
succeeded, `submit` prints that URI and copies the folder (verified) to `outputs/<name>/` or
--fetch-dir, reading storage with this machine's credentials, as preflight does. Ctrl-C stops the
following, not the job: it prints the `ray job stop` command that would.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fjordtune.config import load_job
from fjordtune.config.schema import JobSpec
from fjordtune.errors import FjordtuneError, InfraError, InternalError, UserError

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
#: The variables through which Ray's job client picks a cluster on its own.
ADDRESS_VARIABLES = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
_CHECK = ("check that the Ray head is up, that this is its dashboard (job server) port (8265 by default; not the "
          "GCS port 6379), and the network path to it (firewall, VPN, `kubectl port-forward svc/<cluster>-head-svc "
          "8265:8265`)")


@dataclass(frozen=True)
class ClusterAddress:
    """The job server URL and what chose it, e.g. `--address` or `RAY_API_SERVER_ADDRESS`."""

    url: str
    source: str


def resolve_address(flag: str | None, *, job: JobSpec, job_path: str, overrides: list[str],
                    environ: Mapping[str, str] = os.environ) -> ClusterAddress:
    """The job server to submit to: --address, else submit.address, else RAY_API_SERVER_ADDRESS, else
    RAY_ADDRESS when it is an http(s):// URL (a bare host:port there is a GCS address, for ray.init)."""
    if flag:
        found = ClusterAddress(flag, "--address")
    elif job.submit.address:
        by_set = any(o.split("=", 1)[0].strip() == "submit.address" for o in overrides)
        found = ClusterAddress(job.submit.address,
                               "--set submit.address" if by_set else f"submit.address in {job_path}")
    elif environ.get("RAY_API_SERVER_ADDRESS"):
        found = ClusterAddress(environ["RAY_API_SERVER_ADDRESS"], "RAY_API_SERVER_ADDRESS")
    elif environ.get("RAY_ADDRESS", "").startswith(("http://", "https://")):
        found = ClusterAddress(environ["RAY_ADDRESS"], "RAY_ADDRESS")
    else:
        gcs = environ.get("RAY_ADDRESS")
        raise UserError("submit: no job server address: pass --address http://HEAD:8265, set submit.address or "
                        "RAY_API_SERVER_ADDRESS" + (f" (RAY_ADDRESS={gcs} is a GCS address for ray.init, not the "
                                                    "dashboard's http:// URL)" if gcs else ""))
    if not found.url.startswith(("http://", "https://")):
        raise UserError(f"submit: {found.source} {found.url}: the job server address is the dashboard's http:// "
                        "URL, e.g. http://HEAD:8265 (not the GCS address HEAD:6379)")
    return ClusterAddress(found.url.rstrip("/"), found.source)


@contextlib.contextmanager
def address_variables_cleared() -> Iterator[None]:
    """Take RAY_API_SERVER_ADDRESS and RAY_ADDRESS out of `os.environ` for the block, then put them back,
    so that Ray's job client talks to the address it is given and to nothing else."""
    saved = {k: os.environ.pop(k) for k in ADDRESS_VARIABLES if k in os.environ}
    try:
        yield
    finally:
        for k in ADDRESS_VARIABLES:
            os.environ.pop(k, None)
        os.environ.update(saved)


def connect(url: str) -> Any:
    """A `JobSubmissionClient` bound to `url` and nothing else, built with the address variables out of the
    environment; an unreachable or wrong URL is an `InfraError` naming what to check."""
    from ray.exceptions import AuthenticationError, RayError
    from ray.job_submission import JobSubmissionClient

    try:
        with address_variables_cleared():
            client = JobSubmissionClient(url)
    except ConnectionError:  # Ray turns requests' connection errors into the builtin one
        raise InfraError(f"submit: cannot reach the Ray job server at {url} (connection failed): {_CHECK}") from None
    except AuthenticationError as e:  # HTTP 401 (no token sent) or 403 (a wrong one); Ray's text is a page long
        refused = "refused the Ray auth token sent" if "Authentication failed" in str(e) else "requires a Ray auth token"
        raise InfraError(f"submit: the job server at {url} {refused}: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH "
                         "(a file holding the cluster's token) or RAY_AUTH_TOKEN (see docs/security.md)") from None
    except (RuntimeError, OSError, ValueError, KeyError, RayError) as e:  # 404, not JSON, auth refused, bad URL
        raise InfraError(f"submit: {url} did not answer as a Ray job server ({_short(e)}): {_CHECK}") from None
    # Ray resolves the address once, here; every later call (submit_job, get_job_status, get_job_logs,
    # list_jobs) sends its request to this one (SubmissionClient._do_request reads self._address).
    if client.get_address().rstrip("/") != url.rstrip("/"):
        raise InternalError(f"submit: Ray's job client resolved {url} to {client.get_address()}: its address "
                            "handling changed; refusing to submit to a cluster that was not asked for")
    return client


def runtime_env_of(job: JobSpec) -> dict[str, Any]:
    """The job's Ray runtime_env: working dir, excludes, pip and env_vars of the `submit` section, nothing
    else (no variable of this process: credentials come from the cluster's environment)."""
    runtime_env: dict[str, Any] = {"working_dir": job.submit.working_dir, "excludes": list(job.submit.excludes)}
    if job.submit.pip:
        runtime_env["pip"] = list(job.submit.pip)
    if job.submit.env_vars:
        runtime_env["env_vars"] = dict(job.submit.env_vars)
    return runtime_env


def entrypoint(job_path: str, overrides: list[str], output_dir: str | None = None) -> str:
    parts = ["python", "-m", "fjordtune", "run", job_path]
    if output_dir:
        parts += ["--output-dir", output_dir]
    for o in overrides:
        parts += ["--set", o]
    return shlex.join(parts)


def submit(job_path: str, *, overrides: list[str], address: str | None, wait: bool = True,
           skip_preflight: bool = False, output_dir: str | None = None, cluster: str | None = None,
           fetch_dir: str | None = None, fetch: bool = True) -> int:
    """Validate and preflight `job_path`, submit `fjordtune run` to the job server and, with `wait`,
    follow its logs; the exit status is the job's (0 succeeded, 3 otherwise, 130 when Ctrl-C ends the
    following: the job runs on).

    `address`: the job server URL (--address); when None, the job file or the environment names it and a
    `cluster: URL (from SOURCE)` line says which. `cluster`: a cluster file (KubeRay manifest or launcher
    YAML) whose node shapes preflight checks the placement against, instead of `resources.gpus_per_node`.
    `fetch`: after a job that succeeded, copy its report folder from storage to `fetch_dir` (default
    `outputs/<name>`, where `fjordtune run` writes by default)."""
    job = load_job(job_path, overrides)
    target = resolve_address(address, job=job, job_path=job_path, overrides=overrides)
    if target.source != "--address":
        print(f"cluster: {target.url} (from {target.source})", flush=True)
    if not skip_preflight and cluster:
        from fjordtune.preflight.gate import check
        from fjordtune.preflight.placement import read_cluster_file

        print(check(job, cluster=read_cluster_file(cluster)).text, flush=True)
    elif not skip_preflight:
        from fjordtune.pipeline import preflight

        preflight(job)
    with address_variables_cleared():
        client = connect(target.url)
        try:
            sub_id = client.submit_job(entrypoint=entrypoint(job_path, overrides, output_dir),
                                       runtime_env=runtime_env_of(job), metadata={"fjordtune_job": job.name})
        except (RuntimeError, OSError) as e:  # the server refused it or went away (requests' errors are OSErrors)
            raise InfraError(f"submit: the Ray job server at {target.url} did not accept the job: "
                             f"{_short(e)}") from None
        except ValueError as e:  # Ray's own check of the runtime_env, before anything is sent
            raise UserError(f"submit: {job_path}: the submit section makes an invalid Ray runtime_env: "
                            f"{_short(e)}") from None
        print(f"submitted {sub_id} to {target.url}; dashboard: {target.url}/#/jobs/{sub_id}", flush=True)
        if not wait:
            print(f"report (once it succeeds): {report_uri(job)}/", flush=True)
            return 0
        try:
            status = follow(client, sub_id, url=target.url)
        except KeyboardInterrupt:
            print(f"\nstopped following; job {sub_id} keeps running on {target.url}\n"
                  f"  follow it: ray job logs {sub_id} --address {target.url} --follow\n"
                  f"  stop it:   ray job stop {sub_id} --address {target.url}", flush=True)
            return 130
    if status == 0 and fetch:
        fetch_report(job, fetch_dir or f"outputs/{job.name}")
    elif status == 0:
        print(f"report: {report_uri(job)}/", flush=True)
    return status


def report_uri(job: JobSpec) -> str:
    """Where `fjordtune run` commits the report, the chart, summary.json and each model's results.json."""
    return f"{job.run_uri}/report"


def fetch_report(job: JobSpec, dest: str | Path) -> Path | None:
    """Copy the job's committed report folder from storage to `dest` (each file checked against the
    manifest) and say where it came from and what came; None, and one line, when storage cannot be read
    from here: the job has succeeded, its report stays in storage."""
    from fjordtune.storage import Store

    uri, dest = report_uri(job), Path(dest)
    try:
        store = Store.for_job(job)
        commit = store.commit_id(uri)
        manifest = store.manifest(uri, commit)
        dest.mkdir(parents=True, exist_ok=True)
        store.download_files(uri, sorted(manifest), dest, commit=commit, manifest=manifest)
    except (FjordtuneError, OSError) as e:
        why = e.lines[0] if isinstance(e, FjordtuneError) else _short(e)
        print(f"report: {uri}/ could not be fetched from here ({why}); the job succeeded and the report stays "
              "in storage", flush=True)
        return None
    print(f"report: {uri}/ (commit {commit}; files under {store.commit_uri(uri, commit)}/)", flush=True)
    print(f"fetched to {dest.resolve()}: {', '.join(sorted(manifest))}", flush=True)
    return dest


def follow(client: Any, sub_id: str, *, url: str = "", poll_s: float = 2.0) -> int:
    """Stream the job's logs until it ends; 0 if it succeeded, 3 otherwise."""
    shown = 0
    while True:
        try:
            status = str(client.get_job_status(sub_id)).rsplit(".", 1)[-1]
            logs = client.get_job_logs(sub_id)
        except (RuntimeError, OSError) as e:  # the job server went away while we watched
            raise InfraError(f"submit: lost the Ray job server at {url or client.get_address()} while following "
                             f"{sub_id} ({_short(e)}); the job may still be running: ray job status {sub_id} "
                             f"--address {url or client.get_address()}") from None
        if len(logs) > shown:
            sys.stdout.write(logs[shown:])
            sys.stdout.flush()
            shown = len(logs)
        if status in TERMINAL:
            print(f"job {sub_id}: {status}", flush=True)
            return 0 if status == "SUCCEEDED" else 3
        time.sleep(poll_s)


def _short(e: BaseException, limit: int = 300) -> str:
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
