"""Receiving an uploaded model file: size limit while streaming, SHA-256, and a format check.

Bytes go to ``.tmp-<id>`` in the uploads folder and are renamed to their final name only after
the whole file arrived and passed the check, so a reader (or a restart) never sees a partial
upload; any exit before that, a client disconnecting included, deletes the temporary file.

The format check reads structure only and never deserializes executable content: a state_dict
must be torch.save's zip archive (a bare pickle is refused before the child ever sees it), a
safetensors file must have a sane JSON header, an ONNX file must parse as a ModelProto that
reads no external data anywhere (``onnx_safety``); an ONNX archive (model.onnx and its data
files) is extracted into the upload's own folder and may read only those (``onnx_archive``).
Whether the weights fit an architecture is the child's business.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import os
import struct
import threading
import uuid
import zipfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ferry.codec._json_keys import unique_object
from ferry.server.convert import architectures, onnx_archive, onnx_safety, upload_check
from ferry.server.convert.spec import CODE_BEARING_FORMATS, SOURCE_FORMATS
from ferry.server.convert.store import UploadRecord, now_ms
from ferry.server.core.repository import MODEL_FILE, TMP_PREFIX, validate_model_name
from ferry.server.errors import FailedPrecondition, InvalidArgument, LimitExceeded

SUFFIXES = {
    "state_dict": ".pt",
    "safetensors": ".safetensors",
    "onnx": ".onnx",
    "exported_program": ".pt2",
    "torchscript": ".pt",
    "onnx_archive": "",  # extracted into a folder of its own: <id>/model.onnx + data files
}
MAX_SAFETENSORS_HEADER = 100 << 20
MAX_KWARGS_JSON = 64 << 10
# Constructor kwargs are flat or nearly so; the bound keeps every later walk of them (json.dumps
# into the record, the job contract, the child) far from the interpreter's recursion limit.
MAX_KWARGS_DEPTH = 32
_ZIP_MAGIC = b"PK\x03\x04"


@dataclass
class UploadHeader:
    model: str
    format: str
    architecture: str = ""
    architecture_kwargs: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    expected_sha256: str = ""
    size_bytes: int = 0  # 0: unknown


def kwargs_from_json(text: str) -> dict[str, Any]:
    if not text:
        return {}
    if len(text) > MAX_KWARGS_JSON:
        raise InvalidArgument(f"architecture kwargs are over {MAX_KWARGS_JSON} bytes of JSON")
    try:
        # A key given twice ({"hidden": [256], "hidden": [8]}) was read as its last value,
        # silently: refused, like a model config's (DuplicateKey is a ValueError).
        value = json.loads(text, object_pairs_hook=unique_object)
    except RecursionError:  # the C parser's own guard: nesting past the interpreter's limit
        raise _too_deep() from None
    except ValueError as exc:
        raise InvalidArgument(f"architecture kwargs are not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise InvalidArgument("architecture kwargs must be a JSON object (name -> value)")
    return value


def check_kwargs(kwargs: dict[str, Any]) -> None:
    """Bound kwargs however they came (JSON text, or a Struct the adapter turned into a dict):
    they are stored with the upload and sent back by every ListUploads, so their JSON must fit
    the same limit as the JSON form's."""
    _check_depth(kwargs)
    try:
        size = len(json.dumps(kwargs, sort_keys=True))
    except (ValueError, TypeError, RecursionError) as exc:
        raise InvalidArgument(f"architecture kwargs cannot be stored as JSON: {exc}") from None
    if size > MAX_KWARGS_JSON:
        raise InvalidArgument(
            f"architecture kwargs are {size} bytes as JSON, over the limit of {MAX_KWARGS_JSON}: "
            "they are constructor arguments (sizes, names), not data"
        )


