"""Statistics sources: current parameters in, additive statistics out.

A source is the data as the EM driver (:mod:`fastem.em`) sees it: it offers
``statistics(params)``, one pass over the data under ``params`` that returns
:class:`~fastem.stats.GaussianStatistics` (which add, so a source may
produce them block by block, chunk by chunk or worker by worker). Sources for
memory-mapped blocks, Dask chunks, rows with missing values or the
forward–backward pass of an HMM plug into the same driver.
"""

from __future__ import annotations

import collections
import contextlib
import threading

import numpy as np

from . import _threads
from ._kernels import kernel_module
from ._kernels.blas import blas_routines, single_threaded_blas
from .covariance import from_canonical, to_canonical
from .em import COLLAPSE_FRACTION
from .stats import (
    BLAS_MIN_FEATURES,
    GaussianParameters,
    GaussianStatistics,
    e_step_statistics,
    engine_for,
    operand_dtype,
    statistics_chunks,
    weights_operand,
    whitened_statistics,
    whitening_of,
)

estep = kernel_module("estep")
emloop = kernel_module("emloop")

# Below this much work per iteration (rows x K x (D+1)^2) the in-memory
# source runs the whole EM loop in compiled code, on one thread: per-call
# overhead would otherwise dominate. Measured per iteration, compiled loop
# against the Python loop on two threads: 0.20 against 0.27 ms at 2M work,
# 0.37 against 0.39 ms at 4M, 0.72 against 0.54 ms at 8M.
COMPILED_LOOP_WORK = 4_000_000
# Where the loop has one thread anyway (a search runs its starts side by
# side, one per thread), the compiled loop is faster at any size; up to this
# multiple of the bound above (a few ms per iteration, which keeps Ctrl-C
# answered within a fraction of a second). Side by side, a search's starts
# take 0.37 ms per iteration each at 8.6M work against 0.60 ms one after the
# other on two threads, and 2.0 against 2.4 ms at 64M.
ONE_THREAD_LOOP_FACTOR = 16
# The compiled loop is a second tier. It gives the Python-driven loop's bits
# (the same kernels in the same order), about 3x faster on a few hundred rows
# (13 against 39 us per iteration), but compiling it costs 1-3 s the first
# time (a fraction of a second from Numba's cache). A process therefore runs
# the small-data iterations of each engine and dtype through the Python loop
# until it has run this many, then compiles (or loads) the loop once and
# keeps it: a single small fit never waits for a compilation, a selection
# grid switches within its first cells.
COMPILED_LOOP_AFTER = 1000
_python_iterations: collections.Counter = collections.Counter()
_NOT_WHITENED = (np.empty(0), np.empty((0, 0, 0)))
_compiled_variants: set = set()


