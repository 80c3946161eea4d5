"""The process's open-file limit, raised to what the host allows before anything listens.

Every connection, model file, session and conversion pipe is a descriptor. systemd and most
container runtimes start a service with a soft limit of 1,024 (a hard one of 524,288 or more),
and the soft limit is the one enforced: a few hundred idle HTTP keep-alive connections or
perf_analyzer at high concurrency and the next accept, model load or upload failed with EMFILE,
on every listener at once. Raising the soft limit up to the hard one needs no privilege; nginx
(worker_rlimit_nofile), Go since 1.19 and the JVM do it at start for the same reason. Children
(the conversion child, --workers) inherit it.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

# Linux refuses a limit above fs.nr_open (1,048,576 by default), even when the hard limit is
# unlimited.
NR_OPEN = Path("/proc/sys/fs/nr_open")


def raise_open_files_limit() -> tuple[int, int]:
    """Set the soft limit to the hard one (or fs.nr_open when that is unlimited); returns the
    soft limit (before, after). Where the platform has no such limit, or refuses, it stays."""
    try:
        import resource
    except ImportError:  # not POSIX
        return (0, 0)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        try:
            target = int(NR_OPEN.read_text())
        except (OSError, ValueError):
            target = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, target, exc)
            return (soft, soft)
        log.info("open-file limit raised from %d to %d", soft, target)
        return (soft, target)
    return (soft, soft)
