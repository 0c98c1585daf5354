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
from numba import njit, prange

from ._blocks import (
    BLOCK_ROWS,
    chunk_rows,
    compile_twice,
    log_sum_exp_block,
    normalise_block,
    reduce_statistics,
    transpose_block,
)

# Reassociation lets LLVM vectorise the dot-product reductions over rows. NaN
# and infinity stay allowed: log-weights of empty components are -inf.
_FAST = {"reassoc", "contract", "nsz", "arcp"}
# The BLAS engine for full covariances works on this many blocks of rows at a
# time (dtrmm and dsyrk run closer to peak on them; the diagonal one does not).
BLAS_BLOCKS = 4
# Below this fraction of non-zero responsibilities in a block, the diagonal
# engine's moments skip the zeros instead of multiplying them (measured
# break-even at D=50, K=20: about 0.37).
SPARSE_DENSITY = 0.35


_LOG_2PI = math.log(2.0 * math.pi)


@njit(cache=True)
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
            prec[k] = prec_chol[source]
            for d in range(n_features):
                log_det += math.log(prec_chol[source, d, d])
        else:
            for d in range(n_features):
                u = prec_chol[k, 0 if kind == 3 else d, 0]
                prec[k, d, 0] = u * u
                log_det += math.log(u)
        log_const[k] = math.log(weights[k]) + log_det - 0.5 * n_features * _LOG_2PI
    return prec, log_const


@njit(cache=True, fastmath=_FAST)
def _centre(xT, n_rows, mean, diff):
    """diff[d, r] = xT[d, r] - mean[d]."""
    for d in range(xT.shape[0]):
        m = mean[d]
        for r in range(n_rows):
            diff[d, r] = xT[d, r] - m


@njit(cache=True, fastmath=_FAST)
def _log_prob_full_loops(xT, n_rows, means, prec_chol, log_const, diffs, y, quad, log_prob):
    """log_prob[k, r] = log_const[k] - ||(x_r - mu_k) U_k||^2 / 2 (U upper).

    y = (x - mu_k) U_k is built in 2 x 2 tiles: two columns of y from two rows
    of ``diff`` at a time, which halves the loads of this load-bound loop.
    ``y`` holds two row buffers. The quadratic form is computed in X's
    precision, so float32 data runs twice as many rows per vector.
    """
    n_components, n_features = means.shape
    y2 = y[BLOCK_ROWS:]
    for k in range(n_components):
        # The centred block of every component is kept (diffs[k]) for the
        # accumulation that follows the normalisation.
        diff = diffs[k]
        _centre(xT, n_rows, means[k], diff)
        for r in range(n_rows):
            quad[r] = 0.0
        for j in range(0, n_features, 2):
            two = j + 1 < n_features
            for r in range(n_rows):
                y[r] = 0.0
                y2[r] = 0.0
            for i in range(0, j, 2):  # rows i, i + 1 <= j: both columns see them
                a0 = prec_chol[k, i, j]
                a1 = prec_chol[k, i + 1, j]
                b0 = prec_chol[k, i, j + 1] if two else 0.0
                b1 = prec_chol[k, i + 1, j + 1] if two else 0.0
                for r in range(n_rows):
                    d0 = diff[i, r]
                    d1 = diff[i + 1, r]
                    y[r] += d0 * a0 + d1 * a1
                    y2[r] += d0 * b0 + d1 * b1
            a0 = prec_chol[k, j, j]
            if two:
                b0 = prec_chol[k, j, j + 1]
                b1 = prec_chol[k, j + 1, j + 1]
                for r in range(n_rows):
                    d0 = diff[j, r]
                    y[r] += d0 * a0
                    y2[r] += d0 * b0 + diff[j + 1, r] * b1
            else:
                for r in range(n_rows):
                    y[r] += diff[j, r] * a0
            for r in range(n_rows):
                quad[r] += y[r] * y[r] + y2[r] * y2[r]
        for r in range(n_rows):
            log_prob[k, r] = log_const[k] - 0.5 * quad[r]


