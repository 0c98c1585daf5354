"""Tests for fastem.plotting (skipped without matplotlib)."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

from matplotlib.patches import Ellipse

from fastem import BayesianGaussianMixture, GaussianHMM, GaussianMixture
from fastem.plotting import (
    plot_convergence,
    plot_criterion,
    plot_mixture,
    plot_states,
    plot_weights,
    save_figure,
)

COVARIANCE_TYPES = ["full", "tied", "diag", "spherical"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def blobs(n_features=2, n_per_blob=60, seed=0):
    """Three elongated, correlated clusters in ``n_features`` dimensions."""
    rng = np.random.default_rng(seed)
    parts = []
    for k in range(3):
        centre = 6.0 * rng.standard_normal(n_features)
        mixing = rng.standard_normal((n_features, n_features)) * (0.4 + 0.3 * k)
        parts.append(centre + rng.standard_normal((n_per_blob, n_features)) @ mixing)
    return np.vstack(parts)


def assert_png(ax, path):
    save_figure(ax, path)
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE), f"{path} is not a PNG"
    assert len(data) > 1000, f"{path} is only {len(data)} bytes"


def ellipses(ax):
    return [patch for patch in ax.patches if isinstance(patch, Ellipse)]


def collection(ax, label):
    (found,) = [c for c in ax.collections if c.get_label() == label]
    return found


def mahalanobis_on_boundary(ellipse, centre, covariance):
    """Squared Mahalanobis distances of points on an ellipse's boundary."""
    t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    unit_circle = np.column_stack([np.cos(t), np.sin(t)])
    # The patch transform maps the unit circle onto the ellipse in data units.
    boundary = ellipse.get_patch_transform().transform(unit_circle)
    diff = boundary - centre
    return np.einsum("ni,ij,nj->n", diff, np.linalg.inv(covariance), diff)


def full_covariances(model):
    """The (K, D, D) covariance matrices of a model of any covariance type."""
    cov = model.covariances_
    k, d = model.means_.shape
    if model.covariance_type == "full":
        return cov
    if model.covariance_type == "tied":
        return np.broadcast_to(cov, (k, d, d))
    if model.covariance_type == "diag":
        return np.array([np.diag(c) for c in cov])
    return cov[:, None, None] * np.eye(d)


# ---------------------------------------------------------------------------
# plot_mixture
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_mixture_2d_ellipses_match_covariances(tmp_path, covariance_type):
    X = blobs()
    model = GaussianMixture(3, covariance_type=covariance_type, random_state=0).fit(X)
    n_std = (1, 2, 3)
    ax = plot_mixture(model, X, n_std=n_std)

    drawn = ellipses(ax)
    assert len(drawn) == model.n_components * len(n_std)
    covariances = full_covariances(model)
    for ellipse in drawn:
        centre = np.asarray(ellipse.center)
        (k,) = np.flatnonzero(np.all(np.isclose(model.means_, centre), axis=1))
        distances = mahalanobis_on_boundary(ellipse, centre, covariances[k])
        n = np.sqrt(distances.mean())
        assert np.isclose(n, n_std).any(), f"{n=} not in {n_std}"
        np.testing.assert_allclose(distances, n**2, rtol=1e-9)

    means = collection(ax, "means")
    np.testing.assert_allclose(means.get_offsets(), model.means_)
    assert_png(ax, tmp_path / f"mixture_{covariance_type}.png")


def test_mixture_2d_points_coloured_by_predicted_label():
    X = blobs()
    model = GaussianMixture(3, random_state=0).fit(X)
    ax = plot_mixture(model, X)
    data = collection(ax, "data")
    np.testing.assert_array_equal(data.get_offsets(), X)
    colours = data.get_facecolors()
    labels = model.predict(X)
    for k in range(3):
        in_k = colours[labels == k]
        assert np.all(in_k == in_k[0]), f"component {k} has mixed colours"
    distinct = {tuple(colours[labels == k][0]) for k in range(3)}
    assert len(distinct) == 3


