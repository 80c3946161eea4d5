"""What shadowing costs the served path (issue 14): the tiny MLP served as version 2, perf_analyzer
unary at c=16 and c=64, with no shadow and with 10% of requests shadowed to version 1, in one run
(the two settings alternate, --rounds times each, on one server: only the rollout changes).

    flock /work/notes/bench.lock .venv/bin/python bench/rollout.py          # ~1.5 min

Figures, not assertions: a table on stdout. Target: < 5% fewer req/s at 10% shadow.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from models import build
from perf_floor import input_data, perf, wait_port
from serving import ferry_command, free_port, stop

HERE = Path(__file__).parent


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--concurrency", default="16,64")
    ap.add_argument("--window-ms", type=int, default=3000)
    ap.add_argument("--fraction", type=float, default=0.1)
    ap.add_argument("--rounds", type=int, default=4, help="alternations of the two settings")
    ap.add_argument("--cache", type=Path, default=HERE / "results" / "models")
    args = ap.parse_args()
    import subprocess

    from ferry.client import RepositoryClient

    levels = [int(c) for c in args.concurrency.split(",")]
    path = build("mlp", args.cache / "mlp.onnx")
    rows: dict[str, dict[int, list[float]]] = {"no shadow": {}, f"{args.fraction:.0%} shadow": {}}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for version in (1, 2):
            vdir = folder / "repo" / "mlp" / str(version)
            vdir.mkdir(parents=True)
            (vdir / "model.onnx").write_bytes(path.read_bytes())
        (folder / "repo" / "mlp" / "config.json").write_text('{"version_policy": {"all": true}}')
        data = input_data(folder, "mlp")
        port, management = free_port(), free_port()
        proc = subprocess.Popen(
            ferry_command(folder / "repo", port, "--management-port", str(management))
        )
        try:
            wait_port(proc, port)  # type: ignore[arg-type]
            with RepositoryClient(f"127.0.0.1:{management}") as repo:
                repo.set_rollout("mlp", {2: 1})  # version 2 serves whatever the setting
                for _ in range(args.rounds):
                    for label, measured in rows.items():
                        shadow = None if label == "no shadow" else (1, args.fraction)
                        repo.set_rollout("mlp", {2: 1}, shadow=shadow)
                        for c in levels:
                            r = perf(
                                port, "mlp", data, c, streaming=False, window_ms=args.window_ms
                            )
                            measured.setdefault(c, []).append(r["rps"])
                compared = repo.get_rollout("mlp").shadow
        finally:
            stop(proc)  # type: ignore[arg-type]
    base = {c: sum(v) / len(v) for c, v in rows["no shadow"].items()}
    print(
        f"\ntiny MLP unary, perf_analyzer, mean of {args.rounds} alternating runs: req/s [x no shadow]"
    )
    print("| setting | " + " | ".join(f"c={c}" for c in levels) + " |")
    print("|---|" + "---|" * len(levels))
    for label, by_c in rows.items():
        cells = [
            f"{sum(v) / len(v):,.0f} [{sum(v) / len(v) / base[c]:.3f}x]" for c, v in by_c.items()
        ]
        print(f"| {label} | " + " | ".join(cells) + " |")
    print(f"shadow comparison after the runs: {compared}")


if __name__ == "__main__":
    main()
