"""The upload route for models over 2 GiB: ``model.onnx`` and its external-data files in one tar.

ONNX files are protobuf messages, which cannot exceed 2 GiB, so a bigger model keeps its weights
in data files beside ``model.onnx`` (``onnx.save(..., save_as_external_data=True)``); Triton and
KServe serve exactly that, a version folder holding ``model.onnx`` and its data files. The upload
carries that folder as an uncompressed tar (``tar cf model.tar -C folder .``): streamed and
extracted in one pass, the bytes on the wire are the bytes on disk (no compression ratio to
bound), and every tool writes it.

A plain ONNX upload may not read external data at all (uploads sit side by side: a relative path
could name another user's file). An archive is extracted into a folder of its own, and the graph
may read only the files that came in it: flat names, regular files, each reference within its
file (``onnx_safety.check_confined``). Everything is bounded: the member count, each member's and
the total size (the archive's own), the names. The archive is read by the upload's check
(``upload_check``), in a memory-limited process of its own unless it is small: tarfile reads
each extended header whole and follows chains of them, so its memory is bounded there.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tarfile
from pathlib import Path
from typing import Any

from ferry.server.core.repository import MODEL_FILE
from ferry.server.errors import InvalidArgument, LimitExceeded

MAX_FILES = 10_000  # model.onnx plus data files (onnx.save writes one file per tensor on request)
# A flat file name: what onnx.save writes for a location (tensor names, "model.onnx.data").
NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+=@-]{0,254}")
_COPY_BLOCK = 1 << 20
HOW = "tar cf model.tar -C FOLDER . (FOLDER holding model.onnx and its data files)"


def staging_for(archive: Path) -> Path:
    """Where ``archive`` is extracted before it is checked: beside it, named after it (so a
    dead process's leftovers carry its temporary prefix and are removed at the next start)."""
    return archive.with_name(f"{archive.name}.d")


def extract(archive: Path, dest: Path, *, limit: int, max_files: int = MAX_FILES) -> dict[str, int]:
    """Extract ``archive`` into ``dest`` (which must not exist; made here); return each file's
    name and size. Refused: anything but regular files (links, devices, folders other than the
    archive's root), names that are not flat and plain, a name twice, more than ``max_files``
    members, more than ``limit`` bytes in all, no ``model.onnx``. On refusal ``dest`` is
    removed."""
    dest.mkdir(mode=0o700)
    try:
        return _extract(archive, dest, limit=limit, max_files=max_files)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise


def _extract(archive: Path, dest: Path, *, limit: int, max_files: int) -> dict[str, int]:
    files: dict[str, int] = {}
    total = members = 0
    size = archive.stat().st_size
    try:
        tar = tarfile.open(archive, mode="r:")  # noqa: SIM115 - closed below
    except tarfile.ReadError as exc:
        raise InvalidArgument(
            f"an onnx_archive upload must be an uncompressed tar ({exc}); make it with {HOW}"
        ) from None
    except Exception as exc:  # open reads the first member's headers too
        raise _corrupt(exc) from None
    with tar:
        while True:
            try:
                member = tar.next()
            except Exception as exc:
                raise _corrupt(exc) from None
            if member is None:
                break
            members += 1
            if members > max_files:
                raise LimitExceeded(
                    f"the archive holds more than {max_files} members: save the model's external "
                    "data to one file (onnx.save(..., all_tensors_to_one_file=True))"
                )
            name = _member_name(member)
            if name is None:  # the archive's root folder ("." or "./")
                continue
            if name in files:
                raise InvalidArgument(f"the archive holds {name!r} twice")
            if member.offset_data + member.size > size:
                raise InvalidArgument(
                    f"the archive's {name!r} claims {member.size} bytes, more than the archive "
                    f"holds after its header: truncated or corrupt tar; make it with {HOW}"
                )
            total += member.size
            if total > limit:
                raise LimitExceeded(
                    f"the archive's files add up to more than the limit of {limit} bytes "
                    "(server setting --max-upload-bytes)"
                )
            _copy(tar, member, dest / name)
            files[name] = member.size
    if MODEL_FILE not in files:
        shown = ", ".join(sorted(files)[:10]) or "nothing"
        raise InvalidArgument(
            f"the archive has no {MODEL_FILE} at its top level (it holds {shown}); make it with "
            f"{HOW}"
        )
    return files


def _corrupt(exc: Exception) -> Exception:
    """What tarfile raised while reading headers the client wrote. Beyond its own TarError it
    lets through what its parsing meets (a ValueError for a malformed GNU sparse map, a
    RecursionError for a chain of thousands of extended headers, one call deeper each): all are
    the archive's fault and answered INVALID_ARGUMENT. An OSError (the disk) stays what it is."""
    if isinstance(exc, OSError):
        return exc
    why = str(exc).replace("\n", " ")[:200] or type(exc).__name__
    if isinstance(exc, RecursionError):
        why = "extended headers chained thousands deep"
    return InvalidArgument(f"corrupt or truncated tar archive: {why}; make it with {HOW}")


def _member_name(member: tarfile.TarInfo) -> str | None:
    """The member's flat file name, or None for the archive's root folder; anything else is
    refused with what was wrong."""
    raw = member.name
    name = raw[2:] if raw.startswith("./") else raw
    shown = raw[:100]
    if member.isdir() and name.rstrip("/") in ("", "."):
        return None
    if member.issym() or member.islnk():
        raise InvalidArgument(
            f"the archive's {shown!r} is a link: only regular files are accepted (a link could "
            "reach files that did not travel with the upload)"
        )
    if member.issparse():
        raise InvalidArgument(
            f"the archive's {shown!r} is a sparse file: its holes would be written out, more "
            f"bytes than the upload carried; make the archive without --sparse: {HOW}"
        )
    if not member.isreg():
        kind = "folder" if member.isdir() else "special file"
        raise InvalidArgument(
            f"the archive's {shown!r} is a {kind}: only regular files side by side with "
            f"{MODEL_FILE} are accepted; make it with {HOW}"
        )
    if raw.startswith("/") or ".." in raw.split("/") or "/" in name or "\\" in name:
        raise InvalidArgument(
            f"the archive's {shown!r} is not a plain file name: no absolute paths, no '..', no "
            f"folders; model.onnx and its data files sit side by side"
        )
    if not NAME_RE.fullmatch(name):
        raise InvalidArgument(
            f"the archive's file name {shown!r} is not accepted: use letters, digits and "
            "'_.+=@-', not starting with '.' or '-', at most 255 characters"
        )
    return name


def _copy(tar: tarfile.TarFile, member: tarfile.TarInfo, target: Path) -> None:
    source = tar.extractfile(member)
    if source is None:  # not a regular file: refused before this point
        raise InvalidArgument(f"the archive's {member.name[:100]!r} has no data")
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    written = 0
    with source, os.fdopen(fd, "wb") as out:
        while block := source.read(_COPY_BLOCK):
            out.write(block)
            written += len(block)
        out.flush()
        os.fsync(out.fileno())
    if written != member.size:
        raise InvalidArgument(f"the archive's {member.name[:100]!r} is truncated")


def listing(folder: Path) -> dict[str, int]:
    """The regular files of an extracted upload's folder (the child's view of what came in the
    archive: it re-checks confinement against what is really there)."""
    files = {}
    for entry in folder.iterdir():
        if entry.is_file() and not entry.is_symlink() and NAME_RE.fullmatch(entry.name):
            files[entry.name] = entry.stat().st_size
    return files


def check(folder: Path, files: dict[str, int]) -> None:
    """The graph of ``folder/model.onnx`` (read without its data) must read only ``files``."""
    import onnx

    from ferry.server.convert import onnx_safety

    model = _parse(folder / MODEL_FILE, onnx)
    if not model.graph.node and not model.graph.output:
        raise InvalidArgument("the archive's model.onnx has an empty graph: not an ONNX model")
    onnx_safety.check_confined(model, files)
    onnx_safety.check_domains(model)


def _parse(path: Path, onnx: Any) -> Any:
    try:
        return onnx.load_model(os.fspath(path), load_external_data=False)
    except Exception as exc:  # DecodeError and friends
        raise InvalidArgument(
            f"the archive's model.onnx does not parse as an ONNX ModelProto "
            f"({type(exc).__name__}): corrupt, or not an ONNX model"
        ) from None


def remove(folder: Path) -> None:
    """Remove an extracted upload's folder (its path checked by the caller)."""
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(folder)
