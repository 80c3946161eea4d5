"""The accuracy budget of models with a dynamic sequence axis, judged at other lengths or not.

Every sample row shares one length, and variants were judged there alone; they are now also
judged at the axis' lower bound, a length between, and twice the samples' (prefixes of the
sample rows, or the rows repeated: ``server/ferry/server/convert/worker/lengths.py``). This
measures what that changes: small PyTorch text and sequence models (a transformer encoder
with a mask, on padded rows and on unpadded ones; a causal LM; a bag of words; a 1-D conv text
model; an LSTM regressor; an embedding mean and an embedding sum), each with seeded weights,
exported to ONNX with a dynamic sequence axis (1..64) and converted by the real conversion
child (in this process) with an explicit quantization mode, ``benchmark: off`` and
``keep_failed``. Samples: 16 rows of length 12; static int8 gets 64 calibration rows of length
12, as a user with one padded length would give. The truth: the published variant against the source model on 64 fresh rows
of the data's own distribution at each length 1, 2, 4, 8, 12, 24, 48 (the budget's default,
min_cosine 0.99); the verdict before is the same job with no other length judged.

    .venv/bin/python bench/dynamic_lengths_budget.py [--seeds 2] [--modes dynamic_int8,...]

Figures, not assertions: one JSON line per model and mode, then the tally.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch
from torch import nn

from ferry.server.convert.worker import lengths, parity

sys.path.insert(0, str(Path(__file__).parent))
import budget_jobs

LENGTH, MAX, TRUTH_LENGTHS = 12, 64, (1, 2, 4, 8, 12, 24, 48)
Gen = Callable[[np.random.Generator, int, int], dict[str, np.ndarray]]


class PadTransformer(nn.Module):
    """Encoder with a key padding mask, masked mean pooling, a classifier."""

    def __init__(self, d: int = 32, vocab: int = 50, classes: int = 5) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.pos = nn.Parameter(torch.randn(MAX, d) * 0.1)
        layer = nn.TransformerEncoderLayer(d, 4, 64, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.emb(input_ids) + self.pos[: input_ids.shape[1]]
        h = self.enc(h, src_key_padding_mask=attention_mask == 0)
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((self.norm(h) * m).sum(1) / m.sum(1).clamp(min=1))


class CausalLM(nn.Module):
    def __init__(self, vocab: int = 64, d: int = 32) -> None:
        super().__init__()
        self.emb, self.pos = nn.Embedding(vocab, d), nn.Embedding(MAX, d)
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 4, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.head = nn.Linear(d, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        s = ids.shape[1]
        h = self.emb(ids) + self.pos(torch.arange(s))
        causal = torch.triu(torch.ones(s, s, dtype=torch.bool), 1)
        a = self.ln1(h)
        h = h + self.attn(a, a, a, attn_mask=causal, need_weights=False)[0]
        return self.head(h + self.mlp(self.ln2(h)))


class BagText(nn.Module):
    def __init__(self, vocab: int = 1000, d: int = 32) -> None:
        super().__init__()
        self.emb, self.fc = nn.Embedding(vocab, d, padding_idx=0), nn.Linear(d, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        m = (ids != 0).unsqueeze(-1).float()
        return self.fc((self.emb(ids) * m).sum(1) / m.sum(1).clamp(min=1))


class EmbeddingMean(nn.Module):
    """No padding: the mean of the embeddings of every position."""

    def __init__(self, vocab: int = 200, d: int = 16) -> None:
        super().__init__()
        self.emb, self.fc = nn.Embedding(vocab, d), nn.Linear(d, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(self.emb(ids).mean(1))


class EmbeddingSum(nn.Module):
    """Sum pooling: its range grows with the length."""

    def __init__(self, vocab: int = 200, d: int = 16) -> None:
        super().__init__()
        self.emb, self.fc = nn.Embedding(vocab, d), nn.Linear(d, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(self.emb(ids).sum(1))


class Conv1dText(nn.Module):
    def __init__(self, vocab: int = 200, d: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.c1 = nn.Conv1d(d, 32, 3, padding=1)
        self.c2 = nn.Conv1d(32, 32, 5, padding=2, stride=2)
        self.fc = nn.Linear(32, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids).transpose(1, 2)
        return self.fc(nn.functional.gelu(self.c2(torch.relu(self.c1(x)))).max(-1).values)


class LSTMReg(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm, self.out = nn.LSTM(8, 32, num_layers=2, batch_first=True), nn.Linear(32, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.lstm(x)[0][:, -1])


def padded_ids(rng: np.random.Generator, n: int, s: int, vocab: int) -> np.ndarray:
    """Right-padded token ids: each row a text of 1..s tokens."""
    ids = rng.integers(1, vocab, (n, s))
    for row, length in zip(ids, rng.integers(1, s + 1, n), strict=True):
        row[length:] = 0
    return ids.astype(np.int64)


def with_mask(rng: np.random.Generator, n: int, s: int) -> dict[str, np.ndarray]:
    ids = padded_ids(rng, n, s, 50)
    return {"input_ids": ids, "attention_mask": (ids != 0).astype(np.int64)}


def full_mask(rng: np.random.Generator, n: int, s: int) -> dict[str, np.ndarray]:
    ids = rng.integers(1, 50, (n, s))
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


CASES: dict[str, tuple[type[nn.Module], Gen]] = {
    "transformer_mask": (PadTransformer, with_mask),
    "transformer_unpadded": (PadTransformer, full_mask),
    "causal_lm": (CausalLM, lambda rng, n, s: {"ids": rng.integers(0, 64, (n, s))}),
    "bag_of_words": (BagText, lambda rng, n, s: {"ids": padded_ids(rng, n, s, 1000)}),
    "embedding_mean": (EmbeddingMean, lambda rng, n, s: {"ids": rng.integers(0, 200, (n, s))}),
    "embedding_sum": (EmbeddingSum, lambda rng, n, s: {"ids": rng.integers(0, 200, (n, s))}),
    "conv1d_text": (Conv1dText, lambda rng, n, s: {"ids": rng.integers(0, 200, (n, s))}),
    "lstm": (LSTMReg, lambda rng, n, s: {"x": rng.standard_normal((n, s, 8)).astype(np.float32)}),
}


def export(model: nn.Module, feeds: dict[str, np.ndarray], path: Path) -> None:
    example = tuple(torch.from_numpy(v) for v in feeds.values())
    axes: dict[str, dict[int, str]] = {name: {0: "N", 1: "S"} for name in feeds}
    with torch.no_grad():
        out = model(*example)
    axes["out"] = {0: "N", 1: "S"} if out.ndim == 3 else {0: "N"}
    names = {"input_names": list(feeds), "output_names": ["out"], "dynamic_axes": axes}
    try:  # the legacy exporter fixes nn.MultiheadAttention's sequence length in a Reshape
        torch.onnx.export(
            model, example, str(path), **names, opset_version=18, dynamo=True, verbose=False,
            external_data=False,
        )  # fmt: skip
    except Exception:  # torch.export reads an LSTM's length as static for some weights
        torch.onnx.export(model, example, str(path), **names, opset_version=17, dynamo=False)


def convert(root: Path, source: Path, feeds: dict, cal: dict, mode: str) -> dict[str, Any]:
    """The report of the job (keep_failed: the variant is published whatever its verdict)."""
    axis = {"axis": 1, "name": "sequence", "min": 1, "max": MAX}
    job_spec = budget_jobs.spec(
        root, feeds, cal, mode, validation={"keep_failed": True}, dynamic_axes=[axis]
    )
    report = budget_jobs.run(root / "job", source, job_spec)
    assert report is not None, (root / "job" / "progress.jsonl").read_text()[-2000:]
    return report


def bad_lengths(model: Path, source: Path, gen: Gen, rng: np.random.Generator) -> list[int]:
    """The lengths where the published variant is below budget on fresh rows of the data."""
    # parity.onnx_runner: the sessions the server opens (an fp16 causal attention graph
    # crashes onnxruntime with its default optimizers).
    ours, theirs = (parity.onnx_runner(p, 2) for p in (model, source))
    bad = []
    for s in TRUTH_LENGTHS:
        feed = gen(rng, 64, s)
        figures = parity.compare(ours(feed), theirs(feed))
        if parity.budget_failure(figures, 0.99, 0.0):
            bad.append(s)
    return bad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--modes", default="dynamic_int8,static_int8,fp16")
    parser.add_argument("--cases", default=",".join(CASES))
    args = parser.parse_args()
    tally = dict.fromkeys(
        ["bad", "caught_before", "caught_now", "good", "refused_before", "refused_now_only"], 0
    )
    with tempfile.TemporaryDirectory(prefix="dyn-lengths-") as tmp:
        # The quantizer's shape inference writes beside the working folder; the real child
        # works in its scratch folder (child._confine_temp).
        os.chdir(tmp)
        chosen = [(name, CASES[name]) for name in args.cases.split(",")]
        for (name, (factory, gen)), seed in itertools.product(chosen, range(args.seeds)):
            base = Path(tmp) / f"{name}-{seed}"
            base.mkdir()
            torch.manual_seed(seed)
            rng = np.random.default_rng(100 + seed)
            feeds, cal = gen(rng, 16, LENGTH), gen(rng, 64, LENGTH)
            source = base / "src.onnx"
            export(factory().eval(), feeds, source)
            for mode in args.modes.split(","):
                now = convert(base / f"{mode}-now", source, feeds, cal, mode)
                with mock.patch.object(lengths, "sizes", lambda inputs, samples: []):
                    before = convert(base / f"{mode}-before", source, feeds, cal, mode)
                ok_now, ok_before = (r["variants"][-1]["within_budget"] for r in (now, before))
                bad = bad_lengths(base / f"{mode}-now" / "work" / "model.onnx", source, gen, rng)
                print(json.dumps({
                    "model": base.name, "mode": mode, "bad at (fresh rows)": bad,
                    "passed before": ok_before, "passes now": ok_now,
                    "judged at": now["validation"].get("lengths"),
                }), flush=True)  # fmt: skip
                if bad:
                    tally["bad"] += 1
                    tally["caught_before"] += not ok_before
                    tally["caught_now"] += not ok_now
                else:
                    tally["good"] += 1
                    tally["refused_before"] += not ok_before
                    tally["refused_now_only"] += ok_before and not ok_now
    print(json.dumps(tally))


if __name__ == "__main__":
    main()