def _check_depth(value: Any) -> None:
    """Iterative, so a deep value is refused rather than overflowing the check itself."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_KWARGS_DEPTH:
            raise _too_deep()
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)


def _too_deep() -> InvalidArgument:
    return InvalidArgument(
        f"architecture kwargs are nested deeper than {MAX_KWARGS_DEPTH} levels: give the "
        'constructor arguments as a flat object, e.g. {"in_features": 64, "hidden": [256]}'
    )


def disk_full(exc: BaseException) -> bool:
    """ENOSPC or EDQUOT: the operator's disk, not a bug, so never INTERNAL."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def disk_full_error(detail: str, then: str = "upload again") -> LimitExceeded:
    return LimitExceeded(
        f"the server's state disk is full ({detail}); nothing was kept: the operator must free "
        "space on the disk of the state folder (--state-dir), e.g. by deleting old uploads "
        f"(ferry uploads delete), then {then}"
    )


def check_header(header: UploadHeader, *, limit: int, allow_code_formats: bool) -> None:
    """Everything that can be refused before a single byte is received."""
    validate_model_name(header.model)
    if header.format not in SOURCE_FORMATS:
        raise InvalidArgument(
            f"unknown source format {header.format!r}; use one of {', '.join(SOURCE_FORMATS)}"
        )
    if header.format in CODE_BEARING_FORMATS and not allow_code_formats:
        raise FailedPrecondition(
            f"{header.format} files run code when loaded, so this server refuses them; upload "
            "a state_dict or safetensors file with an architecture, or an ONNX file, or start "
            "the server with --allow-code-formats if every uploader is trusted"
        )
    if header.format in ("state_dict", "safetensors") and not header.architecture:
        raise InvalidArgument(
            f"a {header.format} file holds weights only, so its upload needs an architecture: the "
            "model class they fit, by name, with its constructor kwargs (built-ins: "
            f"{', '.join(architectures.available())}). For a class of your own, "
            + architectures.ROUTES
        )
    if header.architecture:
        architectures.check_name(header.architecture)
    check_kwargs(header.architecture_kwargs)
    if header.format in ("state_dict", "safetensors"):
        # The server reads a built-in's sizes for every listing of the upload: refuse now
        # what would otherwise be stored and fail later.
        architectures.check_kwargs(header.architecture, header.architecture_kwargs)
    if header.expected_sha256 and not _is_sha256(header.expected_sha256):
        raise InvalidArgument("expected_sha256 must be 64 lowercase hex characters")
    if header.size_bytes > limit:
        raise LimitExceeded(
            f"upload of {header.size_bytes} bytes is over the limit of {limit} bytes "
            "(server setting --max-upload-bytes)"
        )
    if len(header.description) > 4096:
        raise InvalidArgument("description is over 4096 characters")


async def receive(
    header: UploadHeader,
    chunks: AsyncIterator[bytes],
    folder: Path,
    *,
    limit: int,
    check_memory_bytes: int = 0,
    check_timeout: float = 0.0,
    check_slots: upload_check.CheckSlots | None = None,
) -> UploadRecord:
    """Write the chunks to a temporary file, enforcing ``limit`` as they come, then check and
    rename. Any failure or cancellation removes the temporary file. A file over a few MiB has
    its format checked in a process of its own (``upload_check``: parsing an ONNX file would
    hold it twice in this one), under ``check_memory_bytes`` and ``check_timeout``."""
    upload_id = uuid.uuid4().hex
    try:
        return await _receive(
            header,
            chunks,
            folder,
            upload_id=upload_id,
            limit=limit,
            check_memory_bytes=check_memory_bytes,
            check_timeout=check_timeout,
            check_slots=check_slots,
        )
    except OSError as exc:
        if disk_full(exc):
            raise disk_full_error(exc.strerror or str(exc)) from None
        raise


