"""fastem: fast EM for latent-variable models.

``from fastem import GaussianMixture, BayesianGaussianMixture`` are drop-ins
for scikit-learn's classes.
"""

from .bayesian_mixture import BayesianGaussianMixture
from .compilation import compile_kernels as compile
from .hmm import GaussianHMM
from .mixture import DegenerateDataWarning, GaussianMixture
from .priors import GaussianPrior
from .selection import select_model

__version__ = "0.1.0"

__all__ = ["BayesianGaussianMixture", "DegenerateDataWarning", "GaussianHMM", "GaussianMixture",
           "GaussianPrior", "__version__", "compile", "load", "select_model"]


def load(path):
    """Load a model saved with ``save`` (no pickle involved)."""
    from .io import load_model

    return load_model(path)
