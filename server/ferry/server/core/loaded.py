"""A model version that is being served: its session, batcher and statistics,
and ``open_version``, the one way a version is opened (by the registry, and by a conversion
checking what it is about to publish, so a published version is opened once, not twice)."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import cast

import numpy as np

from ferry.codec import DataType, numpy_dtype
from ferry.server.batching.batcher import BatchInfo, DynamicBatcher, Failed
from ferry.server.batching.tensors import same_answer, split
from ferry.server.core.config import DEFAULT_MAX_BATCH_SIZE, ModelConfig, apply_version_config
from ferry.server.core.stats import VersionStats
from ferry.server.core.types import Opener, Session, TensorSpec, VersionStatistics
from ferry.server.errors import Cancelled, FailedPrecondition, ModelNotReady

log = logging.getLogger(__name__)

# Batches predicted to run faster than this execute inline on the event loop.
INLINE_NS = 150_000

# One execution that succeeded: (batch size, the indices in its batch of the requests it
# served, input, infer, output ns).
Execution = tuple[int, tuple[int, ...], int, int, int]
# A batch's outcome: each request's result, the executions that succeeded, and the ns it took.
Ran = tuple[list["dict[str, np.ndarray] | Failed"], list[Execution], int]
# Which of a batch's callers have stopped waiting (BatchInfo.left); None: all of them wait.
Left = Callable[[], list[bool]] | None


@dataclass(slots=True)
class Work:
    """One request's validated inputs, as queued in the batcher."""

    inputs: dict[str, np.ndarray]
    outputs: tuple[str, ...] | None
    batch: int  # the request's own batch dim (1 when the model has none)
    key: tuple[tuple[int, ...], ...]
    # Its input elements, all inputs together, a string counting its characters: what its
    # run is predicted from (inline or not; batch time).
    elements: int = 1
    # A rollout's shadow run (core.shadow): work the candidate did (executions, inferences,
    # batch_stats) but no caller's request, so none of the per-request durations.
    shadow: bool = False


