r"""Hidden Markov models with Gaussian emissions, fitted by Baum–Welch on the one EM driver.

An HMM's E-step is a statistics source like any other (:mod:`fastem.sources`):
:class:`SequenceSource` turns the current parameters into additive
statistics (:class:`HMMStatistics`), and :class:`BaumWelch` turns the
statistics into parameters; :func:`fastem.em.fit_em` iterates.

One E-step under :math:`\theta = (\pi, A, \mu, \Sigma)`:

1. the mixture's fused pass (:func:`emission_probabilities`) gives the
   emission probabilities shifted per row,
   :math:`b_t(k) = e^{L_t(k) - \ell_t}` with
   :math:`L_t(k) = \log\mathcal N(x_t\mid\mu_k,\Sigma_k)` and
   :math:`\ell_t = \log\sum_j e^{L_t(j)}` (the responsibilities under unit
   weights and their log-normaliser: the exponentials of the pass, K per row),
   one group of sequences at a time, just before the group's forward–backward
   and into a buffer of the thread's: no (T, K) array is formed, and the
   recursions read emissions still in cache;
2. one forward–backward kernel (:func:`fastem._kernels.hmm.forward_backward`)
   runs the scaled recursions (:math:`K^2` multiply-adds per step and sweep,
   no exponential or logarithm) and gives per sequence
   :math:`\log p(x^{(s)})`, the expected start counts
   :math:`\sum_s\gamma^{(s)}_0` and transition counts
   :math:`\sum_s\sum_t\xi_t(i, j)`, and the emission statistics of a mixture
   (:class:`~fastem.stats.GaussianStatistics`) with the posteriors
   :math:`\gamma_t(k) = p(z_t = k\mid x)` as responsibilities, around the
   current means, added as each :math:`\gamma_t` becomes known (fitting
   never stores :math:`\gamma`). It runs on the threads of
   :mod:`fastem._threads`: sequences in contiguous groups fixed by the
   data's shape, each group's sums in its own slot, reduced in group order
   (the same bits for any thread count);
3. with ``implementation='log'``, a sequence whose scaled recursion leaves
   the floating-point range is recomputed in log space from the
   log-densities :math:`L_t(k)` (hmmlearn's robustness, at hmmlearn's
   cost, for that sequence only).

The estimator :class:`GaussianHMM` follows ``hmmlearn.hmm.GaussianHMM``
(0.3.3): its parameters, priors, ``params``/``init_params`` letters,
monitor, methods and attribute shapes.
"""

from __future__ import annotations

import math
import sys
from collections import deque
from dataclasses import dataclass
from numbers import Integral, Real
from typing import NamedTuple

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_array, check_is_fitted

from . import _threads, em
from . import io as model_files
from ._kernels import kernel_module
from ._kernels.chunks import n_chunks_for
from .covariance import (
    COVARIANCE_TYPES,
    covariance_shape,
    precision_cholesky_of_covariance,
    uses_full_scatter,
)
from .initialization import kmeans_plusplus, lloyd
from .stats import (
    _NO_LABELS,
    GaussianParameters,
    GaussianStatistics,
    _run_pass,
    engine_for,
    kernel_operands,
    log_responsibilities,
    operand_dtype,
)

estep = kernel_module("estep")
kernels = kernel_module("hmm")
mstep = kernel_module("mstep")

__all__ = ["BaumWelch", "GaussianHMM", "HMMConvergenceMonitor", "HMMParameters",
           "HMMStatistics", "SequenceSource", "StateSelection", "emission_log_densities",
           "emission_probabilities", "select_n_states"]

PARAM_LETTERS = "stmc"
DECODER_ALGORITHMS = ("viterbi", "map")
IMPLEMENTATIONS = ("log", "scaling")
# Sequences are grouped into at most this many groups of about this many rows
# (the groups fix the order of the transition counts' sums).
MAX_GROUPS = 64
GROUP_ROWS = 256
# The diagonal of the default transition matrix ('t' in init_params): sticky states.
STICKY_DIAGONAL = 0.9
# hmmlearn's floor on the denominator of diagonal and spherical variances.
_VARIANCE_DENOMINATOR_FLOOR = 1e-5


# ------------------------------------------------------------------ parameters
class HMMParameters(NamedTuple):
    r"""Parameters of a Gaussian HMM.

    Attributes
    ----------
    startprob : ndarray (K,)
        :math:`\pi_k = p(z_0 = k)`.
    transmat : ndarray (K, K)
        :math:`A_{ij} = p(z_{t+1} = j\mid z_t = i)`.
    means : ndarray (K, D)
    covars : ndarray
        In the compact shape of the covariance type: (K, D, D) 'full',
        (D, D) 'tied', (K, D) 'diag', (K,) 'spherical'.
    precisions_cholesky : ndarray
        Upper factors :math:`U` of :math:`\Sigma^{-1} = UU^T` in the same
        shape (:math:`1/\sigma` for 'diag' and 'spherical'), as the
        mixture's kernels take them.
    """

    startprob: np.ndarray
    transmat: np.ndarray
    means: np.ndarray
    covars: np.ndarray
    precisions_cholesky: np.ndarray


def precision_cholesky_of(covars, covariance_type: str) -> np.ndarray:
    r"""Upper factors :math:`U` with :math:`\Sigma^{-1} = UU^T`, in the shape of ``covars``."""
    covars = np.asarray(covars, dtype=np.float64)
    if covariance_type in ("diag", "spherical"):
        return 1.0 / np.sqrt(covars)
    if covariance_type == "tied":
        return precision_cholesky_of_covariance(covars, "tied")
    return np.stack([precision_cholesky_of_covariance(c, "full") for c in covars])


def hmm_parameters(startprob, transmat, means, covars, covariance_type: str) -> HMMParameters:
    """:class:`HMMParameters` from the four arrays (float64, precision factors computed)."""
    covars = np.array(covars, dtype=np.float64)
    return HMMParameters(np.array(startprob, dtype=np.float64),
                         np.array(transmat, dtype=np.float64),
                         np.array(means, dtype=np.float64), covars,
                         precision_cholesky_of(covars, covariance_type))


def full_covariances(covars, covariance_type: str, n_components: int, n_features: int):
    """Compact covariances as (K, D, D) matrices (hmmlearn's ``covars_`` property)."""
    covars = np.asarray(covars, dtype=np.float64)
    if covariance_type == "full":
        return covars.copy()
    if covariance_type == "diag":
        return np.stack([np.diag(c) for c in covars])
    if covariance_type == "tied":
        return np.tile(covars, (n_components, 1, 1))
    return np.ravel(covars)[:, None, None] * np.eye(n_features)[None]


def _log(values):
    """Natural log with log 0 = -inf and no warning."""
    with np.errstate(divide="ignore"):
        return np.log(np.asarray(values, dtype=np.float64))


# ------------------------------------------------------------------ E-step pieces
def emission_log_densities(X, params: HMMParameters, covariance_type: str) -> np.ndarray:
    r"""(T, K) emission log-densities :math:`L_t(k) = \log\mathcal N(x_t\mid\mu_k,\Sigma_k)`.

    The mixture's fused pass (:func:`fastem.stats.log_responsibilities`)
    under *unit* weights: its log-constant is then
    :math:`\log 1 + \log\det U_k - \tfrac D2\log 2\pi` exactly (weights
    :math:`1/K` would add :math:`-\log K`, which cannot be removed exactly),
    and

    .. math::

        \log r_{tk} + \log\textstyle\sum_j e^{\ell_{tj}} = \ell_{tk} = L_t(k)

    up to the rounding of that sum (an ulp of :math:`\max_j\ell_{tj}`).
    """
    n_states = params.means.shape[0]
    mixture = GaussianParameters(np.ones(n_states), params.means, params.covars,
                                 params.precisions_cholesky)
    log_resp, log_norm = log_responsibilities(X, mixture, covariance_type)
    log_resp += log_norm[:, None]
    return log_resp


