"""Fitting data whose squares leave the floating-point range, by a power-of-two rescaling.

EM's statistics are sums of squares: :math:`\\sum_n r_{nk}(x_n-\\mu_k)(x_n-\\mu_k)^T`
overflows float64 once coordinates reach about 1e154 (float32: 1e19), and
its per-block partial sums sooner, although the covariance itself may still
be representable. A Gaussian mixture is equivariant under scaling, so data
of extreme magnitude are fitted as :math:`sX` with :math:`s` a power of two,
chosen so that the largest coordinate is about :math:`2^{400}` (float32:
:math:`2^{40}`), and the fit is mapped back:

.. math::

    \\mu = \\mu_s / s,\\quad \\Sigma = \\Sigma_s / s^2,\\quad U = s\\,U_s,\\quad
    \\log p(x) = \\log p_s(s x) + D \\log s,

with ``reg_covar`` :math:`\\lambda` fitted as :math:`\\lambda s^2`. Multiplying
by a power of two is exact, so every step is the same arithmetic as on
:math:`X`, only shifted in exponent; data of ordinary magnitude get
:math:`s = 1` and are fitted exactly as they are.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from . import _threads
from .stats import GaussianParameters

# largest_magnitude's row ranges (NumPy releases the GIL in its reductions).
_EXTREMES_RANGES = 8
_EXTREMES_MIN_ROWS = 16_384

# Largest binary exponent of the coordinates fitted as they are (and, negated,
# the smallest), by dtype: squares and their block sums then stay in range.
_EXPONENT_LIMIT = {np.dtype(np.float64): 400, np.dtype(np.float32): 40}


def largest_magnitude(X) -> float:
    """:math:`\\max|X|` (0 for empty X), by NumPy's maximum and minimum over row
    ranges on the kernels' threads, with no N x D temporary: infinite when X
    holds an infinity, NaN when it holds a NaN (the reductions propagate it),
    so one call also tells whether X is finite."""
    if X.size == 0:
        return 0.0
    n_rows = X.shape[0]
    n_ranges = max(1, min(_EXTREMES_RANGES, n_rows // _EXTREMES_MIN_ROWS))
    extremes = np.empty((n_ranges, 2))

    def ranges(first, last):
        for r in range(first, last):
            part = X[r * n_rows // n_ranges:(r + 1) * n_rows // n_ranges]
            extremes[r] = part.max(), part.min()

    _threads.run_chunks(ranges, n_ranges, X.size)
    return max(abs(float(extremes[:, 0].max())), abs(float(extremes[:, 1].min())))


def power_of_two_scale(X, exponent_limit: int) -> float:
    """A power of two :math:`s` with :math:`\\max|s X|` about ``2**exponent_limit``
    when X's largest coordinate is beyond it (or about 1 when it is below
    ``2**-exponent_limit``); 1.0 otherwise. No N x D temporary."""
    return scale_for_largest(largest_magnitude(X), exponent_limit)


def scale_for_largest(largest: float, exponent_limit: int) -> float:
    """:func:`power_of_two_scale` given the data's largest absolute coordinate."""
    if largest == 0.0:
        return 1.0
    exponent = math.frexp(largest)[1]
    if exponent > exponent_limit:
        return math.ldexp(1.0, exponent_limit - exponent)
    if exponent < -exponent_limit:
        return math.ldexp(1.0, -exponent)
    return 1.0


@dataclasses.dataclass(frozen=True)
class DataScale:
    """The rescaling a fit of ``X`` runs at (``scale = 1``: none)."""

    scale: float = 1.0

    @classmethod
    def of(cls, X) -> DataScale:
        return cls(power_of_two_scale(X, _EXPONENT_LIMIT.get(X.dtype, 400)))

    @classmethod
    def of_largest(cls, largest: float, dtype) -> DataScale:
        """For data whose largest absolute coordinate is ``largest`` (streamed data)."""
        return cls(scale_for_largest(largest, _EXPONENT_LIMIT.get(np.dtype(dtype), 400)))

    @property
    def identity(self) -> bool:
        return self.scale == 1.0

    def data(self, X):
        """:math:`sX` (``X`` itself when there is no rescaling)."""
        return X if self.identity else X * X.dtype.type(self.scale)

    def reg_covar(self, reg_covar: float) -> float:
        return float(reg_covar) * self.scale**2

    def parameters_in(self, params: GaussianParameters) -> GaussianParameters:
        """Parameters of the original data as parameters of :math:`sX`."""
        return self._parameters(params, self.scale)

    def parameters_out(self, params: GaussianParameters, covariance_type: str
                       ) -> GaussianParameters:
        """Parameters fitted to :math:`sX` as parameters of the original data.

        Raises ValueError when a variance leaves the float64 range there
        (overflows, or underflows to 0).
        """
        if self.identity:
            return params
        out = self._parameters(params, 1.0 / self.scale)
        cov = np.asarray(out.covariances)
        if covariance_type == "full":
            variances = np.diagonal(cov, axis1=1, axis2=2)
        elif covariance_type == "tied":
            variances = np.diag(cov)
        else:
            variances = cov
        if not (np.all(np.isfinite(cov)) and np.all(variances > 0)):
            raise ValueError(
                "The fitted covariances are beyond the float64 range in the data's units "
                "(the data's spread is beyond about 1e154, or below about 1e-154). "
                "Rescale the data (for example, standardise each column).")
        return out

    def log_density_shift(self, n_features: int) -> float:
        """:math:`D\\log s`: added to log-densities of :math:`sX` to give those of X."""
        return n_features * math.log(self.scale)

    @staticmethod
    def _parameters(params: GaussianParameters, factor: float) -> GaussianParameters:
        if factor == 1.0:
            return params
        weights, means, cov, prec_chol = params
        return GaussianParameters(
            weights,
            None if means is None else np.asarray(means) * factor,
            None if cov is None else np.asarray(cov) * factor**2,
            None if prec_chol is None else np.asarray(prec_chol) / factor)
