"""The format check of an upload, run in a process of its own under the conversion memory limit.

Parsing a ModelProto holds the whole file twice (the bytes read, then the message built from them
with every initializer copied in): a 419 MB upload grew the serving process by ~820 MiB, and the
allocator keeps much of that afterwards. A safetensors header may be 100 MiB of JSON, a zip's
central directory millions of entries. So the serving process never parses an upload: a short
child (``python -m ferry.server.convert.upload_check FORMAT PATH``) runs exactly the check the
serving process used to run (``uploads.check_format``: for ONNX, it parses, has a graph, reads no
external data, uses no custom-op domain; an ``onnx_archive`` is extracted beside itself there and
its graph checked, since tarfile reads each extended header whole) and says on stdout, as one
JSON line, what it found. The
serving process's memory grows by the upload's chunks in flight whatever the file's size; the
child's is bounded like a conversion's (``--conversion-memory-bytes``), and running out of it is
RESOURCE_EXHAUSTED naming that limit, never "corrupt or truncated".

A file of up to ``IN_PROCESS_BYTES`` is still checked in the serving process (in a thread): a
process start and an onnx import cost ~0.4 s, a hundred times a small upload's own time. The bound
is set by the worst file, not a typical one: what a check costs grows with the number of protobuf
messages, and an empty message is two bytes on the wire but ~150 bytes parsed and ~450 more while
``onnx_safety`` walks it. A 3.8 MiB file of two million empty nodes (under the former 4 MiB bound)
held the serving process for 68 s at 1 GiB; at 64 KiB the worst is under a second and ~30 MiB.

At most ``--max-concurrent-conversions`` check processes run at once (``CheckSlots``), the number
of conversion-sized processes the operator said the machine holds: each may grow to the memory
limit, and N uploads finishing together started N of them (twenty 1 GB uploads, twenty processes
of up to 4 GiB). An upload whose bytes have all arrived waits for a slot.

The child is started through ``jobs.limited`` (address-space limit, killed with the server,
fork-free) in a session of its own, killed as a group on timeout or when the upload is abandoned.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from ferry.server.convert import out_of_memory
from ferry.server.convert.child_env import child_environment
from ferry.server.errors import (
    DeadlineExceeded,
    ErrorKind,
    FerryError,
    InternalError,
    InvalidArgument,
)

log = logging.getLogger("ferry.convert")

MODULE = "ferry.server.convert.upload_check"
MAX_REPLY = 64 << 10
# One allocator arena: the check is single-threaded and its peak is what the limit judges.
_ENV = {"MALLOC_ARENA_MAX": "2", "PYTHONUNBUFFERED": "1"}


IN_PROCESS_BYTES = 64 << 10
# The check process's command, before its FORMAT PATH arguments (tests point it elsewhere).
COMMAND = [sys.executable, "-m", MODULE]


class CheckSlots:
    """Bounds the check processes running at once (a server's; its loop's)."""

    def __init__(self, limit: int) -> None:
        self._free = asyncio.Semaphore(max(1, limit))
        self.waiting = 0  # uploads whose check waits for a slot

    @contextlib.asynccontextmanager
    async def held(self) -> AsyncIterator[None]:
        self.waiting += 1
        try:
            await self._free.acquire()
        finally:
            self.waiting -= 1
        try:
            yield
        finally:
            self._free.release()


async def check(
    fmt: str,
    path: Path,
    *,
    size_bytes: int,
    memory_bytes: int,
    time_limit_s: float,
    slots: CheckSlots | None = None,
) -> None:
    """Raise what is wrong with the ``fmt`` file at ``path`` (``size_bytes`` long); return when
    it is fine. A check process waits for one of ``slots`` (None: no bound)."""
    if size_bytes <= IN_PROCESS_BYTES:
        work = asyncio.ensure_future(asyncio.to_thread(_check_here, fmt, path))
        try:
            await asyncio.shield(work)
        except asyncio.CancelledError:
            # A client that leaves ends the call, not the thread: an archive's extraction went
            # on writing its folder after the caller had removed it, and the folder stayed
            # until a restart. What the check writes goes once the thread is done with it.
            work.add_done_callback(lambda _: _discard_output(fmt, path))
            raise
    elif slots is None:
        await _check_in_child(fmt, path, memory_bytes=memory_bytes, time_limit_s=time_limit_s)
    else:
        async with slots.held():
            await _check_in_child(fmt, path, memory_bytes=memory_bytes, time_limit_s=time_limit_s)


def _discard_output(fmt: str, path: Path) -> None:
    from ferry.server.convert.uploads import discard_check_output

    try:
        discard_check_output(fmt, path)
    except OSError as exc:  # a done callback must not raise; a restart removes what is left
        log.warning("could not remove what the %s upload's check wrote: %s", fmt, exc)


def _check_here(fmt: str, path: Path) -> None:
    from ferry.server.convert.uploads import check_format

    try:
        check_format(fmt, path)
    except Exception as exc:
        if out_of_memory.is_out_of_memory(exc):  # this process has no limit: the machine ran out
            raise out_of_memory.exceeded(0, f"checking the {fmt} upload") from None
        raise


async def _check_in_child(fmt: str, path: Path, *, memory_bytes: int, time_limit_s: float) -> None:
    from ferry.server.convert.jobs import PIPES_DRAIN_S, limited

    command = limited(memory_bytes, [*COMMAND, fmt, os.fspath(path)])
    # Pipes of our own, as the conversion runner's (jobs._spawn): asyncio's kept communicate()
    # and wait() going for as long as a process the check started in a session of its own held
    # them, so the upload was answered "took over --conversion-timeout" of a check that had
    # ended, or never.
    pipes = [os.pipe() for _ in range(2)]
    try:
        proc = await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=pipes[0][1],
            stderr=pipes[1][1],
            start_new_session=True,
            cwd=path.parent,
            env=child_environment(_ENV),
        )
    except OSError as exc:
        for read_fd, _ in pipes:
            os.close(read_fd)
        raise InternalError(f"could not start the upload's check process: {exc}") from None
    finally:
        for _, write_fd in pipes:
            os.close(write_fd)
    read: tuple[bytearray, bytearray] = (bytearray(), bytearray())
    readers = [
        asyncio.create_task(_read_all(read_fd, sink))
        for (read_fd, _), sink in zip(pipes, read, strict=True)
    ]
    try:
        await asyncio.wait_for(proc.wait(), time_limit_s if time_limit_s > 0 else None)
    except TimeoutError:
        raise DeadlineExceeded(
            f"checking the upload took over {time_limit_s:g} s (server setting "
            "--conversion-timeout); raise it for very large models"
        ) from None
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # nothing of it outlives the upload
        await proc.wait()
        _, held = await asyncio.wait(readers, timeout=PIPES_DRAIN_S)
        for reader in held:
            reader.cancel()  # each closes its pipe
        await asyncio.gather(*readers, return_exceptions=True)
    out, err = (bytes(sink) for sink in read)
    _judge(fmt, proc.returncode, out[:MAX_REPLY], err, memory_bytes)


async def _read_all(fd: int, sink: bytearray) -> None:
    """Add to ``sink`` what the pipe ``fd`` carries until its writers close it (as
    communicate()), or until cancelled: what was read by then stays."""
    from ferry.server.convert.jobs import pipe_reader

    reader, transport = await pipe_reader(fd, 1 << 16)
    try:
        while chunk := await reader.read(1 << 16):
            sink += chunk
    finally:
        transport.close()


def _judge(fmt: str, rc: int | None, out: bytes, err: bytes, memory_bytes: int) -> None:
    lines = err.decode("utf-8", "replace").strip().splitlines()
    tail = lines[-1] if lines else ""
    for line in lines[-20:]:
        log.debug("upload check: %s", line)
    try:
        reply = json.loads(out.decode("utf-8").strip().splitlines()[-1]) if out.strip() else None
    except (ValueError, UnicodeDecodeError, IndexError):
        reply = None
    if rc == 0 and isinstance(reply, dict) and not reply.get("kind"):
        return
    if isinstance(reply, dict) and reply.get("kind") in _KINDS:
        raise FerryError(str(reply.get("message", ""))[:4096], kind=ErrorKind(reply["kind"]))
    if out_of_memory.text_says_out_of_memory(tail) or rc == -signal.SIGKILL:
        raise out_of_memory.exceeded(memory_bytes, f"checking the {fmt} upload")
    log.warning("the upload check process ended with %s: %s", rc, tail)
    raise InvalidArgument(
        f"the {fmt} upload could not be checked: the process reading it crashed "
        f"({tail[:300]}); it may be corrupt: save it again and upload it again"
    )


_KINDS = {k.value for k in ErrorKind}


def main(argv: list[str] | None = None) -> int:
    """Check one file; print ``{"kind": "", "message": ""}`` (kind empty when it passed)."""
    from ferry.server.convert.uploads import check_format

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print(f"usage: python -m {MODULE} FORMAT PATH", file=sys.stderr)
        return 1
    fmt = args[0]
    try:
        check_format(fmt, Path(args[1]))
        reply = {"kind": "", "message": ""}
    except Exception as exc:
        from ferry.server.convert.uploads import disk_full, disk_full_error

        error = exc
        if out_of_memory.is_out_of_memory(exc):
            error = out_of_memory.exceeded(
                out_of_memory.memory_limit(), f"checking the {fmt} upload"
            )
        elif disk_full(exc):  # extracting an archive writes
            error = disk_full_error(getattr(exc, "strerror", None) or str(exc))
        if not isinstance(error, FerryError):
            raise
        reply = {"kind": error.kind.value, "message": error.message}
    print(json.dumps(reply), flush=True)
    return 0 if not reply["kind"] else 2


if __name__ == "__main__":
    sys.exit(main())
