"""A shadow comparison made by several worker processes, added up: the sum is the comparison one
process would have made of every request; only figures of the same comparison (model and key)
are added; the first worker keeps a dead worker's last figures; the rules judge the sum, and a
promotion waits for figures read from every worker."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from ferry.server.core import shadow_sum
from ferry.server.core.dataplane import DataPlane, InferenceRequest
from ferry.server.core.registry import ModelRegistry
from ferry.server.core.repository import ModelRepository
from ferry.server.core.shadow import ShadowStatistics, comparison_key
from ferry.server.examples import seed_model, write_model
from ferry.server.runtime.session import open_session
from ferry.server.workers import control
from ferry.server.workers.peers import Peers

RNG = np.random.default_rng(7)


def _pairs(n: int) -> list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """(served, shadow) outputs of ``n`` requests: scores, a regression and labels."""
    out = []
    for _ in range(n):
        scores = RNG.standard_normal((2, 5)).astype(np.float32)
        value = (100 + RNG.standard_normal((2, 1))).astype(np.float32)
        labels = RNG.integers(0, 3, (2,))
        served = {"scores": scores, "value": value, "labels": labels}
        noise = RNG.standard_normal(scores.shape).astype(np.float32)
        other = RNG.integers(0, 3, (2,))
        shadow = {"scores": scores + 0.1 * noise, "value": value * 1.01, "labels": other}
        out.append((served, shadow))
    return out


def _compared(pairs: list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]) -> ShadowStatistics:
    s = ShadowStatistics(2, "m", key="k")
    for served, shadow in pairs:
        s.record(served, shadow)
        s.served_ns += 1000
        s.shadow_ns += 1500
    return s


def test_the_sum_of_shares_is_the_comparison_of_every_request() -> None:
    pairs = _pairs(12)
    whole = _compared(pairs)
    shares = [_compared(pairs[:3]), _compared(pairs[3:4]), _compared(pairs[4:])]
    shares[1].errors, shares[2].shed = 2, 5
    summed = shadow_sum.add_up(shares[0], shares[1:])
    assert (summed.compared, summed.errors, summed.shed) == (12, 2, 5)
    for figure in ("top1_agree", "top1_rows", "labels_equal", "labels_total", "served_ns"):
        assert getattr(summed, figure) == getattr(whole, figure), figure
    for figure in (
        "cosine_min",
        "mean_cosine",
        "max_abs_diff",
        "rel_error",
        "spread_error",
        "label_agreement",
    ):
        assert getattr(summed, figure) == pytest.approx(getattr(whole, figure), rel=1e-12), figure
    assert summed.squares.keys() == whole.squares.keys()
    for name, sums in whole.squares.items():
        assert summed.squares[name] == pytest.approx(sums, rel=1e-12)
    assert shares[0].compared == 3 and shares[0].squares["value"][3] == 6  # left as it was


def test_only_figures_of_the_same_model_and_comparison_are_added() -> None:
    own = ShadowStatistics(2, "m", compared=3, cosine_min=0.9, key="new")
    own.decided = True
    older = ShadowStatistics(2, "m", compared=50, cosine_min=0.1, key="old")  # not applied yet
    elsewhere = ShadowStatistics(2, "other", compared=7, key="new")
    same = ShadowStatistics(2, "m", compared=4, cosine_min=0.95, max_abs_diff=math.inf, key="new")
    summed = shadow_sum.add_up(own, [older, elsewhere, same, own])
    assert (summed.compared, summed.cosine_min, summed.max_abs_diff) == (7, 0.9, math.inf)
    assert summed.decided and summed.key == "new"  # the deciding process's


def test_a_row_travels_the_control_channel_unchanged() -> None:
    s = _compared(_pairs(3))
    s.errors, s.shed, s.in_flight, s.max_abs_diff = 1, 2, 3, math.inf
    back = shadow_sum.from_row(control.decode(control.encode(shadow_sum.to_row(s))))
    assert back == s
    with pytest.raises(ValueError):
        shadow_sum.from_row({**shadow_sum.to_row(s), "squares": {"value": [1.0]}})
    with pytest.raises(KeyError):
        shadow_sum.from_row({"model": "m"})


def _answer(process: str, *stats: ShadowStatistics) -> dict[str, object]:
    return {"process": process, "rows": [shadow_sum.to_row(s) for s in stats]}


def test_a_dead_workers_last_figures_stay_in_the_sum(tmp_path: Path) -> None:
    peers = Peers(tmp_path, tmp_path / "worker-0.sock")
    sock = tmp_path / "worker-1.sock"
    first = ShadowStatistics(2, "m", compared=5, key="k")
    peers._answered(sock, control.SHADOWS, {}, _answer("a", first))
    peers._answered(sock, control.SHADOWS, {}, TimeoutError())  # a slow answer: the last stays
    assert [s.compared for s in peers.shadow_rows()] == [5]
    peers.retire(sock)  # it died
    assert [s.compared for s in peers.shadow_rows()] == [5]
    # Its answer read after it was retired (a gather waited for another worker) is not added.
    peers._answered(sock, control.SHADOWS, {}, _answer("a", first))
    assert [s.compared for s in peers.shadow_rows()] == [5]
    # The process started in its place counts from zero, beside what the dead one left.
    peers._answered(sock, control.SHADOWS, {}, _answer("b", ShadowStatistics(2, "m", key="k")))
    peers._answered(sock, control.SHADOWS, {}, _answer("c", ShadowStatistics(2, "m", 3, key="k")))
    # a's 5 and b's 0 retired in one row (the same comparison), and c's own 3
    assert sorted(s.compared for s in peers.shadow_rows()) == [3, 5]
    own = ShadowStatistics(2, "m", key="k")
    assert shadow_sum.add_up(own, peers.shadow_rows()).compared == 8
    peers.prune_retired_shadows({"m": "k"})
    assert shadow_sum.add_up(own, peers.shadow_rows()).compared == 8
    peers.prune_retired_shadows({"m": "a later comparison"})
    assert [s.compared for s in peers.shadow_rows()] == [3]  # the live worker's own


def test_a_worker_that_does_not_keep_retired_figures_drops_them(tmp_path: Path) -> None:
    peers = Peers(tmp_path, tmp_path / "worker-1.sock", keeps_retired=False)
    sock = tmp_path / "worker-0.sock"
    peers._answered(sock, control.SHADOWS, {}, _answer("a", ShadowStatistics(2, "m", 5, key="k")))
    peers.retire(sock)
    assert peers.shadow_rows() == []


class _Peers:
    """core.shadow_sum.PeerShadows as a test sets it: the other workers' figures, given."""

    def __init__(self) -> None:
        self.rows: list[ShadowStatistics] = []
        self.pulls = 0
        self.asked_soon = 0

    def latest(self) -> list[ShadowStatistics]:
        return list(self.rows)

    def latest_splits(self) -> list[list[Any]]:
        return []

    async def pull(self) -> bool:
        self.pulls += 1
        return True

    def soon(self) -> None:
        self.asked_soon += 1


