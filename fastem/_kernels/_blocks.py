"""Block-level building blocks shared by the Numba kernels.

Every kernel walks X in fixed blocks of ``BLOCK_ROWS`` rows (sizes in
:mod:`fastem._kernels.chunks`). Blocks are grouped
into ``n_chunks`` contiguous chunks that depend only on the data's shape,
never on the number of threads; a kernel call handles a range of chunks
(:mod:`fastem._threads` hands the ranges to threads), each chunk's partial
sums are kept apart and they are reduced in chunk order at the end. That is
what makes the results bit-identical for 1, 2 or 64 threads.

Same bits in every process. No kernel is compiled with ``fastmath``: every
operation rounds as the source says, so a kernel gives the same bits whether
it was compiled in this process or loaded from Numba's cache, and whichever
kernel a helper was inlined into. Sums over rows, which LLVM would only
vectorise by reassociating them, are written with explicit vectors
(:mod:`fastem._kernels.simd`), and fused multiply-adds are explicit
(``simd.fma``), never a contraction left to the compiler. Helpers are
compiled afresh with the kernels that call them (``helper``: not cached,
never called from Python).

Numba's cache tells a kernel's cached code is stale only from the kernel's own
source file: a cached kernel that calls a kernel of another module (the
compiled EM loop calls the pass and the M-steps) keeps the callee it was
compiled with. Installing a new version rewrites every file, which clears
them all; when editing a kernel module by hand, delete the cache
(``find fastem -name '*.nb[ic]' -delete``) before measuring or testing.
"""

from __future__ import annotations

import math
import types as pytypes

import numpy as np
from numba import njit, types
from numba.extending import overload

from .chunks import BLOCK_ROWS, n_chunks_for  # noqa: F401 (the kernels' import)
from .simd import fma, lanes, transpose_tile

# Helpers: never called from Python by the package, compiled with their caller.
helper = njit(cache=False, error_model="numpy")
helper_inline = njit(cache=False, error_model="numpy", inline="always")


# exp(x) = 2^n * exp(f), n = round(x / ln 2), |f| <= ln(2)/2, with ln 2 split
# in a high part exact in few bits and a low correction (Cody & Waite).
_LOG2E = 1.4426950408889634
_LN2_HI = 0.6931471803691238
_LN2_LO = 1.9082149292705877e-10
# Below this exp underflows to subnormals; responsibilities that small are 0.
_EXP_FLOOR = -708.0
# The same in single precision: ln 2 split for float32, floor for float32.
_LN2_HI32 = np.float32(0.693359375)
_LN2_LO32 = np.float32(-2.12194440e-4)
_LOG2E32 = np.float32(_LOG2E)
_EXP_FLOOR32 = np.float32(-87.0)


def specialise(body, name: str, **bindings):
    """A copy of the Python function ``body`` named ``name``, with some of its
    globals rebound (to be compiled as a kernel of its own).

    One body then yields a kernel per engine, each compiling only what it
    calls. The copy is renamed because Numba's on-disk cache keys kernels by
    their qualified name (and bytecode), not by the globals they see.
    """
    namespace = dict(body.__globals__)
    namespace.update(bindings)
    twin = pytypes.FunctionType(body.__code__, namespace, name, body.__defaults__,
                                body.__closure__)
    twin.__qualname__ = name
    twin.__module__ = body.__module__
    twin.__doc__ = body.__doc__
    return twin


@helper_inline
def chunk_rows(chunk, n_chunks, n_samples):
    """First and one-past-last row of a chunk, aligned to whole blocks."""
    n_blocks = (n_samples + BLOCK_ROWS - 1) // BLOCK_ROWS
    first = (chunk * n_blocks) // n_chunks
    last = ((chunk + 1) * n_blocks) // n_chunks
    return first * BLOCK_ROWS, min(n_samples, last * BLOCK_ROWS)


