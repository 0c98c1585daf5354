"""Calm and volatile regimes of the S&P 500 with a 2-state Gaussian HMM.

2783 daily returns in per cent (R's ``MASS::SP500``, shipped in ``fastem/data``;
its largest move, -22.8 % on day 1804, has the size of the crash of 19 October 1987)
are fitted by Baum–Welch; the Viterbi path marks each day calm or volatile,
and the picture colours the series by it. Run::

    python examples/sp500_regimes.py [PICTURE]      # default: sp500-regimes.png
"""

from __future__ import annotations

import sys
from importlib import resources

import numpy as np

from fastem import GaussianHMM


def sp500_returns() -> np.ndarray:
    """The 2783 daily returns, in per cent, as an (n, 1) array."""
    with resources.files("fastem").joinpath("data/sp500.csv").open() as handle:
        return 100.0 * np.loadtxt(handle, delimiter=",", skiprows=1)[:, None]


def fit_regimes(returns: np.ndarray) -> tuple[GaussianHMM, np.ndarray]:
    """The 2-state model (calm state first) and each day's decoded state."""
    model = GaussianHMM(n_components=2, covariance_type="diag", n_iter=500, tol=1e-6,
                        n_init=5, random_state=0).fit(returns)
    return model, model.predict(returns)


def main(argv: list[str]) -> int:
    picture = argv[0] if argv else "sp500-regimes.png"
    returns = sp500_returns()
    model, states = fit_regimes(returns)
    variances = model.covars_[:, 0, 0]
    calm, volatile = np.argsort(variances)
    print(f"calm state:     sd {np.sqrt(variances[calm]):.2f} %, stays with probability "
          f"{model.transmat_[calm, calm]:.4f}, {np.mean(states == calm):.1%} of days")
    print(f"volatile state: sd {np.sqrt(variances[volatile]):.2f} %, stays with probability "
          f"{model.transmat_[volatile, volatile]:.4f}, {np.mean(states == volatile):.1%} of days")
    try:
        from fastem.plotting import plot_states, save_figure
    except ImportError:  # matplotlib is the [plot] extra
        return 0
    ax = plot_states(model, returns)
    ax.set_ylabel("daily return [%]")
    ax.set_title("S&P 500 daily returns: decoded regimes")
    print(f"wrote {save_figure(ax, picture)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