def _repo(tmp_path: Path) -> ModelRepository:
    repo = ModelRepository(tmp_path / "repo", create=True)
    write_model(repo, "m", seed_model(seed=1), version=1)  # differs from 2
    write_model(repo, "m", seed_model(seed=2), version=2)
    write_model(repo, "m", seed_model(seed=2), version=3)  # computes what 2 does
    return repo


async def _serving(repo: ModelRepository) -> tuple[ModelRegistry, DataPlane, _Peers]:
    registry = ModelRegistry(repo, open_session, warm_up=False)
    await registry.refresh()
    dataplane = DataPlane(registry)
    peers = _Peers()
    dataplane.sum_shadows_with(peers)
    return registry, dataplane, peers


async def _shadowed(dataplane: DataPlane, n: int) -> None:
    x = {"input": np.ones((2, 3), np.float32)}
    for i in range(n):
        await dataplane.infer(InferenceRequest("m", x, id=f"r{i}"))
        await asyncio.gather(*dataplane._shadows._tasks)
    await asyncio.gather(*dataplane._decisions)


def _key(registry: ModelRegistry) -> str:
    """The comparison key of m's shadow, with the files its candidate is loaded from."""
    ro, _ = registry.rollout_of("m")
    slot = registry.models["m"].versions[ro.shadow[0]]
    return comparison_key(ro, repr(slot.signature))


