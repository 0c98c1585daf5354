"""Sufficient statistics of a Gaussian mixture and the M-step that reads them.

EM for a Gaussian mixture needs, per component, only

.. math::

    N_k = \\sum_n w_n r_{nk},\\quad
    s_k = \\sum_n w_n r_{nk}(x_n - c_k),\\quad
    S_k = \\sum_n w_n r_{nk}(x_n - c_k)(x_n - c_k)^T

(or the diagonal of :math:`S_k`), taken around a per-component shift
:math:`c_k`, plus the log-likelihood. Statistics of disjoint row sets taken
under the same parameters *add*: in-memory, chunked, out-of-core, online and
distributed fitting all produce :class:`GaussianStatistics` and hand them to
the one :func:`m_step`.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np

from ._kernels import kernel_module
from ._kernels.blas import blas_routines, single_threaded_blas
from ._kernels.chunks import n_chunks_for
from ._threads import run_chunks
from .covariance import (
    COVARIANCE_KIND,
    from_canonical,
    precision_cholesky_of_covariance,
    to_canonical,
    uses_full_scatter,
)

estep = kernel_module("estep")
mstep = kernel_module("mstep")
whiten = kernel_module("whiten")

_NO_WEIGHTS = np.empty(0)
# From this width on, the fused pass runs the BLAS engines (dtrmm + dsyrk,
# or matrix products for diagonal models); below it the vectorised loops are faster.
BLAS_MIN_FEATURES = 24


class GaussianParameters(NamedTuple):
    """Parameters of a Gaussian mixture, in scikit-learn's shapes."""

    weights: np.ndarray
    means: np.ndarray
    covariances: np.ndarray
    precisions_cholesky: np.ndarray


@dataclass(frozen=True)
class GaussianStatistics:
    """Sufficient statistics of (a part of) a data set under fixed parameters.

    Attributes
    ----------
    nk : ndarray (K,)
        Weighted responsibility mass :math:`N_k`.
    sx : ndarray (K, D)
        :math:`s_k`, first moments around ``shift``.
    sxx : ndarray (K, D, D) or (K, D, 1), or (1, D, D)
        :math:`S_k`, second moments around ``shift`` (full or diagonal), or
        for a tied model possibly their sum :math:`\\sum_k S_k` (``is_pooled``).
    shift : ndarray (K, D)
        The per-component centres :math:`c_k` the moments are taken around.
    loglik : float
        :math:`\\sum_n w_n \\log p(x_n)` under the parameters of the E-step.
    weight : float
        :math:`\\sum_n w_n`.
    worst_loglik, worst_point : float, ndarray (D,)
        The row with the lowest :math:`\\log p(x_n)` (where a collapsed
        component is re-seeded).
    count : float
        Number of rows the statistics summarise (what "an average row's
        weight", ``weight / count``, refers to).
    """

    nk: np.ndarray
    sx: np.ndarray
    sxx: np.ndarray
    shift: np.ndarray
    loglik: float
    weight: float
    worst_loglik: float = np.inf
    worst_point: np.ndarray | None = None
    count: float = 0.0

    @property
    def is_pooled(self) -> bool:
        """Whether ``sxx`` is a tied model's pooled scatter :math:`\\sum_k S_k`,
        (1, D, D), rather than one matrix per component."""
        return self.sxx.shape[0] < self.nk.shape[0]

    def pooled(self) -> GaussianStatistics:
        """The same statistics with the scatter summed over components (all a
        tied model's M-step reads)."""
        if self.is_pooled:
            return self
        return replace(self, sxx=self.sxx.sum(axis=0, keepdims=True))

    def __add__(self, other: GaussianStatistics) -> GaussianStatistics:
        if not isinstance(other, GaussianStatistics):
            return NotImplemented
        if self.is_pooled != other.is_pooled:
            return self.pooled() + other.pooled()
        if self.shift.shape != other.shift.shape or self.sxx.shape != other.sxx.shape:
            raise ValueError("cannot add statistics of models of different shapes")
        if not np.array_equal(self.shift, other.shift):
            other = other.recentre(self.shift)
        worst = self if self.worst_loglik <= other.worst_loglik else other
        return GaussianStatistics(
            self.nk + other.nk,
            self.sx + other.sx,
            self.sxx + other.sxx,
            self.shift,
            self.loglik + other.loglik,
            self.weight + other.weight,
            worst.worst_loglik,
            worst.worst_point,
            self.count + other.count,
        )

    def scaled(self, factor: float) -> GaussianStatistics:
        """Every additive statistic times ``factor`` (stepwise EM blends
        :math:`(1-\\rho)\\,s_{old} + \\rho\\,s_{new}`)."""
        return GaussianStatistics(self.nk * factor, self.sx * factor, self.sxx * factor,
                                  self.shift, self.loglik * factor, self.weight * factor,
                                  self.worst_loglik, self.worst_point, self.count * factor)

    def recentre(self, shift: np.ndarray) -> GaussianStatistics:
        """The same statistics taken around another shift.

        With :math:`\\delta_k = c_k - c'_k`:
        :math:`s'_k = s_k + N_k\\delta_k` and
        :math:`S'_k = S_k + \\delta_k s_k^T + s_k\\delta_k^T + N_k\\delta_k\\delta_k^T`.
        """
        shift = np.asarray(shift, dtype=np.float64)
        delta = self.shift - shift
        nk = self.nk
        sx = self.sx + nk[:, None] * delta
        if self.sxx.shape[2] > 1:  # full scatter (for D = 1 both forms agree)
            outer = np.einsum("ki,kj->kij", delta, self.sx)
            change = outer + outer.transpose(0, 2, 1) + nk[:, None, None] * np.einsum(
                "ki,kj->kij", delta, delta
            )
            if self.is_pooled:
                change = change.sum(axis=0, keepdims=True)
            sxx = self.sxx + change
        else:
            sxx = self.sxx + (2.0 * delta * self.sx + nk[:, None] * delta * delta)[:, :, None]
        return GaussianStatistics(nk, sx, sxx, shift, self.loglik, self.weight,
                                  self.worst_loglik, self.worst_point, self.count)


