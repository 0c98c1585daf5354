"""Whole EM loops in compiled code, for data small enough that per-call overhead
dominates (a few hundred rows cost microseconds per iteration, not the tenths
of a millisecond a Python-driven iteration costs).

The loop is an optimisation of the in-memory statistics source, not another
EM: each iteration calls the same pass kernel over the same chunks, reduced in
the same order, with the same engine and operand precision as the Python
driver's, and the same M-step kernel, so both give the same bits (no kernel
reassociates, see :mod:`fastem._kernels._blocks`). Calling the kernels
rather than inlining them also means the loop itself compiles in a fraction
of a second once a fit has compiled its pass. It stops *before*
applying an M-step that needed repair (a collapsed component or a covariance
that was not positive definite) and hands over to the driver, which owns those
policies and their warnings.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ._blocks import helper, specialise
from .estep import (
    ENGINE_BLAS_DIAG,
    ENGINE_BLAS_FULL,
    ENGINE_LOOPS_FULL,
    MODE_STATISTICS,
    finish_statistics,
    gaussian_operands,
    gaussian_pass,
)
from .mstep import m_step_diag, m_step_full
from .whiten import pooled_tied_statistics, whiten_rows, whitened_operands


@helper
def _as_dtype_of(values, like):
    """``values`` copied into an array of ``like``'s dtype."""
    out = np.empty(values.shape, dtype=like.dtype)
    flat_out = out.reshape(-1)
    flat_in = values.reshape(-1)
    for i in range(flat_in.shape[0]):
        flat_out[i] = flat_in[i]
    return out


# Placeholders the per-engine copies rebind (see em_loop below).
_engine_pass = _engine_m_step = None
_ENGINE = ENGINE_LOOPS_FULL
_WHITENED = False