class LoadedVersion:
    def __init__(
        self, name: str, version: int, session: Session, config: ModelConfig, executor: Executor
    ) -> None:
        self.name = name
        self.version = version
        self.session = session
        self.config = config
        b = config.batching
        self.max_batch_size = b.max_batch_size or 0
        self.inputs: list[TensorSpec] = session.inputs
        self.outputs: list[TensorSpec] = session.outputs
        self.input_names = [s.name for s in self.inputs]
        self.output_names = [s.name for s in self.outputs]
        self.input_specs = {s.name: s for s in self.inputs}
        # Inputs with dynamic-axis bounds (a converted version's metadata): checked per request
        # only when there are any.
        self.bounded = [s for s in self.inputs if s.bounds]
        self.input_numpy = {s.name: numpy_dtype(s.dtype) for s in self.inputs}
        # Text inputs are decoded per request into a copy of the request's inputs.
        self.text_inputs = frozenset(
            s.name for s in self.inputs if s.dtype == DataType.DATA_TYPE_BYTES
        )
        self.stats = VersionStats()
        # This load's name in its statistics: /metrics tells a new load by it (metrics_carry).
        self.load_id = uuid.uuid4().hex
        # A batch size (configured, or the default on the shapes alone) whose batch dimension no
        # made-up row could check (the model runs on none: runtime.session): requests run
        # alone until one's own row checks it.
        self._unchecked = self.max_batch_size > 0 and not getattr(session, "batch_checked", True)
        self._not_batched_first = ""  # what that check found wrong: every request's error
        # Each request runs alone, its own rows only: the config says so
        # (batching.combine_requests false), or a real batch showed rows mixing (below).
        self._alone = not config.batching.combine_requests
        self._alone_why = ""  # what a real batch showed, when it made requests run alone
        # Batched on its shapes alone (runtime.rows could run none of its made-up rows): until
        # a batch of different requests gives each the answer it gets alone, requests run
        # alone (_prove_rows_apart); where one does not, they run alone for good.
        self._rows_unproven = self.max_batch_size > 0 and getattr(session, "rows_unproven", False)
        # Until measured, assume a version is slow: the first batches go to a worker thread. A
        # provider that runs elsewhere (a GPU) never runs inline: its cost is not the CPU's.
        # Per input element, not per row: on a dynamic axis one row of a long sequence costs
        # what thousands of short ones do, and was run inline on the event loop (one 24 KB
        # request to an O(n^2) model held every other request of every model for 420 ms).
        self._ns_per_element = float(INLINE_NS)
        self._inline = session.inline_allowed
        # The process's shared execution pool (core.pools): threads bounded by the host, not
        # by the number of versions; the version's instances (count on each of its devices)
        # bound its concurrency, and the session places each batch on a free one.
        self._executor = executor
        self.batcher: DynamicBatcher[Work, dict[str, np.ndarray]] = DynamicBatcher(
            self._execute,
            # A version whose requests run alone by config takes one request per batch: a
            # batch of several ran them one after another on one instance while the others
            # sat idle, and a request of higher priority (or an earlier deadline) arriving
            # then waited behind the whole batch. Rows per request are checked on decoding.
            max_batch_size=self.max_batch_size if config.batching.combine_requests else 0,
            max_queue_delay=b.max_queue_delay_ms / 1000.0,
            max_queue_size=b.max_queue_size,
            max_concurrency=config.instances.total,
            batch_size_of=_batch_of,
            batch_key=_key_of,
            # Batch time is predicted from input elements, not rows: see _ns_per_element.
            cost_of=_cost_of,
            name=f"{name}/{version}",
            run_now=self._run_now,
            # Sizes the model's config plans (runtime.plans) are Triton's preferred batch sizes:
            # a partial batch that reaches one goes at once. A derived plan (powers of two on a
            # GPU) is not a preference: with 1 in it, nothing would ever wait for company.
            preferred_sizes=b.planned_batch_sizes or (),
        )

    def _run_now(
        self, items: Sequence[Work], info: BatchInfo
    ) -> list[dict[str, np.ndarray] | Failed] | None:
        """The batch, run here and now on the event loop when it is predicted to take less than
        ``INLINE_NS``: handing it to a worker thread and back costs more than the work
        (measured: 30-140 us per hop against ~15-40 us for a tiny MLP). None: it is slower, or
        its provider runs elsewhere, and belongs on the shared execution pool. The prediction
        is the batch's input elements times the measured cost of one: a request long on a
        dynamic axis is predicted long, and goes to the pool."""
        if not (self._inline and self._ns_per_element * _elements(items) < INLINE_NS):
            return None
        return self._finish(items, self._run_batch(items, info.left), info)

    async def _execute(
        self, items: Sequence[Work], info: BatchInfo
    ) -> list[dict[str, np.ndarray] | Failed]:
        """Run one batch: inline when it is quick (``_run_now``), else on the execution pool so
        the loop stays free."""
        results = self._run_now(items, info)
        if results is not None:
            return results
        loop = asyncio.get_running_loop()
        timed = await loop.run_in_executor(self._executor, self._run_batch, items, info.left)
        return self._finish(items, timed, info)

    def _finish(
        self, items: Sequence[Work], timed: Ran, info: BatchInfo
    ) -> list[dict[str, np.ndarray] | Failed]:
        results, runs, elapsed_ns = timed
        if self._alone and self.batcher.max_batch_size:
            # A real batch showed rows mixing (_prove_rows_apart, on a worker thread): each
            # request becomes a batch of its own here, on the loop, as for combine_requests.
            self.batcher.one_per_batch()
        # Queue and compute per request are a successful request's, as in Triton (whose
        # failures add to ``fail`` alone): perf_analyzer divides their ns by the success count.
        # Charged there, a request the model failed to run, a rollout's shadow run (work the
        # candidate did, but no caller's request) or one whose caller left while it ran (its
        # cancel counted nowhere, its deadline a failure) each raised every request's figures.
        left = info.left() if info.left is not None else [False] * len(items)
        charged = [
            not (w.shadow or gone or isinstance(r, Failed))
            for w, gone, r in zip(items, left, results, strict=True)
        ]
        self.stats.record_queue([ns for ns, c in zip(info.queue_ns, charged, strict=True) if c])
        # Exponentially weighted per-element cost: follows the model's speed without being
        # thrown by one slow batch.
        per_element = elapsed_ns / _elements(items)
        self._ns_per_element = 0.8 * self._ns_per_element + 0.2 * per_element
        for size, served, t_in, t_infer, t_out in runs:
            requests = sum(1 for i in served if charged[i])
            self.stats.record_execution(size, requests, t_in, t_infer, t_out)
        return results

    def _run_batch(self, items: Sequence[Work], left: Left = None) -> Ran:
        """Worker thread: gather -> run -> check -> split, timing each stage. Returns the
        results, the executions that succeeded (what statistics count: Triton counts only
        successful executions and the inferences they served) and the ns it all took."""
        start = time.perf_counter_ns()
        if self._unchecked and not self._checked_on(items[0]) and len(items) > 1:
            return self._apart(items, start, left)
        if self._alone and len(items) > 1:
            return self._apart(items, start, left)
        if self._rows_unproven and len(items) > 1:
            return self._prove_rows_apart(items, start, left)
        wanted = _union_outputs(items, self.output_names)
        # The input stage starts here: the check of the batch dimension above runs the model
        # (alone, then twice), and its time was this batch's compute_input.
        t0 = time.perf_counter_ns()
        # The session gathers the requests' inputs itself: a planned one straight into its
        # reused buffers (one copy), not concatenated here and copied again to pad. Nothing
        # runs between the gather and the run: a session may hold an instance or a buffer set
        # from one to the other.
        gathered = self.session.gather([w.inputs for w in items], self.input_names)
        t1 = time.perf_counter_ns()
        try:
            outputs = self.session.run_gathered(gathered, wanted)
        except Exception:
            if len(items) == 1:
                raise
            # One request's values can fail the whole run (a token id past an embedding's
            # table): each request runs again alone and gets its own answer or error, so one
            # client's bad input is not every batched client's failure. Each run alone that
            # succeeds is an execution of its own; the failed batch is none (it was counted as
            # one execution of the whole batch, its failed rows as inferences).
            return self._apart(items, start, left)
        t2 = time.perf_counter_ns()
        sizes = [w.batch for w in items]
        total = sum(sizes)
        problem = _not_batch_first(wanted, outputs, total) if self.max_batch_size > 0 else ""
        if problem:  # the model's shapes against its config, not a fault of the server's
            raise FailedPrecondition(
                f"model {self.name}/{self.version} returned {problem}: its first dimension is "
                "not a batch dimension; set batching.max_batch_size = 0 in its config"
            )
        per_request = cast("list[dict[str, np.ndarray] | Failed]", split(outputs, wanted, sizes))
        t3 = time.perf_counter_ns()
        served = tuple(range(len(items)))
        return per_request, [(total, served, t1 - t0, t2 - t1, t3 - t2)], t3 - start

    def _apart(self, items: Sequence[Work], t0: int, left: Left = None) -> Ran:
        """Each request run alone, with its own answer or error; not one whose caller has
        left (its deadline ended the call, or its client cancelled it) before its turn: no one
        would read the answer, and its run alone delayed the others' and was counted as an
        execution. ``left`` is the batcher's BatchInfo.left: a read of each caller's future from
        this worker thread, which at worst sees a caller leave one run late."""
        apart: list[dict[str, np.ndarray] | Failed] = []
        runs: list[Execution] = []
        for i, w in enumerate(items):
            if left is not None and left()[i]:
                apart.append(Failed(Cancelled("the caller left before its request ran alone")))
                continue
            try:
                alone, ran, _ = self._run_batch((w,))
            except Exception as exc:
                apart.append(Failed(exc))
                continue
            apart.extend(alone)
            # Each run alone served this request: its index in the whole batch.
            runs.extend((size, (i,), t_in, t_infer, t_out) for size, _, t_in, t_infer, t_out in ran)
        return apart, runs, time.perf_counter_ns() - t0

    def _prove_rows_apart(self, items: Sequence[Work], t0: int, left: Left = None) -> Ran:
        """Each request run alone (their answers), then, while unproven, the ones that ran
        together, to see whether rows of different callers may share a run.

        A model none of runtime.rows' made-up rows runs (an exact size, a small table) was
        batched on its shapes alone, and one that works across its rows (a mean over them)
        answered each caller with values of the others. Requests that are all equal prove
        nothing (a mean over equal rows is each row's); different ones that each get the
        answer they got alone prove the rows apart and batches run together from then on. One
        that does not, or a batch that does not run together, keeps every request alone."""
        apart, runs, _ = self._apart(items, t0, left)
        if not self._alone:
            served = [w for w, r in zip(items, apart, strict=True) if not isinstance(r, Failed)]
            answers = [r for r in apart if not isinstance(r, Failed)]
            if len(served) > 1 and _differ(served, self.input_names):
                why, together = self._rows_mixed(served, answers)
                if together is not None:
                    # The run together is an execution (Triton counts each one the model
                    # made) that answered no request: its rows were timed, never counted, and
                    # execution_count and batch_stats missed a batch that ran.
                    runs.append(together)
                if why:
                    self._alone = True
                    self._alone_why = why
                    log.warning(
                        "%s/%s: not batched: %s; its requests run alone (set "
                        "batching.max_batch_size in its config to decide)",
                        self.name,
                        self.version,
                        why,
                    )
                elif not self._alone:
                    self._rows_unproven = False
                    log.info("%s/%s: rows proven apart on a real batch", self.name, self.version)
        return apart, runs, time.perf_counter_ns() - t0

    def _rows_mixed(
        self, served: Sequence[Work], alone: list[dict[str, np.ndarray]]
    ) -> tuple[str, Execution | None]:
        """What differs when ``served`` run together from their answers ``alone`` ('' when
        nothing does), and that run together as an execution serving no request (None when
        it did not run)."""
        wanted = _union_outputs(served, self.output_names)
        rows = sum(w.batch for w in served)
        t0 = time.perf_counter_ns()
        try:
            gathered = self.session.gather([w.inputs for w in served], self.input_names)
            t1 = time.perf_counter_ns()
            outputs = self.session.run_gathered(gathered, wanted)
        except Exception as exc:
            return f"requests that run alone do not run together ({type(exc).__name__})", None
        t2 = time.perf_counter_ns()
        problem = _not_batch_first(wanted, outputs, rows)
        if problem:
            return problem, (rows, (), t1 - t0, t2 - t1, 0)
        together = split(outputs, wanted, [w.batch for w in served])
        ran = (rows, (), t1 - t0, t2 - t1, time.perf_counter_ns() - t2)
        for answer, one in zip(together, alone, strict=True):
            for name, value in one.items():
                if not same_answer(answer[name], value):
                    return (
                        f"output {name!r} of a request differs when other requests run beside "
                        "it: the model works across its first dimension"
                    ), ran
        return "", ran

    @property
    def combines_requests(self) -> bool:
        """Whether requests may share a run: not where the config says so, nor once a real
        batch showed the model's rows mixing (_prove_rows_apart). What metadata reports: such
        a model was described with the dynamic batcher though each request ran alone."""
        return not self._alone

    @property
    def run_alone_reason(self) -> str:
        """Why requests run alone when no config said so: what a real batch showed. Described
        as "combine_requests = false", such a model sent its owner to a config that never
        said it."""
        return f"a batch showed the rows mixing: {self._alone_why}" if self._alone_why else ""

    def _checked_on(self, work: Work) -> bool:
        """Whether the batch dimension is now checked, on ``work``'s first row (alone, then
        twice): a model no made-up row runs was batched unchecked, and an output [seq, batch]
        whose seq equalled the batch's rows served each caller another's values. An output
        found not batched first fails this and every later request FAILED_PRECONDITION, naming
        it; a row the model does not run leaves it unchecked (the request then fails alone)."""
        if not self._not_batched_first and work.batch > 0:
            row = {name: a[:1] for name, a in work.inputs.items()}
            ran, self._not_batched_first = self.session.check_rows(row, self.max_batch_size)
            self._unchecked = not ran or bool(self._not_batched_first)
        if self._not_batched_first:
            raise FailedPrecondition(
                f"model {self.name}/{self.version} is batched (max_batch_size "
                f"{self.max_batch_size}), but {self._not_batched_first}: its answers cannot be "
                "split per request; set batching.max_batch_size = 0 in its config"
            )
        return not self._unchecked

    def statistics(self) -> VersionStatistics:
        snapshot = self.stats.snapshot(
            self.name,
            self.version,
            rejected=self.batcher.rejected,
            expired=self.batcher.expired,
            queue_depth=self.batcher.queue_depth,
        )
        snapshot = replace(snapshot, load=self.load_id)
        placed = getattr(self.session, "device_statistics", None)  # device_ids only
        if placed is not None:
            snapshot = replace(snapshot, device_executions=placed())
        plan = getattr(self.session, "plan_statistics", None)  # planned batch sizes only
        if plan is None:
            return snapshot
        executions, changes = plan()
        return replace(snapshot, planned_executions=executions, plan_changes=changes)

    async def close(self, *, drain: bool = True, releaser: Executor | None = None) -> None:
        """Drain (or fail) the queue, then free the session; with ``releaser``, the freeing
        (onnxruntime's destructor: milliseconds for a large model) runs there, not on the loop."""
        await self.batcher.close(drain=drain)
        if releaser is not None:
            await asyncio.get_running_loop().run_in_executor(releaser, self.session.release)
            return
        # The batcher and this object refer to each other, so only the cycle collector would
        # free them; release the onnxruntime session (weights, threads) now instead.
        self.session.release()


