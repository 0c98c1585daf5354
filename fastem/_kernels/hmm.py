r"""Hidden Markov model kernels: forward–backward and Viterbi over sequences.

The data are ``T`` rows holding several sequences back to back (row offsets
``seq_bounds``). The emissions come in one of two forms:

* *shifted probabilities* (``SCALED``): :math:`b_t(j) = e^{L_t(j) - \ell_t}`
  with a per-row offset :math:`\ell_t` (from the mixture's pass, see
  :func:`fastem.hmm.emission_probabilities`: :math:`\ell_t = \log\sum_j
  e^{L_t(j)}`, so :math:`b_t` is a row of responsibilities), for the scaled
  recursions: no exponential or logarithm per step at all;
* *log-densities* (``LOG``): :math:`L_t(j) = \log p(x_t \mid z_t = j)`, for
  the log-space recursions, the fallback of ``implementation='log'`` for
  the sequences whose scaled recursion leaves the floating-point range.

The scaled path is three parts per sequence: the forward recursion and the
backward sweep (:math:`K^2` multiply-adds per step each, sequential in
:math:`t`), and, every ``LANES`` rows of the sweep, a pass over that block
that needs no recursion (posteriors, transition sums, emission statistics),
vectorised along the rows: row ``r`` of a block adds to lane ``r`` of each
sum, and the lanes are added in order at the end of a group. Fitting writes
no (T, K) array: the forward lattice of one sequence is scratch.

Sequences are grouped into contiguous *groups* (``group_bounds``, fixed by
the data's shape, never by the thread count). A kernel call handles a range
of groups (:func:`fastem._threads.run_chunks` hands the ranges to threads);
each group writes its sums to its own slot, which the caller reduces in
group order. Results are therefore bit-identical for any number of threads.

Plain IEEE arithmetic throughout (no ``fastmath``): these sums must round
the same in a fresh compilation and a cached one (see
:mod:`fastem._kernels._blocks`). The helpers are compiled with their caller.

Twins: :func:`fastem.reference.hmm_forward_backward` and
:func:`fastem.reference.hmm_viterbi`.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from ._blocks import helper, specialise, transpose_block

# Emission forms (``method``).
SCALED = 0
LOG = 1
# What a call computes (``mode``).
FORWARD = 0      # log-likelihoods only
POSTERIORS = 1   # and the posteriors gamma (T, K), start and transition counts
STATISTICS = 2   # and start, transition and emission statistics; gamma stays unwritten
# ``status`` of a sequence after a SCALED call.
DONE = 0
REDO = 1         # the scaled recursion left the floating-point range: redo in log space

# A strict scaled forward pass gives up below K * 2^-960 per step: subnormal
# roundings (K^2 terms of at most 2^-1075 each) and the emissions the
# mixture's pass flushes to zero (below e^-708 of a row's largest, K of them)
# then stay below 2^-53 of the normaliser.
_STRICT_FLOOR = 2.0 ** -960
# The running product of the normalisers is renormalised (exactly, by its
# binary exponent) outside [2^-64, 2^64], and a normaliser below 2^-64 enters
# by its own mantissa and exponent: the product never leaves the range.
_PRODUCT_LOW = 2.0 ** -64
_PRODUCT_HIGH = 2.0 ** 64
_LN2 = math.log(2.0)
# Rows per block of the backward sweep's vectorised part (the lanes of its sums).
LANES = 32


@helper
def _row_max(values, t):
    """Largest entry of row ``t`` (-inf for an empty or all -inf row; NaN skipped)."""
    best = -np.inf
    for j in range(values.shape[1]):
        if values[t, j] > best:
            best = values[t, j]
    return best


@helper
def _forward_scaled(b, offsets, eb, first, last, pi, AT, floor, alpha, base, inv_c):
    r"""Scaled forward lattice of rows ``[first, last)`` (row ``t``'s emissions in
    ``b[t - eb]``, ``offsets[t - eb]``); returns :math:`\log p(x)`.

    With :math:`b_t(j) = e^{L_t(j) - \ell_t}`:

    .. math::

        u_0 = \pi\circ b_0,\quad u_t = b_t\circ(A^T u_{t-1})/c_{t-1},\quad
        c_t = \textstyle\sum_j u_t(j),\quad \hat\alpha_t = u_t / c_t,

        \log p(x) = \textstyle\sum_t \ell_t + \log\prod_t c_t

    (hmmlearn's ``implementation='scaling'``, the emissions shifted per row
    so that no frame underflows). :math:`K^2` multiply-adds per step and no
    exponential or logarithm: the product of the :math:`c_t` is kept as a
    mantissa and a binary exponent (renormalised exactly). The lattice keeps
    :math:`u_t` (``alpha[t - base]``) and :math:`1/c_t` (``inv_c[t - first]``):
    :math:`A^T u_{t-1}` need not wait for :math:`c_{t-1}`, which shortens the
    chain of dependent operations from one step to the next. Returns NaN
    when some :math:`c_t` is not above ``floor`` or not finite (the
    recursion left the range), -inf when an offset is -inf (a row no state
    can produce).
    """
    n_states = alpha.shape[1]
    mantissa = 1.0
    exponent = 0
    offset_sum = 0.0
    ic = 1.0
    for t in range(first, last):
        r = t - base
        c = 0.0
        if t == first:
            for j in range(n_states):
                u = pi[j] * b[t - eb, j]
                alpha[r, j] = u
                c += u
        else:
            for j in range(n_states):
                p = 0.0
                for i in range(n_states):
                    p += alpha[r - 1, i] * AT[j, i]
                u = (p * b[t - eb, j]) * ic
                alpha[r, j] = u
                c += u
        if not (c > floor and c < np.inf):
            return np.nan
        ic = 1.0 / c
        inv_c[t - first] = ic
        if c >= _PRODUCT_LOW:
            mantissa *= c
        else:  # rare: a small normaliser enters by its mantissa and exponent
            m, e = math.frexp(c)
            mantissa *= m
            exponent += e
        if mantissa < _PRODUCT_LOW or mantissa > _PRODUCT_HIGH:
            mantissa, e = math.frexp(mantissa)
            exponent += e
        offset_sum += offsets[t - eb]
    if not offset_sum > -np.inf:
        return -np.inf
    return offset_sum + (math.log(mantissa) + exponent * _LN2)


# The backward sweep's body, compiled once for any K and once for each K up
# to 8 with K a constant (``_WIDTH``): LLVM then unrolls its K x K product and
# elementwise loops (measured: the kernel takes a tenth less time at K = 8).
# The same operations in the same order: the same bits.
_WIDTH = 0
SPECIALISED_STATES = (2, 3, 4, 5, 6, 7, 8)


def _sweep_body(b, eb, first, last, low, high, A, inv_c, beta, w, wT, betaT):
    r"""The backward sweep over rows ``[low, high)`` (from the top), from
    :math:`\hat\beta_{high}` in ``beta``; its :math:`w_{t+1}` and
    :math:`\hat\beta_t` into the columns ``t - low`` of ``wT`` and ``betaT``.

    .. math::

        w_{t+1}(j) = b_{t+1}(j)\hat\beta_{t+1}(j)/c_{t+1},\qquad
        \hat\beta_t = A w_{t+1}\qquad(\hat\beta_{T-1} = 1)

    (``inv_c`` holds :math:`1/c_t` from ``first`` on; ``beta`` ends as
    :math:`\hat\beta_{low}`).
    """
    n_states = _WIDTH if _WIDTH > 0 else A.shape[0]
    for t in range(high - 1, low - 1, -1):
        r = t - low
        if t < last - 1:
            ic = inv_c[t + 1 - first]
            for j in range(n_states):
                wj = (b[t + 1 - eb, j] * beta[j]) * ic
                w[j] = wj
                wT[j, r] = wj
            for i in range(n_states):
                s = 0.0
                for j in range(n_states):
                    s += A[i, j] * w[j]
                beta[i] = s
        for i in range(n_states):
            betaT[i, r] = beta[i]


_sweep = helper(_sweep_body)
_sweep_2, _sweep_3, _sweep_4, _sweep_5, _sweep_6, _sweep_7, _sweep_8 = (
    helper(specialise(_sweep_body, f"_sweep_{k}", _WIDTH=k)) for k in SPECIALISED_STATES)
SWEEPS = dict(zip(SPECIALISED_STATES, (_sweep_2, _sweep_3, _sweep_4, _sweep_5, _sweep_6,
                                       _sweep_7, _sweep_8)))


@helper
def _sweep_block(b, eb, first, last, low, high, A, inv_c, beta, w, wT, betaT):
    """:func:`_sweep_body` compiled for the state count, if specialised."""
    n_states = A.shape[0]
    if n_states == 2:
        _sweep_2(b, eb, first, last, low, high, A, inv_c, beta, w, wT, betaT)
    elif n_states == 3:
        _sweep_3(b, eb, first, last, low, high, A, inv_c, beta, w, wT, betaT)
    elif n_states == 4:
        _sweep_4(b, eb, first, last, low, high, A, inv_c, beta, w, wT, betaT)
    elif n_states == 5:
        _sweep_5(b, eb, first, last, low, high, A, inv_c, beta, w, wT, betaT)
    elif n_states == 6:
        _sweep_6(b, eb, first, last, low, high, A, inv_c, beta, w, wT, betaT)
    elif n_states == 7:
        _sweep_7(b, eb, first, last, low, high, A, inv_c, beta, w, wT, betaT)
    elif n_states == 8:
        _sweep_8(b, eb, first, last, low, high, A, inv_c, beta, w, wT, betaT)
    else:
        _sweep(b, eb, first, last, low, high, A, inv_c, beta, w, wT, betaT)


@helper
def _backward_scaled(b, eb, first, last, A, alpha, base, inv_c, beta, w, betaT, wT, aT, gT,
                     scale,
                     lane_xi, start, posteriors, stats, X, shift, full, xT, dx, gd, lane_nk,
                     lane_sx, lane_sxx):
    r"""Posteriors of rows ``[first, last)`` over their scaled forward lattice,
    their transition and (with ``stats``) emission statistics.

    .. math::

        \hat\beta_{T-1} = 1,\quad
        w_{t+1}(j) = b_{t+1}(j)\hat\beta_{t+1}(j)/c_{t+1},\quad
        \hat\beta_t = A w_{t+1},\quad
        \gamma_t \propto \hat\alpha_t\circ\hat\beta_t,\quad
        \xi_t(i, j) = \hat\alpha_t(i) A_{ij} w_{t+1}(j)

    (:math:`\hat\alpha_t = u_t/c_t`; each frame of :math:`\gamma` normalised,
    as hmmlearn does). The sweep itself is the :math:`K^2` product
    :math:`A w_{t+1}` per step. Every ``lanes`` rows (a block, from the last
    row down) the block's :math:`\hat\alpha_t, \hat\beta_t, w_{t+1}`,
    transposed (lane ``r`` is row ``low + r``), give :math:`\gamma_t`
    (written back with ``posteriors``; ``start`` :math:`\mathrel{+}= \gamma_0`),
    the lanes ``lane_xi`` :math:`\mathrel{+}= \hat\alpha_t(i) w_{t+1}(j)` (the
    expected transitions are :math:`A_{ij}` times their sum: the caller
    multiplies) and the emission statistics (:func:`_emission_block`): loops
    along the rows, vectorised without reassociation. Returns False when a
    frame's :math:`\sum_i\hat\alpha_t(i)\hat\beta_t(i)` is not positive and
    finite (:math:`\hat\beta` overflowed: a state the forward pass ruled out
    that the future supports); the lanes then hold part of the sequence.
    """
    n_states = alpha.shape[1]
    lanes = betaT.shape[1]
    for i in range(n_states):
        beta[i] = 1.0
    high = last
    while high > first:
        low = max(first, high - lanes)
        n = high - low
        _sweep_block(b, eb, first, last, low, high, A, inv_c, beta, w, wT, betaT)
        for r in range(n):
            ic = inv_c[low + r - first]
            for i in range(n_states):
                aT[i, r] = alpha[low + r - base, i] * ic
        # Transitions of rows low .. high - 1 to their successors.
        pairs = n if high < last else n - 1
        for i in range(n_states):
            for j in range(n_states):
                for r in range(pairs):
                    lane_xi[i, j, r] += aT[i, r] * wT[j, r]
        for r in range(n):
            scale[r] = 0.0
        for i in range(n_states):
            for r in range(n):
                g = aT[i, r] * betaT[i, r]
                gT[i, r] = g
                scale[r] += g
        for r in range(n):
            if not (scale[r] > 0.0 and scale[r] < np.inf):
                return False
            scale[r] = 1.0 / scale[r]
        for i in range(n_states):
            for r in range(n):
                gT[i, r] *= scale[r]
        if posteriors:
            for r in range(n):
                for i in range(n_states):
                    alpha[low + r - base, i] = gT[i, r]
        if low == first:
            for i in range(n_states):
                start[i] += gT[i, 0]
        if stats:
            _emission_block(X, low, n, gT, shift, full, xT, dx, gd, lane_nk, lane_sx, lane_sxx)
        high = low
    return True


@helper
def _emission_block(X, low, n, gT, shift, full, xT, dx, gd, lane_nk, lane_sx, lane_sxx):
    r"""Add the emission statistics of rows ``[low, low + n)``, posteriors
    ``gT[:, :n]`` (transposed), to the lanes.

    .. math::

        N_k \mathrel{+}= \gamma_t(k),\quad
        s_k \mathrel{+}= \gamma_t(k)(x_t - c_k),\quad
        S_k \mathrel{+}= \gamma_t(k)(x_t - c_k)(x_t - c_k)^T

    around the shift :math:`c_k` = ``shift[k]``: the upper triangle of
    :math:`S_k` (``full``) or its diagonal. Row ``low + r`` goes to lane
    ``r`` (the last axis): independent sums, vectorised along the rows
    without reassociation; :func:`_reduce_lanes` adds the lanes in order.
    """
    n_states, n_features = shift.shape
    transpose_block(X, low, n, xT)
    for k in range(n_states):
        for r in range(n):
            lane_nk[k, r] += gT[k, r]
        if full:
            # Few arrays per loop: more would defeat the vectoriser's alias checks.
            for d in range(n_features):
                c = shift[k, d]
                for r in range(n):
                    e = xT[d, r] - c
                    dx[d, r] = e
                    gd[d, r] = gT[k, r] * e
                for r in range(n):
                    lane_sx[k, d, r] += gd[d, r]
            for d in range(n_features):
                for e in range(d, n_features):
                    for r in range(n):
                        lane_sxx[k, d, e, r] += gd[d, r] * dx[e, r]
        else:
            for d in range(n_features):
                c = shift[k, d]
                for r in range(n):
                    e = xT[d, r] - c
                    h = gT[k, r] * e
                    lane_sx[k, d, r] += h
                    lane_sxx[k, d, 0, r] += h * e


@helper
def _lane_sum(lanes):
    """The lanes (last axis) summed in order."""
    total = 0.0
    for r in range(lanes.shape[0]):
        total += lanes[r]
    return total


@helper
def _reduce_lanes(lane_nk, lane_sx, lane_sxx, full, nk, sx, sxx):
    """Emission lanes summed in lane order into ``nk, sx, sxx``; a full
    :math:`S_k` mirrored from its upper triangle."""
    n_states, n_features, width, _ = lane_sxx.shape
    for k in range(n_states):
        nk[k] = _lane_sum(lane_nk[k])
        for d in range(n_features):
            sx[k, d] = _lane_sum(lane_sx[k, d])
            for e in range(d if full else 0, width):
                sxx[k, d, e] = _lane_sum(lane_sxx[k, d, e])
        if full:
            for d in range(n_features):
                for e in range(d):
                    sxx[k, d, e] = sxx[k, e, d]


@helper
def _emission_from_lattice(X, first, last, alpha, base, gT, shift, full, xT, dx, gd, lane_nk,
                           lane_sx, lane_sxx):
    """Emission statistics of rows ``[first, last)`` whose posteriors are in
    ``alpha[t - base]`` (the log-space path), block by block into the lanes."""
    n_states = alpha.shape[1]
    lanes = gT.shape[1]
    for low in range(first, last, lanes):
        n = min(lanes, last - low)
        for r in range(n):
            for k in range(n_states):
                gT[k, r] = alpha[low + r - base, k]
        _emission_block(X, low, n, gT, shift, full, xT, dx, gd, lane_nk, lane_sx, lane_sxx)


@helper
def _forward_log(L, eb, first, last, log_pi, AT, alpha, base, ea):
    r"""Log forward lattice of rows ``[first, last)`` into ``alpha[t - base]``;
    returns :math:`\log p(x)`.

    .. math::

        \alpha_0(j) = \log\pi_j + L_0(j),\qquad
        \alpha_t(j) = L_t(j) + m_{t-1}
          + \log\sum_i e^{\alpha_{t-1}(i) - m_{t-1}} A_{ij},\qquad
        m_{t-1} = \max_i \alpha_{t-1}(i),

    and :math:`\log p(x) = m_{T-1} + \log\sum_j e^{\alpha_{T-1}(j) - m_{T-1}}`.
    K exponentials, :math:`K^2` multiply-adds and K logarithms per step
    (``AT`` is :math:`A^T`, for contiguous inner products).
    """
    n_states = alpha.shape[1]
    for j in range(n_states):
        alpha[first - base, j] = log_pi[j] + L[first - eb, j]
    for t in range(first + 1, last):
        r = t - base
        m = _row_max(alpha, r - 1)
        if m == -np.inf:
            for j in range(n_states):
                alpha[r, j] = -np.inf
            continue
        for i in range(n_states):
            ea[i] = math.exp(alpha[r - 1, i] - m)
        for j in range(n_states):
            s = 0.0
            for i in range(n_states):
                s += ea[i] * AT[j, i]
            alpha[r, j] = L[t - eb, j] + (m + math.log(s))
    r = last - 1 - base
    m = _row_max(alpha, r)
    if m == -np.inf:
        return -np.inf
    s = 0.0
    for j in range(n_states):
        s += math.exp(alpha[r, j] - m)
    return m + math.log(s)


@helper
def _backward_log(L, eb, first, last, loglik, A, log_A, alpha, base, beta, v, ea, ev, w, xi):
    r"""Posteriors of rows ``[first, last)`` (over their log forward lattice, in
    place) and the expected transitions, added to ``xi``.

    With :math:`\beta_{T-1} = 0`, :math:`v_{t+1}(j) = L_{t+1}(j) + \beta_{t+1}(j)`,
    :math:`n = \max_j v_{t+1}(j)`, :math:`a = \max_i\alpha_t(i)`,
    :math:`\tilde e_i = e^{\alpha_t(i) - a}`, :math:`\tilde v_j = e^{v_{t+1}(j) - n}`
    and :math:`w = A\tilde v`:

    .. math::

        \beta_t(i) = n + \log w_i,\qquad
        Z_t = \textstyle\sum_i \tilde e_i w_i,\qquad
        \xi_t(i, j) = \tilde e_i A_{ij}\tilde v_j / Z_t,\qquad
        \gamma_t(i) = \tilde e_i w_i / Z_t,

    since :math:`\xi_t(i,j) = e^{\alpha_t(i) + \log A_{ij} + v_{t+1}(j) - \log p(x)}`
    sums to one over :math:`(i, j)` and to :math:`\gamma_t(i)` over ``j``
    (:math:`Z_t = e^{\log p(x) - a - n}`): every step is normalised by
    itself, as hmmlearn normalises each frame. The last frame is
    :math:`\gamma_{T-1} \propto e^{\alpha_{T-1}}`. A step whose :math:`Z_t`
    underflows (below :math:`2^{-960}`: transitions of probability below about
    :math:`e^{-665}` between the likely states) is taken in log space instead.
    """
    n_states = alpha.shape[1]
    r = last - 1 - base
    m = _row_max(alpha, r)
    s = 0.0
    for i in range(n_states):
        ea[i] = math.exp(alpha[r, i] - m)
        s += ea[i]
    for i in range(n_states):
        alpha[r, i] = ea[i] / s
        beta[i] = 0.0
    for t in range(last - 2, first - 1, -1):
        r = t - base
        for j in range(n_states):
            v[j] = L[t + 1 - eb, j] + beta[j]
        n = -np.inf
        for j in range(n_states):
            if v[j] > n:
                n = v[j]
        a = _row_max(alpha, r)
        for j in range(n_states):
            ev[j] = math.exp(v[j] - n)
        for i in range(n_states):
            ea[i] = math.exp(alpha[r, i] - a)
        z = 0.0
        for i in range(n_states):
            s = 0.0
            for j in range(n_states):
                s += A[i, j] * ev[j]
            w[i] = s
            z += ea[i] * s
        # Below 2^-960 (subnormal Z_t above all) 1/Z_t can overflow or lose
        # precision: that step from its logarithms.
        if z >= _STRICT_FLOOR and z < np.inf:
            for i in range(n_states):
                c = ea[i] / z
                for j in range(n_states):
                    xi[i, j] += c * A[i, j] * ev[j]
            for i in range(n_states):
                beta[i] = n + math.log(w[i])
                alpha[r, i] = ea[i] * w[i] / z
        else:
            # Underflow of Z_t: xi and gamma from their logarithms.
            for i in range(n_states):
                beta[i] = n + math.log(w[i])
            g = -np.inf
            for i in range(n_states):
                ea[i] = alpha[r, i] + beta[i]
                if ea[i] > g:
                    g = ea[i]
            s = 0.0
            for i in range(n_states):
                s += math.exp(ea[i] - g)
            g += math.log(s)
            for i in range(n_states):
                for j in range(n_states):
                    xi[i, j] += math.exp(alpha[r, i] + log_A[i, j] + v[j] - loglik)
                alpha[r, i] = math.exp(ea[i] - g)


@njit(nogil=True, cache=True, error_model="numpy")
def forward_backward(group_first, group_last, group_bounds, seq_bounds, emission, offsets,
                     emission_base, log_startprob, log_transmat, method, mode, strict, X, shift,
                     loglik, status, gamma, xi_parts, start_parts, nk_parts, sx_parts,
                     sxx_parts):
    r"""Forward–backward over the sequences of groups ``[group_first, group_last)``.

    For every sequence ``s`` of group ``g`` (rows ``seq_bounds[s]`` to
    ``seq_bounds[s + 1]``), ``loglik[s]`` :math:`= \log p(x^{(s)})` and,
    unless ``mode`` is ``FORWARD``, with the posteriors
    :math:`\gamma_t(k) = p(z_t = k\mid x^{(s)})`:

    * ``start_parts[g]`` :math:`\mathrel{+}= \gamma_0` and ``xi_parts[g]``
      :math:`\mathrel{+}= \sum_t \xi_t`, the expected transition counts
      :math:`\sum_t p(z_t = i, z_{t+1} = j \mid x^{(s)})`;
    * ``POSTERIORS``: ``gamma[t]`` :math:`= \gamma_t` over the sequence's rows;
    * ``STATISTICS``: the emission statistics around the shift
      :math:`c_k` = ``shift[k]``,

      .. math::

          N_k = \sum_t\gamma_t(k),\quad
          s_k = \sum_t\gamma_t(k)(x_t - c_k),\quad
          S_k = \sum_t\gamma_t(k)(x_t - c_k)(x_t - c_k)^T

      into ``nk_parts[g], sx_parts[g], sxx_parts[g]`` (the full
      :math:`S_k` when ``sxx_parts`` is (G, K, D, D) with D > 1, else its
      diagonal in (G, K, D, 1)), accumulated as :math:`\gamma_t` becomes
      known in the backward sweep: fitting never writes :math:`\gamma`.

    The slots of the call's groups are overwritten (the sums of a group
    start from zero).

    ``method`` ``SCALED`` runs the scaled recursions
    (:func:`_forward_scaled`, :func:`_backward_scaled`) on shifted
    probabilities :math:`b_t(j) = e^{L_t(j) - \ell_t}`, ``emission``, with
    offsets :math:`\ell_t`. A sequence whose recursion leaves the range gets
    ``status[s] = REDO``, ``loglik[s]`` NaN and adds nothing, for the caller
    to recompute with ``LOG``, the log-space recursions
    (:func:`_forward_log`, :func:`_backward_log`) on the log-densities
    :math:`L_t(j)`, ``emission``: with ``strict`` (``implementation='log'``)
    when a normaliser :math:`c_t` is not above :math:`K\,2^{-960}` or not
    finite, and for either when :math:`\hat\beta` overflows (the group's
    sums are then taken again without that sequence: exact, and rare).
    Without ``strict`` a normaliser of 0 means probability zero, as in
    hmmlearn's 'scaling'. A sequence the model cannot produce (``loglik``
    -inf) gets NaN posteriors and adds nothing.

    Parameters
    ----------
    group_first, group_last : int
        The range of groups of this call.
    group_bounds : ndarray (G + 1,) int64
        First sequence of each group (and the number of sequences).
    seq_bounds : ndarray (S + 1,) int64
        First row of each sequence (and the number of rows).
    emission : ndarray (T', K)
        :math:`b_t(j)` (``SCALED``) or :math:`L_t(j)` (``LOG``) of row ``t`` in
        ``emission[t - emission_base]``: the call's rows (a group's, when its
        emissions are computed just before) or all of them.
    offsets : ndarray (T',)
        :math:`\ell_t` (``SCALED``; unused by ``LOG``), indexed as ``emission``.
    emission_base : int
    log_startprob : ndarray (K,), log_transmat : ndarray (K, K)
    method, mode : int
    strict : bool
    X : ndarray (T, D), shift : ndarray (K, D)
        The rows and the shift of the emission statistics (``STATISTICS``).
    loglik : ndarray (S,), out
    status : ndarray (S,) int64, out
    gamma : ndarray (T, K), out (``POSTERIORS``; else unused)
    xi_parts : ndarray (G, K, K), out
    start_parts : ndarray (G, K), out
    nk_parts : ndarray (G, K), sx_parts : ndarray (G, K, D), sxx_parts : ndarray (G, K, D, W)
        Out (``STATISTICS``; else unused).
    """
    n_states = log_startprob.shape[0]
    n_features = shift.shape[1]
    posteriors = mode == POSTERIORS
    stats = mode == STATISTICS
    scaled = method == SCALED
    width = sxx_parts.shape[3]
    full = width > 1
    floor = n_states * _STRICT_FLOOR if strict else 0.0
    A = np.empty((n_states, n_states))
    AT = np.empty((n_states, n_states))
    pi = np.empty(n_states)
    for i in range(n_states):
        pi[i] = math.exp(log_startprob[i])
        for j in range(n_states):
            A[i, j] = math.exp(log_transmat[i, j])
            AT[j, i] = A[i, j]
    longest = 0
    for s in range(group_bounds[group_first], group_bounds[group_last]):
        longest = max(longest, seq_bounds[s + 1] - seq_bounds[s])
    # The forward lattice: the posteriors' own rows, else one sequence's scratch.
    lattice = gamma if posteriors else np.empty((longest, n_states))
    inv_c = np.empty(longest if scaled else 0)
    beta = np.empty(n_states)
    v = np.empty(n_states)
    ea = np.empty(n_states)
    ev = np.empty(n_states)
    w = np.empty(n_states)
    acc = np.empty((n_states, n_states))
    # Blocks of rows of the backward sweep and the lanes of their sums
    # (fewer lanes when the sums are large, to stay in cache).
    lanes = LANES if n_states * (n_states + n_features * (width + 1)) <= 4096 else 8
    betaT = np.empty((n_states, lanes))
    wT = np.empty((n_states, lanes))
    aT = np.empty((n_states, lanes))
    gT = np.empty((n_states, lanes))
    scale = np.empty(lanes)
    lane_xi = np.empty((n_states, n_states, lanes if scaled else 0))
    stat_lanes = lanes if stats else 0
    xT = np.empty((n_features, stat_lanes))
    dx = np.empty((n_features, stat_lanes))
    gd = np.empty((n_features, stat_lanes))
    lane_nk = np.empty((n_states, stat_lanes))
    lane_sx = np.empty((n_states, n_features, stat_lanes))
    lane_sxx = np.empty((n_states, n_features, width, stat_lanes))
    for g in range(group_first, group_last):
        for s in range(group_bounds[g], group_bounds[g + 1]):
            status[s] = DONE
        # A group is redone without a sequence whose backward sweep failed
        # (its part is in the lanes already): rare, and exact.
        again = True
        while again:
            again = False
            if mode != FORWARD:
                xi_parts[g] = 0.0
                start_parts[g] = 0.0
                lane_xi[:] = 0.0
            if stats:
                lane_nk[:] = 0.0
                lane_sx[:] = 0.0
                lane_sxx[:] = 0.0
            start = start_parts[g]
            for s in range(group_bounds[g], group_bounds[g + 1]):
                if status[s] == REDO:
                    continue
                first = seq_bounds[s]
                last = seq_bounds[s + 1]
                base = 0 if posteriors else first
                if scaled:
                    ll = _forward_scaled(emission, offsets, emission_base, first, last, pi, AT,
                                         floor, lattice, base, inv_c)
                    if ll != ll:
                        if strict:
                            status[s] = REDO
                            loglik[s] = np.nan
                            continue
                        ll = -np.inf  # hmmlearn's 'scaling': probability zero
                else:
                    ll = _forward_log(emission, emission_base, first, last, log_startprob, AT,
                                      lattice, base, ea)
                loglik[s] = ll
                if mode == FORWARD:
                    continue
                if not (ll > -np.inf and ll < np.inf):
                    if posteriors:
                        for t in range(first, last):
                            for i in range(n_states):
                                gamma[t, i] = np.nan
                    continue
                if scaled:
                    if not _backward_scaled(emission, emission_base, first, last, A, lattice,
                                            base, inv_c, beta,
                                            w, betaT, wT, aT, gT, scale, lane_xi, start,
                                            posteriors, stats, X, shift, full, xT, dx, gd,
                                            lane_nk, lane_sx, lane_sxx):
                        status[s] = REDO
                        loglik[s] = np.nan
                        again = True
                        break
                else:
                    acc[:] = 0.0
                    _backward_log(emission, emission_base, first, last, ll, A, log_transmat,
                                  lattice, base, beta, v, ea, ev, w, acc)
                    xi = xi_parts[g]
                    for i in range(n_states):
                        start[i] += lattice[first - base, i]
                        for j in range(n_states):
                            xi[i, j] += acc[i, j]
                    if stats:
                        _emission_from_lattice(X, first, last, lattice, base, gT, shift, full,
                                               xT, dx, gd, lane_nk, lane_sx, lane_sxx)
        if mode != FORWARD and scaled:
            xi = xi_parts[g]
            for i in range(n_states):
                for j in range(n_states):
                    xi[i, j] = A[i, j] * _lane_sum(lane_xi[i, j])
        if stats:
            _reduce_lanes(lane_nk, lane_sx, lane_sxx, full, nk_parts[g], sx_parts[g],
                          sxx_parts[g])


@njit(nogil=True, cache=True, error_model="numpy")
def viterbi(group_first, group_last, group_bounds, seq_bounds, log_emission, log_startprob,
            log_transmat, path, best_logprob):
    r"""Most probable state path of every sequence of groups ``[group_first, group_last)``.

    .. math::

        \delta_0(j) = \log\pi_j + L_0(j),\qquad
        \delta_t(j) = L_t(j) + \max_i\big(\delta_{t-1}(i) + \log A_{ij}\big),

    with the arg-max (the first of equal values, as hmmlearn) kept for the
    trace back from :math:`\arg\max_j \delta_{T-1}(j)`. Writes the states into
    ``path`` (T,) and :math:`\max_j \delta_{T-1}(j)` into ``best_logprob[s]``.
    """
    n_states = log_startprob.shape[0]
    longest = 0
    for s in range(group_bounds[group_first], group_bounds[group_last]):
        longest = max(longest, seq_bounds[s + 1] - seq_bounds[s])
    back = np.zeros((longest, n_states), dtype=np.int64)
    delta = np.empty(n_states)
    previous = np.empty(n_states)
    for s in range(group_bounds[group_first], group_bounds[group_last]):
        first = seq_bounds[s]
        last = seq_bounds[s + 1]
        for j in range(n_states):
            delta[j] = log_startprob[j] + log_emission[first, j]
        for t in range(first + 1, last):
            for j in range(n_states):
                previous[j] = delta[j]
            for j in range(n_states):
                best = -np.inf
                arg = 0
                for i in range(n_states):
                    value = previous[i] + log_transmat[i, j]
                    if value > best:
                        best = value
                        arg = i
                back[t - first, j] = arg
                delta[j] = best + log_emission[t, j]
        best = -np.inf
        state = 0
        for j in range(n_states):
            if delta[j] > best:
                best = delta[j]
                state = j
        best_logprob[s] = best
        path[last - 1] = state
        for t in range(last - 1, first, -1):
            state = back[t - first, state]
            path[t - 1] = state