def weights_operand(sample_weight):
    """Sample weights as kernels take them: an empty array stands for unit weights."""
    return _NO_WEIGHTS if sample_weight is None else sample_weight


def kernel_operands(params: GaussianParameters, covariance_type: str, dtype=np.float64):
    """Means, precision operand, per-component log-constant and kernel flavour.

    The log-constant is :math:`\\log\\pi_k + \\log\\det U_k - \\tfrac D2\\log 2\\pi`.
    Full and tied models pass (K, D, D) precision Cholesky factors; diagonal
    and spherical models pass (K, D, 1) precisions :math:`1/\\sigma^2` (one
    kernel signature serves both flavours). Computed by the same compiled
    function as in the compiled EM loop (see ``gaussian_operands``).

    Parameters with ``expected_log_terms(n_features)`` (a variational
    posterior, :class:`fastem.variational.VariationalParameters`) replace
    :math:`\\log\\pi_k` by those terms: the variational E-step is this pass
    with expected operands.
    """
    means = np.ascontiguousarray(params.means, dtype=dtype)
    kind = COVARIANCE_KIND[covariance_type]
    weights, expected_log_terms = _operand_weights(params)
    prec, log_const = estep.gaussian_operands(
        weights, to_canonical(params.precisions_cholesky, covariance_type), kind,
        means.shape[1])
    if expected_log_terms is not None:
        log_const = log_const + expected_log_terms(means.shape[1])
    return means, prec.astype(dtype, copy=False), log_const, kind <= 1


def _operand_weights(params):
    """The weights the operands' log-constants take, and the expected log terms
    that replace them for a variational posterior (None otherwise)."""
    expected_log_terms = getattr(params, "expected_log_terms", None)
    if expected_log_terms is not None:
        return np.ones(np.shape(params.means)[0]), expected_log_terms
    return np.ascontiguousarray(params.weights, dtype=np.float64), None


def uses_blas(n_features: int, covariance_type: str) -> bool:
    """Whether the fused pass runs a BLAS engine for this model shape."""
    return n_features >= BLAS_MIN_FEATURES


