"""MAP EM under a conjugate prior (fastem.priors): closed forms, the prior's
density against scipy.stats, monotone log posterior, degenerate data, model
files, streamed data, model selection, and R mclust's priorControl()."""

from __future__ import annotations

import shutil
import subprocess
import warnings

import numpy as np
import pytest
from conftest import COVARIANCE_TYPES, make_mixture
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scipy import stats as sps

from fastem import DegenerateDataWarning, GaussianMixture, GaussianPrior, load
from fastem.priors import log_prior_density
from fastem.selection import select_model


def _fit(X, **params):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sample_weight = params.pop("sample_weight", None)
        return GaussianMixture(**params).fit(X, sample_weight=sample_weight)


@pytest.fixture(scope="module")
def data():
    return make_mixture(n_samples=400, n_features=3, n_components=3, seed=11)


def _mclust_default(X, K, covariance_type):
    """mclust's defaultPrior, written out independently."""
    n, d = X.shape
    S = np.cov(X, rowvar=False)  # denominator n - 1, as R's var
    factor = (1.0 / K) ** (2.0 / d)
    scale = factor * S if covariance_type in ("full", "tied") else factor * np.trace(S) / d
    return X.mean(axis=0), 0.01, d + 2.0, scale


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_default_prior_is_mclusts(data, covariance_type):
    model = _fit(data, n_components=3, covariance_type=covariance_type, prior="default",
                 max_iter=1)
    mean, shrinkage, dof, scale = _mclust_default(data, 3, covariance_type)
    np.testing.assert_allclose(model.prior_.mean, mean, rtol=1e-14)
    assert model.prior_.shrinkage == shrinkage and model.prior_.dof == dof
    np.testing.assert_allclose(model.prior_.scale, scale, rtol=1e-13)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_one_component_map_is_the_closed_form_posterior_mode(data, covariance_type):
    prior = GaussianPrior(mean=[0.5, -1.0, 2.0], shrinkage=3.0, dof=6.5,
                          scale={"full": np.diag([2.0, 1.0, 0.5]) + 0.3,
                                 "tied": np.diag([2.0, 1.0, 0.5]) + 0.3,
                                 "diag": [2.0, 1.0, 0.5], "spherical": 1.5}[covariance_type])
    model = _fit(data, n_components=1, covariance_type=covariance_type, prior=prior,
                 reg_covar=0.0, tol=0.0, max_iter=3)
    n, d = data.shape
    ybar = data.mean(axis=0)
    W = (data - ybar).T @ (data - ybar)
    mu_p, kappa, nu = np.array(prior.mean), prior.shrinkage, prior.dof
    mean = (n * ybar + kappa * mu_p) / (n + kappa)
    B = np.asarray(prior.scale) + {"full": W, "tied": W, "diag": np.diag(W),
                                   "spherical": np.trace(W)}[covariance_type]
    offset = ybar - mu_p
    shrunk = kappa * n / (n + kappa)
    if covariance_type in ("full", "tied"):
        cov = (B + shrunk * np.outer(offset, offset)) / (nu + n + d + 2)
    elif covariance_type == "diag":
        cov = (B + shrunk * offset**2) / (nu + n + 3)
    else:
        cov = (B + shrunk * offset @ offset) / (nu + (n + 1) * d + 2)
    np.testing.assert_allclose(model.means_[0], mean, rtol=1e-12)
    fitted = model.covariances_ if covariance_type == "tied" else model.covariances_[0]
    np.testing.assert_allclose(fitted, cov, rtol=1e-12)


def _log_posterior(X, mean, cov, prior, covariance_type):
    """log L + log prior of one component, by scipy.stats (independent of fastem)."""
    d = X.shape[1]
    full = np.diag(np.broadcast_to(cov, (d,))) if np.ndim(cov) < 2 else cov
    value = sps.multivariate_normal(mean, full).logpdf(X).sum()
    kappa, nu = prior.shrinkage, prior.dof
    value += sps.multivariate_normal(prior.mean, full / kappa).logpdf(mean)
    if covariance_type == "full":
        value += sps.invwishart(df=nu, scale=np.asarray(prior.scale)).logpdf(cov)
    else:
        scale = np.broadcast_to(prior.scale, np.shape(cov))
        value += np.sum(sps.invgamma(a=nu / 2, scale=scale / 2).logpdf(cov))
    return value