def emission_probabilities(X, params: HMMParameters, covariance_type: str, out=None):
    r"""Emission probabilities shifted per row: (T, K) :math:`b_t(k)` and (T,) :math:`\ell_t`.

    .. math::

        b_t(k) = e^{L_t(k) - \ell_t},\qquad \ell_t = \log\sum_j e^{L_t(j)},

    the responsibilities and log-normaliser of the mixture's fused pass
    (as :func:`fastem.stats.log_responsibilities` computes them) under unit
    weights. The scaled recursions are invariant to a per-row factor of the
    emissions; :math:`\sum_t\ell_t` restores it in :math:`\log p(x)`. Terms
    below :math:`e^{-708}` of a row's largest are 0 (as the pass makes them);
    a row beyond float64's range of every state has :math:`\ell_t = -\infty`.

    ``out``: a pair of arrays (T, K) and (T,) to write into, reused from one
    E-step to the next (fresh pages of a large array cost about a tenth of
    the pass).
    """
    n_states = params.means.shape[0]
    mixture = GaussianParameters(np.ones(n_states), params.means, params.covars,
                                 params.precisions_cholesky)
    engine = engine_for(X.shape[1], covariance_type)
    means, prec, log_const, _ = kernel_operands(mixture, covariance_type,
                                                operand_dtype(engine, X.dtype))
    if out is None:
        out = (np.empty((X.shape[0], n_states)), np.empty(X.shape[0]))
    probabilities, log_norm = out
    # The pass of fastem.stats.log_responsibilities, into the given arrays.
    _run_pass(engine, estep.MODE_PROBA, X, None, _NO_LABELS, means, prec, log_const,
              n_chunks_for(X.shape[0], 1), probabilities, log_norm)
    return probabilities, log_norm


def shifted_probabilities(log_emission):
    r""":math:`b_t(k) = e^{L_t(k) - \ell_t}` with :math:`\ell_t = \max_j L_t(j)`, from
    given log-densities (a row of -inf: :math:`b_t = 0`, :math:`\ell_t = -\infty`)."""
    log_emission = np.asarray(log_emission, dtype=np.float64)
    offsets = log_emission.max(axis=1)
    finite = np.where(np.isfinite(offsets), offsets, 0.0)
    with np.errstate(under="ignore", invalid="ignore"):
        b = np.exp(log_emission - finite[:, None])
    b[~np.isfinite(offsets)] = 0.0
    return np.ascontiguousarray(b), offsets


def sequence_bounds(lengths) -> np.ndarray:
    """Row offsets of the sequences: ``[0, l_0, l_0 + l_1, ...]`` (int64)."""
    return np.concatenate([[0], np.cumsum(np.asarray(lengths, dtype=np.int64))]).astype(np.int64)


