"""Many hosts on one machine (issue 11, part 4): a control host and serving replicas in network
namespaces of their own, sharing one repository folder, and a client that balances over them.

    sudo python deploy/multihost.py                       # 2 replicas, ~30 s
    sudo python deploy/multihost.py --replicas 3 --load-seconds 10

What it does, and prints as it goes:
1. builds hosts as network namespaces (``ip netns``), each with one veth into a bridge that lives
   in a namespace of its own (the "switch"), so nothing is added to this machine's own network:
   ``<prefix>-ctl`` (management + conversion), ``<prefix>-r1`` ... (serving replicas, which poll
   the repository), ``<prefix>-cli`` (the client);
2. checks that the client spreads calls over every replica (each replica's ModelStatistics);
3. publishes a new version through the control host (a real upload + fp32 conversion) and
   measures how long until every replica serves it (at most one poll interval + load time);
4. kills one replica (SIGKILL) while the client keeps calling, and counts the calls that failed
   after the SDK's retries (the target is none) and how many attempts the retries took;
5. stops everything and deletes every namespace, also when a step fails.

Needs root (``ip netns``); traffic stays inside the namespaces it made. ``--json`` prints the
figures as one JSON object on the last line (tests/deploy/test_multihost.py reads it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SUBNET = "10.251.77"
MAX_REPLICAS = 252  # the /24's host addresses 1..254, less the control host and the client
PORT = 8001
MANAGEMENT_PORT = 8003
CLIENT = r"""
import json, sys, time
import numpy as np
from ferry.client import InferenceClient, RetryPolicy
targets, seconds = sys.argv[1].split(","), float(sys.argv[2])
x = {"input": np.ones((1, 3), np.float32)}
attempts = {"n": 0}
ok = failed = 0
errors = {}
retry = RetryPolicy(max_attempts=5, initial_backoff=0.02, max_backoff=0.2)
with InferenceClient(targets, retry=retry, timeout=5) as client:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            client.infer("seed", x)
            ok += 1
            if ok == 20:
                print("running", flush=True)  # the kill may come: the load is under way
        except Exception as exc:
            failed += 1
            errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
print(json.dumps({"ok": ok, "failed": failed, "errors": errors}))
"""


def run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=60)


class Hosts:
    """Namespaces joined by one bridge; removed on exit whatever happened."""

    def __init__(self, prefix: str, names: list[str]) -> None:
        self.prefix = prefix
        self.switch = f"{prefix}-sw"
        self.names = names
        self.address = {name: f"{SUBNET}.{i + 1}" for i, name in enumerate(names)}
        self.made: list[str] = []

    def ns(self, name: str) -> str:
        return f"{self.prefix}-{name}"

    def build(self) -> None:
        # Noted before it is made: a SIGTERM that lands while `ip netns add` runs (its exception
        # raised in the wait) left a namespace made but not noted, and never removed.
        self.made.append(self.switch)
        run("ip", "netns", "add", self.switch)
        run("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
        run("ip", "-n", self.switch, "link", "set", "br0", "up")
        for i, name in enumerate(self.names):
            ns = self.ns(name)
            self.made.append(ns)
            run("ip", "netns", "add", ns)
            port = f"p{i}"
            run(
                "ip",
                "-n",
                self.switch,
                "link",
                "add",
                port,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                ns,
            )
            run("ip", "-n", self.switch, "link", "set", port, "master", "br0")
            run("ip", "-n", self.switch, "link", "set", port, "up")
            run("ip", "-n", ns, "addr", "add", f"{self.address[name]}/24", "dev", "eth0")
            run("ip", "-n", ns, "link", "set", "eth0", "up")
            run("ip", "-n", ns, "link", "set", "lo", "up")

    def remove(self) -> None:
        for ns in reversed(self.made):
            run("ip", "netns", "del", ns, check=False)
        self.made.clear()

    def exec(self, name: str, *cmd: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns(name), *cmd]


@contextlib.contextmanager
def processes() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    try:
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def serve_command(repo: Path, host: str, *, management: bool, poll: float) -> list[str]:
    cmd = [sys.executable, "-m", "ferry.server", "--repository", str(repo), "--host", host]
    cmd += ["--port", str(PORT), "--http-port", "-1", "--management-http-port", "-1"]
    cmd += ["--metrics-port", "-1", "--grace-period", "3", "--log-level", "WARNING"]
    if management:
        cmd += ["--management-host", host, "--management-port", str(MANAGEMENT_PORT)]
    else:
        cmd += ["--management-port", "-1", "--poll-interval", str(poll)]
    return cmd


def wait_until(predicate: Any, what: str, timeout: float = 120.0) -> float:
    """Seconds until ``predicate()`` held; raises after ``timeout``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(0.02)
    raise TimeoutError(f"timed out waiting for {what}")


