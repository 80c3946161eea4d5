"""One conversion job, stage by stage: load -> prune -> export -> check -> optimize -> quantize
-> validate -> benchmark, leaving ``model.onnx`` and ``report.json`` in the job's work_dir.

Runs only in the conversion child. Intermediate files live in ``work_dir/.scratch`` (also the
temporary folder of everything the child calls), which is removed at the end, because the server
publishes work_dir as it is: only the chosen model and its report may remain.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np
import onnx

from ferry.server.convert import validation
from ferry.server.convert.spec import Job, ProgressEvent
from ferry.server.convert.strategies import pruning
from ferry.server.convert.strategies import quantization as quantization_modes
from ferry.server.convert.worker import (
    benchmark,
    dims,
    drawn,
    external,
    graph,
    lengths,
    load,
    parity,
    placement,
    quantize,
)
from ferry.server.convert.worker.report import (
    ExportRecord,
    ParityRecord,
    PruningRecord,
    QuantizationRecord,
    Report,
    SourceRecord,
    ValidationRecord,
    VariantRecord,
)
from ferry.server.core.repository import MODEL_DATA_FILE, MODEL_FILE
from ferry.server.cpus import usable_cores
from ferry.server.errors import ConversionFailed, InvalidArgument, first_line

SCRATCH = ".scratch"
# Where each stage starts in the job's 0..1 progress; the server's publish stage owns the rest.
STAGE_START = {
    "load": 0.0, "prune": 0.1, "export": 0.15, "check": 0.45, "optimize": 0.5,
    "quantize": 0.55, "validate": 0.7, "benchmark": 0.8,
}  # fmt: skip
FINAL_FRACTION = 0.95
# ParityRecord.against for an ONNX source judged against the client's PyTorch outputs.
PYTORCH_REFERENCE = "pytorch (reference_outputs)"

Emit = Callable[[ProgressEvent], None]
Outputs = list[np.ndarray]


def default_threads() -> int:
    """Half the CPUs this process may use: the serving process keeps running beside the child."""
    return max(1, usable_cores() // 2)


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


@dataclass
class Variant:
    path: Path
    record: VariantRecord  # this variant's row in the report
    outputs: Outputs = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.record.name


@dataclass
class RowsCheck:
    """Rows every variant is judged on beside the samples (a short sample file's top-up, other
    sizes of a dynamic axis), the unpruned source's outputs on them, and how a refusal names
    them."""

    rows: parity.Samples
    reference: Outputs
    where: str


class Pipeline:
    source: load.Source
    samples: parity.Samples
    output_names: list[str]
    baseline: Outputs  # what budgets are judged against: unpruned PyTorch, else the client's or
    baseline_name: str  # the source ONNX's outputs
    parity_reference: Outputs  # what the fp32 export must match within rtol/atol
    client_reference: Outputs | None
    top_up: drawn.TopUp | None = None  # rows beside a short sample file's (worker.drawn)

    external: bool = False  # variants are written as model + data file (models over 2 GiB)

    def __init__(self, job: Job, emit: Emit, threads: int | None = None) -> None:
        self.job = job
        self.spec = job.spec
        self.emit = emit
        self.threads = threads or default_threads()
        self.providers = placement.session_providers(job.providers)
        self.work = Path(job.work_dir)
        self.scratch = self.work / SCRATCH
        self.stage = "load"
        self.report = Report(
            source=SourceRecord(
                job_id=job.job_id,
                model=job.model,
                source_format=job.source_format,
                source_sha256=job.source_sha256,
                architecture=job.architecture or None,
                torch=_version("torch"),
                onnx=onnx.__version__,
                onnxruntime=_version("onnxruntime"),
            ),
            export=ExportRecord(opset=self.spec.opset),
            benchmark=self.spec.benchmark,
        )
        self.notes = self.report.notes
        # Output shapes of the runs that verified the batch and the dynamic axes: a dim that
        # changed between them is published symbolic whatever the exporter wrote.
        self.output_shapes: list[list[tuple[int, ...]]] = []
        # Rows every variant is judged on beside the samples (_draw, _lengths)
        self.checks: list[RowsCheck] = []
        # The source model, run for the references of the load stage, then released
        self._source_run: Callable[[dict[str, np.ndarray]], Outputs] | None = None
        self._calibration_read: parity.Samples | InvalidArgument | None = None

    # ---- progress ----

    @contextmanager
    def _stage(self, name: str, message: str) -> Iterator[None]:
        self.stage = name
        self.emit(ProgressEvent(name, STAGE_START[name], message))
        start = time.perf_counter()
        yield
        self.report.stages[name] = round(time.perf_counter() - start, 4)

    def _skip(self, name: str, why: str) -> None:
        self.stage = name
        self.emit(ProgressEvent(name, STAGE_START[name], f"skipped: {why}"))

    def _path(self, name: str) -> Path:
        """Client files named in the spec: absolute, or relative to the job's work_dir."""
        path = Path(name)
        return path if path.is_absolute() else self.work / path

    # ---- the job ----

    def run(self) -> Report:
        self.scratch.mkdir(parents=True, exist_ok=True)
        with self._stage("load", f"loading the {self.job.source_format} source"):
            validation.check_job(self.job)
            self.source = load.load(self.job, self.threads)
            self.notes.extend(self.source.notes)
            self.external = self._external_data()
            self.report.source.inputs = list(self.source.inputs)
            self.samples = self._validation_samples()
            self._reference_outputs()
            self._draw()
            self._lengths()
            self._source_run = None  # its session (or module run) is not needed again
        self._prune()
        base = self._export()
        with self._stage("check", "onnx.checker (full check)"):
            graph.check(base, self.external, uploaded=self.source.onnx_path is not None)
        with self._stage("optimize", "onnxruntime graph optimization (extended)"):
            fp32 = Variant(self.scratch / "fp32.onnx", VariantRecord("fp32"))
            note = graph.optimize(base, fp32.path, self.threads, self.external)
            fp32.record.note = note
            self.notes.extend([note] if note else [])
        variants = self._quantize(base, fp32)
        rows = f"{len(self.samples)} samples" + (
            f" and {len(self.top_up.rows)} more" if self.top_up else ""
        )
        with self._stage("validate", f"comparing outputs on {rows}"):
            self._validate(variants)
        if self.spec.benchmark == "off":
            self._skip("benchmark", 'benchmark "off" was requested')
            self.notes.append('not benchmarked (benchmark "off"): no speed figures')
            chosen = self._select(variants)
        else:
            batches = f"batch 1 and {self.spec.max_batch_size}"
            with self._stage("benchmark", f"latency at {batches} ({self.spec.benchmark})"):
                self._benchmark(variants)
                chosen = self._select(variants)
        self._publish(chosen)
        self.emit(
            ProgressEvent(
                "benchmark",
                FINAL_FRACTION,
                f"finished: variant {chosen.name!r} is ready to publish",
            )
        )
        return self.report

    def _external_data(self) -> bool:
        """Whether every variant is written with external data: when the source came with it
        (the client's layout is kept), or its weights are over the job's threshold (an ONNX
        file cannot exceed 2 GiB, and the graph needs room beside the weights). Decided once
        for the job, so that every variant has the layout the published one will have."""
        if self.source.module is not None:
            self.source.weight_bytes = sum(
                t.numel() * t.element_size() for t in self.source.module.state_dict().values()
            )
        if not (
            self.source.external_data or self.source.weight_bytes > self.job.external_data_threshold
        ):
            return False
        gib = self.source.weight_bytes / (1 << 30)
        why = (
            "the source came with external data"
            if self.source.external_data
            else f"its weights ({gib:.2f} GiB) exceed {self.job.external_data_threshold} bytes"
        )
        self.notes.append(f"published as model.onnx + {MODEL_DATA_FILE}: {why}")
        return True

    def _validation_samples(self) -> parity.Samples:
        sample_file = self.spec.validation.sample_file
        inputs, batched = self.source.inputs, self.source.batched
        self.report.validation = ValidationRecord(
            samples_from="sample_file" if sample_file else f"generated (seed {parity.SEED})",
            keep_failed=self.spec.validation.keep_failed,
        )
        if sample_file:
            field_name = "validation.sample_file"
            return parity.samples_from_file(self._path(sample_file), inputs, batched, field_name)
        return parity.generate(inputs, self.spec.validation.samples, batched)

    def _run(self, run: Callable[[dict[str, np.ndarray]], Outputs]) -> Outputs:
        return parity.run_batches(run, self.samples, self.spec.max_batch_size)

    def _reference_outputs(self) -> None:
        """Outputs every variant is judged against, computed before pruning changes the model."""
        if self.source.module is not None:
            try:
                self.baseline = self._run(self._source_runner())
            except InvalidArgument:
                raise
            except Exception as exc:
                if self._file_at_fault():
                    raise InvalidArgument(
                        f"the model fails on validation.sample_file in PyTorch "
                        f"({first_line(exc)}), and runs on samples generated from spec.inputs "
                        "at the same batch sizes: the file holds values or sizes the model does "
                        "not take (an index past an embedding table, a length its layers fix); "
                        "send rows like the requests it will serve"
                    ) from None
                raise InvalidArgument(
                    f"the model fails on inputs shaped like spec.inputs "
                    f"({[f'{s.name}{s.shape}' for s in self.source.inputs]}): "
                    f"{first_line(exc)}; check spec.inputs and architecture_kwargs"
                ) from None
            from ferry.server.convert.worker import export

            self.output_names = export.module_output_names(self.source)
            self.baseline_name = "pytorch"
            self._distinct_names()
        else:
            assert self.source.onnx_path is not None
            self.output_names = graph.output_names(self.source.onnx_path)
            try:
                runner = self._source_runner()
            except ConversionFailed as exc:
                # The session did not open: the file is at fault, not the samples. Caught with
                # the run below, a tensor whose dims claim 16 TiB over 16 bytes of data was
                # FAILED_PRECONDITION advising to check spec.inputs and the batch dimension.
                raise InvalidArgument(
                    f"{exc.message}: onnxruntime refuses the uploaded ONNX file itself (a "
                    "tensor whose data does not match its dims and type, an operator or opset "
                    "it does not implement); fix or re-export the model"
                ) from None
            try:
                self.baseline = self._run(runner)
            except Exception as exc:  # onnxruntime's own: a crash of the child said nothing
                if self._file_at_fault():
                    raise InvalidArgument(
                        f"the model fails on validation.sample_file in onnxruntime "
                        f"({first_line(exc)}), and runs on samples generated from spec.inputs "
                        "at the same batch sizes: the file holds values the model does not "
                        "take (an index past an embedding table); send rows "
                        "like the requests it will serve"
                    ) from None
                raise ConversionFailed(
                    f"the source ONNX model fails on the validation samples in onnxruntime "
                    f"({first_line(exc)}): check spec.inputs; "
                    + dims.FIXED_BATCH_HINT.format(batch=self.spec.max_batch_size)
                ) from None
            self.baseline_name = "onnx_source"
        self._judgeable(self.baseline)
        self.parity_reference = self.baseline
        self.client_reference = None
        if self.spec.validation.reference_file:
            self.client_reference = self._client_reference()
            if self.source.module is None:
                self.baseline, self.baseline_name = self.client_reference, "reference"

    def _file_at_fault(self) -> bool:
        """Whether a sample file the source fails on is the client's mistake rather than the
        model's: the same model runs generated samples of the file's row count. An ONNX
        source's failure was always FAILED_PRECONDITION, also for ids past its table in the
        client's own file; a torch source's told the client to check spec.inputs and
        architecture_kwargs, never naming the file at fault. A model that fails both ways (a
        batch fixed inside) stays the model's (or the spec's) fault."""
        if not self.spec.validation.sample_file:
            return False
        probe = parity.generate(self.source.inputs, len(self.samples), self.samples.batched)
        try:
            parity.run_batches(self._source_runner(), probe, self.spec.max_batch_size)
        except Exception:
            return False
        return True

    def _source_runner(self) -> Callable[[dict[str, np.ndarray]], Outputs]:
        """The model as the client gave it, before pruning: what every budget is judged against.
        Built once for the load stage's three uses (the samples, the top-up, other lengths):
        an ONNX source's session was opened three times."""
        if self._source_run is None:
            if self.source.module is not None:
                from ferry.server.convert.worker import export

                self._source_run = export.torch_runner(self.source)
            else:
                assert self.source.onnx_path is not None
                path = self.source.onnx_path
                self._source_run = parity.onnx_runner(path, self.threads, self.providers)
        return self._source_run

    def _draw(self) -> None:
        """Top the samples up (``worker.drawn``) to validation.samples rows when a sample file is
        shorter (one or two rows let a poor quantized variant through), and to the rows an
        output judged by agreement needs to count a change of the budget's size
        (``drawn.agreement_rows``: an integer output on 16 rows let a variant through that named
        another class for 4% of rows), with the source model's outputs on the new rows. Rows
        the model cannot answer are not a reason to fail a job its own samples pass: the budget
        is then judged on those alone, and a note says so."""
        v = self.spec.validation
        n = len(self.samples)
        wanted = v.samples if v.sample_file else 0
        agreement = 0
        if self.samples.batched:
            agreement = drawn.agreement_rows(self.baseline, n, v.min_cosine, v.min_top1_agreement)
        count = max(wanted, agreement)
        if n >= count:
            return
        given = f"the sample file's {n}" if v.sample_file else f"the {n} generated samples"
        hint = (
            f"give {count} rows in the sample file"
            if v.sample_file
            else f"give validation.sample_file with {count} rows"
        )
        try:
            topped = drawn.top_up(self.samples, count, self._calibration_rows())
            if topped is None:
                return
            # Rows past validation.samples are for counting changes; a model too slow to run
            # them all in drawn.AGREEMENT_SECONDS is judged on those it ran, and a note says so.
            ran, outputs = self._run_for(
                self._source_runner(), topped.rows, max(wanted - n, 0), drawn.AGREEMENT_SECONDS
            )
            if ran < len(topped.rows):
                self.notes.append(
                    f"outputs judged by the share of equal elements on {n + ran} rows, not the "
                    f"{count} that counting a change as small as the budget allows needs: the "
                    f"model took longer than {drawn.AGREEMENT_SECONDS:g} s on them; {hint}"
                )
                topped = topped.first(ran)
            top, reference = drawn.usable(topped, outputs)
        except Exception as exc:  # the model's own failure on such rows, or a drawing's
            self.notes.append(
                f"variants judged on {given} rows only: rows added to them could not be run "
                f"({first_line(exc)}); {hint}"
            )
            return
        if not len(top.rows):
            self.notes.append(
                f"variants judged on {given} rows only: the model answers NaN on every row "
                f"added to them; {hint}"
            )
            return
        self.top_up = top
        why = (
            f"validation.samples {v.samples}"
            if count == wanted
            else f"to judge {n + len(top.rows)} rows: an output judged by the share of equal "
            f"elements needs {count} to count a change as small as the budget allows"
        )
        where = f"on {top.describe(given)}, {why}"
        self.checks.append(RowsCheck(top.rows, reference, where))
        assert self.report.validation is not None  # written by _validation_samples
        self.report.validation.top_up = {"calibration": top.calibration, "drawn": top.drawn}

    def _run_for(
        self,
        run: Callable[[dict[str, np.ndarray]], Outputs],
        rows: parity.Samples,
        at_least: int,
        seconds: float,
    ) -> tuple[int, Outputs]:
        """``run`` over ``rows`` a batch at a time, stopping once past ``at_least`` rows and
        ``seconds``: how many rows ran, and the outputs on them."""
        start = time.monotonic()

        def enough(done: int) -> bool:
            return done >= at_least and time.monotonic() - start > seconds

        outputs = parity.run_batches(run, rows, self.spec.max_batch_size, stop=enough)
        return len(outputs[0]), outputs

    def _calibration(self) -> parity.Samples:
        """The calibration file's rows, read once: the top-up, the other lengths and the
        quantize stage each read it. A file that cannot be used raises here every time."""
        if self._calibration_read is None:
            try:
                self._calibration_read = parity.samples_from_file(
                    self._path(self.spec.quantization.calibration_file),
                    self.source.inputs,
                    self.source.batched,
                    "quantization.calibration_file",
                )
            except InvalidArgument as exc:
                self._calibration_read = exc
        if isinstance(self._calibration_read, InvalidArgument):
            raise self._calibration_read
        return self._calibration_read

    def _calibration_rows(self) -> parity.Samples | None:
        """The calibration file's rows, real data to judge on before any drawn ones. One the
        quantize stage would refuse is its business there, not a reason to fail here."""
        if not self.spec.quantization.calibration_file:
            return None
        try:
            return self._calibration()
        except InvalidArgument:
            return None

    def _run_on(
        self, run: Callable[[dict[str, np.ndarray]], Outputs], rows: parity.Samples
    ) -> Outputs:
        return parity.run_batches(run, rows, self.spec.max_batch_size)

    def _checks_failure(self, run: Callable[[dict[str, np.ndarray]], Outputs]) -> str:
        """The budget on every RowsCheck for the variant ``run`` runs: '' within it, else why
        not at each check it fails."""
        failures = []
        for check in self.checks:
            try:
                outputs = self._run_on(run, check.rows)
            except Exception as exc:
                failures.append(f"fails {check.where}: {first_line(exc)}")
                continue
            failure = self._budget_failure(parity.compare(outputs, check.reference))
            failures += [f"{failure} {check.where}"] if failure else []
        return "; ".join(failures)

    def _lengths(self) -> None:
        """The rows every variant is also judged on at other sizes of each declared dynamic axis
        (``worker.lengths``): the samples all share one size, and a variant calibrated there was
        published though far off at another. The sample rows and any top-up rows, up to
        validation.samples of them, then the calibration file's (``lengths.MOST_ROWS`` in all);
        the source model before pruning answers them here."""
        rows = self.samples if self.top_up is None else self.samples.joined(self.top_up.rows)
        if not lengths.sizes(self.source.inputs, rows):
            return
        source = self._source_runner()
        probes = lengths.probes(
            self.source.inputs,
            rows,
            self.spec.validation.samples,
            lambda at: self._run_on(source, at),
            self.notes,
            calibration=self._calibration_rows(),
        )
        judged: dict[str, list[int]] = {}
        for probe in probes:
            where = f"{probe.describe()}, a size the served version accepts"
            self.checks.append(RowsCheck(probe.rows, probe.reference, where))
            judged.setdefault(probe.axis, []).append(probe.size)
        if judged:
            assert self.report.validation is not None  # written by _validation_samples
            self.report.validation.lengths = judged

    def _distinct_names(self) -> None:
        """ONNX names each value once: an output named like an input made the export fail late,
        with onnxruntime's "Duplicate definition of name" and a path of this job's scratch."""
        inputs = {spec.name for spec in self.source.inputs}
        for name in self.output_names:
            if name in inputs:
                raise InvalidArgument(
                    f"the model returns an output named {name!r}, which is also the name of an "
                    "input, and ONNX names each value once: rename that output (its dict key or "
                    f"namedtuple field), e.g. to {name + '_out'!r}"
                )

    def _judgeable(self, outputs: Outputs) -> None:
        """A NaN in the model's own outputs cannot be checked against anything: it made every
        variant fail as if the exporter disagreed (NaN is close to nothing), which sent users
        to look for an export bug in a model that was given inputs outside its domain."""
        for name, out in zip(self.output_names, outputs, strict=False):
            if out.dtype.kind in "fc" and (nan := int(np.count_nonzero(np.isnan(out)))):
                where = "source ONNX model" if self.source.module is None else "PyTorch model"
                raise ConversionFailed(
                    f"the {where}'s own output {name!r} is NaN in {nan} of {out.size} elements "
                    "on the validation samples, so no conversion can be checked against it: give "
                    "inputs in the model's domain (validation.sample_file)"
                )

    def _client_reference(self) -> Outputs:
        if not self.spec.validation.sample_file:
            raise InvalidArgument(
                "validation.reference_file needs validation.sample_file: the inputs its outputs "
                "were computed from"
            )
        path = self._path(self.spec.validation.reference_file)
        arrays = parity.load_npz(path, self.output_names, "validation.reference_file")
        for name, ours in zip(self.output_names, self.baseline, strict=True):
            if ours.dtype.kind in "biufc" and arrays[name].dtype.kind not in "biufc":
                # Strings crashed the comparison in validate: INTERNAL, no field named.
                raise InvalidArgument(
                    f"validation.reference_file: {name!r} holds {arrays[name].dtype} values, "
                    f"the model gives {ours.dtype}: save the source model's outputs as numbers"
                )
            if arrays[name].shape != ours.shape:
                raise InvalidArgument(
                    f"validation.reference_file: {name!r} has shape {list(arrays[name].shape)}, "
                    f"the model gives {list(ours.shape)} on the sample file"
                )
            nan = _nan_where_finite(arrays[name], ours)
            if nan:
                # Judged as it is, every variant "disagreed" with it: CONVERSION_FAILED
                # blamed the model for the client's file.
                raise InvalidArgument(
                    f"validation.reference_file: {name!r} is NaN in {nan} of {ours.size} "
                    "elements where the model's own output is a number: compute it with the "
                    "source model from validation.sample_file's inputs"
                )
        return [arrays[name] for name in self.output_names]

    def _prune(self) -> None:
        spec = self.spec.pruning
        if pruning.method(spec.method) is pruning.NONE:
            self._skip("prune", "no pruning requested")
            return
        with self._stage("prune", f"{spec.method} pruning, amount {spec.amount}"):
            if self.source.module is None:
                section = self._prune_graph()
            else:
                from ferry.server.convert.worker import export, prune

                section = prune.prune(self.source.module, spec, export.example_inputs(self.source))
                self.parity_reference = self._run(export.torch_runner(self.source))
            self.report.pruning = section
            figures = parity.compare(self.parity_reference, self.baseline)
            section.vs_unpruned = figures
            failure = self._budget_failure(figures)
            if failure and not self.spec.validation.keep_failed:
                # Fail before the export: no ONNX variant of this model can do better.
                against = {"reference": "the PyTorch model's reference outputs"}.get(
                    self.baseline_name, "the unpruned model"
                )
                raise ConversionFailed(
                    f"{spec.method} pruning at amount {spec.amount} (without fine-tuning) leaves the "
                    f"model below the accuracy budget against {against}: {failure}; use a smaller "
                    "pruning.amount, fine-tune before uploading, or set validation.keep_failed"
                )

    def _prune_graph(self) -> PruningRecord:
        """An ONNX source is pruned on its graph; the pruned file replaces it for later stages."""
        from ferry.server.convert.worker import onnx_prune

        assert self.source.onnx_path is not None
        target = self.scratch / "pruned.onnx"
        feed = next(iter(self.samples.batches(self.spec.max_batch_size)))
        section = onnx_prune.prune_graph(
            self.source.onnx_path, target, self.spec.pruning, feed, self.threads
        )
        self.source.onnx_path = target
        self.parity_reference = self._run(parity.onnx_runner(target, self.threads, self.providers))
        return section

    def _budget_failure(self, figures: parity.Figures) -> str:
        v = self.spec.validation
        return parity.budget_failure(figures, v.min_cosine, v.min_top1_agreement)

    def _export(self) -> Path:
        if self.source.onnx_path is not None:
            self._skip("export", "the source is already ONNX")
            self.report.export = ExportRecord(opset=self.source.opset)
            self.notes.append("an ONNX source keeps its own opset; spec.opset does not apply")
            self._verify_dims(self.source.onnx_path)
            # The variants are built from this file: without the exporter's provenance, their
            # sizes are the model's (the fp32 variant loses it in graph optimization anyway).
            return graph.stripped_source(self.source.onnx_path, self.scratch)
        from ferry.server.convert.worker import export

        target = self.scratch / "exported.onnx"
        with self._stage("export", f"torch.onnx.export at opset {self.spec.opset}"):
            example = export.example_inputs(self.source)
            result = export.export(
                self.source,
                example,
                self.output_names,
                target,
                self.spec.opset,
                external=self.external,
            )
            self.report.export.exporter = result.exporter
            self.notes.extend(result.notes)
            self._batch_notes(
                export.verify_batch(
                    target,
                    self.source,
                    self._checked_batch(),
                    self.threads,
                    self.output_shapes,
                    rtol=self.spec.validation.rtol,
                    atol=self.spec.validation.atol,
                    merges=self._served_batch() > 1,
                    samples=self._batch_samples(),
                )
            )
        return target

    def _batch_samples(self) -> dict[str, np.ndarray] | None:
        """The validation samples (the user's, or generated) the batch check cycles through:
        values the model takes."""
        return self.samples.arrays if self.samples.batched else None

    def _served_batch(self) -> int:
        """The max_batch_size the job's serving config states (0: it states none)."""
        batching = self.spec.serving_config.get("batching")
        size = batching.get("max_batch_size") if isinstance(batching, dict) else None
        return size if isinstance(size, int) else 0

    def _checked_batch(self) -> int:
        """The batch the graph is checked at: the job's, or the larger one it will be served
        at (a serving max_batch_size above the job's was never run)."""
        return max(self.spec.max_batch_size, self._served_batch())

    def _batch_notes(self, notes: list[str]) -> None:
        """The batch check's notes, and whether the samples keep apart (Report.rows_apart):
        the server publishes a version whose samples do not unbatched."""
        if self._checked_batch() > 1:
            self.report.rows_apart = not any(n.startswith(dims.ROWS_DEPEND) for n in notes)
        self.notes.extend(notes)

    def _verify_dims(self, path: Path) -> None:
        """A batched ONNX source runs at batch 1 and at max_batch_size, as an export does
        (``dims.verify_batch``; without PyTorch to compare with), and its declared dynamic axes
        at both bounds (``dims.verify``). Validation alone runs only the samples' batch, and a
        graph whose dim 0 was fixed inside (a seq-first LSTM's Reshape) was published and
        failed every request of another size."""
        if not (self.source.batched or any(s.dynamic_axes for s in self.source.inputs)):
            return
        run = parity.onnx_runner(path, self.threads, self.providers)
        if self.source.batched:
            v = self.spec.validation
            self._batch_notes(
                dims.verify_batch(
                    self.source.inputs,
                    run,
                    self._checked_batch(),
                    self.output_shapes,
                    rtol=v.rtol,
                    atol=v.atol,
                    merges=self._served_batch() > 1,
                    samples=self._batch_samples(),
                )
            )
        self.notes.extend(dims.verify(self.source.inputs, run, self.output_shapes))

    def _quantize(self, base: Path, fp32: Variant) -> list[Variant]:
        spec = self.spec.quantization
        facts = quantize.facts(onnx.load(str(base), load_external_data=False))
        plan = quantization_modes.plan(spec, facts)
        self.report.quantization = QuantizationRecord(
            mode=spec.mode,
            candidates=["fp32", *(q.name for q in plan.variants)],
            skipped=plan.skipped,
        )
        if not plan.variants:
            self._skip("quantize", "no quantization requested")
            return [fp32]
        variants = [fp32]
        names = ", ".join(q.name for q in plan.variants)
        with self._stage("quantize", f"building {names}"):
            calibration = None
            if plan.needs_calibration:
                calibration = self._calibration()
            choosing = quantization_modes.mode(spec.mode).chooses
            for quantizer in plan.variants:
                target = self.scratch / f"{quantizer.name}.onnx"
                inputs = quantization_modes.BuildInputs(
                    base, target, spec, calibration, self.external
                )
                try:
                    note = quantize.build(quantizer, inputs)
                except ConversionFailed as exc:
                    if not choosing:  # the mode asked for: its failure is the job's
                        raise
                    # auto: one candidate that cannot be built is not a reason to publish
                    # nothing; it is skipped, and the report says why.
                    self.report.quantization.skipped[quantizer.name] = exc.message
                    continue
                caveat = plan.notes.get(quantizer.name, "")
                record = VariantRecord(quantizer.name, "; ".join(filter(None, [caveat, note])))
                variants.append(Variant(target, record))
        return variants

    def _pytorch_outputs(self) -> tuple[Outputs | None, str]:
        """The original PyTorch model's outputs on the samples, and what they are, when they
        exist: the (unpruned) module run here, else the client's reference outputs (an SDK
        module upload sends the module's own outputs with its ONNX export)."""
        if self.source.module is not None:
            return self.baseline, "pytorch"
        if self.client_reference is not None:
            return self.client_reference, PYTORCH_REFERENCE
        return None, ""

    def _validate(self, variants: list[Variant]) -> None:
        v = self.spec.validation
        fp32 = variants[0]
        beside: dict[str, str] = {}  # variant -> its failures on self.checks
        for variant in variants:
            run = parity.onnx_runner(variant.path, self.threads, self.providers)  # one session
            variant.outputs = self._run(run)
            beside[variant.name] = self._checks_failure(run)
        agreement = parity.compare(fp32.outputs, self.parity_reference)
        pruned = self.report.pruning is not None
        against = "pytorch" if self.source.module is not None else "onnx_source"
        if pruned:
            against = f"{against} (pruned)"
        failure = parity.tolerance_failure(fp32.outputs, self.parity_reference, v.rtol, v.atol)
        if failure:
            raise ConversionFailed(
                f"the fp32 ONNX export disagrees with {against}: {failure} (max_abs "
                f"{agreement.max_abs:.3g}, cosine {agreement.cosine:.6f}); loosen validation.rtol/"
                "atol if this is expected numerical noise, otherwise report an exporter bug"
            )
        pytorch, pytorch_name = self._pytorch_outputs()
        if pytorch is not None and self.source.module is None:
            # An ONNX source that came with PyTorch's outputs: the parity a user reads is the
            # one against PyTorch, not the ONNX graph against itself.
            agreement, against = parity.compare(fp32.outputs, pytorch), pytorch_name
        self.report.parity = ParityRecord(agreement, len(self.samples), against)
        if self.client_reference is not None:
            self.report.reference = parity.compare(fp32.outputs, self.client_reference)
            failure = parity.tolerance_failure(fp32.outputs, self.client_reference, v.rtol, v.atol)
            # A pruned model is meant to differ from the client's (unpruned) outputs: the budget
            # judges it, not the tolerance.
            if failure and not pruned:
                raise ConversionFailed(
                    f"the fp32 ONNX model disagrees with validation.reference_file: {failure}; "
                    + self._reference_hint(fp32.outputs)
                )
        for variant in variants:
            record = variant.record
            if variant is not fp32:
                record.vs_fp32 = parity.compare(variant.outputs, fp32.outputs)
            vs_baseline = parity.compare(variant.outputs, self.baseline)
            if pytorch is not None:
                record.vs_pytorch = (
                    vs_baseline
                    if pytorch is self.baseline
                    else parity.compare(variant.outputs, pytorch)
                )
            if self.client_reference is not None:
                record.vs_reference = parity.compare(variant.outputs, self.client_reference)
            failure = "; ".join(
                filter(None, [self._budget_failure(vs_baseline), beside[variant.name]])
            )
            record.budget_against = self.baseline_name
            record.within_budget = not failure
            record.note = "; ".join(
                filter(None, [record.note, failure and f"below budget: {failure}"])
            )
            self.report.variants.append(record)
        self._enforce_budget(variants)

    def _reference_hint(self, outputs: Outputs) -> str:
        """What to check when the graph disagrees with the client's PyTorch outputs.

        Wrong weights or samples make (nearly) every sample differ. When some samples agree
        exactly where others do not, the usual cause is PyTorch's own eval fast path, which the
        export does not take: nn.TransformerEncoder with src_key_padding_mask returns zeros at
        the padded positions, and users were sent to look for a weights mix-up."""
        assert self.client_reference is not None
        v = self.spec.validation
        partly = False
        for got, want in zip(outputs, self.client_reference, strict=True):
            close = np.isclose(got, want, rtol=v.rtol, atol=v.atol, equal_nan=True)
            per_sample = close.reshape(len(close), -1).all(axis=1) if close.ndim else close
            partly = partly or bool(np.any(per_sample) and not np.all(per_sample))
        if partly:
            return (
                "some samples match exactly and others do not, which points to a path PyTorch "
                "takes in eval mode that the export does not, at masked or padded positions "
                "(nn.TransformerEncoder / MultiheadAttention's fast path with a padding mask "
                "writes zeros there): compute the reference outputs with "
                "torch.backends.mha.set_fastpath_enabled(False), or leave padded positions out "
                "of the outputs compared"
            )
        return (
            "check that the reference outputs come from the same weights and sample_file, "
            "computed in eval mode (model.eval(): dropout and batch norm in training mode "
            "answer otherwise, and are not what is served)"
        )

    def _enforce_budget(self, variants: list[Variant]) -> None:
        """Explicit modes fail on their one variant; auto only needs one candidate within budget."""
        if self.spec.validation.keep_failed:
            return
        requested = variants if self._mode().chooses else variants[-1:]
        if any(v.record.within_budget for v in requested):
            return
        worst = requested[-1]
        raise ConversionFailed(
            f"the {worst.name} variant is below the accuracy budget against {self.baseline_name}: "
            f"{worst.record.note}; use a milder pruning/quantization, supply calibration data, "
            "or set validation.keep_failed to publish it anyway"
        )

    def _benchmark(self, variants: list[Variant]) -> None:
        figures, notes = benchmark.measure(
            {v.name: v.path for v in variants}, self.source.inputs, self.source.batched,
            self.spec.max_batch_size, self.threads, mode=self.spec.benchmark,
            providers=self.providers, samples=self.samples.arrays,
        )  # fmt: skip
        self.notes.extend(notes)
        for variant in variants:
            record = variant.record
            record.benchmark = figures[variant.name]
            record.note = "; ".join(filter(None, [record.note, record.benchmark.speed_note]))

    def _mode(self) -> quantization_modes.Mode:
        return quantization_modes.mode(self.spec.quantization.mode)

    def _select(self, variants: list[Variant]) -> Variant:
        """Explicit modes publish what they asked for unless it is clearly slower than fp32;
        auto asks ``quantize.choose``."""
        keep_slower = self.spec.quantization.keep_slower
        if not self._mode().chooses:
            chosen = variants[-1]
            if chosen is not variants[0] and not keep_slower:
                refusal = quantize.slower_refusal(chosen.record, self._mode_hint(chosen))
                if refusal:
                    raise ConversionFailed(refusal)
            return chosen
        records = [v.record for v in variants]
        chosen_record, why = quantize.choose(records, keep_slower=keep_slower)
        assert self.report.quantization is not None
        self.report.quantization.selection = why
        return next(v for v in variants if v.record is chosen_record)

    def _mode_hint(self, variant: Variant) -> str:
        """What to try instead of a slower variant, in a few words."""
        if variant.name == "dynamic_int8" and quantization_modes.CONV_TRAP in variant.record.note:
            return "convolutional models want static_int8 with calibration data"
        return 'quantization "auto" keeps fp32 when no variant is faster'

    def _publish(self, chosen: Variant) -> None:
        chosen.record.published = True
        self.report.published = chosen.record
        # model.onnx (+ model.onnx.data), declaring only the opsets it uses and carrying its
        # dynamic axes' bounds: a published file must upload again as it is.
        metadata = {dims.METADATA_KEY: dims.metadata(self.source.inputs)}
        varying = dims.varying_axes(self.output_shapes)
        external.publish(
            chosen.path, self.work, lambda m: graph.prepare_model(m, metadata, varying)
        )
        # The published files' size: preparing the graph changes it by a few hundred bytes, and
        # the report gave the candidate's, which no file in the repository had.
        if chosen.record.benchmark is not None:
            chosen.record.benchmark.size_bytes = external.size(self.work / MODEL_FILE)
        self.report.write(self.work)
        shutil.rmtree(self.scratch, ignore_errors=True)


def _nan_where_finite(reference: np.ndarray, ours: np.ndarray) -> int:
    """How many elements the client's reference has NaN where the model's own output has not."""
    if reference.dtype.kind not in "fc":
        return 0
    theirs = np.isnan(reference)
    if ours.dtype.kind in "fc":
        theirs &= ~np.isnan(ours)
    return int(np.count_nonzero(theirs))