@njit(cache=True, fastmath=_FAST)
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
                log_prob[k, r] += p * t * t
        for r in range(n_rows):
            log_prob[k, r] = log_const[k] - 0.5 * log_prob[k, r]


@njit(cache=True, fastmath=_FAST)
def _scatter_upper(wdiff, diff, n_rows, out, zero):
    """out[i, j] += sum_r wdiff[i, r] diff[j, r] for j >= i, in 2 x 2 tiles.

    A tile loads two rows of each operand for four products, half the loads
    of one dot product at a time (the loop is load-bound). Diagonal tiles also
    add one entry below the diagonal, which the final mirroring overwrites.
    """
    n_features = diff.shape[0]
    for i in range(0, n_features, 2):
        if i + 1 == n_features:
            acc = zero
            for r in range(n_rows):
                acc += wdiff[i, r] * diff[i, r]
            out[i, i] += acc
            continue
        for j in range(i, n_features, 2):
            a00 = zero
            a10 = zero
            if j + 1 == n_features:
                for r in range(n_rows):
                    d0 = diff[j, r]
                    a00 += wdiff[i, r] * d0
                    a10 += wdiff[i + 1, r] * d0
                out[i, j] += a00
                out[i + 1, j] += a10
                continue
            a01 = zero
            a11 = zero
            for r in range(n_rows):
                w0 = wdiff[i, r]
                w1 = wdiff[i + 1, r]
                d0 = diff[j, r]
                d1 = diff[j + 1, r]
                a00 += w0 * d0
                a01 += w0 * d1
                a10 += w1 * d0
                a11 += w1 * d1
            out[i, j] += a00
            out[i, j + 1] += a01
            out[i + 1, j] += a10
            out[i + 1, j + 1] += a11


@njit(cache=True, fastmath=_FAST)
def _accumulate_loops(xT, n_rows, means, resp, diffs, centred, wdiff, nk, sx, sxx, full):
    """Add the block's weighted first and second moments around the means.

    With ``centred``, ``diffs[k]`` already holds the block centred on mean k
    (left by the E-step); otherwise it is centred here, in ``diffs[0]``. Sums
    over the block's rows (at most ``BLOCK_ROWS``) are taken in X's
    precision, every total across blocks in float64.
    """
    n_components, n_features = means.shape
    for k in range(n_components):
        diff = diffs[k] if centred else diffs[0]
        if not centred:
            _centre(xT, n_rows, means[k], diff)
        total = 0.0
        for r in range(n_rows):
            total += resp[k, r]
        nk[k] += total
        zero = diff.dtype.type(0)
        for i in range(n_features):
            acc = zero
            for r in range(n_rows):
                wdiff[i, r] = resp[k, r] * diff[i, r]
                acc += wdiff[i, r]
            sx[k, i] += acc
        if full:
            _scatter_upper(wdiff, diff, n_rows, sxx[k], zero)
        else:
            for i in range(n_features):
                acc = zero
                for r in range(n_rows):
                    acc += wdiff[i, r] * diff[i, r]
                sxx[k, i, 0] += acc


@njit(cache=True)
def _blas_scalars(n_features, n_rows):
    """Fortran-style by-reference arguments: chars L, N and sizes."""
    chars = np.array([ord("L"), ord("N")], dtype=np.uint8)
    sizes = np.array([n_features, n_rows], dtype=np.int32)
    ones = np.ones(1)
    return chars, sizes, ones


@njit(cache=True, fastmath=_FAST)
def _centre_rows(X, start, n_rows, mean, rows):
    """rows[r, d] = X[start + r, d] - mean[d] (row-major, as BLAS wants it)."""
    for r in range(n_rows):
        for d in range(X.shape[1]):
            rows[r, d] = X[start + r, d] - mean[d]


