"""Everything that depends on the covariance type, in one place.

A Gaussian mixture's covariances come in scikit-learn's four forms:

============  =====================  ==================================
type          ``covariances_`` shape  free covariance parameters
============  =====================  ==================================
'full'        (K, D, D)              :math:`K D(D+1)/2`
'tied'        (D, D)                 :math:`D(D+1)/2`
'diag'        (K, D)                 :math:`K D`
'spherical'   (K,)                   :math:`K`
============  =====================  ==================================

The kernels hold all four in one *canonical* 3-D form (:func:`to_canonical`):
(K, D, D), (1, D, D), (K, D, 1) and (K, 1, 1). Precisions are stored as their
upper Cholesky factors :math:`U` with :math:`\\Lambda = \\Sigma^{-1} = U U^T`
(for 'diag' and 'spherical': :math:`1/\\sigma`), so no inverse is ever formed.
"""

from __future__ import annotations

import numpy as np

COVARIANCE_TYPES = ("full", "tied", "diag", "spherical")
# The kernels' code for each covariance type (see m_step_canonical).
COVARIANCE_KIND = {"full": 0, "tied": 1, "diag": 2, "spherical": 3}


def uses_full_scatter(covariance_type: str) -> bool:
    """'full' and 'tied' need the full scatter matrix; 'diag' and 'spherical' its diagonal."""
    return covariance_type in ("full", "tied")


def covariance_shape(covariance_type: str, n_components: int, n_features: int) -> tuple:
    """Shape of ``covariances_`` (and of ``precisions_`` and their factors)."""
    return {
        "full": (n_components, n_features, n_features),
        "tied": (n_features, n_features),
        "diag": (n_components, n_features),
        "spherical": (n_components,),
    }[covariance_type]


def n_free_parameters(n_components: int, n_features: int, covariance_type: str) -> int:
    r"""Number of free parameters of a Gaussian mixture.

    Means :math:`KD`, weights :math:`K-1`, and covariances
    :math:`K D(D+1)/2` (full), :math:`D(D+1)/2` (tied), :math:`KD` (diag) or
    :math:`K` (spherical).
    """
    cov = {
        "full": n_components * n_features * (n_features + 1) // 2,
        "tied": n_features * (n_features + 1) // 2,
        "diag": n_components * n_features,
        "spherical": n_components,
    }[covariance_type]
    return int(cov + n_components * n_features + n_components - 1)


def to_canonical(array, covariance_type: str) -> np.ndarray:
    """scikit-learn's covariance-shaped array as the kernels' 3-D form (float64)."""
    array = np.asarray(array, dtype=np.float64)
    if covariance_type == "full":
        return np.ascontiguousarray(array)
    if covariance_type == "tied":
        return np.ascontiguousarray(array[None])
    if covariance_type == "diag":
        return np.ascontiguousarray(array[:, :, None])
    return np.ascontiguousarray(array[:, None, None])


def from_canonical(array, covariance_type: str) -> np.ndarray:
    """The kernels' 3-D form of a covariance-shaped array in scikit-learn's shape."""
    if covariance_type == "full":
        return array
    if covariance_type == "tied":
        return array[0]
    if covariance_type == "diag":
        return array[:, :, 0]
    return array[:, 0, 0]


def precisions_from_cholesky(prec_chol, covariance_type: str) -> np.ndarray:
    r"""Precisions :math:`\Lambda = U U^T` from their upper Cholesky factors."""
    if covariance_type == "full":
        return np.einsum("kij,klj->kil", prec_chol, prec_chol)
    if covariance_type == "tied":
        return prec_chol @ prec_chol.T
    return prec_chol**2


def precision_cholesky_from_precisions(precisions, covariance_type: str) -> np.ndarray:
    r"""Upper factor :math:`U` with :math:`\Lambda = U U^T`.

    Reversing rows and columns turns the lower Cholesky factor of
    :math:`J\Lambda J` into the upper factor of :math:`\Lambda` (``J`` the
    exchange matrix), so no inverse is formed.
    """
    precisions = np.asarray(precisions, dtype=np.float64)
    if covariance_type in ("diag", "spherical"):
        return np.sqrt(precisions)
    stack = precisions[None] if covariance_type == "tied" else precisions
    out = np.stack([np.linalg.cholesky(m[::-1, ::-1])[::-1, ::-1] for m in stack])
    return out[0] if covariance_type == "tied" else out


def covariances_from_precision_cholesky(prec_chol, covariance_type: str) -> np.ndarray:
    r""":math:`\Sigma = (U U^T)^{-1}`, computed through the triangular factor."""
    prec_chol = np.asarray(prec_chol, dtype=np.float64)
    if covariance_type in ("diag", "spherical"):
        return 1.0 / prec_chol**2
    stack = prec_chol[None] if covariance_type == "tied" else prec_chol
    eye = np.eye(stack.shape[-1])
    out = []
    for U in stack:
        inv_u = np.linalg.solve(U, eye)  # U^{-1}; Sigma = U^{-T} U^{-1}
        out.append(inv_u.T @ inv_u)
    out = np.stack(out)
    return out[0] if covariance_type == "tied" else out


def precision_cholesky_of_covariance(covariance, covariance_type: str) -> np.ndarray:
    r"""Upper factor :math:`U` of :math:`\Sigma^{-1}` for one component's covariance
    (a (D, D) matrix, a (D,) diagonal or a variance)."""
    if covariance_type in ("diag", "spherical"):
        return 1.0 / np.sqrt(covariance)
    from ._kernels.mstep import factor_covariance

    covariance = np.array(covariance, dtype=np.float64)
    lower = np.empty_like(covariance)
    upper = np.empty_like(covariance)
    factor_covariance(covariance, lower, upper)
    return upper


def sample_components(rng, means, covariances, covariance_type: str, counts) -> np.ndarray:
    """``counts[k]`` draws from component k's Gaussian, stacked in component order."""
    n_features = means.shape[1]
    parts = []
    for k, (mean, count) in enumerate(zip(means, counts)):
        if covariance_type == "full":
            parts.append(rng.multivariate_normal(mean, covariances[k], int(count)))
        elif covariance_type == "tied":
            parts.append(rng.multivariate_normal(mean, covariances, int(count)))
        else:
            scale = np.sqrt(covariances[k])
            parts.append(mean + rng.standard_normal(size=(count, n_features)) * scale)
    return np.vstack(parts).astype(np.float64)