def engine_for(n_features: int, covariance_type: str) -> int:
    """The block engine of the fused pass (``estep.ENGINE_*``) for this model shape.

    The one rule every caller follows (the Python EM loop, the compiled one,
    predictions and initial statistics): BLAS from ``BLAS_MIN_FEATURES``
    features on, full scatter for 'full' and 'tied'.
    """
    full = uses_full_scatter(covariance_type)
    if uses_blas(n_features, covariance_type):
        return estep.ENGINE_BLAS_FULL if full else estep.ENGINE_BLAS_DIAG
    return estep.ENGINE_LOOPS_FULL if full else estep.ENGINE_LOOPS_DIAG


def operand_dtype(engine: int, data_dtype) -> np.dtype:
    """Precision of the pass's operands: the data's for the loop engines, float64 for BLAS."""
    if engine in (estep.ENGINE_BLAS_FULL, estep.ENGINE_BLAS_DIAG):
        return np.dtype(np.float64)
    return np.dtype(data_dtype)


_NO_LABELS = np.empty(0, dtype=np.int32)
_NO_BOUNDS = np.empty((0, 2))
# Exact pruning pays for the eigenvalues it needs (K D^3) from this many rows
# per feature on (the E-step costs N K D^2 / 2).
PRUNE_MIN_ROWS_PER_FEATURE = 64
# Relative widening of the eigenvalue bounds, far beyond their rounding errors.
_EIGENVALUE_SLACK = 1e-6


def pruning_bounds(prec_chol, X) -> np.ndarray:
    r"""The full BLAS engine's pruning bounds (K, 2): :math:`\tfrac12\lambda_{\min}`
    and :math:`\tfrac12\lambda_{\max}` of each precision :math:`P_k = U_k U_k^T`,
    widened by ``_EIGENVALUE_SLACK``; empty (no pruning) on small data, on
    float32 data (its distances would be rounded to float32), for non-finite
    factors, or where this process's dtrmm does not give each row the same
    result whatever rows share the call (:func:`pruning_is_exact`).
    """
    n_components, n_features = prec_chol.shape[:2]
    if (X.dtype != np.float64 or X.shape[0] < PRUNE_MIN_ROWS_PER_FEATURE * n_features
            or not pruning_is_exact(n_features)):
        return _NO_BOUNDS
    U = np.asarray(prec_chol, dtype=np.float64)
    with np.errstate(all="ignore"):
        eigenvalues = np.linalg.eigvalsh(U @ U.transpose(0, 2, 1))
    if not np.all(np.isfinite(eigenvalues)):
        return _NO_BOUNDS
    bounds = np.empty((n_components, 2))
    bounds[:, 0] = 0.5 * np.maximum(eigenvalues[:, 0], 0.0) * (1.0 - _EIGENVALUE_SLACK)
    bounds[:, 1] = 0.5 * eigenvalues[:, -1] * (1.0 + _EIGENVALUE_SLACK)
    return bounds


@functools.cache
def pruning_is_exact(n_features: int) -> bool:
    """Whether this process's dtrmm computes a column the same way whatever
    columns share the call, when their number is a multiple of
    ``estep.TRMM_ROWS`` (OpenBLAS does: its kernels take whole panels of
    columns; checked on random matrices of this width, single-threaded as the
    pass calls it). Exact pruning relies on it."""
    from scipy.linalg import blas as scipy_blas

    rng = np.random.default_rng(12345)
    lower = np.asfortranarray(np.tril(rng.normal(size=(n_features, n_features))))
    block = np.asfortranarray(rng.normal(size=(n_features, 16 * estep.TRMM_ROWS)))
    with single_threaded_blas():
        whole = scipy_blas.dtrmm(1.0, lower, block, side=0, lower=1, trans_a=0, diag=0)
        for size in (1, 3, 8, 15):
            columns = np.sort(rng.choice(block.shape[1], size * estep.TRMM_ROWS, replace=False))
            part = scipy_blas.dtrmm(1.0, lower, np.asfortranarray(block[:, columns]), side=0,
                                    lower=1, trans_a=0, diag=0)
            if not np.array_equal(part, whole[:, columns]):
                return False
    return True


_NO_OUTPUT = (np.empty((0, 0)), np.empty(0))


