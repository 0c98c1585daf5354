"""k-means++ seeding and Lloyd iteration kernels.

Twins: :func:`fastem.reference.kmeans_plusplus` and
:func:`fastem.reference.lloyd`. Each kernel is a ``(parallel, serial)`` pair
(see :func:`fastem._kernels._blocks.pick`). Sums are kept per chunk and reduced in chunk
order, so results do not depend on the thread count.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._blocks import chunk_rows, compile_twice


@njit(cache=True)
def _sq_dist(X, n, center):
    total = 0.0
    for d in range(X.shape[1]):
        t = X[n, d] - center[d]
        total += t * t
    return total


def _sq_distances(X, center, out):
    r"""out[n] = :math:`\lVert x_n - c \rVert^2`."""
    for n in prange(X.shape[0]):
        out[n] = _sq_dist(X, n, center)


def _candidate_potentials(X, sample_weight, candidates, closest, n_chunks):
    r"""Potential :math:`\sum_n w_n \min(D_n^2, \lVert x_n - c_t\rVert^2)` of each candidate."""
    n_samples = X.shape[0]
    n_candidates = candidates.shape[0]
    weighted = sample_weight.shape[0] > 0
    parts = np.zeros((n_chunks, n_candidates))
    for c in prange(n_chunks):
        first, last = chunk_rows(c, n_chunks, n_samples)
        for n in range(first, last):
            w = sample_weight[n] if weighted else 1.0
            for t in range(n_candidates):
                parts[c, t] += w * min(closest[n], _sq_dist(X, n, candidates[t]))
    out = np.zeros(n_candidates)
    for c in range(n_chunks):
        out += parts[c]
    return out


def _update_closest(X, center, closest):
    """closest[n] = min(closest[n], ||x_n - center||^2), in place."""
    for n in prange(X.shape[0]):
        closest[n] = min(closest[n], _sq_dist(X, n, center))


def _lloyd_assign(X, sample_weight, centers, labels, n_chunks):
    r"""Assign each row to its nearest centre and accumulate the new centres' sums.

    Returns
    -------
    sums : (K, D) :math:`\sum_{n \in k} w_n x_n`,
    counts : (K,) :math:`\sum_{n\in k} w_n`,
    inertia : float :math:`\sum_n w_n \min_k \lVert x_n-c_k\rVert^2`,
    farthest : int, the row farthest from its centre (to re-seed empty clusters),
    changed : int, number of rows whose label changed.
    """
    n_samples, n_features = X.shape
    n_clusters = centers.shape[0]
    weighted = sample_weight.shape[0] > 0
    sums_p = np.zeros((n_chunks, n_clusters, n_features))
    counts_p = np.zeros((n_chunks, n_clusters))
    inertia_p = np.zeros(n_chunks)
    far_d = np.full(n_chunks, -1.0)
    far_i = np.zeros(n_chunks, dtype=np.int64)
    changed_p = np.zeros(n_chunks, dtype=np.int64)
    for c in prange(n_chunks):
        first, last = chunk_rows(c, n_chunks, n_samples)
        for n in range(first, last):
            best = np.inf
            best_k = 0
            for k in range(n_clusters):
                dist = _sq_dist(X, n, centers[k])
                if dist < best:
                    best = dist
                    best_k = k
            if labels[n] != best_k:
                changed_p[c] += 1
                labels[n] = best_k
            w = sample_weight[n] if weighted else 1.0
            counts_p[c, best_k] += w
            for d in range(n_features):
                sums_p[c, best_k, d] += w * X[n, d]
            inertia_p[c] += w * best
            if best > far_d[c]:
                far_d[c] = best
                far_i[c] = n
    sums = np.zeros((n_clusters, n_features))
    counts = np.zeros(n_clusters)
    inertia = 0.0
    farthest = 0
    far = -1.0
    changed = 0
    for c in range(n_chunks):
        sums += sums_p[c]
        counts += counts_p[c]
        inertia += inertia_p[c]
        changed += changed_p[c]
        if far_d[c] > far:
            far = far_d[c]
            farthest = far_i[c]
    return sums, counts, inertia, farthest, changed


sq_distances = compile_twice(_sq_distances, "_sq_distances_serial")


candidate_potentials = compile_twice(_candidate_potentials, "_candidate_potentials_serial")


update_closest = compile_twice(_update_closest, "_update_closest_serial")


lloyd_assign = compile_twice(_lloyd_assign, "_lloyd_assign_serial")


@njit(cache=True)
def draw_by_mass(closest, sample_weight, fractions):
    r"""Rows drawn with probability :math:`\propto w_n D_n^2`, without a cumulative array.

    Row ``i`` is drawn for fraction ``u`` when the running sum
    :math:`\sum_{n\le i} w_n D_n^2` first exceeds ``u`` times the total, the
    rows taken left to right exactly as ``np.searchsorted(np.cumsum(.),
    side="right")`` would (the twin, :func:`fastem.reference.kmeans_plusplus`,
    does that): same additions in the same order, no N-sized temporary.
    """
    n = closest.shape[0]
    weighted = sample_weight.shape[0] > 0
    total = 0.0
    for i in range(n):
        total += closest[i] * sample_weight[i] if weighted else closest[i]
    order = np.argsort(fractions)
    rows = np.full(fractions.shape[0], n - 1, dtype=np.int64)
    running = 0.0
    t = 0
    for i in range(n):
        running += closest[i] * sample_weight[i] if weighted else closest[i]
        while t < order.shape[0] and running > fractions[order[t]] * total:
            rows[order[t]] = i
            t += 1
        if t == order.shape[0]:
            break
    return rows