async def _receive(
    header: UploadHeader,
    chunks: AsyncIterator[bytes],
    folder: Path,
    *,
    upload_id: str,
    limit: int,
    check_memory_bytes: int,
    check_timeout: float,
    check_slots: upload_check.CheckSlots | None,
) -> UploadRecord:
    tmp = folder / f"{TMP_PREFIX}{upload_id}"
    final = folder / f"{upload_id}{SUFFIXES[header.format]}"
    sink = _Sink(tmp)
    try:
        async for chunk in chunks:
            if sink.size + len(chunk) > limit:
                raise LimitExceeded(
                    f"upload is over the limit of {limit} bytes (server setting "
                    "--max-upload-bytes); nothing was kept"
                )
            if header.size_bytes and sink.size + len(chunk) > header.size_bytes:
                # Refused at the first byte past it: the whole rest was received (up to the
                # server's limit) and then called "truncated", the opposite of what happened.
                raise InvalidArgument(
                    f"upload longer than its header announced: more than the {header.size_bytes} "
                    "bytes of size_bytes arrived; nothing was kept: announce the file's exact "
                    "length, or 0 when it is not known"
                )
            await asyncio.to_thread(sink.write, chunk)
        await asyncio.to_thread(sink.sync)
        size, sha = sink.size, sink.digest.hexdigest()
        if size == 0:
            raise InvalidArgument("the upload carried no bytes: send the file after the header")
        if header.size_bytes and size != header.size_bytes:
            raise InvalidArgument(
                f"upload truncated: {size} bytes arrived, the header announced "
                f"{header.size_bytes}; upload again"
            )
        if header.expected_sha256 and sha != header.expected_sha256:
            raise InvalidArgument(
                f"upload corrupted: sha256 of the bytes received is {sha}, the header expected "
                f"{header.expected_sha256}; upload again"
            )
        if header.format == "onnx_archive":
            final = await _unpack(
                tmp, folder / upload_id, size, check_memory_bytes, check_timeout, slots=check_slots
            )
        else:
            await upload_check.check(
                header.format,
                tmp,
                size_bytes=size,
                memory_bytes=check_memory_bytes,
                time_limit_s=check_timeout,
                slots=check_slots,
            )
            os.rename(tmp, final)
    finally:
        sink.close()
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return UploadRecord(
        upload_id=upload_id,
        model=header.model,
        format=header.format,
        path=str(final),
        sha256=sha,
        size_bytes=size,
        architecture=header.architecture,
        architecture_kwargs=json.dumps(header.architecture_kwargs, sort_keys=True),
        description=header.description,
        created_ms=now_ms(),
    )


class _Sink:
    """The temporary file, written from worker threads. The lock matters on cancellation: a
    write still running in its thread must finish before the file is closed and unlinked."""

    def __init__(self, path: Path) -> None:
        self._fh = open(path, "xb")  # noqa: SIM115 - closed by close()
        self._lock = threading.Lock()
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, chunk: bytes) -> None:
        with self._lock:
            if self._fh.closed:
                return
            self._fh.write(chunk)
            self.digest.update(chunk)
            self.size += len(chunk)

    def sync(self) -> None:
        with self._lock:
            self._fh.flush()
            os.fsync(self._fh.fileno())

    def close(self) -> None:
        """Never raises: a kept upload was flushed and synced by ``sync`` before this, so what
        a failing close could lose (a full disk refusing the buffered tail) is a file being
        discarded anyway, and raising here would skip its removal."""
        with self._lock, contextlib.suppress(OSError):
            self._fh.close()


async def _unpack(
    archive: Path,
    folder: Path,
    size_bytes: int,
    memory_bytes: int,
    time_limit_s: float,
    *,
    slots: upload_check.CheckSlots | None = None,
) -> Path:
    """Extract an onnx_archive beside ``folder`` and check its graph like any upload, both in
    the check (in a process of its own when the archive is large: tarfile reads each extended
    header whole, so a 300 MB pax header cost the serving process 900 MB), and rename it to
    ``folder``; return its model.onnx. The archive itself is not kept."""
    staging = onnx_archive.staging_for(archive)
    try:
        await upload_check.check(
            "onnx_archive",
            archive,
            size_bytes=size_bytes,
            memory_bytes=memory_bytes,
            time_limit_s=time_limit_s,
            slots=slots,
        )
        os.rename(staging, folder)
    except BaseException:
        onnx_archive.remove(staging)
        raise
    return folder / MODEL_FILE


