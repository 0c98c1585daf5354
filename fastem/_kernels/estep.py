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

Twins: :func:`fastem.reference.log_responsibilities` and
:func:`fastem.reference.sufficient_statistics`.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._blocks import BLOCK_ROWS, chunk_rows, load_centred, normalise_block, reduce_statistics

# Reassociation lets LLVM vectorise the dot-product reductions over rows. NaN
# and infinity stay allowed: log-weights of empty components are -inf.
_FAST = {"reassoc", "contract", "nsz", "arcp"}


@njit(cache=True, fastmath=_FAST)
def _block_log_prob_full(X, start, n_rows, means, prec_chol, log_const, diff, y, log_prob):
    """log_prob[k, r] = log_const[k] - ||(x_r - mu_k) U_k||^2 / 2."""
    n_components, n_features = means.shape
    for k in range(n_components):
        load_centred(X, start, n_rows, means[k], diff)
        for r in range(n_rows):
            log_prob[k, r] = 0.0
        for j in range(n_features):
            for r in range(n_rows):
                y[r] = 0.0
            for i in range(j + 1):
                u = prec_chol[k, i, j]
                for r in range(n_rows):
                    y[r] += diff[i, r] * u
            for r in range(n_rows):
                log_prob[k, r] += y[r] * y[r]
        for r in range(n_rows):
            log_prob[k, r] = log_const[k] - 0.5 * log_prob[k, r]


@njit(cache=True, fastmath=_FAST)
def _block_log_prob_diag(X, start, n_rows, means, precisions, log_const, diff, log_prob):
    """log_prob[k, r] = log_const[k] - sum_d p_kd (x_rd - mu_kd)^2 / 2.

    ``precisions`` is (K, D, 1) so that both flavours share one signature.
    """
    n_components, n_features = means.shape
    for k in range(n_components):
        load_centred(X, start, n_rows, means[k], diff)
        for r in range(n_rows):
            log_prob[k, r] = 0.0
        for d in range(n_features):
            p = precisions[k, d, 0]
            for r in range(n_rows):
                log_prob[k, r] += p * diff[d, r] * diff[d, r]
        for r in range(n_rows):
            log_prob[k, r] = log_const[k] - 0.5 * log_prob[k, r]


@njit(cache=True, fastmath=_FAST)
def _block_accumulate(X, start, n_rows, means, resp, diff, wdiff, nk, sx, sxx, full):
    """Add the block's weighted first and second moments around the means."""
    n_components, n_features = means.shape
    for k in range(n_components):
        load_centred(X, start, n_rows, means[k], diff)
        total = 0.0
        for r in range(n_rows):
            total += resp[k, r]
        nk[k] += total
        for i in range(n_features):
            acc = 0.0
            for r in range(n_rows):
                wdiff[i, r] = resp[k, r] * diff[i, r]
                acc += wdiff[i, r]
            sx[k, i] += acc
        if full:
            for i in range(n_features):
                for j in range(i, n_features):
                    acc = 0.0
                    for r in range(n_rows):
                        acc += wdiff[i, r] * diff[j, r]
                    sxx[k, i, j] += acc
        else:
            for i in range(n_features):
                acc = 0.0
                for r in range(n_rows):
                    acc += wdiff[i, r] * diff[i, r]
                sxx[k, i, 0] += acc


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


@njit(parallel=True, cache=True)
def gaussian_statistics(X, sample_weight, means, prec, log_const, full_covariance, n_chunks):
    r"""Fused E-step and sufficient statistics for a Gaussian mixture.

    Parameters
    ----------
    X : ndarray (N, D), float64 or float32
    sample_weight : ndarray (N,) or (0,) for unit weights
    means : ndarray (K, D)
    prec : ndarray
        (K, D, D) upper Cholesky factors of the precisions when
        ``full_covariance``, else (K, D, 1) diagonal precisions :math:`1/\sigma^2`.
    log_const : ndarray (K,)
        :math:`\log\pi_k + \log\det U_k - \tfrac D2\log 2\pi`.
    full_covariance : bool
        Accumulate the full scatter (K, D, D) instead of its diagonal (K, D).
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
    for c in prange(n_chunks):
        first, last = chunk_rows(c, n_chunks, n_samples)
        diff = np.empty((n_features, BLOCK_ROWS))
        wdiff = np.empty((n_features, BLOCK_ROWS))
        y = np.empty(BLOCK_ROWS)
        log_prob = np.empty((n_components, BLOCK_ROWS))
        row_max = np.empty(BLOCK_ROWS)
        row_sum = np.empty(BLOCK_ROWS)
        for start in range(first, last, BLOCK_ROWS):
            n_rows = min(BLOCK_ROWS, last - start)
            if full_covariance:
                _block_log_prob_full(X, start, n_rows, means, prec, log_const, diff, y, log_prob)
            else:
                _block_log_prob_diag(X, start, n_rows, means, prec, log_const, diff, log_prob)
            normalise_block(log_prob, n_rows, sample_weight, start, row_max, row_sum)
            ll_parts[c] += _block_loglik(row_max, n_rows, sample_weight, start, worst,
                                         worst_index, c)
            _block_accumulate(X, start, n_rows, means, log_prob, diff, wdiff,
                              nk_parts[c], sx_parts[c], sxx_parts[c], full_covariance)
    nk, sx, sxx = reduce_statistics(nk_parts, sx_parts, sxx_parts, full_covariance)
    loglik = 0.0
    best = np.inf
    best_index = 0
    for c in range(n_chunks):
        loglik += ll_parts[c]
        if worst[c] < best:
            best = worst[c]
            best_index = worst_index[c]
    return nk, sx, sxx, loglik, best, best_index


@njit(parallel=True, cache=True)
def gaussian_log_resp(X, means, prec, log_const, full_covariance, log_resp, log_norm):
    """Per-row log-responsibilities and log p(x) (for predict_proba / score_samples).

    Fills ``log_resp`` (N, K) and ``log_norm`` (N,) in place, block by block.
    """
    n_samples, n_features = X.shape
    n_components = means.shape[0]
    n_blocks = (n_samples + BLOCK_ROWS - 1) // BLOCK_ROWS
    for b in prange(n_blocks):
        start = b * BLOCK_ROWS
        n_rows = min(BLOCK_ROWS, n_samples - start)
        diff = np.empty((n_features, BLOCK_ROWS))
        y = np.empty(BLOCK_ROWS)
        log_prob = np.empty((n_components, BLOCK_ROWS))
        if full_covariance:
            _block_log_prob_full(X, start, n_rows, means, prec, log_const, diff, y, log_prob)
        else:
            _block_log_prob_diag(X, start, n_rows, means, prec, log_const, diff, log_prob)
        for r in range(n_rows):
            top = log_prob[0, r]
            for k in range(1, n_components):
                top = max(top, log_prob[k, r])
            total = 0.0
            for k in range(n_components):
                total += np.exp(log_prob[k, r] - top)
            norm = top + np.log(total)
            log_norm[start + r] = norm
            for k in range(n_components):
                log_resp[start + r, k] = log_prob[k, r] - norm
