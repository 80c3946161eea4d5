"""Differential checks: what Ferry serves against what onnxruntime answers running the published
model.onnx itself, and the fp32 conversions against PyTorch.

Real-world-like modules (a residual CNN with BatchNorm, a transformer encoder with a padding mask
over a dynamic sequence, an embedding bag over int64 ids with LayerNorm, a model of two inputs
with a float and an int64 output) are converted by the real conversion child in several modes,
then asked every way a client can (ferry.v1 unary, stream and async; the Open Inference Protocol
over gRPC, raw and typed contents, and over HTTP, JSON and binary), alone and as batches of
callers. A served answer is right when it is onnxruntime's on the same file: one intra-op
thread (the version's config asks for one, as the oracle runs: a dynamically quantized
recurrent kernel answers ~1e-3 apart on two threads, onnxruntime's own) and the optimizers the
server turns off (runtime.optimizers).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as tg
import tritonclient.http as th
from helpers import ExecutionGate, close_on_this_thread, wait_for
from serverutil import ServerThread
from tritonclient.grpc import service_pb2, service_pb2_grpc

from ferry.client import (
    AsyncInferenceClient,
    ConversionClient,
    DynamicAxis,
    InferenceClient,
    Pruning,
    Quantization,
    RepositoryClient,
    Validation,
)
from ferry.server.runtime import optimizers

torch = pytest.importorskip("torch")
nn = torch.nn

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

# Served against onnxruntime on the same file: the same kernels, so only summation order may
# differ (a batch of other rows picks other GEMM blocking).
RTOL, ATOL = 1e-4, 1e-5
SEQ = DynamicAxis("sequence", min=1, max=32)
DATATYPES = {
    np.dtype(np.float32): "FP32",
    np.dtype(np.int64): "INT64",
    np.dtype(np.bool_): "BOOL",
}
TYPED_FIELD = {"FP32": "fp32_contents", "INT64": "int64_contents", "BOOL": "bool_contents"}


class ResidualCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block = nn.Sequential(
            nn.Conv2d(8, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.BatchNorm2d(8),
        )
        self.head = nn.Linear(8, 5)

    def forward(self, x: Any) -> Any:
        h = self.stem(x)
        return self.head(torch.relu(h + self.block(h)).mean(dim=(2, 3)))


class MaskedEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, x: Any, mask: Any) -> Any:
        h = self.encoder(x, src_key_padding_mask=mask)
        keep = (~mask).unsqueeze(-1).float()
        return self.head((h * keep).sum(1) / keep.sum(1).clamp(min=1))


class TextBag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(100, 16)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 4)

    def forward(self, ids: Any) -> Any:
        return self.head(self.norm(self.embedding(ids).mean(1)))


class TwoKinds(nn.Module):
    """Two inputs; a float output and an int64 one."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 5), nn.Linear(4, 5)

    def forward(self, x: Any, y: Any) -> Any:
        scores = self.a(x) + self.b(y)
        return scores, scores.argmax(-1)


