"""Plots of model selection, fitted mixtures and EM convergence.

matplotlib is an optional dependency (``pip install fastem[plot]``); it is
imported only when a function here is called. The plots are drawn on
``matplotlib.figure.Figure`` objects created without ``pyplot``, so they work
headless and leave pyplot's global state alone; pass ``ax`` to draw into an
existing figure instead, and use :func:`save_figure` (or ``Figure.savefig``) to
write the result.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["plot_convergence", "plot_criterion", "plot_mixture", "plot_states", "plot_weights",
           "save_figure"]

# Fixed order so that each covariance type keeps its colour from plot to plot.
_COVARIANCE_ORDER = ("full", "tied", "diag", "spherical")


def _new_axes(ax: Axes | None) -> Axes:
    """Return ``ax``, or the axes of a new pyplot-free figure.

    Every plotting function calls this first, so a missing matplotlib is
    reported with the install hint before any other matplotlib import fails.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(
            "fastem's plotting functions need matplotlib: pip install fastem[plot]"
        ) from exc
    if ax is not None:
        return ax
    return Figure(figsize=(6.4, 4.8), layout="constrained").add_subplot()


def plot_criterion(
    table: np.ndarray | Mapping[str, Sequence],
    criterion: str = "bic",
    chosen: tuple[int, str] | None = None,
    ax: Axes | None = None,
) -> Axes:
    """Plot an information criterion against the number of components.

    Draws one line per covariance type and marks the chosen model with a star
    and an annotation. Lower values are better (scikit-learn's convention,
    e.g. ``BIC = -2 log L + p log n``).

    Parameters
    ----------
    table : structured ndarray or mapping of str to sequence
        One row per fitted cell, with at least the fields ``n_components``
        (int), ``covariance_type`` (str) and ``criterion`` (float). A NaN
        value marks a failed or degenerate cell, which is left out; a
        covariance type with no finite value gets no line.
    criterion : str, default="bic"
        The field to plot, usually ``"bic"``, ``"aic"`` or ``"icl"``.
    chosen : (int, str), optional
        The ``(n_components, covariance_type)`` cell to mark. By default the
        cell with the lowest finite value of ``criterion``.
    ax : matplotlib.axes.Axes, optional
        Axes to draw into; by default a new figure is created.

    Returns
    -------
    ax : matplotlib.axes.Axes
        The axes drawn into.

    Raises
    ------
    ValueError
        If a field is missing, no cell has a finite value, or ``chosen`` is not
        a cell of the table with a finite value.
    """
    ax = _new_axes(ax)
    from matplotlib.ticker import MaxNLocator

    n_components = np.asarray(_field(table, "n_components"), dtype=np.int64)
    covariance_type = np.asarray(_field(table, "covariance_type"), dtype=str)
    values = np.asarray(_field(table, criterion), dtype=np.float64)
    finite = np.isfinite(values)
    if not finite.any():
        raise ValueError(f"no cell has a finite {criterion!r} value")

    present = sorted(
        set(covariance_type[finite]),
        key=lambda t: (
            _COVARIANCE_ORDER.index(t)
            if t in _COVARIANCE_ORDER
            else len(_COVARIANCE_ORDER),
            t,
        ),
    )
    for cov_type in present:
        rows = np.flatnonzero(finite & (covariance_type == cov_type))
        rows = rows[np.argsort(n_components[rows], kind="stable")]
        ax.plot(n_components[rows], values[rows], marker="o", label=cov_type)

    if chosen is None:
        best = np.flatnonzero(finite)[np.argmin(values[finite])]
        chosen = (int(n_components[best]), str(covariance_type[best]))
    k, cov_type = chosen
    match = np.flatnonzero(finite & (n_components == k) & (covariance_type == cov_type))
    if match.size == 0:
        raise ValueError(
            f"chosen cell {chosen!r} has no finite {criterion!r} value in the table"
        )
    y = values[match[0]]
    ax.scatter(
        [k],
        [y],
        marker="*",
        s=300,
        color="gold",
        edgecolor="black",
        zorder=3,
        label="chosen",
    )
    ax.annotate(
        f"K={k}, {cov_type}",
        xy=(k, y),
        xytext=(8, 8),
        textcoords="offset points",
    )

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("number of components K")
    ax.set_ylabel(f"{criterion.upper()} (lower is better)")
    ax.legend(title="covariance_type")
    return ax


def _field(table, name: str):
    try:
        return table[name]
    except (KeyError, ValueError):
        raise ValueError(f"the table has no field {name!r}") from None