@pytest.mark.parametrize("covariance_type", ["full", "diag", "spherical"])
def test_the_prior_density_is_scipys_and_the_map_estimate_is_its_mode(data, covariance_type):
    prior = GaussianPrior(mean=[0.5, -1.0, 2.0], shrinkage=2.0, dof=5.5,
                          scale={"full": np.diag([2.0, 1.0, 0.5]) + 0.3,
                                 "diag": [2.0, 1.0, 0.5], "spherical": 1.5}[covariance_type])
    model = _fit(data, n_components=1, covariance_type=covariance_type, prior=prior,
                 reg_covar=0.0, tol=0.0, max_iter=3)
    mean = model.means_[0]
    cov = model.covariances_[0]
    params = model._current_parameters()
    expected = _log_posterior(data, mean, cov, prior, covariance_type) - sps.multivariate_normal(
        mean, np.diag(np.broadcast_to(cov, (3,))) if np.ndim(cov) < 2 else cov
    ).logpdf(data).sum()
    assert log_prior_density(model.prior_, params, covariance_type) == pytest.approx(
        expected, rel=1e-12)
    best = _log_posterior(data, mean, cov, prior, covariance_type)
    rng = np.random.default_rng(0)
    for _ in range(20):
        step = 1e-3 * rng.normal(size=mean.shape)
        factor = np.exp(1e-3 * rng.normal())
        assert _log_posterior(data, mean + step, cov * factor, prior, covariance_type) < best


@settings(max_examples=12, deadline=None)
@given(covariance_type=st.sampled_from(COVARIANCE_TYPES), seed=st.integers(0, 2**16),
       n_components=st.integers(2, 4), shrinkage=st.sampled_from([0.0, 0.01, 1.0]))
