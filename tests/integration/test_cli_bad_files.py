"""``ferry infer`` and ``ferry loadtest`` given files or shapes they cannot use: one line that
says what to fix and a non-zero exit, never a traceback, and before the work, not after it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ferry.cli import main
from ferry.client.loadtest._inputs import MAX_JSON_INPUT_BYTES


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    _, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return code, lines[0]


def test_unusable_files_and_shapes_are_one_line_errors(
    server: Any, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    t = ("--target", server.target)
    x = tmp_path / "x.npy"
    np.save(x, np.ones((1, 64), np.float32))
    folder = tmp_path / "out.npz"
    folder.mkdir()
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    # Past the bound (a sparse file): it was read and parsed whole, without limit.
    big = tmp_path / "big.json"
    with big.open("wb") as f:
        f.truncate(MAX_JSON_INPUT_BYTES + 1)
    load = ("loadtest", "mlp", "-n", "2", "--warmup", "0", "--no-progress")

    cases: list[tuple[tuple[str, ...], str]] = [
        (("infer", "mlp", "-i", str(x), "-o", str(folder)), "is a folder"),
        (("infer", "mlp", "-i", str(deep)), "nested too deeply"),
        (("infer", "mlp", "-i", str(big)), "a JSON input file may hold at most 16 MiB"),
        (("infer", "mlp", "--random", "--batch-size", str(10**12)), "one gRPC message"),
        ((*load, "--json", str(folder)), "is a folder"),
        ((*load, "--csv", str(folder)), "is a folder"),
        ((*load, "-i", str(deep)), "nested too deeply"),
        ((*load, "-i", str(big)), "a JSON input file may hold at most 16 MiB"),
        ((*load, "--batch-size", str(10**12)), "one gRPC message"),
    ]
    for argv, expected in cases:
        code, line = run(capsys, *argv, *t)
        assert code == 2, (argv, line)
        assert line.startswith("ferry ") and expected in line, (argv, line)
    assert list(folder.iterdir()) == []


def test_a_write_that_fails_after_the_checks_is_one_line(
    server: Any, capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: Any
) -> None:
    x = tmp_path / "x.npy"
    np.save(x, np.ones((1, 64), np.float32))

    def refuse(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied", str(tmp_path / "out.npz"))

    monkeypatch.setattr(np, "savez", refuse)
    argv = ("infer", "mlp", "-i", str(x), "-o", str(tmp_path / "out.npz"))
    code, line = run(capsys, *argv, "--target", server.target)
    assert code == 1 and "Permission denied" in line, line


def _npy_header(shape: tuple[int, ...], descr: str = "<f4") -> bytes:
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": descr, "fortran_order": False, "shape": shape}
    )
    return buf.getvalue()


def test_broken_array_files_are_one_line_errors_read_within_bounds(
    server: Any, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """An empty .npy or .npz raised EOFError (a traceback); a header declaring 10**11 floats
    had numpy allocate 400 GB before finding 16 bytes of data (MemoryError); an .npz member that
    is no array came back as raw bytes and was sent as a BYTES tensor. Each is now one line,
    exit 2, and nothing is allocated past what a request carries."""
    import zipfile

    empty_npy, empty_npz = tmp_path / "e.npy", tmp_path / "e.npz"
    empty_npy.write_bytes(b"")
    empty_npz.write_bytes(b"")
    huge = tmp_path / "huge.npy"
    huge.write_bytes(_npy_header((10**11,)) + bytes(16))
    short = tmp_path / "short.npy"
    short.write_bytes(_npy_header((100,)) + bytes(16))
    objects = tmp_path / "objects.npy"
    objects.write_bytes(_npy_header((2,), "|O") + bytes(16))
    huge_member, not_array = tmp_path / "huge.npz", tmp_path / "bytes.npz"
    with zipfile.ZipFile(huge_member, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("input.npy", _npy_header((10**11,)) + bytes(16))
    with zipfile.ZipFile(not_array, "w") as z:
        z.writestr("input.npy", b"hello")
    cases = [
        (empty_npy, "not a .npy array"),
        (empty_npz, "not a zip file"),
        (huge, "more than one request carries"),
        (short, "the file is truncated"),
        (objects, "Python objects"),
        (huge_member, "more than one request carries"),
        (not_array, "not a .npy array"),
        (Path("/dev/null"), "is not a regular file"),  # it was said not to exist
    ]
    t = ("--target", server.target)
    for path, expected in cases:
        for argv in (
            ("infer", "mlp", "-i", str(path)),
            ("loadtest", "mlp", "-n", "2", "--warmup", "0", "--no-progress", "-i", str(path)),
        ):
            code, line = run(capsys, *argv, *t)
            assert code == 2 and expected in line, (argv, line)
    for flag, path in (("--calibration", empty_npz), ("--validation-inputs", huge_member)):
        argv = ("convert", "0" * 32, flag, str(path), "--target", server.management_target)
        code, line = run(capsys, *argv)
        assert code == 2 and flag in line, line
    # The array files that work still do, big-endian and Fortran order included.
    fine = tmp_path / "fine.npz"
    x = np.arange(64, dtype=">f4").reshape(1, 64)
    np.savez(fine, input=x)
    from ferry.client.loadtest import load_inputs

    np.testing.assert_array_equal(load_inputs([str(fine)])["input"], x)
    fortran = tmp_path / "f.npy"
    np.save(fortran, np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3)))
    np.testing.assert_array_equal(
        load_inputs([f"input={fortran}"])["input"], np.arange(6).reshape(2, 3)
    )


def test_a_wait_or_timeout_past_any_deadline_is_a_usage_error(
    server: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """``health --wait 1e20`` overflowed gRPC's deadline: the watch ended at once and this
    serving server was reported UNREACHABLE (exit 3)."""
    t = ("--target", server.target)
    for argv in (("health", "--wait", "1e20"), ("health", "--timeout", "1e20")):
        with pytest.raises(SystemExit) as exited:  # argparse's own refusal
            main([*argv, *t])
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert exited.value.code == 2 and "must be below 1e+09 seconds" in line, (argv, line)
    assert main(["health", "--wait", "1e8", *t]) == 0
    assert capsys.readouterr().out.strip().endswith("SERVING")


def test_what_the_client_refuses_before_sending_exits_2(
    server: Any, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """An array of a dtype the wire lacks, or a model file of no known format, is refused by
    the SDK before anything is sent; it exited 1, which the exit table keeps for the server's
    answers, not 2 (bad usage or files)."""
    complex_input = tmp_path / "c.npy"
    np.save(complex_input, np.zeros((1, 64), np.complex64))
    unknown = tmp_path / "model.weights"
    unknown.write_bytes(b"\x00" * 8)
    cases = [
        (("infer", "mlp", "-i", str(complex_input), "--target", server.target), "complex64"),
        (("upload", "m", str(unknown), "--target", server.management_target), "format"),
    ]
    for argv, expected in cases:
        code, line = run(capsys, *argv)
        assert code == 2 and expected in line, (argv, line)
    # What the server refuses stays exit 1.
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros((1, 3), np.float32))
    code, line = run(capsys, "infer", "mlp", "-i", str(wrong), "--target", server.target)
    assert code == 1 and "INVALID_ARGUMENT" in line, line


def test_an_upload_given_a_timeout_keeps_to_it(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """--timeout was ignored by `ferry upload` and by the waits of `convert` and `jobs wait`
    (they have no deadline by default), so an upload to a server that stopped answering hung
    whatever --timeout said. A listener that accepts and never speaks stands in for it."""
    import socket
    import threading

    model = tmp_path / "m.onnx"
    model.write_bytes(b"\x08\x07")
    codes: list[int] = []
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        argv = ["upload", "m", str(model), "--timeout", "0.5"]
        argv += ["--target", f"127.0.0.1:{silent.getsockname()[1]}"]
        worker = threading.Thread(target=lambda: codes.append(main(argv)), daemon=True)
        worker.start()
        worker.join(120)  # a guard against the hang, not a measurement
    assert codes == [1]
    assert "DEADLINE_EXCEEDED" in capsys.readouterr().err


def test_loadtest_reads_input_files_as_infer_does(
    server: Any, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """`ferry loadtest -i` read its files without the model's metadata: a bare .npy for a
    single-input model was refused ("the model's inputs: []"), and JSON numbers went out as
    INT64/FP64, which the FP32 model refused; `ferry infer -i` takes both."""
    import json

    bare, rows = tmp_path / "x.npy", tmp_path / "rows.json"
    np.save(bare, np.ones((2, 64), np.float32))
    rows.write_text(json.dumps({"input": [[1] * 64, [0.5] * 64]}))
    for path in (bare, rows):
        argv = ["loadtest", "mlp", "-i", str(path), "-n", "3", "--warmup", "0", "--no-progress"]
        assert main([*argv, "--target", server.target, "--json", "-"]) == 0, capsys.readouterr()
        (level,) = json.loads(capsys.readouterr().out)["levels"]
        assert level["ok"] == 3 and level["batch_size"] == 2


@pytest.mark.parametrize("flag", ["--calibration", "--validation-inputs"])
def test_convert_array_files_that_are_no_regular_file_are_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, flag: str
) -> None:
    """`ferry convert --calibration /dev/zero` (or a named pipe nobody writes) read for ever,
    before the command had even connected; it is refused as `ferry infer -i` refuses it."""
    import os
    import threading

    fifo = tmp_path / "samples.npz"
    os.mkfifo(fifo)
    for source in (str(fifo), "/dev/zero"):
        answer: list[tuple[int, str]] = []
        argv = ("convert", "abc", flag, source, "--quantize", "static_int8")
        worker = threading.Thread(
            target=lambda a=answer, v=argv: a.append(run(capsys, *v)), daemon=True
        )
        worker.start()
        worker.join(60)
        if worker.is_alive():  # let the blocked open of the pipe go
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        assert answer, f"{flag} {source} hung"
        code, line = answer[0]
        assert code == 2 and "not a regular file" in line, line


def test_loadtest_with_an_unreadable_tls_file_is_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """`ferry loadtest --tls-ca MISSING` ended in a ValueError traceback (its async client read
    the file at its first call); it is a usage error, as for every other command."""
    missing = str(tmp_path / "missing.pem")
    for argv in (
        ("loadtest", "mlp", "-n", "2", "--no-progress", "--tls-ca", missing),
        ("models", "list", "--tls-ca", missing),
    ):
        code, line = run(capsys, *argv, "--target", "127.0.0.1:1")
        assert code == 2 and "cannot read the CA certificate" in line, (argv, line)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""

    def varint(n: int) -> bytes:
        out = b""
        while n >= 0x80:
            out, n = out + bytes([n & 0x7F | 0x80]), n >> 7
        return out + bytes([n])

    return varint(number << 3 | 2) + varint(len(payload)) + payload


def test_an_onnx_file_nested_past_the_stack_is_sent_not_a_traceback(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """`ferry upload` looks for external-data files in an .onnx by walking its subgraphs; a
    5 KB file nesting graph > node > attribute > graph 600 deep ended the walk, and the
    command, in a RecursionError traceback. Such a file names no data file the client can find:
    it goes as it is, for the server to judge (here: nothing listens, exit 3)."""
    from ferry.client._archive import external_locations

    graph = b""
    for _ in range(600):
        graph = _field(1, _field(5, _field(6, graph)))
    deep = tmp_path / "deep.onnx"
    deep.write_bytes(_field(7, graph))
    assert external_locations(deep) == []
    code, line = run(capsys, "upload", "m", str(deep), "--target", "127.0.0.1:1")
    assert code == 3 and "UNAVAILABLE" in line, line


def test_infer_sends_what_the_server_accepts(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """`ferry infer` refused an input over the SDK's default client limit (80 MiB) itself,
    "over the client's max_message_bytes option (InferenceClient(max_message_bytes=...))",
    which no flag of the command reaches, though the server took 256 MiB: the server's own
    limit (--max-message-bytes) now decides."""
    from serverutil import ServerThread

    from ferry.server.core.repository import ModelRepository
    from ferry.server.examples import identity_model, write_model

    repo = ModelRepository(tmp_path / "repo")
    write_model(repo, "id", identity_model("FP32"))
    big = tmp_path / "big.npy"
    np.save(big, np.ones((1, 21_000_000), np.float32))  # 84 MB, over 80 MiB
    out = tmp_path / "out.npy"
    with ServerThread(repo.root, max_message_bytes=256 << 20) as srv:
        code = main(["infer", "id", "-i", str(big), "-o", str(out), "--target", srv.target])
        _, err = capsys.readouterr()
        assert code == 0, err
    assert np.load(out).shape == (1, 21_000_000)
