"""moto's S3-compatible server as a subprocess: the tests' and benchmarks' object store."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


class S3Server:
    """moto's standalone S3-compatible server in its own process, over HTTP on loopback: the real pyarrow and
    s3fs clients talk to it as to any S3 endpoint. `env` adds settings (INITIAL_NO_AUTH_ACTION_COUNT turns IAM
    authentication on)."""

    def __init__(self, workdir: Path, env: dict | None = None):
        from trainer.distributed import free_port

        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                        cwd=workdir, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(self.endpoint, timeout=1).close()
                return
            except OSError:
                if self.process.poll() is not None:
                    break
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"moto's S3 server did not start on {self.endpoint}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()

    def client(self, key: str = "testing", secret: str = "testing"):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=key, aws_secret_access_key=secret,
                            region_name="us-east-1")
