"""One onnxruntime InferenceSession per loaded model version.

Sessions are created, warmed up and run on worker threads: onnxruntime releases the GIL inside
``run``, so the event loop keeps serving other requests while a batch executes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import onnxruntime as ort

from ferry.codec import DataType, numpy_dtype
from ferry.server.batching.tensors import concat
from ferry.server.core import priority
from ferry.server.core.config import DEFAULT_MAX_BATCH_SIZE, ModelConfig, OnnxRuntimeConfig
from ferry.server.core.types import DYNAMIC_AXES_METADATA, AxisBound, TensorSpec
from ferry.server.cpus import usable_cores
from ferry.server.errors import InvalidArgument, Unavailable, first_line
from ferry.server.runtime import external_files, instances, optimizers, plans, rows, shared_weights
from ferry.server.runtime import providers as provider_table
from ferry.server.runtime.run_errors import REFUSED_INPUT, refused_input

log = logging.getLogger(__name__)

T = TypeVar("T")

# onnxruntime's type strings -> our wire dtypes.
ORT_TYPES: dict[str, int] = {
    "tensor(bool)": DataType.DATA_TYPE_BOOL,
    "tensor(uint8)": DataType.DATA_TYPE_UINT8,
    "tensor(uint16)": DataType.DATA_TYPE_UINT16,
    "tensor(uint32)": DataType.DATA_TYPE_UINT32,
    "tensor(uint64)": DataType.DATA_TYPE_UINT64,
    "tensor(int8)": DataType.DATA_TYPE_INT8,
    "tensor(int16)": DataType.DATA_TYPE_INT16,
    "tensor(int32)": DataType.DATA_TYPE_INT32,
    "tensor(int64)": DataType.DATA_TYPE_INT64,
    "tensor(float16)": DataType.DATA_TYPE_FP16,
    "tensor(bfloat16)": DataType.DATA_TYPE_BF16,
    "tensor(float)": DataType.DATA_TYPE_FP32,
    "tensor(double)": DataType.DATA_TYPE_FP64,
    "tensor(string)": DataType.DATA_TYPE_BYTES,
}

_OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def _spec(node: Any) -> TensorSpec:
    dtype = ORT_TYPES.get(node.type)
    if dtype is None:
        raise InvalidArgument(
            f"tensor {node.name!r} has type {node.type}, which Ferry cannot serve "
            f"(supported: {', '.join(sorted(ORT_TYPES))})"
        )
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (node.shape or ()))
    return TensorSpec(node.name, dtype, shape)


def _refuse_unknown_rank(path: Path, inputs: list[TensorSpec]) -> None:
    """onnxruntime reports an input the graph gives no shape at all (rank unknown) as rank 0,
    so it was served as a scalar and every real tensor was refused. Only the graph tells the
    two apart; it is read (without weights) only when some input looks like a scalar."""
    if not any(spec.shape == () for spec in inputs):
        return
    import onnx  # the graph only, and only for this rare case

    graph = onnx.load(os.fspath(path), load_external_data=False).graph
    for value in graph.input:
        tensor = value.type.tensor_type
        if value.type.HasField("tensor_type") and not tensor.HasField("shape"):
            raise InvalidArgument(
                f"input {value.name!r} declares no shape, so its rank is unknown: Ferry checks "
                "and batches requests by their inputs' rank; give it a shape in the graph (its "
                "dims may be symbolic, e.g. ['batch', 'n'])"
            )


def _with_bounds(session: Any, path: Path, specs: list[TensorSpec]) -> list[TensorSpec]:
    """``specs`` with the bounds a converted version was verified at (model metadata written
    at publish). A file whose entry does not parse, or names dims the graph does not leave
    dynamic, is served without them (a hand-edited file is not refused over advisory
    metadata)."""
    text = session.get_modelmeta().custom_metadata_map.get(DYNAMIC_AXES_METADATA)
    if not text:
        return specs
    shapes = {spec.name: spec.shape for spec in specs}
    try:
        table = json.loads(text)
        out = {
            name: tuple(
                AxisBound(int(axis), str(n), int(lo), int(hi))
                for axis, (n, lo, hi) in sorted(axes.items(), key=lambda kv: int(kv[0]))
            )
            for name, axes in table.items()
        }
        for name, axes in out.items():
            shape = shapes[name]
            if any(not 0 < b.axis < len(shape) or shape[b.axis] != -1 for b in axes):
                raise ValueError(f"input {name!r} has no dynamic dim at one of its axes")
            # Bounds no request can meet (10..1, negative) would refuse every request.
            if any(b.min < 1 or (b.max and b.max < b.min) or b.max < 0 for b in axes):
                raise ValueError(f"input {name!r} has bounds no size meets")
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError, RecursionError) as exc:
        # OverflowError: a bound of Infinity (which json reads); RecursionError: deep nesting.
        # Either made the version FAILED, blaming onnxruntime.
        log.warning("%s: ignoring its %s metadata (%s)", path, DYNAMIC_AXES_METADATA, exc)
        return specs
    return [dataclasses.replace(spec, bounds=out.get(spec.name, ())) for spec in specs]


def _bf16_of_widened(values: np.ndarray, bf16: np.dtype[Any]) -> np.ndarray:
    """The BF16 values a Cast to float32 widened, taken back by their upper 16 bits. Exact,
    NaN payloads included: a rounding cast (ml_dtypes' astype) gave every NaN the one default
    NaN, so a model's NaN bits came back changed."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    return (bits >> 16).astype(np.uint16).view(bf16)


def _bf16_ortvalue(arr: np.ndarray) -> Any:
    """Feed a bfloat16 array by its bits: onnxruntime accepts BF16 only as an OrtValue."""
    contiguous = np.ascontiguousarray(arr)
    return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(contiguous.view(np.uint16), 16)


def _cast_outputs_to_float(path: Path, names: set[str]) -> bytes:
    """The model with each named BF16 output produced through an added Cast to float32."""
    import onnx

    # The graph: external data (a model over 2 GiB) stays in its file, found through the
    # session's external-initializers folder, the version's own.
    model = onnx.load(os.fspath(path), load_external_data=False)
    graph = model.graph
    for name in names:
        inner = f"{name}__ferry_bf16"
        for node in graph.node:
            node.output[:] = [inner if o == name else o for o in node.output]
            node.input[:] = [inner if i == name else i for i in node.input]
        graph.node.append(onnx.helper.make_node("Cast", [inner], [name], to=onnx.TensorProto.FLOAT))
        for out in graph.output:
            if out.name == name:
                out.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    return model.SerializeToString()


# intra_op_threads = 0 (auto): a model whose batch of one takes longer than this on one thread
# is heavy, and gets the worker's cores; a quicker one keeps one thread (measured: the tiny MLP
# served more with 1 thread than with one per core, the small CNN 1.6x more with 2 than with 1).
AUTO_HEAVY_NS = 1_000_000
_AUTO = {"threads": 0}  # set by the server: its share of the cores; 0 until then (one per core)


def set_auto_threads(threads: int) -> None:
    """The threads a heavy model gets under ``intra_op_threads = 0`` (the worker's cores)."""
    _AUTO["threads"] = threads


# Timed runs of the batch of one: the fastest counts. Loads run on a niced thread, so on a busy
# host one run can be preempted for milliseconds and a tiny model would be judged heavy (and
# given a thread pool of its own); a preemption does not repeat in every run.
AUTO_RUNS = 3


def _batch_of_one_ns(session: OrtSession) -> int:
    session.warm_up(1)  # the first run allocates and picks kernels: not what is measured
    best = None
    for _ in range(AUTO_RUNS):
        start = time.perf_counter_ns()
        session.warm_up(1)
        took = time.perf_counter_ns() - start
        best = took if best is None else min(best, took)
        if best <= AUTO_HEAVY_NS:
            break  # light: once is proof enough
    assert best is not None
    return best


OpenDevice = Callable[[Path, ModelConfig], "OrtSession | plans.PlannedSession"]


def open_session(
    path: Path, config: ModelConfig, *, open_device: OpenDevice | None = None
) -> OrtSession | plans.PlannedSession | instances.DeviceSessions:
    """The registry's opener: a model file and the config it is served with -> its session.

    With ``instances.device_ids``, one session per device (runtime.placement), each opened by
    ``open_device`` (``open_one``; a test passes its own to see what each device was given).
    Without, the one session ``open_one`` opens, as before device placement existed."""
    opener = open_device or open_one
    if not config.instances.device_ids:
        return opener(path, config)
    return instances.open_placed(config, lambda placed: opener(path, placed))


def open_one(path: Path, config: ModelConfig) -> OrtSession | plans.PlannedSession:
    """One device's session: planned batch sizes (runtime.plans) where they apply.

    ``intra_op_threads = 0`` is decided here, by measuring: one thread, unless a batch of one
    takes longer than AUTO_HEAVY_NS on it, in which case the session is opened again with the
    worker's cores. Threads then follow the host for small models (no pool per session) and
    a heavy model still uses every core for one request."""
    session = _open_threads(path, config.onnxruntime)
    max_batch = config.batching.max_batch_size
    if max_batch is None:
        max_batch = DEFAULT_MAX_BATCH_SIZE if _batchable_unasked(session) else 0
    elif max_batch > 0 and session.batchable():
        try:
            _check_batch_dimension(session, max_batch)
        except BaseException:
            session.release()
            raise
    sizes = plans.plan_sizes(config.batching.planned_batch_sizes, session.device_kind, max_batch)
    # A version whose requests run alone (combine_requests false) is one whose answer for a row
    # depends on the other rows of its run: padding a request to a planned size with copies of
    # its last row changed every answer (x - mean(x) over 3 rows answered [-5, -1, 3] for
    # [-4, 0, 4]; a dynamic int8 version, default on GPU providers, the requests whose
    # activations landed on a quantization step). Its requests run at their own size. So do
    # those of a version whose rows are unproven (no probe row runs it): padded, a request
    # that ran alone was already answered with the padding's rows, before any proof.
    apart = config.batching.combine_requests and not session.rows_unproven
    if not sizes or not session.batchable() or not apart:
        return session
    threads = session.intra_op_threads
    return plans.open_planned(
        lambda: OrtSession(path, config.onnxruntime, intra_op_threads=threads), session, sizes
    )


def _check_batch_dimension(session: OrtSession, max_batch: int) -> None:
    """A configured ``max_batch_size`` is the user's word on whether rows may share a run
    (runtime.rows is not asked), but not on the graph's shapes: an output whose first dimension
    is not the batch's (a transpose, a flatten over the rows) failed every request INTERNAL,
    and where its size happened to equal the batch's, split another request's values into each
    answer. Refused at load, naming the output (``_first_dimension``)."""
    problem = _first_dimension(session, max_batch)
    if problem:
        raise InvalidArgument(
            f"config sets batching.max_batch_size = {max_batch}, but {problem}; set "
            "batching.max_batch_size = 0"
        )


def _first_dimension(session: OrtSession, max_batch: int) -> str:
    """What is wrong with the outputs' first dimension on one made-up row, then two
    (``check_rows``); '' when nothing is. Zeros first; a model that does not run on zeros (a
    Range stepped by an input's value, an op refusing 0) was served unchecked and mixed
    callers' rows, so ones and the probe's rows (runtime.rows.made_up_rows) are tried next.
    One that runs on none of them is marked unchecked: it is checked on the first request's
    own row before requests share a run (core.loaded)."""
    for row in [session.zero_feeds(1), *rows.made_up_rows(session)]:
        ran, problem = session.check_rows(row, max_batch)
        if ran:
            return problem
    session.batch_checked = False
    log.warning(
        "%s: its batch dimension could not be checked on made-up rows (the model runs on none "
        "of them): requests run alone until the first one's row is checked",
        session.path,
    )
    return ""


def _batchable_unasked(session: OrtSession) -> bool:
    """Batch a model whose config does not say only when its rows stay apart (runtime.rows);
    a session found otherwise is not batchable from then on, for every later decision."""
    if not session.batchable():
        return False
    apart, why = rows.probe(session)
    if apart is None:  # as before the probe: the shapes say batchable, if a row agrees
        problem = _first_dimension(session, DEFAULT_MAX_BATCH_SIZE)
        if problem:
            apart, why = False, problem
    if apart is None:
        # Batched on its shapes, its rows unproven: the core runs different callers' requests
        # alone until a real batch of them gives each the answer it gets alone (core.loaded).
        session.rows_unproven = True
        log.warning(
            "%s: batched (max_batch_size %d) on its shapes alone: %s. Requests share a run "
            "only once a batch of different requests has given each its answer alone; in its "
            "config.toml, batching.max_batch_size = 0 turns batching off, a size batches it "
            "unchecked",
            session.path,
            DEFAULT_MAX_BATCH_SIZE,
            why,
        )
        return True
    if apart:
        return True
    session.rows_apart = False
    log.warning(
        "%s: not batched (max_batch_size 0): %s. Set batching.max_batch_size in its "
        "config.toml to decide otherwise",
        session.path,
        why,
    )
    return False


def _open_threads(path: Path, options: OnnxRuntimeConfig) -> OrtSession:
    if options.intra_op_threads:
        return OrtSession(path, options)
    session = OrtSession(path, options, intra_op_threads=1)
    share = _AUTO["threads"] or usable_cores()
    if share <= 1 or session.device_kind != "cpu":
        return session
    try:
        cost = _batch_of_one_ns(session)
    except Exception as exc:  # shapes warm-up cannot guess: keep one thread
        log.debug("%s: not measured for intra_op_threads (%s); 1 thread", path, exc)
        return session
    if cost <= AUTO_HEAVY_NS:
        return session
    session.release()
    log.info(
        "%s: a batch of one takes %.1f ms on one thread: %d intra-op threads",
        path,
        cost / 1e6,
        share,
    )
    return OrtSession(path, options, intra_op_threads=share)


def _own_threads(intra_op_threads: int) -> int:
    """Threads a CPU session starts for its intra-op pool: the caller is one of its n."""
    n = intra_op_threads or usable_cores()  # 0: onnxruntime's default, one per core
    return max(0, n - 1)


def _build(build: Callable[[], T], own: int | None) -> T:
    """Build a session; one that starts ``own`` threads of its own (an intra-op pool; None: a
    GPU provider's, how many is not known) so that they keep normal priority
    (core.priority)."""
    if own == 0:
        return build()
    return priority.with_own_threads(build, own)


# onnxruntime's FATAL: a run's errors reach the caller as exceptions, not as log lines.
RUN_LOG_SEVERITY = 4


def _released(*_args: Any) -> Any:
    raise Unavailable("this model version was unloaded")


def available_providers() -> list[str]:
    return list(ort.get_available_providers())


# onnxruntime's switch (an environment variable its C++ core reads too) that lets a model's own
# metadata ("ort_config") set its session options: threads, and profiling, which writes files.
ORT_CONFIG_FROM_MODEL = "ORT_LOAD_CONFIG_FROM_MODEL"


def _no_config_from_models() -> None:
    """A served model never configures its own session: with the switch set in the server's
    environment an uploaded model chose its threads (or profiling), and onnxruntime refused to
    open a model from its path at all ("ModelProto needs to be parsed"). Dropped from this
    process's environment, once, with a WARNING; ``read_config_from_model=0`` says it again."""
    if os.environ.pop(ORT_CONFIG_FROM_MODEL, None) is not None:
        log.warning(
            "%s is set: ignored (a served model's metadata never sets its session options)",
            ORT_CONFIG_FROM_MODEL,
        )


class OrtSession:
    """A loaded model version: its session, its signature, and how to run it."""

    def __init__(
        self, path: Path, options: OnnxRuntimeConfig, *, intra_op_threads: int | None = None
    ) -> None:
        _no_config_from_models()
        plan = provider_table.resolve(options.providers, available_providers())
        if plan.missing:
            log.warning(
                "%s: execution providers %s are not in this onnxruntime build; using %s",
                path,
                plan.missing,
                plan.names,
            )
        providers = list(zip(plan.names, plan.options, strict=True))
        so = ort.SessionOptions()
        so.graph_optimization_level = _OPT_LEVELS[options.graph_optimization]
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        threads = options.intra_op_threads if intra_op_threads is None else intra_op_threads
        so.intra_op_num_threads = threads
        self.intra_op_threads = threads
        so.inter_op_num_threads = options.inter_op_threads
        so.enable_cpu_mem_arena = options.memory_arena
        so.enable_mem_pattern = options.memory_arena
        so.log_severity_level = 3
        if not options.allow_spinning:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.path = path
        opened = path
        shared = shared_weights.shared_copy(path) if options.share_weights else None
        if shared is not None:
            # Prepacking would copy the mapped MatMul/Gemm weights into this process again.
            so.add_session_config_entry("session.disable_prepacking", "1")
            opened = shared
        self.weights_shared = shared is not None
        # The version's own data files are never mapped where they are: a file rewritten in
        # place crashed the server (SIGBUS). Mapped from Ferry's own copy (never rewritten),
        # whose pages the sessions and workers share; else read now, held until the sessions
        # below are built. The shared copy is Ferry's own too.
        data: list[bytes] = []
        if shared is None:
            snapshot = external_files.snapshot(path)
            if snapshot is not None:
                opened = snapshot
            else:
                data = external_files.read_into(so, path)
        # A session that starts threads of its own (an intra-op pool; a GPU provider's) is built
        # so that they keep normal priority: a thread keeps the priority of its creator.
        on_cpu = provider_table.placement(plan.names[0])[0] == provider_table.CPU
        own = _own_threads(threads) if on_cpu else None

        def opener(model: str | bytes) -> Callable[[], ort.InferenceSession]:
            """Both sessions below (the file's, a BF16 graph's copy) open alike."""
            return lambda: ort.InferenceSession(
                model,
                sess_options=so,
                providers=providers,
                disabled_optimizers=optimizers.disabled(),
                # With ORT_LOAD_CONFIG_FROM_MODEL=1 in the server's environment, onnxruntime
                # took session options from the model's own metadata ("ort_config"): an
                # uploaded model could set its threads or turn profiling on (files written).
                read_config_from_model=0,
            )

        self.session = _build(opener(os.fspath(opened)), own)
        self.inputs = _with_bounds(
            self.session, path, [_spec(n) for n in self.session.get_inputs()]
        )
        _refuse_unknown_rank(path, self.inputs)
        self.outputs = [_spec(n) for n in self.session.get_outputs()]
        self._bf16_inputs = {s.name for s in self.inputs if s.dtype == DataType.DATA_TYPE_BF16}
        self._bf16_outputs = {s.name for s in self.outputs if s.dtype == DataType.DATA_TYPE_BF16}
        if self._bf16_outputs:
            # onnxruntime's Python API cannot hand back a bfloat16 array: serve a copy of the
            # graph whose BF16 outputs are cast to float32 (exact), and narrow them again here.
            model_bytes = _cast_outputs_to_float(opened, self._bf16_outputs)
            so.add_session_config_entry(
                "session.model_external_initializers_file_folder_path", str(opened.parent)
            )
            self.session = _build(opener(model_bytes), own)
        del data  # onnxruntime copied what it takes from them
        self.providers: list[str] = list(self.session.get_providers())
        # Placement from the provider onnxruntime actually put first, not the one asked for.
        self.device_kind, self.inline_allowed = provider_table.placement(self.providers[0])
        self.output_names = [o.name for o in self.outputs]
        self.rows_apart = True  # False once runtime.rows saw requests' rows mix
        # True when runtime.rows could run none of its rows and the shapes alone batched it.
        self.rows_unproven = False
        # False when a configured batch size's check ran on no made-up row (open_one): the
        # core checks it on a request's own row before requests share a run.
        self.batch_checked = True
        self._run = self.session.run
        # A run onnxruntime refuses (a token id past an embedding's table) is the request's
        # INVALID_ARGUMENT with onnxruntime's words; onnxruntime also printed it to stderr as an
        # ERROR line, past the server's logging and --log-format json, once per such request
        # (and once more per request of a batch it failed), so any client could fill the log.
        self.run_options = ort.RunOptions()
        self.run_options.log_severity_level = RUN_LOG_SEVERITY

    def release(self) -> None:
        """Drop the onnxruntime session now (an unloaded version must not hold its memory until
        a garbage collection); a later run raises Unavailable."""
        self.session = None
        self._run = _released

    def batchable(self) -> bool:
        """True when every input and output has a dynamic leading dimension and no probe saw
        rows mix (runtime.rows): the graph can take concatenated requests."""
        specs = self.inputs + self.outputs
        shaped = all(len(s.shape) >= 1 and s.shape[0] == -1 for s in specs)
        return self.rows_apart and bool(specs) and shaped

    def check_rows(self, row: dict[str, np.ndarray], max_batch: int) -> tuple[bool, str]:
        """Runs ``row`` (one row of each input) alone, then twice: (False, '') when the model
        does not run it, (True, what) when an output's first dimension is not the rows', (True,
        '') when it is. Both counts, since one run cannot tell a batch dimension from another
        that equals it there: a time-major output [seq, batch] with seq 2 is [2, 2] for two
        rows. Twice also at max_batch_size 1 (the graph's first dimension is dynamic): one row
        alone let a transpose [k, batch] pass at k = 1; where two rows do not run there, one
        row is what that limit sends, and its check stands."""
        for count in (1, 2):
            feeds = {name: np.repeat(a[:1], count, axis=0) for name, a in row.items()}
            try:
                outputs = self.run(feeds)
            except Exception as exc:
                log.debug("%s: batch dimension not checked (%s)", self.path, first_line(exc))
                return count > 1 and max_batch == 1, ""
            for name, out in zip(self.output_names, outputs, strict=True):
                if np.ndim(out) == 0 or out.shape[0] != count:
                    return True, (
                        f"output {name!r} is {list(np.shape(out))} for a batch of {count}: its "
                        "first dimension is not the batch's"
                    )
        return True, ""

    def gather(
        self, parts: Sequence[dict[str, np.ndarray]], order: Sequence[str]
    ) -> dict[str, np.ndarray]:
        """The requests' inputs as one batch: one copy when there are several, none for one."""
        return concat(parts, order)

    def run_gathered(
        self, feeds: dict[str, np.ndarray], output_names: list[str] | None = None
    ) -> list[np.ndarray]:
        return self.run(feeds, output_names)

    def run(
        self, feeds: dict[str, np.ndarray], output_names: list[str] | None = None
    ) -> list[np.ndarray]:
        """Blocking: call from a worker thread."""
        names = output_names or self.output_names
        if self._bf16_inputs:
            feeds = {
                name: _bf16_ortvalue(arr) if name in self._bf16_inputs else arr
                for name, arr in feeds.items()
            }
        try:
            outputs: list[np.ndarray] = self._run(names, feeds, self.run_options)
        except REFUSED_INPUT as exc:
            raise refused_input(exc) from None
        return self.narrow(names, outputs)

    def narrow(self, names: Sequence[str], outputs: list[np.ndarray]) -> list[np.ndarray]:
        """BF16 outputs, which the session's graph casts to float32, narrowed back (one copy)."""
        if not self._bf16_outputs:
            return outputs
        bf16 = numpy_dtype(DataType.DATA_TYPE_BF16)
        return [
            _bf16_of_widened(out, bf16) if name in self._bf16_outputs else out
            for name, out in zip(names, outputs, strict=True)
        ]

    def warm_up(self, batch_size: int) -> None:
        """One run with zeros so the first request does not pay for allocation and kernel
        selection. Dynamic non-batch dims at 1 first, then at the probe's larger sizes (a
        convolution without padding refuses 1: its warm-up failed and logged a WARNING at
        every load, and its first request paid for the warm-up)."""
        first: Exception | None = None
        tried: list[dict[str, tuple[int, ...]]] = []
        for dynamic in rows.DYNAMIC_SIZES:
            feeds = self.zero_feeds(batch_size, dynamic)
            shapes = {name: a.shape for name, a in feeds.items()}
            if shapes in tried:  # no dynamic dim grew (none, or bounds hold it)
                continue
            tried.append(shapes)
            try:
                self.run(feeds)
                return
            except Exception as exc:
                first = first or exc
        assert first is not None
        raise first

    def zero_feeds(self, batch_size: int, dynamic: int = 1) -> dict[str, np.ndarray]:
        """Zeros for every input; dynamic non-batch dims get ``dynamic`` (1 by default), within
        the sizes the version was verified at where it has them."""
        feeds: dict[str, np.ndarray] = {}
        for spec in self.inputs:
            shape = [dynamic if d == -1 else max(d, 1) for d in spec.shape]
            for bound in spec.bounds:  # the sizes the version was verified at
                size = max(bound.min, dynamic, 1)
                shape[bound.axis] = min(size, bound.max) if bound.max else size
            if batch_size and shape:
                shape[0] = batch_size
            if spec.dtype == DataType.DATA_TYPE_BYTES:
                feeds[spec.name] = np.full(shape, "", dtype=object)
            else:
                feeds[spec.name] = np.zeros(shape, dtype=numpy_dtype(spec.dtype))
        return feeds
