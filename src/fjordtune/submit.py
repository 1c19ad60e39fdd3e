"""Submit a job file to a Ray cluster: validate and preflight here, then `fjordtune run` there.

This is what `ray job submit --working-dir . -- python -m fjordtune run JOB` does, plus the checks
that should refuse a job before the cluster allocates a single GPU.
"""

from __future__ import annotations

import os
import shlex
import sys
import time

from fjordtune.config import load_job
from fjordtune.errors import InfraError, UserError

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def entrypoint(job_path: str, overrides: list[str], output_dir: str | None = None) -> str:
    parts = ["python", "-m", "fjordtune", "run", job_path]
    if output_dir:
        parts += ["--output-dir", output_dir]
    for o in overrides:
        parts += ["--set", o]
    return shlex.join(parts)


def submit(job_path: str, *, overrides: list[str], address: str | None, wait: bool = True,
           skip_preflight: bool = False, output_dir: str | None = None, cluster: str | None = None) -> int:
    """`cluster`: a cluster file (KubeRay manifest or launcher YAML) whose node shapes preflight checks the
    placement against, instead of `resources.gpus_per_node`."""
    job = load_job(job_path, overrides)
    if not skip_preflight and cluster:
        from fjordtune.preflight.gate import check
        from fjordtune.preflight.placement import read_cluster_file

        print(check(job, cluster=read_cluster_file(cluster)).text, flush=True)
    elif not skip_preflight:
        from fjordtune.pipeline import preflight

        preflight(job)
    env_address = os.environ.get("RAY_ADDRESS", "")
    address = (address or job.submit.address or os.environ.get("RAY_API_SERVER_ADDRESS")
               or (env_address if env_address.startswith(("http://", "https://")) else None))
    if not address:
        raise UserError("submit: no job server address: pass --address http://HEAD:8265, set submit.address or "
                        "RAY_API_SERVER_ADDRESS")
    from ray.job_submission import JobSubmissionClient

    try:
        client = JobSubmissionClient(address)
    except Exception as e:  # connection refused, wrong URL, auth
        raise InfraError(f"submit: cannot reach the Ray job server at {address}: {e}") from None
    runtime_env: dict = {"working_dir": job.submit.working_dir, "excludes": list(job.submit.excludes)}
    if job.submit.pip:
        runtime_env["pip"] = list(job.submit.pip)
    if job.submit.env_vars:
        runtime_env["env_vars"] = dict(job.submit.env_vars)
    sub_id = client.submit_job(entrypoint=entrypoint(job_path, overrides, output_dir), runtime_env=runtime_env,
                               metadata={"fjordtune_job": job.name})
    print(f"submitted {sub_id} to {address}; dashboard: {address.rstrip('/')}/#/jobs/{sub_id}", flush=True)
    if not wait:
        return 0
    return follow(client, sub_id)


def follow(client, sub_id: str, *, poll_s: float = 2.0) -> int:
    """Stream the job's logs until it ends; 0 if it succeeded, 3 otherwise."""
    shown = 0
    while True:
        status = str(client.get_job_status(sub_id)).rsplit(".", 1)[-1]
        logs = client.get_job_logs(sub_id)
        if len(logs) > shown:
            sys.stdout.write(logs[shown:])
            sys.stdout.flush()
            shown = len(logs)
        if status in TERMINAL:
            print(f"job {sub_id}: {status}", flush=True)
            return 0 if status == "SUCCEEDED" else 3
        time.sleep(poll_s)
