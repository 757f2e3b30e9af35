"""docs/data-on-s3.md's walkthrough, run as a newcomer runs it: its shell block, command by command, from a shell
without an activated venv, against the S3 server it starts (a free port and a fresh bucket instead of 9000 and
`demo`, the `<run id>` the trainer prints)."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import time
import urllib.request
import uuid

import pytest

from tests.conftest import ROOT

DOC = ROOT / "docs" / "data-on-s3.md"


def walkthrough() -> list[str]:
    """The commands of the page's first shell block (continuation lines joined, comments dropped)."""
    block = re.search(r"```bash\n(.*?)```", DOC.read_text(), re.S).group(1)
    return [line for line in block.replace("\\\n", " ").splitlines() if line.strip() and not line.startswith("#")]


def wait_for(url: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"nothing answered at {url}")


@pytest.mark.slow
def test_the_s3_walkthrough_runs_as_written(tmp_path):
    from trainer.distributed import free_port

    commands = walkthrough()
    assert [c.split()[0] for c in commands] == [".venv/bin/python", "export"] + [".venv/bin/python"] * 4
    for name in (".venv", "configs"):
        (tmp_path / name).symlink_to(ROOT / name)
    port, bucket = free_port(), f"demo-{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
    env["PATH"] = "/usr/local/bin:/usr/bin:/bin"  # no venv on PATH
    server, output = None, ""
    try:
        for command in commands:
            command = command.replace("9000", str(port)).replace("s3://demo", f"s3://{bucket}").replace(
                "Bucket='demo'", f"Bucket='{bucket}'")
            if command.startswith("export "):
                env.update(dict(pair.split("=", 1) for pair in shlex.split(command)[1:]))
                continue
            if command.rstrip().endswith("&"):
                server = subprocess.Popen(["bash", "-c", command.rstrip().rstrip("&")], cwd=tmp_path, env=env,
                                          start_new_session=True)
                wait_for(f"http://127.0.0.1:{port}")
                continue
            if "<run id>" in command:
                printed = re.search(r"serving\.recommend --run (s3://\S+)", output)
                assert printed, "the trainer prints the recommend command with its export's URI"
                command = command.replace(f"s3://{bucket}/exports/<run id>", printed.group(1))
            result = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True,
                                    timeout=600)
            assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
            output = result.stdout + result.stderr
        lines = [line for line in output.splitlines() if re.match(r"\s+\d+\s", line)]
        assert len(lines) == 10, output[-2000:]
    finally:
        if server is not None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
