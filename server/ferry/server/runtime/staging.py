"""A planned size's inputs gathered once into reusable buffers; on a device, run through IOBinding.

Before, a planned batch copied its requests' rows twice before onnxruntime saw them
(``concat``, then ``pad_rows`` concatenated again to pad). Here each planned size keeps a buffer
per input; a batch's requests are copied straight into it, padding rows are copies of the last
real row made inside the buffer, and the run reads it in place (on a device, bound to an
IOBinding after each gather, which is the host -> device copy).

Copies of a tensor's data on the serving path (request bytes -> response bytes), per path; "row"
copies are the requests' own rows, padding rows come on top (``size - n`` rows, in the buffer):

======================  =======================================  ================================
path                    inputs                                   outputs
======================  =======================================  ================================
CPU, unplanned          wire -> array: 0 (``np.frombuffer``);    onnxruntime's output tensor is
                        ``concat``: 1 when >1 request, else 0;   handed out as a numpy view (0);
                        onnxruntime reads the array in place (0) split: views (0); response: 1
                                                                 (joined into the message bytes)
CPU, planned, before    0; ``concat`` 1 (>1 request); pad: 1     as unplanned: 1
                        more (``np.concatenate`` again) = 2
CPU, planned, now       0; gathered into the size's buffer: 1;   onnxruntime allocates a fresh
                        one request of exactly a planned size:   output per batch, handed out as
                        0 (fed as is)                            a view (0); response: 1
GPU (CUDA/TensorRT),    0; gathered into the pinned buffer: 1;   bound on the device (``cuda``,
planned, as designed    host -> device by onnxruntime when the   its device id): device -> host
(not run here)          buffer is bound after the gather: 1      into fresh arrays
                        (DMA from pinned memory; pageable when   (``copy_outputs_to_cpu``): 1;
                        pinned is unavailable, and for an exact  response: 1
                        fit fed as is)
======================  =======================================  ================================

Where copies remain and why: the gather is the one copy that makes separate requests one
tensor; host -> device and device -> host are the device's own (no client sends device memory);
the response copy is the join of the message (``ferry.codec._wire``: one copy from the array
into the message's bytes; grpc's own copy into its buffers is grpc's). BF16 outputs add one
(the session's graph casts them to float32, narrowed back here: onnxruntime's Python API cannot
hand out bfloat16). BYTES (string) tensors are not bound: a model with one runs the plain
``concat`` + pad path.

Reuse is safe because nothing handed out lives in a reused buffer: input buffers are checked
out by one batch from gather to the end of its run (a second concurrent batch of the same size
and shape takes a second set; ``instances.count`` bounds how many), and outputs are bound
afresh every run (after ``clear_binding_outputs``: an output left bound would be written in
place by the next run, under a response still being encoded), so each batch's outputs are its
own allocation, alive as long as a response view refers to them. Outputs are not pooled: a
pooled output could be reused only once every response view of it had been encoded, which the
event loop decides after the batch has returned (and on CPU onnxruntime's fresh allocation is
the output itself, no copy, so a pool would save an allocation, not a copy).

On CPU the bound path cost a few microseconds of Python per batch more than ``session.run``
(binding and reading outputs back): 13-32% slower for a tiny MLP, equal for a small CNN
(bench/iobinding.py). So on CPU the gathered buffers are read by a plain ``session.run`` (the
same single copy, onnxruntime reads numpy arrays in place), and the binding is used where it
saves copies: on a device, where the host -> device copy is the cost.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import onnxruntime as ort

from ferry.codec import DataType, numpy_dtype
from ferry.server.batching.tensors import real_rows
from ferry.server.errors import Unavailable
from ferry.server.runtime import providers as provider_table
from ferry.server.runtime.run_errors import REFUSED_INPUT, refused_input

if TYPE_CHECKING:
    from ferry.server.runtime.session import OrtSession

log = logging.getLogger(__name__)

# Bounds on the buffers a planned size keeps: shapes of the non-batch dims (only dynamic ones
# make more than one; least recently used dropped first), and free sets per shape. A set is made
# when every kept one is in use by a batch running at once (instances.count bounds how many), so
# a shape keeps as many as ran at once, up to KEEP_PER_SHAPE; a surplus is dropped when it ends.
KEEP_SHAPES = 4
KEEP_PER_SHAPE = 8

_BF16_ONNX = 16  # TensorProto.BFLOAT16
ShapeKey = tuple[tuple[int, ...], ...]


def bindable(session: OrtSession) -> bool:
    """String tensors cannot be bound from a reusable numeric buffer: such a model is not staged."""
    specs = session.inputs + session.outputs
    return all(s.dtype != DataType.DATA_TYPE_BYTES for s in specs)


@dataclass(slots=True)
class Buffers:
    """One set of input buffers of one planned size and shape, and the binding that holds them."""

    key: ShapeKey
    arrays: dict[str, np.ndarray]
    binding: Any = None  # made by the first bound run (a device's; CPU runs unbound)
    values: list[Any] = field(default_factory=list)  # the bound OrtValues, kept alive here


class Stager:
    """One planned size's buffer sets: gather a batch into one, run it, hand out its outputs."""

    def __init__(self, session: OrtSession, size: int) -> None:
        self.size = size
        self._session = session
        self._names = [s.name for s in session.inputs]
        self._dtypes = {s.name: numpy_dtype(s.dtype) for s in session.inputs}
        self._bf16 = {s.name for s in session.inputs if s.dtype == DataType.DATA_TYPE_BF16}
        provider = session.providers[0]
        self._device = provider_table.io_device(provider)
        self._device_id = _device_id(session, provider)
        # CUDA only (not run here: no GPU on the build host): page-locked host buffers, so the
        # host -> device copy is a DMA instead of a staged pageable copy.
        self._pinned = _pinned_memory(provider, self._device_id) if self._device != "cpu" else None
        # Bound runs only where the binding saves a copy (a device). On CPU the buffers are read
        # in place by a plain run either way, and binding and reading the outputs back cost
        # 8-15 us more per batch for the tiny MLP (bench/iobinding.py): same copies, less Python.
        self.bind = self._device != "cpu"
        self._free: OrderedDict[ShapeKey, list[Buffers]] = OrderedDict()
        self._lock = threading.Lock()
        self._released = False
        self.created = 0  # buffer sets allocated so far (the tests' window on reuse)

    @property
    def pinned(self) -> bool:
        """Whether its buffers are page-locked host memory (a CUDA device's; not run here)."""
        return self._pinned is not None

    def gather(self, parts: Sequence[dict[str, np.ndarray]], rows: int) -> Buffers:
        """The batch's rows copied once into a free buffer set, padded with its last real row."""
        key = tuple(parts[0][name].shape[1:] for name in self._names)
        buffers = self._checkout(key)
        try:
            for name in self._names:
                target = buffers.arrays[name]
                if len(parts) == 1:
                    target[:rows] = parts[0][name]
                else:  # one C loop writing straight into the buffer: still one copy per row
                    np.concatenate([part[name] for part in parts], axis=0, out=target[:rows])
                if rows < self.size:
                    target[rows:] = target[rows - 1]
        except BaseException:
            self._checkin(buffers)
            raise
        return buffers

    def run(self, buffers: Buffers, rows: int, output_names: list[str]) -> list[np.ndarray]:
        """Blocking. The buffer set goes back to the pool once the run is over: its outputs
        are not in it."""
        if not self.bind:
            try:
                feeds = {name: buffers.arrays[name] for name in self._names}
                outputs = self._session.run(feeds, output_names)
            finally:
                self._checkin(buffers)  # the outputs are onnxruntime's fresh allocations
            return real_rows(outputs, output_names, self.size, rows)
        try:
            inner = self._session.session
            if inner is None:
                raise Unavailable("this model version was unloaded")
            if buffers.binding is None:
                buffers.binding = inner.io_binding()
            binding = buffers.binding
            # onnxruntime copies a bound input to the device its first consumer runs on when it
            # is bound (IOBinding::BindInput -> CopyOneInputAcrossDevices), not at each run: the
            # buffers are bound after every gather, and on a device that bind is the host ->
            # device copy.
            for name, value in zip(self._names, buffers.values, strict=True):
                binding.bind_ortvalue_input(name, value)
            binding.clear_binding_outputs()
            for name in output_names:
                binding.bind_output(name, self._device, self._device_id)
            try:
                inner.run_with_iobinding(binding, self._session.run_options)
            except REFUSED_INPUT as exc:
                raise refused_input(exc) from None
            if self._device == "cpu":
                outputs = [value.numpy() for value in binding.get_outputs()]
            else:  # not run here: device -> host, into fresh arrays
                outputs = binding.copy_outputs_to_cpu()
            binding.clear_binding_outputs()
        finally:
            self._checkin(buffers)
        return self._session.narrow(output_names, real_rows(outputs, output_names, self.size, rows))

    def warm_up(self, batch: dict[str, np.ndarray], output_names: list[str]) -> None:
        """One run through a buffer set, so its allocation and binding happen at load."""
        self.run(self.gather([batch], self.size), self.size, output_names)

    def release(self) -> None:
        """Drop every buffer set: their bindings hold the onnxruntime session (a set still in a
        batch's hands is dropped when it comes back)."""
        with self._lock:
            self._released = True
            self._free.clear()

    def _checkout(self, key: ShapeKey) -> Buffers:
        with self._lock:
            free = self._free.get(key)
            if free:
                self._free.move_to_end(key)
                return free.pop()
            self.created += 1
        return self._allocate(key)

    def _checkin(self, buffers: Buffers) -> None:
        with self._lock:
            if self._released:
                return
            free = self._free.setdefault(buffers.key, [])
            self._free.move_to_end(buffers.key)
            if len(free) < KEEP_PER_SHAPE:
                free.append(buffers)
            while len(self._free) > KEEP_SHAPES:
                self._free.popitem(last=False)

    def _allocate(self, key: ShapeKey) -> Buffers:
        buffers = Buffers(key, {})
        for name, dims in zip(self._names, key, strict=True):
            shape = (self.size, *dims)
            value, array = self._buffer(name, shape)
            buffers.arrays[name] = array
            buffers.values.append(value)
        return buffers

    def _buffer(self, name: str, shape: tuple[int, ...]) -> tuple[Any, np.ndarray]:
        """(the OrtValue bound, the numpy array over the same memory that batches fill)."""
        dtype = self._dtypes[name]
        if self._pinned is not None and name not in self._bf16:
            # Not run here (no GPU): pinned memory from the CUDA EP's host-accessible allocator,
            # used only when numpy really sees that memory; otherwise pageable memory below.
            try:
                value = ort.OrtValue.ortvalue_from_shape_and_type(
                    list(shape), dtype, memory_info=self._pinned
                )
                array = value.numpy()
                if array.ctypes.data == value.data_ptr():
                    return value, array
            except Exception as exc:
                log.info("no pinned host buffer for %s (%s): pageable memory", name, exc)
                self._pinned = None
        array = np.zeros(shape, dtype)
        if name in self._bf16:
            # onnxruntime takes BF16 only as an OrtValue typed by its ONNX number; same memory
            return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(
                array.view(np.uint16), _BF16_ONNX
            ), array
        return ort.OrtValue.ortvalue_from_numpy(array), array


def _device_id(session: OrtSession, provider: str) -> int:
    if session.session is None:
        return 0
    options = session.session.get_provider_options().get(provider, {})
    try:
        return int(options.get("device_id", 0))
    except (TypeError, ValueError):
        return 0


def _pinned_memory(provider: str, device_id: int) -> Any:
    """The host-accessible (pinned) memory of ``provider``'s device ``device_id``, or None where
    this onnxruntime build does not list one (then buffers are pageable). Not run here."""
    try:
        kind = ort.capi._pybind_state.OrtDeviceMemoryType.HOST_ACCESSIBLE
        for device in ort.get_ep_devices():
            if device.ep_name == provider and device.device.device_id == device_id:
                return device.memory_info(kind)
    except Exception as exc:
        log.info("%s: no pinned host memory (%s)", provider, exc)
    return None