class InMemorySource:
    """An in-memory array (validated, C-contiguous float32/float64) and its weights.

    Parameters
    ----------
    X : ndarray (N, D)
    sample_weight : ndarray (N,) or None
    covariance_type : {'full', 'tied', 'diag', 'spherical'}
        The model family the parameters belong to.
    """

    def __init__(self, X, sample_weight, covariance_type: str):
        self.X = X
        self.sample_weight = sample_weight
        self.covariance_type = covariance_type
        self.n_samples, self.n_features = X.shape
        self.weight = float(self.n_samples if sample_weight is None else sample_weight.sum())
        self._whitening = None
        # Room for the whitened rows, one per thread: a search runs the
        # starts of a cell side by side on one source.
        self._whitened_rows = threading.local()

    def statistics(self, params: GaussianParameters) -> GaussianStatistics:
        """One fused pass: E-step under ``params`` and its statistics (for a
        tied model of several components, through the whitened rows, with the
        scatter pooled: :func:`~fastem.stats.whitened_statistics`)."""
        n_components = params.means.shape[0]
        if self.compiled_loop_applies(n_components):
            _python_iterations[self._variant(n_components)] += 1
        if self._whitens(n_components):
            rows = getattr(self._whitened_rows, "rows", None)
            if rows is None:
                rows = self._whitened_rows.rows = np.empty_like(self.X)
            return whitened_statistics(self.X, self.sample_weight, params, self.whitening(),
                                       rows)
        return e_step_statistics(self.X, self.sample_weight, params, self.covariance_type)

    def _whitens(self, n_components: int) -> bool:
        # One component gains nothing: the transform costs what its E-step
        # does. Nor do narrow data, whose loop engines are bound by the pass's
        # per-row work more than by the products (1M x 10, K=5: 23.0 ms per
        # iteration whitened against 21.4); wide ones do (200k x 50, K=5:
        # 37.9 against 57.2 ms).
        return (self.covariance_type == "tied" and n_components > 1
                and self.n_features >= BLAS_MIN_FEATURES)

    def whitening(self):
        """The centre and total scatter of this data (computed once)."""
        if self._whitening is None:
            self._whitening = whitening_of(self.X, self.sample_weight)
        return self._whitening

    def _variant(self, n_components: int) -> tuple[int, str, bool]:
        """The compiled loop's variant for this data: its engine, the data's
        dtype and whether it runs on whitened rows."""
        if self._whitens(n_components):
            return engine_for(self.n_features, "diag"), self.X.dtype.name, True
        return engine_for(self.n_features, self.covariance_type), self.X.dtype.name, False

    def compiled_loop_ready(self, n_components: int) -> bool:
        """Whether this process has compiled the loop for this data's engine and
        dtype, or has run enough small-data iterations for it to pay."""
        variant = self._variant(n_components)
        if variant in _compiled_variants:
            return True
        if _python_iterations[variant] >= COMPILED_LOOP_AFTER:
            _compiled_variants.add(variant)
            return True
        return False

    def compiled_loop_applies(self, n_components: int, threads: int | None = None) -> bool:
        """Whether per-iteration work is small enough for the compiled loop, on
        ``threads`` threads (default: those this call may use)."""
        work = self.n_samples * n_components * (self.n_features + 1) ** 2
        threads = _threads.n_threads() if threads is None else threads
        bound = COMPILED_LOOP_WORK * (ONE_THREAD_LOOP_FACTOR if threads < 2 else 1)
        return work <= bound

    def compiled_em(self, params: GaussianParameters, m_step, lower_bound: float, tol: float,
                    max_iter: int):
        """The whole EM loop in compiled code, on small data and a known M-step.

        The same pass kernel, engine, operand precision, chunks and M-step as
        ``statistics`` followed by ``m_step``, so the same bits as the Python
        driver (tested). Returns ``(params, lower_bounds, converged,
        handed_over)``, or None when it does not apply (large data, an M-step
        without a compiled form, or a loop not worth compiling yet: see
        ``COMPILED_LOOP_AFTER``).
        """
        compiled_form = getattr(m_step, "compiled_form", None)
        n_components = params.means.shape[0]
        if (compiled_form is None or not self.compiled_loop_applies(n_components)
                or not self.compiled_loop_ready(n_components)):
            return None
        kind, reg_covar = compiled_form
        covariance_type = self.covariance_type
        X = self.X
        engine, _, whitens = self._variant(n_components)
        if whitens:
            loop = emloop.em_loop_whitened[engine]
            centre, total_scatter = self.whitening()
        else:
            loop = emloop.em_loop[engine]
            centre, total_scatter = _NOT_WHITENED
        covariances = (np.zeros_like(params.precisions_cholesky) if params.covariances is None
                       else params.covariances)
        trmm, syrk = blas_routines()
        blas = engine in (estep.ENGINE_BLAS_FULL, estep.ENGINE_BLAS_DIAG)
        with single_threaded_blas() if blas else contextlib.nullcontext():
            outcome = loop(
                X, weights_operand(self.sample_weight), self.weight,
                np.empty(0, dtype=operand_dtype(engine, X.dtype)),
                np.asarray(params.weights, dtype=np.float64),
                np.ascontiguousarray(params.means, dtype=np.float64),
                to_canonical(covariances, covariance_type),
                to_canonical(params.precisions_cholesky, covariance_type),
                kind, reg_covar, float(tol), int(max_iter), float(lower_bound),
                # the driver's collapse test (fastem.em), which hands over
                COLLAPSE_FRACTION * self.weight / max(self.n_samples, 1),
                statistics_chunks(self.n_samples, n_components, self.n_features,
                                  "diag" if whitens else covariance_type),
                trmm, syrk, centre, total_scatter)
        weights, means, cov, prec_chol, lower_bounds, converged, handed_over = outcome
        params = GaussianParameters(weights, means, from_canonical(cov, covariance_type),
                                    from_canonical(prec_chol, covariance_type))
        return params, lower_bounds.tolist(), bool(converged), bool(handed_over)



class BlockSource:
    """Row blocks streamed through the statistics kernel, once per pass (out-of-core EM).

    The statistics of the blocks add (:class:`~fastem.stats.GaussianStatistics`),
    so a pass over the blocks gives the statistics of the whole data set, as
    :class:`InMemorySource` does in one call: EM from the same parameters
    reaches the same fit, up to the order of the additions.

    Parameters
    ----------
    blocks : fastem.blocks.RowBlocks
        Surveyed row blocks (memory-mapped or streamed).
    covariance_type : {'full', 'tied', 'diag', 'spherical'}
    scale : float
        A power of two every block is multiplied by (see :mod:`fastem.scaling`).
    """

    def __init__(self, blocks, covariance_type: str, scale: float = 1.0):
        self.blocks = blocks
        self.covariance_type = covariance_type
        self.scale = scale
        self.n_samples, self.n_features = blocks.n_samples, blocks.n_features

    def statistics(self, params: GaussianParameters) -> GaussianStatistics:
        """The sum of every block's statistics under ``params`` (one pass)."""
        total = None
        for X, sample_weight in self.blocks:
            if X.shape[0] == 0:
                continue
            if self.scale != 1.0:
                X = X * X.dtype.type(self.scale)
            part = e_step_statistics(X, sample_weight, params, self.covariance_type)
            total = part if total is None else total + part
        return total
