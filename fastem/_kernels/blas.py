"""BLAS routines callable from Numba kernels, and the thread limit they need.

The routines come from ``scipy.linalg.cython_blas`` as ctypes functions that
kernels receive as *arguments*: a kernel that referred to them as globals
would embed a process-specific address and could not be cached on disk.

The kernels run BLAS on row chunks from several threads at once
(:mod:`fastem._threads`), so BLAS must be single-threaded meanwhile: a
multi-threaded OpenBLAS under two kernel threads was seen here to
oversubscribe the cores and run 10-100x slower.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import threading


@functools.cache
def blas_routines():
    """``(dtrmm, dsyrk)`` as ctypes functions taking every argument by reference."""
    from numba.extending import get_cython_function_address

    def bind(name, n_args):
        address = get_cython_function_address("scipy.linalg.cython_blas", name)
        return ctypes.CFUNCTYPE(None, *([ctypes.c_void_p] * n_args))(address)

    return bind("dtrmm", 11), bind("dsyrk", 10)


@functools.cache
def gemm_routine():
    """``dgemm`` as a ctypes function taking every argument by reference (the
    routine scikit-learn's k-means calls, from the same library)."""
    from numba.extending import get_cython_function_address

    address = get_cython_function_address("scipy.linalg.cython_blas", "dgemm")
    return ctypes.CFUNCTYPE(None, *([ctypes.c_void_p] * 13))(address)


@functools.cache
def _controller():
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


_limit_lock = threading.Lock()
_limit_depth = 0
_limit_context = None


@contextlib.contextmanager
def single_threaded_blas():
    """Hold every loaded BLAS to one thread while any caller is inside.

    Reference-counted across threads: the first caller to enter sets the
    limit and the last to leave restores it, so concurrent fits (several
    starts at once, or estimators in other threads) never restore it under
    one another.
    """
    global _limit_depth, _limit_context
    with _limit_lock:
        if _limit_depth == 0:
            _limit_context = _controller().limit(limits=1, user_api="blas")
        _limit_depth += 1
    try:
        yield
    finally:
        with _limit_lock:
            _limit_depth -= 1
            if _limit_depth == 0:
                _limit_context.restore_original_limits()
                _limit_context = None
