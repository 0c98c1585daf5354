"""Model selection: the K = 1..9 x four covariance types grid on small real data sets."""

from __future__ import annotations

from fastem import bench_selection
from fastem.selection import select_model

from .common import Benchmark


class SelectModel(Benchmark):
    """:func:`fastem.selection.select_model` with its defaults (short-run EM):
    the time of a grid and the BIC it chooses (a search that finds worse
    optima shows as a higher ``track_bic``)."""

    param_names = ["dataset"]
    params = [["faithful", "crabs", "iris"]]

    def setup(self, dataset):
        self.X, _ = bench_selection.load_dataset(dataset)
        # Compiles (or loads) the kernels, so that JIT stays out of the timing.
        self.result = select_model(self.X, bench_selection.GRID, random_state=0)

    def time_select_model(self, dataset):
        select_model(self.X, bench_selection.GRID, random_state=0)

    def track_bic(self, dataset):
        return float(self.result.table["bic"][self.result.best_index])

    track_bic.unit = "BIC"