def in_ns(hosts: Hosts, name: str, code: str, *args: str, timeout: float = 120) -> str:
    """Run a Python snippet inside a namespace (the SDK talks to the hosts from there)."""
    r = subprocess.run(
        hosts.exec(name, sys.executable, "-c", code, *args),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if r.returncode != 0:
        raise RuntimeError(f"{name}: {r.stderr[-2000:]}")
    return r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""


VERSIONS = r"""
import json, sys
from ferry.client import InferenceClient
out = {}
for t in sys.argv[1].split(","):
    try:
        with InferenceClient(t, timeout=2) as c:
            stats = c.statistics("seed")
        out[t] = {"versions": sorted(s.version for s in stats), "count": sum(s.inference_count for s in stats)}
    except Exception as exc:
        out[t] = {"error": type(exc).__name__}
print(json.dumps(out))
"""

PUBLISH = r"""
import io, sys
import onnx
from ferry.client import ConversionClient, Quantization
from ferry.server.examples import seed_model
target, token = sys.argv[1], sys.argv[2]
buf = io.BytesIO()
onnx.save(seed_model(seed=1), buf)
with ConversionClient(target, token=token, timeout=120) as conv:
    upload = conv.upload("seed", buf.getvalue(), format="onnx")
    job = conv.convert(upload, quantization=Quantization(mode="none"), benchmark="off")
    job = job.wait(timeout=300, progress=False)
    print(job.version)
"""


def _exit_on_sigterm(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--poll-interval", type=float, default=1.0)
    ap.add_argument("--load-seconds", type=float, default=6.0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    # Checked before anything is built: 0 or 1 replica left the kill step no survivor (with 0
    # it killed the control host), past 252 the hosts' addresses ran out of the /24 (a
    # CalledProcessError from ip), and a poll interval of 0 never showed the new version.
    if not 2 <= args.replicas <= MAX_REPLICAS:
        ap.error(f"--replicas {args.replicas}: give 2..{MAX_REPLICAS} (one is killed under load)")
    for flag, value in (
        ("--poll-interval", args.poll_interval),
        ("--load-seconds", args.load_seconds),
    ):
        if not (math.isfinite(value) and value > 0):
            ap.error(f"{flag} {value}: give a number of seconds above 0")
    if os.geteuid() != 0 or shutil.which("ip") is None:
        raise SystemExit("multihost: needs root and iproute2 (ip netns)")
    # SIGTERM (a `timeout`, a CI job cancelled) ended the process without its finally blocks:
    # every namespace, server and temporary folder it had made stayed on the machine. As an
    # exception it unwinds through them, as Ctrl-C's KeyboardInterrupt does.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    from ferry.server.core.repository import ModelRepository
    from ferry.server.examples import seed_model, write_model

    replicas = [f"r{i + 1}" for i in range(args.replicas)]
    hosts = Hosts(f"fy{os.getpid() % 100000}", ["ctl", *replicas, "cli"])
    figures: dict[str, Any] = {}
    work = Path(tempfile.mkdtemp(prefix="ferry-multihost-"))
    repo = work / "repository"
    write_model(ModelRepository(repo, create=True), "seed", seed_model())
    token = secrets.token_hex(16)
    env = {**os.environ, "FERRY_MANAGEMENT_TOKEN": token}
    try:
        hosts.build()
        with processes() as procs:
            ctl = hosts.address["ctl"]
            procs.append(
                subprocess.Popen(
                    hosts.exec("ctl", *serve_command(repo, ctl, management=True, poll=0)),
                    env=env,
                    text=True,
                )
            )
            for r in replicas:
                cmd = serve_command(
                    repo, hosts.address[r], management=False, poll=args.poll_interval
                )
                procs.append(subprocess.Popen(hosts.exec(r, *cmd), env=env, text=True))
            targets = ",".join(f"{hosts.address[r]}:{PORT}" for r in replicas)

            def versions() -> dict[str, Any]:
                return json.loads(in_ns(hosts, "cli", VERSIONS, targets) or "{}")

            wait_until(
                lambda: all("versions" in v for v in versions().values()), "replicas to serve"
            )
            in_ns(hosts, "cli", CLIENT, targets, "2")
            spread = {t: v["count"] for t, v in versions().items()}
            figures["calls_per_replica"] = spread
            print("calls per replica:", spread)
            start = time.monotonic()
            in_ns(hosts, "ctl", PUBLISH, f"{ctl}:{MANAGEMENT_PORT}", token, timeout=600)
            published = time.monotonic()
            figures["publish_seconds"] = round(published - start, 2)
            seen = wait_until(
                lambda: all(2 in v.get("versions", []) for v in versions().values()),
                "every replica to serve version 2",
            )
            figures["new_version_everywhere_after_s"] = round(seen, 2)
            figures["served_after_publish"] = {t: v["versions"] for t, v in versions().items()}
            figures["poll_interval_s"] = args.poll_interval
            print(
                f"version 2 published in {figures['publish_seconds']} s; served by every replica {seen:.2f} s later (poll {args.poll_interval} s)"
            )
            load = subprocess.Popen(
                hosts.exec("cli", sys.executable, "-c", CLIENT, targets, str(args.load_seconds)),
                stdout=subprocess.PIPE,
                text=True,
            )
            assert load.stdout is not None
            load.stdout.readline()  # "running": the client has answers, so the kill is under load
            victim = procs[1 + len(replicas) - 1]
            victim.kill()
            out, _ = load.communicate(timeout=args.load_seconds + 120)
            result = json.loads(out.strip().splitlines()[-1])
            figures["during_kill"] = result
            print(
                f"replica {replicas[-1]} killed under load: {result['ok']} calls answered, {result['failed']} failed after retries {result['errors']}"
            )
    finally:
        hosts.remove()
        shutil.rmtree(work, ignore_errors=True)
    left = [ns for ns in run("ip", "netns", "list").stdout.split() if ns.startswith(hosts.prefix)]
    figures["namespaces_left"] = left
    if args.json:
        print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
