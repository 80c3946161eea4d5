"""The container recipe, run without a container: no image daemon runs here and no base image can
be pulled, so the tests run what deploy/Dockerfile says — the same install.sh line into a fresh
venv, from a copy of the build context .dockerignore lets through, then the image's entry point
as PID 1 of its own PID namespace, its health check, and SIGTERM."""

from __future__ import annotations

import os
import queue
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import recipe
from helpers import WAIT_S, make_repo

from ferry.server.cli import build_parser
from ferry.server.convert.service import default_state_dir
from ferry.server.examples import seed_model
from ferry.server.settings import Settings, from_args

VENV_IN_IMAGE = "/opt/ferry/venv"
SRC_IN_IMAGE = "/src"
INSTALL_TIMEOUT_S = 900  # a cold pip cache downloads onnxruntime & co.; bounded all the same
STAGES = recipe.stages()
IMAGES = ("serve", "convert")


def _env() -> dict[str, str]:
    """No FERRY_* settings and no PYTHONPATH of the test run: the venv must stand alone."""
    return {k: v for k, v in os.environ.items() if not k.startswith("FERRY_") and k != "PYTHONPATH"}


def _known_flags() -> set[str]:
    return {opt for a in build_parser()._actions for opt in a.option_strings}


# ---- the recipe's shape (fast) ------------------------------------------------------------------


@pytest.mark.parametrize("image", IMAGES)
def test_each_image_runs_as_a_fixed_non_root_user(image: str) -> None:
    user = recipe.inherited(STAGES, image, "USER")
    assert user is not None
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0, "runAsNonRoot needs a numeric non-zero uid"
    assert gid.isdigit() and int(gid) != 0


@pytest.mark.parametrize("image", IMAGES)
def test_entry_point_command_and_health_check_are_exec_form_with_real_flags(image: str) -> None:
    entry = recipe.exec_form(recipe.inherited(STAGES, image, "ENTRYPOINT"))
    assert entry[-3:] == [f"{VENV_IN_IMAGE}/bin/python", "-m", "ferry.server"]
    cmd = recipe.exec_form(recipe.inherited(STAGES, image, "CMD"))
    flags = {arg.split("=", 1)[0] for arg in cmd if arg.startswith("--")}
    assert flags <= _known_flags(), flags - _known_flags()
    check = recipe.healthcheck_command(STAGES, image)
    assert check[:3] == [f"{VENV_IN_IMAGE}/bin/python", "-m", "ferry.server.probe"]
    expose = (recipe.inherited(STAGES, image, "EXPOSE") or "").split()
    assert expose == [str(Settings.port), str(Settings.metrics_port)]
    assert check[check.index("--address") + 1] == f"127.0.0.1:{Settings.port}"


@pytest.mark.parametrize("image", IMAGES)
def test_the_folders_the_command_writes_are_made_for_the_image_user(image: str) -> None:
    """The CMD's repository and the state folder the server derives from it when no
    --state-dir is given (<repository>.ferry, beside it) must exist and belong to USER: the
    user cannot create a folder in /, and the image's own command stopped with "cannot create
    the state folder /models.ferry"."""
    cmd = recipe.exec_form(recipe.inherited(STAGES, image, "CMD"))
    settings = from_args(build_parser().parse_args(cmd))
    repository = PurePosixPath(str(settings.repository))
    state = PurePosixPath(settings.state_dir or f"{repository}.ferry")
    assert state == PurePosixPath(str(default_state_dir(Path(repository))))
    user = recipe.inherited(STAGES, image, "USER")
    assert user is not None
    runs: list[str] = []
    stage: recipe.Stage | None = STAGES[image]
    while stage is not None:
        runs += stage.all("RUN")
        stage = STAGES.get(stage.parent)
    made: set[str] = set()
    owned: set[str] = set()
    for run in runs:
        for step in run.split("&&"):
            words = shlex.split(step)
            if words[:1] == ["mkdir"]:
                made.update(w for w in words[1:] if not w.startswith("-"))
            if words[:1] == ["chown"] and words[1] in (user, user.partition(":")[0]):
                owned.update(words[2:])
    for folder in (str(repository), str(state)):
        assert folder in made and folder in owned, f"{image}: create and chown {folder} to {user}"


@pytest.mark.parametrize(("image", "healthy"), [("serve", False), ("convert", True)])
def test_the_health_check_on_an_empty_repository(
    image: str, healthy: bool, tmp_path: Path, start_server: Any
) -> None:
    """A serving replica with no model must take no traffic (unhealthy); the control plane
    starts with an empty repository and fills it, so its check asks only that it answers."""
    srv = start_server(tmp_path / "repo")
    check = recipe.healthcheck_command(STAGES, image)
    argv = [sys.executable if w == f"{VENV_IN_IMAGE}/bin/python" else w for w in check]
    argv += ["--address", srv.target]  # the image's port is ephemeral here
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert (r.returncode == 0) == healthy, r.stdout + r.stderr


