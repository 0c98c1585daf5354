"""Fused E-step + sufficient-statistics kernels: one pass over X per EM iteration.

For each row block the kernel computes the weighted log-densities of every
component, normalises them into responsibilities (log-sum-exp), and adds the
block's contribution to the per-component statistics

    N_k = sum_n w_n r_nk
    s_k = sum_n w_n r_nk (x_n - mu_k)
    S_k = sum_n w_n r_nk (x_n - mu_k)(x_n - mu_k)^T      (or its diagonal)

around the *current* means ``mu_k`` (no cancellation for data far from the
origin), together with the total log-likelihood sum_n w_n log p(x_n) and the
worst-explained row. No (n_samples, n_components) array is ever formed.

Two engines compute a block, chosen by the caller from the data's width:

* loops (small D): the block is transposed once to (D, rows) and every
  inner loop runs over rows, so LLVM vectorises it;
* BLAS (large D): for full covariances the triangular product
  (x - mu_k) U_k is one ``dtrmm`` and the scatter one ``dsyrk`` per block
  and component; for diagonal ones the E-step is one matrix product per
  block (see ``_diag_gemm_operands``) and so are the moments, unless most of
  the block's responsibilities are exactly zero, when only the others are
  visited; on single-threaded BLAS (the caller limits BLAS to one thread:
  the parallelism is over chunks). The BLAS routines are passed in as arguments
  so that the compiled kernel holds no process-specific address and can be
  cached.

Twins: :func:`fastem.reference.log_responsibilities` and
:func:`fastem.reference.sufficient_statistics`.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from ._blocks import (
    BLOCK_ROWS,
    chunk_rows,
    exp_block,
    helper,
    helper_inline,
    log_normal_positive,
    specialise,
    transpose_block,
)
from .simd import fma, lanes, vadd, vbroadcast, vfma, vload, vmul, vstore, vsum, vzeros

# The BLAS engine for full covariances works on this many blocks of rows at a
# time (dtrmm and dsyrk run closer to peak on them; the diagonal one does not).
BLAS_BLOCKS = 4
# Rows of a block of the loop engines: their per-block costs (the lanes'
# horizontal sums, the copy of the factors) are paid once per 1024 rows
# (measured, one thread, 1M rows, K=5: D=10 41 ms against 48 ms at 256 rows
# and 44 ms at 512; D=2 11.2 against 13.5 and 12.1).
LOOPS_BLOCK_ROWS = 1024
# The full BLAS engine calls dtrmm on a multiple of this many rows (zero rows
# pad the block): OpenBLAS then computes every row by the same kernel, so a
# row's result does not depend on which other rows share the call (checked at
# run time, see fastem.stats.pruning_is_exact), which makes exact pruning
# possible. 16 is the smallest multiple measured to have that property here
# (OpenBLAS 0.3.30, for D = 24 to 128; 8 is not); padding to 64 instead cost
# 5 % of a pruned pass at D = 100.
TRMM_ROWS = 16
# A component is left out of a row's E-step when the upper bound of its
# weighted log-density lies this far below the row's best lower bound: its
# responsibility would have been exactly 0 (the exponential's floor, -708 in
# float64, the BLAS engines' precision), with a margin for rounding.
PRUNE_GAP = 708.0 + 1.0
# After a block in which fewer than this fraction of (row, component) pairs
# were skipped, the next PRUNE_REST blocks do not try (the bounds cost about
# 2 / D of the E-step: with overlapping components they would be wasted).
PRUNE_WORTHWHILE = 0.25
PRUNE_REST = 16
# Below this fraction of non-zero responsibilities in a block, the diagonal
# engine's moments skip the zeros instead of multiplying them (measured
# break-even at D=50, K=20: about 0.37).
SPARSE_DENSITY = 0.35


_LOG_2PI = math.log(2.0 * math.pi)

# The four block engines (see gaussian_pass) and what a pass computes.
ENGINE_LOOPS_FULL = 0
ENGINE_LOOPS_DIAG = 1
ENGINE_BLAS_FULL = 2
ENGINE_BLAS_DIAG = 3
MODE_STATISTICS = 0
MODE_LABELS = 1
MODE_LOG_RESP = 2
MODE_PROBA = 3
MODE_LOG_NORM = 4
MODE_ARGMAX = 5


@njit(cache=True, error_model="numpy")
def gaussian_operands(weights, prec_chol, kind, n_features):
    r"""Kernel operands from canonical 3-D precision Cholesky factors.

    One implementation for the Python driver and the compiled EM loop, so both
    feed the statistics kernel bit-identical operands (NumPy's vectorised
    ``log`` may differ from libm's in the last bit).

    Returns the precision operand ((K, D, D) factors or (K, D, 1) diagonal
    precisions) and :math:`\log\pi_k + \log\det U_k - \tfrac D2 \log 2\pi`.
    """
    n_components = weights.shape[0]
    full = kind <= 1
    prec = np.empty((n_components, n_features, n_features if full else 1))
    log_const = np.empty(n_components)
    for k in range(n_components):
        source = 0 if kind == 1 else k
        log_det = 0.0
        if full:
            for i in range(n_features):
                for j in range(n_features):
                    prec[k, i, j] = prec_chol[source, i, j]
            for d in range(n_features):
                log_det += math.log(prec_chol[source, d, d])
        else:
            for d in range(n_features):
                u = prec_chol[k, 0 if kind == 3 else d, 0]
                prec[k, d, 0] = u * u
                log_det += math.log(u)
        log_const[k] = math.log(weights[k]) + log_det - 0.5 * n_features * _LOG_2PI
    return prec, log_const


@helper_inline
def _padded(n_rows, like):
    """``n_rows`` rounded up to whole groups of four vectors of ``like``'s dtype
    (the E-step takes four vectors of rows at a time)."""
    width = 4 * lanes(like)
    return (n_rows + width - 1) // width * width


@helper_inline
def _centre(xT, n_rows, mean, diff):
    """diff[d, r] = xT[d, r] - mean[d], and 0 up to the next whole vector."""
    n_pad = _padded(n_rows, diff[0])
    for d in range(xT.shape[0]):
        m = mean[d]
        for r in range(n_rows):
            diff[d, r] = xT[d, r] - m
        for r in range(n_rows, n_pad):
            diff[d, r] = 0.0


@helper_inline
def sum_rows(values, n):
    """``values[0] + ... + values[n - 1]`` in a fixed order: lane-wise vector
    sums of the whole vectors (:mod:`fastem._kernels.simd`), then the rest."""
    width = lanes(values)
    whole = n - n % width
    acc = vzeros(values)
    for r in range(0, whole, width):
        acc = vadd(acc, vload(values, r))
    total = vsum(acc)
    for r in range(whole, n):
        total += values[r]
    return total


@helper_inline
def _log_prob_full_loops(xT, n_rows, means, prec_chol, log_const, diffs, factors, quad,
                         log_prob):
    """log_prob[k, r] = log_const[k] - ||(x_r - mu_k) U_k||^2 / 2 (U upper).

    Vectors of rows (:mod:`fastem._kernels.simd`): for each group of four
    vectors of rows, four columns of y = (x - mu_k) U_k at a time are held in
    16 registers while the rows of the centred block are streamed through
    them (four loads of ``diff[i]`` and four broadcast entries of U for
    sixteen independent fused multiply-adds), and their squares added to the
    quadratic form. Against two vectors of rows (eight chains), one pass over
    1M rows, K=5, two threads: D=10 22.2 -> 18.5 ms, D=2 5.9 -> 5.3 ms, D=20
    78.6 -> 71.5 ms. ``factors``
    (K, D, D') holds U_k with its columns padded with zeros to a multiple of
    four (a zero column adds exactly 0). The quadratic form is computed in
    X's precision, so float32 data runs twice as many rows per vector.
    ``quad`` is unused (kept for the engines' common signature).
    """
    n_components, n_features = means.shape
    padded = factors.shape[2]
    like = diffs[0, 0]
    width = lanes(like)
    n_pad = _padded(n_rows, like)
    for k in range(n_components):
        for i in range(n_features):
            for j in range(n_features):
                factors[k, i, j] = prec_chol[k, i, j]
            for j in range(n_features, padded):
                factors[k, i, j] = 0.0
    for k in range(n_components):
        # The centred block of every component is kept (diffs[k]) for the
        # accumulation that follows the normalisation.
        diff = diffs[k]
        _centre(xT, n_rows, means[k], diff)
        U = factors[k]
        half = vbroadcast(like, -0.5)
        constant = vbroadcast(like, log_const[k])
        out = log_prob[k]
        for r in range(0, n_pad, 4 * width):
            q0 = q1 = q2 = q3 = vzeros(like)
            for j in range(0, n_features, 4):
                a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = vzeros(like)
                c0 = c1 = c2 = c3 = e0 = e1 = e2 = e3 = vzeros(like)
                for i in range(min(j + 4, n_features)):
                    row = diff[i]
                    d0 = vload(row, r)
                    d1 = vload(row, r + width)
                    d2 = vload(row, r + 2 * width)
                    d3 = vload(row, r + 3 * width)
                    u = vbroadcast(like, U[i, j])
                    a0 = vfma(d0, u, a0)
                    b0 = vfma(d1, u, b0)
                    c0 = vfma(d2, u, c0)
                    e0 = vfma(d3, u, e0)
                    u = vbroadcast(like, U[i, j + 1])
                    a1 = vfma(d0, u, a1)
                    b1 = vfma(d1, u, b1)
                    c1 = vfma(d2, u, c1)
                    e1 = vfma(d3, u, e1)
                    u = vbroadcast(like, U[i, j + 2])
                    a2 = vfma(d0, u, a2)
                    b2 = vfma(d1, u, b2)
                    c2 = vfma(d2, u, c2)
                    e2 = vfma(d3, u, e2)
                    u = vbroadcast(like, U[i, j + 3])
                    a3 = vfma(d0, u, a3)
                    b3 = vfma(d1, u, b3)
                    c3 = vfma(d2, u, c3)
                    e3 = vfma(d3, u, e3)
                q0 = vfma(a3, a3, vfma(a2, a2, vfma(a1, a1, vfma(a0, a0, q0))))
                q1 = vfma(b3, b3, vfma(b2, b2, vfma(b1, b1, vfma(b0, b0, q1))))
                q2 = vfma(c3, c3, vfma(c2, c2, vfma(c1, c1, vfma(c0, c0, q2))))
                q3 = vfma(e3, e3, vfma(e2, e2, vfma(e1, e1, vfma(e0, e0, q3))))
            vstore(out, r, vfma(q0, half, constant))
            vstore(out, r + width, vfma(q1, half, constant))
            vstore(out, r + 2 * width, vfma(q2, half, constant))
            vstore(out, r + 3 * width, vfma(q3, half, constant))


@helper_inline
def _log_prob_diag_loops(xT, n_rows, means, precisions, log_const, log_prob):
    """log_prob[k, r] = log_const[k] - sum_d p_kd (x_rd - mu_kd)^2 / 2.

    ``precisions`` is (K, D, 1) so that both flavours share one signature.
    """
    n_components, n_features = means.shape
    for k in range(n_components):
        for r in range(n_rows):
            log_prob[k, r] = 0.0
        for d in range(n_features):
            p = precisions[k, d, 0]
            m = means[k, d]
            for r in range(n_rows):
                t = xT[d, r] - m
                log_prob[k, r] = fma(p * t, t, log_prob[k, r])
        for r in range(n_rows):
            log_prob[k, r] = log_const[k] - 0.5 * log_prob[k, r]


@helper_inline
def _scatter_upper(wdiff, diff, n_pad, zeros, out):
    """out[i, j] += sum_r wdiff[i, r] diff[j, r] for j >= i, in tiles of vectors.

    A 2 x 4 tile loads two rows of ``wdiff`` and four of ``diff`` per vector
    of rows for eight fused multiply-adds into eight vector accumulators (lane
    ``l`` sums rows ``l, l + W, ...``; :func:`~fastem._kernels.simd.vsum`
    adds the lanes in a fixed order); the last one or two columns of a row
    pair take a 2 x 2 tile. Rows past the last feature are read from ``zeros``
    and their sums dropped; tiles on the diagonal also add entries below it,
    which the final mirroring overwrites. ``n_pad`` is a whole number of
    vectors (the padding rows are 0).
    """
    n_features = diff.shape[0]
    width = lanes(zeros)
    for i in range(0, n_features, 2):
        pair = i + 1 < n_features
        w0 = wdiff[i]
        w1 = wdiff[i + 1] if pair else zeros
        for j in range(i, n_features, 4):
            n_columns = min(4, n_features - j)
            d0 = diff[j]
            d1 = diff[j + 1] if n_columns > 1 else zeros
            a00 = a01 = a10 = a11 = vzeros(zeros)
            if n_columns <= 2:
                for r in range(0, n_pad, width):
                    u0 = vload(w0, r)
                    u1 = vload(w1, r)
                    v = vload(d0, r)
                    a00 = vfma(u0, v, a00)
                    a10 = vfma(u1, v, a10)
                    v = vload(d1, r)
                    a01 = vfma(u0, v, a01)
                    a11 = vfma(u1, v, a11)
                a02 = a03 = a12 = a13 = a00
            else:
                d2 = diff[j + 2]
                d3 = diff[j + 3] if n_columns > 3 else zeros
                a02 = a03 = a12 = a13 = a00
                for r in range(0, n_pad, width):
                    u0 = vload(w0, r)
                    u1 = vload(w1, r)
                    v = vload(d0, r)
                    a00 = vfma(u0, v, a00)
                    a10 = vfma(u1, v, a10)
                    v = vload(d1, r)
                    a01 = vfma(u0, v, a01)
                    a11 = vfma(u1, v, a11)
                    v = vload(d2, r)
                    a02 = vfma(u0, v, a02)
                    a12 = vfma(u1, v, a12)
                    v = vload(d3, r)
                    a03 = vfma(u0, v, a03)
                    a13 = vfma(u1, v, a13)
            out[i, j] += vsum(a00)
            if pair:
                out[i + 1, j] += vsum(a10)
            if n_columns > 1:
                out[i, j + 1] += vsum(a01)
                if pair:
                    out[i + 1, j + 1] += vsum(a11)
            if n_columns > 2:
                out[i, j + 2] += vsum(a02)
                if pair:
                    out[i + 1, j + 2] += vsum(a12)
            if n_columns > 3:
                out[i, j + 3] += vsum(a03)
                if pair:
                    out[i + 1, j + 3] += vsum(a13)


@helper_inline
def _component_weight(weights, n_pad, zeros):
    """The sum of a block's (padded) responsibilities of one component, lane-wise."""
    width = lanes(zeros)
    total = vzeros(zeros)
    for r in range(0, n_pad, width):
        total = vadd(total, vload(weights, r))
    return vsum(total)


@helper_inline
def _moments_loops_full(xT, n_rows, means, resp, diffs, centred, wdiff, zeros, nk, sx, sxx):
    """Add the block's weighted first moments and scatter around the means.

    With ``centred``, ``diffs[k]`` already holds the block centred on mean k
    (left by the E-step); otherwise it is centred here, in ``diffs[0]``. The
    responsibilities ``resp`` and the centred rows are 0 from ``n_rows`` to
    the next whole vector. (Separate from the diagonal variant so that
    neither engine compiles the other's code.)
    """
    for k in range(means.shape[0]):
        diff = diffs[k] if centred else diffs[0]
        _moments_component_full(xT, n_rows, means[k], resp[k], diff, centred, wdiff, zeros, k,
                                nk, sx, sxx)


@helper
def _moments_component_full(xT, n_rows, mean, weights, diff, centred, wdiff, zeros, k, nk, sx,
                            sxx):
    """Component k's share of :func:`_moments_loops_full`: ``nk[k]``,
    ``sx[k]`` and the upper triangle of ``sxx[k]`` from the block ``xT``
    (centred on ``mean`` into ``diff`` unless ``centred``) and the weights.

    Sums over the block's rows are taken lane-wise in X's precision, every
    total across blocks in float64. A function of its own, not inlined into
    the component loop: the pass compiles in 0.3 s less per dtype, and the
    call, once per block and component, costs nothing measurable.
    """
    n_features = xT.shape[0]
    width = lanes(zeros)
    n_pad = _padded(n_rows, zeros)
    if not centred:
        _centre(xT, n_rows, mean, diff)
    nk[k] += _component_weight(weights, n_pad, zeros)
    for i in range(n_features):
        row = diff[i]
        first = vzeros(zeros)
        # w (x - mu) is kept for the scatter.
        weighted_row = wdiff[i]
        for r in range(0, n_pad, width):
            wd = vmul(vload(weights, r), vload(row, r))
            vstore(weighted_row, r, wd)
            first = vadd(first, wd)
        sx[k, i] += vsum(first)
    _scatter_upper(wdiff, diff, n_pad, zeros, sxx[k])


@helper_inline
def _moments_loops_diag(xT, n_rows, means, resp, diff, zeros, nk, sx, sxx):
    """Add the block's weighted first and second moments (the diagonal) around
    the means, centring the block on each mean in ``diff`` (as
    :func:`_moments_loops_full` for the rest)."""
    for k in range(means.shape[0]):
        _moments_component_diag(xT, n_rows, means[k], resp[k], diff, zeros, k, nk, sx, sxx)


@helper
def _moments_component_diag(xT, n_rows, mean, weights, diff, zeros, k, nk, sx, sxx):
    """Component k's share of :func:`_moments_loops_diag` (a function of its
    own, as :func:`_moments_component_full`)."""
    n_features = xT.shape[0]
    width = lanes(zeros)
    n_pad = _padded(n_rows, zeros)
    _centre(xT, n_rows, mean, diff)
    nk[k] += _component_weight(weights, n_pad, zeros)
    for i in range(n_features):
        row = diff[i]
        first = vzeros(zeros)
        second = vzeros(zeros)
        for r in range(0, n_pad, width):
            d = vload(row, r)
            wd = vmul(vload(weights, r), d)
            first = vadd(first, wd)
            second = vfma(wd, d, second)
        sxx[k, i, 0] += vsum(second)
        sx[k, i] += vsum(first)


@helper_inline
def _blas_scalars(n_features, n_rows):
    """Fortran-style by-reference arguments: chars 'L', 'N' (as bytes), sizes, 1.0."""
    chars = np.empty(2, dtype=np.uint8)
    chars[0] = 76
    chars[1] = 78
    sizes = np.empty(2, dtype=np.int32)
    sizes[0] = n_features
    sizes[1] = n_rows
    ones = np.empty(1)
    ones[0] = 1.0
    return chars, sizes, ones


@helper_inline
def _log_prob_full_blas(X, start, n_rows, means, prec_chol, log_const, rows, log_prob, trmm,
                        bounds, dist, picked, lower, mean_row):
    r"""As the loop engine, with (x - mu_k) U_k computed by one dtrmm per component;
    returns the number of (row, component) pairs left out (exact pruning).

    A row-major (rows, D) block is a column-major (D, rows) matrix and the
    row-major upper U_k a column-major lower one, so the product is
    ``B := L B`` with L = U_k^T in BLAS terms. The rows go in multiples of
    ``TRMM_ROWS`` (zero rows pad them), so that each row's result is the same
    whatever rows share the call.

    With ``bounds`` (K, 2) non-empty: with :math:`d_{rk} = \lVert x_r -
    \mu_k\rVert^2` and the extreme eigenvalues of :math:`P_k = U_k U_k^T`,

    .. math::

        \ell_k - \tfrac12\lambda_{\max}(P_k)\, d_{rk} \;\le\; \ell_{rk}
        \;\le\; \ell_k - \tfrac12\lambda_{\min}(P_k)\, d_{rk}

    (``bounds[k]`` holds the two halves, widened for rounding). A component
    whose upper bound lies ``PRUNE_GAP`` below the row's best lower bound
    would get a responsibility of exactly 0: it is not computed and its
    :math:`\ell` is :math:`-\infty`, which gives the same 0 and the same row
    sums. ``dist`` (K, block), ``picked`` (block,) int64, ``lower``
    (block,) and ``mean_row`` (D,), X's dtype, are scratch (the bounds are
    computed for float64 data only: :func:`fastem.stats.pruning_bounds`).
    """
    n_components, n_features = means.shape
    chars, sizes, ones = _blas_scalars(n_features, n_rows)
    left = chars[0:1]
    no = chars[1:2]
    prune = bounds.shape[0] > 0
    if prune:
        flat = X.reshape(-1)
        for r in range(n_rows):
            lower[r] = -np.inf
        for k in range(n_components):
            for d in range(n_features):
                mean_row[d] = means[k, d]
            for r in range(n_rows):
                total = np.float64(_squared_distance(flat, (start + r) * n_features, mean_row,
                                                     n_features))
                dist[k, r] = total
                lower[r] = max(lower[r], log_const[k] - bounds[k, 1] * total)
    skipped = 0
    for k in range(n_components):
        count = 0
        for r in range(n_rows):
            if prune and log_const[k] - bounds[k, 0] * dist[k, r] < lower[r] - PRUNE_GAP:
                log_prob[k, r] = -np.inf
                continue
            picked[count] = r
            for d in range(n_features):
                rows[count, d] = X[start + r, d] - means[k, d]
            count += 1
        skipped += n_rows - count
        if count == 0:
            continue
        padded = (count + TRMM_ROWS - 1) // TRMM_ROWS * TRMM_ROWS
        for i in range(count, padded):
            for d in range(n_features):
                rows[i, d] = 0.0
        sizes[1] = padded
        trmm(left.ctypes, left.ctypes, no.ctypes, no.ctypes, sizes[0:1].ctypes,
             sizes[1:2].ctypes, ones.ctypes, prec_chol[k].ctypes, sizes[0:1].ctypes,
             rows.ctypes, sizes[0:1].ctypes)
        for i in range(count):
            log_prob[k, picked[i]] = log_const[k] - 0.5 * _sum_of_squares(rows[i], n_features)
    return skipped


@helper_inline
def _squared_distance(x, offset, y, n):
    """``(x[o] - y[0])^2 + ... + (x[o + n - 1] - y[n - 1])^2`` in vectors, in a
    fixed order (``x`` flat, ``o = offset``: a row of X without a view of it,
    whose reference count the threads would share)."""
    width = lanes(x)
    whole = n - n % width
    acc = vzeros(x)
    minus = vbroadcast(x, -1.0)
    for i in range(0, whole, width):
        t = vfma(vload(y, i), minus, vload(x, offset + i))  # x - y, rounded once
        acc = vfma(t, t, acc)
    total = vsum(acc)
    for i in range(whole, n):
        t = x[offset + i] - y[i]
        total = fma(t, t, total)
    return total


@helper_inline
def _sum_of_squares(values, n):
    """``values[0]^2 + ... + values[n - 1]^2`` in a fixed order (as ``sum_rows``)."""
    width = lanes(values)
    whole = n - n % width
    acc = vzeros(values)
    for i in range(0, whole, width):
        v = vload(values, i)
        acc = vfma(v, v, acc)
    total = vsum(acc)
    for i in range(whole, n):
        total = fma(values[i], values[i], total)
    return total


@helper_inline
def _accumulate_full_blas(X, start, n_rows, means, resp, rows, nk, sx, sxx, syrk):
    """S_k += (sqrt(r) (x - mu_k))^T (sqrt(r) (x - mu_k)) by one dsyrk per component.

    Only the rows with a non-zero responsibility enter the product: with
    well-separated components most are exactly zero and add exactly nothing.
    The column-major lower triangle BLAS fills is the row-major upper one.
    """
    n_components, n_features = means.shape
    chars, sizes, ones = _blas_scalars(n_features, n_rows)
    lower = chars[0:1]
    no = chars[1:2]
    for k in range(n_components):
        total = 0.0
        count = 0
        for r in range(n_rows):
            w = resp[k, r]
            if w == 0.0:
                continue
            total += w
            root = math.sqrt(w)
            for d in range(n_features):
                diff = X[start + r, d] - means[k, d]
                sx[k, d] += w * diff
                rows[count, d] = root * diff
            count += 1
        nk[k] += total
        if count == 0:
            continue
        sizes[1] = count
        syrk(lower.ctypes, no.ctypes, sizes[0:1].ctypes, sizes[1:2].ctypes, ones.ctypes,
             rows.ctypes, sizes[0:1].ctypes, ones.ctypes, sxx[k].ctypes, sizes[0:1].ctypes)


@helper_inline
def _mean_of_means(means):
    """c = the average of the component means (where the diagonal GEMM engine expands)."""
    n_components, n_features = means.shape
    centre = np.zeros(n_features)
    for k in range(n_components):
        for d in range(n_features):
            centre[d] += means[k, d]
    for d in range(n_features):
        centre[d] /= n_components
    return centre


@helper_inline
def _diag_gemm_operands(means, precisions, log_const):
    r"""Operands of the diagonal GEMM engine.

    Around :math:`c` = the average of the means, with :math:`m_k = \mu_k - c`
    and :math:`z = x - c`, the weighted log-density is

    .. math::

        \log\pi_k\mathcal N(x) = \ell_k - \tfrac12\textstyle\sum_d p_{kd} m_{kd}^2
        + \sum_d p_{kd} m_{kd}\, z_d - \tfrac12 \sum_d p_{kd}\, z_d^2

    i.e. one product of the block ``[z, z^2]`` (rows x 2D) with ``W`` (2D x K).
    Centring on ``c`` keeps the expansion free of the cancellation a large
    offset in the data would cause.
    """
    n_components, n_features = means.shape
    centre = _mean_of_means(means)
    W = np.empty((2 * n_features, n_components))
    const = log_const.copy()
    for k in range(n_components):
        for d in range(n_features):
            p = precisions[k, d, 0]
            m = means[k, d] - centre[d]
            W[d, k] = p * m
            W[n_features + d, k] = -0.5 * p
            const[k] -= 0.5 * p * m * m
    return centre, W, const


@helper_inline
def _centred_powers(X, start, n_rows, centre, Z):
    """Z[r] = [x_r - c, (x_r - c)^2] (row-major, float64)."""
    n_features = X.shape[1]
    for r in range(n_rows):
        for d in range(n_features):
            z = X[start + r, d] - centre[d]
            Z[r, d] = z
            Z[r, n_features + d] = z * z


@helper_inline
def _log_prob_diag_gemm(Z, n_rows, W, const, L, log_prob):
    """log_prob[k, r] = const_k + (Z W)[r, k] by one matrix product (into scratch ``L``)."""
    np.dot(Z[:n_rows], W, L[:n_rows])
    for k in range(W.shape[1]):
        for r in range(n_rows):
            log_prob[k, r] = const[k] + L[r, k]


@helper_inline
def _accumulate_diag_sparse(Z, n_rows, resp, nk, sx, sxx, rows, weights, moments):
    """The moments of ``_accumulate_diag_moments``, visiting only non-zero responsibilities.

    Exactly zero responsibilities (underflowed far components) add exactly
    nothing, so skipping them gives the same sums (up to the rounding of a
    different summation order). Each component's non-zero rows are first
    gathered without branches, then added four at a time, so that its row of
    ``moments`` is loaded and stored once per four rows.
    """
    n_components = resp.shape[0]
    width = Z.shape[1]
    n_features = sx.shape[1]
    for k in range(n_components):
        count = 0
        for r in range(n_rows):
            weight = resp[k, r]
            rows[count] = r
            weights[count] = weight
            count += weight != 0.0
        nk[k] += sum_rows(weights, count)
        acc = moments[k]
        for j in range(width):
            acc[j] = 0.0
        quads = count - count % 4
        for i in range(0, quads, 4):
            r0, r1, r2, r3 = rows[i], rows[i + 1], rows[i + 2], rows[i + 3]
            w0, w1, w2, w3 = weights[i], weights[i + 1], weights[i + 2], weights[i + 3]
            for j in range(width):
                acc[j] = fma(w3, Z[r3, j], fma(w2, Z[r2, j], fma(w1, Z[r1, j],
                                                                fma(w0, Z[r0, j], acc[j]))))
        for i in range(quads, count):
            r0 = rows[i]
            w0 = weights[i]
            for j in range(width):
                acc[j] = fma(w0, Z[r0, j], acc[j])
        for d in range(n_features):
            sx[k, d] += acc[d]
            sxx[k, d, 0] += acc[n_features + d]


@helper_inline
def _accumulate_diag_moments(Z, n_rows, resp, nk, sx, sxx, gathered, weights, dense_resp,
                             moments):
    """[sum r z, sum r z^2] of every component (around c) into nk, sx, sxx.

    By one matrix product, or, when most responsibilities of the block are
    exactly zero (well-separated components in many dimensions), by visiting
    only the others. ``gathered`` and ``weights`` (block,), ``dense_resp``
    (K * block,) and ``moments`` (K, 2D) are scratch.
    """
    n_components = resp.shape[0]
    n_features = sx.shape[1]
    nonzero = 0
    for k in range(n_components):
        for r in range(n_rows):
            nonzero += resp[k, r] != 0.0
    if nonzero < SPARSE_DENSITY * n_components * n_rows:
        _accumulate_diag_sparse(Z, n_rows, resp, nk, sx, sxx, gathered, weights, moments)
        return
    # 0 * inf is NaN: a square that overflowed (a row very far from c) must
    # not meet the exact zeros of the product, so such blocks add sparsely.
    overflowed = 0
    for r in range(n_rows):
        for d in range(n_features, 2 * n_features):
            overflowed |= not Z[r, d] < np.inf
    if overflowed:
        _accumulate_diag_sparse(Z, n_rows, resp, nk, sx, sxx, gathered, weights, moments)
        return
    # Contiguous operands and output, as np.dot needs.
    R = dense_resp[:n_components * n_rows].reshape((n_components, n_rows))
    for k in range(n_components):
        for r in range(n_rows):
            R[k, r] = resp[k, r]
    np.dot(R, Z[:n_rows], moments)
    for k in range(n_components):
        nk[k] += sum_rows(R[k], n_rows)
        for d in range(n_features):
            sx[k, d] += moments[k, d]
            sxx[k, d, 0] += moments[k, n_features + d]


@njit(cache=True, error_model="numpy", nogil=True)
def far_rows(X, start, far, means, prec, log_const, full, keep_log, log_prob, row_sum, norms):
    r"""The rows ``r`` of a block (X's rows ``start + r``) flagged ``far``: their
    log-densities overflowed.

    Their squared distances exceed the operands' range (or float64's): they
    are recomputed in float64 on the row and means scaled by a power of two
    (exact) so that no square overflows. When the log-densities are finite in
    float64 the row is normalised as usual; otherwise its responsibility goes
    to the component of the smallest :math:`\log q_k` (the limit of
    :math:`e^{-q_k/2}` for distances that large; exact ties share it) and
    :math:`\log p(x) = -\infty` (below the float64 range). Writes
    ``log_prob[:, r]`` (log-responsibilities if ``keep_log``, else
    responsibilities), ``row_sum[r] = 1`` and ``norms[r]``.

    A kernel of its own: every engine's pass flags such rows (rare) and
    leaves them out, and the caller computes them here, so a fit compiles
    this only when it meets one. With ``start = 0`` and every row flagged,
    it computes a gathered array of far rows.
    """
    n_components, n_features = means.shape
    log_q = np.empty(n_components)
    log_density = np.empty(n_components)
    for r in range(far.shape[0]):
        if not far[r]:
            continue
        row = start + r
        best = -np.inf
        for k in range(n_components):
            largest = 0.0
            for d in range(n_features):
                largest = max(largest, abs(np.float64(X[row, d])), abs(np.float64(means[k, d])))
            scale = math.ldexp(1.0, -math.frexp(largest)[1])
            q = 0.0
            for j in range(n_features):
                if full:
                    y = 0.0
                    for i in range(j + 1):
                        y += (np.float64(X[row, i]) * scale - np.float64(means[k, i]) * scale) \
                            * np.float64(prec[k, i, j])
                    q += y * y
                else:
                    t = np.float64(X[row, j]) * scale - np.float64(means[k, j]) * scale
                    q += np.float64(prec[k, j, 0]) * t * t
            # q is the squared distance times scale^2.
            log_q[k] = math.log(q) - 2.0 * math.log(scale) if q > 0.0 else -np.inf
            log_density[k] = log_const[k] - 0.5 * (q / scale / scale)
            best = max(best, log_density[k])
        if best > -np.inf:
            # Relative to the largest first, as log(total) vanishes next to a huge best.
            total = 0.0
            for k in range(n_components):
                log_density[k] -= best
                total += math.exp(log_density[k])
            log_total = math.log(total)
            norms[r] = best + log_total
            for k in range(n_components):
                value = log_density[k] - log_total
                log_prob[k, r] = value if keep_log else math.exp(value)
        else:
            nearest = np.inf
            for k in range(n_components):
                nearest = min(nearest, log_q[k])
            ties = 0
            for k in range(n_components):
                ties += log_q[k] == nearest
            norms[r] = -np.inf
            for k in range(n_components):
                share = 1.0 / ties if log_q[k] == nearest else 0.0
                log_prob[k, r] = math.log(share) if keep_log else share
        row_sum[r] = 1.0


# Block engines. Each engine is three functions with one signature per role, so
# that one pass body (``_gaussian_pass``) serves every engine: it is compiled
# once per engine with these names bound to that engine's functions (see
# ``specialise``), and a fit compiles only its own engine's code.
#
#   read_block(X, start, n_rows, centre, xT, rows): the block as the engine
#       reads it (the loops: transposed into xT; diagonal BLAS: centred rows
#       and their squares in rows), once per block whatever the mode
#   log_prob(X, start, n_rows, means, prec, log_const, trmm, W, const, centre,
#            xT, diffs, y, quad, rows, products, log_prob)
#   accumulate(X, start, n_rows, means, resp, centred, xT, diffs, wdiff, zeros, rows,
#              gathered, gathered_weights, dense_resp, moments, syrk, nk, sx, sxx)


@helper_inline
def _log_prob_loops_full(X, start, n_rows, means, prec, log_const, trmm, W, const, centre, xT,
                         diffs, y, quad, rows, products, log_prob):
    _log_prob_full_loops(xT, n_rows, means, prec, log_const, diffs, y, quad, log_prob)


@helper_inline
def _log_prob_loops_diag(X, start, n_rows, means, prec, log_const, trmm, W, const, centre, xT,
                         diffs, y, quad, rows, products, log_prob):
    _log_prob_diag_loops(xT, n_rows, means, prec, log_const, log_prob)


@helper_inline
def _log_prob_blas_full(X, start, n_rows, means, prec, log_const, trmm, W, const, centre, xT,
                        diffs, y, quad, rows, products, log_prob, bounds, dist, picked, lower,
                        mean_row):
    return _log_prob_full_blas(X, start, n_rows, means, prec, log_const, rows, log_prob, trmm,
                               bounds, dist, picked, lower, mean_row)


@helper_inline
def _log_prob_blas_diag(X, start, n_rows, means, prec, log_const, trmm, W, const, centre, xT,
                        diffs, y, quad, rows, products, log_prob):
    _log_prob_diag_gemm(rows, n_rows, W, const, products, log_prob)


@helper_inline
def _accumulate_loops_full(X, start, n_rows, means, resp, centred, xT, diffs, wdiff, zeros,
                           rows, gathered, gathered_weights, dense_resp, moments, syrk, nk, sx,
                           sxx):
    _moments_loops_full(xT, n_rows, means, resp, diffs, centred, wdiff, zeros, nk, sx, sxx)


@helper_inline
def _accumulate_loops_diag(X, start, n_rows, means, resp, centred, xT, diffs, wdiff, zeros,
                           rows, gathered, gathered_weights, dense_resp, moments, syrk, nk, sx,
                           sxx):
    # The diagonal loops leave no centred block behind.
    _moments_loops_diag(xT, n_rows, means, resp, diffs[0], zeros, nk, sx, sxx)


@helper_inline
def _accumulate_blas_full(X, start, n_rows, means, resp, centred, xT, diffs, wdiff, zeros,
                          rows, gathered, gathered_weights, dense_resp, moments, syrk, nk, sx,
                          sxx):
    _accumulate_full_blas(X, start, n_rows, means, resp, rows, nk, sx, sxx, syrk)


@helper_inline
def _accumulate_blas_diag(X, start, n_rows, means, resp, centred, xT, diffs, wdiff, zeros,
                          rows, gathered, gathered_weights, dense_resp, moments, syrk, nk, sx,
                          sxx):
    _accumulate_diag_moments(rows, n_rows, resp, nk, sx, sxx, gathered, gathered_weights,
                             dense_resp, moments)


@helper_inline
def _read_block_loops(X, start, n_rows, centre, xT, rows):
    transpose_block(X, start, n_rows, xT)


@helper_inline
def _read_block_blas_full(X, start, n_rows, centre, xT, rows):
    pass  # the products read X itself


@helper_inline
def _read_block_blas_diag(X, start, n_rows, centre, xT, rows):
    _centred_powers(X, start, n_rows, centre, rows)


# What each engine's pass is compiled with (bound as the body's globals).
_ENGINES = {
    ENGINE_LOOPS_FULL: dict(_engine_log_prob=_log_prob_loops_full,
                            _engine_accumulate=_accumulate_loops_full,
                            _engine_read_block=_read_block_loops,
                            _ENGINE_BLOCK=LOOPS_BLOCK_ROWS, _ENGINE_LOOPS=True, _ENGINE_FULL=True,
                            _ENGINE_DIAG_BLAS=False, _ENGINE_PRUNES=False),
    ENGINE_LOOPS_DIAG: dict(_engine_log_prob=_log_prob_loops_diag,
                            _engine_accumulate=_accumulate_loops_diag,
                            _engine_read_block=_read_block_loops,
                            _ENGINE_BLOCK=LOOPS_BLOCK_ROWS, _ENGINE_LOOPS=True, _ENGINE_FULL=False,
                            _ENGINE_DIAG_BLAS=False, _ENGINE_PRUNES=False),
    ENGINE_BLAS_FULL: dict(_engine_log_prob=_log_prob_blas_full,
                           _engine_accumulate=_accumulate_blas_full,
                           _engine_read_block=_read_block_blas_full,
                           _ENGINE_BLOCK=BLOCK_ROWS * BLAS_BLOCKS, _ENGINE_LOOPS=False,
                           _ENGINE_FULL=True, _ENGINE_DIAG_BLAS=False, _ENGINE_PRUNES=True),
    ENGINE_BLAS_DIAG: dict(_engine_log_prob=_log_prob_blas_diag,
                           _engine_accumulate=_accumulate_blas_diag,
                           _engine_read_block=_read_block_blas_diag,
                           _ENGINE_BLOCK=BLOCK_ROWS, _ENGINE_LOOPS=False, _ENGINE_FULL=False,
                           _ENGINE_DIAG_BLAS=True, _ENGINE_PRUNES=False),
}
_ENGINE_NAMES = {ENGINE_LOOPS_FULL: "loops_full", ENGINE_LOOPS_DIAG: "loops_diag",
                 ENGINE_BLAS_FULL: "blas_full", ENGINE_BLAS_DIAG: "blas_diag"}
# Placeholders the specialised copies rebind (the generic body is never compiled).
_engine_log_prob = _engine_accumulate = _engine_read_block = None
_ENGINE_BLOCK = BLOCK_ROWS
_ENGINE_LOOPS = _ENGINE_FULL = _ENGINE_DIAG_BLAS = _ENGINE_PRUNES = False


def _gaussian_pass(chunk_first, chunk_last, n_chunks, mode, X, sample_weight, labels, means,
                   prec, log_const, bounds, trmm, syrk, nk_parts, sx_parts, sxx_parts, ll_parts,
                   worst, worst_index, out, log_norm, far_count, far_flags, pruned):
    r"""Chunks ``[chunk_first, chunk_last)`` of one pass over X: the fused kernel.

    ``mode`` says what the pass computes for each row block:

    * ``MODE_STATISTICS``: the E-step and its statistics. With
      :math:`\ell_{nk} = \log\pi_k + \log\det U_k - \tfrac D2\log 2\pi -
      \tfrac12\lVert U_k^T(x_n-\mu_k)\rVert^2`, the responsibilities
      :math:`r_{nk} = e^{\ell_{nk}}/\sum_j e^{\ell_{nj}}` and the weighted sums

      .. math::

          N_k = \sum_n w_n r_{nk},\quad s_k = \sum_n w_n r_{nk}(x_n-\mu_k),\quad
          S_k = \sum_n w_n r_{nk}(x_n-\mu_k)(x_n-\mu_k)^T

      (or the diagonal of :math:`S_k`) go to chunk ``c``'s slots
      ``nk_parts[c], sx_parts[c], sxx_parts[c]``, and
      :math:`\sum_n w_n\log p(x_n)` and the worst-explained row of the chunk to
      ``ll_parts[c], worst[c], worst_index[c]`` (reduced by
      :func:`finish_statistics`, or by its NumPy twin
      :func:`fastem.stats.reduce_chunks` in the Python driver);
    * ``MODE_LABELS``: the same sums for one-hot responsibilities of
      ``labels`` (-1: the row belongs to no component) around ``means``;
    * ``MODE_LOG_RESP`` / ``MODE_PROBA``: :math:`\log r_{nk}` (or
      :math:`r_{nk}`) into ``out`` (N, K) and :math:`\log p(x_n)` into
      ``log_norm`` (N,);
    * ``MODE_LOG_NORM``: only :math:`\log p(x_n)` into ``log_norm``;
    * ``MODE_ARGMAX``: :math:`\arg\max_k \ell_{nk}` (the lowest k of a tie)
      into ``labels`` (N,) int32, and :math:`\log p(x_n)` into ``log_norm``
      unless it is empty. No (N, K) array is written.

    A row too far from every component for its log-densities to be
    represented (their exponentials sum below 1) is left out: it adds nothing
    to the sums and the worst row, its outputs are 0, ``far_flags[n]`` is set
    and ``far_count[c]`` counts it, for the caller to compute with
    :func:`far_rows` (``far_flags`` (N,) bool, False on entry).

    One compilation per engine (``gaussian_pass[engine]``): vectorised loops
    for D < 24 (``ENGINE_LOOPS_*``), BLAS for wide data (``ENGINE_BLAS_FULL``:
    dtrmm + dsyrk; ``ENGINE_BLAS_DIAG``: matrix products, or gathered sums
    when most responsibilities are exactly zero).

    Parameters
    ----------
    chunk_first, chunk_last, n_chunks : int
        The chunk range of this call, out of ``n_chunks`` (from
        :func:`fastem._kernels.chunks.n_chunks_for`).
    X : ndarray (N, D), float64 or float32, C-contiguous
    sample_weight : ndarray (N,) or (0,) for unit weights
    labels : ndarray (N,) int32: read in ``MODE_LABELS``, written in
        ``MODE_ARGMAX``, (0,) otherwise
    means : ndarray (K, D), the operands' precision (X's for the loop
        engines, float64 for BLAS)
    prec : ndarray
        (K, D, D) upper Cholesky factors of the precisions (full engines) or
        (K, D, 1) diagonal precisions :math:`1/\sigma^2`, means' dtype.
    log_const : ndarray (K,)
        :math:`\log\pi_k + \log\det U_k - \tfrac D2\log 2\pi`.
    bounds : ndarray (K, 2) or (0, 2)
        Exact pruning of the full BLAS engine (see ``_log_prob_full_blas``;
        ``MODE_LOG_RESP`` and ``MODE_LABELS`` never prune): half the smallest
        and largest eigenvalues of each precision, widened for rounding, or
        empty for no pruning. ``pruned[c]`` counts chunk c's skipped pairs.
    trmm, syrk : ctypes functions
        ``dtrmm`` and ``dsyrk`` from ``scipy.linalg.cython_blas``, passed in so
        the compiled kernel holds no process-specific address.

    Twins: :func:`fastem.reference.sufficient_statistics`,
    :func:`fastem.reference.statistics_from_labels` and
    :func:`fastem.reference.log_responsibilities`.
    """
    n_samples, n_features = X.shape
    n_components = means.shape[0]
    block = _ENGINE_BLOCK
    loops = block if _ENGINE_LOOPS else 0
    wide = 0 if _ENGINE_LOOPS else block
    diag_blas = block if _ENGINE_DIAG_BLAS else 0
    if _ENGINE_DIAG_BLAS:
        centre, W, const = _diag_gemm_operands(means, prec, log_const)
    else:
        centre, W, const = np.empty(0), np.empty((0, 0)), np.empty(0)
    accumulates = mode == MODE_STATISTICS or mode == MODE_LABELS
    predicts = (mode == MODE_LOG_RESP or mode == MODE_PROBA or mode == MODE_LOG_NORM
                or mode == MODE_ARGMAX)
    # Scratch of one call, reused chunk after chunk (each engine allocates its own).
    xT = np.empty((n_features, loops), dtype=X.dtype)
    diffs = np.empty((n_components if _ENGINE_FULL else 1, n_features, loops), dtype=X.dtype)
    # The loops engine's factors U_k, columns padded to a multiple of four.
    y = np.empty((n_components if loops and _ENGINE_FULL else 0, n_features,
                  (n_features + 3) // 4 * 4), dtype=X.dtype)
    quad = np.empty(loops, dtype=X.dtype)
    wdiff = np.empty((n_features, loops), dtype=X.dtype)
    zeros = np.zeros(loops, dtype=X.dtype)
    contributions = np.empty(block)
    rows = np.empty((wide, n_features * (1 if _ENGINE_FULL else 2)))
    products = np.empty((diag_blas, n_components))
    gathered = np.empty(diag_blas, dtype=np.int64)
    gathered_weights = np.empty(diag_blas)
    dense_resp = np.empty(n_components * diag_blas)
    moments = np.empty((n_components, 2 * n_features if diag_blas else 0))
    # Responsibilities in the operands' precision: float32 data gets float32
    # ones (as in scikit-learn), and twice the lanes per vector.
    log_prob = np.empty((n_components, block), dtype=means.dtype)
    row_max = np.empty(block, dtype=means.dtype)
    row_sum = np.empty(block, dtype=means.dtype)
    expo = np.empty(block, dtype=means.dtype)
    bits = np.empty(block, dtype=np.int64)
    norms = np.empty(block)
    sums = np.empty(block)
    log_sums = np.empty(block)
    far = np.zeros(block, dtype=np.bool_)
    weighted = sample_weight.shape[0] > 0
    if _ENGINE_PRUNES:
        prunes = bounds.shape[0] > 0 and (mode == MODE_STATISTICS or mode == MODE_PROBA
                                          or mode == MODE_ARGMAX or mode == MODE_LOG_NORM)
        dist = np.empty((n_components if prunes else 0, block))
        picked = np.empty(block, dtype=np.int64)
        lower = np.empty(block)
        mean_row = np.empty(n_features, dtype=X.dtype)
        no_bounds = bounds[:0]
        rest = 0  # blocks to go before pruning is tried again
    for c in range(chunk_first, chunk_last):
        first, last = chunk_rows(c, n_chunks, n_samples)
        nk, sx, sxx = nk_parts[c], sx_parts[c], sxx_parts[c]
        loglik = 0.0
        worst_c = np.inf
        worst_i = 0
        for start in range(first, last, block):
            n_rows = min(block, last - start)
            # The loop engines' sums run over whole vectors of rows: the
            # responsibilities of the rows past the block's end are 0.
            n_pad = _padded(n_rows, zeros) if _ENGINE_LOOPS else n_rows
            # The block as the engine reads it (one copy of that code per pass).
            _engine_read_block(X, start, n_rows, centre, xT, rows)
            if mode == MODE_LABELS:
                for k in range(n_components):
                    for r in range(n_pad):
                        log_prob[k, r] = 0.0
                for r in range(n_rows):
                    label = labels[start + r]
                    if label >= 0:
                        log_prob[label, r] = sample_weight[start + r] if weighted else 1.0
            else:
                if _ENGINE_PRUNES:
                    tries = prunes and rest == 0
                    skipped = _engine_log_prob(X, start, n_rows, means, prec, log_const, trmm,
                                               W, const, centre, xT, diffs, y, quad, rows,
                                               products, log_prob,
                                               bounds if tries else no_bounds, dist, picked,
                                               lower, mean_row)
                    pruned[c] += skipped
                    if tries and skipped < PRUNE_WORTHWHILE * n_components * n_rows:
                        rest = PRUNE_REST
                    elif rest > 0:
                        rest -= 1
                else:
                    _engine_log_prob(X, start, n_rows, means, prec, log_const, trmm, W, const,
                                     centre, xT, diffs, y, quad, rows, products, log_prob)
                # log-sum-exp per row, shifted by the row's largest term so far
                # outliers do not underflow to NaN; e^(l - max) replaces l.
                for r in range(n_rows):
                    row_max[r] = log_prob[0, r]
                for k in range(1, n_components):
                    for r in range(n_rows):
                        row_max[r] = max(row_max[r], log_prob[k, r])
                if mode == MODE_ARGMAX:
                    # The first component of the largest weighted log-density
                    # (as scikit-learn's predict); the lowest k is written last.
                    for r in range(n_rows):
                        labels[start + r] = 0
                    for k in range(n_components - 1, -1, -1):
                        for r in range(n_rows):
                            if log_prob[k, r] == row_max[r]:
                                labels[start + r] = k
                for r in range(n_rows):
                    row_sum[r] = 0.0
                keep_log = mode == MODE_LOG_RESP
                for k in range(n_components):
                    # A separate output buffer: in place, LLVM must assume
                    # aliasing and gives up vectorising.
                    exp_block(log_prob[k], row_max, expo, bits, n_rows)
                    for r in range(n_rows):
                        row_sum[r] += expo[r]
                    if keep_log:
                        # l - max, stored: log r = (l - max) - log(sum), in that
                        # order (log(sum) vanishes next to a huge max).
                        for r in range(n_rows):
                            log_prob[k, r] -= row_max[r]
                    else:
                        for r in range(n_rows):
                            log_prob[k, r] = expo[r]
                # log p(x) = max + log(sum), the logarithms vectorised.
                for r in range(n_rows):
                    sums[r] = np.float64(row_sum[r])
                log_normal_positive(sums, log_sums, bits, n_rows)
                for r in range(n_rows):
                    norms[r] = np.float64(row_max[r]) + log_sums[r]
                # The largest term contributes exactly 1: a smaller sum means the
                # row's log-densities overflowed to -inf (or NaN), i.e. a row
                # farther from every component than the operands can measure.
                n_far = 0
                for r in range(n_rows):
                    far[r] = not row_sum[r] >= 1.0
                    n_far += far[r]
                if n_far:
                    # Left to the caller (far_rows, a kernel compiled only when
                    # such rows occur): flagged, they add nothing here.
                    far_count[c] += n_far
                    for r in range(n_rows):
                        if far[r]:
                            far_flags[start + r] = True
                            row_sum[r] = 1.0
                            norms[r] = 0.0
                            for k in range(n_components):
                                log_prob[k, r] = 0.0
            if mode == MODE_STATISTICS:
                # w_r / sum_k e^(l - max): responsibilities times the row weight.
                for r in range(n_rows):
                    scale = 1.0 / np.float64(row_sum[r])
                    if weighted:
                        scale *= sample_weight[start + r]
                    row_sum[r] = scale
                for k in range(n_components):
                    for r in range(n_rows):
                        log_prob[k, r] *= row_sum[r]
                    for r in range(n_rows, n_pad):
                        log_prob[k, r] = 0.0
                if weighted:
                    for r in range(n_rows):
                        contributions[r] = sample_weight[start + r] * norms[r]
                    loglik += sum_rows(contributions, n_rows)
                else:
                    loglik += sum_rows(norms, n_rows)
                for r in range(n_rows):
                    w = sample_weight[start + r] if weighted else 1.0
                    if w > 0.0 and not far[r] and norms[r] < worst_c:
                        worst_c = norms[r]
                        worst_i = start + r
            elif predicts:
                if log_norm.shape[0] > 0:
                    for r in range(n_rows):
                        log_norm[start + r] = norms[r]
                if mode == MODE_PROBA:
                    for r in range(n_rows):
                        scale = 1.0 / np.float64(row_sum[r])
                        for k in range(n_components):
                            out[start + r, k] = log_prob[k, r] * scale
                elif mode == MODE_LOG_RESP:
                    for r in range(n_rows):
                        # log_prob holds l - max (far rows: 0, for the caller).
                        log_sum = 0.0 if far[r] else log_sums[r]
                        for k in range(n_components):
                            out[start + r, k] = np.float64(log_prob[k, r]) - log_sum
            if accumulates:
                _engine_accumulate(X, start, n_rows, means, log_prob, mode == MODE_STATISTICS,
                                   xT, diffs, wdiff, zeros, rows, gathered, gathered_weights,
                                   dense_resp, moments, syrk, nk, sx, sxx)
        ll_parts[c] = loglik
        worst[c] = worst_c
        worst_index[c] = worst_i


def _specialised_pass(engine):
    return specialise(_gaussian_pass, f"_gaussian_pass_{_ENGINE_NAMES[engine]}",
                      **_ENGINES[engine])


# The pass of each engine as a kernel, called from Python and from the
# compiled EM loops alike.
gaussian_pass = {engine: njit(cache=True, error_model="numpy", nogil=True)(
    _specialised_pass(engine)) for engine in _ENGINES}


@njit(cache=True, error_model="numpy")
def finish_statistics(engine, means, nk_parts, sx_parts, sxx_parts, ll_parts, worst,
                      worst_index):
    """Reduce a pass's per-chunk statistics in chunk order (deterministic).

    Returns ``nk, sx, sxx`` around ``means`` (the upper triangle of full
    scatter matrices mirrored into the lower one) and the total
    log-likelihood, the lowest :math:`\\log p(x_n)` and its row. The compiled EM loop
    calls it; the Python driver calls its NumPy twin,
    :func:`fastem.stats.reduce_chunks` (the same additions in the same order).
    """
    n_chunks, n_components, n_features, width = sxx_parts.shape
    nk = np.zeros(n_components)
    sx = np.zeros((n_components, n_features))
    sxx = np.zeros((n_components, n_features, width))
    loglik = 0.0
    best = np.inf
    best_index = 0
    for c in range(n_chunks):
        for k in range(n_components):
            nk[k] += nk_parts[c, k]
            for i in range(n_features):
                sx[k, i] += sx_parts[c, k, i]
                for j in range(width):
                    sxx[k, i, j] += sxx_parts[c, k, i, j]
        loglik += ll_parts[c]
        if worst[c] < best:
            best = worst[c]
            best_index = worst_index[c]
    if width > 1:
        for k in range(n_components):
            for i in range(n_features):
                for j in range(i):
                    sxx[k, i, j] = sxx[k, j, i]
    if engine == ENGINE_BLAS_DIAG:
        # The diagonal GEMM engine's moments are around c (see
        # _diag_gemm_operands): move them to each component's mean.
        centre = _mean_of_means(means)
        for k in range(n_components):
            for d in range(n_features):
                delta = means[k, d] - centre[d]
                sxx[k, d, 0] += -2.0 * delta * sx[k, d] + nk[k] * delta * delta
                sx[k, d] -= nk[k] * delta
    return nk, sx, sxx, loglik, best, best_index
