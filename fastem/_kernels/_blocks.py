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

import numpy as np
from numba import njit

BLOCK_ROWS = 256
# Partial sums are cheap for small K*D*D but not for K=20, D=100; cap the
# memory they take (in float64 entries) while keeping enough chunks to
# balance the load over the threads.
_MAX_CHUNKS = 64
_PARTIAL_BUDGET = 4_000_000


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
def load_centred(X, start, n_rows, centre, out):
    """out[d, r] = X[start + r, d] - centre[d]  (transposed, float64)."""
    n_features = X.shape[1]
    for r in range(n_rows):
        for d in range(n_features):
            out[d, r] = X[start + r, d] - centre[d]


@njit(cache=True)
def normalise_block(log_prob, n_rows, sample_weight, start, row_max, row_sum):
    r"""Turn a block of weighted log-densities into weighted responsibilities.

    In place: ``log_prob[k, r]`` becomes :math:`w_r\, r_{rk}` and the
    per-row :math:`\log p(x_r)` is left in ``row_max``. Uses the max shift of
    log-sum-exp so far outliers neither underflow nor give NaN.
    """
    n_components = log_prob.shape[0]
    for r in range(n_rows):
        row_max[r] = log_prob[0, r]
    for k in range(1, n_components):
        for r in range(n_rows):
            row_max[r] = max(row_max[r], log_prob[k, r])
    for r in range(n_rows):
        row_sum[r] = 0.0
    for k in range(n_components):
        for r in range(n_rows):
            e = math.exp(log_prob[k, r] - row_max[r])
            log_prob[k, r] = e
            row_sum[r] += e
    weighted = sample_weight.shape[0] > 0
    for r in range(n_rows):
        row_max[r] += math.log(row_sum[r])
        scale = 1.0 / row_sum[r]
        if weighted:
            scale *= sample_weight[start + r]
        row_sum[r] = scale
    for k in range(n_components):
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