def _run_pass(engine, mode, X, sample_weight, labels, means, prec, log_const, n_chunks,
              out=_NO_OUTPUT[0], log_norm=_NO_OUTPUT[1], pruned=None):
    """Run :func:`~fastem._kernels.estep.gaussian_pass` over all chunks of X.

    Returns the per-chunk slots (nk, sx, sxx, loglik, worst, worst_index)
    and the rows the pass left out as too far from every component
    (:func:`_far_rows`; None when there are none, nearly always), whose
    outputs (``MODE_LOG_RESP``, ``MODE_PROBA``, ``MODE_LOG_NORM``,
    ``MODE_ARGMAX``) are already filled in. The full BLAS engine prunes far
    components exactly where it can (:func:`pruning_bounds`); ``pruned``
    (n_chunks,) int64, if given, receives the counts of skipped pairs.
    """
    n_components, n_features = means.shape
    accumulates = mode in (estep.MODE_STATISTICS, estep.MODE_LABELS)
    full = engine in (estep.ENGINE_LOOPS_FULL, estep.ENGINE_BLAS_FULL)
    width = n_features if full else 1
    slots = (n_chunks, n_components) if accumulates else (n_chunks, 0)
    parts = (np.zeros(slots), np.zeros(slots + (n_features if accumulates else 0,)),
             np.zeros(slots + ((n_features, width) if accumulates else (0, 0))),
             np.zeros(n_chunks), np.full(n_chunks, np.inf), np.zeros(n_chunks, dtype=np.int64))
    far_count = np.zeros(n_chunks, dtype=np.int64)
    far_flags = np.zeros(0 if mode == estep.MODE_LABELS else X.shape[0], dtype=np.bool_)
    trmm, syrk = blas_routines()
    work = X.shape[0] * n_components * (n_features + 1) ** 2
    blas = engine in (estep.ENGINE_BLAS_FULL, estep.ENGINE_BLAS_DIAG)
    if pruned is None:
        pruned = np.zeros(n_chunks, dtype=np.int64)
    with single_threaded_blas() if blas else contextlib.nullcontext():
        bounds = _NO_BOUNDS
        if engine == estep.ENGINE_BLAS_FULL and mode not in (estep.MODE_LABELS,
                                                             estep.MODE_LOG_RESP):
            # Inside the single-threaded BLAS: woken for the eigenvalues,
            # OpenBLAS's own threads would spin beside the pass's.
            bounds = pruning_bounds(prec, X)
        run_chunks(estep.gaussian_pass[engine], n_chunks, work, n_chunks, mode, X,
                   weights_operand(sample_weight), labels, means, prec, log_const, bounds, trmm,
                   syrk, *parts, out, log_norm, far_count, far_flags, pruned)
    far = None
    if far_count.any():
        far = _far_rows(X, np.flatnonzero(far_flags), means, prec, log_const, full,
                        mode in (estep.MODE_LOG_RESP, estep.MODE_ARGMAX))
        if mode in (estep.MODE_LOG_RESP, estep.MODE_PROBA):
            out[far.rows] = far.values
        if mode == estep.MODE_ARGMAX:
            labels[far.rows] = far.values.argmax(axis=1)
        if mode in (estep.MODE_LOG_RESP, estep.MODE_PROBA, estep.MODE_LOG_NORM) or (
                mode == estep.MODE_ARGMAX and log_norm.shape[0]):
            log_norm[far.rows] = far.log_norm
    return parts, far


class _FarRows(NamedTuple):
    rows: np.ndarray      # (n,) their indices
    values: np.ndarray    # (n, K) responsibilities, or their logarithms
    log_norm: np.ndarray  # (n,) log p(x)


def _far_rows(X, rows, means, prec, log_const, full, keep_log) -> _FarRows:
    r"""Responsibilities and :math:`\log p(x)` of rows too far from every
    component for the pass's operands, by :func:`~fastem._kernels.estep.far_rows`."""
    gathered = np.ascontiguousarray(X[rows])
    values = np.empty((means.shape[0], rows.shape[0]))
    log_norm = np.empty(rows.shape[0])
    estep.far_rows(gathered, 0, np.ones(rows.shape[0], dtype=np.bool_), means, prec, log_const,
                   bool(full), bool(keep_log), values, np.empty(rows.shape[0]), log_norm)
    return _FarRows(rows, values.T.copy(), log_norm)