@njit(cache=True, fastmath=_FAST)
def _log_prob_full_blas(X, start, n_rows, means, prec_chol, log_const, rows, log_prob, trmm):
    """As the loop engine, with (x - mu_k) U_k computed by one dtrmm per component.

    A row-major (rows, D) block is a column-major (D, rows) matrix and the
    row-major upper U_k a column-major lower one, so the product is
    ``B := L B`` with L = U_k^T in BLAS terms.
    """
    n_components, n_features = means.shape
    chars, sizes, ones = _blas_scalars(n_features, n_rows)
    left = chars[0:1]
    no = chars[1:2]
    for k in range(n_components):
        _centre_rows(X, start, n_rows, means[k], rows)
        trmm(left.ctypes, left.ctypes, no.ctypes, no.ctypes, sizes[0:1].ctypes,
             sizes[1:2].ctypes, ones.ctypes, prec_chol[k].ctypes, sizes[0:1].ctypes,
             rows.ctypes, sizes[0:1].ctypes)
        for r in range(n_rows):
            q = 0.0
            for d in range(n_features):
                q += rows[r, d] * rows[r, d]
            log_prob[k, r] = log_const[k] - 0.5 * q


@njit(cache=True, fastmath=_FAST)
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


@njit(cache=True)
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
    centre = np.zeros(n_features)
    for k in range(n_components):
        centre += means[k]
    centre /= n_components
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


@njit(cache=True, fastmath=_FAST)
def _centred_powers(X, start, n_rows, centre, Z):
    """Z[r] = [x_r - c, (x_r - c)^2] (row-major, float64)."""
    n_features = X.shape[1]
    for r in range(n_rows):
        for d in range(n_features):
            z = X[start + r, d] - centre[d]
            Z[r, d] = z
            Z[r, n_features + d] = z * z


@njit(cache=True)
def _log_prob_diag_gemm(Z, n_rows, W, const, L, log_prob):
    """log_prob[k, r] = const_k + (Z W)[r, k] by one matrix product (into scratch ``L``)."""
    np.dot(Z[:n_rows], W, L[:n_rows])
    for k in range(W.shape[1]):
        for r in range(n_rows):
            log_prob[k, r] = const[k] + L[r, k]


@njit(cache=True, fastmath=_FAST)
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
        total = 0.0
        for i in range(count):
            total += weights[i]
        nk[k] += total
        acc = moments[k]
        for j in range(width):
            acc[j] = 0.0
        quads = count - count % 4
        for i in range(0, quads, 4):
            r0, r1, r2, r3 = rows[i], rows[i + 1], rows[i + 2], rows[i + 3]
            w0, w1, w2, w3 = weights[i], weights[i + 1], weights[i + 2], weights[i + 3]
            for j in range(width):
                acc[j] += w0 * Z[r0, j] + w1 * Z[r1, j] + w2 * Z[r2, j] + w3 * Z[r3, j]
        for i in range(quads, count):
            r0 = rows[i]
            w0 = weights[i]
            for j in range(width):
                acc[j] += w0 * Z[r0, j]
        for d in range(n_features):
            sx[k, d] += acc[d]
            sxx[k, d, 0] += acc[n_features + d]


@njit(cache=True)
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
    # Contiguous operands and output, as np.dot needs.
    R = dense_resp[:n_components * n_rows].reshape((n_components, n_rows))
    R[:, :] = resp[:, :n_rows]
    np.dot(R, Z[:n_rows], moments)
    for k in range(n_components):
        total = 0.0
        for r in range(n_rows):
            total += R[k, r]
        nk[k] += total
        for d in range(n_features):
            sx[k, d] += moments[k, d]
            sxx[k, d, 0] += moments[k, n_features + d]


@njit(cache=True)
def _recentre_diag(nk, sx, sxx, means, centre):
    """Moments around c turned into moments around each component's mean."""
    for k in range(means.shape[0]):
        for d in range(means.shape[1]):
            delta = means[k, d] - centre[d]
            sxx[k, d, 0] += -2.0 * delta * sx[k, d] + nk[k] * delta * delta
            sx[k, d] -= nk[k] * delta


