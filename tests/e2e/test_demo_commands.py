"""`make demo` as a new user meets it: a short, quiet console, and every follow-up command it prints run as
printed, from a shell whose PATH does not hold the venv: the MLflow UI answers, the registered model served
over REST returns recommendations for the printed request, and `recommend` returns items for the printed ids.
Only the ports are swapped for free ones (5000 and 5001 may be taken on the machine running the suite)."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import time
import urllib.request

import pytest

from tests.conftest import ROOT
from trainer.distributed import free_port

BARE_PATH = "/usr/local/bin:/usr/bin:/bin"  # no .venv/bin: nothing activated
MAKE_STATE = ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")  # under `make test` a nested make would print its directories


def user_shell() -> dict[str, str]:
    """The environment of a user's fresh shell: no venv on PATH, not inside a make."""
    return {**{k: v for k, v in os.environ.items() if k not in MAKE_STATE}, "PATH": BARE_PATH}
MAX_LINES = 40
LIBRARY_NOISE = re.compile(r"Warning|WARNING|warnings\.warn|site-packages|Traceback")


def shell(command: str, **kwargs) -> subprocess.CompletedProcess:
    """Output decoded by hand: text mode would turn a progress bar's carriage returns into new lines."""
    result = subprocess.run(["bash", "-c", command], cwd=ROOT, env=user_shell(), capture_output=True, **kwargs)
    result.stdout, result.stderr = result.stdout.decode(), result.stderr.decode()
    return result


def printed_commands(output: str) -> dict[str, str]:
    """The indented command lines the trainer printed, by what they start."""
    commands = {}
    for line in output.splitlines():
        text = line.strip()
        if not line.startswith("  ") or not text:
            continue
        for name, marker in (("ui", "mlflow ui"), ("serve", "mlflow models serve"), ("curl", "curl "),
                             ("recommend", "serving.recommend")):
            if marker in text:
                commands[name] = text
    return commands


def wait_for(check, seconds: float):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(1)
    return None


def started(command: str) -> subprocess.Popen:
    return subprocess.Popen(["bash", "-c", command], cwd=ROOT, env=user_shell(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def stop(server: subprocess.Popen) -> None:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
    server.wait(timeout=60)


@pytest.mark.slow
def test_make_demo_is_quiet_and_its_printed_commands_work_as_printed(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = f"tracking.uri={uri} export.dir={tmp_path / 'exports'} tracking.outbox={tmp_path / 'outbox'}"
    demo = shell(f"make demo DEMO={shlex.quote(str(tmp_path / 'data'))} ARGS={shlex.quote(args)}", timeout=900)
    output = demo.stdout + demo.stderr
    assert demo.returncode == 0, output[-3000:]
    lines = output.rstrip("\n").split("\n")  # as a terminal shows them: a progress bar redraws its line (\r)
    assert len(lines) <= MAX_LINES, f"{len(lines)} lines:\n{output}"
    assert not [line for line in lines if LIBRARY_NOISE.search(line)], output
    last = demo.stdout.rstrip("\n").split("\n")[-2:]
    assert last[0].startswith("test: ") and last[1].startswith("popularity test: "), f"final metrics last: {last}"
    commands = printed_commands(output)
    assert set(commands) == {"ui", "serve", "curl", "recommend"}, output

    recommend = shell(commands["recommend"], timeout=300)
    assert recommend.returncode == 0, recommend.stderr
    assert "unknown item ids" not in recommend.stderr, "every printed id is in the catalogue"
    ranked = [line.strip() for line in recommend.stdout.strip().splitlines()]
    assert len(ranked) == 20

    printed = (commands["ui"].replace("--port 5000", "--port {ui}"),
               commands["serve"].replace("--port 5001", "--port {serve}"))
    shortcuts = (f"make ui TRACKING_URI={uri} UI_PORT={{ui}}",
                 f"make serve TRACKING_URI={uri} SERVE_PORT={{serve}}")  # MODEL defaults to the demo's
    for ui_command, serve_command in (printed, shortcuts):
        check_servers(ui_command, serve_command, commands["curl"])

    history = re.search(r"--history (\S+)", commands["recommend"]).group(1)
    run = re.search(r"--run (\S+)", commands["recommend"]).group(1)
    shortcut = shell(f"make recommend RUN={run} HISTORY={history} K=5", timeout=300)
    assert shortcut.returncode == 0, shortcut.stderr
    answered = [line.strip() for line in shortcut.stdout.strip().splitlines()[-5:]]
    assert answered == ranked[:5], "make recommend answers as the command does"


def check_servers(ui_command: str, serve_command: str, curl: str) -> None:
    """The UI answers, and the served model answers the printed request with five items."""
    ui_port, serve_port = free_port(), free_port()
    ui = started(ui_command.format(ui=ui_port))
    serve = started(serve_command.format(serve=serve_port))
    try:
        def page() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{ui_port}/", timeout=5) as response:
                    return response.status == 200
            except OSError:
                return False

        assert wait_for(page, 120), "the MLflow UI answers"

        def answer() -> dict | None:
            result = shell(curl.replace(":5001/", f":{serve_port}/"), timeout=60)
            return json.loads(result.stdout) if result.returncode == 0 and result.stdout.startswith("{") else None

        reply = wait_for(answer, 240)
        assert reply is not None, "the served model answers the printed request"
        assert len(reply["predictions"][0]["items"]) == 5
    finally:
        stop(ui)
        stop(serve)
