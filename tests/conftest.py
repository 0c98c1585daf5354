"""Shared data generators for the test suite."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
COVARIANCE_TYPES = ("full", "tied", "diag", "spherical")


def make_mixture(n_samples=600, n_features=3, n_components=3, seed=0, separation=4.0,
                 dtype=np.float64):
    """Rows drawn from a random Gaussian mixture with correlated components."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=separation, size=(n_components, n_features))
    labels = rng.integers(n_components, size=n_samples)
    X = np.empty((n_samples, n_features))
    for k in range(n_components):
        A = rng.normal(size=(n_features, n_features)) * 0.6 + np.eye(n_features)
        rows = labels == k
        X[rows] = centres[k] + rng.normal(size=(rows.sum(), n_features)) @ A
    return X.astype(dtype)


def shared_csv(name, columns=None):
    """Load a data set from ../shared/data, skipping the test when it is absent."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} not available")
    with open(path) as f:
        header = f.readline().strip().split(",")
    usecols = None if columns is None else [header.index(c) for c in columns]
    return np.loadtxt(path, delimiter=",", skiprows=1, usecols=usecols)


def random_parameters(X, n_components, covariance_type, seed=0, reg_covar=1e-6):
    """Plausible initial parameters (random soft assignment, reference M-step)."""
    from fastem import reference

    rng = np.random.default_rng(seed)
    resp = rng.dirichlet(np.ones(n_components) * 0.5, size=X.shape[0])
    nk, means, cov = reference.estimate_parameters(X, resp, reg_covar, covariance_type)
    prec_chol = reference.precision_cholesky(cov, covariance_type)
    return nk / nk.sum(), means, cov, prec_chol


def precisions_from_cholesky(prec_chol, covariance_type):
    if covariance_type == "full":
        return np.einsum("kij,klj->kil", prec_chol, prec_chol)
    if covariance_type == "tied":
        return prec_chol @ prec_chol.T
    return prec_chol**2


@pytest.fixture
def mixture_data():
    return make_mixture()


@pytest.fixture(autouse=True)
def compiled_loop_at_once(monkeypatch):
    """Small fits run the compiled EM loop from their first iteration, as in a
    process that has already switched tiers (see fastem.sources.COMPILED_LOOP_AFTER),
    so that every test sees the same loop whatever ran before it.
    ``tests/test_engine.py`` checks the tier switch itself."""
    import fastem.sources

    monkeypatch.setattr(fastem.sources, "COMPILED_LOOP_AFTER", 0)
