"""Run a kernel's chunk ranges on a pool of Python threads.

Every kernel over X takes a range of row chunks (see
:mod:`fastem._kernels._blocks`) and writes each chunk's partial sums to that
chunk's own slot; the caller reduces the slots in chunk order. Splitting the
chunks among threads therefore changes who computes a chunk, never what is
computed, and results are bit-identical for any thread count.

The kernels are serial Numba functions compiled with ``nogil=True``, and the
parallelism is this module's: a few threads that each call the kernel once on
a contiguous range of chunks. Numba's own ``parallel=True`` would compile a
second, larger version of every kernel (measured: 65 of the 140 s a cold first
session spent compiling), and its default threading layer here, GNU OpenMP,
is not safe in a child process forked after a parallel kernel ran.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import contextvars
import functools
import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

# Below this much work (rows x the per-row cost) a call runs in the calling
# thread: handing ranges to other threads costs tens of microseconds.
SERIAL_WORK = 1_000_000
# Work of one kernel call at most, in the same units (about 0.2 s here): the
# longest a pass keeps Ctrl-C waiting.
INTERRUPT_WORK = 2_000_000_000

_limit: contextvars.ContextVar[int | None] = contextvars.ContextVar("fastem_threads",
                                                                    default=None)


def default_threads() -> int:
    """Threads used when nothing caps them: ``FASTEM_NUM_THREADS``, else the
    number of CPUs this process may run on."""
    configured = os.environ.get("FASTEM_NUM_THREADS", "").strip()
    if configured:
        try:
            return max(1, int(configured))
        except ValueError:
            pass
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def n_threads() -> int:
    """Threads the kernels may use here (the innermost :func:`limit`, else the
    default; 1 inside this module's own pool threads, which never wait on the pool)."""
    if threading.current_thread().name.startswith(_PREFIX):
        return 1
    capped = _limit.get()
    return default_threads() if capped is None else capped


@contextlib.contextmanager
def limit(threads: int | None):
    """Run the enclosed kernels on at most ``threads`` threads (None: no cap).

    A context variable, so concurrent estimators in other threads keep their own caps.
    """
    if threads is None:
        yield
        return
    token = _limit.set(max(1, int(threads)))
    try:
        yield
    finally:
        _limit.reset(token)


_PREFIX = "fastem-worker"


@functools.cache
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(workers, thread_name_prefix=_PREFIX)


# A forked child inherits the pools but not their threads: give it fresh ones.
os.register_at_fork(after_in_child=_pool.cache_clear)


# Ctrl-C while compiled code runs is noted here and raised at the next safe
# point (see deferred_interrupts); None outside it.
_interrupts: list | None = None


@contextlib.contextmanager
def deferred_interrupts():
    """Deliver Ctrl-C as ``KeyboardInterrupt`` at safe points only.

    Python runs a pending SIGINT handler at the next bytecode, and after a
    compiled kernel that is often inside Numba's conversion of the arrays it
    returns (``numba.core.serialize._numba_unpickle``), which turns the
    ``KeyboardInterrupt`` into a ``SystemError`` or worse. Inside this context
    (entered by the estimators' public methods, in the main thread, when
    SIGINT has Python's default handler) the handler only records the
    interrupt; :func:`check_interrupt`, called between kernel calls, EM
    iterations and grid cells, raises it, and so does leaving the context.
    Nested uses share the outermost one.
    """
    global _interrupts
    if (_interrupts is not None or threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    pending: list = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pending.append(signum))
    _interrupts = pending
    try:
        yield
    finally:
        _interrupts = None
        signal.signal(signal.SIGINT, previous)
    if pending:
        raise KeyboardInterrupt


def interruptible(function):
    """``function`` run inside :func:`deferred_interrupts` (a decorator)."""
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with deferred_interrupts():
            return function(*args, **kwargs)
    return wrapper


def check_interrupt() -> None:
    """Raise ``KeyboardInterrupt`` if Ctrl-C was pressed inside
    :func:`deferred_interrupts` (a safe point: no kernel is returning)."""
    if _interrupts:
        _interrupts.clear()
        raise KeyboardInterrupt


def run_chunks(kernel, n_chunks: int, work: float, *args) -> None:
    """``kernel(first, last, *args)`` over contiguous ranges covering ``[0, n_chunks)``.

    The calling thread runs the last range itself. Small work (below
    ``SERIAL_WORK``) runs as one call in the calling thread. Large work is
    cut into calls of about ``INTERRUPT_WORK`` each, so that Ctrl-C (which
    Python delivers between calls, never inside compiled code) interrupts a
    pass within a fraction of a second; the other threads then stop at their
    next call.
    """
    threads = min(n_threads(), n_chunks)
    pieces = max(1, min(n_chunks, int(work // INTERRUPT_WORK)))
    if threads < 2 or work < SERIAL_WORK:
        _run_range(kernel, 0, n_chunks, pieces, None, args)
        return
    bounds = [(t * n_chunks) // threads for t in range(threads + 1)]
    per_thread = -(-pieces // threads)
    stop = threading.Event()
    pool = _pool(threads - 1)
    futures = [pool.submit(_run_range, kernel, bounds[t], bounds[t + 1], per_thread, stop, args)
               for t in range(threads - 1)]
    try:
        _run_range(kernel, bounds[-2], bounds[-1], per_thread, None, args)
        for future in futures:
            future.result()
    except BaseException:
        # Interrupted (or failed): the other threads stop at their next call
        # and are waited for, so nothing writes the arrays once we return.
        stop.set()
        concurrent.futures.wait(futures)
        raise


def _run_range(kernel, first: int, last: int, pieces: int, stop, args) -> None:
    """``kernel`` over chunks ``[first, last)`` in ``pieces`` calls (fewer if
    ``stop`` is set meanwhile: the pass is being abandoned)."""
    pieces = max(1, min(pieces, last - first))
    for piece in range(pieces):
        if stop is not None and stop.is_set():
            return
        if stop is None:  # the calling thread
            check_interrupt()
        kernel(first + (piece * (last - first)) // pieces,
               first + ((piece + 1) * (last - first)) // pieces, *args)


def map_threads(function, items: list) -> list:
    """``[function(item) for item in items]``, the items shared among the threads."""
    threads = min(n_threads(), len(items))
    if threads < 2:
        return [function(item) for item in items]
    return list(_pool(threads).map(function, items))