def _add_far_rows(far: _FarRows, X, sample_weight, shift, nk, sx, sxx, loglik, worst_loglik,
                  worst):
    """The statistics of the rows the pass left out, added to its sums (in place
    for nk, sx, sxx; the log-likelihood and the worst row returned)."""
    weights = (np.ones(far.rows.shape[0]) if sample_weight is None
               else sample_weight[far.rows])
    resp = far.values * weights[:, None]
    centred = np.asarray(X[far.rows], dtype=np.float64)[:, None, :] - shift[None]
    nk += resp.sum(axis=0)
    sx += np.einsum("nk,nkd->kd", resp, centred)
    if sxx.shape[2] > 1:
        sxx += np.einsum("nk,nki,nkj->kij", resp, centred, centred)
    else:
        sxx[:, :, 0] += np.einsum("nk,nkd->kd", resp, centred * centred)
    loglik += float(np.sum(weights * far.log_norm))
    live = weights > 0.0
    if live.any():
        lowest = int(np.argmin(np.where(live, far.log_norm, np.inf)))
        if far.log_norm[lowest] < worst_loglik:
            worst_loglik, worst = float(far.log_norm[lowest]), int(far.rows[lowest])
    return loglik, worst_loglik, worst


def reduce_chunks(engine, means, nk_parts, sx_parts, sxx_parts, ll_parts, worst, worst_index):
    """The pass's per-chunk statistics reduced in chunk order: the arithmetic
    of :func:`~fastem._kernels.estep.finish_statistics`, in NumPy.

    The compiled EM loop calls the kernel; the Python driver this twin, which
    adds the same values in the same order (one element-wise addition per
    chunk, then the mirroring and, for the diagonal BLAS engine, the move to
    each component's mean in the kernel's order of operations), so the two
    loops keep giving the same bits (tested) while a first fit compiles one
    kernel less.
    """
    n_chunks, n_components, n_features, width = sxx_parts.shape
    nk = np.zeros(n_components)
    sx = np.zeros((n_components, n_features))
    sxx = np.zeros((n_components, n_features, width))
    loglik = 0.0
    best, best_index = np.inf, 0
    for c in range(n_chunks):
        nk += nk_parts[c]
        sx += sx_parts[c]
        sxx += sxx_parts[c]
        loglik += float(ll_parts[c])
        if worst[c] < best:
            best, best_index = float(worst[c]), int(worst_index[c])
    if width > 1:
        lower = np.tril_indices(n_features, -1)
        sxx[:, lower[0], lower[1]] = sxx[:, lower[1], lower[0]]
    if engine == estep.ENGINE_BLAS_DIAG:
        centre = np.zeros(n_features)
        for k in range(n_components):
            centre += means[k]
        centre /= n_components
        delta = means - centre
        sxx[:, :, 0] += -2.0 * delta * sx + nk[:, None] * delta * delta
        sx -= nk[:, None] * delta
    return nk, sx, sxx, loglik, best, best_index


def statistics_chunks(n_samples: int, n_components: int, n_features: int,
                      covariance_type: str) -> int:
    """Chunks of a statistics pass (they fix its reduction order; see ``n_chunks_for``)."""
    full = uses_full_scatter(covariance_type)
    return n_chunks_for(n_samples, n_components * n_features * (n_features if full else 1))


def e_step_statistics(X, sample_weight, params: GaussianParameters, covariance_type: str
                      ) -> GaussianStatistics:
    """One fused pass over ``X``: E-step under ``params`` and its statistics.

    ``X`` must be C-contiguous float32/float64 and ``sample_weight`` None or a
    float64 vector; validation happens at the estimator boundary. The
    operands are in the precision :func:`operand_dtype` gives (statistics are
    always accumulated in float64).
    """
    engine = engine_for(X.shape[1], covariance_type)
    means, prec, log_const, _ = kernel_operands(params, covariance_type,
                                                operand_dtype(engine, X.dtype))
    n_chunks = statistics_chunks(X.shape[0], *means.shape, covariance_type)
    parts, far = _run_pass(engine, estep.MODE_STATISTICS, X, sample_weight, _NO_LABELS, means,
                           prec, log_const, n_chunks)
    shift = means.astype(np.float64, copy=False)
    nk, sx, sxx, loglik, worst_loglik, worst = reduce_chunks(engine, shift, *parts)
    if far is not None:
        loglik, worst_loglik, worst = _add_far_rows(far, X, sample_weight, shift, nk, sx, sxx,
                                                    loglik, worst_loglik, worst)
    weight = float(X.shape[0] if sample_weight is None else sample_weight.sum())
    return GaussianStatistics(nk, sx, sxx, means.astype(np.float64), float(loglik), weight,
                              float(worst_loglik), np.asarray(X[worst], dtype=np.float64),
                              float(X.shape[0]))


