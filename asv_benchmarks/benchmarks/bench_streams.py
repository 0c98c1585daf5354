"""Out-of-core, Dask and online EM: a memory-mapped fit and a Dask fit against the
in-memory one, and
one pass of ``partial_fit`` against a full fit."""

from __future__ import annotations

import os
import tempfile
import warnings

import numpy as np

from fastem import GaussianMixture

from .bench_em import _fastem_fit
from .common import FIT_ITERATIONS, Benchmark, dataset, grid, speedup, starting_point

_AXES = ("n_samples", "n_features", "n_components", "covariance_type")


class MemmapFit(Benchmark):
    """``FIT_ITERATIONS`` EM iterations on a memory-mapped .npy (in the page cache)."""

    param_names, params = grid(*_AXES)

    def setup(self, n_samples, n_features, n_components, covariance_type):
        self.X = dataset(n_samples, n_features, n_components)
        self.start = starting_point(n_samples, n_features, n_components, covariance_type)
        self.n_components, self.covariance_type = n_components, covariance_type
        self.folder = tempfile.TemporaryDirectory(prefix="fastem-asv-")
        path = os.path.join(self.folder.name, "X.npy")
        np.save(path, self.X)
        self.mapped = np.load(path, mmap_mode="r")
        self.fit(self.mapped)  # compiled (or loaded) and the file read once

    def teardown(self, *params):
        del self.mapped
        self.folder.cleanup()

    def fit(self, X):
        _fastem_fit(X, self.start, self.n_components, self.covariance_type, FIT_ITERATIONS)

    def time_fit_memmap(self, *params):
        self.fit(self.mapped)

    def track_speed_vs_in_memory(self, *params):
        # Above 1: the memory-mapped fit is faster than the in-memory one.
        return speedup(lambda: self.fit(self.mapped), lambda: self.fit(self.X))

    track_speed_vs_in_memory.unit = "x in memory"


class OnlinePass(Benchmark):
    """One pass of ``partial_fit`` in batches of 10,000 rows, against a full fit."""

    param_names, params = grid("n_samples", "n_features", "n_components")

    def setup(self, n_samples, n_features, n_components):
        rng = np.random.default_rng(0)
        self.X = dataset(n_samples, n_features, n_components)[rng.permutation(n_samples)]
        self.n_components = n_components
        self.online_pass()

    def online_pass(self):
        model = GaussianMixture(self.n_components, random_state=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for start in range(0, self.X.shape[0], 10_000):
                model.partial_fit(self.X[start:start + 10_000])
        return model

    def full_fit(self):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return GaussianMixture(self.n_components, random_state=0).fit(self.X)

    def time_online_pass(self, *params):
        self.online_pass()

    def track_speedup_vs_full_fit(self, *params):
        return speedup(self.online_pass, self.full_fit)

    track_speedup_vs_full_fit.unit = "x full fit"

    def track_log_likelihood_gap_percent(self, *params):
        full = self.full_fit().score(self.X)
        return 100.0 * (full - self.online_pass().score(self.X)) / abs(full)

    track_log_likelihood_gap_percent.unit = "%"


class DaskFit(Benchmark):
    """``FIT_ITERATIONS`` EM iterations on a Dask array: a 2-worker LocalCluster
    (processes, one thread each), one persisted row chunk per worker, against
    the array in memory. Skipped without dask and distributed."""

    param_names, params = grid(*_AXES)
    n_workers = 2

    def setup(self, n_samples, n_features, n_components, covariance_type):
        try:
            import dask
            import dask.array as da
            from distributed import Client, LocalCluster
        except ImportError:
            raise NotImplementedError("dask and distributed are not installed") from None
        self.X = dataset(n_samples, n_features, n_components)
        self.start = starting_point(n_samples, n_features, n_components, covariance_type)
        self.n_components, self.covariance_type = n_components, covariance_type
        self.cluster = LocalCluster(n_workers=self.n_workers, threads_per_worker=1,
                                    processes=True, host="127.0.0.1", dashboard_address=None)
        self.client = Client(self.cluster)
        self.client.wait_for_workers(self.n_workers)
        bounds = np.linspace(0, n_samples, self.n_workers + 1).astype(int)
        # Scattered rather than embedded in the graph: each worker holds its chunk.
        parts = self.client.scatter([self.X[a:b] for a, b in zip(bounds[:-1], bounds[1:])])
        self.chunked = da.concatenate([
            da.from_delayed(dask.delayed(part), shape=(b - a, n_features), dtype=self.X.dtype)
            for part, a, b in zip(parts, bounds[:-1], bounds[1:])]).persist()
        self.fit(self.chunked)  # kernels compiled (or loaded) on the workers

    def teardown(self, *params):
        self.client.close()
        self.cluster.close()

    def fit(self, X):
        _fastem_fit(X, self.start, self.n_components, self.covariance_type, FIT_ITERATIONS)

    def time_fit_dask(self, *params):
        self.fit(self.chunked)

    def track_speed_vs_in_memory(self, *params):
        # Above 1: the Dask fit is faster than the in-memory one.
        return speedup(lambda: self.fit(self.chunked), lambda: self.fit(self.X))

    track_speed_vs_in_memory.unit = "x in memory"
