"""fastem: fast EM for latent-variable models."""

__version__ = "0.1.0"