class Whitening(NamedTuple):
    """What a tied model's whitened E-step keeps for a whole fit (see
    :func:`whitened_statistics`): the centre :math:`c` and the total scatter
    :math:`S_c` (1, D, D) around it."""

    centre: np.ndarray
    total_scatter: np.ndarray


def whitening_of(X, sample_weight) -> Whitening:
    """The centre (the weighted mean, as the statistics kernel rounds it) and
    the total scatter around it, by the statistics pass with one label."""
    weights = None if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    mean = np.average(np.asarray(X, dtype=np.float64), axis=0, weights=weights)
    total = label_statistics_of(X, sample_weight, np.zeros(X.shape[0], dtype=np.int32),
                                mean[None], "full")
    return Whitening(total.shift[0].copy(), total.sxx.copy())


def whitened_statistics(X, sample_weight, params: GaussianParameters, whitening: Whitening,
                        rows=None) -> GaussianStatistics:
    """A tied model's E-step statistics through its whitened rows, the scatter pooled.

    The rows are transformed once, :math:`y = (x - c)U`, and the E-step of a
    spherical model with unit variances runs on them (the diagonal engines,
    :math:`D` per row and component instead of :math:`D^2`); the first moments
    and the pooled scatter follow (:mod:`fastem._kernels.whiten`). The same
    kernels as the compiled loop's whitened variant, in the same order.
    ``rows``, like ``X``, receives the whitened rows (a new array if None).
    """
    n_samples, n_features = X.shape
    n_components = params.means.shape[0]
    prec_chol = np.ascontiguousarray(to_canonical(params.precisions_cholesky, "tied"),
                                     dtype=np.float64)
    centre, total_scatter = whitening
    Y = np.empty_like(X) if rows is None else rows
    n_chunks = statistics_chunks(n_samples, n_components, n_features, "diag")
    run_chunks(whiten.whiten_rows, n_chunks, n_samples * n_features * n_features / 2, n_chunks, X,
               centre, prec_chol[0], Y)
    weights, expected_log_terms = _operand_weights(params)
    shift_y, log_const = whiten.whitened_operands(
        weights, np.ascontiguousarray(params.means, dtype=np.float64), prec_chol, centre)
    if expected_log_terms is not None:
        log_const = log_const + expected_log_terms(n_features)
    engine = engine_for(n_features, "diag")
    operand = operand_dtype(engine, X.dtype)
    means = shift_y.astype(operand)
    unit = np.ones((n_components, n_features, 1), dtype=operand)
    parts, far = _run_pass(engine, estep.MODE_STATISTICS, Y, sample_weight, _NO_LABELS, means,
                           unit, log_const, n_chunks)
    shift_y = means.astype(np.float64)
    nk, sy, syy, loglik, worst_loglik, worst = reduce_chunks(engine, shift_y, *parts)
    if far is not None:
        loglik, worst_loglik, worst = _add_far_rows(far, Y, sample_weight, shift_y, nk, sy, syy,
                                                    loglik, worst_loglik, worst)
    sx, shift, pooled = whiten.pooled_tied_statistics(nk, sy, shift_y, prec_chol[0], centre,
                                               total_scatter)
    weight = float(n_samples if sample_weight is None else sample_weight.sum())
    return GaussianStatistics(nk, sx, pooled, shift, float(loglik), weight, float(worst_loglik),
                              np.asarray(X[worst], dtype=np.float64), float(n_samples))