def test_the_rules_judge_the_sum_even_with_no_comparison_of_their_own(tmp_path: Path) -> None:
    """The kernel may give every shadowed connection to other workers: the first worker,
    which decides, then had no outcome of its own to check a rule after."""
    repo = _repo(tmp_path)

    async def scenario() -> None:
        registry, dataplane, peers = await _serving(repo)
        rules = {"promote_after": 5, "min_cosine": 0.99}
        await dataplane.set_rollout("m", {2: 1}, by="t", why="", shadow_of=(3, 1.0), rules=rules)
        peers.rows = [ShadowStatistics(3, "m", compared=9, cosine_sum=9.0, key="before")]
        dataplane.judge_shadows()  # figures of an older comparison: nothing to judge
        assert dataplane.rollout("m").shadow == (3, 1.0)
        assert dataplane.rollout("m").shadow_statistics.compared == 0
        key = _key(registry)
        peers.rows = [ShadowStatistics(3, "m", compared=n, cosine_sum=n, key=key) for n in (2, 3)]
        assert (await dataplane.total_rollout("m")).shadow_statistics.compared == 5
        assert peers.pulls == 1  # GetRollout reads every worker first
        assert [s.compared for s in dataplane.shadow_statistics()] == [5]  # /metrics: the sum
        dataplane.judge_shadows()
        await asyncio.gather(*dataplane._decisions)
        view = dataplane.rollout("m")
        assert view.shadow is None and view.history[-1]["why"].startswith(
            "promoted by rule: 5 compared"
        )
        await dataplane.close_shadows()
        await registry.close()

    asyncio.run(scenario())


def test_another_workers_disagreement_rolls_back_at_once_a_promotion_waits_for_a_pull(
    tmp_path: Path,
) -> None:
    repo = _repo(tmp_path)

    async def scenario() -> None:
        registry, dataplane, peers = await _serving(repo)
        rules = {"promote_after": 3, "min_cosine": 0.99}
        await dataplane.set_rollout("m", {2: 1}, by="t", why="", shadow_of=(3, 1.0), rules=rules)
        peers.rows = [ShadowStatistics(3, "m", compared=1, cosine_min=0.2, key=_key(registry))]
        await _shadowed(dataplane, 1)  # this worker's comparison agrees; the sum does not
        view = dataplane.rollout("m")
        assert view.shadow is None and view.history[-1]["why"].startswith("rolled back by rule")

        await dataplane.set_rollout("m", {2: 1}, by="t", why="", shadow_of=(3, 1.0), rules=rules)
        peers.rows = [ShadowStatistics(3, "m", compared=2, cosine_sum=2.0, key=_key(registry))]
        await _shadowed(dataplane, 1)  # 3 in the sum as last read
        assert dataplane.rollout("m").shadow == (3, 1.0) and peers.asked_soon == 1
        dataplane.judge_shadows()  # what follows a pull of every worker's figures
        await asyncio.gather(*dataplane._decisions)
        assert dataplane.rollout("m").history[-1]["why"].startswith("promoted by rule: 3")
        await dataplane.close_shadows()
        await registry.close()

    asyncio.run(scenario())


class _Plane:
    """What ShadowPull asks of the first worker's core."""

    def __init__(self) -> None:
        self.models: list[str] = []
        self.own = [ShadowStatistics(2, "m", key="new")]
        self.judged = 0

    def shadowed_models(self) -> list[str]:
        return self.models

    def judge_shadows(self, every_worker: bool = True) -> None:
        self.judged += 1

    def own_shadow_statistics(self) -> list[ShadowStatistics]:
        return self.own

    def split_ruled_models(self) -> list[str]:
        return []

    def judge_splits(self) -> None:
        raise AssertionError("no split is ruled here")

    def split_keys(self) -> dict[str, str]:
        return {}


def test_the_pull_reads_only_while_there_is_a_comparison_to_read(tmp_path: Path) -> None:
    from ferry.server.workers.shadow_pull import ShadowPull

    peers = Peers(tmp_path, tmp_path / "worker-0.sock")
    sock = tmp_path / "worker-1.sock"
    plane = _Plane()
    pull = ShadowPull(peers, plane)  # type: ignore[arg-type]

    async def scenario() -> None:
        await pull.once()
        assert plane.judged == 0  # no shadow anywhere: no call, no judging
        plane.models = ["m"]
        await pull.once()
        assert plane.judged == 1
        plane.models = []  # the shadow ended while a worker still ran one of its runs
        running = ShadowStatistics(2, "m", key="new", in_flight=1)
        peers._answered(sock, control.SHADOWS, {}, _answer("a", running))
        peers._retired_shadows[("m", "old")] = ShadowStatistics(2, "m", 4, key="old")
        await pull.once()
        assert plane.judged == 2  # read until its outcome is in
        assert [(s.key, s.in_flight) for s in peers.shadow_rows()] == [("new", 1)]  # pruned
        peers.retire(sock)  # it died: its runs will never end, nor need reading
        assert [(s.key, s.in_flight) for s in peers.shadow_rows()] == [("new", 0)]
        await pull.once()
        assert plane.judged == 2
        pull.start()
        pull.soon()
        await pull.close()

    asyncio.run(scenario())


