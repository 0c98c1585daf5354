"""Sufficient statistics of a hard assignment (initialisation from labels).

The same block accumulator as the EM pass, fed with one-hot responsibilities
built from integer labels (label -1: the row belongs to no component). Twin:
:func:`fastem.reference.statistics_from_labels`.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from ._blocks import (
    BLOCK_ROWS,
    chunk_rows,
    compile_twice,
    reduce_statistics,
    transpose_block,
)
from .estep import _accumulate_loops


def _label_statistics(X, sample_weight, labels, shift, full_covariance, n_chunks):
    """N_k, s_k and S_k around ``shift`` for one-hot responsibilities.

    Returns nk (K,), sx (K, D), sxx (K, D, D) or (K, D, 1).
    """
    n_samples, n_features = X.shape
    n_components = shift.shape[0]
    width = n_features if full_covariance else 1
    nk_parts = np.zeros((n_chunks, n_components))
    sx_parts = np.zeros((n_chunks, n_components, n_features))
    sxx_parts = np.zeros((n_chunks, n_components, n_features, width))
    weighted = sample_weight.shape[0] > 0
    for c in prange(n_chunks):
        first, last = chunk_rows(c, n_chunks, n_samples)
        xT = np.empty((n_features, BLOCK_ROWS), dtype=X.dtype)
        diffs = np.empty((1, n_features, BLOCK_ROWS), dtype=X.dtype)
        wdiff = np.empty((n_features, BLOCK_ROWS), dtype=X.dtype)
        resp = np.empty((n_components, BLOCK_ROWS))
        for start in range(first, last, BLOCK_ROWS):
            n_rows = min(BLOCK_ROWS, last - start)
            resp[:, :] = 0.0
            for r in range(n_rows):
                label = labels[start + r]
                if label >= 0:
                    resp[label, r] = sample_weight[start + r] if weighted else 1.0
            transpose_block(X, start, n_rows, xT)
            _accumulate_loops(xT, n_rows, shift, resp, diffs, False, wdiff, nk_parts[c],
                              sx_parts[c], sxx_parts[c], full_covariance)
    return reduce_statistics(nk_parts, sx_parts, sxx_parts, full_covariance)


label_statistics = compile_twice(_label_statistics, "_label_statistics_serial")
