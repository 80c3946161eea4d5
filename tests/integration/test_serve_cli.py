"""``python -m ferry.server`` and ``ferry serve`` as a user runs them: real processes."""

from __future__ import annotations

import logging
import os
import queue
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers import WAIT_S, make_repo
from serverutil import ServerThread

from ferry.client import InferenceClient
from ferry.server.examples import seed_model

FERRY = str(Path(sys.executable).with_name("ferry"))


def _env() -> dict[str, str]:
    """The test's environment without FERRY_* settings that would change what is tested."""
    return {k: v for k, v in os.environ.items() if not k.startswith("FERRY_")}


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_module_help_exits_0() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "ferry.server", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
        check=False,
    )
    assert r.returncode == 0, r.stderr
    assert "--repository" in r.stdout
    assert "--poll-interval" in r.stdout


@pytest.mark.parametrize(
    "which",
    ["--port", "--management-port", "--metrics-port", "--http-port", "--management-http-port"],
    ids=lambda s: s.strip("-"),
)
def test_serve_on_a_busy_port_fails_with_one_line(
    tmp_path: Path, busy_port: int, which: str
) -> None:
    ports = {"--port": "0", "--management-port": "0", "--metrics-port": "0"}
    ports |= {"--http-port": "0", "--management-http-port": "0"}
    ports[which] = str(busy_port)
    (tmp_path / "repo").mkdir()
    args = [FERRY, "serve", "--repository", str(tmp_path / "repo"), "--host", "127.0.0.1"]
    args += ["--metrics-host", "127.0.0.1"]
    for flag, value in ports.items():
        args += [flag, value]
    r = subprocess.run(args, capture_output=True, text=True, timeout=120, env=_env(), check=False)
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("ferry serve: ")
    assert str(busy_port) in lines[0]
    assert "Traceback" not in r.stderr


# ``python -m ferry.server`` started with a soft open-file limit of argv[1] (systemd's and most
# container runtimes' 1,024, or lower).
_LOW_OPEN_FILES = """
import resource, runpy, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]), resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
sys.argv = ["ferry.server"]
runpy.run_module("ferry.server", run_name="__main__", alter_sys=True)
"""


def _open_files_limit(pid: int) -> int:
    """The soft limit of a process, as /proc shows it."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft = line.split()[3]
            return 1 << 30 if soft == "unlimited" else int(soft)
    raise AssertionError("no open-file limit in /proc")


def test_serve_runs_until_sigterm(tmp_path: Path) -> None:
    """Settings from the environment, a real inference, then SIGTERM: a clean exit 0."""
    root = make_repo(tmp_path / "repo", {"seed": seed_model()})
    env = _env() | {
        "FERRY_REPOSITORY": str(root),
        "FERRY_HOST": "127.0.0.1",
        "FERRY_PORT": "0",
        "FERRY_MANAGEMENT_PORT": "-1",
        "FERRY_METRICS_PORT": "-1",
        "FERRY_HTTP_PORT": "-1",
        "FERRY_MANAGEMENT_HTTP_PORT": "-1",
        "FERRY_GRACE_PERIOD": "5",
    }
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    proc = subprocess.Popen(
        [sys.executable, "-c", _LOW_OPEN_FILES, str(min(256, hard))],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(
        target=lambda: [lines.put(line) for line in proc.stderr or ()], daemon=True
    )
    reader.start()
    try:
        port = None
        while port is None:
            line = lines.get(timeout=WAIT_S)  # bounded: the server logs once it serves
            m = re.search(r"ferry serving \d+ model version\(s\) on 127\.0\.0\.1:(\d+)", line)
            port = int(m.group(1)) if m else None
        # It serves with the open-file limit the host allows, not the 256 it was started with.
        assert _open_files_limit(proc.pid) >= min(hard, 4096)
        with InferenceClient(f"127.0.0.1:{port}", timeout=30) as client:
            assert client.ready()
            out = client.infer("seed", {"input": np.ones((2, 3), np.float32)})
            assert out["logits"].shape == (2, 1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# The server, with each model's session opening held until a file exists: a start-up load
# that is still running when SIGTERM arrives, without timing.
_HELD_LOAD = """
import sys, time
from pathlib import Path
import ferry.server.grpc.app as app
from ferry.server.cli import main

release, opened = Path(sys.argv[1]), Path(sys.argv[2])
original = app.open_session

def held(path, config, **kw):
    with opened.open("a") as f:
        f.write(path.parent.parent.name + "\\n")
    print("opening " + path.parent.parent.name, file=sys.stderr, flush=True)
    while not release.exists():
        time.sleep(0.01)
    return original(path, config, **kw)

