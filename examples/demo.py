"""Ferry end to end, on this machine: `make demo`.

Starts a server on the default repository (./model-repository) on free loopback ports, registers
the seed article's model (``nn.Sequential(Linear(3, 4), ReLU(), Linear(4, 1))``) as a state_dict
plus its architecture name, converts an fp32 and a dynamic-int8 version, runs an inference on
each (checked against PyTorch), runs a 10-second load test, prints the report, stops the server
and says where it ran and what to try next. Needs the `convert` extra (torch); `make install`
has it.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ferry.client import ConversionClient, FerryError, InferenceClient, Quantization
from ferry.client.loadtest import LoadTestConfig, run
from ferry.server.examples import main as examples_main

MODEL = "demo"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(repository: Path) -> tuple[subprocess.Popen[bytes], str, str]:
    port, mport = free_port(), free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ferry.server",
            "--repository",
            str(repository),
            "--create-repository",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--management-port",
            str(mport),
            "--metrics-port",
            "-1",
            "--http-port",
            "-1",
            "--management-http-port",
            "-1",
            "--log-level",
            "WARNING",
        ]
    )
    target, management = f"127.0.0.1:{port}", f"127.0.0.1:{mport}"
    deadline = time.monotonic() + 120
    # Up, not "ready": health is NOT_SERVING while the repository has no model yet.
    with InferenceClient(target, timeout=1.0) as client:
        while True:
            try:
                client.list_models()
                break
            except FerryError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    raise SystemExit("demo: the server did not start; see its log above") from None
                time.sleep(0.2)
    return proc, target, management


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, default=Path("model-repository"))
    parser.add_argument("--duration", type=float, default=10.0, help="load test seconds")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1)).eval()
    examples = torch.randn(8, 3)

    # The examples the closing lines point at (`ferry loadtest mlp`). `make install` writes them
    # once, into the repository of that first run: a later `make demo REPO=other` (or this
    # script run alone) had none, and the suggested commands answered NOT_FOUND.
    print(f"== example models in {args.repository}")
    examples_main(["--repository", str(args.repository)])
    print(f"== starting ferry on {args.repository}")
    proc, target, management = start_server(args.repository)
    print(f"   up: inference on {target}, management on {management} (free ports, this run only)")
    versions: dict[str, int | None] = {}
    try:
        with ConversionClient(management) as conv, InferenceClient(target, timeout=30) as infer:
            print("== uploading the seed model (state_dict + architecture 'seed')")
            upload = conv.upload(MODEL, model, architecture="seed", example_inputs=examples)
            print(
                f"   upload {upload.upload_id}: {upload.size_bytes} bytes, sha256 {upload.sha256[:16]}..."
            )
            for variant in ("none", "dynamic_int8"):
                label = "fp32" if variant == "none" else variant
                print(f"== converting: {label}")
                # keep_slower: a model this small runs slower in int8 than in fp32, and the
                # server publishes a slower variant only when asked; the demo shows both (the
                # job's message says how much slower).
                mode = Quantization(mode=variant, keep_slower=True)
                job = conv.convert(upload, quantization=mode).wait(timeout=300)
                versions[label] = job.version
                # The job's message says it all ("published as demo version 1: fp32, ...").
                print(f"   {job.message}")
            # Serve both versions side by side (the version policy follows the default).
            conv.set_default_version(MODEL, versions["fp32"])
            x = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
            with torch.no_grad():
                expected = model(torch.from_numpy(x)).numpy()
            for label, version in versions.items():
                out = infer.infer(MODEL, {"input": x}, version=version)
                (name,) = list(out)
                diff = float(np.max(np.abs(out[name] - expected)))
                print(
                    f"== infer on {label} (version {out.version}): max |onnx - torch| = {diff:.2e}"
                )
                print("   " + np.array2string(out[name].ravel(), precision=4))
            print(
                f"== load test: {args.duration:g} s, 16 concurrent clients, version {versions['fp32']}"
            )
            report = run(
                LoadTestConfig(
                    model=MODEL,
                    target=target,
                    concurrency=(16,),
                    duration=args.duration,
                    warmup=1.0,
                ),
                progress=False,
            )
            print(report.format_table())
    finally:
        print("== stopping the server")
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    print(next_steps(args.repository, target, management, versions))
    return 0


def next_steps(
    repository: Path, target: str, management: str, versions: dict[str, int | None]
) -> str:
    """Where the demo's server ran, and what to run now that it has stopped."""
    made = ", ".join(f"version {v} ({label})" for label, v in versions.items()) or "nothing"
    # `make serve` serves ./model-repository unless told otherwise: after `make demo REPO=...`
    # a plain `make serve` served another folder, with no 'demo' model for the next lines.
    serve = "make serve"
    if repository.resolve() != Path("model-repository").resolve():
        serve += f" REPO={shlex.quote(str(repository))}"
    return f"""
== done. The demo's server ran on {target} (inference) and {management} (management), serving
   {repository.resolve()}; it has stopped, and the repository keeps what it made
   ({MODEL!r}: {made}) beside the examples 'mlp' and 'seed'.
   Next:
     {serve:<43} # serve it: inference :8001, management 127.0.0.1:8003
     .venv/bin/ferry models list                 # in another terminal
     .venv/bin/ferry infer {MODEL} --random
     .venv/bin/ferry loadtest mlp -c 1,8 -d 5
     .venv/bin/ferry convert --help              # convert your own model (docs/conversion.md)
   The SDK: docs/sdk.md; every command: docs/cli.md."""


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
