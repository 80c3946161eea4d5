"""Memory of the serving process and of the SDK while one large model is uploaded (issue 13,
item 11).

    flock /work/notes/bench.lock .venv/bin/python bench/upload_memory.py --mb 400   # ~1 min

A real server (``python -m ferry.server``, management listener on 127.0.0.1) and a client in a
process of its own upload a generated ONNX file of about ``--mb`` MB (one float initializer holds
nearly all of it). Reported: the server's peak RSS growth over its RSS before the upload (VmHWM,
which the kernel keeps, minus VmRSS before: nothing is sampled, so no peak is missed), and the
client's, the same way, for a path, a bytes and a bytearray upload. Figures, not assertions.
Run it with another tree first on PYTHONPATH (the server inherits it) to measure that tree.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

# The client: its RSS before the upload (the bytes, when uploading bytes, already read), then its
# peak. Run as ``python -c CLIENT target path mode``.
CLIENT = r"""
import sys, time
from pathlib import Path
from ferry.client import ConversionClient

def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0

target, path, mode = sys.argv[1:4]
if mode == "bytes":
    source = Path(path).read_bytes()
elif mode == "bytearray":
    source = bytearray(Path(path).read_bytes())  # the temporary bytes are freed at once
else:
    source = Path(path)
with ConversionClient(target, timeout=600) as conv:
    conv.list_uploads()  # the channel is up before the baseline
    try:  # the peak so far (reading the file) is not the upload's: reset it (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    before = status("VmRSS")
    start = time.monotonic()
    up = conv.upload("big", source, format="onnx")
    took = time.monotonic() - start
    print(before, status("VmHWM"), took, up.size_bytes, up.sha256, flush=True)
"""


def status(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak(pid: int) -> bool:
    """Linux >= 4.0 resets VmHWM to the current RSS when 5 is written to clear_refs (own
    processes only); otherwise the peak since start is reported, which the upload dominates."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def wait_management(proc: subprocess.Popen[str], target: str, timeout: float = 120) -> None:
    """An empty repository is never "ready" for inference: the management listener answering
    is what this benchmark waits for."""
    from ferry.client import ConversionClient

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with ConversionClient(target, timeout=1.0) as conv:
                conv.list_uploads()
            return
        except Exception:
            time.sleep(0.2)
    raise RuntimeError("management listener not up in time")


def write_model(path: Path, mb: int) -> None:
    import onnx

    from ferry.server.examples import large_model

    onnx.save(large_model(mb), str(path))


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--mb", type=int, default=400, help="size of the generated model")
    ap.add_argument(
        "--modes", default="path,bytes,bytearray", help="client sources: path, bytes, bytearray"
    )
    args = ap.parse_args()
    from isolation import free_port
    from serving import ferry_command

    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "big.onnx"
        write_model(model, args.mb)
        size = model.stat().st_size
        print(f"model: {size / 1e6:.0f} MB ({model})")
        port, mport = free_port(), free_port()
        cmd = ferry_command(Path(tmp) / "repo", port, "--management-port", str(mport))
        cmd += ["--create-repository", "--max-upload-bytes", str(4 << 30)]
        proc = subprocess.Popen(cmd, text=True)
        try:
            wait_management(proc, f"127.0.0.1:{mport}")
            for mode in args.modes.split(","):
                exact = reset_peak(proc.pid)
                server_before = status(proc.pid, "VmRSS")
                out = subprocess.run(
                    [sys.executable, "-c", CLIENT, f"127.0.0.1:{mport}", str(model), mode],
                    check=True,
                    capture_output=True,
                    text=True,
                    env={**os.environ},
                ).stdout.split()
                server_peak = status(proc.pid, "VmHWM")
                before, peak, took = int(out[0]), int(out[1]), float(out[2])
                assert int(out[3]) == size, out
                print(
                    f"{mode:5s} upload {took:6.2f} s | server RSS {server_before / 2**20:6.0f} MiB"
                    f" -> peak +{(server_peak - server_before) / 2**20:6.0f} MiB"
                    f"{'' if exact else ' (peak since start)'}"
                    f" | client RSS {before / 2**20:6.0f} MiB -> peak "
                    f"+{(peak - before) / 2**20:6.0f} MiB"
                )
                time.sleep(0.5)  # let the server settle between modes (figures only)
        finally:
            proc.terminate()
            proc.wait(30)


if __name__ == "__main__":
    main()
