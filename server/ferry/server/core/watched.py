"""The files of a version folder that a refresh watches for a change, read by stat alone.

A model reads more than ``model.onnx``: its external data may sit under any name, in a
subfolder (``onnx.save(..., location="weights/w.bin")``), or behind a link into a volume
mount. Only the version folder's own files were watched, so weights replaced in a subfolder
were never reloaded and the old ones kept answering. Every file under the version folder now
counts, links followed (what a link names is what onnxruntime reads), up to ``MAX_WATCHED``
entries so that a poll of a huge tree stays bounded.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
from pathlib import Path

# The most entries (files and folders) of a version folder a refresh looks at beyond its own
# files: a torch export's per-tensor weights run to hundreds. Past it, a change is seen only
# in the entries walked before.
MAX_WATCHED = 4096


def _kernel_devices() -> frozenset[int]:
    """The devices of /proc and /sys: their entries (processes, their files, counters) come and
    go on their own and hold no model file, so a link into them reloaded the version at every
    poll. Such a folder counts as an entry (its link text too), its contents do not."""
    devices = set()
    for root in ("/proc", "/sys"):
        with contextlib.suppress(OSError):
            devices.add(os.stat(root).st_dev)
    return frozenset(devices)


_KERNEL_DEVICES = _kernel_devices()


def file_signature(path: Path | str) -> tuple[int, int, int, int] | None:
    """What a refresh compares to see that a file changed, without reading it (a model's
    weights run to GBs, read at every poll): (mtime, size) alone missed a file replaced by one
    of the same size and time (``cp -p``, ``rsync -t``, a model retrained with the same
    architecture), and the old weights kept answering. The inode changes when a file is
    renamed over it, and the change time when it is written in place; neither can be set back
    by ``utime``. A chmod also changes the change time: one needless reload, never a missed one.
    Links are followed: a replaced target is a change."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_ctime_ns)


def tree_signature(vdir: Path) -> tuple[int, str] | None:
    """Every entry under ``vdir`` but hidden ones, by relative path, link target and
    ``file_signature``, as (entries walked, digest); None when ``vdir`` cannot be listed.

    A hidden entry is left out at any depth: an rsync's temporary copy (``.w.bin.XyZ12``)
    grows at each poll, and the version was reloaded each time from the files as they were
    before the copy. A digest, not the list: the signature is compared at every shadowed
    request (the comparison's key) and sent between worker processes."""
    digest = hashlib.blake2b(digest_size=16)
    try:
        root = os.stat(vdir)
    except OSError:
        return None
    # Folders already walked, by identity: a link back up the tree (weights -> .) is walked
    # once, not until the path is too long.
    seen = {(root.st_dev, root.st_ino)}
    pending = [""]
    walked = 0
    while pending and walked < MAX_WATCHED:
        rel = pending.pop()
        try:
            with os.scandir(vdir / rel if rel else vdir) as it:
                names = sorted(e.name for e in it if not e.name.startswith("."))
        except OSError:
            if not rel:
                return None
            digest.update(repr((rel, "unreadable")).encode("utf-8", "backslashreplace"))
            continue
        folders = []
        for name in names:
            if walked >= MAX_WATCHED:
                break
            walked += 1
            path = os.path.join(vdir, rel, name)
            sub = os.path.join(rel, name)
            try:
                link = os.readlink(path)  # a link swapped to another target is a change
            except OSError:
                link = None  # not a link
            try:
                st = os.stat(path)
            except OSError:
                st = None  # a link to nothing: said as such, and its target appearing is a change
            if st is not None and stat.S_ISDIR(st.st_mode):
                digest.update(repr((sub, link, "folder")).encode("utf-8", "backslashreplace"))
                if st.st_dev not in _KERNEL_DEVICES and (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    folders.append(sub)
                continue
            sig = None if st is None else (st.st_mtime_ns, st.st_size, st.st_ino, st.st_ctime_ns)
            digest.update(repr((sub, link, sig)).encode("utf-8", "backslashreplace"))
        pending.extend(reversed(folders))  # depth first, in name order
    return (walked, digest.hexdigest())