@njit(cache=True)
def _block_loglik(log_norm, n_rows, sample_weight, start, worst, worst_index, c):
    """Weighted sum of log p(x) over the block; tracks the worst-explained row."""
    total = 0.0
    weighted = sample_weight.shape[0] > 0
    for r in range(n_rows):
        w = sample_weight[start + r] if weighted else 1.0
        total += w * log_norm[r]
        if w > 0.0 and log_norm[r] < worst[c]:
            worst[c] = log_norm[r]
            worst_index[c] = start + r
    return total


@njit(cache=True)
def _block_scratch(X, means, full_covariance, use_blas, log_prob_like):
    """Scratch of one chunk's walk over its blocks, allocated once per chunk.

    Returns ``(block, xT, diffs, y, quad, rows, products, log_prob)``: the
    block length and the buffers of :func:`_block_log_prob` (each engine's
    own are allocated, the others' are empty). ``log_prob`` has the dtype
    of ``log_prob_like``.
    """
    n_features = X.shape[1]
    n_components = means.shape[0]
    block = BLOCK_ROWS * (BLAS_BLOCKS if use_blas and full_covariance else 1)
    loops = 0 if use_blas else block
    xT = np.empty((n_features, loops), dtype=X.dtype)
    diffs = np.empty((n_components if full_covariance else 1, n_features, loops), dtype=X.dtype)
    y = np.empty(2 * loops, dtype=X.dtype)
    quad = np.empty(loops, dtype=X.dtype)
    rows = np.empty((block if use_blas else 0, n_features * (1 if full_covariance else 2)))
    products = np.empty((block if use_blas and not full_covariance else 0, n_components))
    log_prob = np.empty((n_components, block), dtype=log_prob_like.dtype)
    return block, xT, diffs, y, quad, rows, products, log_prob


@njit(cache=True)
def _row_scratch(block, log_prob):
    """``row_max, row_sum, expo, bits, log_norm`` of :func:`log_sum_exp_block`."""
    dtype = log_prob.dtype
    return (np.empty(block, dtype=dtype), np.empty(block, dtype=dtype),
            np.empty(block, dtype=dtype), np.empty(block, dtype=np.int64), np.empty(block))


@njit(cache=True)
def _block_log_prob(X, start, n_rows, means, prec, log_const, full_covariance, use_blas, trmm,
                    centre, W, const, xT, diffs, y, quad, rows, products, log_prob):
    """log_prob[k, r] = log pi_k N(x_{start+r} | k) by the engine for this shape.

    Leaves what the same engine's accumulation reuses in the scratch: the
    transposed block and the centred differences (loops), the centred rows
    or ``[z, z^2]`` (BLAS).
    """
    if use_blas and full_covariance:
        _log_prob_full_blas(X, start, n_rows, means, prec, log_const, rows, log_prob, trmm)
    elif use_blas:
        _centred_powers(X, start, n_rows, centre, rows)
        _log_prob_diag_gemm(rows, n_rows, W, const, products, log_prob)
    else:
        transpose_block(X, start, n_rows, xT)
        if full_covariance:
            _log_prob_full_loops(xT, n_rows, means, prec, log_const, diffs, y, quad, log_prob)
        else:
            _log_prob_diag_loops(xT, n_rows, means, prec, log_const, log_prob)