def _elements(items: Sequence[Work]) -> int:
    """The batch's input elements (at least 1: a model may take empty tensors, or none)."""
    return max(1, sum([w.elements for w in items]))


def _batch_of(work: Work) -> int:
    return work.batch


def _cost_of(work: Work) -> int:
    return max(1, work.elements)


def _key_of(work: Work) -> tuple[tuple[int, ...], ...]:
    return work.key


def _not_batch_first(names: Sequence[str], outputs: Sequence[np.ndarray], rows: int) -> str:
    """The first output whose first dimension is not the batch's ``rows``, described; ''
    when every one's is."""
    for name, out in zip(names, outputs, strict=True):
        if np.ndim(out) == 0 or out.shape[0] != rows:
            return f"output {name!r} with shape {list(np.shape(out))} for a batch of {rows}"
    return ""


def _differ(items: Sequence[Work], order: Sequence[str]) -> bool:
    """Whether some request's inputs are not the first's."""
    first = items[0].inputs
    return any(not np.array_equal(w.inputs[name], first[name]) for w in items[1:] for name in order)


def _union_outputs(items: Sequence[Work], all_outputs: list[str]) -> list[str]:
    """The outputs any request of the batch asked for, in the model's order (all of them as
    soon as one request asked for all). One pass: for the usual batch of one it is one look."""
    wanted: set[str] = set()
    for w in items:
        if w.outputs is None:
            return all_outputs
        wanted.update(w.outputs)
    return [n for n in all_outputs if n in wanted]


