"""The serving process's two thread pools, shared by every model version.

Threads are bounded by the host, not by the number of models: one version used to own a worker
thread (kept after its first request) and an onnxruntime pool per session, 417 threads at 200
models on 2 cores. Now every version executes its slow batches on one pool sized by the cores
this process may use, and every load runs on a small loader pool whose threads run at a lower
CPU priority (core.priority), so that building sessions yields the cores to requests for the
models already served.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from ferry.server.core import priority
from ferry.server.cpus import usable_cores

__all__ = ["READ_THREADS", "ThreadPools"]

READ_THREADS = 2  # management calls' looks at the repository (ThreadPools.reads)


class ThreadPools:
    """``execution``: batches too slow to run inline on the event loop, from every version.
    ``loading``: opening and warming up sessions, unloading them, at a lower priority.
    ``files``: one thread for reading the repository's folders (a refresh's scan of every
    model), quick work kept off the event loop and out of the loaders' queue. ``reads``: the
    management calls' looks at the repository."""

    def __init__(
        self, execution_threads: int = 0, loader_threads: int = 0, *, cores: int = 0
    ) -> None:
        """``cores``: what this process may use, where the caller has read it already (0: read
        it here; it costs a look at the cgroup's files)."""
        cores = cores or usable_cores()
        self.execution_threads = execution_threads or cores
        self.loader_threads = loader_threads or min(2, cores)
        self.execution = ThreadPoolExecutor(
            max_workers=self.execution_threads, thread_name_prefix="ferry-exec"
        )
        self.loading = ThreadPoolExecutor(
            max_workers=self.loader_threads,
            thread_name_prefix="ferry-load",
            initializer=priority.lower_current_thread,
        )
        priority.start_starter()

        self.files = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ferry-files")
        # Management calls' looks at the repository (an index, a model's versions), apart
        # from a refresh's scan so that one answers while the other runs; few, so that a hung
        # mount holds few threads (registry.read_folder stops waiting on them).
        self.reads = ThreadPoolExecutor(max_workers=READ_THREADS, thread_name_prefix="ferry-reads")

    def shutdown(self) -> None:
        self.execution.shutdown(wait=False, cancel_futures=True)
        self.loading.shutdown(wait=False, cancel_futures=True)
        self.files.shutdown(wait=False, cancel_futures=True)
        self.reads.shutdown(wait=False, cancel_futures=True)
