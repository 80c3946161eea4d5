"""The load generator reports its own CPU beside each level (ferry loadtest on a shared box)."""

from __future__ import annotations

import csv
import io
import json

from ferry.client.loadtest import LevelResult, LoadTestReport


def level(**changes: object) -> LevelResult:
    fields: dict[str, object] = {
        "loop": "closed",
        "level": 1,
        "mode": "unary",
        "protocol": "ferry",
        "batch_size": 1,
        "elapsed": 2.0,
        "ok": 990,
        "errors": {"UNAVAILABLE": 10},
        "latency_ms": {k: 1.0 for k in ("p50", "p90", "p95", "p99", "max", "mean")},
        "client_cpu": 0.25,
    }
    fields.update(changes)
    return LevelResult(**fields)  # type: ignore[arg-type]


def test_cpu_per_request_counts_every_answer() -> None:
    lv = level()
    assert abs(lv.client_cpu_per_request - 0.25 * 2.0 / 1000) < 1e-12  # 500 us
    assert level(ok=0, errors={}).client_cpu_per_request == 0.0


def test_the_table_json_and_csv_carry_it() -> None:
    report = LoadTestReport(model="mlp", target="127.0.0.1:1", levels=[level()])
    table = report.format_table()
    header, row = table.splitlines()[1:3]
    assert "gen_cpu" in header and "us/req" in header
    assert row.split()[-2:] == ["25%", "500"]
    assert "perf_analyzer" in table
    (saved,) = json.loads(report.to_json())["levels"]
    assert saved["client_cpu"] == 0.25 and round(saved["client_cpu_us_per_request"]) == 500
    (csv_row,) = csv.DictReader(io.StringIO(report.to_csv()))
    assert csv_row["client_cpu"] == "0.250" and csv_row["client_cpu_us_per_request"] == "500.0"
