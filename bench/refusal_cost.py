"""What refusing a call costs a grpc.aio server, against serving it (issue 10, overload).

    .venv/bin/python bench/refusal_cost.py                 # 3,000 calls/s, 3 s per mode
    .venv/bin/python bench/refusal_cost.py --rate 10000

A grpc.aio server in this process answers a trivial method; bench/loadgen/openloop (C++, built by
bench/loadgen/build.sh) offers a fixed rate of calls from another process; the script reads this
process's CPU time from /proc. Four ways one call ends:

- served: the handler returns 1 byte;
- refused in the handler: ``context.abort(RESOURCE_EXHAUSTED)`` at once, what any Python
  admission rule (Ferry's deadline check included) costs at the least;
- refused by grpc.aio's limiter: ``maximum_concurrent_rpcs`` exceeded, refused by grpc's Cython
  layer before any handler;
- refused by grpc's core: the event loop is held (as a saturated loop is) and
  ``grpc.server.max_pending_requests`` bounds the calls waiting for it, so grpc's C core refuses
  the rest at arrival, no Python involved (Ferry's ``max_pending_calls``).

The point: on grpc.aio a call that reaches Python costs about as much refused as served, so
shedding several times capacity in Python costs more CPU than the box has; only grpc's core can
refuse for a fraction of that. Figures, not assertions; printed as a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import grpc
from grpc import aio

LOADGEN = Path(__file__).parent / "loadgen"
MODES = ("served", "handler", "limiter", "core")


async def one_mode(mode: str, rate: float, seconds: float, payload: Path) -> dict[str, object]:
    async def served(request: bytes, context: aio.ServicerContext) -> bytes:
        return b"x"

    async def refuse(request: bytes, context: aio.ServicerContext) -> bytes:
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "full")
        return b""

    async def hold(request: bytes, context: aio.ServicerContext) -> bytes:
        await asyncio.sleep(3600)
        return b""

    handler = {"served": served, "handler": refuse, "limiter": hold, "core": served}[mode]
    options = []
    if mode == "core":
        options = [("grpc.server.max_pending_requests", 0)]
        options += [("grpc.server.max_pending_requests_hard_limit", 1)]
    server = aio.server(maximum_concurrent_rpcs=1 if mode == "limiter" else None, options=options)
    methods = {"M": grpc.unary_unary_rpc_method_handler(handler)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("b.S", methods),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    cmd = [
        *(str(LOADGEN / "build" / "openloop"), "--target", f"127.0.0.1:{port}"),
        *("--method", "/b.S/M", "--payload", str(payload), "--channels", "4"),
        *("--threads", "1", "--rate", str(rate), "--seconds", str(seconds + 2)),
        *("--deadline-ms", "1000"),
    ]
    gen = await asyncio.create_subprocess_exec(*cmd, stdout=subprocess.PIPE)
    try:
        await asyncio.sleep(1.0)  # connections up, steady state
        window: list[float] = []
        measured = asyncio.Event()

        def measure_holding_the_loop() -> None:
            # Holds the loop as a saturated one is held: grpc's core keeps or refuses arrivals.
            c0, t0 = time.process_time(), time.monotonic()
            time.sleep(seconds)
            window.extend((time.process_time() - c0, time.monotonic() - t0))
            measured.set()

        if mode == "core":
            # Runs on the loop itself, not in a thread: the loop is what must be held.
            asyncio.get_running_loop().call_soon(measure_holding_the_loop)
            await measured.wait()
        else:
            c0, t0 = time.process_time(), time.monotonic()
            await asyncio.sleep(seconds)
            window.extend((time.process_time() - c0, time.monotonic() - t0))
        used, wall = window
    finally:
        out, _ = await gen.communicate()
        await server.stop(None)
    report = json.loads(out.decode().strip().splitlines()[-1])
    calls = rate * wall
    return {
        "mode": mode,
        "codes": report["codes"],
        "cores": used / wall,
        "us_per_call": used / calls * 1e6,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rate", type=float, default=3000.0, help="calls/s offered")
    p.add_argument("--seconds", type=float, default=3.0, help="measured window per mode")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    args = p.parse_args()
    built = subprocess.run(
        ["sh", str(LOADGEN / "build.sh")], stdout=subprocess.DEVNULL, check=False
    )
    if built.returncode != 0:
        raise SystemExit("bench/loadgen/build.sh failed: apt-get install libgrpc++-dev pkg-config")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        payload = Path(tmp) / "payload.bin"
        payload.write_bytes(b"x")
        for mode in args.modes:
            rows.append(asyncio.run(one_mode(mode, args.rate, args.seconds, payload)))
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{args.rate:,.0f} calls/s offered, cpus {os.cpu_count()}")
    print("| call ends | codes | server cores | server CPU µs per call |")
    print("|---|---|---|---|")
    for r in rows:
        codes = ", ".join(f"{k} {v:,}" for k, v in sorted(r["codes"].items()))  # type: ignore[attr-defined]
        print(f"| {r['mode']} | {codes} | {r['cores']:.2f} | {r['us_per_call']:.0f} |")


if __name__ == "__main__":
    main()
