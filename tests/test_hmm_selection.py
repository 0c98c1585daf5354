"""select_n_states: the number of states of a GaussianHMM chosen by BIC or AIC."""

import numpy as np
import pytest

from fastem import GaussianHMM
from fastem.hmm import select_n_states

LENGTHS = [500, 700]


@pytest.fixture(scope="module")
def three_regimes():
    """Two sequences that visit three well-separated regimes in long stretches."""
    rng = np.random.default_rng(11)
    pieces = []
    for level in (0, 4, 0, -4, 4, 0, -4, 0):
        pieces.append(rng.normal(loc=level, scale=1.0, size=(150, 2)))
    return np.vstack(pieces)


def test_bic_finds_three_regimes_and_its_table_is_each_models_criteria(three_regimes):
    X = three_regimes
    params = dict(covariance_type="diag", n_iter=100, tol=1e-6, n_init=2, random_state=0)
    found = select_n_states(X, LENGTHS, range(1, 6), **params)
    assert found.best.n_components == 3
    assert [row["n_components"] for row in found.table] == [1, 2, 3, 4, 5]
    best_bic = min(row["bic"] for row in found.table)
    assert found.table[2]["bic"] == best_bic
    # The kept model is the fit a user would make by hand, and its row holds its criteria.
    alone = GaussianHMM(n_components=3, **params).fit(X, LENGTHS)
    np.testing.assert_array_equal(found.best.means_, alone.means_)
    assert found.table[2]["bic"] == pytest.approx(alone.bic(X, LENGTHS), rel=1e-12)
    assert found.table[2]["aic"] == pytest.approx(alone.aic(X, LENGTHS), rel=1e-12)
    assert found.table[2]["log_likelihood"] == pytest.approx(alone.score(X, LENGTHS),
                                                             rel=1e-12)


def test_aic_never_chooses_fewer_states_than_bic(three_regimes):
    # AIC's penalty per parameter (2) is below BIC's (log N = 7.1 here).
    X = three_regimes
    params = dict(n_iter=50, random_state=0)
    by_bic = select_n_states(X, LENGTHS, [1, 2, 3, 4], **params)
    by_aic = select_n_states(X, LENGTHS, [1, 2, 3, 4], criterion="aic", **params)
    assert by_aic.best.n_components >= by_bic.best.n_components
    assert by_aic.criterion == "aic"
    assert by_aic.best.n_components == min(
        by_aic.table, key=lambda row: row["aic"])["n_components"]


@pytest.mark.parametrize("kwargs, message", [
    ({"criterion": "icl"}, "criterion must be 'bic' or 'aic'"),
    ({"n_components": [0, 2]}, "numbers of states >= 1"),
    ({"n_components": []}, "numbers of states >= 1"),
    ({"n_components": [2, 5000]}, "up to 5000 states but X has only 1200 rows"),
])
def test_bad_requests_are_refused(three_regimes, kwargs, message):
    with pytest.raises(ValueError, match=message):
        select_n_states(three_regimes, LENGTHS, **kwargs)