def test_the_slim_image_is_pid_1_itself_and_the_full_one_runs_tini() -> None:
    """serve: the server handles SIGTERM itself and starts no children. convert: conversions are
    child processes, so an init process reaps what they leave."""
    serve = recipe.exec_form(recipe.inherited(STAGES, "serve", "ENTRYPOINT"))
    assert serve[0] == f"{VENV_IN_IMAGE}/bin/python"
    convert = recipe.exec_form(recipe.inherited(STAGES, "convert", "ENTRYPOINT"))
    assert convert[:2] == ["/usr/bin/tini", "--"]
    runs = " ".join(STAGES["convert"].all("RUN"))
    assert re.search(r"apt-get install .*\btini=\S+", runs), "tini pinned from Debian's packages"


@pytest.mark.parametrize("image", IMAGES)
def test_each_image_installs_its_own_target_and_pins_every_package(image: str) -> None:
    step = recipe.install_step(STAGES, image)
    assert step[:2] == ["sh", f"{SRC_IN_IMAGE}/deploy/install.sh"]
    assert step[2:] == [VENV_IN_IMAGE, image, SRC_IN_IMAGE]
    pins = recipe.ROOT / "deploy" / "requirements" / f"{image}.txt"
    for line in pins.read_text().splitlines():
        if line and not line.startswith("#"):
            assert re.fullmatch(r"[A-Za-z0-9_.\-]+==[A-Za-z0-9_.+\-]+", line), line
    text = pins.read_text()
    assert ("torch==" in text) == (image == "convert"), "torch only in the full image"


def test_the_convert_build_takes_torch_from_the_cpu_index_by_default() -> None:
    """torch is pinned 2.13.0+cpu, which no wheel on the public index satisfies: a build
    without --build-arg TORCH_INDEX_URL found no torch. The default is PyTorch's CPU index."""
    step = recipe.install_step(STAGES, "convert")
    assert step[:2] == ["sh", f"{SRC_IN_IMAGE}/deploy/install.sh"]
    args = {a.partition("=")[0]: a.partition("=")[2] for a in STAGES["build-convert"].all("ARG")}
    assert args.get("TORCH_INDEX_URL") == "https://download.pytorch.org/whl/cpu", args
    pins = (recipe.ROOT / "deploy" / "requirements" / "convert.txt").read_text()
    assert re.search(r"^torch==[\d.]+\+cpu$", pins, re.M), "the pin only a CPU wheel satisfies"


def test_the_base_image_is_pinned_to_a_patch_release() -> None:
    text = recipe.DOCKERFILE.read_text()
    m = re.search(r"^ARG PYTHON_IMAGE=\S+:(\d+)\.(\d+)\.(\d+)-slim-\w+", text, re.M)
    assert m is not None, "pin the base image to an exact Python release"
    assert (int(m.group(1)), int(m.group(2))) == sys.version_info[:2]


# ---- the recipe, run (slow: a real pip install into a fresh venv) ------------------------------


