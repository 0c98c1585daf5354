"""k-means++ seeding and Lloyd iteration kernels.

Twins: :func:`fastem.reference.kmeans_plusplus` and
:func:`fastem.reference.lloyd`. Each kernel over X handles a range of row
chunks (run by :func:`fastem._threads.run_chunks`); sums are kept per chunk and
reduced in chunk order, so results do not depend on the thread count.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ._blocks import BLOCK_ROWS, chunk_rows, helper_inline
from .simd import lanes, vadd, vbroadcast, vfirst, vload, vmin, vmul, vstore, vsub, vzeros


@helper_inline
def _sq_dist(X, n, center, scale):
    r""":math:`\lVert s\,x_n - s\,c\rVert^2` for a power of two ``s``
    (:func:`fastem.initialization.distance_scale`): exactly ``s**2`` times the
    squared distance, which may exceed the float64 range."""
    total = 0.0
    for d in range(X.shape[1]):
        t = X[n, d] * scale - center[d] * scale
        total += t * t
    return total


@njit(cache=True, error_model="numpy", nogil=True)
def candidate_potentials(chunk_first, chunk_last, n_chunks, X, sample_weight, targets,
                         n_pending, scale, closest, parts, block_parts):
    r"""The potential of each candidate centre, after the pending update of ``closest``.

    ``targets`` are ``n_pending`` (0 or 1) pending centres, whose distances are
    first taken into ``closest`` (:math:`D_n^2 \leftarrow \min(D_n^2, \lVert s
    x_n - s p\rVert^2)`; from ``closest = inf``, the distances to the first
    centre), then the candidates :math:`c_t`. For every target,

    .. math::

        \text{parts}[c, t] = \sum_{n\in c} w_n \min(D_n^2, \lVert s x_n - s c_t\rVert^2)

    is chunk c's share of its potential (rows in order), and
    ``block_parts[b, t]`` the same sum over block b's rows only: block b's
    mass once ``c_t`` is taken into ``closest``. So the caller keeps the best
    candidate pending and needs no pass of its own for it
    (:func:`fastem.initialization.draw_by_mass` computes the pending
    distances of the one block it scans). The pending target's own block
    sums are the masses after it.

    The targets lie along the lanes of a vector (W at a time), the pending
    one in lane 0: each feature of a row is broadcast and taken from all of
    them at once, so every lane computes one target's distance and sums as
    the scalar loop did, in the same order, with the same bits (one pass over
    1M x 10 with three candidates, one thread: 9.5 against 3.8 ms).
    """
    n_targets, n_features = targets.shape
    weighted = sample_weight.shape[0] > 0
    unscaled = scale == 1.0
    # s c_t (exact: a power of two), one group of W targets per vector,
    # feature by feature; the lanes past the last target are dropped.
    lane = np.zeros(1)
    width = lanes(lane)
    n_groups = (n_targets + width - 1) // width
    grouped = np.zeros((n_groups, n_features, width))
    for t in range(n_targets):
        for d in range(n_features):
            grouped[t // width, d, t % width] = targets[t, d] * scale
    totals = np.empty(width)
    for c in range(chunk_first, chunk_last):
        first, last = chunk_rows(c, n_chunks, X.shape[0])
        for g in range(n_groups):
            in_group = min(width, n_targets - g * width)
            for t in range(width):
                totals[t] = parts[c, g * width + t] if t < in_group else 0.0
            potential = vload(totals, 0)
            for start in range(first, last, BLOCK_ROWS):
                block_potential = vzeros(lane)
                for n in range(start, min(start + BLOCK_ROWS, last)):
                    distance = vzeros(lane)
                    for d in range(n_features):
                        x = X[n, d] if unscaled else X[n, d] * scale
                        u = vsub(vbroadcast(lane, x), vload(grouped[g, d], 0))
                        distance = vadd(distance, vmul(u, u))
                    if g == 0 and n_pending:
                        closest[n] = min(closest[n], vfirst(distance))
                    w = sample_weight[n] if weighted else 1.0
                    term = vmul(vbroadcast(lane, w), vmin(vbroadcast(lane, closest[n]), distance))
                    potential = vadd(potential, term)
                    block_potential = vadd(block_potential, term)
                vstore(totals, 0, block_potential)
                for t in range(in_group):
                    block_parts[start // BLOCK_ROWS, g * width + t] = totals[t]
            vstore(totals, 0, potential)
            for t in range(in_group):
                parts[c, g * width + t] = totals[t]


@njit(cache=True, error_model="numpy", nogil=True)
def lloyd_assign(chunk_first, chunk_last, n_chunks, X, sample_weight, offset, scale, centers,
                 centre_norms, gemm, labels, rows, distances, sums_p, counts_p, inertia_p,
                 changed_p):
    r"""Assign each row to its nearest centre; chunk c's sums go to slot c.

    Rows are taken as :math:`z_n = s x_n - s o` (the offset ``o`` is the data's
    mean, ``s`` a power of two, see ``_sq_dist``) and the centres ``centers``
    are given so. As in scikit-learn's k-means, the distance compared is
    :math:`\lVert c_k\rVert^2 - 2 z_n^T c_k` (``centre_norms`` holds
    :math:`\lVert c_k\rVert^2`), computed for each block of ``BLOCK_ROWS``
    rows by one ``dgemm``, and ties go to the lowest k: the same arithmetic,
    so rows at equal distances (0/1 or rounded data) go where scikit-learn
    sends them. ``rows`` (BLOCK_ROWS, D) and ``distances`` (BLOCK_ROWS, K) are
    scratch of this call.

    ``sums_p[c]`` (K, D) :math:`\sum_{n \in c, k} w_n z_n`, ``counts_p[c]``
    (K,) :math:`\sum w_n`, ``inertia_p[c]`` :math:`\sum w_n \min_k \lVert
    z_n-c_k\rVert^2` and ``changed_p[c]`` the number of labels changed
    (reduced in chunk order by the caller).
    """
    n_clusters, n_features = centers.shape
    weighted = sample_weight.shape[0] > 0
    inertia = inertia_p.shape[0] > 0
    # BLAS's by-reference arguments: transa 'T', transb 'N' (as bytes: ord()
    # and np.array of a list would each compile helpers of their own), sizes
    # and the scalars alpha = -2, beta = 1.
    chars = np.empty(2, dtype=np.uint8)
    chars[0] = 84
    chars[1] = 78
    sizes = np.empty(3, dtype=np.int32)
    sizes[0] = n_clusters
    sizes[2] = n_features
    alpha_beta = np.empty(2)
    alpha_beta[0] = -2.0
    alpha_beta[1] = 1.0
    for c in range(chunk_first, chunk_last):
        first, last = chunk_rows(c, n_chunks, X.shape[0])
        for start in range(first, last, BLOCK_ROWS):
            n_rows = min(BLOCK_ROWS, last - start)
            for r in range(n_rows):
                for d in range(n_features):
                    rows[r, d] = X[start + r, d] * scale - offset[d] * scale
                for k in range(n_clusters):
                    distances[r, k] = centre_norms[k]
            # distances := -2 Z C^T + distances, row-major: column-major C Z^T.
            sizes[1] = n_rows
            gemm(chars[0:1].ctypes, chars[1:2].ctypes, sizes[0:1].ctypes, sizes[1:2].ctypes,
                 sizes[2:3].ctypes, alpha_beta[0:1].ctypes, centers.ctypes, sizes[2:3].ctypes,
                 rows.ctypes, sizes[2:3].ctypes, alpha_beta[1:2].ctypes, distances.ctypes,
                 sizes[0:1].ctypes)
            for r in range(n_rows):
                n = start + r
                best = distances[r, 0]
                best_k = 0
                for k in range(1, n_clusters):
                    if distances[r, k] < best:
                        best = distances[r, k]
                        best_k = k
                if labels[n] != best_k:
                    changed_p[c] += 1
                    labels[n] = best_k
                w = sample_weight[n] if weighted else 1.0
                counts_p[c, best_k] += w
                for d in range(n_features):
                    sums_p[c, best_k, d] += rows[r, d] * w
                if inertia:
                    norm = 0.0
                    for d in range(n_features):
                        norm += rows[r, d] * rows[r, d]
                    inertia_p[c] += w * max(norm + best, 0.0)


@njit(cache=True, error_model="numpy", nogil=True)
def column_moments(chunk_first, chunk_last, n_chunks, X, sample_weight, centre, scale,
                   first_parts, second_parts, largest_parts):
    r"""Chunk c's weighted first and second moments of each column around ``centre``:
    first_parts[c, d] = :math:`\sum_{n\in c} w_n (s x_{nd} - c_d)` and
    second_parts[c, d] = :math:`\sum_{n\in c} w_n (s x_{nd} - c_d)^2`, rows in order;
    and, unless ``largest_parts`` is empty, largest_parts[c, d] =
    :math:`\max_{n\in c} |s x_{nd} - c_d|` (meaningful for finite data only)."""
    weighted = sample_weight.shape[0] > 0
    extremes = largest_parts.shape[0] > 0
    n_features = X.shape[1]
    for c in range(chunk_first, chunk_last):
        first, last = chunk_rows(c, n_chunks, X.shape[0])
        sums, squares = first_parts[c], second_parts[c]
        largest = largest_parts[c] if extremes else sums[0:0]
        for n in range(first, last):
            w = sample_weight[n] if weighted else 1.0
            for d in range(n_features):
                t = X[n, d] * scale - centre[d]
                sums[d] += w * t
                squares[d] += w * t * t
            if extremes:
                # A loop of its own: inside the one above, LLVM vectorised
                # neither (8.3 against 6.1 ms for 1M x 10, 4.1 without).
                for d in range(n_features):
                    largest[d] = max(largest[d], abs(X[n, d] * scale - centre[d]))
