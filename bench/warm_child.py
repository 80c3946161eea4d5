"""Job time of a small model's conversion, cold against warm (issue 13, item 10).

    flock /work/notes/bench.lock .venv/bin/python bench/warm_child.py        # ~1 min

A server with a management listener; the seed article's MLP (an nn.Module the SDK exports) is
converted ``--jobs`` times in a row, fp32, benchmark "quick". The first job starts its
conversion process cold (torch import, exporter's first use); each later one finds a process
started ahead once the previous job ended (``--warm-conversion-child``, the default). Job time is
from ``convert()`` to the job's end, as a user waits for it. Figures, not assertions.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--jobs", type=int, default=4)
    ap.add_argument("--cold", action="store_true", help="no process started ahead (compare)")
    args = ap.parse_args()
    import torch
    from serverutil import ServerThread

    from ferry.client import ConversionClient

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    x = torch.randn(8, 3)
    with (
        tempfile.TemporaryDirectory() as tmp,
        ServerThread(Path(tmp) / "repo", warm_conversion_child=not args.cold) as srv,
        ConversionClient(srv.management_target, timeout=300) as conv,
    ):
        assert srv.app is not None
        runner = srv.app.conversion.runner
        for i in range(args.jobs):
            if i and not args.cold:
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline and not (
                    runner._warm is not None and runner._warm.ready.exists()
                ):
                    time.sleep(0.1)  # a user's next job comes later: let the process warm up
            # weights only (the built-in seed architecture): the child needs torch for them
            up = conv.upload("seed", module, architecture="seed", example_inputs=x)
            start = time.monotonic()
            job = conv.convert(up, benchmark="quick").wait(progress=False)
            took = time.monotonic() - start
            print(f"job {i + 1}: {took:.2f} s, version {job.version}, {job.state}")


if __name__ == "__main__":
    main()
