r"""Hidden Markov model kernels: forward–backward and Viterbi over sequences.

The data are ``T`` rows holding several sequences back to back (row offsets
``seq_bounds``); the per-state emission log-densities
:math:`L_t(j) = \log p(x_t \mid z_t = j)` come in as a (T, K) matrix (from
the mixture's pass, see :func:`fastem.hmm.emission_log_densities`).

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

from ._blocks import helper


@helper
def _row_max(values, t):
    """Largest entry of row ``t`` (-inf for an empty or all -inf row; NaN skipped)."""
    best = -np.inf
    for j in range(values.shape[1]):
        if values[t, j] > best:
            best = values[t, j]
    return best


@helper
def _forward_log(L, first, last, log_pi, AT, alpha, ea):
    r"""Log forward lattice of rows ``[first, last)`` into ``alpha``; returns :math:`\log p(x)`.

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
        alpha[first, j] = log_pi[j] + L[first, j]
    for t in range(first + 1, last):
        m = _row_max(alpha, t - 1)
        if m == -np.inf:
            for j in range(n_states):
                alpha[t, j] = -np.inf
            continue
        for i in range(n_states):
            ea[i] = math.exp(alpha[t - 1, i] - m)
        for j in range(n_states):
            s = 0.0
            for i in range(n_states):
                s += ea[i] * AT[j, i]
            alpha[t, j] = L[t, j] + (m + math.log(s))
    m = _row_max(alpha, last - 1)
    if m == -np.inf:
        return -np.inf
    s = 0.0
    for j in range(n_states):
        s += math.exp(alpha[last - 1, j] - m)
    return m + math.log(s)


