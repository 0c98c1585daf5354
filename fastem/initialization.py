"""Starting points for EM: k-means++ seeding, Lloyd's k-means, random starts.

Every strategy ends in a set of :class:`~fastem.stats.GaussianStatistics`
(hard or soft assignments of rows to components), which the ordinary M-step
turns into initial parameters, as scikit-learn's ``_initialize`` does.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from . import _threads, em
from ._kernels import kernel_module
from ._kernels.blas import gemm_routine, single_threaded_blas
from ._kernels.chunks import BLOCK_ROWS, n_chunks_for
from ._threads import run_chunks
from .covariance import uses_full_scatter
from .scaling import power_of_two_scale, scale_for_largest
from .stats import (
    GaussianStatistics,
    engine_for,
    label_statistics_of,
    operand_dtype,
    weights_operand,
)

kmeans = kernel_module("kmeans")

INIT_METHODS = ("kmeans", "k-means++", "random", "random_from_data", "hierarchical")
_ROWS_PER_SLAB = 8192
# Coordinates up to 2**400 keep k-means' squared distances, and their sums
# over any realistic number of rows, far from float64's overflow.
_LARGEST_EXPONENT = 400


def kmeans_plusplus(X, n_clusters, random_state, sample_weight=None, n_local_trials=None,
                    scale=None):
    r"""Greedy k-means++ seeding.

    The first centre is drawn with probability :math:`\propto w_n`; each next
    one among ``2 + log K`` candidates drawn with probability
    :math:`\propto w_n D(x_n)^2`, keeping the candidate that most lowers the
    potential :math:`\sum_n w_n D(x_n)^2` (Arthur & Vassilvitskii, 2007).

    Parameters
    ----------
    X : ndarray (N, D), C-contiguous
    n_clusters : int
    random_state : numpy.random.RandomState
    sample_weight : ndarray (N,) or None
    n_local_trials : int, optional
    scale : float, optional
        :func:`distance_scale` of X, when the caller has it.

    Returns
    -------
    centers : ndarray (n_clusters, D), float64
    indices : ndarray (n_clusters,)
    """
    n_samples = X.shape[0]
    if n_local_trials is None:
        n_local_trials = 2 + int(np.log(n_clusters))
    first_u = random_state.uniform()
    uniforms = random_state.uniform(size=(max(n_clusters - 1, 0), n_local_trials))
    if sample_weight is None:
        first = min(int(first_u * n_samples), n_samples - 1)
    else:
        first = int(draw_by_mass(sample_weight, weights_operand(None), np.array([first_u]))[0])
    return kmeans_plusplus_from_draws(X, n_clusters, uniforms, first, sample_weight, scale)


def distance_scale(X) -> float:
    r"""A power of two :math:`s` that keeps the squared distances of ``s X`` in range.

    k-means compares and sums squared distances (in float64), which overflow
    from coordinates of about 1e154 on (and underflow below 1e-154). Its
    choices do not change when every distance is multiplied by :math:`s^2`,
    and a power of two multiplies exactly, so ordinary data (:math:`s = 1`)
    keep their bits and extreme data are measured where the largest
    coordinate is about :math:`2^{400}` (or 1, for tiny data).
    """
    return power_of_two_scale(X, _LARGEST_EXPONENT)


def distance_scale_for_largest(largest: float) -> float:
    """:func:`distance_scale` of data whose largest absolute coordinate is ``largest``."""
    return scale_for_largest(largest, _LARGEST_EXPONENT)


def kmeans_plusplus_from_draws(X, n_clusters, uniforms, first_index, sample_weight=None,
                               scale=None):
    """k-means++ from pre-drawn uniforms (the twin of
    :func:`fastem.reference.kmeans_plusplus`, which consumes the same draws)."""
    n_samples, n_features = X.shape
    scale = distance_scale(X) if scale is None else scale
    sw = weights_operand(sample_weight)
    n_chunks = n_chunks_for(n_samples, uniforms.shape[1] if uniforms.ndim == 2 else 1)
    indices = [int(first_index)]
    closest = np.full(n_samples, np.inf)
    n_blocks = (n_samples + BLOCK_ROWS - 1) // BLOCK_ROWS
    work = n_samples * n_features * (uniforms.shape[1] if uniforms.ndim == 2 else 1)

    def potentials(targets, n_pending):
        """Each target's potential (chunks summed in order: the same for any
        thread count), after the pending one (if any) is taken into
        ``closest``, and each block's sum of w D^2 once a target is: the
        draws then scan one block."""
        parts = np.zeros((n_chunks, targets.shape[0]))
        block_parts = np.empty((n_blocks, targets.shape[0]))
        run_chunks(kmeans.candidate_potentials, n_chunks, work, n_chunks, X, sw, targets,
                   n_pending, scale, closest, parts, block_parts)
        return _sum_in_order(parts), block_parts

    if n_clusters > 1:  # the distances to the first centre
        _, block_parts = potentials(np.asarray(X[first_index:first_index + 1],
                                               dtype=np.float64), 1)
        block_mass = np.ascontiguousarray(block_parts[:, 0])
    # The centre last chosen, not yet in closest: the next candidates' pass
    # takes it in (the draws before it compute its distances in one block).
    pending = np.empty((0, n_features))
    for c in range(1, n_clusters):
        candidates = draw_by_mass(closest, sw, uniforms[c - 1], block_mass, X, pending, scale)
        targets = np.concatenate([pending, np.asarray(X[candidates], dtype=np.float64)])
        totals, block_parts = potentials(targets, pending.shape[0])
        column = pending.shape[0] + int(np.argmin(totals[pending.shape[0]:]))
        indices.append(int(candidates[column - pending.shape[0]]))
        pending = targets[column:column + 1]
        block_mass = np.ascontiguousarray(block_parts[:, column])
    indices = np.asarray(indices)
    return np.asarray(X[indices], dtype=np.float64), indices


def draw_by_mass(mass, sample_weight, fractions, block_mass=None, X=None, pending=None,
                 scale=1.0):
    r"""Rows drawn with probability :math:`\propto m_n = w_n D_n^2`, from the
    sums of blocks of ``BLOCK_ROWS`` rows: no cumulative array over all rows.

    With :math:`M_b` block b's mass summed in row order and :math:`P_b = M_0 +
    \dots + M_{b-1}` (in order), row i of block b has the cumulative mass
    :math:`C_i = P_b + (m_{b0} + \dots + m_i)`, and row i is drawn for the
    fraction ``u`` where :math:`C_i` first exceeds ``u`` times the total (as
    ``np.searchsorted(C, u * total, side="right")``, at most the last row;
    twin: :func:`fastem.reference.blocked_cumulative_mass`). :math:`C` rises
    with i and the last row of block b has :math:`C = P_{b+1}`: the search
    finds the block among the block sums, then scans that block alone.

    ``mass`` (N,) holds :math:`D_n^2` (the rows' masses before the weights
    ``sample_weight``, (N,) or (0,) for none). ``block_mass`` are the block
    sums when the pass that computed the masses has them (else summed here).
    ``pending`` (1, D) is a centre not yet taken into ``mass``: the block
    sums are then those after it, and the scanned block's masses are
    :math:`\min(D_n^2, \lVert s x_n - s p\rVert^2)`, the squares added
    feature by feature in order (as :func:`~fastem._kernels.kmeans.candidate_potentials`
    computes them).
    """
    n = mass.shape[0]
    weighted = sample_weight.shape[0] > 0
    if block_mass is None:
        block_mass = _block_sums(mass * sample_weight if weighted else mass)
    following = np.cumsum(block_mass)  # P_{b+1}, added in order
    targets = np.asarray(fractions, dtype=np.float64) * following[-1]
    blocks = np.searchsorted(following, targets, side="right")
    rows = np.full(targets.shape[0], n - 1, dtype=np.int64)
    for b in np.unique(blocks[blocks < following.shape[0]]):
        first, last = b * BLOCK_ROWS, min(n, (b + 1) * BLOCK_ROWS)
        values = mass[first:last]
        if pending is not None and pending.shape[0]:
            distance = np.zeros(last - first)
            for d in range(X.shape[1]):
                u = np.asarray(X[first:last, d], dtype=np.float64) * scale - pending[0, d] * scale
                distance = distance + u * u
            values = np.minimum(values, distance)
        if weighted:
            values = values * sample_weight[first:last]
        running = (following[b - 1] if b else 0.0) + np.cumsum(values)
        inside = blocks == b
        rows[inside] = first + np.minimum(
            np.searchsorted(running, targets[inside], side="right"), last - first - 1)
    return rows


def _block_sums(mass):
    """Each block's sum of ``mass``, rows in order."""
    n_blocks = -(-mass.shape[0] // BLOCK_ROWS)
    padded = np.zeros(n_blocks * BLOCK_ROWS)
    padded[:mass.shape[0]] = mass
    return np.cumsum(padded.reshape(n_blocks, BLOCK_ROWS), axis=1)[:, -1].copy()


def column_variance(X, sample_weight=None, scale=1.0, centre=None):
    r"""Weighted per-feature variance of ``scale * X``, without an N x D copy.

    Around a centre :math:`c` (by default the weighted mean, from a first
    pass), with :math:`W = \sum_n w_n`,

    .. math::

        \sigma_d^2 = \frac1W \sum_n w_n (s x_{nd} - c_d)^2
                     - \Big(\frac1W \sum_n w_n (s x_{nd} - c_d)\Big)^2,

    exact for any :math:`c` and free of cancellation when :math:`c` is close to
    the mean (Lloyd passes the unweighted mean it already has). The sums run
    over row chunks on the threads and are reduced in chunk order, so the
    result does not depend on the thread count.
    """
    n_samples, n_features = X.shape
    w_total = n_samples if sample_weight is None else sample_weight.sum()
    if centre is None:
        first, _ = _column_moments(X, sample_weight, np.zeros(n_features), scale)
        centre = first / w_total
    first, second = _column_moments(X, sample_weight, np.asarray(centre, dtype=np.float64),
                                    scale)
    shift = first / w_total
    return np.maximum(second / w_total - shift * shift, 0.0)


def _column_moments(X, sample_weight, centre, scale):
    """The sums of :func:`fastem._kernels.kmeans.column_moments` over all rows."""
    n_samples, n_features = X.shape
    n_chunks = n_chunks_for(n_samples, n_features)
    first = np.zeros((n_chunks, n_features))
    second = np.zeros((n_chunks, n_features))
    run_chunks(kmeans.column_moments, n_chunks, n_samples * n_features, n_chunks, X,
               weights_operand(sample_weight), centre, float(scale), first, second,
               np.empty((0, n_features)))
    # Summed in chunk order: the same moments for any thread count.
    return _sum_in_order(first), _sum_in_order(second)


def column_mean(X):
    """``X.mean(axis=0)``, the same bits (scikit-learn's k-means centres X on it).
    See :func:`column_mean_and_square`."""
    return column_mean_and_square(X)[0]


def known_columns(scan, largest, rescaled) -> ColumnScan:
    """What a fit knows of the rows it starts from (X rescaled by ``rescaled``,
    a :class:`~fastem.scaling.DataScale`): the distance scale from X's largest
    coordinate, and the means of ``scan`` (:func:`scan_columns` of X, or None)
    when the rows are X itself."""
    if scan is not None and rescaled.scale == 1.0:
        return scan
    return ColumnScan(distance_scale_for_largest(largest * rescaled.scale), None, None)


def column_mean_and_square(X):
    r"""``X.mean(axis=0)`` (the same bits) and :math:`\frac1N\sum_n x_{nd}^2`, or
    None where it is not read along.

    NumPy reduces a C-contiguous float64 (N, D > 1) array over axis 0 row by
    row, adding each row to the running sums; so does
    :func:`fastem._kernels.kmeans.column_moments` over one chunk, around 0
    and unscaled (``x * 1 - 0`` is ``x``), in about a third of NumPy's time (its
    inner loop is one row long). NumPy's own mean elsewhere (one column it
    sums pairwise; float32 it sums in float32).
    """
    scan = scan_columns(X, largest=False)
    return (X.mean(axis=0), None) if scan is None else (scan.mean, scan.mean_square)


class ColumnScan(NamedTuple):
    """What one pass over X tells the k-means start (:func:`scan_columns`)."""

    scale: float                     # distance_scale(X)
    mean: np.ndarray | None          # X.mean(axis=0), NumPy's bits
    mean_square: np.ndarray | None   # (1/N) sum_n x_n^2, per column
    largest: float = math.nan        # max |X|


def scan_columns(X, largest=True) -> ColumnScan | None:
    r""":func:`column_mean_and_square` and :math:`\max|X|` in one pass, where
    the kernel gives NumPy's mean (see there); None elsewhere, and when a sum
    is not finite (X holds an infinity or a NaN, or its squares overflow:
    the caller then reads X by the usual means).

    A fit with k-means starts reads X for its extremes (validation and
    scale) and again for its mean (Lloyd): here both at once, on one thread
    (NumPy's order of additions): 6.1 ms for 1M x 10, against 3.0 ms (two
    threads) and 4.2 ms for the two passes.
    """
    if not (X.ndim == 2 and X.shape[1] > 1 and X.shape[0] > 0 and X.flags.c_contiguous
            and X.dtype == np.float64):
        return None
    n_samples, n_features = X.shape
    first, second = np.zeros((1, n_features)), np.zeros((1, n_features))
    extremes = np.zeros((1 if largest else 0, n_features))
    kmeans.column_moments(0, 1, 1, X, weights_operand(None), np.zeros(n_features), 1.0, first,
                          second, extremes)
    if not (np.isfinite(first).all() and np.isfinite(second).all()):
        return None
    biggest = float(extremes.max()) if largest else math.nan
    return ColumnScan(distance_scale_for_largest(biggest) if largest else math.nan,
                      first[0] / n_samples, second[0] / n_samples, biggest)


def _sum_in_order(parts):
    total = np.zeros(parts.shape[1:])
    for part in parts:
        total += part
    return total


def lloyd(X, centers, sample_weight=None, max_iter=300, tol=1e-4, scale=None, inertia=True,
          moments=None):
    r"""Lloyd's k-means from ``centers``, as scikit-learn's ``KMeans`` runs it.

    The same arithmetic, so that ties (rows at equal distances from two
    centres, common in 0/1 or rounded data) are broken as there: rows are
    centred on the data's mean, distances compared as
    :math:`\lVert c\rVert^2 - 2 x^T c` by ``dgemm`` on blocks of 256 rows,
    centres averaged by multiplying with the inverse weight, an empty cluster
    takes over the row farthest from its centre (leaving that row's old
    cluster), and the iteration stops when no label changes or when the
    summed squared centre shift is at most ``tol * mean(var(X))``. Twin:
    :func:`fastem.reference.lloyd`.

    ``scale`` is :func:`distance_scale` of X when the caller has it, and
    ``moments`` :func:`column_mean_and_square` of X (its mean square may be None). The
    inertia (the weighted sum of squared distances to the nearest centre)
    costs a tenth of an assignment; ``inertia=False`` skips it (None is
    returned).

    Returns
    -------
    labels : ndarray (N,) int32, centers : ndarray (K, D), inertia : float or None,
    n_iter : int
    """
    n_samples, n_features = X.shape
    n_clusters = np.shape(centers)[0]
    sw = weights_operand(sample_weight)
    n_chunks = n_chunks_for(n_samples, n_clusters * n_features)
    # Rows are taken as z = s x - s m: the mean m as scikit-learn subtracts
    # it, and a power of two s that keeps squares in range (1 for most data).
    scale = distance_scale(X) if scale is None else scale
    offset, square = column_mean_and_square(X) if moments is None else moments
    offset = np.asarray(offset, dtype=np.float64)
    z_centers = np.asarray(centers, dtype=np.float64) * scale - offset * scale
    tolerance = _LloydTolerance(X, sample_weight, scale, offset, square, tol)
    # int32 labels: at a million rows they are the largest temporary of a fit.
    labels = np.full(n_samples, -1, dtype=np.int32)
    work = n_samples * n_clusters * n_features
    gemm = gemm_routine()

    def assign(z_centers):
        slots = (np.zeros((n_chunks, n_clusters, n_features)), np.zeros((n_chunks, n_clusters)),
                 np.zeros(n_chunks if inertia else 0), np.zeros(n_chunks, dtype=np.int64))
        norms = np.einsum("ij,ij->i", z_centers, z_centers)  # as scikit-learn's row_norms
        with single_threaded_blas():
            run_chunks(_lloyd_assign_scratch, n_chunks, work, n_chunks, X, sw, offset, scale,
                       np.ascontiguousarray(z_centers), norms, gemm, labels, *slots)
        return _lloyd_reduce(*slots)

    n_iter = 0
    settled = False
    for n_iter in range(1, max_iter + 1):
        sums, counts, total, changed = assign(z_centers)
        empty = np.flatnonzero(counts == 0)
        if empty.size:
            _relocate_empty(X, sample_weight, offset, scale, z_centers, labels, sums, counts,
                            empty)
        new_centers = _average(sums, counts)
        shift = float((np.sqrt(((new_centers - z_centers) ** 2).sum(axis=1)) ** 2).sum())
        # No label changed (and none was moved): the same sums give the same
        # centres, so the labels and inertia just computed are final.
        settled = changed == 0 and not empty.size and np.array_equal(new_centers, z_centers)
        z_centers = new_centers
        if changed == 0 or tolerance.reached(shift):
            break
    if not settled:
        # As scikit-learn does: the labels (and inertia) of the final centres.
        _, _, total, _ = assign(z_centers)
    centers = (z_centers + offset * scale) / scale
    return labels, centers, float(total) / scale / scale if inertia else None, n_iter


class _LloydTolerance:
    r"""Lloyd's stopping rule, shift :math:`\le` ``tol * mean(var(X))`` (in the
    units of ``scale * X``), with the variances computed only when a shift
    comes near: unweighted, :math:`\sigma_d^2 \le \frac1N\sum_n x_{nd}^2`
    (``square``, read along with the column means), so a shift beyond ``tol``
    times that bound (widened for rounding) cannot stop the iteration. The
    first iterations, whose shifts are large, then cost no pass over X.
    The decisions are those of the exact rule.
    """

    def __init__(self, X, sample_weight, scale, offset, square, tol):
        self._args = (X, sample_weight, scale, offset * scale)
        self._tol = tol
        self._exact = None
        mean_square = np.inf if square is None else float(np.mean(square))
        # No bound for weights (the variance is weighted), or where squares
        # may have underflowed enough to matter (tiny data, scaled up).
        usable = sample_weight is None and 1e-290 < mean_square < np.inf
        self._bound = tol * mean_square * scale * scale * (1.0 + 1e-6) if usable else np.inf

    def reached(self, shift: float) -> bool:
        if shift > self._bound:
            return False
        if self._exact is None:
            self._exact = self._tol * column_variance(*self._args).mean()
        return shift <= self._exact


def _lloyd_assign_scratch(first, last, n_chunks, X, sw, offset, scale, centers, norms, gemm,
                          labels, *slots):
    """``lloyd_assign`` with the scratch of one call (each thread its own)."""
    rows = np.empty((BLOCK_ROWS, X.shape[1]))
    distances = np.empty((BLOCK_ROWS, centers.shape[0]))
    kmeans.lloyd_assign(first, last, n_chunks, X, sw, offset, scale, centers, norms, gemm, labels,
                 rows, distances, *slots)


def _average(sums, counts):
    """Centres from sums, as scikit-learn averages them (times 1 / weight; an
    empty cluster sits on the heaviest one)."""
    centers = sums.copy()
    heaviest = int(np.argmax(counts))
    for k in range(centers.shape[0]):
        if counts[k] > 0:
            centers[k] *= 1.0 / counts[k]
        else:
            centers[k] = sums[heaviest] * (1.0 / counts[heaviest])
    return centers


def _lloyd_reduce(sums_p, counts_p, inertia_p, changed_p):
    """The slots of ``lloyd_assign`` summed in chunk order (the same for any
    thread count): sums, counts, inertia, labels changed."""
    sums = np.zeros(sums_p.shape[1:])
    counts = np.zeros(counts_p.shape[1:])
    inertia = 0.0
    for c in range(sums_p.shape[0]):
        sums += sums_p[c]
        counts += counts_p[c]
        if inertia_p.shape[0]:
            inertia += float(inertia_p[c])
    return sums, counts, inertia, int(changed_p.sum())


def _relocate_empty(X, sample_weight, offset, scale, z_centers, labels, sums, counts, empty):
    """Each empty cluster takes over one of the rows farthest from their
    centres, which leaves its old cluster (scikit-learn's rule)."""
    distances = np.empty(X.shape[0])
    for start in range(0, X.shape[0], _ROWS_PER_SLAB):
        z = np.asarray(X[start:start + _ROWS_PER_SLAB], dtype=np.float64) * scale - offset * scale
        distances[start:start + z.shape[0]] = (
            (z - z_centers[labels[start:start + z.shape[0]]]) ** 2).sum(axis=1)
    if np.max(distances) == 0:
        return  # more clusters than distinct rows: nothing to move
    farthest = np.argpartition(distances, -empty.size)[:-empty.size - 1:-1]
    for k, row in zip(empty, farthest):
        w = 1.0 if sample_weight is None else float(sample_weight[row])
        z = np.asarray(X[row], dtype=np.float64) * scale - offset * scale
        old = labels[row]
        sums[old] -= z * w
        sums[k] = z * w
        counts[k] = w
        counts[old] -= w


def initial_statistics(X, sample_weight, n_components, init_params, covariance_type,
                       random_state, known=None) -> GaussianStatistics:
    """Statistics of the initial assignment chosen by ``init_params``.

    'kmeans' runs Lloyd's k-means from a k-means++ seeding and assigns each
    row to its cluster; 'k-means++' and 'random_from_data' give one seed row
    to each component and leave the others unassigned (as scikit-learn does);
    'random' draws soft responsibilities uniformly and normalises them;
    'hierarchical' cuts the model-based hierarchy (:class:`Hierarchy`) at K.
    ``known`` is what the caller already read of X (a :class:`ColumnScan`:
    its distance scale, and its mean and mean squares unless None).
    """
    if init_params == "kmeans":
        scale = distance_scale(X) if known is None else known.scale  # one pass for both
        moments = None if known is None or known.mean is None else (known.mean,
                                                                     known.mean_square)
        seeds, _ = kmeans_plusplus(X, n_components, random_state, sample_weight, scale=scale)
        labels, centers, _, _ = lloyd(X, seeds, sample_weight, scale=scale, inertia=False,
                                      moments=moments)
        return label_statistics_of(X, sample_weight, labels, centers, covariance_type)
    if init_params in ("k-means++", "random_from_data"):
        if init_params == "k-means++":
            _, indices = kmeans_plusplus(X, n_components, random_state, sample_weight)
        else:
            indices = random_state.choice(X.shape[0], size=n_components, replace=False)
        labels = np.full(X.shape[0], -1, dtype=np.int32)
        labels[indices] = np.arange(n_components)
        return label_statistics_of(X, sample_weight, labels, X[indices], covariance_type)
    if init_params == "hierarchical":
        hierarchy = Hierarchy(X, sample_weight, random_state)
        labels = np.full(X.shape[0], -1, dtype=np.int32)
        labels[hierarchy.rows] = hierarchy.labels(n_components)
        return label_statistics_of(X, sample_weight, labels, hierarchy.centres(X, labels,
                                   n_components), covariance_type)
    if init_params == "random":
        resp = random_state.uniform(size=(X.shape[0], n_components))
        resp /= resp.sum(axis=1, keepdims=True)
        return responsibility_statistics(X, sample_weight, resp, covariance_type)
    raise ValueError(f"Unimplemented initialization method '{init_params}'")


def responsibility_statistics(X, sample_weight, resp, covariance_type) -> GaussianStatistics:
    """Statistics of dense soft responsibilities, two-pass, in row slabs."""
    n_components = resp.shape[1]
    R = resp if sample_weight is None else resp * sample_weight[:, None]
    nk = R.sum(axis=0)
    sums = np.zeros((n_components, X.shape[1]))
    for start in range(0, X.shape[0], _ROWS_PER_SLAB):
        sums += R[start:start + _ROWS_PER_SLAB].T @ np.asarray(
            X[start:start + _ROWS_PER_SLAB], dtype=np.float64)
    shift = sums / np.maximum(nk, np.finfo(np.float64).tiny)[:, None]
    full = uses_full_scatter(covariance_type)
    n_features = X.shape[1]
    sxx = np.zeros((n_components, n_features, n_features if full else 1))
    for start in range(0, X.shape[0], _ROWS_PER_SLAB):
        slab = np.asarray(X[start:start + _ROWS_PER_SLAB], dtype=np.float64)
        r = R[start:start + _ROWS_PER_SLAB]
        for k in range(n_components):
            dev = slab - shift[k]
            wdev = dev * r[:, k:k + 1]
            sxx[k] += wdev.T @ dev if full else (wdev * dev).sum(axis=0)[:, None]
    weight = float(X.shape[0] if sample_weight is None else sample_weight.sum())
    return GaussianStatistics(nk, np.zeros_like(shift), sxx, shift, np.nan, weight,
                              count=float(X.shape[0]))


HIERARCHY_MAX_ROWS = 1000
# Ridge of the hierarchy's cluster covariances, in units of the whitened
# data's (unit) variance: small enough not to blur clusters, large enough to
# keep clusters of fewer than D + 1 rows well defined.
HIERARCHY_RIDGE = 1e-2


def _whiten(X, weights):
    """Scaled principal components (mclust's 'SVD' transformation for hc)."""
    centred = X - np.average(X, axis=0, weights=weights)
    _, s, vt = np.linalg.svd(centred * np.sqrt(weights)[:, None], full_matrices=False)
    keep = s > s[0] * 1e-10 if s.size and s[0] > 0 else np.zeros(s.shape, dtype=bool)
    if not keep.any():
        return np.zeros((X.shape[0], 1))
    scale = s[keep] / np.sqrt(weights.sum())
    return np.ascontiguousarray(centred @ vt[keep].T / scale)


class Hierarchy:
    """Model-based agglomerative hierarchy of (a subset of) the rows of X.

    The hierarchy is built once and cut at any number of clusters, so one
    hierarchy serves every K of a model-selection grid. It is built on the
    whitened rows of positive weight (the weights are the initial cluster
    sizes) or, when there are more than ``max_rows`` of them, on ``max_rows``
    rows drawn without replacement in proportion to their weights. Rows
    outside that subset are left unassigned by the start (label -1); EM
    assigns them from its first E-step.

    Parameters
    ----------
    X : ndarray (N, D)
    sample_weight : ndarray (N,) or None
    random_state : numpy.random.RandomState
    max_rows : int
    """

    def __init__(self, X, sample_weight=None, random_state=None, max_rows=HIERARCHY_MAX_ROWS):
        from ._kernels.hierarchy import hierarchical_merges

        n_samples = X.shape[0]
        weights = np.ones(n_samples) if sample_weight is None else sample_weight
        candidates = np.flatnonzero(weights > 0)
        if candidates.size > max_rows:
            # Drawn in proportion to the weights, the subset's rows count once.
            p = weights[candidates] / weights[candidates].sum()
            self.rows = np.sort(random_state.choice(candidates, size=max_rows, replace=False,
                                                    p=p))
            row_weights = np.ones(max_rows)
        else:
            self.rows = candidates
            row_weights = np.asarray(weights[candidates], dtype=np.float64)
        subset = np.asarray(X[self.rows], dtype=np.float64)
        self.merges, self.costs = hierarchical_merges(_whiten(subset, row_weights),
                                                      row_weights, HIERARCHY_RIDGE)

    def labels(self, n_clusters):
        """Labels 0..n_clusters-1 of the subset rows (``self.rows``) at that cut."""
        n = self.rows.shape[0]
        parent = np.arange(n)
        for keep, gone in self.merges[: n - n_clusters]:
            parent[gone] = keep
        # Merged-away clusters point at the cluster that absorbed them, which
        # always has a lower name: resolving in increasing order is enough.
        for i in range(n):
            parent[i] = parent[parent[i]]
        _, labels = np.unique(parent, return_inverse=True)
        return labels.astype(np.int64)

    def centres(self, X, labels, n_clusters):
        """Unweighted means of the subset rows of each cluster (where moments are taken)."""
        rows = self.rows
        counts = np.bincount(labels[rows], minlength=n_clusters)
        sums = np.zeros((n_clusters, X.shape[1]))
        np.add.at(sums, labels[rows], np.asarray(X[rows], dtype=np.float64))
        return sums / np.maximum(counts, 1)[:, None]


# ---------------------------------------------------------------------------
# Short-run EM ("em-EM", Biernacki, Celeux & Govaert 2003)

# Iterations of the first short run of every candidate; each round of
# successive halving doubles them (5, 10, 20, ...). Measured on crabs: 48
# candidates from 5 iterations find its best optima as often as 80 from 3,
# in less time; from 2, less often (README).
SHORT_RUN_ITERATIONS = 5
# Kinds of the candidates after the first, in turn. Starts at random rows
# reach optima that Lloyd's partitions do not (k-means converges to few
# partitions); one in four is a k-means++ seeding, spread by construction.
CANDIDATE_KINDS = ("random_from_data", "random_from_data", "random_from_data", "k-means++")
# Two candidates whose objectives agree to this (relative) at two successive
# iterations are in the same state, up to the order of their components.
SAME_STATE_TOLERANCE = 1e-10


def candidate_kind(index: int, first: str = "kmeans") -> str:
    """Kind of candidate ``index`` of a short-run EM search (``first`` for index 0)."""
    return first if index == 0 else CANDIDATE_KINDS[(index - 1) % len(CANDIDATE_KINDS)]


def random_rows(X, n_components: int, random_state, cumulative=None) -> np.ndarray:
    r"""Rows of ``X`` at ``n_components`` distinct points, each drawn with
    probability :math:`\propto w_n`.

    ``cumulative`` is ``np.cumsum`` of the weights (None: equal weights).
    Row :math:`n` is drawn for a uniform :math:`u` when
    :math:`\sum_{m<n} w_m \le u \sum_m w_m < \sum_{m\le n} w_m`, so
    integer weights draw the same points as repeating the rows would. A row
    at a point already drawn is drawn again (up to 100 times: with fewer
    distinct points than components, a point may stay drawn twice).
    """
    n_rows = X.shape[0]

    def draw(size):
        u = random_state.uniform(size=size)
        if cumulative is None:
            return np.minimum((u * n_rows).astype(np.int64), n_rows - 1)
        return np.minimum(np.searchsorted(cumulative, u * cumulative[-1], side="right"),
                          n_rows - 1)

    rows = draw(n_components)
    for _ in range(100):
        seen, again = set(), []
        for k, row in enumerate(rows):
            point = np.asarray(X[row]).tobytes()
            if point in seen:
                again.append(k)
            seen.add(point)
        if not again:
            break
        rows[again] = draw(len(again))
    return rows.astype(np.int64)


def seed_statistics(X, sample_weight, rows, covariance_type) -> GaussianStatistics:
    """Statistics of a start that gives row ``rows[k]`` alone to component ``k``.

    What :func:`~fastem.stats.label_statistics_of` returns for labels that
    are -1 except at the seed rows, without a pass over the data: each
    component holds one row, at its own centre, so its moments are zero.
    """
    n_components, n_features = len(rows), X.shape[1]
    width = n_features if uses_full_scatter(covariance_type) else 1
    # A row's weight as the pass takes it: in the precision of its operands.
    operands = operand_dtype(engine_for(n_features, covariance_type), X.dtype)
    nk = (np.ones(n_components) if sample_weight is None
          else np.asarray(sample_weight[rows]).astype(operands).astype(np.float64))
    weight = float(X.shape[0] if sample_weight is None else sample_weight.sum())
    return GaussianStatistics(nk, np.zeros((n_components, n_features)),
                              np.zeros((n_components, n_features, width)),
                              np.asarray(X[rows], dtype=np.float64), np.nan, weight,
                              count=float(X.shape[0]))


@dataclass
class _Candidate:
    """A candidate's EM so far: parameters after ``len(lower_bounds)`` iterations."""

    params: object
    lower_bounds: list
    converged: bool = False
    finished: bool = False


class ShortRunEM:
    r"""Short-run EM over a sequence of candidate starts (em-EM).

    Every candidate runs a few EM iterations; successive halving keeps the
    better half of the distinct candidates (by objective) and doubles their
    iterations, until one is left: the most promising of the candidates,
    which :meth:`result` then runs to convergence. Candidates in the same
    state (objectives equal to ``SAME_STATE_TOLERANCE`` at two successive
    iterations, so on the same path to the same optimum) count once.

    The chosen candidates are nested in the budget: :meth:`finalists` of a
    budget :math:`B` are the halving winners of the first :math:`B`,
    :math:`\lceil B/2\rceil`, :math:`\lceil B/4\rceil`, ..., 1 candidates,
    so those of :math:`2B` contain those of :math:`B` and twice the budget
    never ends on a worse fit. A candidate always runs in the same chunks
    (iterations 1-5, 6-10, 11-20, 21-40, ...), each continuing the last, so
    its fit is that of one uninterrupted run, whichever budget asked for it.

    Parameters
    ----------
    source, m_step
        As for :func:`fastem.em.run_em`, which runs every chunk (on small
        data, the candidates of a chunk at once on the threads of
        :mod:`fastem._threads`).
    starts : sequence of GaussianParameters
        The candidates' initial parameters, in order.
    tol : float
    max_iter : int
        Iterations of a candidate in all, short runs included.
    first_iterations : int
        Iterations of the first short run.
    """

    def __init__(self, source, m_step, starts, tol: float, max_iter: int,
                 first_iterations: int = SHORT_RUN_ITERATIONS):
        self.source, self.m_step = source, m_step
        self.monitor = em.ConvergenceMonitor(tol)
        self.max_iter = int(max_iter)
        self.first_iterations = max(1, int(first_iterations))
        self._ends = self._ladder()
        self.candidates: list = []
        self.extend(starts)

    def extend(self, starts) -> None:
        """Append candidates (their initial parameters), after those already held."""
        self.candidates.extend(_Candidate(params, [], finished=self.max_iter == 0)
                               for params in starts)

    def _ladder(self) -> list:
        """The iteration counts a candidate's chunks end at, the last max_iter."""
        ends, t = [], self.first_iterations
        while t < self.max_iter:
            ends.append(t)
            t *= 2
        return ends + [self.max_iter]

    def _advance(self, indices, until: int) -> None:
        """Run the candidates ``indices`` on, chunk by chunk, to ``until`` iterations."""
        candidates = self.candidates

        def behind(group):
            return [i for i in group if not candidates[i].finished
                    and len(candidates[i].lower_bounds) < until]

        pending = behind(indices)
        while pending:
            # A candidate always stands at the end of a chunk; those at the
            # same one run its next chunk together.
            by_start: dict[int, list] = {}
            for i in pending:
                by_start.setdefault(len(candidates[i].lower_bounds), []).append(i)
            for start, group in sorted(by_start.items()):
                end = self._ends[bisect.bisect_right(self._ends, start)]
                for i, result in zip(group, self._run(group, end - start)):
                    candidate = candidates[i]
                    candidate.params = result.params
                    candidate.lower_bounds.extend(result.lower_bounds)
                    candidate.converged = result.converged
                    candidate.finished = (result.converged
                                          or len(candidate.lower_bounds) >= self.max_iter)
            pending = behind(pending)

    def _run(self, group, iterations: int) -> list:
        """EM results of ``iterations`` more iterations of the candidates ``group``.

        Each continues from its last objective (:func:`fastem.em.run_em`'s
        ``lower_bound``), so its convergence test sees the iteration before
        the chunk and the chunks add up to one uninterrupted run. On small
        data each thread runs a contiguous slice of the group: a few
        iterations cost about as much as handing a start to another thread,
        so one hand-over per thread, not per start.
        """
        def run(indices):
            results = []
            for i in indices:
                bounds = self.candidates[i].lower_bounds
                results.append(em.run_em(self.source, self.m_step, self.candidates[i].params,
                                         self.monitor, iterations,
                                         bounds[-1] if bounds else -np.inf))
            return results

        threads = min(_threads.n_threads(), len(group))
        applies = getattr(self.source, "compiled_loop_applies", None)
        small = applies is not None and applies(self.candidates[group[0]].params.means.shape[0],
                                                threads=1)
        if threads < 2 or not small:
            return run(group)
        bounds = [len(group) * t // threads for t in range(threads + 1)]
        parts = _threads.map_threads(run, [group[a:b] for a, b in zip(bounds, bounds[1:])])
        return [result for part in parts for result in part]

    def _objectives(self, index: int, iterations: int) -> tuple[float, float]:
        """The objective of candidate ``index`` at that iteration (its last, if it
        stopped before) and at the one before (-inf when there is none)."""
        bounds = self.candidates[index].lower_bounds
        t = min(iterations, len(bounds))
        last = bounds[t - 1] if t >= 1 else -np.inf
        before = bounds[t - 2] if t >= 2 else -np.inf
        return (-np.inf if np.isnan(last) else last), (-np.inf if np.isnan(before) else before)

    def _distinct(self, indices, iterations: int) -> list:
        """``indices`` best first at that iteration, one per state (the lowest index)."""
        scored = sorted(((self._objectives(i, iterations), i) for i in indices),
                        key=lambda item: (-item[0][0], item[1]))
        kept: list = []
        for (last, before), i in scored:
            # Best first: a state equal to this one is among the last kept.
            same = False
            for (other_last, other_before), _ in reversed(kept):
                if not _same(last, other_last):
                    break
                if _same(before, other_before):
                    same = True
                    break
            if not same:
                kept.append(((last, before), i))
        return [i for _, i in kept]

    def _halving(self, budget: int) -> int:
        """The winner of successive halving among the first ``budget`` candidates."""
        alive = list(range(budget))
        iterations = self.first_iterations
        while True:
            self._advance(alive, iterations)
            alive = self._distinct(alive, iterations)
            if len(alive) == 1 or all(self.candidates[i].finished for i in alive):
                return alive[0]
            alive = alive[:(len(alive) + 1) // 2]
            if len(alive) == 1:
                return alive[0]
            iterations = min(2 * iterations, self.max_iter)

    def finalists(self, budget: int | None = None) -> list:
        """Indices of the candidates worth running to convergence, in increasing order."""
        budget = len(self.candidates) if budget is None else min(budget, len(self.candidates))
        chosen = set()
        while budget >= 1:
            chosen.add(self._halving(budget))
            if budget == 1:
                break
            budget = (budget + 1) // 2
        return sorted(chosen)

    def result(self, index: int):
        """Candidate ``index`` run to convergence (or ``max_iter``), as an EMResult."""
        return self.results([index])[index]

    def results(self, indices) -> dict:
        """``{index: EMResult}`` of the candidates run to convergence, together."""
        self._advance(list(indices), self.max_iter)
        out = {}
        for i in indices:
            candidate = self.candidates[i]
            bounds = candidate.lower_bounds
            out[i] = em.EMResult(candidate.params, bounds[-1] if bounds else -np.inf,
                                       list(bounds), len(bounds), candidate.converged)
        return out

    def lower_bounds(self) -> list:
        """The objective per iteration of every candidate, as far as it ran."""
        return [list(candidate.lower_bounds) for candidate in self.candidates]


def _same(a: float, b: float) -> bool:
    if a == b:
        return True
    return bool(abs(a - b) <= SAME_STATE_TOLERANCE * max(1.0, abs(a), abs(b)))


def short_run_statistics(X, sample_weight, n_components, index, covariance_type,
                         random_state) -> GaussianStatistics:
    """Statistics of candidate ``index`` of a short-run EM search by
    ``GaussianMixture(init_params='em-em')``: k-means first (the start of
    ``init_params='kmeans'``, from the same draws), then the kinds of
    ``CANDIDATE_KINDS``, drawn in turn from ``random_state``."""
    kind = candidate_kind(index, "kmeans")
    if kind == "kmeans":
        return initial_statistics(X, sample_weight, n_components, kind, covariance_type,
                                  random_state)
    if kind == "k-means++":
        _, rows = kmeans_plusplus(X, n_components, random_state, sample_weight)
    else:
        rows = random_rows(X, n_components, random_state,
                           None if sample_weight is None else np.cumsum(sample_weight))
    return seed_statistics(X, sample_weight, rows, covariance_type)