@njit(cache=True)
def _statistics_chunk(X, sample_weight, first, last, means, prec, log_const, full_covariance,
                      use_blas, trmm, syrk, centre, W, const, nk, sx, sxx):
    """Statistics of rows [first, last) into nk, sx, sxx; returns (loglik, worst, index)."""
    n_features = X.shape[1]
    # Responsibilities in the operands' precision (X's for the loop engine,
    # float64 for BLAS): float32 data gets float32 ones, as in scikit-learn.
    block, xT, diffs, y, quad, rows, products, log_prob = _block_scratch(
        X, means, full_covariance, use_blas, means)
    wdiff = np.empty((n_features, 0 if use_blas else block), dtype=X.dtype)
    row_max, row_sum, expo, bits, log_norm = _row_scratch(block, log_prob)
    diag_blas = block if use_blas and not full_covariance else 0
    gathered = np.empty(diag_blas, dtype=np.int64)
    gathered_weights = np.empty(diag_blas)
    dense_resp = np.empty(means.shape[0] * diag_blas)
    moments = np.empty((means.shape[0], 2 * n_features if diag_blas else 0))
    worst = np.full(1, np.inf)
    worst_index = np.zeros(1, dtype=np.int64)
    loglik = 0.0
    for start in range(first, last, block):
        n_rows = min(block, last - start)
        _block_log_prob(X, start, n_rows, means, prec, log_const, full_covariance, use_blas, trmm,
                        centre, W, const, xT, diffs, y, quad, rows, products, log_prob)
        normalise_block(log_prob, n_rows, sample_weight, start, log_norm, row_max, row_sum, bits,
                        expo)
        loglik += _block_loglik(log_norm, n_rows, sample_weight, start, worst, worst_index, 0)
        if use_blas and full_covariance:
            _accumulate_full_blas(X, start, n_rows, means, log_prob, rows, nk, sx, sxx, syrk)
        elif use_blas:
            _accumulate_diag_moments(rows, n_rows, log_prob, nk, sx, sxx, gathered,
                                     gathered_weights, dense_resp, moments)
        else:
            _accumulate_loops(xT, n_rows, means, log_prob, diffs, full_covariance, wdiff, nk,
                              sx, sxx, full_covariance)
    return loglik, worst[0], worst_index[0]


def _gaussian_statistics(X, sample_weight, means, prec, log_const, full_covariance, use_blas,
                         trmm, syrk, n_chunks):
    r"""Fused E-step and sufficient statistics for a Gaussian mixture.

    Parameters
    ----------
    X : ndarray (N, D), float64 or float32, C-contiguous
    sample_weight : ndarray (N,) or (0,) for unit weights
    means : ndarray (K, D), X's dtype
    prec : ndarray
        (K, D, D) upper Cholesky factors of the precisions when
        ``full_covariance``, else (K, D, 1) diagonal precisions
        :math:`1/\sigma^2`; X's dtype (float64 for the BLAS engine).
    log_const : ndarray (K,)
        :math:`\log\pi_k + \log\det U_k - \tfrac D2\log 2\pi`.
    full_covariance : bool
        Accumulate the full scatter (K, D, D) instead of its diagonal.
    use_blas : bool
        BLAS engine (dtrmm + dsyrk for full covariances, matrix products or
        gathered sums for diagonal ones), else the loop engine.
    trmm, syrk : ctypes functions
        ``dtrmm`` and ``dsyrk`` from ``scipy.linalg.cython_blas``.
    n_chunks : int
        From :func:`fastem._kernels._blocks.n_chunks_for`.

    Returns
    -------
    nk : (K,), sx : (K, D), sxx : (K, D, D) or (K, D, 1),
    loglik : float (:math:`\sum_n w_n \log p(x_n)`),
    worst_loglik, worst_index : the lowest :math:`\log p(x_n)` and its row
    """
    n_samples, n_features = X.shape
    n_components = means.shape[0]
    width = n_features if full_covariance else 1
    nk_parts = np.zeros((n_chunks, n_components))
    sx_parts = np.zeros((n_chunks, n_components, n_features))
    sxx_parts = np.zeros((n_chunks, n_components, n_features, width))
    ll_parts = np.zeros(n_chunks)
    worst = np.full(n_chunks, np.inf)
    worst_index = np.zeros(n_chunks, dtype=np.int64)
    centre, W, const = _diag_gemm_operands(means, prec, log_const)
    for c in prange(n_chunks):
        first, last = chunk_rows(c, n_chunks, n_samples)
        ll_parts[c], worst[c], worst_index[c] = _statistics_chunk(
            X, sample_weight, first, last, means, prec, log_const, full_covariance, use_blas,
            trmm, syrk, centre, W, const, nk_parts[c], sx_parts[c], sxx_parts[c])
    nk, sx, sxx = reduce_statistics(nk_parts, sx_parts, sxx_parts, full_covariance)
    if use_blas and not full_covariance:
        _recentre_diag(nk, sx, sxx, means, centre)
    loglik = 0.0
    best = np.inf
    best_index = 0
    for c in range(n_chunks):
        loglik += ll_parts[c]
        if worst[c] < best:
            best = worst[c]
            best_index = worst_index[c]
    return nk, sx, sxx, loglik, best, best_index


