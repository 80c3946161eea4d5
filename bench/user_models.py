"""Model code Ferry did not write, through every mode (issue 13's table).

    flock /work/notes/bench.lock .venv/bin/python bench/user_models.py            # ~15 min
    .venv/bin/python bench/user_models.py --models bert,lstm --modes none,dynamic_int8

A user's view: each model is uploaded as an ``nn.Module`` through the SDK (the seed article's
``fc1``/``fc2`` class as its ``torch.save(state_dict)`` file, ``architecture="seed"``) to a real
server with the real conversion child, and converted once per mode into a version of its own
(``keep_slower`` for the explicit modes, so that a slower variant is still published and
measured; ``auto`` decides as a user's job does, with calibration samples to consider), with the conversion
process started ahead as a server does by default. Per job: worked or
the one-line reason, parity of the published file against the module's own PyTorch outputs (the
report's typed ``vs_pytorch``), and the job's wall time. Speed-up is measured here on the
published files, not taken from the job: each mode's ``model.onnx`` against the fp32 version's,
rounds alternated, median of the per-round ratios with their quartiles, at batch 1 and 16.

The models, all random-init (torchvision's wheels do not import beside torch 2.13 CPU, so
ResNet-18 is Ferry's built-in ``resnet`` net, the same layout, and a MobileNetV3-small-shaped
net is written out here): Hugging Face BertModel and DistilBertModel from small configs (int64
``input_ids`` + ``attention_mask``, the sequence declared a dynamic axis), an LSTM and a GRU
classifier, ResNet-18 and the MobileNet-like net at 112x112 (all uploaded as modules), and the
seed article's MLP (its state_dict file). Figures, not assertions: a markdown table on stdout
and bench/results/user_models.json.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).parent))

import timing

MODES = ("none", "dynamic_int8", "static_int8", "fp16", "auto", "structured_30")
# A mode that prunes: 30% structured on the graph (or the module, for the article's state_dict),
# no quantization; judged by the default accuracy budget like any other job.
PRUNED = "structured_30"
RESULTS = Path(__file__).parent / "results" / "user_models.json"


# ---- the models ----


class Article(nn.Module):
    """The seed article's recipe: a class with fc1/fc2, saved as a state_dict."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, 4)
        self.fc2 = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class Recurrent(nn.Module):
    def __init__(self, cell: type[nn.Module]) -> None:
        super().__init__()
        self.rnn = cell(32, 128, num_layers=2, batch_first=True)
        self.head = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def resnet18() -> nn.Module:
    """torchvision's resnet18 layout; the built-in architecture of that name is the same net."""
    from ferry.server.convert.worker.nets import ResNet

    return ResNet()


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, max(8, channels // 4), 1)
        self.fc2 = nn.Conv2d(max(8, channels // 4), channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        return x * nn.functional.hardsigmoid(self.fc2(torch.relu(self.fc1(s))))


class InvertedResidual(nn.Module):
    def __init__(  # noqa: PLR0917 (torchvision's table's columns, in order)
        self, cin: int, hidden: int, cout: int, kernel: int, stride: int, se: bool
    ) -> None:
        super().__init__()
        act = nn.Hardswish
        self.block = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), act(),
            nn.Conv2d(hidden, hidden, kernel, stride, kernel // 2, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden), act(),
            SqueezeExcite(hidden) if se else nn.Identity(),
            nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout),
        )  # fmt: skip
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.residual else y


def mobilenet_small() -> nn.Module:
    """MobileNetV3-small's layout (torchvision's table), 1000 classes."""
    spec = [  # cin, hidden, cout, kernel, stride, se
        (16, 16, 16, 3, 2, True), (16, 72, 24, 3, 2, False), (24, 88, 24, 3, 1, False),
        (24, 96, 40, 5, 2, True), (40, 240, 40, 5, 1, True), (40, 240, 40, 5, 1, True),
        (40, 120, 48, 5, 1, True), (48, 144, 48, 5, 1, True), (48, 288, 96, 5, 2, True),
        (96, 576, 96, 5, 1, True), (96, 576, 96, 5, 1, True),
    ]  # fmt: skip
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.Hardswish(),
        *(InvertedResidual(*row) for row in spec),
        nn.Conv2d(96, 576, 1, bias=False), nn.BatchNorm2d(576), nn.Hardswish(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(576, 1024), nn.Hardswish(),
        nn.Linear(1024, 1000),
    )  # fmt: skip


def _tokens(batch: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, length, dtype=torch.int64)
    mask[0, length // 2 :] = 0
    return {
        "input_ids": torch.randint(1, 1000, (batch, length), generator=gen),
        "attention_mask": mask,
    }


def _bert(distil: bool) -> nn.Module:
    import transformers

    if distil:
        return transformers.DistilBertModel(
            transformers.DistilBertConfig(
                vocab_size=1000, dim=128, n_layers=2, n_heads=2, hidden_dim=512
            )
        )
    return transformers.BertModel(
        transformers.BertConfig(
            vocab_size=1000,
            hidden_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=512,
        )
    )


Case = tuple[Callable[[], nn.Module], Callable[[int, int], Any], dict[str, Any]]
SEQ = {"sequence": (1, 128)}


def _images(side: int) -> Callable[[int, int], torch.Tensor]:
    return lambda batch, seed: torch.randn(
        batch, 3, side, side, generator=torch.Generator().manual_seed(seed)
    )


def _sequence(batch: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, 20, 32, generator=torch.Generator().manual_seed(seed))


CASES: dict[str, Case] = {
    "bert": (lambda: _bert(False), lambda b, s: _tokens(b, 32, s), SEQ),
    "distilbert": (lambda: _bert(True), lambda b, s: _tokens(b, 32, s), SEQ),
    "lstm": (lambda: Recurrent(nn.LSTM), _sequence, {}),
    "gru": (lambda: Recurrent(nn.GRU), _sequence, {}),
    "resnet18": (resnet18, _images(112), {}),
    "mobilenet_small": (mobilenet_small, _images(112), {}),
    "article": (
        Article,
        lambda b, s: torch.randn(b, 3, generator=torch.Generator().manual_seed(s)),
        {},
    ),
}


# ---- one model through every mode ----


def _numpy(value: Any) -> dict[str, np.ndarray] | np.ndarray:
    if isinstance(value, dict):
        return {k: v.numpy() for k, v in value.items()}
    return value.numpy()


def _feed(session: ort.InferenceSession, value: Any) -> dict[str, np.ndarray]:
    arrays = _numpy(value)
    if isinstance(arrays, dict):
        return arrays
    return {session.get_inputs()[0].name: arrays}


def _speed(
    fp32: Path, other: Path, make: Callable[[int, int], Any], batch: int, rounds: int
) -> dict[str, float]:
    """fp32 time / variant time (``timing.compare``), 2 intra-op threads each."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    sessions = [
        ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"])
        for p in (fp32, other)
    ]
    a, b = ((s, _feed(s, make(batch, 99))) for s in sessions)
    figures = timing.compare(a, b, rounds)
    return {"median": figures["speedup"], "q1": figures["q1"], "q3": figures["q3"]}


def _quiet_box(srv: Any) -> None:
    """Wait until the conversion process started ahead has warmed up: it imports torch and
    exports once, which would share the cores with the timings."""
    runner = srv.app.conversion.runner
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        warm = runner._warm  # started a moment after the job ends
        if warm is not None and (warm.ready.exists() or warm.proc.returncode is not None):
            return
        time.sleep(0.1)


def run_model(  # noqa: PLR0917
    name: str, conv: Any, srv: Any, repo: Path, modes: list[str], rounds: int
) -> list[dict[str, Any]]:
    from ferry.client import DynamicAxis, FerryError, Pruning, Quantization

    build, make, axes = CASES[name]
    torch.manual_seed(0)
    module = build().eval()
    example = make(4, 1)
    calibration = _numpy(make(64, 2))
    if not isinstance(calibration, dict):
        calibration = None  # filled with the input's name below, once it is known
    dynamic = None
    if axes:
        ((axis_name, (low, high)),) = axes.items()
        declared = {1: DynamicAxis(axis_name, low, high)}
        dynamic = {"input_ids": declared, "attention_mask": declared}
    rows: list[dict[str, Any]] = []
    fp32_file: Path | None = None
    for mode in modes:
        row: dict[str, Any] = {"model": name, "mode": mode}
        rows.append(row)
        start = time.monotonic()
        try:
            if name == "article":
                buffer = io.BytesIO()
                torch.save(module.state_dict(), buffer)  # the article's own file
                up = conv.upload(name, buffer.getvalue(), format="state_dict", architecture="seed")
                inputs = [("input", "FP32", [-1, 3])]
            else:
                up = conv.upload(name, module, example_inputs=example, dynamic_axes=dynamic)
                inputs = None
            cal = calibration or {up.inputs[0].name if up.inputs else "input": _numpy(make(64, 2))}
            pruning = Pruning("structured", 0.3) if mode == PRUNED else None
            quantization = Quantization(
                mode="none" if mode == PRUNED else mode,
                # An explicit mode is published even when slower, to be measured; auto decides
                # as a user's job does (keep_slower off), with calibration data to consider
                # static int8 too.
                keep_slower=mode != "auto",
                calibration_inputs=cal if mode in ("static_int8", "auto") else None,
            )
            job = conv.convert(
                up, inputs=inputs, pruning=pruning, quantization=quantization, benchmark="quick"
            )
            done = job.wait(progress=False)
        except FerryError as exc:
            row.update(
                worked=False, why=str(exc).splitlines()[0][:200], job_s=time.monotonic() - start
            )
            continue
        row["job_s"] = time.monotonic() - start
        report = done.report
        assert report is not None
        published = report.variant(report.published)
        row.update(worked=True, published=report.published, version=done.version)
        if published is not None and published.vs_pytorch is not None:
            row.update(cosine=published.vs_pytorch.cosine, max_abs=published.vs_pytorch.max_abs,
                       against=published.vs_pytorch.against)  # fmt: skip
        elif report.parity is not None:
            row.update(
                cosine=report.parity.cosine,
                max_abs=report.parity.max_abs,
                against=report.parity.against,
            )
        row["size_mb"] = published.size_bytes / 1e6 if published else None
        path = repo / name / str(done.version) / "model.onnx"
        if mode == "none":
            fp32_file = path
        elif fp32_file is not None:
            _quiet_box(srv)
            for batch in (1, 16):
                row[f"speedup_b{batch}"] = _speed(fp32_file, path, make, batch, rounds)
    return rows


def _table(rows: list[dict[str, Any]]) -> str:
    out = [
        "| model | mode | worked | published | cosine vs PyTorch | max abs | x fp32 b1 [q1-q3] | x fp32 b16 [q1-q3] | MB | job s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def speed(r: dict[str, Any], b: int) -> str:
        s = r.get(f"speedup_b{b}")
        return f"{s['median']:.2f} [{s['q1']:.2f}-{s['q3']:.2f}]" if s else "-"

    for r in rows:
        if not r.get("worked"):
            out.append(
                f"| {r['model']} | {r['mode']} | no: {r.get('why', '')} | | | | | | | {r['job_s']:.1f} |"
            )
            continue
        cos = f"{r['cosine']:.6f}" if "cosine" in r else "-"
        mx = f"{r['max_abs']:.2g}" if "max_abs" in r else "-"
        size = f"{r['size_mb']:.1f}" if r.get("size_mb") else "-"
        out.append(
            f"| {r['model']} | {r['mode']} | yes | {r['published']} | {cos} | {mx} | {speed(r, 1)} | "
            f"{speed(r, 16)} | {size} | {r['job_s']:.1f} |"
        )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--models", default=",".join(CASES))
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    modes = args.modes.split(",")
    if "none" in modes:
        modes = ["none", *[m for m in modes if m != "none"]]  # fp32 first: the speed reference
    from serverutil import ServerThread

    from ferry.client import ConversionClient

    rows: list[dict[str, Any]] = []
    with (
        tempfile.TemporaryDirectory() as tmp,
        ServerThread(Path(tmp) / "repo", warm_conversion_child=True) as srv,
        ConversionClient(srv.management_target, timeout=900) as conv,
    ):
        for name in args.models.split(","):
            rows += run_model(name, conv, srv, Path(tmp) / "repo", modes, args.rounds)
            print(_table([r for r in rows if r["model"] == name]).split("\n", 2)[-1], flush=True)
    print()
    print(_table(rows))
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(rows, indent=1, default=str))


if __name__ == "__main__":
    main()