def _install(tmp: Path, image: str) -> Path:
    context = recipe.copy_context(tmp / "context")
    venv = tmp / "venv"
    step = recipe.install_step(STAGES, image)
    argv = [w.replace(VENV_IN_IMAGE, str(venv)).replace(SRC_IN_IMAGE, str(context)) for w in step]
    r = subprocess.run(
        argv,
        env=_env() | {"PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT_S,
        check=False,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"install.sh: {image} install checked" in r.stdout
    # Every installed package is one of the pins, at the pinned version: nothing floated.
    pins = {
        line.split("==")[0].lower().replace("_", "-"): line.split("==")[1]
        for line in (context / "deploy" / "requirements" / f"{image}.txt").read_text().splitlines()
        if line and not line.startswith("#")
    }
    freeze = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "freeze", "--exclude", "ferry-serve"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        env=_env(),
    ).stdout
    for line in freeze.splitlines():
        name, _, version = line.partition("==")
        key = name.lower().replace("_", "-")
        assert pins.get(key) == version, f"{line} is not pinned in requirements/{image}.txt"
    return venv


@pytest.fixture(scope="module")
def serve_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _install(tmp_path_factory.mktemp("serve-image"), "serve")


def _image_argv(image: str, venv: Path) -> list[str]:
    entry = recipe.exec_form(recipe.inherited(STAGES, image, "ENTRYPOINT"))
    return [w.replace(VENV_IN_IMAGE, str(venv)) for w in entry]


def _as_pid_1(argv: list[str]) -> tuple[list[str], bool]:
    """Run ``argv`` as PID 1 of a new PID namespace where we may (root, util-linux unshare), as
    the container runtime would; else as a plain child."""
    unshare = shutil.which("unshare")
    if os.geteuid() != 0 or unshare is None:
        return argv, False
    probe = subprocess.run(
        [unshare, "--pid", "--fork", "--mount-proc", "true"], capture_output=True, check=False
    )
    if probe.returncode != 0:
        return argv, False
    # --kill-child: if the test kills unshare (a failed check), the namespace's PID 1 and with
    # it every process of the namespace goes too; nothing outlives the test.
    return [unshare, "--pid", "--fork", "--kill-child", "--mount-proc", *argv], True


class Running:
    """The image's process, its log lines read on a thread (bounded waits, no sleeps)."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env()
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.seen: list[str] = []

    def _read(self) -> None:
        for line in self.proc.stderr or ():
            self.lines.put(line)

    def wait_for(self, pattern: str) -> re.Match[str]:
        while True:
            try:
                line = self.lines.get(timeout=WAIT_S)
            except queue.Empty:
                raise AssertionError(f"no log line matched {pattern!r}: {self.seen}") from None
            self.seen.append(line)
            m = re.search(pattern, line)
            if m is not None:
                return m

    def server_pid(self, namespaced: bool) -> int:
        """The server's host pid: unshare's one child when it runs as PID 1 of its namespace."""
        if not namespaced:
            return self.proc.pid
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        (pid,) = children.split()
        status = Path(f"/proc/{pid}/status").read_text()
        nspid = re.search(r"^NSpid:\s+(.*)$", status, re.M)
        assert nspid is not None and nspid.group(1).split()[-1] == "1", "not PID 1"
        return int(pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


@pytest.fixture
def running() -> Iterator[list[Running]]:
    started: list[Running] = []
    yield started
    for r in started:
        r.stop()


def _probe(venv: Path, image: str, port: int, *extra: str) -> subprocess.CompletedProcess[str]:
    check = recipe.healthcheck_command(STAGES, image)
    argv = [w.replace(VENV_IN_IMAGE, str(venv)) for w in check]
    argv += ["--address", f"127.0.0.1:{port}", *extra]  # the image's port is ephemeral here
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, env=_env(), check=False)


@pytest.mark.slow
def test_the_serve_image_install_serves_answers_its_health_check_and_stops_on_sigterm(
    serve_venv: Path, tmp_path: Path, running: list[Running]
) -> None:
    root = make_repo(tmp_path / "repo", {"seed": seed_model()})
    python = serve_venv / "bin" / "python"
    has_torch = subprocess.run(
        [str(python), "-c", "import torch"], capture_output=True, env=_env(), check=False
    )
    assert has_torch.returncode != 0, "the slim image must not contain torch"
    cmd = recipe.exec_form(recipe.inherited(STAGES, "serve", "CMD"))
    # Kubernetes' args replace CMD: the image's flags, the repository here, ephemeral ports.
    args = [a for a in cmd if not a.startswith("--repository")]
    args += [f"--repository={root}", "--host=127.0.0.1", "--port=0", "--management-port=-1"]
    args += ["--metrics-port=-1", "--http-port=-1", "--management-http-port=-1", "--grace-period=5"]
    argv, namespaced = _as_pid_1([*_image_argv("serve", serve_venv), *args])
    srv = Running(argv)
    running.append(srv)
    m = srv.wait_for(r"ferry serving \d+ model version\(s\) on 127\.0\.0\.1:(\d+)")
    port = int(m.group(1))
    assert '"level"' in m.string, "the image logs JSON lines"
    ready = _probe(serve_venv, "serve", port)
    assert ready.returncode == 0, ready.stderr
    assert _probe(serve_venv, "serve", port, "--alive").returncode == 0
    pid = srv.server_pid(namespaced)
    os.kill(pid, signal.SIGTERM)
    srv.wait_for(r"ferry shutting down")
    assert srv.proc.wait(timeout=60) == 0
    if not namespaced:
        pytest.skip("ran as a plain child: PID 1 needs root and util-linux unshare")


@pytest.mark.slow
def test_the_convert_image_install_has_cpu_torch_and_serves_under_tini(
    tmp_path: Path, running: list[Running]
) -> None:
    venv = _install(tmp_path, "convert")
    r = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import torch; print(torch.version.cuda)"],
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(),
        check=True,
    )
    assert r.stdout.strip() == "None", "the full image holds the CPU build of torch"
    entry = _image_argv("convert", venv)
    if not Path(entry[0]).exists():
        pytest.skip(f"{entry[0]} is not installed here (apt-get install tini); install checked")
    root = make_repo(tmp_path / "repo", {"seed": seed_model()})
    token = tmp_path / "management-token"
    token.write_text("a-management-token\n")
    args = [f"--repository={root}", "--host=127.0.0.1", "--port=0", "--management-port=0"]
    args += [
        "--metrics-port=-1",
        "--http-port=-1",
        "--management-http-port=-1",
        "--grace-period=5",
        f"--management-token-file={token}",
    ]
    argv, namespaced = _as_pid_1([*entry, *args])
    srv = Running(argv)
    running.append(srv)
    m = srv.wait_for(r"on 127\.0\.0\.1:\d+ \(.*management 127\.0\.0\.1:(\d+)")
    mport = int(m.group(1))
    probed = _probe(venv, "convert", mport, "--token-file", str(token))
    assert probed.returncode == 0, probed.stderr
    # SIGTERM to tini (PID 1 of the namespace, or the plain child): it forwards to the server.
    os.kill(srv.server_pid(namespaced), signal.SIGTERM)
    srv.wait_for(r"ferry shutting down")
    assert srv.proc.wait(timeout=60) == 0