app.open_session = held
sys.exit(main(sys.argv[3:]))
"""


def _sigterm_once_loading(
    proc: subprocess.Popen[str], release: Path, opening: str, first_wait: float
) -> list[str]:
    """SIGTERM ``proc`` once a stderr line starts with ``opening`` (a held session opening),
    release the held loads once it says it is shutting down, and return every stderr line;
    the process must exit 0. Each wait is bounded: no line, no pass."""
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stderr or ()], daemon=True).start()
    seen: list[str] = []
    try:
        while not any(line.startswith(opening) for line in seen):
            seen.append(lines.get(timeout=first_wait))
        proc.send_signal(signal.SIGTERM)
        while not any("shutting down" in line for line in seen):
            seen.append(lines.get(timeout=WAIT_S))
        release.touch()  # the loads already running may finish now
        assert proc.wait(timeout=WAIT_S) == 0, seen
    finally:
        release.touch()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    while not lines.empty():
        seen.append(lines.get())
    return seen


def test_sigterm_during_the_start_up_load_stops_without_loading_the_rest(tmp_path: Path) -> None:
    """A large repository takes minutes to load; SIGTERM then waited for all of it, past any
    termination grace period, and the process was killed. Now the loads not yet begun are
    given up and the server exits 0 without ever serving."""
    models = {f"m{i}": seed_model() for i in range(8)}
    root = make_repo(tmp_path / "repo", models)
    release, opened = tmp_path / "release", tmp_path / "opened"
    args = [f"--repository={root}", "--host=127.0.0.1", "--port=0", "--management-port=-1"]
    args += ["--metrics-port=-1", "--http-port=-1", "--management-http-port=-1"]
    proc = subprocess.Popen(
        [sys.executable, "-c", _HELD_LOAD, str(release), str(opened), *args],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=_env(),
    )
    seen = _sigterm_once_loading(proc, release, "opening ", WAIT_S)
    assert not any("ferry serving" in line for line in seen), seen
    assert len(opened.read_text().split()) < len(models), "the rest of the load was given up"


# A sitecustomize for the worker processes --workers starts (they are new interpreters): their
# session openings are held until a file exists, the first process's are not.
_HOLD_IN_WORKERS = """
import os, sys, time
from pathlib import Path

if os.environ.get("FERRY_WORKER_SOCKET") and os.environ.get("HELD_LOAD_RELEASE"):
    import ferry.server.grpc.app as app

    release = Path(os.environ["HELD_LOAD_RELEASE"])
    original = app.open_session

    def held(path, config, **kw):
        print("worker opening " + path.parent.parent.name, file=sys.stderr, flush=True)
        while not release.exists():
            time.sleep(0.01)
        return original(path, config, **kw)

    app.open_session = held
"""


def test_sigterm_while_the_workers_load_stops_without_waiting_for_them(tmp_path: Path) -> None:
    """With --workers, each worker loads the repository again before it serves; SIGTERM then
    waited for every worker's whole load."""
    root = make_repo(tmp_path / "repo", {f"m{i}": seed_model() for i in range(4)})
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_HOLD_IN_WORKERS)
    release = tmp_path / "release"
    env = _env() | {
        "PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]),
        "HELD_LOAD_RELEASE": str(release),
    }
    args = [FERRY, "serve", f"--repository={root}", "--host=127.0.0.1", "--port=0"]
    args += ["--management-port=-1", "--metrics-port=-1", "--http-port=-1"]
    args += ["--management-http-port=-1", "--workers=2"]
    proc = subprocess.Popen(
        args, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env
    )
    # The first process loads, then spawns the workers: their openings come later.
    seen = _sigterm_once_loading(proc, release, "worker opening ", WAIT_S * 3)
    assert not any("inference workers on port" in line for line in seen), seen


def test_a_missing_repository_stops_the_start_with_one_line(tmp_path: Path) -> None:
    """A typo in --repository must not start a server that serves nothing."""
    missing = tmp_path / "no-such-folder"
    args = [FERRY, "serve", "--repository", str(missing), "--host", "127.0.0.1", "--port", "0"]
    args += ["--management-port", "-1", "--metrics-port", "-1"]
    r = subprocess.run(args, capture_output=True, text=True, timeout=120, env=_env(), check=False)
    assert r.returncode == 1
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert "does not exist" in lines[0] and "--create-repository" in lines[0]
    assert not missing.exists()


