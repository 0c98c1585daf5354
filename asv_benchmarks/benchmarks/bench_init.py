"""Greedy k-means++ seeding: fastem and :mod:`fastem.reference`."""

from __future__ import annotations

import math

import numpy as np

from fastem import reference
from fastem.initialization import kmeans_plusplus

from .common import Benchmark, dataset, grid, speedup

_AXES = ("n_samples", "n_features", "n_components")


def _reference_seeding(X, n_clusters):
    # Same amount of work as fastem's seeding: 2 + log K candidates per centre.
    rng = np.random.RandomState(0)
    first = rng.randint(X.shape[0])
    uniforms = rng.uniform(size=(n_clusters - 1, 2 + int(math.log(n_clusters))))
    reference.kmeans_plusplus(X, n_clusters, uniforms, first)


class KMeansPlusPlus(Benchmark):
    """:func:`fastem.initialization.kmeans_plusplus` with K = n_components centres."""

    param_names, params = grid(*_AXES)

    def setup(self, n_samples, n_features, n_components):
        self.X = dataset(n_samples, n_features, n_components)
        self.n_clusters = n_components
        # Compiles (or loads) the kernels, so that JIT stays out of every timing.
        self.seed()

    def seed(self):
        kmeans_plusplus(self.X, self.n_clusters, np.random.RandomState(0))

    def reference_seed(self):
        _reference_seeding(self.X, self.n_clusters)

    def time_kmeans_plusplus(self, *params):
        self.seed()

    def track_speedup_kmeans_plusplus(self, *params):
        return speedup(self.seed, self.reference_seed)

    track_speedup_kmeans_plusplus.unit = "x reference"


class ReferenceKMeansPlusPlus(Benchmark):
    """:func:`fastem.reference.kmeans_plusplus` on the same data."""

    param_names, params = grid(*_AXES)

    def setup(self, n_samples, n_features, n_components):
        self.X = dataset(n_samples, n_features, n_components)
        self.n_clusters = n_components

    def time_kmeans_plusplus(self, *params):
        _reference_seeding(self.X, self.n_clusters)