def _is_sha256(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


# ---- format checks (structure only; nothing is deserialized) ----
def check_format(fmt: str, path: Path) -> None:
    if fmt == "safetensors":
        _check_safetensors(path)
    elif fmt == "onnx":
        _check_onnx(path)
    elif fmt == "onnx_archive":  # extracted beside the archive, into staging_for(path)
        staging = onnx_archive.staging_for(path)
        # Each member must lie within the archive (no sparse members), so the files add up to
        # the upload's size at most, already within --max-upload-bytes.
        onnx_archive.check(staging, onnx_archive.extract(path, staging, limit=path.stat().st_size))
    else:
        _check_torch_zip(fmt, path)


def discard_check_output(fmt: str, path: Path) -> None:
    """Remove what ``check_format`` wrote beside ``path`` (an archive's extracted folder)."""
    if fmt == "onnx_archive":
        onnx_archive.remove(onnx_archive.staging_for(path))


def _check_torch_zip(fmt: str, path: Path) -> None:
    with open(path, "rb") as fh:
        magic = fh.read(4)
    how = {
        "state_dict": "torch.save(model.state_dict(), path)",
        "exported_program": "torch.export.save(program, path)",
        "torchscript": "torch.jit.save(scripted, path)",
    }[fmt]
    if magic != _ZIP_MAGIC:
        hint = (
            " (this looks like a bare pickle, which is never loaded)"
            if magic[:1] == b"\x80"
            else ""
        )
        raise InvalidArgument(
            f"not a {fmt} file: expected the zip archive written by {how}{hint}; "
            "save it again with a current torch"
        )
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except Exception as exc:  # BadZipFile, and what zipfile lets through: a member name that is
        # not UTF-8 (UnicodeDecodeError), a "zip file version 7.7" (NotImplementedError)...
        why = str(exc)[:200] or type(exc).__name__
        raise InvalidArgument(
            f"{fmt} upload is a corrupt or truncated zip archive: {why}"
        ) from None
    if fmt in ("state_dict", "torchscript") and not any(
        n == "data.pkl" or n.endswith("/data.pkl") for n in names
    ):
        raise InvalidArgument(f"{fmt} upload has no data.pkl record: it was not written by {how}")


def _check_safetensors(path: Path) -> None:
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise InvalidArgument("safetensors upload is shorter than its 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n == 0 or n > MAX_SAFETENSORS_HEADER or 8 + n > size:
            raise InvalidArgument(
                f"not a safetensors file (header length {n} for a {size}-byte file): corrupt "
                "or truncated; save it again with safetensors.torch.save_file"
            )
        raw = fh.read(n)
    try:
        header = json.loads(raw)
    except RecursionError:  # the C parser's own guard: nesting past the interpreter's limit
        raise InvalidArgument(
            "safetensors header nests JSON deeper than any safetensors file does: corrupt or "
            "not a safetensors file; save it with safetensors.torch.save_file"
        ) from None
    except ValueError:
        raise InvalidArgument("safetensors header is not valid JSON: corrupt file") from None
    if not isinstance(header, dict):
        raise InvalidArgument("safetensors header is not a JSON object: corrupt file")
    data_len = size - 8 - n
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_len
        ):
            raise InvalidArgument(
                f"safetensors tensor {name[:100]!r} points outside the file: truncated or corrupt"
            )


def _check_onnx(path: Path) -> None:
    import onnx  # the server extra has it; only onnx uploads pay for the import

    try:
        model = onnx.load_model(os.fspath(path), load_external_data=False)
    except Exception as exc:  # DecodeError and friends: the bytes are not a ModelProto
        raise InvalidArgument(
            f"not an ONNX model (it does not parse as a ModelProto: {type(exc).__name__}); "
            "corrupt or truncated upload?"
        ) from None
    if not model.graph.node and not model.graph.output:
        raise InvalidArgument("ONNX upload has an empty graph: corrupt or not an ONNX model")
    onnx_safety.check_source(model)
