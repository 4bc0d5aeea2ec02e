"""Run a row-chunk task on ``torch.get_num_threads()`` threads.

The native kernels are called through ctypes, which releases the GIL, so plain Python threads
run them in parallel. Chunks are handed out from a shared counter (dynamic scheduling): on a
machine shared with other work a thread that gets descheduled does not hold the others up, as
a static split would. Which thread runs a chunk does not matter for the result: tasks that
accumulate do so into one buffer per *chunk*, summed in chunk order afterwards, so results
are the same bit for bit whatever the thread count or the scheduling.
"""

from __future__ import annotations

import itertools
import math
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

__all__ = ["run_rows", "worker_count"]

_pool_lock = threading.Lock()
_pool: dict[str, object] = {}


def worker_count(work: float, *, min_work_per_thread: float = 2e6) -> int:
    """Threads worth using for ``work`` (about one unit per multiply-add or per element moved):
    below ``min_work_per_thread`` per thread, waking a worker costs more than it saves."""
    return max(1, min(torch.get_num_threads(), int(work // min_work_per_thread)))


def _executor(workers: int) -> ThreadPoolExecutor:
    # A pool inherited through fork has no threads: make a new one in a new process.
    with _pool_lock:
        pool = _pool.get("executor")
        if pool is None or _pool["pid"] != os.getpid() or _pool["workers"] < workers:
            pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lora_optim_kernel")
            _pool.update(executor=pool, pid=os.getpid(), workers=workers)
        return pool  # type: ignore[return-value]


def run_rows(task: Callable[[int, int, int], None], rows: int, chunk_rows: int, threads: int) -> None:
    """Call ``task(chunk, row0, row1)`` for every chunk ``[row0, row1)`` of ``chunk_rows`` rows
    of ``[0, rows)`` (``chunk`` numbers them from 0), on up to ``threads`` threads, the calling
    thread included. Returns when all calls have; re-raises the first error."""
    chunk_rows = max(1, chunk_rows)
    chunks = math.ceil(rows / chunk_rows)
    threads = max(1, min(threads, chunks))
    if threads == 1:
        for chunk in range(chunks):
            task(chunk, chunk * chunk_rows, min(rows, (chunk + 1) * chunk_rows))
        return
    counter = itertools.count()  # next() on it is atomic under the GIL

    def work() -> None:
        while (chunk := next(counter)) < chunks:
            task(chunk, chunk * chunk_rows, min(rows, (chunk + 1) * chunk_rows))

    futures = [_executor(threads - 1).submit(work) for _ in range(1, threads)]
    try:
        work()
    finally:
        for future in futures:
            future.result()
