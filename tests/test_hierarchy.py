"""The model-based hierarchical start: kernel against its NumPy twin, cuts, weights."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_mixture

from fastem import GaussianMixture, reference
from fastem._kernels.hierarchy import hierarchical_merges
from fastem.initialization import Hierarchy


# Unions of up to D / 2 rows are scored by their Gram matrix (from D = 8) and small
# clusters joining a larger one by a low-rank update (from D = 6): both occur at
# (60, 12), (50, 20) and (80, 30).
@pytest.mark.parametrize("shape", [(40, 1), (70, 2), (90, 4), (60, 12), (50, 20), (80, 30)])
def test_merge_sequence_matches_reference(shape):
    n, d = shape
    X = make_mixture(n, d, 3, seed=n)
    weights = np.random.default_rng(n).uniform(0.5, 3.0, n)
    merges, costs = hierarchical_merges(X, weights, 0.05)
    ref_merges, ref_costs = reference.hierarchical_merges(X, weights, 0.05)
    np.testing.assert_array_equal(merges, ref_merges)
    np.testing.assert_allclose(costs, ref_costs, rtol=1e-9, atol=1e-9)


def test_hierarchy_is_deterministic():
    X = make_mixture(300, 3, 3, seed=2)
    a = Hierarchy(X, None, np.random.RandomState(0))
    b = Hierarchy(X, None, np.random.RandomState(123))  # no subsampling: seed unused
    np.testing.assert_array_equal(a.merges, b.merges)


def test_integer_weight_equals_duplicated_rows():
    X = make_mixture(50, 2, 2, seed=3)
    counts = np.random.default_rng(1).integers(1, 4, 50)
    weighted = Hierarchy(X, counts.astype(float), np.random.RandomState(0))
    duplicated = Hierarchy(np.repeat(X, counts, axis=0), None, np.random.RandomState(0))
    owner = np.repeat(np.arange(50), counts)
    for k in (2, 3, 5):
        a = weighted.labels(k)
        b = duplicated.labels(k)
        # Same partition of the original rows (labels may be numbered differently).
        pairs = set(zip(a[owner], b))
        assert len(pairs) == k, (k, pairs)


@pytest.mark.parametrize("k", [1, 2, 4, 7])
def test_cut_gives_k_clusters_of_contiguous_labels(k):
    X = make_mixture(120, 2, 3, seed=4)
    labels = Hierarchy(X, None, np.random.RandomState(0)).labels(k)
    assert labels.shape == (120,)
    np.testing.assert_array_equal(np.unique(labels), np.arange(k))


def test_cuts_are_nested():
    X = make_mixture(150, 2, 3, seed=5)
    h = Hierarchy(X, None, np.random.RandomState(0))
    for k in range(2, 8):
        coarse, fine = h.labels(k - 1), h.labels(k)
        # Every cluster of the finer cut lies inside one cluster of the coarser.
        for c in range(k):
            assert np.unique(coarse[fine == c]).size == 1


def test_well_separated_clusters_are_recovered():
    rng = np.random.default_rng(6)
    centres = np.array([[0.0, 0.0], [20.0, 0.0], [0.0, 20.0]])
    truth = np.repeat(np.arange(3), 40)
    X = centres[truth] + rng.normal(size=(120, 2))
    labels = Hierarchy(X, None, np.random.RandomState(0)).labels(3)
    assert len(set(zip(labels, truth))) == 3


def test_large_data_uses_a_weighted_subset():
    X = make_mixture(3000, 2, 2, seed=7)
    h = Hierarchy(X, None, np.random.RandomState(0), max_rows=400)
    assert h.rows.shape == (400,) and np.unique(h.rows).size == 400
    zero = np.ones(3000)
    zero[:2500] = 0.0  # only the last 500 rows can be drawn
    h = Hierarchy(X, zero, np.random.RandomState(0), max_rows=400)
    assert h.rows.min() >= 2500


def test_hierarchical_init_in_the_estimator():
    X = make_mixture(400, 2, 3, seed=8, separation=6.0)
    a = GaussianMixture(3, init_params="hierarchical", random_state=0).fit(X)
    b = GaussianMixture(3, init_params="hierarchical", random_state=1).fit(X)
    np.testing.assert_array_equal(a.means_, b.means_)  # deterministic for N <= 1000
    ref = GaussianMixture(3, n_init=5, random_state=0).fit(X)
    assert a.lower_bound_ >= ref.lower_bound_ - 1e-3