def test_bayesian_mixture_plots_only_the_components_it_uses(tmp_path):
    X = blobs()
    model = BayesianGaussianMixture(n_components=8, n_init=3, random_state=0).fit(X)
    used = np.flatnonzero(model.weights_ >= 0.01)
    assert 0 < used.size < 8
    ax = plot_mixture(model, X, n_std=(2,), min_weight=0.01)
    assert len(ellipses(ax)) == used.size
    np.testing.assert_allclose(collection(ax, "means").get_offsets(), model.means_[used])
    assert_png(ax, tmp_path / "bayesian.png")


def test_weights_bar_chart_sorted_with_the_effective_count():
    X = blobs()
    model = BayesianGaussianMixture(n_components=6, random_state=0).fit(X)
    ax = plot_weights(model, threshold=0.01)
    heights = [patch.get_height() for patch in ax.patches]
    np.testing.assert_allclose(heights, np.sort(model.weights_)[::-1])
    label = ax.get_legend().get_texts()[0].get_text()
    assert label.startswith(f"{model.effective_n_components(0.01)} above")


def test_states_plot_colours_each_point_by_its_decoded_state(tmp_path):
    rng = np.random.default_rng(0)
    X = np.concatenate([rng.normal(0, 1, 150), rng.normal(6, 1, 100), rng.normal(0, 1, 150)])
    model = GaussianHMM(n_components=2, n_iter=20, random_state=0).fit(X[:, None])
    ax = plot_states(model, X)
    states = model.predict(X[:, None])
    drawn = [c for c in ax.collections if c.get_label().startswith("state")]
    assert len(drawn) == 2
    for k, points in enumerate(drawn):
        np.testing.assert_array_equal(points.get_offsets()[:, 1], X[states == k])
    assert {len(c.get_offsets()) for c in drawn} == {100, 300}
    with pytest.raises(ValueError, match="column"):
        plot_states(model, X, column=1)
    assert_png(ax, tmp_path / "states.png")


def test_ellipse_size_for_diagonal_covariance():
    X = blobs()
    model = GaussianMixture(3, covariance_type="diag", random_state=0).fit(X)
    n_std = (1, 2.5)
    ax = plot_mixture(model, X, n_std=n_std)
    for index, ellipse in enumerate(ellipses(ax)):
        k, n = divmod(index, len(n_std))
        n = n_std[n]
        variances = model.covariances_[k]
        np.testing.assert_allclose(ellipse.center, model.means_[k])
        np.testing.assert_allclose(
            sorted([ellipse.width, ellipse.height]), sorted(2 * n * np.sqrt(variances))
        )
        # Axis-aligned: the half-extent along each axis is n standard deviations.
        theta = np.radians(ellipse.angle)
        half_x = np.hypot(
            ellipse.width / 2 * np.cos(theta), ellipse.height / 2 * np.sin(theta)
        )
        half_y = np.hypot(
            ellipse.width / 2 * np.sin(theta), ellipse.height / 2 * np.cos(theta)
        )
        np.testing.assert_allclose([half_x, half_y], n * np.sqrt(variances), rtol=1e-9)


def test_mixture_chosen_columns_use_marginal_blocks(tmp_path):
    X = blobs(n_features=4)
    model = GaussianMixture(3, covariance_type="full", random_state=0).fit(X)
    pair = [3, 1]
    ax = plot_mixture(model, X, columns=tuple(pair), n_std=(2,))

    np.testing.assert_allclose(collection(ax, "data").get_offsets(), X[:, pair])
    np.testing.assert_allclose(
        collection(ax, "means").get_offsets(), model.means_[:, pair]
    )
    drawn = ellipses(ax)
    assert len(drawn) == 3
    for k, ellipse in enumerate(drawn):
        block = model.covariances_[k][np.ix_(pair, pair)]
        distances = mahalanobis_on_boundary(ellipse, model.means_[k, pair], block)
        np.testing.assert_allclose(distances, 4.0, rtol=1e-9)
    assert ax.get_xlabel() == "x3" and ax.get_ylabel() == "x1"
    assert_png(ax, tmp_path / "columns.png")