@njit(cache=True, error_model="numpy", nogil=True)
def transpose_block(X, start, n_rows, out):
    """out[d, r] = X[start + r, d]: one strided read of the block per pass.

    For C-contiguous X, in W x W tiles transposed in registers
    (:func:`~fastem._kernels.simd.transpose_tile`), the rows past the last
    whole vector one by one. Element by element, the copy was one scalar load
    and store per value: 1M x 10, one thread, 6.2 against 5.6 ms in float64
    and 5.3 against 2.9 ms in float32 (the tiles read the data about as fast
    as one core streams it). Other layouts are copied element by element.

    A kernel of its own, not inlined: compiled once per dtype and layout for
    every pass that calls it (inlined, it added 0.5 s to each pass's
    compilation).
    """
    _transpose_rows(X, start, n_rows, out)


def _transpose_rows(X, start, n_rows, out):
    raise NotImplementedError("compiled only (see the overload)")


@helper_inline
def _transpose_tiles(X, start, n_rows, out):
    n_features = X.shape[1]
    width = lanes(out[0])
    whole = n_rows - n_rows % width
    for r in range(0, whole, width):
        for col in range(0, n_features, width):
            transpose_tile(X, start + r, col, min(width, n_features - col), out, r)
    _transpose_elements(X, start + whole, n_rows - whole, out[:, whole:])


@helper_inline
def _transpose_elements(X, start, n_rows, out):
    # Feature by feature, so that every store runs along a row of out (row by
    # row, each row's values went to D places 8 KB apart: 9.2 against 6.2 ms).
    for d in range(X.shape[1]):
        for r in range(n_rows):
            out[d, r] = X[start + r, d]


@overload(_transpose_rows, jit_options={"cache": False, "error_model": "numpy"},
          inline="always")
def _transpose_block_layout(X, start, n_rows, out):
    # Chosen by layout at compile time: the tiles read rows as vectors.
    if X.layout == "C" and out.layout == "C" and X.dtype == out.dtype:
        return lambda X, start, n_rows, out: _transpose_tiles(X, start, n_rows, out)
    return lambda X, start, n_rows, out: _transpose_elements(X, start, n_rows, out)


@helper_inline
def exp_nonpositive(values, offsets, out, bits, n):
    r"""out[r] = exp(values[r] - offsets[r]) for arguments <= 0, vectorisable.

    Cody-Waite reduction and a degree-13 Taylor polynomial on
    :math:`|f|\le \ln 2/2` (truncation error below 1e-17 relative); the
    power of two is assembled in the exponent bits. ``math.exp`` would call
    libm once per element, which dominates the E-step for small D.
    Arguments below -708 (and -inf) give exactly 0.
    """
    for r in range(n):
        raw = values[r] - offsets[r]
        x = max(raw, _EXP_FLOOR)
        n_f = math.floor(x * _LOG2E + 0.5)
        f = (x - n_f * _LN2_HI) - n_f * _LN2_LO
        p = 1.0 / 6227020800.0
        p = fma(p, f, 1.0 / 479001600.0)
        p = fma(p, f, 1.0 / 39916800.0)
        p = fma(p, f, 1.0 / 3628800.0)
        p = fma(p, f, 1.0 / 362880.0)
        p = fma(p, f, 1.0 / 40320.0)
        p = fma(p, f, 1.0 / 5040.0)
        p = fma(p, f, 1.0 / 720.0)
        p = fma(p, f, 1.0 / 120.0)
        p = fma(p, f, 1.0 / 24.0)
        p = fma(p, f, 1.0 / 6.0)
        p = fma(p, f, 0.5)
        p = fma(p, f, 1.0)
        p = fma(p, f, 1.0)
        out[r] = p if raw > _EXP_FLOOR else 0.0
        bits[r] = (np.int64(n_f) + 1023) << 52
    scale = bits.view(np.float64)
    for r in range(n):
        out[r] *= scale[r]


