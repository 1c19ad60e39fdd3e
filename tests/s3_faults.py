"""A private SeaweedFS for fault tests: killed (SIGKILL), frozen (SIGSTOP), thawed and restarted on the
same ports, credentials and data, while the code under test keeps talking to it.

The session's `s3_server` fixture must never be killed (other tests share it): fault tests start their
own with `FaultyS3.start(tmp_path)`. `weed -v=2` logs every request it served, one line each, which
`wait_for` watches to strike at a known moment (e.g. after the first part of an upload landed).
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from fjordtune.devstack import S3Server, _wait_s3, free_port, weed_binary


@dataclass
class FaultyS3:
    data_dir: Path
    ports: dict[str, int]
    access_key: str
    secret_key: str
    proc: subprocess.Popen | None = None
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.data_dir / "weed.log"

    @classmethod
    def start(cls, data_dir: str | Path) -> FaultyS3:
        data_dir = Path(data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        ports = {name: free_port() for name in ("master", "volume", "filer", "s3")}
        server = cls(data_dir, ports, "fjt" + secrets.token_hex(8), secrets.token_hex(20))
        server.launch()
        return server

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def env(self) -> dict[str, str]:
        return S3Server(0, self.endpoint_url, self.access_key, self.secret_key, str(self.data_dir)).env

    def launch(self, timeout: float = 60) -> None:
        """Start `weed mini` on this server's ports with its credentials and data; return once S3 answers."""
        p = self.ports
        cmd = [weed_binary(), "-v=2", "mini", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               f"-master.port={p['master']}", f"-volume.port={p['volume']}", f"-filer.port={p['filer']}",
               f"-s3.port={p['s3']}", "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
               "-master.telemetry=false"]
        env = {**os.environ, "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        server = S3Server(self.proc.pid, self.endpoint_url, self.access_key, self.secret_key, str(self.data_dir))
        _wait_s3(server, self.proc, timeout)

    def _signal(self, sig: int) -> None:
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """SIGKILL, as a crashed or OOM-killed server: no goodbye to clients."""
        self._signal(signal.SIGKILL)
        assert self.proc is not None
        self.proc.wait(timeout=30)

    def freeze(self) -> None:
        """SIGSTOP: connections are still accepted by the kernel, nothing is ever answered."""
        self._signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self._signal(signal.SIGCONT)

    def restart(self, timeout: float = 60) -> None:
        """Start again on the same ports after a kill (the ports may take a moment to free)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.launch(timeout=max(5.0, deadline - time.monotonic()))
                break
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        self._wait_readable(deadline)

    def _wait_readable(self, deadline: float) -> None:
        """Answering ListBuckets is not yet serving data: right after a restart SeaweedFS answered reads of
        existing objects with InternalError for a moment (its volume not yet registered). Wait until the
        first stored object of the first bucket reads back."""
        from botocore.exceptions import BotoCoreError, ClientError

        server = S3Server(self.proc.pid, self.endpoint_url, self.access_key, self.secret_key, str(self.data_dir))
        client = server.client(timeout_s=2, attempts=1)
        while True:
            try:
                buckets = [b["Name"] for b in client.list_buckets().get("Buckets", [])]
                keys = client.list_objects_v2(Bucket=buckets[0], MaxKeys=1).get("Contents", []) if buckets else []
                if keys:
                    client.get_object(Bucket=buckets[0], Key=keys[0]["Key"])["Body"].read()
                return
            except (BotoCoreError, ClientError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.thaw()
        self._signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def requests(self, pattern: str) -> int:
        """How many served requests so far match `pattern` (a regex on the access-log line, e.g.
        r'PUT "/bucket/key/commits/')."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return len(re.findall(pattern, text))

    def wait_for(self, pattern: str, *, count: int = 1, timeout: float = 120, poll_s: float = 0.005) -> None:
        """Block until `count` served requests match `pattern`."""
        deadline = time.monotonic() + timeout
        while self.requests(pattern) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {count} request(s) matching {pattern!r} within {timeout} s")
            time.sleep(poll_s)