def test_mixture_defaults_to_principal_axes(tmp_path):
    from sklearn.decomposition import PCA

    X = blobs(n_features=5)
    model = GaussianMixture(3, covariance_type="full", random_state=0).fit(X)
    ax = plot_mixture(model, X, n_std=(1,))

    # Recover the projection from the plotted points, then check it is the
    # top-two principal subspace (up to the sign of each axis).
    points = np.asarray(collection(ax, "data").get_offsets())
    centre = X.mean(axis=0)
    W = np.linalg.lstsq(X - centre, points, rcond=None)[0].T
    components = PCA(n_components=2).fit(X).components_
    np.testing.assert_allclose(np.abs(W @ components.T), np.eye(2), atol=1e-8)

    np.testing.assert_allclose(
        collection(ax, "means").get_offsets(), (model.means_ - centre) @ W.T, atol=1e-8
    )
    for k, ellipse in enumerate(ellipses(ax)):
        projected = W @ model.covariances_[k] @ W.T
        distances = mahalanobis_on_boundary(ellipse, ellipse.center, projected)
        np.testing.assert_allclose(distances, 1.0, rtol=1e-6)
    assert ax.get_xlabel().startswith("PC1")
    assert_png(ax, tmp_path / "pca.png")


@pytest.mark.parametrize("covariance_type", ["full", "spherical"])
def test_mixture_1d_density_lines(tmp_path, covariance_type):
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.normal(-2, 0.5, 120), rng.normal(3, 1.0, 80)])
    model = GaussianMixture(2, covariance_type=covariance_type, random_state=0)
    model.fit(x[:, None])
    ax = plot_mixture(model, x)

    lines = ax.get_lines()
    assert len(lines) == model.n_components + 1
    mixture, *components = lines
    grid = mixture.get_xdata()
    # The estimator's own log-density is the oracle for the mixture curve.
    np.testing.assert_allclose(
        mixture.get_ydata(), np.exp(model.score_samples(grid[:, None])), rtol=1e-7
    )
    total = np.sum([line.get_ydata() for line in components], axis=0)
    np.testing.assert_allclose(total, mixture.get_ydata(), rtol=1e-12)
    for k, line in enumerate(components):
        area = np.trapezoid(line.get_ydata(), line.get_xdata())
        np.testing.assert_allclose(area, model.weights_[k], rtol=1e-2)
    assert len(ellipses(ax)) == 0
    assert_png(ax, tmp_path / f"density_{covariance_type}.png")


def test_mixture_rejects_bad_columns():
    X = blobs(n_features=3)
    model = GaussianMixture(2, random_state=0).fit(X)
    with pytest.raises(ValueError, match="two different indices"):
        plot_mixture(model, X, columns=(1, 1))
    with pytest.raises(ValueError, match="two different indices"):
        plot_mixture(model, X, columns=(0, 3))


def test_mixture_draws_into_given_axes():
    from matplotlib.figure import Figure

    X = blobs()
    model = GaussianMixture(2, random_state=0).fit(X)
    ax = Figure().add_subplot()
    assert plot_mixture(model, X, ax=ax) is ax


# ---------------------------------------------------------------------------
# plot_criterion
# ---------------------------------------------------------------------------


def criterion_table():
    """A grid of made-up criterion values with some failed (NaN) cells."""
    ks = np.arange(1, 6)
    rows = []
    for offset, cov_type in [(0.0, "full"), (3.0, "diag"), (7.0, "spherical")]:
        for k in ks:
            bic = (k - 3.0) ** 2 + offset
            rows.append((k, cov_type, bic, bic - 1.0, bic + 2.0))
    table = np.array(
        rows,
        dtype=[
            ("n_components", "i8"),
            ("covariance_type", "U16"),
            ("bic", "f8"),
            ("aic", "f8"),
            ("icl", "f8"),
        ],
    )
    table["bic"][
        (table["covariance_type"] == "diag") & (table["n_components"] == 4)
    ] = np.nan
    return table