@pytest.mark.parametrize("flag", ["--host", "--management-host", "--metrics-host"])
def test_a_host_that_does_not_resolve_says_what_to_give(tmp_path: Path, flag: str) -> None:
    """grpc said only "in use or not permitted" (and wrote a C-core line) for a typo in a host."""
    hosts = {"--host": "127.0.0.1", "--management-host": "127.0.0.1"}
    hosts["--metrics-host"] = "127.0.0.1"
    hosts[flag] = "no such host!"
    (tmp_path / "repo").mkdir()
    token = tmp_path / "token"  # a management host off loopback needs one
    token.write_text("s3cret-" * 6)
    args = [FERRY, "serve", "--repository", str(tmp_path / "repo"), "--port", "0"]
    args += ["--management-token-file", str(token)]
    args += ["--management-port", "0", "--metrics-port", "0", "--http-port", "0"]
    args += ["--management-http-port", "0"]
    for name, value in hosts.items():
        args += [name, value]
    r = subprocess.run(args, capture_output=True, text=True, timeout=120, env=_env(), check=False)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr and "add_port" not in r.stderr, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("ferry serve: ")]
    assert len(lines) == 1, r.stderr
    assert "'no such host!' is not an IP address or a host name" in lines[0]
    assert "0.0.0.0" in lines[0]


def test_a_state_dir_that_is_a_file_stops_the_start_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "repo").mkdir()
    state = tmp_path / "state"
    state.write_text("not a folder")
    args = [FERRY, "serve", "--repository", str(tmp_path / "repo"), "--host", "127.0.0.1"]
    args += ["--port", "0", "--management-port", "0", "--metrics-port", "-1"]
    args += ["--http-port", "-1", "--management-http-port", "-1", "--state-dir", str(state)]
    r = subprocess.run(args, capture_output=True, text=True, timeout=120, env=_env(), check=False)
    assert r.returncode == 1
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert "is not a folder" in lines[0] and "--state-dir" in lines[0]
    assert state.read_text() == "not a folder"


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"management": ""}, "the management token file"),
        ({"inference": "one\ntwo\n"}, "must be one line"),
        ({"inference": "same\n", "management": "same\n"}, "tokens are equal"),
    ],
    ids=["empty", "two-lines", "equal"],
)
def test_a_bad_token_file_stops_the_start_with_one_line(
    tmp_path: Path, files: dict[str, str], expected: str
) -> None:
    """What a token file holds is read at start, after the settings were built: an empty one
    was a ValueError traceback."""
    (tmp_path / "repo").mkdir()
    args = [FERRY, "serve", "--repository", str(tmp_path / "repo"), "--host", "127.0.0.1"]
    args += ["--port", "0", "--management-port", "0", "--metrics-port", "-1"]
    args += ["--http-port", "-1", "--management-http-port", "-1"]
    for listener, text in files.items():
        (tmp_path / listener).write_text(text)
        args += [f"--{listener}-token-file", str(tmp_path / listener)]
    r = subprocess.run(args, capture_output=True, text=True, timeout=120, env=_env(), check=False)
    assert r.returncode == 1
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("ferry serve: ") and expected in lines[0]


def test_serve_without_the_server_extra_says_which_to_install() -> None:
    """The SDK alone installed: no traceback, the extra to install."""
    code = (
        "import sys; sys.modules['onnxruntime'] = None\n"
        "from ferry.server.cli import main\n"
        "sys.exit(main(['--repository', '.']))\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
        check=False,
    )
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert "pip install 'ferry-serve[server]'" in r.stderr


def test_json_log_lines(tmp_path: Path) -> None:
    import json
    import logging

    from ferry.server.logs import JsonFormatter

    record = logging.LogRecord(
        "ferry.x", logging.INFO, __file__, 1, "model %s loaded", ("m",), None
    )
    entry = json.loads(JsonFormatter().format(record))
    assert entry["level"] == "INFO" and entry["logger"] == "ferry.x"
    assert entry["message"] == "model m loaded" and entry["time"].endswith("Z")


def test_the_start_up_line_says_which_listeners_are_off(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A listener disabled with port -1 was printed as port 0 (the port that asks for a free
    one), so the line read as if every listener served; it is now "off", the others
    host:port as bound."""
    off = {"http_port": -1, "management_http_port": -1, "metrics_port": -1}
    logs = caplog.at_level(logging.INFO, logger="ferry.server.grpc.app")
    with logs, ServerThread(tmp_path / "repo", **off) as srv:
        assert srv.app is not None
        port, management = srv.app.inference_port, srv.app.management_port
    lines = [r.getMessage() for r in caplog.records if "ferry serving" in r.getMessage()]
    assert lines == [
        f"ferry serving 0 model version(s) on 127.0.0.1:{port} (HTTP off; "
        f"management 127.0.0.1:{management}, HTTP off; metrics off)"
    ]