def _em_loop(X, sample_weight, total_weight, operand_like, weights, means, covariances,
             prec_chol, kind, reg_covar, tol, max_iter, lower_bound, collapse_below, n_chunks,
             trmm, syrk, centre, total_scatter):
    r"""Run up to ``max_iter`` EM iterations (E-step statistics, M-step, test).

    ``em_loop[engine]`` runs the pass of that engine; it and ``operand_like``
    (an empty array of the operands' dtype) are the driver's choices for this
    data (``fastem.stats.engine_for`` and ``operand_dtype``). The parameters
    are float64 in the canonical 3-D shapes of the M-step kernels;
    ``total_weight`` is the driver's :math:`\sum_n w_n` (the objective's
    denominator, summed by NumPy there).

    ``em_loop_whitened[engine]`` runs a tied model on whitened rows, as
    :func:`fastem.stats.whitened_statistics` does: ``engine`` is then a
    diagonal one and ``centre`` and ``total_scatter`` are the source's
    :class:`~fastem.stats.Whitening` (unused, and empty, otherwise).

    Returns
    -------
    weights, means, covariances, prec_chol : the parameters after the last
        applied M-step
    lower_bounds : ndarray (n_iter,)
    converged : bool
    handed_over : bool
        True when iteration ``n_iter + 1`` needed a repair, or met rows too far
        from every component for the pass (see ``far_rows``), and was not
        applied.
    """
    n_samples, n_features = X.shape
    n_components = means.shape[0]
    full = kind <= 1 and not _WHITENED
    width = n_features if full else 1
    nk_parts = np.empty((n_chunks, n_components))
    sx_parts = np.empty((n_chunks, n_components, n_features))
    sxx_parts = np.empty((n_chunks, n_components, n_features, width))
    ll_parts = np.empty(n_chunks)
    worst = np.empty(n_chunks)
    worst_index = np.empty(n_chunks, dtype=np.int64)
    labels = np.empty(0, dtype=np.int32)
    out = np.empty((0, 0))
    log_norm = np.empty(0)
    far_count = np.zeros(n_chunks, dtype=np.int64)
    far_flags = np.zeros(n_samples, dtype=np.bool_)
    # Small data: no pruning (its bounds need eigenvalues, from NumPy).
    no_bounds = np.empty((0, 2))
    pruned = np.zeros(n_chunks, dtype=np.int64)
    lower_bounds = np.empty(max_iter)
    # Arguments of the kernels this loop calls, as plain int64 values: a
    # literal (0, MODE_STATISTICS) would give the kernel a second, literal-typed
    # compilation instead of the one the Python driver already made.
    first_chunk = np.int64(0)
    mode = np.int64(MODE_STATISTICS)
    engine = np.int64(_ENGINE)
    n_iter = 0
    converged = False
    handed_over = False
    unit = np.ones((n_components, n_features, 1), dtype=operand_like.dtype)
    # The whitened rows: this call's own (starts run side by side on one source).
    whitened = np.empty((n_samples if _WHITENED else 0, n_features), dtype=X.dtype)
    while n_iter < max_iter:
        if _WHITENED:
            whiten_rows(first_chunk, n_chunks, n_chunks, X, centre, prec_chol[0], whitened)
            shift64, log_const = whitened_operands(weights, means, prec_chol, centre)
            shift = _as_dtype_of(shift64, operand_like)
            prec = unit
            data = whitened
        else:
            prec64, log_const = gaussian_operands(weights, prec_chol, kind, n_features)
            shift = _as_dtype_of(means, operand_like)
            prec = _as_dtype_of(prec64, operand_like)
            data = X
        nk_parts[:] = 0.0
        sx_parts[:] = 0.0
        sxx_parts[:] = 0.0
        worst[:] = np.inf
        _engine_pass(first_chunk, n_chunks, n_chunks, mode, data, sample_weight, labels, shift,
                     prec, log_const, no_bounds, trmm, syrk, nk_parts, sx_parts, sxx_parts,
                     ll_parts, worst, worst_index, out, log_norm, far_count, far_flags, pruned)
        far = 0
        for c in range(n_chunks):
            far += far_count[c]
        if far > 0:
            # Rows too far from every component are the driver's to compute.
            handed_over = True
            break
        if _WHITENED:
            shift64 = _as_dtype_of(shift, log_const)
            nk, sy, _, loglik, _, _ = finish_statistics(engine, shift64, nk_parts, sx_parts,
                                                        sxx_parts, ll_parts, worst, worst_index)
            sx, centres, pooled = pooled_tied_statistics(nk, sy, shift64, prec_chol[0], centre,
                                                         total_scatter)
            new = m_step_full(nk, sx, pooled, centres, reg_covar, True)
        else:
            nk, sx, sxx, loglik, _, _ = finish_statistics(engine, means, nk_parts, sx_parts,
                                                          sxx_parts, ll_parts, worst,
                                                          worst_index)
            # tied (kind 1) pools the full scatter; spherical (kind 3) averages the diagonal.
            new = _engine_m_step(nk, sx, sxx, _as_dtype_of(shift, log_const), reg_covar,
                                 kind == 1 or kind == 3)
        repair = False
        for k in range(n_components):
            repair |= nk[k] < collapse_below
        for c in range(new[4].shape[0]):
            repair |= new[4][c] != 0.0
        if repair:
            handed_over = True
            break
        previous = lower_bound
        lower_bound = loglik / total_weight
        weights, means, covariances, prec_chol = new[0], new[1], new[2], new[3]
        lower_bounds[n_iter] = lower_bound
        n_iter += 1
        if abs(lower_bound - previous) < tol:
            converged = True
            break
    return (weights, means, covariances, prec_chol, lower_bounds[:n_iter], converged,
            handed_over)


def _loop_for(engine, whitened=False):
    full = engine in (ENGINE_LOOPS_FULL, ENGINE_BLAS_FULL)
    name = f"_em_loop_{engine}" + ("_whitened" if whitened else "")
    return njit(cache=True, error_model="numpy", nogil=True)(specialise(
        _em_loop, name, _ENGINE=engine, _engine_pass=gaussian_pass[engine],
        _engine_m_step=m_step_full if full else m_step_diag, _WHITENED=whitened))


# One compiled loop per engine. nogil: model selection runs the loops of
# several starts at once from Python threads (each loop is serial and touches
# only its own arrays).
em_loop = {engine: _loop_for(engine) for engine in gaussian_pass}
# Tied models of several components on wide data, on whitened rows: the
# diagonal BLAS engine (see fastem.sources.InMemorySource).
em_loop_whitened = {ENGINE_BLAS_DIAG: _loop_for(ENGINE_BLAS_DIAG, whitened=True)}