def test_criterion_one_line_per_covariance_type(tmp_path):
    table = criterion_table()
    ax = plot_criterion(table, criterion="bic", chosen=(3, "full"))
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {"full", "diag", "spherical"}
    for cov_type, line in lines.items():
        rows = table[(table["covariance_type"] == cov_type) & np.isfinite(table["bic"])]
        np.testing.assert_array_equal(line.get_xdata(), rows["n_components"])
        np.testing.assert_array_equal(line.get_ydata(), rows["bic"])
    # The NaN cell is left out of its line.
    assert 4 not in lines["diag"].get_xdata()
    assert_png(ax, tmp_path / "criterion.png")


def test_criterion_marks_chosen_cell():
    table = criterion_table()
    ax = plot_criterion(table, criterion="icl", chosen=(5, "spherical"))
    star = collection(ax, "chosen")
    row = table[
        (table["n_components"] == 5) & (table["covariance_type"] == "spherical")
    ]
    np.testing.assert_array_equal(star.get_offsets(), [[5, row["icl"][0]]])
    assert any("K=5, spherical" in text.get_text() for text in ax.texts)
    assert "ICL" in ax.get_ylabel()


def test_criterion_default_marks_lowest_cell():
    table = criterion_table()
    ax = plot_criterion(table, criterion="aic")
    best = table[np.argmin(table["aic"])]
    star = collection(ax, "chosen")
    np.testing.assert_array_equal(
        star.get_offsets(), [[best["n_components"], best["aic"]]]
    )


def test_criterion_accepts_dict_of_columns():
    table = criterion_table()
    columns = {name: table[name].tolist() for name in table.dtype.names}
    ax = plot_criterion(columns, chosen=(2, "diag"))
    assert len(ax.get_lines()) == 3
    np.testing.assert_array_equal(collection(ax, "chosen").get_offsets(), [[2, 4.0]])


def test_criterion_type_with_only_nan_gets_no_line():
    table = criterion_table()
    table["bic"][table["covariance_type"] == "spherical"] = np.nan
    ax = plot_criterion(table)
    assert {line.get_label() for line in ax.get_lines()} == {"full", "diag"}


def test_criterion_errors():
    table = criterion_table()
    with pytest.raises(ValueError, match="no finite 'bic' value"):
        plot_criterion(table, chosen=(4, "diag"))
    with pytest.raises(ValueError, match="no field 'nope'"):
        plot_criterion(table, criterion="nope")


# ---------------------------------------------------------------------------
# plot_convergence, save_figure, lazy import
# ---------------------------------------------------------------------------


def test_convergence_one_line_per_restart(tmp_path):
    runs = [[-3.0, -2.0, -1.5, -1.4], [-4.0, -2.5], np.array([-5.0, -1.0, -0.9])]
    ax = plot_convergence(runs)
    lines = ax.get_lines()
    assert len(lines) == len(runs)
    for line, run in zip(lines, runs):
        np.testing.assert_array_equal(line.get_xdata(), np.arange(1, len(run) + 1))
        np.testing.assert_array_equal(line.get_ydata(), run)
    assert_png(ax, tmp_path / "convergence.png")


def test_convergence_of_a_fitted_model():
    X = blobs()
    model = GaussianMixture(3, random_state=0).fit(X)
    ax = plot_convergence(model.lower_bounds_)
    (line,) = ax.get_lines()
    np.testing.assert_array_equal(line.get_ydata(), model.lower_bounds_)


def test_save_figure_accepts_figure_and_axes(tmp_path):
    ax = plot_convergence([[1.0, 2.0]])
    from_axes = save_figure(ax, tmp_path / "a.png")
    from_figure = save_figure(ax.figure, str(tmp_path / "b.pdf"))
    assert from_axes.read_bytes().startswith(PNG_SIGNATURE)
    assert from_figure.read_bytes().startswith(b"%PDF")


def test_missing_matplotlib_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"pip install fastem\[plot\]"):
        plot_convergence([[1.0, 2.0]])


def test_plotting_never_imports_pyplot(tmp_path):
    script = (
        "import sys\n"
        "import fastem.plotting as p\n"
        "assert 'matplotlib' not in sys.modules, 'matplotlib imported with the module'\n"
        f"p.save_figure(p.plot_convergence([[1.0, 2.0]]), {str(tmp_path / 'c.png')!r})\n"
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot was imported'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert result.returncode == 0, result.stderr