@helper
def _backward_log(L, first, last, loglik, A, log_A, alpha, beta, v, ea, ev, w, xi):
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
    underflows (transitions of probability below about :math:`e^{-700}`
    between the likely states) is taken in log space instead.
    """
    n_states = alpha.shape[1]
    t = last - 1
    m = _row_max(alpha, t)
    s = 0.0
    for i in range(n_states):
        ea[i] = math.exp(alpha[t, i] - m)
        s += ea[i]
    for i in range(n_states):
        alpha[t, i] = ea[i] / s
        beta[i] = 0.0
    for t in range(last - 2, first - 1, -1):
        for j in range(n_states):
            v[j] = L[t + 1, j] + beta[j]
        n = -np.inf
        for j in range(n_states):
            if v[j] > n:
                n = v[j]
        a = _row_max(alpha, t)
        for j in range(n_states):
            ev[j] = math.exp(v[j] - n)
        for i in range(n_states):
            ea[i] = math.exp(alpha[t, i] - a)
        z = 0.0
        for i in range(n_states):
            s = 0.0
            for j in range(n_states):
                s += A[i, j] * ev[j]
            w[i] = s
            z += ea[i] * s
        if z > 0.0 and z < np.inf:
            for i in range(n_states):
                c = ea[i] / z
                for j in range(n_states):
                    xi[i, j] += c * A[i, j] * ev[j]
            for i in range(n_states):
                beta[i] = n + math.log(w[i])
                alpha[t, i] = ea[i] * w[i] / z
        else:
            # Underflow of Z_t: xi and gamma from their logarithms.
            for i in range(n_states):
                beta[i] = n + math.log(w[i])
            g = -np.inf
            for i in range(n_states):
                ea[i] = alpha[t, i] + beta[i]
                if ea[i] > g:
                    g = ea[i]
            s = 0.0
            for i in range(n_states):
                s += math.exp(ea[i] - g)
            g += math.log(s)
            for i in range(n_states):
                for j in range(n_states):
                    xi[i, j] += math.exp(alpha[t, i] + log_A[i, j] + v[j] - loglik)
                alpha[t, i] = math.exp(ea[i] - g)


@helper
def _forward_scaling(L, first, last, pi, AT, alpha, scales):
    r"""Scaled forward lattice of rows ``[first, last)``; returns :math:`\log p(x)`.

    With :math:`\ell_t = \max_j L_t(j)` and :math:`b_t(j) = e^{L_t(j) - \ell_t}`:

    .. math::

        u_0 = \pi\circ b_0,\quad u_t = b_t \circ (A^T\hat\alpha_{t-1}),\quad
        c_t = \textstyle\sum_j u_t(j),\quad \hat\alpha_t = u_t / c_t,\quad
        \log p(x) = \textstyle\sum_t (\ell_t + \log c_t)

    (hmmlearn's ``implementation='scaling'``, with the emissions shifted by
    their row maximum so that no frame underflows). ``scales[t]`` keeps
    :math:`c_t`. Returns -inf when every state becomes impossible.
    """
    n_states = alpha.shape[1]
    loglik = 0.0
    for t in range(first, last):
        ell = _row_max(L, t)
        c = 0.0
        for j in range(n_states):
            if t == first:
                p = pi[j]
            else:
                p = 0.0
                for i in range(n_states):
                    p += alpha[t - 1, i] * AT[j, i]
            u = p * math.exp(L[t, j] - ell)
            alpha[t, j] = u
            c += u
        if not (c > 0.0 and c < np.inf):
            return -np.inf
        for j in range(n_states):
            alpha[t, j] /= c
        scales[t] = c
        loglik += ell + math.log(c)
    return loglik


@helper
def _backward_scaling(L, first, last, A, alpha, scales, beta, w, xi):
    r"""Posteriors of rows ``[first, last)`` (over their scaled forward lattice,
    in place) and the expected transitions, added to ``xi``.

    .. math::

        \hat\beta_{T-1} = 1,\quad
        w_j = b_{t+1}(j)\hat\beta_{t+1}(j),\quad
        \hat\beta_t = A w / c_{t+1},\quad
        \xi_t(i, j) = \hat\alpha_t(i) A_{ij} w_j / c_{t+1},\quad
        \gamma_t \propto \hat\alpha_t\circ\hat\beta_t

    (each frame of :math:`\gamma` normalised, as hmmlearn does).
    """
    n_states = alpha.shape[1]
    t = last - 1
    s = 0.0
    for i in range(n_states):
        beta[i] = 1.0
        s += alpha[t, i]
    for i in range(n_states):
        alpha[t, i] /= s
    for t in range(last - 2, first - 1, -1):
        ell = _row_max(L, t + 1)
        for j in range(n_states):
            w[j] = math.exp(L[t + 1, j] - ell) * beta[j]
        c = scales[t + 1]
        s = 0.0
        for i in range(n_states):
            a = alpha[t, i] / c
            r = 0.0
            for j in range(n_states):
                term = A[i, j] * w[j]
                r += term
                xi[i, j] += a * term
            beta[i] = r / c
            alpha[t, i] *= beta[i]
            s += alpha[t, i]
        for i in range(n_states):
            alpha[t, i] /= s


@njit(nogil=True, cache=True, error_model="numpy")
def forward_backward(group_first, group_last, group_bounds, seq_bounds, log_emission,
                     log_startprob, log_transmat, scaling, posteriors, loglik, gamma, scales,
                     xi_parts, start_parts):
    r"""Forward–backward over the sequences of groups ``[group_first, group_last)``.

    For every sequence ``s`` of group ``g`` (rows ``seq_bounds[s]`` to
    ``seq_bounds[s + 1]``):

    * ``loglik[s]`` :math:`= \log p(x^{(s)})`;
    * with ``posteriors``, ``gamma[t]`` :math:`= p(z_t \mid x^{(s)})` over
      the sequence's rows, ``start_parts[g]`` :math:`\mathrel{+}= \gamma_0`
      and ``xi_parts[g]`` :math:`\mathrel{+}= \sum_t \xi_t`, the expected
      transition counts :math:`\sum_t p(z_t = i, z_{t+1} = j \mid x^{(s)})`
      (both slots are zeroed first); without, ``gamma`` holds the forward
      lattice (log :math:`\alpha`, or :math:`\hat\alpha` when scaling).

    ``scaling`` selects the scaled recursion (:func:`_forward_scaling`), else
    the rescaled log-space one (:func:`_forward_log`); both are exact up to
    rounding. A sequence the model cannot produce (``loglik`` -inf) gets NaN
    posteriors and adds nothing.

    Parameters
    ----------
    group_first, group_last : int
        The range of groups of this call.
    group_bounds : ndarray (G + 1,) int64
        First sequence of each group (and the number of sequences).
    seq_bounds : ndarray (S + 1,) int64
        First row of each sequence (and the number of rows).
    log_emission : ndarray (T, K)
        :math:`L_t(j)`.
    log_startprob : ndarray (K,), log_transmat : ndarray (K, K)
    scaling, posteriors : bool
    loglik : ndarray (S,), out
    gamma : ndarray (T, K), out
    scales : ndarray (T,), scratch of the scaled recursion
    xi_parts : ndarray (G, K, K), out
    start_parts : ndarray (G, K), out
    """
    n_states = log_startprob.shape[0]
    A = np.empty((n_states, n_states))
    AT = np.empty((n_states, n_states))
    pi = np.empty(n_states)
    for i in range(n_states):
        pi[i] = math.exp(log_startprob[i])
        for j in range(n_states):
            A[i, j] = math.exp(log_transmat[i, j])
            AT[j, i] = A[i, j]
    beta = np.empty(n_states)
    v = np.empty(n_states)
    ea = np.empty(n_states)
    ev = np.empty(n_states)
    w = np.empty(n_states)
    for g in range(group_first, group_last):
        xi = xi_parts[g]
        start = start_parts[g]
        if posteriors:
            for i in range(n_states):
                start[i] = 0.0
                for j in range(n_states):
                    xi[i, j] = 0.0
        for s in range(group_bounds[g], group_bounds[g + 1]):
            first = seq_bounds[s]
            last = seq_bounds[s + 1]
            if scaling:
                ll = _forward_scaling(log_emission, first, last, pi, AT, gamma, scales)
            else:
                ll = _forward_log(log_emission, first, last, log_startprob, AT, gamma, ea)
            loglik[s] = ll
            if not posteriors:
                continue
            if not (ll > -np.inf and ll < np.inf):
                for t in range(first, last):
                    for i in range(n_states):
                        gamma[t, i] = np.nan
                continue
            if scaling:
                _backward_scaling(log_emission, first, last, A, gamma, scales, beta, w, xi)
            else:
                _backward_log(log_emission, first, last, ll, A, log_transmat, gamma, beta, v,
                              ea, ev, w, xi)
            for i in range(n_states):
                start[i] += gamma[first, i]


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
