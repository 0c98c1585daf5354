"""fastem: fast EM for latent-variable models.

``from fastem import GaussianMixture`` is a drop-in for scikit-learn's class.
"""

from . import io as _io
from .mixture import DegenerateDataWarning, GaussianMixture


# The Gaussian mixture's model-file format (fastem.io knows no estimator). The
# call and its shape hook belong with the class and will move to mixture.py.
def _gaussian_mixture_array_shapes(params, fitted):
    """Shapes of a saved GaussianMixture's arrays, for ``fastem.io``."""
    k, d = params["n_components"], fitted["n_features_in_"]
    if d < 1 or fitted["n_iter_"] < 0 or fitted["lower_bound_"] == float("inf"):
        raise ValueError(f"invalid fitted attributes n_features_in_={d}, "
                         f"n_iter_={fitted['n_iter_']}, lower_bound_={fitted['lower_bound_']}")
    covariance = {"full": (k, d, d), "tied": (d, d), "diag": (k, d), "spherical": (k,)}
    cov_shape = covariance[params["covariance_type"]]
    return {
        "weights_": (k,), "means_": (k, d), "covariances_": cov_shape,
        "precisions_": cov_shape, "precisions_cholesky_": cov_shape,
        "weights_init": (k,), "means_init": (k, d), "precisions_init": cov_shape,
    }


_io.register_model_format(_io.ModelFormat(
    name="fastem.GaussianMixture",
    # 2: every constructor parameter is stored (1 left out a RandomState random_state).
    version=2,
    estimator=GaussianMixture,
    fitted_arrays=("weights_", "means_", "covariances_", "precisions_",
                   "precisions_cholesky_"),
    fitted_lists=("lower_bounds_",),
    fitted_scalars={"converged_": bool, "n_iter_": int, "lower_bound_": float,
                    "n_features_in_": int},
    array_params=("weights_init", "means_init", "precisions_init"),
    array_shapes=_gaussian_mixture_array_shapes,
))

__version__ = "0.1.0"

__all__ = ["DegenerateDataWarning", "GaussianMixture", "__version__", "load"]


def load(path):
    """Load a model saved with ``GaussianMixture.save`` (no pickle involved)."""
    from .io import load_model

    return load_model(path)