def label_statistics_of(X, sample_weight, labels, shift, covariance_type) -> GaussianStatistics:
    """Statistics of a hard assignment of rows to components (label -1: none).

    The same pass as the E-step, with one-hot responsibilities.
    """
    engine = engine_for(X.shape[1], covariance_type)
    # The moments are taken around the shift as the kernel sees it (in the
    # operands' precision), so that is the shift recorded.
    shift = np.ascontiguousarray(shift, dtype=operand_dtype(engine, X.dtype))
    n_components, n_features = shift.shape
    full = uses_full_scatter(covariance_type)
    prec = np.zeros((n_components, n_features, n_features if full else 1), dtype=shift.dtype)
    n_chunks = statistics_chunks(X.shape[0], n_components, n_features, covariance_type)
    parts, _ = _run_pass(engine, estep.MODE_LABELS, X, sample_weight,
                         np.asarray(labels, dtype=np.int32), shift, prec,
                         np.zeros(n_components), n_chunks)
    nk, sx, sxx, _, _, _ = reduce_chunks(engine, shift.astype(np.float64, copy=False), *parts)
    weight = float(X.shape[0] if sample_weight is None else sample_weight.sum())
    return GaussianStatistics(nk, sx, sxx, shift.astype(np.float64), np.nan, weight,
                              count=float(X.shape[0]))


def m_step(stats: GaussianStatistics, reg_covar: float, covariance_type: str):
    """Maximise the expected complete-data log-likelihood given the statistics.

    .. math::

        \\pi_k = \\tilde N_k/\\textstyle\\sum_j\\tilde N_j,\\quad
        \\mu_k = c_k + s_k/\\tilde N_k,\\quad
        \\Sigma_k = \\frac{S_k - d_k s_k^T - s_k d_k^T + N_k d_k d_k^T}{\\tilde N_k}
        + \\lambda I

    with :math:`\\tilde N_k = N_k + 10\\epsilon` (scikit-learn's guard) and
    :math:`d_k = s_k/\\tilde N_k`; 'tied' pools the numerators over
    components, 'diag' keeps the diagonal and 'spherical' its mean.

    Returns
    -------
    params : GaussianParameters
    jitter : ndarray
        Extra diagonal loading that was needed to make each covariance
        positive definite (0 where none was; -1 where it could not be made so).
    """
    kind = COVARIANCE_KIND[covariance_type]
    family = mstep.m_step_full if uses_full_scatter(covariance_type) else mstep.m_step_diag
    # tied (kind 1) pools the full scatter; spherical (kind 3) averages the diagonal.
    weights, means, cov, prec_chol, jitter = family(
        stats.nk, np.ascontiguousarray(stats.sx), np.ascontiguousarray(stats.sxx),
        np.ascontiguousarray(stats.shift), float(reg_covar), kind in (1, 3))
    return GaussianParameters(weights, means, from_canonical(cov, covariance_type),
                              from_canonical(prec_chol, covariance_type)), jitter


class MaximumLikelihood:
    """The maximum-likelihood M-step of a Gaussian mixture, for the EM driver.

    Calling it is :func:`m_step`; its objective is the average log-likelihood
    :math:`\\sum_n w_n \\log p(x_n) / \\sum_n w_n` of the statistics (the
    lower bound scikit-learn reports).

    Parameters
    ----------
    covariance_type : {'full', 'tied', 'diag', 'spherical'}
    reg_covar : float
        Added to the diagonal of every covariance.
    """

    def __init__(self, covariance_type: str, reg_covar: float):
        self.covariance_type = covariance_type
        self.reg_covar = float(reg_covar)

    def __call__(self, stats: GaussianStatistics):
        return m_step(stats, self.reg_covar, self.covariance_type)

    def objective(self, stats: GaussianStatistics, params: GaussianParameters = None
                  ) -> float:
        """Average log-likelihood of ``stats`` (taken under ``params``, which a
        prior's M-step needs and this one does not)."""
        return stats.loglik / stats.weight

    @property
    def compiled_form(self) -> tuple[int, float]:
        """``(kind, reg_covar)``: what the compiled EM loop needs to run this M-step."""
        return COVARIANCE_KIND[self.covariance_type], self.reg_covar

    def reseed(self, params: GaussianParameters, components, point, weight
               ) -> GaussianParameters:
        """Move ``components`` (a boolean mask) to ``point``, with the weight
        ``weight`` (then renormalised) and the average covariance of the others."""
        weights, means, cov, prec_chol = (np.array(p, dtype=np.float64) for p in params)
        live = ~components
        means[components] = point
        if self.covariance_type != "tied":
            typical = np.average(cov[live], axis=0, weights=weights[live])
            cov[components] = typical
            prec_chol[components] = precision_cholesky_of_covariance(typical,
                                                                     self.covariance_type)
        weights[components] = weight
        weights /= weights.sum()
        return GaussianParameters(weights, means, cov, prec_chol)


