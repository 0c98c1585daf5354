"""Input validation at the estimator boundary (scikit-learn's style and messages)."""

from __future__ import annotations

import numpy as np
from sklearn.utils.validation import check_array


def check_sample_weight(sample_weight, n_samples):
    """None, or a finite, non-negative float64 vector of length ``n_samples``."""
    if sample_weight is None:
        return None
    sw = check_array(sample_weight, ensure_2d=False, dtype=np.float64, input_name="sample_weight")
    if sw.ndim != 1 or sw.shape[0] != n_samples:
        raise ValueError(
            f"sample_weight.shape == {sw.shape}, expected ({n_samples},)"
        )
    if np.any(sw < 0):
        raise ValueError("sample_weight must be non-negative")
    if not sw.sum() > 0:
        raise ValueError("sample_weight has only zero weights: at least one must be positive")
    return np.ascontiguousarray(sw)


def _check_shape(param, shape, name):
    if param.shape != shape:
        raise ValueError(
            f"The parameter '{name}' should have the shape of {shape}, but got {param.shape}"
        )


def check_weights(weights, n_components):
    """Mixing proportions: shape (K,), in [0, 1], summing to one."""
    weights = check_array(weights, dtype=[np.float64, np.float32], ensure_2d=False,
                          input_name="weights_init")
    _check_shape(weights, (n_components,), "weights")
    if np.any(weights < 0.0) or np.any(weights > 1.0):
        raise ValueError(
            "The parameter 'weights' should be in the range [0, 1], but got max value "
            f"{weights.max():.5f}, min value {weights.min():.5f}"
        )
    if not np.allclose(abs(1.0 - weights.sum()), 0.0, atol=1e-6 if weights.dtype == np.float32
                       else 1e-8):
        raise ValueError(
            f"The parameter 'weights' should be normalized, but got sum(weights) = "
            f"{weights.sum():.5f}"
        )
    return weights


def check_means(means, n_components, n_features):
    """Component means: shape (K, D)."""
    means = check_array(means, dtype=[np.float64, np.float32], ensure_2d=False,
                        input_name="means_init")
    _check_shape(means, (n_components, n_features), "means")
    return means


def check_precisions(precisions, covariance_type, n_components, n_features):
    """User precisions: the right shape per covariance type, symmetric positive definite."""
    precisions = check_array(precisions, dtype=[np.float64, np.float32], ensure_2d=False,
                             allow_nd=covariance_type == "full", input_name="precisions_init")
    shapes = {
        "full": (n_components, n_features, n_features),
        "tied": (n_features, n_features),
        "diag": (n_components, n_features),
        "spherical": (n_components,),
    }
    _check_shape(precisions, shapes[covariance_type], f"{covariance_type} precision")
    if covariance_type in ("diag", "spherical"):
        if np.any(precisions <= 0.0):
            raise ValueError(f"'{covariance_type} precision' should be positive")
        return precisions
    stack = precisions[None] if covariance_type == "tied" else precisions
    for matrix in stack:
        if not (np.allclose(matrix, matrix.T) and np.all(np.linalg.eigvalsh(matrix) > 0.0)):
            raise ValueError(
                f"'{covariance_type} precision' should be symmetric, positive-definite"
            )
    return precisions


def precision_cholesky_from_precisions(precisions, covariance_type):
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


def precisions_from_cholesky(prec_chol, covariance_type):
    r"""Precisions :math:`\Lambda = U U^T` from their upper Cholesky factors."""
    if covariance_type == "full":
        return np.einsum("kij,klj->kil", prec_chol, prec_chol)
    if covariance_type == "tied":
        return prec_chol @ prec_chol.T
    return prec_chol**2


def covariances_from_precision_cholesky(prec_chol, covariance_type):
    r""":math:`\Sigma = (U U^T)^{-1}` computed through the triangular factor."""
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