def open_version(
    opener: Opener,
    name: str,
    version: int,
    path: Path,
    config: ModelConfig,
    *,
    warm_up: bool,
    executor: Executor,
) -> LoadedVersion:
    """Open a version folder's model with the config it will be served with (the model's,
    overridden by the version's own ``config.json``): session, batch dimension check, warm-up.
    Blocking: call it on a worker thread."""
    if not path.is_file():
        if not path.exists() and not path.is_symlink():
            raise ModelNotReady(f"{name}/{version}/{path.name} is missing")
        # A folder (an unpacked export), a FIFO or a dangling link was said to be "missing",
        # which the file listing contradicted.
        raise ModelNotReady(
            f"{name}/{version}/{path.name} is not a regular file (a folder, a link to nothing, "
            "a device or a FIFO): put the ONNX model file itself there"
        )
    config = apply_version_config(config, path.parent)
    session = opener(path, config)
    try:
        mbs = config.batching.max_batch_size
        if mbs is None:
            config = config.with_max_batch_size(
                DEFAULT_MAX_BATCH_SIZE if session.batchable() else 0
            )
        elif mbs > 0 and not session.batchable():
            raise ModelNotReady(
                f"config sets batching.max_batch_size = {mbs} but the graph's inputs/outputs do "
                "not all have a dynamic first dimension; set it to 0"
            )
        if warm_up:
            try:
                session.warm_up(1 if config.batching.max_batch_size else 0)
            except Exception as exc:
                log.warning("warm-up of %s/%s failed (serving anyway): %s", name, version, exc)
    except BaseException:
        session.release()
        raise
    return LoadedVersion(name, version, session, config, executor)
