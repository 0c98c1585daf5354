"""Block-level building blocks shared by the Numba kernels.

Every kernel walks X in fixed blocks of ``BLOCK_ROWS`` rows. Blocks are grouped
into ``n_chunks`` contiguous chunks that depend only on the data's shape,
never on the number of threads; each chunk's partial sums are kept apart and
reduced in chunk order at the end. That is what makes the results
bit-identical for 1, 2 or 64 threads.

Block workspaces are stored transposed, ``(n_features, rows)`` and
``(n_components, rows)``, so that the innermost loops run over rows with unit
stride and LLVM can vectorise them.
"""

from __future__ import annotations

import math
import types

import numpy as np
from numba import njit

BLOCK_ROWS = 256
# Partial sums are cheap for small K*D*D but not for K=20, D=100; cap the
# memory they take (in float64 entries) while keeping enough chunks to
# balance the load over the threads.
_MAX_CHUNKS = 64
_PARTIAL_BUDGET = 4_000_000

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


def compile_twice(body, name):
    """``(parallel, serial)`` compilations of one kernel body.

    Numba's on-disk cache keys entries by the function's name and bytecode,
    not by the ``parallel`` flag, so the serial compilation is made from a
    renamed copy of the body: otherwise a process could load the serial code
    into the parallel dispatcher, or the reverse.
    """
    twin = types.FunctionType(body.__code__, body.__globals__, name, body.__defaults__,
                              body.__closure__)
    twin.__qualname__ = name
    twin.__module__ = body.__module__
    twin.__doc__ = body.__doc__
    return njit(parallel=True, cache=True)(body), njit(cache=True)(twin)


# Below this much work (rows x the per-row cost) a call runs the serial
# compilation: starting threads would cost more than it saves.
SERIAL_WORK = 1_000_000


def pick(pair, work):
    """The parallel or the serial member of a ``compile_twice`` pair for ``work``."""
    return pair[1] if work < SERIAL_WORK else pair[0]


