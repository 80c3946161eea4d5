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


def test_arrivals_the_generator_never_reached_are_counted_as_unsent() -> None:
    """An open loop slower than its schedule ended its level with due arrivals unsent and said
    nothing: the report showed the rate as offered. Each arrival due before the stop is now
    sent, dropped or counted unsent."""
    import asyncio
    import random
    import time

    from ferry.client.loadtest._engine import Budget, open_loop
    from ferry.client.loadtest._report import Recorder

    class Blocking:
        async def request(self) -> str:
            busy = time.perf_counter() + 0.002  # the generator's own CPU per request
            while time.perf_counter() < busy:
                pass
            return "OK"

    async def main() -> tuple[Recorder, float, float]:
        budget, rec = Budget(None), Recorder()
        start = time.perf_counter()
        asyncio.get_running_loop().call_later(0.3, budget.stop)
        await open_loop(
            Blocking(), 2000.0, arrival="constant", budget=budget, rec=rec, rng=random.Random(0)
        )
        assert budget.stopped_at is not None
        return rec, start, budget.stopped_at

    rec, start, stopped = asyncio.run(main())
    due = (stopped - start) * 2000.0
    assert rec.unsent > 0
    assert abs(rec.ok + rec.dropped + rec.unsent - due) <= 2  # every due arrival accounted for
    report = LoadTestReport(model="m", target="t")
    report.levels.append(level(loop="open", level=2000, ok=rec.ok, unsent=rec.unsent))
    assert f"{rec.unsent} arrivals were due but never sent" in report.format_table()
    (row,) = csv.DictReader(io.StringIO(report.to_csv()))
    assert int(row["unsent"]) == rec.unsent
    assert json.loads(report.to_json())["levels"][0]["unsent"] == rec.unsent


def test_a_stream_answer_past_the_timeout_is_deadline_exceeded() -> None:
    """Stream mode waited for every answer however late: one the server never sent held the
    level open without end, and a late one counted OK with its whole latency. A stream whose
    server never answers stands in here."""
    import asyncio

    from ferry.client.loadtest._engine import StreamTransport

    class SilentCall:
        def __init__(self) -> None:
            self.never = asyncio.Event()

        async def write(self, message: bytes) -> None:
            pass

        async def done_writing(self) -> None:
            pass

        async def read(self) -> object:
            await self.never.wait()
            raise AssertionError("unreachable")

    class Channel:
        def stream_stream(self, path: str, **kwargs: object) -> object:
            return lambda metadata=None: SilentCall()

    async def main() -> list[str]:
        transport = StreamTransport([Channel()], b"", (), timeout=0.05)  # type: ignore[list-item]
        try:
            return [await transport.request() for _ in range(2)]
        finally:
            await transport.close()

    assert asyncio.run(main()) == ["DEADLINE_EXCEEDED", "DEADLINE_EXCEEDED"]


def test_a_closed_loop_pauses_while_the_server_is_gone() -> None:
    """UNAVAILABLE comes back at once from a server that is not there: the loop retried at once
    and its error count (22,411 in 2 s) measured its own spin. With a pause that doubles, a
    twentieth of a second holds a handful of tries, not thousands."""
    import asyncio

    from ferry.client.loadtest._engine import Budget, closed_loop
    from ferry.client.loadtest._report import Recorder

    async def main() -> Recorder:
        budget, rec = Budget(None), Recorder()

        class Gone:
            calls = 0

            async def request(self) -> str:
                Gone.calls += 1
                if Gone.calls == 1:
                    asyncio.get_running_loop().call_later(0.05, budget.stop)
                return "UNAVAILABLE"

        await closed_loop(Gone(), 2, budget, rec)  # type: ignore[arg-type]
        return rec

    rec = asyncio.run(main())
    assert 2 <= rec.codes["UNAVAILABLE"] < 50


def test_an_open_loop_level_sends_exactly_its_due_arrivals() -> None:
    """A clean open-loop level (rate 40 for 0.25 s against an instant server) reported one
    arrival "due but never sent" on every run, with a warning that the rate was not offered:
    the level's end came from a timer that fires late, so the arrival due exactly at the end
    counted as due. The window is now the loop's own schedule: 10 arrivals, all sent, over the
    whole 0.25 s."""
    import asyncio
    import random
    import time

    from ferry.client.loadtest._engine import run_level

    class Instant:
        async def request(self) -> str:
            return "OK"

    async def main() -> tuple[int, int, int]:
        counts = []
        for _ in range(3):
            rec, elapsed = await run_level(
                Instant(),  # type: ignore[arg-type]
                concurrency=None,
                rate=40.0,
                arrival="constant",
                duration=0.25,
                requests=None,
                rng=random.Random(0),
            )
            counts.append((rec.ok, rec.unsent, rec.dropped))
            assert elapsed >= 0.25  # the whole window: throughput is 40/s, not 10 in 0.225 s
        assert len(set(counts)) == 1, counts
        return counts[0]

    assert asyncio.run(main()) == (10, 0, 0)

    class Slow:  # 2 ms of the generator's own CPU per request: it falls behind 2000/s
        async def request(self) -> str:
            busy = time.perf_counter() + 0.002
            while time.perf_counter() < busy:
                pass
            return "OK"

    async def behind() -> tuple[int, int, int]:
        rec, _ = await run_level(
            Slow(),  # type: ignore[arg-type]
            concurrency=None,
            rate=2000.0,
            arrival="constant",
            duration=0.3,
            requests=None,
            rng=random.Random(0),
        )
        return rec.ok, rec.unsent, rec.dropped

    ok, unsent, dropped = asyncio.run(behind())
    assert unsent > 0 and ok + unsent + dropped == 600  # every due arrival accounted for
