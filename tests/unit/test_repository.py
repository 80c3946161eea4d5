"""The repository on disk: names can never escape the root, versions appear atomically and are
immutable, and leftovers of a crashed publish are cleaned."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest

from ferry.server.core import repository as repository_module
from ferry.server.core.repository import (
    DELETED_MARK,
    MODEL_FILE,
    TMP_PREFIX,
    ModelRepository,
    read_report,
    validate_model_name,
    validate_version,
    write_file_atomic,
)
from ferry.server.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    LimitExceeded,
    ModelNotFound,
    VersionNotFound,
)


def _publish(repo: ModelRepository, name: str, payload: bytes = b"onnx", **kw: int) -> int:
    with repo.staging(name) as tmp:
        (tmp / MODEL_FILE).write_bytes(payload)
        return repo.publish(name, tmp, **kw)


@pytest.mark.parametrize(
    "name", ["mlp", "a", "Model_1.v2-final", "9lives", "x" * 128, "a..b", "a.", "A-"]
)
def test_valid_names(repo: ModelRepository, name: str) -> None:
    assert validate_model_name(name) == name
    assert repo.model_dir(name) == repo.root / name


@pytest.mark.parametrize(
    "name",
    [
        "",
        ".",
        "..",
        "../x",
        "x/../../etc",
        "a/b",
        "/etc/passwd",
        "/abs",
        "a\x00b",
        "\x00",
        "x" * 129,
        ".hidden",
        "-flag",
        "_private",
        "a b",
        "a\\b",
        "naïve",
        "a\n",
        "~",
    ],
)
def test_invalid_names_are_refused(repo: ModelRepository, name: str) -> None:
    with pytest.raises(InvalidArgument, match="invalid model name"):
        validate_model_name(name)
    with pytest.raises(InvalidArgument):
        repo.model_dir(name)
    with pytest.raises(InvalidArgument):
        repo.model_file(name, 1)


def test_long_names_are_shortened_in_messages() -> None:
    with pytest.raises(InvalidArgument) as info:
        validate_model_name("y" * 10_000)
    assert len(info.value.message) < 300


def test_a_symlinked_model_folder_cannot_lead_outside(
    repo: ModelRepository, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (repo.root / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(InvalidArgument, match="outside the repository"):
        repo.model_dir("link")
    assert "link" not in repo.list_models()


def test_a_model_folder_linked_to_another_is_no_model(repo: ModelRepository) -> None:
    """A link to another model's folder (latest -> resnet) was skipped by the listing yet
    served by a LoadModel until the next refresh unloaded it; edits through it (a deleted
    version, a rollout) changed the model it named."""
    _publish(repo, "resnet")
    (repo.root / "latest").symlink_to(repo.model_dir("resnet"), target_is_directory=True)
    assert repo.list_models() == ["resnet"]
    with pytest.raises(FailedPrecondition, match="'latest' is a symbolic link"):
        repo.has_model("latest")
    with pytest.raises(FailedPrecondition, match="'latest' is a symbolic link"):
        repo.delete_version("latest", 1)
    assert repo.list_versions("resnet") == [1]


@pytest.mark.parametrize("version", [0, -1, True, 2**53 + 1, "1", 1.0])
def test_invalid_versions(version: object) -> None:
    with pytest.raises(InvalidArgument, match=f"invalid version .*from 1 to {2**53}"):
        validate_version(version)  # type: ignore[arg-type]


def test_publish_numbers_versions_in_order(repo: ModelRepository) -> None:
    assert _publish(repo, "m", b"one") == 1
    assert _publish(repo, "m", b"two") == 2
    assert _publish(repo, "m", b"five", version=5) == 5
    assert _publish(repo, "m", b"six") == 6
    assert repo.list_versions("m") == [1, 2, 5, 6]
    assert repo.model_file("m", 2).read_bytes() == b"two"
    # Nothing of the staging is left behind.
    assert sorted(p.name for p in repo.model_dir("m").iterdir()) == ["1", "2", "5", "6"]


def test_versions_are_immutable(repo: ModelRepository) -> None:
    _publish(repo, "m", b"first")
    with pytest.raises(AlreadyExists, match="already exists"):
        _publish(repo, "m", b"second", version=1)
    assert repo.model_file("m", 1).read_bytes() == b"first"
    assert [p.name for p in repo.model_dir("m").iterdir()] == ["1"]


def test_publish_is_a_rename_of_the_complete_folder(repo: ModelRepository) -> None:
    """Until publish, the version folder does not exist; after it, it holds every file."""
    with repo.staging("m") as tmp:
        (tmp / MODEL_FILE).write_bytes(b"weights")
        (tmp / "config.json").write_text("{}")
        assert repo.list_versions("m") == []
        inode = tmp.stat().st_ino
        version = repo.publish("m", tmp)
        assert not tmp.exists()
    vdir = repo.version_dir("m", version)
    assert vdir.stat().st_ino == inode  # the same folder, renamed: never partially visible
    assert sorted(p.name for p in vdir.iterdir()) == ["config.json", MODEL_FILE]


def test_publish_refuses_incomplete_or_foreign_folders(
    repo: ModelRepository, tmp_path: Path
) -> None:
    with repo.staging("m") as tmp, pytest.raises(InvalidArgument, match=f"no {MODEL_FILE}"):
        repo.publish("m", tmp)
    foreign = tmp_path / "elsewhere"
    foreign.mkdir()
    (foreign / MODEL_FILE).write_bytes(b"x")
    with pytest.raises(InvalidArgument, match="staging"):
        repo.publish("m", foreign)
    with repo.staging("other") as tmp:
        (tmp / MODEL_FILE).write_bytes(b"x")
        with pytest.raises(InvalidArgument, match="staging"):
            repo.publish("m", tmp)
    assert repo.list_versions("m") == []


def test_staging_is_removed_when_not_published(repo: ModelRepository) -> None:
    with pytest.raises(RuntimeError), repo.staging("m") as tmp:
        (tmp / MODEL_FILE).write_bytes(b"half")
        raise RuntimeError("export crashed")
    assert not tmp.exists()
    assert list(repo.model_dir("m").iterdir()) == []


@pytest.mark.parametrize(
    ("code", "error", "said"),
    [
        (errno.EACCES, FailedPrecondition, "Permission denied"),
        (errno.EROFS, FailedPrecondition, "Read-only file system"),
        (errno.ENOSPC, LimitExceeded, "disk is full"),
    ],
)
def test_a_staging_folder_the_repository_refuses_says_why(
    repo: ModelRepository,
    monkeypatch: pytest.MonkeyPatch,
    code: int,
    error: type[Exception],
    said: str,
) -> None:
    """A conversion job whose staging folder could not be made (a read-only mount, a
    permission, a full disk, a file where the model's folder goes) failed INTERNAL."""
    (repo.root / "clash").write_bytes(b"not a folder")
    clash = pytest.raises(FailedPrecondition, match="is a file, not a model folder")
    with clash, repo.staging("clash", "job-1"):
        pass

    def refused(self: Path, *args: object, **kwargs: object) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(Path, "mkdir", refused)
    with pytest.raises(error, match=said), repo.staging("m", "job-1"):
        pass


def test_a_named_staging_folder_is_known_before_it_exists(repo: ModelRepository) -> None:
    path = repo.staging_path("m", "job-abc")
    assert path == repo.model_dir("m") / f"{TMP_PREFIX}job-abc" and not path.exists()
    with repo.staging("m", "job-abc") as tmp:
        assert tmp == path and tmp.is_dir()
        with pytest.raises(FailedPrecondition, match="File exists"), repo.staging("m", "job-abc"):
            pass  # a key is used once
        assert tmp.is_dir()  # the refused second use removed nothing
        (tmp / MODEL_FILE).write_bytes(b"x")
        assert repo.publish("m", tmp) == 1
    assert not path.exists() and repo.list_versions("m") == [1]
    for key in ("", "../x", "a/b", ".", "x" * 65, "job\x00"):
        with pytest.raises(InvalidArgument, match="staging key"):
            repo.staging_path("m", key)


def test_listing_skips_junk(repo: ModelRepository) -> None:
    _publish(repo, "m")
    mdir = repo.model_dir("m")
    for junk in ("01", "0", "abc", "1.5", "-3", "²", "\u0661", f"{TMP_PREFIX}x", str(2**53 + 1)):
        (mdir / junk).mkdir()
    (mdir / "7").write_text("a file, not a folder")
    (repo.root / ".tmp-stage").mkdir()
    (repo.root / "stray.txt").write_text("x")
    assert repo.list_versions("m") == [1]
    assert repo.list_models() == ["m"]


def test_list_versions_of_a_missing_model(repo: ModelRepository) -> None:
    with pytest.raises(ModelNotFound):
        repo.list_versions("ghost")
    assert not repo.has_model("ghost")


def test_a_deleted_version_number_is_never_published_again(repo: ModelRepository) -> None:
    """A client that pins version 2 must never be answered by a different model published as
    2 after the first was deleted (versions are immutable artifacts)."""
    assert [_publish(repo, "m") for _ in range(2)] == [1, 2]
    repo.delete_version("m", 2)
    assert _publish(repo, "m") == 3
    repo.delete_version("m", 3)
    repo.delete_version("m", 1)
    assert repo.list_versions("m") == []
    assert _publish(repo, "m") == 4
    assert repo.list_versions("m") == [4]  # the mark is no version folder


def test_a_publish_goes_past_an_entry_named_like_the_next_version(repo: ModelRepository) -> None:
    """A file (or a dangling link) named "2" beside version 1, placed by hand, is no version
    folder, so the next number was 2 again and again: the publish spun for good on a loader
    thread holding the model's lock. It takes the next free number."""
    assert _publish(repo, "m") == 1
    mdir = repo.model_dir("m")
    (mdir / "2").write_text("not a folder")
    (mdir / "3").symlink_to(mdir / "gone")
    done: list[int] = []
    publisher = threading.Thread(target=lambda: done.append(_publish(repo, "m")), daemon=True)
    publisher.start()
    publisher.join(30)
    assert not publisher.is_alive(), "the publish never ended"
    assert done == [4]
    assert (mdir / "2").read_text() == "not a folder"
    assert repo.list_versions("m") == [1, 4]


def test_a_mark_that_is_no_regular_file_is_not_read(repo: ModelRepository) -> None:
    """A FIFO named like the deleted-versions mark blocked the publish for good; a link to
    /dev/zero was read without end. Neither is read: the numbers start from what is on disk."""
    assert _publish(repo, "m") == 1
    mark = repo.model_dir("m") / DELETED_MARK
    os.mkfifo(mark)
    done: list[int] = []
    publisher = threading.Thread(target=lambda: done.append(_publish(repo, "m")), daemon=True)
    publisher.start()
    publisher.join(30)
    if publisher.is_alive():  # without the fix: free the reader, then fail
        os.close(os.open(mark, os.O_WRONLY | os.O_NONBLOCK))
        publisher.join(30)
        pytest.fail("the publish blocked on a FIFO at the deleted-versions mark")
    assert done == [2]
    mark.unlink()
    mark.symlink_to("/dev/zero")
    assert _publish(repo, "m") == 3


def test_delete_version(repo: ModelRepository) -> None:
    _publish(repo, "m", b"one")
    _publish(repo, "m", b"two")
    repo.delete_version("m", 1)
    assert repo.list_versions("m") == [2]
    assert sorted(p.name for p in repo.model_dir("m").iterdir()) == [DELETED_MARK, "2"]
    with pytest.raises(VersionNotFound, match="no version 1"):
        repo.delete_version("m", 1)
    assert _publish(repo, "m", b"three") == 3  # numbers are never reused while 2 exists


def test_deleting_a_version_on_a_full_disk_frees_it_and_keeps_its_number(
    repo: ModelRepository, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DeleteModelVersion on a full repository disk was refused ("free space and try again"):
    the mark of the deleted number was written first and needed room, so no version could be
    deleted to make any. The version's files go first now, and the mark in the room freed."""
    assert [_publish(repo, "m", b"x" * 4096) for _ in range(2)] == [1, 2]
    mdir = repo.model_dir("m")
    write = repository_module.write_file_atomic
    full_for_good = False

    def full_while_2_is_there(path: Path, data: bytes) -> None:
        if full_for_good or (mdir / "2").exists():
            raise OSError(errno.ENOSPC, "No space left on device")
        write(path, data)

    monkeypatch.setattr(repository_module, "write_file_atomic", full_while_2_is_there)
    repo.delete_version("m", 2)
    assert sorted(p.name for p in mdir.iterdir()) == [DELETED_MARK, "1"]
    assert _publish(repo, "m") == 3  # its number is not given again
    # Still full once the files are gone: deleted all the same, and the answer says the mark
    # is missing (not "nothing changed").
    full_for_good = True
    with pytest.raises(LimitExceeded, match="version 3 of 'm' was deleted, but"):
        repo.delete_version("m", 3)
    assert sorted(p.name for p in mdir.iterdir()) == [DELETED_MARK, "1"]


def test_deleting_a_version_folder_that_is_a_link_removes_the_link_only(
    repo: ModelRepository,
) -> None:
    """The link was renamed out of sight and left there (rmtree refuses a link) until a restart
    cleaned it; what it named must stay."""
    _publish(repo, "m", b"one")
    mdir = repo.model_dir("m")
    (mdir / "2").symlink_to(mdir / "1", target_is_directory=True)
    assert repo.list_versions("m") == [1, 2]
    repo.delete_version("m", 2)
    assert sorted(p.name for p in mdir.iterdir()) == [DELETED_MARK, "1"]
    assert (mdir / "1" / MODEL_FILE).read_bytes() == b"one"


def test_clean_temporaries_removes_leftovers_only(repo: ModelRepository) -> None:
    _publish(repo, "m")
    mdir = repo.model_dir("m")
    stale_dir = mdir / f"{TMP_PREFIX}abc123"
    stale_dir.mkdir()
    (stale_dir / MODEL_FILE).write_bytes(b"half written")
    stale_file = mdir / f"{TMP_PREFIX}config.json-999"  # write_file_atomic's temporary
    stale_file.write_text("{")
    removed = repo.clean_temporaries()
    assert sorted(removed) == sorted([stale_dir, stale_file])
    assert not stale_dir.exists()
    assert not stale_file.exists()
    assert repo.list_versions("m") == [1]
    assert repo.model_file("m", 1).exists()


def test_clean_temporaries_on_a_read_only_mount_does_not_stop_the_start(
    repo: ModelRepository, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Serving replicas mount a shared repository read-only (docs/deployment.md): a temporary
    the writer is making at that moment cannot be removed, and must not fail the start. (Root
    ignores file modes, so the read-only file system is simulated.)"""
    import errno

    _publish(repo, "m")
    stale_file = repo.model_dir("m") / f"{TMP_PREFIX}config.toml-42"
    stale_file.write_text("[")

    def read_only(self: Path, missing_ok: bool = False) -> None:
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "unlink", read_only)
    repo.clean_temporaries()
    assert stale_file.exists()
    assert repo.list_versions("m") == [1]


def test_clean_temporaries_skips_a_model_folder_it_cannot_read(
    repo: ModelRepository, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model folder the server's user cannot list (another user's, mode 0700; a stale
    network mount) raised PermissionError out of the start-up clean-up: the server did not
    start, though the refresh after it fails that model alone. (Root reads anything: the
    listing is made to fail.)"""
    _publish(repo, "locked")
    _publish(repo, "open")
    stale = repo.model_dir("open") / f"{TMP_PREFIX}abc"
    stale.mkdir()
    listed = Path.iterdir

    def iterdir(self: Path) -> object:
        if self.name == "locked":
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return listed(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    assert repo.clean_temporaries() == [stale]
    assert not stale.exists()


def test_write_file_atomic_never_shares_a_temporary_with_another_writer(
    repo: ModelRepository,
) -> None:
    """The temporary was named by the pid alone: a writer with the same pid (another replica
    in its container, pid 1 too, sharing the repository) opened the same file, truncating the
    other's, blocked on its lock, then wrote into the live file in place once the other had
    renamed it, and failed its own rename with FileNotFoundError (INTERNAL)."""
    import fcntl

    target = repo.root / "config.json"
    theirs = repo.root / f"{TMP_PREFIX}config.json-{os.getpid()}"  # the other writer's
    with open(theirs, "wb") as held:
        held.write(b"the other writer's bytes")
        held.flush()
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        writer = threading.Thread(target=write_file_atomic, args=(target, b"{}"), daemon=True)
        writer.start()
        writer.join(30)
        blocked = writer.is_alive()
    writer.join(30)
    assert not blocked, "the write waited on another writer's temporary"
    assert target.read_bytes() == b"{}"
    assert theirs.read_bytes() == b"the other writer's bytes"


def test_write_file_atomic(repo: ModelRepository) -> None:
    target = repo.root / "config.json"
    write_file_atomic(target, b'{"a": 1}')
    write_file_atomic(target, b'{"a": 2}')
    assert target.read_bytes() == b'{"a": 2}'
    assert [p.name for p in repo.root.iterdir()] == ["config.json"]


def test_root_must_be_a_folder(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(InvalidArgument, match="not a folder"):
        ModelRepository(f)
    with pytest.raises(InvalidArgument):
        ModelRepository(tmp_path / "missing", create=False)
    assert ModelRepository(tmp_path / "made").root.is_dir()


def test_a_report_nested_past_the_json_parser_reads_as_none(tmp_path: Path) -> None:
    """It raised RecursionError through GetModel and SetDefaultVersion: INTERNAL for the whole
    model, for one file in one version folder."""
    (tmp_path / "report.json").write_text('{"a": ' + "[" * 200_000 + "]" * 200_000 + "}")
    assert read_report(tmp_path) == ""
    (tmp_path / "report.json").write_text('{"published": "fp32"}')
    assert read_report(tmp_path) == '{"published": "fp32"}'