def n_chunks_for(n_samples: int, partial_size: int) -> int:
    """Number of row chunks for ``n_samples`` rows and a partial-sum size.

    Depends on the data's shape only (never on the thread count), so the
    reduction order, and hence the result, is the same on any machine.
    """
    n_blocks = max(1, -(-n_samples // BLOCK_ROWS))
    by_memory = max(1, _PARTIAL_BUDGET // max(1, partial_size))
    return int(min(n_blocks, _MAX_CHUNKS, by_memory))


@njit(cache=True)
def chunk_rows(chunk, n_chunks, n_samples):
    """First and one-past-last row of a chunk, aligned to whole blocks."""
    n_blocks = (n_samples + BLOCK_ROWS - 1) // BLOCK_ROWS
    first = (chunk * n_blocks) // n_chunks
    last = ((chunk + 1) * n_blocks) // n_chunks
    return first * BLOCK_ROWS, min(n_samples, last * BLOCK_ROWS)


@njit(cache=True)
def transpose_block(X, start, n_rows, out):
    """out[d, r] = X[start + r, d]: one strided read of the block per pass."""
    n_features = X.shape[1]
    for r in range(n_rows):
        for d in range(n_features):
            out[d, r] = X[start + r, d]


@njit(cache=True, fastmath={"contract"})
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
        p = p * f + 1.0 / 479001600.0
        p = p * f + 1.0 / 39916800.0
        p = p * f + 1.0 / 3628800.0
        p = p * f + 1.0 / 362880.0
        p = p * f + 1.0 / 40320.0
        p = p * f + 1.0 / 5040.0
        p = p * f + 1.0 / 720.0
        p = p * f + 1.0 / 120.0
        p = p * f + 1.0 / 24.0
        p = p * f + 1.0 / 6.0
        p = p * f + 0.5
        p = p * f + 1.0
        p = p * f + 1.0
        out[r] = p if raw > _EXP_FLOOR else 0.0
        bits[r] = (np.int64(n_f) + 1023) << 52
    scale = bits.view(np.float64)
    for r in range(n):
        out[r] *= scale[r]


@njit(cache=True, fastmath={"contract"})
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
        p = p * f + np.float32(1.0 / 720.0)
        p = p * f + np.float32(1.0 / 120.0)
        p = p * f + np.float32(1.0 / 24.0)
        p = p * f + np.float32(1.0 / 6.0)
        p = p * f + np.float32(0.5)
        p = p * f + np.float32(1.0)
        p = p * f + np.float32(1.0)
        out[r] = p if raw > _EXP_FLOOR32 else np.float32(0.0)
        bits[r] = (np.int32(n_f) + np.int32(127)) << np.int32(23)
    scale = bits.view(np.float32)
    for r in range(n):
        out[r] *= scale[r]


@njit(cache=True)
def log_sum_exp_block(log_prob, n_rows, log_norm, row_max, row_sum, bits, expo, keep_exp):
    r"""Per-row :math:`\log\sum_k e^{\ell_{kr}}` of a block of log-densities.

    Writes ``log_norm[r]`` (float64) and leaves ``row_max[r]`` = the row's
    largest :math:`\ell_{kr}` and ``row_sum[r]`` = :math:`\sum_k e^{\ell_{kr}
    - \max_k \ell_{kr}}` (the max shift keeps far outliers from underflowing
    to NaN). With ``keep_exp``, ``log_prob[k, r]`` is replaced by
    :math:`e^{\ell_{kr} - \max_k\ell_{kr}}`. The work runs in ``log_prob``'s
    precision; ``row_max``, ``row_sum`` and ``expo`` (of ``log_prob``'s
    dtype) and ``bits`` (int64) are row-sized scratch.
    """
    n_components = log_prob.shape[0]
    single = log_prob.itemsize == 4
    for r in range(n_rows):
        row_max[r] = log_prob[0, r]
    for k in range(1, n_components):
        for r in range(n_rows):
            row_max[r] = max(row_max[r], log_prob[k, r])
    for r in range(n_rows):
        row_sum[r] = 0.0
    for k in range(n_components):
        # Separate output buffer: in place, LLVM must assume aliasing and
        # gives up vectorising.
        if single:
            exp_nonpositive32(log_prob[k], row_max, expo, bits.view(np.int32), n_rows)
        else:
            exp_nonpositive(log_prob[k], row_max, expo, bits, n_rows)
        for r in range(n_rows):
            row_sum[r] += expo[r]
        if keep_exp:
            for r in range(n_rows):
                log_prob[k, r] = expo[r]
    for r in range(n_rows):
        log_norm[r] = np.float64(row_max[r]) + math.log(np.float64(row_sum[r]))


@njit(cache=True)
def normalise_block(log_prob, n_rows, sample_weight, start, log_norm, row_max, row_sum, bits,
                    expo):
    r"""Turn a block of weighted log-densities into weighted responsibilities.

    In place: ``log_prob[k, r]`` becomes :math:`w_r\, r_{rk}`, and the per-row
    :math:`\log p(x_r)` is written to ``log_norm`` (float64). The work runs in
    ``log_prob``'s precision: float32 data gets float32 responsibilities (as
    in scikit-learn), float64 data float64 ones. Scratch as in
    :func:`log_sum_exp_block`.
    """
    log_sum_exp_block(log_prob, n_rows, log_norm, row_max, row_sum, bits, expo, True)
    weighted = sample_weight.shape[0] > 0
    for r in range(n_rows):
        scale = 1.0 / np.float64(row_sum[r])
        if weighted:
            scale *= sample_weight[start + r]
        row_sum[r] = scale
    for k in range(log_prob.shape[0]):
        for r in range(n_rows):
            log_prob[k, r] *= row_sum[r]


@njit(cache=True)
def reduce_statistics(nk_parts, sx_parts, sxx_parts, full_covariance):
    """Sum per-chunk statistics in chunk order (deterministic) and mirror the
    upper triangle of full scatter matrices into the lower one."""
    _, n_components, n_features, width = sxx_parts.shape
    nk = np.zeros(n_components)
    sx = np.zeros((n_components, n_features))
    sxx = np.zeros((n_components, n_features, width))
    for c in range(nk_parts.shape[0]):
        nk += nk_parts[c]
        sx += sx_parts[c]
        sxx += sxx_parts[c]
    if full_covariance:
        for k in range(sxx.shape[0]):
            for i in range(sxx.shape[1]):
                for j in range(i):
                    sxx[k, i, j] = sxx[k, j, i]
    return nk, sx, sxx