# One body, two compilations: the parallel kernel for the fitting loop and a
# serial one for EM loops that run entirely in compiled code on small data.
# Both walk the same chunks and reduce them in the same order. Each is
# bit-exact under any thread count; the two agree to a few ulps (LLVM may
# inline and vectorise a fastmath helper differently in each, e.g. when one
# was loaded from Numba's cache).
gaussian_statistics, gaussian_statistics_serial = compile_twice(
    _gaussian_statistics, "_gaussian_statistics_serial")


@njit(cache=True)
def _log_resp_chunk(X, first, last, means, prec, log_const, full_covariance, use_blas, trmm,
                    centre, W, const, probabilities, out, log_norm):
    """Rows [first, last) of ``out`` and ``log_norm`` (log-sum-exp per row)."""
    n_components = means.shape[0]
    # Predictions keep the log-densities in float64 whatever X's precision.
    block, xT, diffs, y, quad, rows, products, log_prob = _block_scratch(
        X, means, full_covariance, use_blas, log_norm)
    row_max, row_sum, expo, bits, norms = _row_scratch(block, log_prob)
    for start in range(first, last, block):
        n_rows = min(block, last - start)
        _block_log_prob(X, start, n_rows, means, prec, log_const, full_covariance, use_blas, trmm,
                        centre, W, const, xT, diffs, y, quad, rows, products, log_prob)
        log_sum_exp_block(log_prob, n_rows, norms, row_max, row_sum, bits, expo, probabilities)
        for r in range(n_rows):
            log_norm[start + r] = norms[r]
        if probabilities:
            for r in range(n_rows):
                scale = 1.0 / np.float64(row_sum[r])
                for k in range(n_components):
                    out[start + r, k] = log_prob[k, r] * scale
        else:
            for r in range(n_rows):
                for k in range(n_components):
                    out[start + r, k] = log_prob[k, r] - norms[r]


def _gaussian_log_resp(X, means, prec, log_const, full_covariance, use_blas, trmm, n_chunks,
                       probabilities, out, log_norm):
    r"""Per-row log-responsibilities and log p(x) (for predict_proba / score_samples).

    .. math::

        \log p(x_n) = \log\sum_k \pi_k\,\mathcal N(x_n\mid\mu_k,\Sigma_k), \qquad
        \log r_{nk} = \log\pi_k\,\mathcal N(x_n\mid\mu_k,\Sigma_k) - \log p(x_n)

    Fills ``out`` (N, K) with :math:`\log r_{nk}`, or with :math:`r_{nk}`
    itself when ``probabilities``, and ``log_norm`` (N,) in place, chunk by
    chunk, with the same block engines as the fitting pass (other arguments
    as in :func:`_gaussian_statistics`).
    """
    n_samples = X.shape[0]
    centre, W, const = _diag_gemm_operands(means, prec, log_const)
    for c in prange(n_chunks):
        first, last = chunk_rows(c, n_chunks, n_samples)
        _log_resp_chunk(X, first, last, means, prec, log_const, full_covariance, use_blas, trmm,
                        centre, W, const, probabilities, out, log_norm)


gaussian_log_resp = compile_twice(_gaussian_log_resp, "_gaussian_log_resp_serial")
