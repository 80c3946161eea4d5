"""The model repository on disk: ``<root>/<model>/<version>/model.onnx`` plus ``<model>/config.*``.

This is the only module that turns names into paths. Every name is validated against one pattern
and every path is resolved and checked to stay under the root, so no request can read or write
outside the repository. Versions are positive integers and immutable: a version folder appears by
an atomic rename of a fully written, fsynced temporary folder, and is never rewritten.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ferry.server.core.types import MAX_VERSION, short
from ferry.server.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    LimitExceeded,
    ModelNotFound,
    VersionNotFound,
)

MODEL_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
# The gRPC services Ferry serves, on either listener. grpc.health.v1 answers a Check by one name
# for a model and for a service alike: a model named like a service shared that name's status
# (the service's overwrote the model's), so a probe of the model read the replica's state. Such
# a name is refused as a model's, and such a folder is not served.
SERVICE_NAMES = frozenset(
    {
        "ferry.v1.Inference",
        "ferry.v1.ModelRepository",
        "ferry.v1.ModelConversion",
        "inference.GRPCInferenceService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
)
VERSION_RE = re.compile(r"[1-9][0-9]*")
MODEL_FILE = "model.onnx"
# A model over 2 GiB keeps its weights beside model.onnx (ONNX external data), in this one file;
# onnxruntime resolves it relative to model.onnx and refuses paths leaving the version folder.
MODEL_DATA_FILE = "model.onnx.data"
REPORT_FILE = "report.json"  # the conversion report published beside the model
VERSION_CONFIG_FILE = "config.json"  # a version's own serving config (overrides the model's)
MAX_REPORT_BYTES = 16 << 20
TMP_PREFIX = ".tmp-"
UNREADABLE = "cannot be read"  # how a folder the server cannot list is said (list_versions)
_STAGING_KEY = re.compile(r"[A-Za-z0-9_-]{1,64}")
# The highest version number Ferry has deleted from a model: the next publish goes above it.
# A number is never reused: a client that pins version 4 must never be answered by another
# model published as 4 after the first was deleted.
DELETED_MARK = ".deleted-versions"
MARK_BYTES = 64  # the mark holds one version number

log = logging.getLogger(__name__)


def validate_model_name(name: str) -> str:
    if not isinstance(name, str) or not MODEL_NAME_RE.fullmatch(name) or name in (".", ".."):
        shown = name if len(name) <= 64 else name[:64] + "..."
        raise InvalidArgument(
            f"invalid model name {shown!r}: use 1-128 characters from [A-Za-z0-9_.-], "
            "starting with a letter or digit"
        )
    if name in SERVICE_NAMES:
        raise InvalidArgument(
            f"invalid model name {name!r}: it is the name of a gRPC service Ferry serves, and a "
            f"grpc.health.v1 check of {name!r} answers for that service; choose another name"
        )
    return name


def validate_version(version: int) -> int:
    if isinstance(version, bool) or not isinstance(version, int) or not 0 < version <= MAX_VERSION:
        # The bound is said: 2**53 + 1 was refused as not "a positive integer", which it is.
        raise InvalidArgument(
            f"invalid version {version!r}: versions are integers from 1 to {MAX_VERSION}"
        )
    return version


class ModelRepository:
    def __init__(self, root: str | os.PathLike[str], *, create: bool = True) -> None:
        path = Path(root)
        if create and not path.exists():
            path.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            raise InvalidArgument(
                f"model repository {str(path)!r} does not exist: check the path, or pass "
                "--create-repository (FERRY_CREATE_REPOSITORY=1) to start with an empty one"
            )
        if not path.is_dir():
            raise InvalidArgument(f"model repository {str(path)!r} is not a folder")
        # Absolute, not resolved: a repository that is a link swapped to a new tree (git-sync,
        # a release folder switched by `ln -sfn`) is read through the link at each look. Resolved
        # once, the server kept reading the tree it started on: a refresh saw none of the new
        # models, and once the old tree was removed every Refresh answered INTERNAL.
        self.root = Path(os.path.abspath(path))

    # ---- names -> paths (the one place) ----
    def model_dir(self, name: str) -> Path:
        validate_model_name(name)
        root = self.root.resolve()  # the tree the root names now
        path = (root / name).resolve()
        if path.parent != root:
            raise InvalidArgument(f"model name {name!r} resolves outside the repository")
        if (root / name).is_symlink():
            # A link to another model's folder (latest -> resnet): list_models skips it, so a
            # LoadModel of it served it until the next refresh unloaded it again, and every
            # edit made through it (a deleted version, a rollout) changed the other model.
            raise FailedPrecondition(_linked_model(name))
        return path

    def version_dir(self, name: str, version: int) -> Path:
        return self.model_dir(name) / str(validate_version(version))

    def model_file(self, name: str, version: int) -> Path:
        return self.version_dir(name, version) / MODEL_FILE

    # ---- listing ----
    def list_models(self) -> list[str]:
        """Folders whose names are valid model names; others (temp folders, junk) are skipped."""
        names = []
        try:
            entries = sorted(self.root.iterdir())
        except OSError as exc:
            # Gone or unreadable (a link to a removed tree, an unmounted volume): the refresh
            # is refused and what is loaded keeps serving, rather than INTERNAL.
            raise FailedPrecondition(
                f"model repository {str(self.root)!r} cannot be read ({exc.strerror or exc}): "
                "what is loaded keeps serving; restore the folder and refresh again"
            ) from None
        for entry in entries:
            if (
                entry.is_dir()
                and not entry.is_symlink()
                and MODEL_NAME_RE.fullmatch(entry.name)
                and entry.name not in SERVICE_NAMES
            ):
                names.append(entry.name)
        return names

    def misplaced_model_files(self) -> list[str]:
        """What looks like a model but is not where one is served from, each as one line.

        A ``model.onnx`` at the repository's top, or directly in a model's folder instead of a
        version folder, is served by nobody, and nothing said so: with KServe, a storageUri that
        names a model file or a model's folder (rather than the repository) gave a pod that
        never turned ready with an empty log."""
        layout = f"a repository holds <model>/<version>/{MODEL_FILE}"
        found = []
        if (self.root / MODEL_FILE).is_file():
            found.append(
                f"model repository {str(self.root)!r} has {MODEL_FILE} at its top, which is not "
                f"served: {layout} (point --repository, or KServe's storageUri, at the folder "
                "that holds the model folders)"
            )
        for name in self.list_models():
            with contextlib.suppress(OSError):
                if not (self.model_dir(name) / MODEL_FILE).is_file():
                    continue
                if VERSION_RE.fullmatch(name):
                    found.append(
                        f"folder {name!r} at the top of model repository {str(self.root)!r} "
                        f"holds {MODEL_FILE} like a version folder, which is not served: "
                        "--repository (or KServe's storageUri) names a model's folder; point "
                        f"it at the folder above, which holds the model folders ({layout})"
                    )
                else:
                    found.append(
                        f"model {name!r} has {MODEL_FILE} directly in its folder, which is not "
                        f"served: move it to a version folder, {name}/1/{MODEL_FILE} ({layout})"
                    )
        return found + self._unserved_folders(layout)

    def _unserved_folders(self, layout: str) -> list[str]:
        """Folders that hold a model but are skipped by their name or kind, each as one line: a
        Triton repository's model named "text encoder" or "bert@2", a model folder that is a
        link, a version folder named "v2" or "01" served nothing, and nothing said why."""
        found = []
        with contextlib.suppress(OSError):
            for entry in sorted(self.root.iterdir()):
                if entry.name.startswith(".") or not _holds_version(entry):
                    continue
                if entry.is_symlink():
                    found.append(f"{_linked_model(entry.name)} ({layout})")
                elif not MODEL_NAME_RE.fullmatch(entry.name):
                    found.append(
                        f"folder {short(entry.name)!r} holds a model but is not a valid model "
                        "name, so it is not served: rename it to 1-128 characters from "
                        f"[A-Za-z0-9_.-], starting with a letter or digit ({layout})"
                    )
                elif entry.name in SERVICE_NAMES:
                    found.append(
                        f"folder {entry.name!r} holds a model but is named like a gRPC service "
                        "Ferry serves (its grpc.health.v1 status is the service's), so it is not "
                        f"served: rename it ({layout})"
                    )
        for name in self.list_models():
            with contextlib.suppress(OSError):
                for entry in sorted(self.model_dir(name).iterdir()):
                    if entry.name.startswith(".") or not (entry / MODEL_FILE).is_file():
                        continue
                    if not VERSION_RE.fullmatch(entry.name) or int(entry.name) > MAX_VERSION:
                        found.append(
                            f"model {name!r} has {MODEL_FILE} in folder "
                            f"{short(entry.name)!r}, which is not a version folder and is "
                            f"not served: versions are named 1, 2, ... (ASCII digits, no leading "
                            f"zero, at most {MAX_VERSION}) ({layout})"
                        )
        return found

    def has_model(self, name: str) -> bool:
        return self.model_dir(name).is_dir()

    def list_versions(self, name: str) -> list[int]:
        mdir = self.model_dir(name)
        if not mdir.is_dir():
            raise ModelNotFound(f"model {name!r} is not in the repository")
        versions = []
        try:
            entries = list(mdir.iterdir())
        except OSError as exc:
            # Another user's folder (mode 0700), a stale mount: the model's state, said as
            # such, not INTERNAL (and a refresh fails this model alone: core.scan._scan).
            raise FailedPrecondition(
                f"the folder of model {name!r} {UNREADABLE} ({exc.strerror or exc}): give the "
                "server's user read and search permission on it"
            ) from None
        for entry in entries:
            # ASCII digits only: str.isdigit() also accepts "²" (which int() rejects) and other
            # scripts' digits, and one junk folder must not break the scan of every model.
            if entry.is_dir() and VERSION_RE.fullmatch(entry.name):
                v = int(entry.name)
                if v <= MAX_VERSION:
                    versions.append(v)
        return sorted(versions)

    def require_version(self, name: str, version: int) -> Path:
        vdir = self.version_dir(name, version)
        if not vdir.is_dir():
            raise VersionNotFound(f"model {name!r} has no version {version} in the repository")
        return vdir

    # ---- atomic publication ----
    def staging_path(self, name: str, key: str) -> Path:
        """Where ``staging(name, key)`` will stage, decided before the folder exists: a job's
        contract names its staging folder when the job is queued, the folder is made when it
        runs. The prefix keeps it out of every listing and lets a restart remove it."""
        if not _STAGING_KEY.fullmatch(key):
            raise InvalidArgument(f"invalid staging key {key[:80]!r}: use [A-Za-z0-9_-]{{1,64}}")
        return self.model_dir(name) / f"{TMP_PREFIX}{key}"

    @contextmanager
    def staging(self, name: str, key: str = "") -> Iterator[Path]:
        """A temporary folder inside the model folder (same filesystem, so rename is atomic);
        removed on any exit unless ``publish`` moved it. With a ``key`` it is
        ``staging_path(name, key)``, which must not exist yet; without one a fresh name."""
        mdir = self.model_dir(name)
        # A file put where the model's folder goes (after the job was queued), a folder that
        # cannot be written: the job failed INTERNAL with the OSError's traceback.
        if mdir.exists() and not mdir.is_dir():
            raise FailedPrecondition(
                f"{name} in the model repository is a file, not a model folder: move that file "
                "away, or convert into another model name"
            )
        with repository_edit(f"the staging folder of model {name!r}"):
            mdir.mkdir(exist_ok=True)
            if key:
                tmp = self.staging_path(name, key)
                tmp.mkdir(mode=0o700)
            else:
                tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=mdir))
        # Held while staging: another process's clean-up skips a folder a live writer holds
        # (the lock goes with the process, even a SIGKILLed one, so a dead writer's is taken).
        lock = os.open(tmp, os.O_RDONLY)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield tmp
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
            os.close(lock)

    def publish(self, name: str, staged: Path, *, version: int | None = None) -> int:
        """Fsync every file of ``staged`` and rename it to the next version (or ``version``).

        The rename is the commit point: a reader sees either no folder or a complete one."""
        mdir = self.model_dir(name)
        if staged.resolve().parent != mdir:
            raise InvalidArgument("staged folder must come from staging() of the same model")
        if not (staged / MODEL_FILE).is_file():
            raise InvalidArgument(f"staged version of {name!r} has no {MODEL_FILE}")
        _fsync_tree(staged)
        # The highest number found held by something else: a version another publisher made
        # meanwhile, or an entry named like a version that is none (a file "5", a dangling
        # link) which list_versions skips. Without it the same number was tried again for good:
        # the publish spun on a loader thread, holding the model's lock, and the job ran forever.
        taken = 0
        while True:
            existing = self.list_versions(name)
            highest = max(max(existing, default=0), self._highest_deleted(mdir), taken)
            target_version = version if version is not None else highest + 1
            target = mdir / str(validate_version(target_version))
            try:
                # os.rename onto an existing non-empty dir fails, which is what we want.
                if target.exists() or target.is_symlink():
                    raise FileExistsError(target)
                os.rename(staged, target)
            except FileExistsError:
                if version is not None:
                    raise AlreadyExists(
                        f"model {name!r} version {version} already exists; versions are immutable"
                    ) from None
                taken = target_version  # lost a race, or held by a file: take the next number
                continue
            except OSError as exc:
                if exc.errno in (errno.ENOTEMPTY, 66, errno.ENOTDIR):  # 66: BSD's ENOTEMPTY
                    if version is not None:
                        raise AlreadyExists(
                            f"model {name!r} version {version} already exists"
                        ) from None
                    taken = target_version
                    continue
                raise
            _fsync_dir(mdir)
            return target_version

    def delete_version(self, name: str, version: int) -> None:
        """Move the version out of sight atomically, then remove it. Its number is recorded
        first (DELETED_MARK), so that no later publish takes it."""
        vdir = self.require_version(name, version)
        mark = max(version, self._highest_deleted(vdir.parent))
        # A full disk, which deleting a version is there to fix, must not refuse the delete (no
        # version could then be deleted through Ferry to make room): the mark is written again
        # once the version's files are gone (a publish cannot come in between: both hold the
        # model's edit lock).
        marked = _write_mark(vdir.parent, mark)
        trash = vdir.with_name(f"{TMP_PREFIX}deleted-{version}-{os.getpid()}")
        os.rename(vdir, trash)
        _fsync_dir(vdir.parent)
        if trash.is_symlink():
            # A version folder that is a link (3 -> 2): the link goes, not what it names. rmtree
            # refuses a link, and the renamed one stayed in the model's folder until a restart.
            trash.unlink()
        else:
            shutil.rmtree(trash, ignore_errors=True)
        if not marked and not _write_mark(vdir.parent, mark):
            raise LimitExceeded(
                f"the model repository's disk is full: version {version} of {name!r} was "
                f"deleted, but {name}/{DELETED_MARK} (which keeps its number from being "
                "given to the next publish) could not be written: free space on that disk "
                "before converting this model again"
            )

    @staticmethod
    def _highest_deleted(mdir: Path) -> int:
        """The mark, read only from a regular file and only as far as a number goes: a FIFO
        named like it blocked the publish (and the event loop's executor) for good, and a link
        to /dev/zero was read without end."""
        try:
            text = read_head(mdir / DELETED_MARK, MARK_BYTES).decode("ascii").strip()
        except (OSError, UnicodeDecodeError):
            return 0
        return int(text) if VERSION_RE.fullmatch(text) and int(text) <= MAX_VERSION else 0

    def clean_temporaries(self) -> list[Path]:
        """Remove staging folders and temporary files left by a process that died mid-write.
        One a live writer holds (its flock: another worker, a replica, a publisher sharing the
        repository) is not touched."""
        removed: list[Path] = []
        for model in self.list_models():
            before = len(removed)
            try:
                entries = list(self.model_dir(model).iterdir())
            except OSError as exc:
                # Another user's folder (mode 0700), a stale mount: it stopped the start with a
                # traceback, though the refresh after this fails that model alone, saying why.
                log.warning("model folder %s not cleaned: %s", model, exc.strerror or exc)
                continue
            for entry in entries:
                if entry.name.startswith(TMP_PREFIX) and not _held(entry):
                    # write_file_atomic leaves files, staging() folders; rmtree ignores files.
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.rmtree(entry, ignore_errors=True)
                    else:
                        # A read-only mount (serving replicas of a shared repository): the
                        # file is the writer's, and must not stop this replica's start.
                        with contextlib.suppress(OSError):
                            entry.unlink(missing_ok=True)
                    removed.append(entry)
            mdir = self.model_dir(model)
            if len(removed) > before and not any(mdir.iterdir()):
                # Only a temporary was there: a first publish died; leave no empty model.
                with contextlib.suppress(OSError):
                    mdir.rmdir()
        return removed


def _linked_model(name: str) -> str:
    """Why a model folder that is a symbolic link is not served (model_dir refuses it, and a
    layout check lists it)."""
    return (
        f"model folder {name!r} is a symbolic link, which is not served: move (or copy) the "
        "folder itself into the repository"
    )


def _write_mark(mdir: Path, mark: int) -> bool:
    """Write ``mark`` as the model's DELETED_MARK; False (nothing written) when the disk is
    full, any other failure raised."""
    try:
        write_file_atomic(mdir / DELETED_MARK, f"{mark}\n".encode())
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        return False
    return True


def _holds_version(folder: Path) -> bool:
    """Does ``folder`` hold ``<something>/model.onnx`` (a model's folder, by its look)?"""
    with contextlib.suppress(OSError):
        return folder.is_dir() and any((v / MODEL_FILE).is_file() for v in folder.iterdir())
    return False


def _held(path: Path) -> bool:
    """Is a live process still writing ``path`` (a staging folder or a file being written
    atomically)? Its writer holds an flock on it until done."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except OSError:  # gone, a symlink, unreadable: nobody's live write
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # releases the lock this probe took, if it took it
    return False


def read_head(path: Path, limit: int) -> bytes:
    """At most ``limit`` bytes of ``path`` (links followed), which must be a regular file. It
    is opened without blocking and judged on the open file: a FIFO there held its reader until
    a writer came, and a link to /dev/zero was read without end. A folder raises
    IsADirectoryError, anything else that is not a regular file OSError(EINVAL, "not a regular
    file"), a missing file (or a dangling link) FileNotFoundError."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with open(fd, "rb") as f:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, "Is a directory", str(path))
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        return f.read(limit)


def write_file_atomic(path: Path, data: bytes) -> None:
    """Write-then-rename for single files (configs, reports). A folder where the file goes
    (``mkdir rollout.json`` by mistake) is the caller's FAILED_PRECONDITION, saying which: it
    was an INTERNAL error with a traceback (SetRollout, DeleteModelVersion)."""
    # Unique, not the pid alone: two writers of one file with the same pid (replicas in
    # containers, each pid 1, sharing the repository) opened one temporary, the second
    # truncating the first's and, once the first renamed it, writing into the live file in
    # place, then failing its own rename (INTERNAL). "x": never another writer's file.
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}-{os.getpid()}-{secrets.token_hex(4)}")
    fh = open(tmp, "xb")  # noqa: SIM115 - outside the try: failing, nothing here is ours
    try:
        with fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)  # a live write: see _held
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.replace(tmp, path)
        except IsADirectoryError:
            raise FailedPrecondition(folder_in_place(path)) from None
    except BaseException:
        # A write that failed (a full disk) left its partial temporary file beside the model's
        # files until a restart, one more on each try.
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