def plot_mixture(
    model,
    X: np.ndarray,
    ax: Axes | None = None,
    columns: tuple[int, int] | None = None,
    n_std: Sequence[float] = (1, 2, 3),
    min_weight: float = 0.0,
) -> Axes:
    """Plot data with a fitted Gaussian mixture over it.

    With two or more features the points are drawn coloured by
    ``model.predict(X)``, each component gets an ellipse for every entry of
    ``n_std``, and the means are marked with crosses. With one feature a
    density-normalised histogram is drawn with the mixture density and each
    component's weighted density ``w_k N(x | mu_k, sigma_k^2)``.

    Parameters
    ----------
    model : fitted fastem.GaussianMixture or fastem.BayesianGaussianMixture
        Any covariance type: ``covariances_`` is read as ``(K, D, D)`` for
        ``"full"``, one shared ``(D, D)`` for ``"tied"``, ``(K, D)`` variances
        for ``"diag"`` and ``(K,)`` variances for ``"spherical"``.
    X : array-like of shape (n_samples, n_features)
        The data to draw; a 1-D array is read as one feature.
    ax : matplotlib.axes.Axes, optional
        Axes to draw into; by default a new figure is created.
    columns : (int, int), optional
        With two or more features, the two features to plot; the ellipses are
        then drawn from the 2x2 marginal covariances, the sub-blocks of those
        two features. By default two features are plotted as they are, and
        more than two are projected onto the first two principal axes of
        ``X``: with ``W`` the 2xD matrix of those axes, the points and means
        are mapped by ``z = W (x - mean(X))`` and the covariances by
        ``W Sigma W^T``, which is the covariance of the projected component.
    n_std : sequence of float, default=(1, 2, 3)
        The ellipses drawn per component, in standard deviations.
    min_weight : float, default=0.0
        Components of smaller weight get no ellipse or mean marker (a
        ``BayesianGaussianMixture`` leaves the components the data do not
        use with weights near zero; 0.01 hides them).

    Returns
    -------
    ax : matplotlib.axes.Axes
        The axes drawn into.

    Notes
    -----
    The ``n``-sigma ellipse of a 2-D Gaussian with mean ``m`` and covariance
    ``S`` is the contour ``(z - m)^T S^{-1} (z - m) = n^2``. Writing
    ``S = V diag(l1, l2) V^T`` (eigendecomposition, ``l1 >= l2``), it is
    centred on ``m`` with semi-axes ``n sqrt(l1)`` along the eigenvector
    ``v1`` and ``n sqrt(l2)`` along ``v2``. It is drawn as a
    ``matplotlib.patches.Ellipse`` of width ``2 n sqrt(l1)``, height
    ``2 n sqrt(l2)``, rotated by the angle of ``v1`` to the x-axis.
    """
    ax = _new_axes(ax)
    from matplotlib.patches import Ellipse

    X = np.asarray(X, dtype=np.float64)
    if X.ndim == 1:
        X = X[:, np.newaxis]
    labels = model.predict(X)
    means = np.asarray(model.means_, dtype=np.float64)
    weights = np.asarray(model.weights_, dtype=np.float64)
    covariances = _full_covariances(
        model.covariance_type, model.covariances_, *means.shape
    )
    colors = _component_colors(len(weights))
    feature_names = _feature_names(model, X.shape[1])

    if X.shape[1] == 1:
        if columns is not None:
            raise ValueError(
                "columns can only be chosen for data with two or more features"
            )
        _plot_densities(ax, X[:, 0], weights, means[:, 0], covariances[:, 0, 0], colors)
        ax.set_xlabel(feature_names[0])
        ax.set_ylabel("density")
        ax.legend()
        return ax

    projection, offset, axis_labels = _projection(X, columns, feature_names)
    points = (X - offset) @ projection.T
    centres = (means - offset) @ projection.T
    projected_covariances = projection @ covariances @ projection.T

    ax.scatter(
        points[:, 0], points[:, 1], c=colors[labels], s=10, alpha=0.6, label="data"
    )
    shown = np.flatnonzero(weights >= min_weight)
    for k in shown:
        eigenvalues, eigenvectors = np.linalg.eigh(projected_covariances[k])
        # eigh sorts ascending, so the last eigenvector is the major axis;
        # rounding can leave a tiny negative eigenvalue on a singular block.
        major, minor = np.sqrt(np.clip(eigenvalues[::-1], 0.0, None))
        angle = np.degrees(np.arctan2(eigenvectors[1, -1], eigenvectors[0, -1]))
        for n in n_std:
            ax.add_patch(
                Ellipse(
                    xy=centres[k],
                    width=2 * n * major,
                    height=2 * n * minor,
                    angle=angle,
                    facecolor="none",
                    edgecolor=colors[k],
                    linewidth=1.5,
                )
            )
    ax.scatter(
        centres[shown, 0],
        centres[shown, 1],
        c=colors[shown],
        marker="X",
        s=120,
        edgecolor="black",
        zorder=3,
        label="means",
    )
    ax.autoscale_view()
    ax.set_xlabel(axis_labels[0])
    ax.set_ylabel(axis_labels[1])
    return ax