def sequence_groups(lengths) -> np.ndarray:
    """First sequence of each group, and the number of sequences (int64, (G + 1,)).

    Contiguous groups of about equal row counts: at most ``MAX_GROUPS``, of
    about ``GROUP_ROWS`` rows or more, never more than the sequences. A
    function of the lengths alone (never of the thread count), so the
    transition counts are summed in the same order on any machine.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    n_sequences = lengths.shape[0]
    n_rows = int(lengths.sum())
    n_groups = int(max(1, min(n_sequences, MAX_GROUPS, n_rows // GROUP_ROWS)))
    starts = sequence_bounds(lengths)[:-1]
    targets = (np.arange(n_groups, dtype=np.int64) * n_rows) // n_groups
    firsts = np.searchsorted(starts, targets, side="left")
    return np.unique(np.concatenate([firsts, [0, n_sequences]])).astype(np.int64)


def forward_backward_work(n_rows: int, n_states: int, n_features: int = 1,
                          width: int = 1) -> int:
    """Work of one scaled forward–backward pass in :mod:`fastem._threads` units
    (about 0.1 ns): per row three :math:`K^2` products (forward, backward,
    transitions) and the emission statistics, K(D + DW) multiply-adds."""
    n_states, n_features, width = int(n_states), int(n_features), int(width)
    return int(n_rows) * n_states * (8 * n_states + 6 * n_features * (1 + width) + 20)


def log_forward_backward_work(n_rows: int, n_states: int) -> int:
    """Work of one log-space forward–backward pass (the fallback): per row and
    state some exponentials and logarithms and K multiply-adds, forward and backward."""
    return int(n_rows) * int(n_states) * (10 * int(n_states) + 200)


@dataclass(frozen=True)
class HMMStatistics:
    r"""Expected sufficient statistics of a Gaussian HMM under fixed parameters.

    They add over disjoint sets of sequences (``a + b``).

    Attributes
    ----------
    start : ndarray (K,)
        :math:`\sum_s \gamma^{(s)}_0(k)`, the expected start counts.
    trans : ndarray (K, K)
        :math:`\sum_s\sum_t \xi^{(s)}_t(i, j)`, the expected transition counts.
    emissions : GaussianStatistics
        The mixture's statistics with :math:`\gamma_t(k)` as responsibilities:
        :math:`N_k = \sum_t\gamma_t(k)`, moments around ``emissions.shift``.
    loglik : float
        :math:`\sum_s \log p(x^{(s)})`.
    n_sequences : int
    params : HMMParameters or None
        The parameters the statistics were taken under (the M-step keeps
        those it does not update).
    """

    start: np.ndarray
    trans: np.ndarray
    emissions: GaussianStatistics
    loglik: float
    n_sequences: int
    params: HMMParameters | None = None

    # What the EM driver reads (fastem.em._m_step_with_repairs).
    @property
    def nk(self) -> np.ndarray:
        """Posterior mass :math:`N_k` of every state."""
        return self.emissions.nk

    @property
    def weight(self) -> float:
        """Number of rows (every row has unit weight)."""
        return self.emissions.weight

    @property
    def count(self) -> float:
        return self.emissions.count

    @property
    def sx(self) -> np.ndarray:
        return self.emissions.sx

    @property
    def sxx(self) -> np.ndarray:
        return self.emissions.sxx

    @property
    def worst_point(self):
        return self.emissions.worst_point

    def __add__(self, other: HMMStatistics) -> HMMStatistics:
        if not isinstance(other, HMMStatistics):
            return NotImplemented
        return HMMStatistics(self.start + other.start, self.trans + other.trans,
                             self.emissions + other.emissions, self.loglik + other.loglik,
                             self.n_sequences + other.n_sequences, self.params)


class _GroupEmissions:
    """Emission probabilities computed group by group, each just before the
    group's forward–backward (``forward_backward`` is a range task for
    :func:`fastem._threads.run_chunks`).

    A group's rows get the values :func:`emission_probabilities` gives all
    rows (the pass is row by row), in a buffer of the task's reused from
    group to group.
    """

    def __init__(self, X, seq_bounds, group_bounds, params: HMMParameters,
                 covariance_type: str):
        self.X = X
        self.seq_bounds = seq_bounds
        self.group_bounds = group_bounds
        n_states = params.means.shape[0]
        mixture = GaussianParameters(np.ones(n_states), params.means, params.covars,
                                     params.precisions_cholesky)
        self.engine = engine_for(X.shape[1], covariance_type)
        self.operands = kernel_operands(mixture, covariance_type,
                                        operand_dtype(self.engine, X.dtype))[:3]
        self.rows = seq_bounds[group_bounds]  # first row of each group, then T

    def forward_backward(self, group_first: int, group_last: int, *arguments) -> None:
        """:func:`fastem._kernels.hmm.forward_backward` over groups
        ``[group_first, group_last)``, each after its emissions."""
        widest = int(np.max(np.diff(self.rows[group_first:group_last + 1])))
        n_states = self.operands[0].shape[0]
        buffer, offsets = np.empty((widest, n_states)), np.empty(widest)
        for g in range(group_first, group_last):
            first, last = int(self.rows[g]), int(self.rows[g + 1])
            n = last - first
            # The mixture's pass (as emission_probabilities runs it), in this
            # thread: the task is one thread's share already.
            with _threads.limit(1):
                _run_pass(self.engine, estep.MODE_PROBA, self.X[first:last], None, _NO_LABELS,
                          *self.operands, n_chunks_for(n, 1), buffer[:n], offsets[:n])
            kernels.forward_backward(g, g + 1, self.group_bounds, self.seq_bounds, buffer,
                                     offsets, first, *arguments)


class SequenceSource:
    r"""Sequences stored back to back as the rows of ``X``: the HMM's statistics source.

    Parameters
    ----------
    X : ndarray (T, D), C-contiguous float64, finite
    lengths : array of int or None
        Lengths of the sequences (None: one sequence of all rows).
    covariance_type : {'full', 'tied', 'diag', 'spherical'}
    implementation : {'log', 'scaling'}
        Both run the scaled recursions (see :mod:`fastem._kernels.hmm`);
        'log' recomputes in log space the sequences where they leave the
        floating-point range, 'scaling' treats a normaliser of 0 as
        probability zero (hmmlearn's 'scaling').
    """

    def __init__(self, X, lengths, covariance_type: str, implementation: str = "log"):
        self.X = X
        self.lengths = np.asarray([X.shape[0]] if lengths is None else lengths, dtype=np.int64)
        self.covariance_type = covariance_type
        self.implementation = implementation
        self.seq_bounds = sequence_bounds(self.lengths)
        self.group_bounds = sequence_groups(self.lengths)
        self.n_samples, self.n_features = X.shape

    @property
    def n_sequences(self) -> int:
        return int(self.lengths.shape[0])

    def forward_backward(self, params: HMMParameters, posteriors: bool = True,
                         log_emission=None):
        r"""Forward(–backward) under ``params``.

        ``log_emission`` (T, K) replaces the emission log-densities of
        ``params`` (the kernels' tests use it).

        Returns
        -------
        loglik : ndarray (S,)
            :math:`\log p(x^{(s)})` per sequence.
        gamma : ndarray (T, K) or None
            Posteriors (with ``posteriors``).
        trans : ndarray (K, K)
            Expected transition counts, summed in group order.
        start : ndarray (K,)
            Expected start counts, summed in group order.
        """
        mode = kernels.POSTERIORS if posteriors else kernels.FORWARD
        out = self._run(params, mode, log_emission)
        return out["loglik"], out["gamma"], out["trans"], out["start"]

    def _run(self, params: HMMParameters, mode: int, log_emission=None) -> dict:
        """One kernel pass in ``mode`` (scaled, then log space where needed): its sums."""
        n_states = params.means.shape[0]
        work = forward_backward_work(self.n_samples, n_states, self.n_features,
                                     self.n_features if uses_full_scatter(self.covariance_type)
                                     else 1)
        if log_emission is None:
            # Each group's emissions just before its forward-backward, into a
            # buffer of the call's: no (T, K) array, and the group's emissions
            # are still in cache when the recursions read them.
            emission = _GroupEmissions(self.X, self.seq_bounds, self.group_bounds, params,
                                       self.covariance_type)
            work += self.n_samples * n_states * (self.n_features + 20)
        else:
            emission = shifted_probabilities(log_emission)
        out = self._kernel(kernels.SCALED, mode, self.X, self.seq_bounds, self.group_bounds,
                           emission, params, n_states, work)
        redo = np.flatnonzero(out["status"] == kernels.REDO)
        if redo.size:
            self._redo_in_log_space(params, mode, redo, log_emission, out)
        return out

    def _kernel(self, method, mode, X, seq_bounds, group_bounds, emission, params, n_states,
                work) -> dict:
        """Run the forward–backward kernel over all groups; the group slots reduced in order.

        ``emission`` is the pair (emissions, offsets) of all rows (offsets
        empty for ``LOG``), or a :class:`_GroupEmissions` that computes each
        group's before its forward-backward.
        """
        n_groups = group_bounds.shape[0] - 1
        n_sequences = seq_bounds.shape[0] - 1
        stats = mode == kernels.STATISTICS
        width = self.n_features if uses_full_scatter(self.covariance_type) else 1
        slots = n_groups if stats else 0
        loglik = np.empty(n_sequences)
        status = np.zeros(n_sequences, dtype=np.int64)
        gamma = np.empty((X.shape[0] if mode == kernels.POSTERIORS else 0, n_states))
        xi_parts = np.zeros((n_groups, n_states, n_states))
        start_parts = np.zeros((n_groups, n_states))
        nk_parts = np.zeros((slots, n_states))
        sx_parts = np.zeros((slots, n_states, self.n_features))
        sxx_parts = np.zeros((slots, n_states, self.n_features, width))
        arguments = (_log(params.startprob), np.ascontiguousarray(_log(params.transmat)),
                     method, mode, self.implementation == "log", X,
                     np.ascontiguousarray(params.means, dtype=np.float64), loglik, status, gamma,
                     xi_parts, start_parts, nk_parts, sx_parts, sxx_parts)
        if isinstance(emission, _GroupEmissions):
            _threads.run_chunks(emission.forward_backward, n_groups, work, *arguments)
        else:
            _threads.run_chunks(kernels.forward_backward, n_groups, work, group_bounds,
                                seq_bounds, *emission, 0, *arguments)
        # Reduced in group order: the same sums for any thread count.
        out = dict(loglik=loglik, status=status,
                   gamma=gamma if mode == kernels.POSTERIORS else None)
        for name, parts in (("trans", xi_parts), ("start", start_parts), ("nk", nk_parts),
                            ("sx", sx_parts), ("sxx", sxx_parts)):
            total = np.zeros(parts.shape[1:])
            for g in range(parts.shape[0]):
                total += parts[g]
            out[name] = total
        return out

    def _redo_in_log_space(self, params, mode, sequences, log_emission, out) -> None:
        """Sequences ``sequences`` (their scaled recursion left the range) in log
        space, from their log-densities; their sums added to ``out`` in
        sequence order (a function of the data alone: the same bits for any
        thread count)."""
        rows = np.concatenate([np.arange(self.seq_bounds[s], self.seq_bounds[s + 1])
                               for s in sequences])
        X = np.ascontiguousarray(self.X[rows])
        if log_emission is None:
            L = emission_log_densities(X, params, self.covariance_type)
        else:
            L = np.ascontiguousarray(np.asarray(log_emission, dtype=np.float64)[rows])
        lengths = self.lengths[sequences]
        # One group per sequence: each sequence's sums apart, added in order.
        redone = self._kernel(kernels.LOG, mode, X, sequence_bounds(lengths),
                              np.arange(lengths.shape[0] + 1, dtype=np.int64), (L, np.empty(0)),
                              params, L.shape[1],
                              log_forward_backward_work(X.shape[0], L.shape[1]))
        out["loglik"][sequences] = redone["loglik"]
        out["status"][sequences] = kernels.DONE
        if out["gamma"] is not None:
            out["gamma"][rows] = redone["gamma"]
        for name in ("trans", "start", "nk", "sx", "sxx"):
            out[name] = out[name] + redone[name]

    def viterbi(self, params: HMMParameters):
        """Most probable state paths: per-sequence log-probabilities (S,) and states (T,)."""
        log_emission = emission_log_densities(self.X, params, self.covariance_type)
        n_groups = self.group_bounds.shape[0] - 1
        path = np.empty(self.n_samples, dtype=np.int64)
        best = np.empty(self.n_sequences)
        _threads.run_chunks(
            kernels.viterbi, n_groups, self.n_samples * log_emission.shape[1] ** 2 * 20,
            self.group_bounds, self.seq_bounds, log_emission, _log(params.startprob),
            np.ascontiguousarray(_log(params.transmat)), path, best)
        return best, path

    def statistics(self, params: HMMParameters) -> HMMStatistics:
        r"""One E-step under ``params``: the start, transition and emission
        statistics from one forward–backward pass (the emission moments
        around the current means)."""
        out = self._run(params, kernels.STATISTICS)
        loglik = out["loglik"]
        impossible = np.flatnonzero(~np.isfinite(loglik))
        if impossible.size:
            raise ValueError(
                f"sequence(s) {impossible[:10].tolist()} have probability zero under the "
                "current parameters (zeros in startprob_ or transmat_ forbid every state "
                "path, or the emissions underflow); check the initial parameters.")
        total = math.fsum(loglik.tolist())
        emissions = GaussianStatistics(out["nk"], out["sx"], out["sxx"],
                                       np.array(params.means, dtype=np.float64), total,
                                       float(self.n_samples), count=float(self.n_samples))
        return HMMStatistics(out["start"], out["trans"], emissions, total, self.n_sequences,
                             params)


# ------------------------------------------------------------------ M-step
def _broadcast(value, shape, name):
    try:
        return np.broadcast_to(np.asarray(value, dtype=np.float64), shape)
    except ValueError:
        raise ValueError(f"{name} of shape {np.shape(value)} does not broadcast to the "
                         f"shape {shape}") from None


class BaumWelch:
    r"""hmmlearn's M-step of a Gaussian HMM (with its priors), for the EM driver.

    With start counts :math:`n_k`, transition counts :math:`\xi_{ij}`, state
    masses :math:`N_k`, first moments :math:`o_k = \sum_t\gamma_t(k)x_t` and
    scatter :math:`C_k(\mu) = \sum_t\gamma_t(k)(x_t-\mu)(x_t-\mu)^T` (from the
    emission statistics around any shift):

    .. math::

        \pi_k \propto \max(p_k - 1 + n_k, 0),\qquad
        A_{ij} \propto \max(P_{ij} - 1 + \xi_{ij}, 0),\qquad
        \mu_k = \frac{w_k m_k + o_k}{w_k + N_k},

    and, with :math:`c_k = w_k(\mu_k - m_k)(\mu_k - m_k)^T + C_k(\mu_k)`,

    .. math::

        \text{full: }\Sigma_k = \frac{\Psi_k + c_k}{\max(\nu - D, 0) + N_k},\qquad
        \text{tied: }\Sigma = \frac{\Psi + \sum_k c_k}{\max(\nu - D, 0) + \sum_k N_k},

        \text{diag: }\sigma^2_{kd} = \frac{\psi_{kd} + c_{kd}}
        {\max(\max(\nu_k - 1, 0) + N_k, 10^{-5})},\qquad
        \text{spherical: the mean over } d \text{ of the diagonal one},

    where :math:`p` = ``startprob_prior``, :math:`P` = ``transmat_prior``,
    :math:`m, w` = ``means_prior, means_weight``, :math:`\Psi, \nu` =
    ``covars_prior, covars_weight`` (added to every entry, as hmmlearn
    does). Probabilities that are exactly zero stay zero (a left-right HMM
    keeps its structure). ``min_covar`` does not enter hmmlearn's M-step
    (only its initial covariances), nor this one.

    Where hmmlearn would divide by zero (a state without posterior mass and
    no prior weight; a row of counts summing to zero), the previous value is
    kept. Covariances are factored by the mixture's
    :func:`~fastem._kernels.mstep.factor_covariance` (diagonal loading if
    not positive definite, reported as ``jitter``). When 'c' is updated but
    not 'm', the scatter is taken around the previous means (hmmlearn
    0.3.3 then uses zeroed first moments).

    The objective is the total log-likelihood :math:`\sum_s\log p(x^{(s)})`
    of the statistics (hmmlearn's monitor), which the priors' M-step need not
    increase; without priors it never decreases.
    """

    keeps_empty_components = True
    compiled_form = None

    def __init__(self, covariance_type: str, params: str = PARAM_LETTERS, startprob_prior=1.0,
                 transmat_prior=1.0, means_prior=0.0, means_weight=0.0, covars_prior=1e-2,
                 covars_weight=1.0):
        self.covariance_type = covariance_type
        self.params = params
        self.startprob_prior = startprob_prior
        self.transmat_prior = transmat_prior
        self.means_prior = means_prior
        self.means_weight = means_weight
        self.covars_prior = covars_prior
        self.covars_weight = covars_weight

    def prior_shapes(self, n_states: int, n_features: int) -> dict:
        """The shape each prior is broadcast to (a prior may be any shape that broadcasts)."""
        tied = self.covariance_type == "tied"
        full = uses_full_scatter(self.covariance_type)
        return {
            "startprob_prior": (n_states,),
            "transmat_prior": (n_states, n_states),
            "means_prior": (n_states, n_features),
            "means_weight": (n_states,),
            "covars_prior": ((n_features, n_features) if tied else
                             (n_states, n_features, n_features) if full else
                             (n_states, n_features)),
            "covars_weight": () if tied else (n_states,),
        }

    def check_priors(self, n_states: int, n_features: int) -> None:
        """Raise ``ValueError`` naming a prior that is not finite or does not broadcast."""
        for name, shape in self.prior_shapes(n_states, n_features).items():
            value = getattr(self, name)
            try:
                array = np.asarray(value, dtype=np.float64)
            except (TypeError, ValueError):
                raise ValueError(f"{name} must be a number or an array of numbers, got "
                                 f"{value!r}") from None
            if not np.all(np.isfinite(array)):
                raise ValueError(f"{name} must be finite")
            if shape == () and array.size != 1:
                raise ValueError(f"{name} must be a number for covariance_type="
                                 f"{self.covariance_type!r}, got shape {array.shape}")
            _broadcast(array, shape, name)

    def objective(self, stats: HMMStatistics, params: HMMParameters = None) -> float:
        """Total log-likelihood of the statistics (under the parameters they were taken at)."""
        return float(stats.loglik)

    def __call__(self, stats: HMMStatistics):
        old = stats.params
        n_states, n_features = old.means.shape
        startprob, transmat, means = old.startprob, old.transmat, old.means
        covars, prec_chol = old.covars, old.precisions_cholesky
        jitter = np.zeros(n_states)
        if "s" in self.params:
            startprob = _dirichlet_mode(
                _broadcast(self.startprob_prior, (n_states,), "startprob_prior"), stats.start,
                old.startprob)
        if "t" in self.params:
            transmat = _dirichlet_mode(
                _broadcast(self.transmat_prior, (n_states, n_states), "transmat_prior"),
                stats.trans, old.transmat)
        e = stats.emissions
        nk = e.nk
        mu0 = _broadcast(self.means_prior, (n_states, n_features), "means_prior")
        w = _broadcast(self.means_weight, (n_states,), "means_weight")
        if "m" in self.params:
            # (w m + o) / (w + N) with o = N c + s around the shift c.
            denominator = w + nk
            with np.errstate(divide="ignore", invalid="ignore"):
                updated = e.shift + (w[:, None] * (mu0 - e.shift) + e.sx) / denominator[:, None]
            means = np.where((denominator > 0)[:, None], updated, old.means)
        if "c" in self.params:
            covars, prec_chol, jitter = self._covariances(e, means, mu0, w, old)
        return HMMParameters(startprob, transmat, means, covars, prec_chol), jitter

    def _covariances(self, e: GaussianStatistics, means, mu0, w, old: HMMParameters):
        """Covariances (hmmlearn's formulas), their precision factors and jitter."""
        covariance_type = self.covariance_type
        n_states, n_features = means.shape
        nk = e.nk
        d = means - e.shift
        md = means - mu0
        jitter = np.zeros(n_states)
        if uses_full_scatter(covariance_type):
            outer = d[:, :, None] * e.sx[:, None, :]
            scatter = (e.sxx - outer - outer.transpose(0, 2, 1)
                       + nk[:, None, None] * d[:, :, None] * d[:, None, :])
            c_n = w[:, None, None] * md[:, :, None] * md[:, None, :] + scatter
            if covariance_type == "tied":
                weight = max(float(np.asarray(self.covars_weight, dtype=np.float64))
                             - n_features, 0.0)
                prior = _broadcast(self.covars_prior, (n_features, n_features), "covars_prior")
                stack = ((prior + c_n.sum(axis=0)) / (weight + nk.sum()))[None]
                keep = np.zeros(1, dtype=bool)
            else:
                weight = np.maximum(_broadcast(self.covars_weight, (n_states,), "covars_weight")
                                    - n_features, 0.0)
                prior = _broadcast(self.covars_prior, (n_states, n_features, n_features),
                                   "covars_prior")
                denominator = weight + nk
                keep = ~(denominator > 0)
                with np.errstate(divide="ignore", invalid="ignore"):
                    stack = (prior + c_n) / denominator[:, None, None]
            stack = 0.5 * (stack + stack.transpose(0, 2, 1))
            factors = np.empty_like(stack)
            lower = np.empty((n_features, n_features))
            loads = np.zeros(stack.shape[0])
            previous = old.covars[None] if covariance_type == "tied" else old.covars
            previous_factor = (old.precisions_cholesky[None] if covariance_type == "tied"
                               else old.precisions_cholesky)
            for k in range(stack.shape[0]):
                if keep[k]:
                    stack[k] = previous[k]
                    factors[k] = previous_factor[k]
                    continue
                loads[k] = mstep.factor_covariance(stack[k], lower, factors[k])
            if covariance_type == "tied":
                return stack[0], factors[0], np.full(n_states, loads[0])
            return stack, factors, loads
        scatter = e.sxx[:, :, 0] - 2.0 * d * e.sx + nk[:, None] * d * d
        c_n = w[:, None] * md * md + scatter
        weight = np.maximum(_broadcast(self.covars_weight, (n_states,), "covars_weight") - 1.0,
                            0.0)
        prior = _broadcast(self.covars_prior, (n_states, n_features), "covars_prior")
        var = (prior + c_n) / np.maximum(weight + nk, _VARIANCE_DENOMINATOR_FLOOR)[:, None]
        if covariance_type == "spherical":
            var = var.mean(axis=1, keepdims=True)
        for k in range(n_states):
            row = var[k]
            if not np.all(np.isfinite(row)):
                jitter[k] = -1.0
            elif np.any(row <= 0.0):
                bump = 1e-10 * max(1.0, float(np.abs(row).mean()))
                row[row <= 0.0] = bump
                jitter[k] = bump
        if covariance_type == "spherical":
            var = var[:, 0]
        with np.errstate(divide="ignore", invalid="ignore"):
            return var, 1.0 / np.sqrt(var), jitter


def _dirichlet_mode(prior, counts, previous):
    r""":math:`p \propto \max(\alpha - 1 + n, 0)` along the last axis, zero where
    ``previous`` is zero; a row summing to zero keeps ``previous``."""
    values = np.maximum(prior - 1.0 + counts, 0.0)
    values = np.where(previous == 0, 0.0, values)
    total = values.sum(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        normalised = values / total
    return np.where(total > 0, normalised, previous)


# ------------------------------------------------------------------ monitors
class HMMConvergenceMonitor:
    """hmmlearn's ``ConvergenceMonitor``, filled in by :meth:`GaussianHMM.fit`.

    Attributes
    ----------
    tol : float
    n_iter : int
    verbose : bool
    history : collections.deque
        The total log-likelihood of every iteration (under the parameters
        entering it).
    iter : int
        Iterations run.
    """

    def __init__(self, tol, n_iter, verbose):
        self.tol = tol
        self.n_iter = n_iter
        self.verbose = verbose
        self.history = deque()
        self.iter = 0

    def __repr__(self):
        items = sorted(dict(vars(self), history=list(self.history)).items())
        return "HMMConvergenceMonitor(\n" + "".join(f"    {k}={v},\n" for k, v in items) + ")"

    def _reset(self):
        self.iter = 0
        self.history.clear()

    def report(self, log_prob):
        """Record one iteration's log-likelihood."""
        self.history.append(log_prob)
        self.iter += 1

    @property
    def converged(self) -> bool:
        """hmmlearn's rule: the iterations are used up, or the last gain is below ``tol``."""
        return (self.iter == self.n_iter
                or (len(self.history) >= 2 and self.history[-1] - self.history[-2] < self.tol))


class _SignedMonitor(em.ConvergenceMonitor):
    """The driver's monitor with hmmlearn's test: converged when the gain
    (signed: a decrease too) is below ``tol``."""

    def converged(self, n_iter, change, objective=None) -> bool:
        super().converged(n_iter, change, objective)
        return change < self.tol


# ------------------------------------------------------------------ estimator
def _check_lengths(lengths, n_samples):
    """Validated lengths (int64, each positive, summing to ``n_samples``)."""
    if lengths is None:
        return np.asarray([n_samples], dtype=np.int64)
    raw = np.asarray(lengths)
    if raw.ndim != 1 or raw.shape[0] == 0:
        raise ValueError(f"lengths must be a non-empty 1-D array of sequence lengths, got "
                         f"shape {raw.shape}")
    if raw.dtype.kind not in "iuf" or (raw.dtype.kind == "f" and not np.all(
            np.isfinite(raw) & (raw == np.round(raw)))):
        raise ValueError(f"lengths must be integers, got {raw[:10].tolist()}")
    values = raw.astype(np.int64)
    if np.any(values <= 0):
        bad = np.flatnonzero(values <= 0)
        raise ValueError(f"lengths must be positive: sequence(s) {bad[:10].tolist()} have "
                         f"length(s) {values[bad[:10]].tolist()}")
    if int(values.sum()) != n_samples:
        raise ValueError(f"lengths sum to {int(values.sum())} but X has {n_samples} rows: "
                         "the sum of lengths must be the number of samples")
    return values


class GaussianHMM(BaseEstimator):
    r"""Hidden Markov model with Gaussian emissions, fitted by Baum–Welch.

    A drop-in for ``hmmlearn.hmm.GaussianHMM`` (0.3.3): the same parameters,
    priors and M-step (:class:`BaumWelch`), the same monitor and methods;
    the E-step runs on fastem's kernels and threads (:class:`SequenceSource`).

    Parameters
    ----------
    n_components : int, default=1
        Number of states K.
    covariance_type : {'diag', 'spherical', 'full', 'tied'}, default='diag'
    min_covar : float, default=1e-3
        Added to the diagonal of the data's covariance to make the initial
        covariances (as in hmmlearn; not used by the M-step).
    startprob_prior, transmat_prior : float or array, default=1.0
        Dirichlet priors of :attr:`startprob_` and of each row of :attr:`transmat_`.
    means_prior, means_weight : float or array, default=0
        Mean and precision of the normal prior of :attr:`means_`.
    covars_prior, covars_weight : float or array, default=1e-2 and 1
        Prior of the covariances (inverse gamma for 'diag' and 'spherical',
        inverse Wishart otherwise), with hmmlearn's updates.
    algorithm : {'viterbi', 'map'}, default='viterbi'
        Decoder of :meth:`decode` and :meth:`predict`.
    random_state : int, RandomState or None
    n_iter : int, default=10
        Maximum number of EM iterations.
    tol : float, default=1e-2
        EM stops when the total log-likelihood gains less than ``tol``
        between two iterations.
    verbose : bool, default=False
        Print per-iteration reports to stderr.
    params, init_params : str, default='stmc'
        Letters of the parameters updated by EM (``params``) or initialised
        before it (``init_params``): 's' startprob, 't' transmat, 'm' means,
        'c' covars. A parameter not in ``init_params`` that was set by hand
        (``model.means_ = ...``) is the start; one not set is initialised.
    implementation : {'log', 'scaling'}, default='log'
        The forward–backward recursion (both exact up to rounding).
    n_init : int, default=1
        EM from this many starts (the random parts of the initialisation
        redrawn); the one of highest log-likelihood is kept.
    n_threads : int or None
        Threads of the E-step (None: all CPUs this process may use).

    Attributes
    ----------
    startprob_ : ndarray (K,)
    transmat_ : ndarray (K, K)
    means_ : ndarray (K, D)
    covars_ : ndarray (K, D, D)
        The covariance of every state as a full matrix, whatever the
        covariance type (hmmlearn's property; the compact parameters are
        ``_covars_``: (K,) 'spherical', (K, D) 'diag', (K, D, D) 'full',
        (D, D) 'tied'). Set it in the compact shape.
    n_features, n_features_in_ : int
        Number of features D (hmmlearn's name, and scikit-learn's).
    monitor_ : HMMConvergenceMonitor
        ``history`` (log-likelihood per iteration of the kept start),
        ``iter`` and hmmlearn's ``converged``.
    lower_bounds_ : list of float
        The total log-likelihood entering every iteration of the kept start
        (``monitor_.history``).
    lower_bound_ : float
        The last of them (-inf without iterations).
    converged_ : bool
        Whether EM stopped by ``tol`` (not by ``n_iter``).
    n_iter_ : int

    Notes
    -----
    Initialisation (letters in ``init_params``): 's' uniform; 't' a sticky
    matrix, 0.9 on the diagonal and the rest spread evenly (a fastem choice:
    hmmlearn draws both from a Dirichlet, which rarely suits regimes that
    persist); 'm' fastem's k-means (k-means++ then Lloyd); 'c' the data's
    covariance plus ``min_covar`` on the diagonal, as hmmlearn (for
    'spherical' the mean of its diagonal, where hmmlearn takes the mean of
    all its entries).
    """

    _parameter_constraints: dict = {
        "n_components": [Interval(Integral, 1, None, closed="left")],
        "covariance_type": [StrOptions(set(COVARIANCE_TYPES))],
        "min_covar": [Interval(Real, 0.0, None, closed="left")],
        "startprob_prior": ["array-like", Real],
        "transmat_prior": ["array-like", Real],
        "means_prior": ["array-like", Real],
        "means_weight": ["array-like", Real],
        "covars_prior": ["array-like", Real],
        "covars_weight": ["array-like", Real],
        "algorithm": [StrOptions(set(DECODER_ALGORITHMS))],
        "random_state": ["random_state"],
        "n_iter": [Interval(Integral, 0, None, closed="left")],
        "tol": [Real],
        "verbose": ["verbose"],
        "params": [str],
        "init_params": [str],
        "implementation": [StrOptions(set(IMPLEMENTATIONS))],
        "n_init": [Interval(Integral, 1, None, closed="left")],
        "n_threads": [Interval(Integral, 1, None, closed="left"), None],
    }

    def __init__(self, n_components=1, covariance_type="diag", min_covar=1e-3,
                 startprob_prior=1.0, transmat_prior=1.0, means_prior=0, means_weight=0,
                 covars_prior=1e-2, covars_weight=1, algorithm="viterbi", random_state=None,
                 n_iter=10, tol=1e-2, verbose=False, params="stmc", init_params="stmc",
                 implementation="log", n_init=1, n_threads=None):
        self.n_components = n_components
        self.covariance_type = covariance_type
        self.min_covar = min_covar
        self.startprob_prior = startprob_prior
        self.transmat_prior = transmat_prior
        self.means_prior = means_prior
        self.means_weight = means_weight
        self.covars_prior = covars_prior
        self.covars_weight = covars_weight
        self.algorithm = algorithm
        self.random_state = random_state
        self.n_iter = n_iter
        self.tol = tol
        self.verbose = verbose
        self.params = params
        self.init_params = init_params
        self.implementation = implementation
        self.n_init = n_init
        self.n_threads = n_threads

    # -------------------------------------------------------------- covars_
    @property
    def covars_(self):
        """Covariance of every state as a (K, D, D) matrix (hmmlearn's property)."""
        return full_covariances(self._covars_, self.covariance_type, self.n_components,
                                self.means_.shape[1] if hasattr(self, "means_")
                                else np.shape(self._covars_)[-1])

    @covars_.setter
    def covars_(self, covars):
        covars = np.array(covars, dtype=np.float64)
        _check_covars(covars, self.covariance_type)
        self._covars_ = covars

    # -------------------------------------------------------------- validation
    def _check_settings(self):
        self._validate_params()
        if math.isnan(self.tol):
            raise ValueError("tol must be a number, got nan")
        for name in ("params", "init_params"):
            letters = getattr(self, name)
            unknown = sorted(set(letters) - set(PARAM_LETTERS))
            if unknown:
                raise ValueError(f"{name}={letters!r} has unknown letter(s) {unknown}: use "
                                 "'s' (startprob), 't' (transmat), 'm' (means), 'c' (covars)")

    def _check_X(self, X, lengths, fitting=False):
        X = check_array(X, dtype=np.float64, order="C", input_name="X")
        lengths = _check_lengths(lengths, X.shape[0])
        if fitting and X.shape[0] < self.n_components:
            raise ValueError(f"n_components={self.n_components} must be <= n_samples="
                             f"{X.shape[0]}: more states than observations")
        if not fitting and X.shape[1] != self.means_.shape[1]:
            raise ValueError(f"X has {X.shape[1]} features, but the model was fitted with "
                             f"{self.means_.shape[1]} features")
        return X, lengths

    def _check_parameters(self, params: HMMParameters, n_features: int) -> None:
        """The start's parameters: shapes, probabilities summing to one, covariances."""
        K = self.n_components
        startprob, transmat = params.startprob, params.transmat
        if startprob.shape != (K,):
            raise ValueError(f"startprob_ must have shape ({K},), got {startprob.shape}")
        if np.any(~np.isfinite(startprob)) or np.any(startprob < 0) or not np.allclose(
                startprob.sum(), 1.0):
            raise ValueError(f"startprob_ must be non-negative and sum to 1 (got sum "
                             f"{startprob.sum():.4f})")
        if transmat.shape != (K, K):
            raise ValueError(f"transmat_ must have shape ({K}, {K}), got {transmat.shape}")
        if np.any(~np.isfinite(transmat)) or np.any(transmat < 0) or not np.allclose(
                transmat.sum(axis=1), 1.0):
            raise ValueError(f"transmat_ rows must be non-negative and sum to 1 (got row sums "
                             f"{transmat.sum(axis=1)})")
        if params.means.shape != (K, n_features):
            raise ValueError(f"means_ must have shape ({K}, {n_features}), got "
                             f"{params.means.shape}")
        if not np.all(np.isfinite(params.means)):
            raise ValueError("means_ must be finite")
        shape = {"full": (K, n_features, n_features), "tied": (n_features, n_features),
                 "diag": (K, n_features), "spherical": (K,)}[self.covariance_type]
        if params.covars.shape != shape:
            raise ValueError(f"'{self.covariance_type}' covars must have shape {shape}, got "
                             f"{params.covars.shape}")
        _check_covars(params.covars, self.covariance_type)

    # -------------------------------------------------------------- initialisation
    def _needs_init(self, code, name):
        return code in self.init_params or not hasattr(self, name)

    def _initial_parameters(self, X, random_state) -> HMMParameters:
        K = self.n_components
        n_features = X.shape[1]
        if self._needs_init("s", "startprob_"):
            startprob = np.full(K, 1.0 / K)
        else:
            startprob = np.asarray(self.startprob_, dtype=np.float64)
        if self._needs_init("t", "transmat_"):
            transmat = sticky_transmat(K)
        else:
            transmat = np.asarray(self.transmat_, dtype=np.float64)
        if self._needs_init("m", "means_"):
            seeds, _ = kmeans_plusplus(X, K, random_state)
            _, means, _, _ = lloyd(X, seeds, inertia=False)
        else:
            means = np.asarray(self.means_, dtype=np.float64)
        if self._needs_init("c", "_covars_"):
            covars = initial_covariances(X, self.covariance_type, K, self.min_covar)
        else:
            covars = np.asarray(self._covars_, dtype=np.float64)
        params = HMMParameters(np.array(startprob, dtype=np.float64),
                               np.array(transmat, dtype=np.float64),
                               np.array(means, dtype=np.float64),
                               np.array(covars, dtype=np.float64), None)
        self._check_parameters(params, n_features)
        return params._replace(
            precisions_cholesky=precision_cholesky_of(params.covars, self.covariance_type))

    def _m_step(self) -> BaumWelch:
        return BaumWelch(self.covariance_type, self.params, self.startprob_prior,
                         self.transmat_prior, self.means_prior, self.means_weight,
                         self.covars_prior, self.covars_weight)

    # -------------------------------------------------------------- fit
    def fit(self, X, lengths=None):
        """Estimate the parameters with Baum–Welch (EM).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            The sequences, back to back.
        lengths : array-like of int, optional
            Lengths of the sequences (summing to ``n_samples``); None: one sequence.

        Returns
        -------
        self
        """
        self._check_settings()
        X, lengths = self._check_X(X, lengths, fitting=True)
        source = SequenceSource(X, lengths, self.covariance_type, self.implementation)
        m_step = self._m_step()
        m_step.check_priors(self.n_components, X.shape[1])
        random_state = check_random_state(self.random_state)
        monitor = _SignedMonitor(self.tol, verbose=2 if self.verbose else 0, verbose_interval=1,
                                 stream=sys.stderr)
        with _threads.limit(self.n_threads), _threads.deferred_interrupts():
            best, _ = em.fit_em(source, m_step,
                                lambda index: self._initial_parameters(X, random_state),
                                self.n_init, monitor, self.n_iter)
        params = best.params
        self.n_features = self.n_features_in_ = X.shape[1]
        self.startprob_ = params.startprob
        self.transmat_ = params.transmat
        self.means_ = params.means
        self._covars_ = params.covars
        self.lower_bounds_ = [float(value) for value in best.lower_bounds]
        self.lower_bound_ = float(best.lower_bound)
        self.n_iter_ = best.n_iter
        self.converged_ = bool(best.converged)
        return self

    @property
    def monitor_(self) -> HMMConvergenceMonitor:
        """hmmlearn's monitor of the kept start, rebuilt from :attr:`lower_bounds_`."""
        if not hasattr(self, "lower_bounds_"):
            raise AttributeError("monitor_ is set by fit")
        monitor = HMMConvergenceMonitor(self.tol, self.n_iter, self.verbose)
        for value in self.lower_bounds_:
            monitor.report(value)
        return monitor

    # -------------------------------------------------------------- inference
    def _current_parameters(self) -> HMMParameters:
        check_is_fitted(self, "startprob_")
        params = HMMParameters(np.asarray(self.startprob_, dtype=np.float64),
                               np.asarray(self.transmat_, dtype=np.float64),
                               np.asarray(self.means_, dtype=np.float64),
                               np.asarray(self._covars_, dtype=np.float64), None)
        self._check_parameters(params, params.means.shape[1])
        return params._replace(
            precisions_cholesky=precision_cholesky_of(params.covars, self.covariance_type))

    def _source(self, X, lengths):
        self._check_settings()
        params = self._current_parameters()
        X, lengths = self._check_X(X, lengths)
        return SequenceSource(X, lengths, self.covariance_type, self.implementation), params

    def _score(self, X, lengths, posteriors):
        source, params = self._source(X, lengths)
        with _threads.limit(self.n_threads), _threads.deferred_interrupts():
            loglik, gamma, _, _ = source.forward_backward(params, posteriors=posteriors)
        return math.fsum(loglik.tolist()), gamma

    def score(self, X, lengths=None) -> float:
        r"""Log-likelihood :math:`\sum_s \log p(x^{(s)})` of the sequences."""
        return self._score(X, lengths, False)[0]

    def score_samples(self, X, lengths=None):
        """Log-likelihood and the posteriors (n_samples, n_components)."""
        return self._score(X, lengths, True)

    def predict_proba(self, X, lengths=None):
        r"""Posteriors :math:`p(z_t = k \mid x)`, (n_samples, n_components)."""
        return self._score(X, lengths, True)[1]

    def decode(self, X, lengths=None, algorithm=None):
        """Most likely states: ``(log_prob, state_sequence)``.

        'viterbi': the most probable path and the summed log-probability of
        the paths with their sequences; 'map': the most probable state of
        every row, with hmmlearn's ``log_prob``, the sum of the rows' largest
        posteriors (probabilities, not logarithms).
        """
        algorithm = algorithm or self.algorithm
        if algorithm not in DECODER_ALGORITHMS:
            raise ValueError(f"Unknown decoder {algorithm!r}: use one of {DECODER_ALGORITHMS}")
        if algorithm == "map":
            _, posteriors = self.score_samples(X, lengths)
            return float(posteriors.max(axis=1).sum()), np.argmax(posteriors, axis=1)
        source, params = self._source(X, lengths)
        with _threads.limit(self.n_threads), _threads.deferred_interrupts():
            best, path = source.viterbi(params)
        return math.fsum(best.tolist()), path

    def predict(self, X, lengths=None):
        """Most likely state of every row (by ``algorithm``)."""
        return self.decode(X, lengths)[1]

    def sample(self, n_samples=1, random_state=None, currstate=None):
        """Draw ``n_samples`` rows from the model: ``(X, state_sequence)``.

        The same draws as hmmlearn from the same random state: a uniform
        per state (through the cumulative probabilities), then the state's
        Gaussian (``multivariate_normal``).
        """
        params = self._current_parameters()
        random_state = check_random_state(self.random_state if random_state is None
                                          else random_state)
        covars = self.covars_
        transmat_cdf = np.cumsum(params.transmat, axis=1)
        if currstate is None:
            currstate = int((np.cumsum(params.startprob) > random_state.rand()).argmax())
        states = [currstate]
        rows = [random_state.multivariate_normal(params.means[currstate], covars[currstate])]
        for _ in range(n_samples - 1):
            currstate = int((transmat_cdf[currstate] > random_state.rand()).argmax())
            states.append(currstate)
            rows.append(random_state.multivariate_normal(params.means[currstate],
                                                         covars[currstate]))
        return np.atleast_2d(rows), np.array(states, dtype=int)

    # -------------------------------------------------------------- misc
    def save(self, path):
        """Save the fitted model to ``path`` (.npz with JSON metadata, no pickle)."""
        model_files.save_model(self, path)

    # -------------------------------------------------------------- criteria
    def _n_parameters(self) -> int:
        """Free parameters: :math:`K-1` + :math:`K(K-1)` + :math:`KD` + the covariances'."""
        K, D = self.n_components, self.means_.shape[1]
        cov = {"spherical": K, "diag": K * D, "full": K * D * (D + 1) // 2,
               "tied": D * (D + 1) // 2}[self.covariance_type]
        return int((K - 1) + K * (K - 1) + K * D + cov)

    def bic(self, X, lengths=None) -> float:
        r"""Bayesian information criterion :math:`-2\log p(X) + p\log N` (lower is better)."""
        return -2.0 * self.score(X, lengths) + self._n_parameters() * math.log(len(X))

    def aic(self, X, lengths=None) -> float:
        r"""Akaike information criterion :math:`-2\log p(X) + 2p` (lower is better)."""
        return -2.0 * self.score(X, lengths) + 2.0 * self._n_parameters()


@dataclass(frozen=True)
class StateSelection:
    """What :func:`select_n_states` found.

    Attributes
    ----------
    best : GaussianHMM
        The fitted model of lowest criterion.
    criterion : {'bic', 'aic'}
    table : list of dict
        One row per number of states, in increasing order: ``n_components``,
        ``log_likelihood``, ``n_parameters``, ``bic``, ``aic``, ``n_iter``,
        ``converged``.
    """

    best: GaussianHMM
    criterion: str
    table: list


def select_n_states(X, lengths=None, n_components=range(1, 7), criterion="bic",
                    **params) -> StateSelection:
    r"""Fit a :class:`GaussianHMM` for each number of states and keep the best.

    The criterion is :math:`\mathrm{BIC} = -2\log p(X) + p\log N` or
    :math:`\mathrm{AIC} = -2\log p(X) + 2p`, with :math:`p` the free
    parameters (:math:`K-1` start, :math:`K(K-1)` transition, :math:`KD`
    mean and the covariances' parameters); the lowest wins, ties going to
    fewer states.

    Parameters
    ----------
    X : array-like of shape (n_samples, n_features)
    lengths : array-like of int, optional
    n_components : iterable of int, default=range(1, 7)
        The numbers of states to try (each at most the number of rows).
    criterion : {'bic', 'aic'}, default='bic'
    **params
        Other parameters of every :class:`GaussianHMM` (``covariance_type``,
        ``n_init``, ``n_iter``, ``tol``, ``random_state``, ...).

    Returns
    -------
    StateSelection
    """
    if criterion not in ("bic", "aic"):
        raise ValueError(f"criterion must be 'bic' or 'aic', got {criterion!r}")
    if "n_components" in params:
        raise ValueError("give the numbers of states as n_components=, an iterable")
    ks = sorted({int(k) for k in n_components})
    if not ks or ks[0] < 1:
        raise ValueError(f"n_components must be numbers of states >= 1, got {ks}")
    X = check_array(X, dtype=np.float64, order="C", input_name="X")
    if ks[-1] > X.shape[0]:
        raise ValueError(f"n_components asks for up to {ks[-1]} states but X has only "
                         f"{X.shape[0]} rows")
    table, models = [], []
    for k in ks:
        model = GaussianHMM(n_components=k, **params).fit(X, lengths)
        loglik = model.score(X, lengths)
        n_parameters = model._n_parameters()
        table.append({"n_components": k, "log_likelihood": loglik,
                      "n_parameters": n_parameters,
                      "bic": -2.0 * loglik + n_parameters * math.log(X.shape[0]),
                      "aic": -2.0 * loglik + 2.0 * n_parameters,
                      "n_iter": model.n_iter_, "converged": model.converged_})
        models.append(model)
    best = min(range(len(ks)), key=lambda i: (table[i][criterion], ks[i]))
    return StateSelection(models[best], criterion, table)


def sticky_transmat(n_components: int) -> np.ndarray:
    r"""The default transition matrix: :math:`A_{ii} = 0.9`, :math:`A_{ij} = 0.1/(K-1)`."""
    if n_components == 1:
        return np.ones((1, 1))
    off = (1.0 - STICKY_DIAGONAL) / (n_components - 1)
    transmat = np.full((n_components, n_components), off)
    np.fill_diagonal(transmat, STICKY_DIAGONAL)
    return transmat


def initial_covariances(X, covariance_type: str, n_components: int, min_covar: float):
    r"""hmmlearn's initial covariances: :math:`\operatorname{cov}(X) + \lambda I` for every
    state, in the compact shape of the type (for 'spherical' the mean of its
    diagonal)."""
    n_features = X.shape[1]
    if X.shape[0] < 2:
        cv = np.zeros((n_features, n_features))
    else:
        cv = np.atleast_2d(np.cov(X.T))
    cv = cv + min_covar * np.eye(n_features)
    if covariance_type == "full":
        return np.tile(cv, (n_components, 1, 1))
    if covariance_type == "tied":
        return cv
    if covariance_type == "diag":
        return np.tile(np.diag(cv), (n_components, 1))
    return np.full(n_components, np.diag(cv).mean())


def _check_covars(covars, covariance_type):
    """Covariances in the compact shape: positive, or symmetric positive definite."""
    if covariance_type in ("diag", "spherical"):
        ndim = 2 if covariance_type == "diag" else 1
        if covars.ndim != ndim:
            raise ValueError(f"'{covariance_type}' covars must have {ndim} dimension(s) "
                             f"(n_components{', n_features' if ndim == 2 else ''}), got shape "
                             f"{covars.shape}")
        if not np.all(np.isfinite(covars)) or np.any(covars <= 0):
            raise ValueError(f"'{covariance_type}' covars must be positive")
        return
    stack = covars[None] if covariance_type == "tied" else covars
    if stack.ndim != 3 or stack.shape[1] != stack.shape[2]:
        shape = "(n_features, n_features)" if covariance_type == "tied" else \
            "(n_components, n_features, n_features)"
        raise ValueError(f"'{covariance_type}' covars must have shape {shape}, got "
                         f"{covars.shape}")
    for k, matrix in enumerate(stack):
        if not (np.all(np.isfinite(matrix)) and np.allclose(matrix, matrix.T)
                and np.all(np.linalg.eigvalsh(matrix) > 0)):
            which = "" if covariance_type == "tied" else f"component {k} of "
            raise ValueError(f"{which}'{covariance_type}' covars must be symmetric, "
                             "positive-definite")


# ------------------------------------------------------------------ model files
def _saved_array_shapes(params, fitted):
    n_states, n_features = params["n_components"], fitted["n_features_in_"]
    if (n_features < 1 or fitted["n_features"] != n_features or not
            0 <= fitted["n_iter_"] <= params["n_iter"] or fitted["lower_bound_"] == math.inf):
        raise ValueError(f"invalid fitted attributes n_features_in_={n_features}, n_features="
                         f"{fitted['n_features']}, n_iter_={fitted['n_iter_']}, lower_bound_="
                         f"{fitted['lower_bound_']}")
    return {"startprob_": (n_states,), "transmat_": (n_states, n_states),
            "means_": (n_states, n_features),
            "_covars_": covariance_shape(params["covariance_type"], n_states, n_features)}


def _check_saved_model(model) -> None:
    """Refuse a loaded model that no fit gives: probabilities that do not sum to one,
    covariances that are not positive definite, priors that do not broadcast."""
    from .mixture import check_lower_bounds

    model._check_parameters(model._current_parameters(), model.n_features_in_)
    model._m_step().check_priors(model.n_components, model.n_features_in_)
    check_lower_bounds(model)


model_files.register_model_format(model_files.ModelFormat(
    name="fastem.GaussianHMM",
    version=1,
    estimator=GaussianHMM,
    fitted_arrays=("startprob_", "transmat_", "means_", "_covars_"),
    fitted_lists=("lower_bounds_",),
    fitted_scalars={"converged_": bool, "n_iter_": int, "lower_bound_": float,
                    "n_features": int, "n_features_in_": int},
    array_params=("startprob_prior", "transmat_prior", "means_prior", "means_weight",
                  "covars_prior", "covars_weight"),
    array_shapes=_saved_array_shapes,
    check_fitted=_check_saved_model,
))