@contextmanager
def repository_edit(what: str) -> Iterator[None]:
    """A management edit's write to the repository (``what``: the file, for the message) that
    failed on the disk: a full disk is RESOURCE_EXHAUSTED, a folder that cannot be written (a
    read-only mount, permissions) FAILED_PRECONDITION, both saying nothing changed. Both were
    INTERNAL, blaming the server's code for the operator's disk."""
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise LimitExceeded(
                f"the model repository's disk is full: {what} was not written, nothing "
                "changed; free space on that disk and try again"
            ) from None
        raise FailedPrecondition(
            f"{what} could not be written ({exc.strerror or exc}), nothing changed; check the "
            "model repository's folder (permissions, a read-only mount) and try again"
        ) from None


def folder_in_place(path: Path) -> str:
    """The message for a folder found where Ferry keeps one of its files."""
    return (
        f"{path.parent.name}/{path.name} is a folder where Ferry keeps a file: remove it (or "
        "move it away) and try again"
    )


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(root):
        for fname in filenames:
            fd = os.open(os.path.join(dirpath, fname), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_report(folder: Path) -> str:
    """report.json as text when it is a JSON object of sane size, else ''."""
    path = folder / REPORT_FILE
    try:
        if not path.is_file() or path.stat().st_size > MAX_REPORT_BYTES:
            return ""
        text = path.read_text(encoding="utf-8")
        if isinstance(json.loads(text), dict):
            return text
    except (OSError, ValueError, RecursionError) as exc:
        # RecursionError: JSON nested past the parser's guard, which failed GetModel (and
        # SetDefaultVersion) of the whole model as INTERNAL for one hand-placed file.
        log.warning("unreadable %s: %s", path, exc)
    return ""