def _full_covariances(
    covariance_type: str, covariances: np.ndarray, n_components: int, n_features: int
) -> np.ndarray:
    """Return the ``(K, D, D)`` covariance matrices of any covariance type."""
    covariances = np.asarray(covariances, dtype=np.float64)
    eye = np.eye(n_features)
    if covariance_type == "full":
        return covariances
    if covariance_type == "tied":
        return np.broadcast_to(covariances, (n_components, n_features, n_features))
    if covariance_type == "diag":
        return covariances[:, :, np.newaxis] * eye
    if covariance_type == "spherical":
        return covariances[:, np.newaxis, np.newaxis] * eye
    raise ValueError(f"unknown covariance_type {covariance_type!r}")


def _component_colors(n_components: int) -> np.ndarray:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return np.array([cmap(k % cmap.N) for k in range(n_components)])


def _feature_names(model, n_features: int) -> list[str]:
    names = getattr(model, "feature_names_in_", None)
    if names is None:
        return [f"x{j}" for j in range(n_features)]
    return [str(name) for name in names]


def _projection(
    X: np.ndarray, columns: tuple[int, int] | None, feature_names: list[str]
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Return the 2xD projection, the offset subtracted first, and axis labels."""
    n_features = X.shape[1]
    if columns is None and n_features == 2:
        columns = (0, 1)
    if columns is not None:
        i, j = (int(c) for c in columns)
        if i == j or not (0 <= i < n_features and 0 <= j < n_features):
            raise ValueError(
                f"columns must be two different indices below {n_features}, got {columns!r}"
            )
        return (
            np.eye(n_features)[[i, j]],
            np.zeros(n_features),
            [
                feature_names[i],
                feature_names[j],
            ],
        )

    centre = X.mean(axis=0)
    _, singular_values, vt = np.linalg.svd(X - centre, full_matrices=False)
    explained = singular_values**2 / np.sum(singular_values**2)
    labels = [f"PC{a + 1} ({100 * explained[a]:.0f}% of variance)" for a in range(2)]
    return vt[:2], centre, labels


def _plot_densities(
    ax: Axes,
    x: np.ndarray,
    weights: np.ndarray,
    means: np.ndarray,
    variances: np.ndarray,
    colors: np.ndarray,
) -> None:
    """Draw a histogram of ``x``, the mixture density and each weighted component."""
    ax.hist(x, bins="auto", density=True, color="0.8", edgecolor="0.6", label="data")
    margin = 0.1 * (x.max() - x.min()) + 3 * np.sqrt(variances.max())
    grid = np.linspace(x.min() - margin, x.max() + margin, 512)
    components = (
        weights[:, np.newaxis]
        * np.exp(-0.5 * (grid - means[:, np.newaxis]) ** 2 / variances[:, np.newaxis])
        / np.sqrt(2 * np.pi * variances[:, np.newaxis])
    )
    ax.plot(grid, components.sum(axis=0), color="black", linewidth=2, label="mixture")
    for k, density in enumerate(components):
        ax.plot(grid, density, color=colors[k], linestyle="--", label=f"component {k}")


def plot_convergence(
    lower_bounds: Sequence[Sequence[float]] | Sequence[float], ax: Axes | None = None
) -> Axes:
    """Plot the lower bound against the EM iteration, one line per restart.

    Parameters
    ----------
    lower_bounds : sequence of 1-D sequences of float, or 1-D sequence of float
        For each restart, the lower bound after each iteration. A flat
        sequence of numbers, such as a fitted model's ``lower_bounds_``, is
        drawn as a single restart.
    ax : matplotlib.axes.Axes, optional
        Axes to draw into; by default a new figure is created.

    Returns
    -------
    ax : matplotlib.axes.Axes
        The axes drawn into; iterations are numbered from 1 on the x-axis.
    """
    ax = _new_axes(ax)
    from matplotlib.ticker import MaxNLocator

    if len(lower_bounds) > 0 and np.ndim(lower_bounds[0]) == 0:
        lower_bounds = [lower_bounds]
    for restart, bounds in enumerate(lower_bounds):
        bounds = np.asarray(bounds, dtype=np.float64).ravel()
        iterations = np.arange(1, bounds.size + 1)
        ax.plot(iterations, bounds, marker=".", label=f"restart {restart + 1}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("iteration")
    ax.set_ylabel("lower bound")
    # Past ten restarts the legend hides more than it tells.
    if 0 < len(lower_bounds) <= 10:
        ax.legend()
    return ax


def plot_weights(model, ax: Axes | None = None, threshold: float = 0.01) -> Axes:
    """Bar chart of a fitted mixture's weights, largest first.

    For a ``BayesianGaussianMixture`` this shows how many components the data
    use: the bars above ``threshold`` (drawn as a dashed line) are the
    :meth:`~fastem.BayesianGaussianMixture.effective_n_components`.

    Parameters
    ----------
    model : fitted fastem.GaussianMixture or fastem.BayesianGaussianMixture
    ax : matplotlib.axes.Axes, optional
    threshold : float, default=0.01

    Returns
    -------
    ax : matplotlib.axes.Axes
    """
    ax = _new_axes(ax)
    weights = np.asarray(model.weights_, dtype=np.float64)
    order = np.argsort(-weights, kind="stable")
    colors = _component_colors(len(weights))
    ax.bar(np.arange(len(weights)), weights[order], color=colors[order])
    ax.set_xticks(np.arange(len(weights)), [str(k) for k in order])
    ax.axhline(threshold, color="black", linestyle="--", linewidth=1,
               label=f"{int(np.count_nonzero(weights >= threshold))} above {threshold:g}")
    ax.set_xlabel("component")
    ax.set_ylabel("weight")
    ax.legend()
    return ax


def plot_states(model, X, lengths=None, ax: Axes | None = None, column: int = 0) -> Axes:
    """A series with each observation coloured by its decoded hidden state.

    The states are ``model.predict(X, lengths)`` (a fitted
    :class:`fastem.GaussianHMM`: Viterbi by default). The series
    ``X[:, column]`` is drawn as a thin grey line and its points in the
    colour of their state; sequences given by ``lengths`` follow each other
    on the x-axis.

    Parameters
    ----------
    model : fitted fastem.GaussianHMM
    X : array-like of shape (n_samples, n_features) or (n_samples,)
    lengths : array-like of int, optional
    ax : matplotlib.axes.Axes, optional
    column : int, default=0
        The feature drawn.

    Returns
    -------
    ax : matplotlib.axes.Axes
    """
    ax = _new_axes(ax)
    X = np.asarray(X, dtype=np.float64)
    if X.ndim == 1:
        X = X[:, np.newaxis]
    if not 0 <= column < X.shape[1]:
        raise ValueError(f"column must be in [0, {X.shape[1]}), got {column}")
    states = np.asarray(model.predict(X, lengths))
    n_states = int(model.n_components)
    colors = _component_colors(n_states)
    t = np.arange(X.shape[0])
    ax.plot(t, X[:, column], color="0.7", linewidth=0.5, zorder=1)
    for k in range(n_states):
        chosen = states == k
        ax.scatter(t[chosen], X[chosen, column], color=colors[k], s=6, zorder=2,
                   label=f"state {k} ({np.count_nonzero(chosen)} points)")
    ax.set_xlabel("observation")
    ax.set_ylabel(_feature_names(model, X.shape[1])[column])
    ax.legend(markerscale=2)
    return ax


def save_figure(
    fig_or_ax: Figure | Axes, path: str | os.PathLike, dpi: float = 150
) -> Path:
    """Save the figure of a plot to a file.

    Parameters
    ----------
    fig_or_ax : matplotlib.figure.Figure or matplotlib.axes.Axes
        The figure, or any axes on it (what the ``plot_*`` functions return).
    path : str or os.PathLike
        Destination; the format follows the extension (``.png``, ``.pdf``,
        ``.svg``, ...).
    dpi : float, default=150
        Resolution for raster formats.

    Returns
    -------
    path : pathlib.Path
        The path written.
    """
    from matplotlib.figure import Figure

    figure = fig_or_ax
    # An Axes' figure may be a SubFigure, whose own .figure is the root Figure.
    while not isinstance(figure, Figure):
        figure = figure.figure
    path = Path(path)
    figure.savefig(path, dpi=dpi, bbox_inches="tight")
    return path