def _masked(rows: int, seq: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Encoder inputs: each row keeps at least its first position (a row all padding is NaN in
    PyTorch and onnxruntime alike)."""
    mask = np.zeros((rows, seq), np.bool_)
    for r in range(rows):
        mask[r, int(rng.integers(1, seq + 1)) :] = True
    return {"x": rng.standard_normal((rows, seq, 16)).astype(np.float32), "mask": mask}


# model -> (module, example inputs, dynamic axes, feeds(rows, rng) for other requests)
MODELS: dict[str, tuple[Callable[[], Any], Callable[[], Any], Any, Callable[..., Any]]] = {
    "cnn": (
        ResidualCNN,
        lambda: torch.randn(6, 3, 8, 8),
        None,
        lambda n, rng, seq=0: {"x": rng.standard_normal((n, 3, 8, 8)).astype(np.float32)},
    ),
    "encoder": (
        MaskedEncoder,
        lambda: {
            k: torch.from_numpy(v) for k, v in _masked(6, 7, np.random.default_rng(0)).items()
        },
        {"x": {1: SEQ}, "mask": {1: SEQ}},
        lambda n, rng, seq=7: _masked(n, seq, rng),
    ),
    "bag": (
        TextBag,
        lambda: torch.randint(0, 100, (6, 6)),
        None,
        lambda n, rng, seq=0: {"ids": rng.integers(0, 100, (n, 6)).astype(np.int64)},
    ),
    "two": (
        TwoKinds,
        lambda: (torch.randn(6, 8), torch.randn(6, 4)),
        None,
        lambda n, rng, seq=0: {
            "x": rng.standard_normal((n, 8)).astype(np.float32),
            "y": rng.standard_normal((n, 4)).astype(np.float32),
        },
    ),
}
# Every mode on some model, not every model in every mode: the suite's time stays bounded.
MODES = {
    "cnn": ("none", "dynamic_int8", "static_int8", "fp16"),
    "encoder": ("none", "dynamic_int8", "fp16"),
    "bag": ("none", "prune", "static_int8"),
    "two": ("none", "dynamic_int8", "fp16"),
}


@dataclass
class Converted:
    server: ServerThread
    modules: dict[str, Any]
    versions: dict[tuple[str, str], int]  # (model, mode) -> version

    def file(self, model: str, version: int) -> Path:
        return Path(self.server.settings.repository) / model / str(version) / "model.onnx"


def _calibration(up: Any, example: Any) -> dict[str, np.ndarray]:
    if isinstance(example, dict):
        return {k: v.numpy() for k, v in example.items()}
    tensors = example if isinstance(example, tuple) else (example,)
    return {spec.name: t.numpy() for spec, t in zip(up.inputs, tensors, strict=True)}


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Converted]:
    repo = tmp_path_factory.mktemp("differential") / "repo"
    for model in MODELS:
        (repo / model).mkdir(parents=True)
        config = {"version_policy": {"all": True}, "onnxruntime": {"intra_op_threads": 1}}
        (repo / model / "config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    modules: dict[str, Any] = {}
    versions: dict[tuple[str, str], int] = {}
    with (
        ServerThread(repo) as srv,
        ConversionClient(srv.management_target, timeout=300) as conv,
    ):
        for model, (build, example_of, axes, _) in MODELS.items():
            module = build().eval()
            for bn in (m for m in module.modules() if isinstance(m, nn.BatchNorm2d)):
                bn.running_mean.uniform_(-0.5, 0.5)  # statistics a fresh BatchNorm lacks
                bn.running_var.uniform_(0.5, 2.0)
            modules[model] = module
            example = example_of()
            up = conv.upload(model, module, example_inputs=example, dynamic_axes=axes)
            for mode in MODES[model]:
                options: dict[str, Any] = {"quantization": Quantization(mode, keep_slower=True)}
                if mode == "prune":
                    options = {"pruning": Pruning("l1_unstructured", 0.3), "quantization": "none"}
                elif mode == "static_int8":
                    options["quantization"] = Quantization(
                        mode, calibration_inputs=_calibration(up, example), keep_slower=True
                    )
                job = conv.convert(
                    up, benchmark="off", validation=Validation(keep_failed=True), **options
                ).wait(progress=False)
                versions[model, mode] = job.version
        yield Converted(srv, modules, versions)


def _oracle(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(
        str(path),
        options,
        providers=["CPUExecutionProvider"],
        disabled_optimizers=optimizers.disabled(),
    )


def _expect(session: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


def _same(got: Any, want: np.ndarray, what: str) -> None:
    got = np.asarray(got)
    assert (got.shape, got.dtype) == (want.shape, want.dtype), what
    if want.dtype.kind == "f":
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL, err_msg=what)
    else:
        np.testing.assert_array_equal(got, want, err_msg=what)


def _typed(model: str, version: int, feeds: dict[str, np.ndarray]) -> Any:
    request = service_pb2.ModelInferRequest(model_name=model, model_version=str(version))
    for name, array in feeds.items():
        datatype = DATATYPES[array.dtype]
        tensor = request.inputs.add(name=name, datatype=datatype, shape=list(array.shape))
        getattr(tensor.contents, TYPED_FIELD[datatype]).extend(array.reshape(-1).tolist())
    return request


def _raw_outputs(response: Any) -> dict[str, np.ndarray]:
    kinds = {v: k for k, v in DATATYPES.items()}
    return {
        out.name: np.frombuffer(raw, kinds[out.datatype]).reshape(list(out.shape))
        for out, raw in zip(response.outputs, response.raw_output_contents, strict=True)
    }


def _every_way(
    srv: ServerThread, model: str, version: int, feeds: dict[str, np.ndarray], outputs: list[str]
) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
    """(way, outputs) for each way of asking."""
    with InferenceClient(srv.target, timeout=60) as client:
        yield "ferry.v1 unary", dict(client.infer(model, feeds, version=version))
        with client.stream(model, version=version) as stream:
            rid = stream.submit(feeds)
            got_id, result = next(iter(stream.results()))
            assert got_id == rid and not isinstance(result, Exception), result
            yield "ferry.v1 stream", dict(result)

    async def asynchronous() -> Any:
        async with AsyncInferenceClient(srv.target, timeout=60) as client:
            return dict(await client.infer(model, feeds, version=version))

    yield "ferry.v1 async", asyncio.run(asynchronous())
    triton = tg.InferenceServerClient(srv.target)
    inputs = []
    for name, array in feeds.items():
        tensor = tg.InferInput(name, list(array.shape), DATATYPES[array.dtype])
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    answer = triton.infer(model, inputs, model_version=str(version)).get_response()
    triton.close()
    yield "OIP gRPC raw", _raw_outputs(answer)
    with grpc.insecure_channel(srv.target) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        yield "OIP gRPC typed", _raw_outputs(stub.ModelInfer(_typed(model, version, feeds)))
    clients = [th.InferenceServerClient(srv.http_target)]
    try:
        for binary in (False, True):
            inputs = []
            for name, array in feeds.items():
                tensor = th.InferInput(name, list(array.shape), DATATYPES[array.dtype])
                tensor.set_data_from_numpy(array, binary_data=binary)
                inputs.append(tensor)
            asked = [th.InferRequestedOutput(name, binary_data=binary) for name in outputs]
            result = clients[0].infer(model, inputs, model_version=str(version), outputs=asked)
            way = f"OIP HTTP {'binary' if binary else 'JSON'}"
            yield way, {name: result.as_numpy(name) for name in outputs}
    finally:
        close_on_this_thread(clients)


def test_every_way_of_asking_gets_the_published_files_answer(converted: Converted) -> None:
    rng = np.random.default_rng(1)
    for (model, mode), version in converted.versions.items():
        oracle = _oracle(converted.file(model, version))
        feeds_of = MODELS[model][3]
        for rows, seq in ((1, 3), (5, 11)):
            feeds = feeds_of(rows, rng, seq) if model == "encoder" else feeds_of(rows, rng)
            want = _expect(oracle, feeds)
            for way, got in _every_way(converted.server, model, version, feeds, list(want)):
                assert sorted(got) == sorted(want), (model, mode, way)
                for name, expected in want.items():
                    _same(got[name], expected, f"{model}/{mode} {way} rows={rows} {name}")


def test_fp32_conversions_answer_as_pytorch(converted: Converted) -> None:
    """The unquantized versions against the modules themselves, at batch sizes and (the
    encoder) sequence lengths other than the examples'."""
    rng = np.random.default_rng(2)
    with InferenceClient(converted.server.target, timeout=60) as client:
        for model, (_, _, _, feeds_of) in MODELS.items():
            module = converted.modules[model]
            for rows, seq in ((1, 1), (9, 20)):
                feeds = feeds_of(rows, rng, seq) if model == "encoder" else feeds_of(rows, rng)
                with torch.no_grad():
                    out = module(**{k: torch.from_numpy(v) for k, v in feeds.items()})
                want = list(out) if isinstance(out, tuple) else [out]
                got = client.infer(model, feeds, version=converted.versions[model, "none"])
                names = ["output"] if len(want) == 1 else [f"output_{i}" for i in range(len(want))]
                for name, expected in zip(names, want, strict=True):
                    _same(got[name], expected.numpy(), f"{model} vs PyTorch rows={rows} {name}")


def test_callers_batched_together_each_get_their_answer_alone(converted: Converted) -> None:
    """Callers whose requests queue behind a held execution run as one batch (or, for a
    dynamically quantized version, each alone by design): each caller's answer is the file's
    answer on its own rows."""
    srv = converted.server
    rng = np.random.default_rng(3)
    for (model, mode), version in converted.versions.items():
        oracle = _oracle(converted.file(model, version))
        feeds_of = MODELS[model][3]
        callers = [feeds_of(int(rng.integers(1, 4)), rng) for _ in range(8)]
        before = _executions(srv, model, version)
        with (
            InferenceClient(srv.target, timeout=60) as client,
            ExecutionGate(srv, model, version) as gate,
        ):
            pool = ThreadPoolExecutor(len(callers))
            first = pool.submit(client.infer, model, callers[0], version=version)
            gate.wait_entered()
            rest = [pool.submit(client.infer, model, f, version=version) for f in callers[1:]]
            loaded = srv.app.registry.get(model, version)  # type: ignore[union-attr]
            wait_for(
                lambda: loaded.batcher.queue_depth == len(rest),  # noqa: B023
                f"{len(rest)} requests queued behind the held one",
            )
            gate.release()
            answers = [first.result(60)] + [f.result(60) for f in rest]
            pool.shutdown()
        for i, (feeds, answer) in enumerate(zip(callers, answers, strict=True)):
            for name, expected in _expect(oracle, feeds).items():
                _same(answer[name], expected, f"{model}/{mode} caller {i} {name}")
        # The held request, then the others as one batch, where the version combines requests
        # (a dynamic int8 one never does; the others as the load probe found them).
        with InferenceClient(srv.target, timeout=60) as client:
            policy = client.model_metadata(model, version=version).batching
        combines = policy.max_batch_size > 0 and policy.combine_requests
        assert not (combines and mode == "dynamic_int8"), (model, policy)
        ran = _executions(srv, model, version) - before
        assert ran == (2 if combines else len(callers)), (model, mode, ran)


def _executions(srv: ServerThread, model: str, version: int) -> int:
    with InferenceClient(srv.target, timeout=60) as client:
        (s,) = client.statistics(model, version=version)
    return s.execution_count


def test_a_split_and_its_shadow_answer_with_the_version_they_name(converted: Converted) -> None:
    """Requests that name no version follow a split between the fp32 and the dynamic int8
    version, with a shadow run on the fp16 one: each answer is the file's answer of the version
    the response names, whichever protocol asked."""
    srv = converted.server
    split = {converted.versions["two", "none"]: 1.0, converted.versions["two", "dynamic_int8"]: 1.0}
    shadow = (converted.versions["two", "fp16"], 1.0)
    oracles = {v: _oracle(converted.file("two", v)) for v in (*split, shadow[0])}
    rng = np.random.default_rng(4)
    callers = [MODELS["two"][3](int(rng.integers(1, 4)), rng) for _ in range(24)]
    with RepositoryClient(srv.management_target) as repository:
        repository.set_rollout("two", split, shadow=shadow, reason="differential")
        try:
            with InferenceClient(srv.target, timeout=60) as client:

                def ask(i: int) -> Any:
                    return client.infer("two", callers[i], request_id=f"caller-{i}")

                with ThreadPoolExecutor(8) as pool:
                    answers = list(pool.map(ask, range(len(callers))))
            triton = tg.InferenceServerClient(srv.target)
            for i, feeds in enumerate(callers[:8]):
                inputs = []
                for name, array in feeds.items():
                    tensor = tg.InferInput(name, list(array.shape), "FP32")
                    tensor.set_data_from_numpy(array)
                    inputs.append(tensor)
                response = triton.infer("two", inputs, request_id=f"caller-{i}").get_response()
                assert int(response.model_version) == answers[i].version  # sticky by id
                for name, expected in _expect(oracles[answers[i].version], feeds).items():
                    _same(_raw_outputs(response)[name], expected, f"OIP caller {i} {name}")
            triton.close()
        finally:
            repository.set_rollout("two", None, reason="differential done")
    assert {a.version for a in answers} == set(split)  # 24 ids: both versions take some
    for i, (feeds, answer) in enumerate(zip(callers, answers, strict=True)):
        for name, expected in _expect(oracles[answer.version], feeds).items():
            _same(answer[name], expected, f"caller {i} on version {answer.version} {name}")
