"""BLAS routines callable from Numba kernels, and the thread limit they need.

The routines come from ``scipy.linalg.cython_blas`` as ctypes functions that
kernels receive as *arguments*: a kernel that referred to them as globals
would embed a process-specific address and could not be cached on disk.

The kernels run BLAS inside their own ``prange`` over row chunks, so BLAS must
be single-threaded meanwhile: a multi-threaded OpenBLAS under two Numba threads
was seen here to oversubscribe the cores and run 10-100x slower.
"""

from __future__ import annotations

import ctypes
import functools


@functools.cache
def blas_routines():
    """``(dtrmm, dsyrk)`` as ctypes functions taking every argument by reference."""
    from numba.extending import get_cython_function_address

    def bind(name, n_args):
        address = get_cython_function_address("scipy.linalg.cython_blas", name)
        return ctypes.CFUNCTYPE(None, *([ctypes.c_void_p] * n_args))(address)

    return bind("dtrmm", 11), bind("dsyrk", 10)


@functools.cache
def _controller():
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def single_threaded_blas():
    """Context manager limiting every loaded BLAS to one thread."""
    return _controller().limit(limits=1, user_api="blas")