@helper_inline
def exp_nonpositive32(values, offsets, out, bits, n):
    r"""Single-precision :func:`exp_nonpositive`: degree-7 polynomial (error
    below 1e-8 relative, under float32's epsilon), twice the lanes per vector.
    ``bits`` is int32 scratch; arguments below -87 give exactly 0.
    """
    for r in range(n):
        raw = values[r] - offsets[r]
        x = max(raw, _EXP_FLOOR32)
        n_f = np.floor(x * _LOG2E32 + np.float32(0.5))
        f = (x - n_f * _LN2_HI32) - n_f * _LN2_LO32
        p = np.float32(1.0 / 5040.0)
        p = fma(p, f, np.float32(1.0 / 720.0))
        p = fma(p, f, np.float32(1.0 / 120.0))
        p = fma(p, f, np.float32(1.0 / 24.0))
        p = fma(p, f, np.float32(1.0 / 6.0))
        p = fma(p, f, np.float32(0.5))
        p = fma(p, f, np.float32(1.0))
        p = fma(p, f, np.float32(1.0))
        out[r] = p if raw > _EXP_FLOOR32 else np.float32(0.0)
        bits[r] = (np.int32(n_f) + np.int32(127)) << np.int32(23)
    scale = bits.view(np.float32)
    for r in range(n):
        out[r] *= scale[r]


@helper_inline
def log_normal_positive(values, out, bits, n):
    r"""out[r] = log(values[r]) for positive normal float64 ``values``, vectorisable.

    With :math:`x = 2^e m`, :math:`m\in[\sqrt{1/2}, \sqrt 2)` (taken from the
    exponent and mantissa bits), :math:`s = (m - 1)/(m + 1)`:

    .. math::

        \log x = e\ln 2 + 2s\textstyle\sum_{i=0}^{10} s^{2i}/(2i + 1)

    (:math:`s^2 \le 0.0295`: truncation below 3e-17 relative), ``ln 2`` split
    as in :func:`exp_nonpositive`: within 3 ulp of ``math.log`` (tested),
    which would call libm once per element and cost as much as the rest of a
    narrow E-step. Zero, subnormal, infinite and NaN inputs give meaningless
    values, never a fault. ``values`` and ``out`` must not overlap; ``bits``
    is int64 scratch of at least ``n`` entries.
    """
    raw = values.view(np.int64)
    for r in range(n):
        # The mantissa with the exponent of 1.0: m in [1, 2).
        bits[r] = (raw[r] & 0xFFFFFFFFFFFFF) | 0x3FF0000000000000
    mantissa = bits.view(np.float64)
    for r in range(n):
        e = np.float64(((raw[r] >> 52) & 0x7FF) - 1023)
        m = mantissa[r]
        high = m > 1.4142135623730951
        m = m * 0.5 if high else m
        e = e + 1.0 if high else e
        s = (m - 1.0) / (m + 1.0)
        z = s * s
        p = 1.0 / 21.0
        p = fma(p, z, 1.0 / 19.0)
        p = fma(p, z, 1.0 / 17.0)
        p = fma(p, z, 1.0 / 15.0)
        p = fma(p, z, 1.0 / 13.0)
        p = fma(p, z, 1.0 / 11.0)
        p = fma(p, z, 1.0 / 9.0)
        p = fma(p, z, 1.0 / 7.0)
        p = fma(p, z, 1.0 / 5.0)
        p = fma(p, z, 1.0 / 3.0)
        p = fma(p, z, 1.0)
        out[r] = fma(e, _LN2_HI, fma(e, _LN2_LO, 2.0 * s * p))


def exp_block(values, offsets, out, bits, n):
    """:func:`exp_nonpositive` or :func:`exp_nonpositive32`, by the values' dtype.

    ``bits`` is int64 scratch of at least ``n`` entries.
    """
    raise NotImplementedError("compiled only (see the overload)")


@overload(exp_block, jit_options={"cache": False, "error_model": "numpy"})
def _exp_block_precision(values, offsets, out, bits, n):
    # Chosen by dtype at compile time, so a float64 pass compiles one exponential.
    if values.dtype == types.float32:
        return lambda values, offsets, out, bits, n: exp_nonpositive32(
            values, offsets, out, bits.view(np.int32), n)
    return lambda values, offsets, out, bits, n: exp_nonpositive(values, offsets, out, bits, n)
