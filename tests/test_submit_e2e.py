"""`fjordtune submit` against a real Ray head with its job server (started with `ray start`): the path
users take on a cluster. Kept in its own module: `ray stop` ends every Ray process on the machine, so
no in-process cluster of another module may be alive while it runs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from test_pipeline_e2e import DEMO, ROOT, small

pytestmark = pytest.mark.integration


def test_submit_through_the_ray_job_server(s3_server, tmp_path):
    from fjordtune.devstack import start_ray_head

    head = start_ray_head(num_cpus=4, env=s3_server.env)
    try:
        out = tmp_path / "out"
        env = {**os.environ, **s3_server.env, "RAY_AUTH_MODE": "disabled"}
        cmd = [sys.executable, "-m", "fjordtune", "submit", str(DEMO), "--address", head.dashboard_url,
               "--output-dir", str(out)]
        for o in small("submitted", "train.max_steps=2", "eval.models=[tuned]"):
            cmd += ["--set", o]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "SUCCEEDED" in proc.stdout
        assert "| NRK-Quiz-QA | nob |" in proc.stdout
        assert (out / "tuned" / "results.json").exists() and (out / "scores.png").exists()
    finally:
        head.stop()