def log_responsibilities(X, params: GaussianParameters, covariance_type: str, *,
                         probabilities: bool = False):
    r"""Per-row log p(x) and (N, K) log-responsibilities (for predictions).

    The fitting pass's engines and operand precision (float32 data: float32
    log-densities, as in scikit-learn); ``log_norm`` is summed in float64.

    Returns
    -------
    log_resp : ndarray (N, K), float64
        :math:`\log r_{nk}`; with ``probabilities``, :math:`r_{nk}` itself
        (responsibilities below :math:`e^{-708}` of a row's largest, or
        :math:`e^{-87}` for float32 data, are 0).
    log_norm : ndarray (N,), float64
        :math:`\log p(x_n)`.
    """
    engine = engine_for(X.shape[1], covariance_type)
    means, prec, log_const, _ = kernel_operands(params, covariance_type,
                                                operand_dtype(engine, X.dtype))
    log_resp = np.empty((X.shape[0], means.shape[0]))
    log_norm = np.empty(X.shape[0])
    mode = estep.MODE_PROBA if probabilities else estep.MODE_LOG_RESP
    _run_pass(engine, mode, X, None, _NO_LABELS, means, prec, log_const,
              n_chunks_for(X.shape[0], 1), log_resp, log_norm)
    return log_resp, log_norm


def log_densities(X, params: GaussianParameters, covariance_type: str) -> np.ndarray:
    r""":math:`\log p(x_n) = \log\sum_k \pi_k \mathcal N(x_n \mid \mu_k, \Sigma_k)` per
    row (float64), by the pass of :func:`log_responsibilities` without its
    (N, K) output."""
    engine = engine_for(X.shape[1], covariance_type)
    means, prec, log_const, _ = kernel_operands(params, covariance_type,
                                                operand_dtype(engine, X.dtype))
    log_norm = np.empty(X.shape[0])
    _run_pass(engine, estep.MODE_LOG_NORM, X, None, _NO_LABELS, means, prec, log_const,
              n_chunks_for(X.shape[0], 1), _NO_OUTPUT[0], log_norm)
    return log_norm


def most_probable_components(X, params: GaussianParameters, covariance_type: str) -> np.ndarray:
    r""":math:`\arg\max_k \log \pi_k \mathcal N(x_n \mid \mu_k, \Sigma_k)` per row (the
    lowest k of a tie, as scikit-learn's ``predict``), int64, without an (N, K)
    array."""
    engine = engine_for(X.shape[1], covariance_type)
    means, prec, log_const, _ = kernel_operands(params, covariance_type,
                                                operand_dtype(engine, X.dtype))
    labels = np.empty(X.shape[0], dtype=np.int32)
    _run_pass(engine, estep.MODE_ARGMAX, X, None, labels, means, prec, log_const,
              n_chunks_for(X.shape[0], 1))
    return labels.astype(np.int64)


def pruned_fraction(X, weights, means, precisions_cholesky, covariance_type: str) -> float:
    """The fraction of (row, component) pairs a pass under these parameters
    leaves out by exact pruning (0 outside the full BLAS engine): a
    diagnostic for benchmarks."""
    params = GaussianParameters(weights, means, None, precisions_cholesky)
    engine = engine_for(X.shape[1], covariance_type)
    means, prec, log_const, _ = kernel_operands(params, covariance_type,
                                                operand_dtype(engine, X.dtype))
    n_chunks = n_chunks_for(X.shape[0], 1)
    pruned = np.zeros(n_chunks, dtype=np.int64)
    _run_pass(engine, estep.MODE_LOG_NORM, X, None, _NO_LABELS, means, prec, log_const,
              n_chunks, _NO_OUTPUT[0], np.empty(X.shape[0]), pruned)
    return float(pruned.sum()) / (X.shape[0] * means.shape[0])
