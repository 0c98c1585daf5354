"""Input validation at the estimator boundary (scikit-learn's style and messages)."""

from __future__ import annotations

import numpy as np
from sklearn.utils.validation import check_array


def check_sample_weight(sample_weight, n_samples):
    r"""None, or finite, non-negative float64 weights of length ``n_samples``,
    rescaled to average 1 over the rows of positive weight.

    Weights are relative: multiplying them all by a constant changes no fit,
    criterion or degeneracy decision. With :math:`n_+` rows of positive
    weight, the weights become :math:`w_n n_+ / \sum_m w_m`, so a weighted
    data set counts as :math:`n_+` observations (BIC's :math:`n`), and weights
    of 1 are left exactly as they are.
    """
    if sample_weight is None:
        return None
    sw = check_array(sample_weight, ensure_2d=False, dtype=np.float64, input_name="sample_weight")
    if sw.ndim != 1 or sw.shape[0] != n_samples:
        raise ValueError(
            f"sample_weight.shape == {sw.shape}, expected ({n_samples},)"
        )
    if np.any(sw < 0):
        raise ValueError("sample_weight must be non-negative")
    largest = sw.max() if sw.size else 0.0
    if not largest > 0:
        raise ValueError("sample_weight has only zero weights: at least one must be positive")
    # By the largest first, so that neither the sum nor the factor overflows.
    sw = sw / largest
    return np.ascontiguousarray(sw * (np.count_nonzero(sw) / sw.sum()))


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
        # scikit-learn's message word for word, its order of min and max included.
        raise ValueError(
            "The parameter 'weights' should be in the range [0, 1], but got max value "
            f"{weights.min():.5f}, min value {weights.max():.5f}"
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
    check_positive_definite(precisions[None] if covariance_type == "tied" else precisions,
                            covariance_type)
    return precisions


def check_positive_definite(stack, covariance_type):
    """Each matrix of ``stack`` symmetric positive definite (scikit-learn's message)."""
    for matrix in stack:
        if not (np.allclose(matrix, matrix.T) and np.all(np.linalg.eigvalsh(matrix) > 0.0)):
            raise ValueError(
                f"'{covariance_type} precision' should be symmetric, positive-definite"
            )