class _Worker(grpc.GenericRpcHandler):
    """Another worker's control socket: SHADOWS answered with ``rows``, or, while ``silent``,
    not at all (stopped, or busy past the call's timeout)."""

    def __init__(self, rows: list[ShadowStatistics]) -> None:
        self.rows = rows
        self.silent = False
        self._never = asyncio.Event()

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Any:
        if handler_call_details.method != control.SHADOWS:
            return None
        return grpc.unary_unary_rpc_method_handler(self._shadows)

    async def _shadows(self, raw: bytes, context: Any) -> bytes:
        if self.silent:
            await self._never.wait()
        return control.encode(_answer("a", *self.rows))


def test_a_promotion_waits_for_a_pull_every_worker_answered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker that did not answer the pull adds what it answered last: a promotion decided
    then missed whatever it compared since, which may hold the disagreement that rolls the
    candidate back."""
    from ferry.server.workers import peers as peers_module
    from ferry.server.workers.shadow_pull import ShadowPull

    monkeypatch.setattr(peers_module, "SHADOW_CALL_TIMEOUT", 0.2)
    repo = _repo(tmp_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()

    async def scenario() -> None:
        registry = ModelRegistry(repo, open_session, warm_up=False)
        await registry.refresh()
        dataplane = DataPlane(registry)
        peers = Peers(run_dir, run_dir / "worker-0.sock")
        pull = ShadowPull(peers, dataplane)
        dataplane.sum_shadows_with(pull)
        rules = {"promote_after": 3, "min_cosine": 0.99}
        await dataplane.set_rollout("m", {2: 1}, by="t", why="", shadow_of=(3, 1.0), rules=rules)
        worker = _Worker([ShadowStatistics(3, "m", compared=2, cosine_sum=2.0, key=_key(registry))])
        server = await control.start_control(str(run_dir / "worker-1.sock"), worker)  # type: ignore[arg-type]
        try:
            await pull.once()  # it answers: 2 compared there
            await _shadowed(dataplane, 1)  # 3 in the sum as last read: a pull is asked for
            worker.silent = True
            pull._wake.clear()
            await pull.once()  # it does not answer
            await asyncio.gather(*dataplane._decisions)
            assert dataplane.rollout("m").shadow == (3, 1.0)  # not promoted on its old figures
            assert not pull._wake.is_set()  # the next period asks again: no pull at once
            worker.silent = False
            await pull.once()
            await asyncio.gather(*dataplane._decisions)
            assert dataplane.rollout("m").history[-1]["why"].startswith("promoted by rule: 3")
        finally:
            await server.stop(0)
            await peers.close()
        await dataplane.close_shadows()
        await registry.close()

    asyncio.run(scenario())


def test_a_split_s_counts_add_up_over_workers_and_outlive_a_dead_one(tmp_path: Path) -> None:
    """A split ruled by max_error_rate was judged on the first worker's requests alone. Each
    worker's counts come with its shadow figures; those of another key (a rollout or files
    the first does not serve) add nothing, and a dead worker's stay while its key is current."""
    from ferry.server.core import split_sum

    peers = Peers(tmp_path, tmp_path / "worker-0.sock")
    sock = tmp_path / "worker-1.sock"
    answer = _answer("a")
    answer["split"] = [["m", "k", {"3": [9, 1], "2": [0, 10]}], ["m", "old", {"3": [50, 0]}]]
    peers._answered(sock, control.SHADOWS, {}, answer)
    own = {3: [1, 0], 2: [0, 5]}
    summed = split_sum.summed("m", "k", own, peers.split_rows())
    assert summed == {3: [10, 1], 2: [0, 15]}
    assert split_sum.verdict(summed, [2, 3], 0.2) == (3, 10, 11, 0.0)
    assert split_sum.verdict(own, [2, 3], 0.2) is None  # one failure: too few to judge
    peers.retire(sock)
    assert split_sum.summed("m", "k", {}, peers.split_rows()) == {3: [9, 1], 2: [0, 10]}
    peers.prune_retired_splits({"m": "new"})  # the split changed: the old counts go
    assert peers.split_rows() == []