def test_the_log_posterior_never_decreases(covariance_type, seed, n_components, shrinkage):
    X = make_mixture(n_samples=150, n_features=2, n_components=3, seed=seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = GaussianMixture(n_components, covariance_type=covariance_type,
                                prior=GaussianPrior(shrinkage=shrinkage), reg_covar=0.0,
                                tol=0.0, max_iter=60, random_state=seed,
                                init_params="random").fit(X)
    # A re-seeded component is a repair, not an EM step: EM's guarantee is for EM steps.
    assume(not any(issubclass(w.category, DegenerateDataWarning) for w in caught))
    bounds = np.array(model.lower_bounds_)
    assert np.all(np.isfinite(bounds))
    # At the fixed point the objective only moves by the rounding of its sum.
    assert np.all(np.diff(bounds) >= -1e-10 * np.abs(bounds[1:]))


# Not 'tied': one covariance pooled over every component does not collapse on ties.
@pytest.mark.parametrize("covariance_type", ["full", "diag", "spherical"])
def test_tied_data_degenerate_under_ml_but_not_under_the_prior(covariance_type):
    rng = np.random.default_rng(3)
    # Exact ties: 5 distinct points, repeated, and a few spread ones.
    X = np.vstack([np.repeat(rng.normal(size=(5, 2)) * 4, 40, axis=0),
                   rng.normal(size=(10, 2))])
    start = dict(n_components=5, covariance_type=covariance_type, reg_covar=0.0,
                 random_state=0, max_iter=200)
    # Maximum likelihood collapses onto the ties: scikit-learn's error with reg_covar=0.
    with pytest.raises(ValueError, match="ill-defined empirical covariance"):
        GaussianMixture(**start).fit(X)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the MAP fit needs no repair
        map_fit = GaussianMixture(prior="default", **start).fit(X)
    cov = map_fit.covariances_
    smallest = (np.linalg.eigvalsh(cov).min() if covariance_type in ("full", "tied")
                else cov.min())
    assert np.all(np.isfinite(cov)) and smallest > 1e-3
    assert np.isfinite(map_fit.score(X))


def test_streamed_map_fit_equals_the_in_memory_one(data, tmp_path):
    np.save(tmp_path / "X.npy", data)
    mapped = np.load(tmp_path / "X.npy", mmap_mode="r")
    params = dict(n_components=3, prior="default", random_state=0, tol=1e-10, max_iter=50)
    expected, found = _fit(data, **params), _fit(mapped, **params)
    np.testing.assert_allclose(found.prior_.scale, expected.prior_.scale, rtol=1e-12)
    for name in ("weights_", "means_", "covariances_"):
        np.testing.assert_allclose(getattr(found, name), getattr(expected, name), rtol=1e-9)


def test_rescaled_extreme_data_fit_as_the_scaled_model(data):
    params = dict(n_components=2, covariance_type="full", prior="default", random_state=0,
                  reg_covar=0.0, tol=1e-12, max_iter=100)
    plain = _fit(data, **params)
    # Beyond 2**400, fitted rescaled (fastem.scaling); the covariances still fit float64.
    huge = _fit(data * 2.0**450, **params)
    np.testing.assert_allclose(huge.means_, plain.means_ * 2.0**450, rtol=1e-9)
    np.testing.assert_allclose(huge.covariances_, plain.covariances_ * 2.0**900, rtol=1e-9)
    np.testing.assert_allclose(huge.prior_.scale, plain.prior_.scale * 2.0**900, rtol=1e-12)


def test_select_model_fits_every_cell_under_the_prior(data):
    result = select_model(data, [1, 2, 3], ["full", "spherical"], prior="default", n_init=2,
                          random_state=0, reg_covar=0.0)
    model = result.best_model
    assert model.prior == "default" and model.prior_ is not None
    # The criteria are log-likelihoods at the MAP estimate, as in mclust.
    row = result.table[(result.table["n_components"] == model.n_components)
                       & (result.table["covariance_type"] == model.covariance_type)][0]
    assert row["bic"] == pytest.approx(model.bic(data), rel=1e-9)
    refit = _fit(data, **model.get_params())
    np.testing.assert_allclose(refit.means_, model.means_, rtol=1e-6)


@pytest.mark.parametrize("prior", ["default", GaussianPrior(shrinkage=0.5, dof=7.0,
                                                            scale=np.eye(3))])
def test_model_files_keep_the_prior(data, tmp_path, prior):
    model = _fit(data, n_components=2, prior=prior, random_state=0)
    model.save(tmp_path / "m.npz")
    loaded = load(tmp_path / "m.npz")
    assert repr(loaded.prior) == repr(model.prior) or loaded.prior == model.prior
    for name in ("mean", "shrinkage", "dof", "scale"):
        np.testing.assert_array_equal(getattr(loaded.prior_, name), getattr(model.prior_, name))
    np.testing.assert_array_equal(loaded.predict_proba(data), model.predict_proba(data))


@pytest.mark.parametrize("bad, match", [
    (GaussianPrior(shrinkage=-1.0), "shrinkage"),
    (GaussianPrior(dof=1.0), "dof"),
    (GaussianPrior(mean=[1.0, 2.0]), "mean"),
    (GaussianPrior(scale=np.ones((3, 3))), "scale"),
    ("flat", "prior"),
])
def test_bad_priors_are_clear_errors(data, bad, match):
    with pytest.raises(ValueError, match=match):
        GaussianMixture(2, prior=bad).fit(data)


def test_partial_fit_weighs_the_prior_against_every_row_seen(data):
    from fastem.priors import MaximumPosterior
    from fastem.sources import InMemorySource

    model = GaussianMixture(2, prior="default", random_state=0)
    for start in range(0, 400, 50):
        model.partial_fit(data[start:start + 50])
    assert model._seen == 400
    # A step of size 1 (t = 1, t0 = 0, kappa = 1) on all 400 rows once more:
    # the MAP M-step of their statistics, weighed as the 800 rows seen.
    model.set_params(learning_offset=0.0, learning_decay=1.0)
    model._steps = 1
    params = model._current_parameters()
    model.partial_fit(data)
    stats = InMemorySource(data, None, "full").statistics(params)
    expected, _ = MaximumPosterior("full", model.reg_covar, model.prior_)(stats.scaled(2.0))
    np.testing.assert_allclose(model.means_, expected.means, rtol=1e-12)
    np.testing.assert_allclose(model.covariances_, expected.covariances, rtol=1e-12)


# ---------------------------------------------------------------------------
# R mclust (Debian's r-cran-mclust), optional
# ---------------------------------------------------------------------------

_MCLUST_MODELS = {"full": "VVV", "tied": "EEE", "diag": "VVI", "spherical": "VII"}

_MCLUST_SCRIPT = """
options(digits = 17)
suppressPackageStartupMessages(library(mclust))
X <- as.matrix(read.csv("X.csv", header = FALSE))
z0 <- as.matrix(read.csv("z0.csv", header = FALSE))
out <- list()
for (m in c("VVV", "EEE", "VVI", "VII")) {
  first <- mstep(X, modelName = m, z = z0, prior = priorControl())
  fit <- me(X, modelName = m, z = z0, prior = priorControl(),
            control = emControl(tol = c(1e-13, 1e-13), itmax = c(100000L, 100000L)))
  out[[m]] <- list(first_pro = first$parameters$pro, first_mean = c(first$parameters$mean),
                   first_sigma = c(first$parameters$variance$sigma),
                   pro = fit$parameters$pro, mean = c(fit$parameters$mean),
                   sigma = c(fit$parameters$variance$sigma), loglik = fit$loglik)
}
for (m in names(out)) for (f in names(out[[m]]))
  cat(m, f, format(out[[m]][[f]], digits = 17), "\\n")
"""


@pytest.fixture(scope="module")
def mclust_fits(tmp_path_factory):
    if shutil.which("Rscript") is None:
        pytest.skip("Rscript is not installed (Debian's r-cran-mclust)")
    folder = tmp_path_factory.mktemp("mclust")
    X = make_mixture(n_samples=300, n_features=3, n_components=3, seed=2)
    labels = GaussianMixture(3, random_state=0, max_iter=0).fit(X).predict(X)
    z0 = np.eye(3)[labels]
    np.savetxt(folder / "X.csv", X, delimiter=",", fmt="%.17g")
    np.savetxt(folder / "z0.csv", z0, delimiter=",", fmt="%.17g")
    run = subprocess.run(["Rscript", "-e", _MCLUST_SCRIPT], cwd=folder, capture_output=True,
                         text=True, timeout=300)
    if run.returncode != 0 and "mclust" in run.stderr:
        pytest.skip(f"R mclust is not available: {run.stderr.strip()[-200:]}")
    assert run.returncode == 0, run.stderr
    fits: dict = {}
    for line in run.stdout.splitlines():
        model, field, *values = line.split()
        fits.setdefault(model, {})[field] = np.array([float(v) for v in values])
    return X, fits


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_same_map_fit_as_mclust_from_its_first_m_step(mclust_fits, covariance_type):
    X, fits = mclust_fits
    fit = fits[_MCLUST_MODELS[covariance_type]]
    K, d = 3, X.shape[1]

    def covariances(flat):
        sigma = flat.reshape(K, d, d).transpose(0, 2, 1)  # R's column-major d x d x K
        return {"full": sigma, "tied": sigma[0], "diag": np.diagonal(sigma, axis1=1, axis2=2),
                "spherical": sigma[:, 0, 0]}[covariance_type]

    first = covariances(fit["first_sigma"])
    precisions = (np.linalg.inv(first) if covariance_type in ("full", "tied") else 1.0 / first)
    model = _fit(X, n_components=K, covariance_type=covariance_type, prior="default",
                 reg_covar=0.0, tol=1e-14, max_iter=100_000,
                 weights_init=fit["first_pro"], means_init=fit["first_mean"].reshape(K, d),
                 precisions_init=precisions)
    np.testing.assert_allclose(model.weights_, fit["pro"], rtol=1e-6)
    np.testing.assert_allclose(model.means_, fit["mean"].reshape(K, d), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(model.covariances_, covariances(fit["sigma"]), rtol=1e-6,
                               atol=1e-9)
    assert model.score(X) * X.shape[0] == pytest.approx(float(fit["loglik"][0]), rel=1e-9)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_the_default_prior_of_singular_data_is_proper(covariance_type):
    rng = np.random.default_rng(0)
    # A constant column: the data's covariance is singular.
    X = np.column_stack([rng.normal(size=(600, 2)), np.ones(600)])
    X[:300, 0] += 5
    model = _fit(X, n_components=2, covariance_type=covariance_type, prior="default",
                 random_state=0, max_iter=200)
    assert model.converged_ and np.isfinite(model.lower_bound_)
    scale = np.atleast_2d(model.prior_.scale)
    assert np.all(np.linalg.eigvalsh(scale) > 0)


def test_dof_and_mean_rules_follow_the_distributions(data):
    # An inverse-gamma needs dof > 0 only; an inverse-Wishart dof > D - 1.
    _fit(data, n_components=1, covariance_type="diag", prior=GaussianPrior(dof=0.5))
    with pytest.raises(ValueError, match="> 2"):
        _fit(data, n_components=1, covariance_type="full", prior=GaussianPrior(dof=0.5))
    with pytest.raises(ValueError, match="shrinkage > 0"):
        _fit(data, n_components=1, prior=GaussianPrior(mean=[0.0, 0.0, 0.0], shrinkage=0.0))
