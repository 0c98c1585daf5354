"""The EM engine: one driver, its sources and M-steps, and the same bits in every process."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import types
import warnings

import numpy as np
import pytest
from conftest import COVARIANCE_TYPES, make_mixture

from fastem import GaussianMixture, em
from fastem.sources import InMemorySource
from fastem.stats import GaussianStatistics, MaximumLikelihood, e_step_statistics

# Fits, predictions and scores of every covariance type, float32 and float64,
# on both engines (D = 3: loops; D = 26: BLAS), small data (the compiled loop)
# and larger data (the Python driver). Prints a digest of every result's bytes.
_SCRIPT = textwrap.dedent("""
    import hashlib, json, sys, warnings
    import numpy as np
    import fastem.sources
    from fastem import GaussianMixture
    from fastem.compilation import compile_times
    digests = {}
    only = set(sys.argv[1:])       # these results alone (default: every one)
    with compile_times() as seconds, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rng = np.random.default_rng(1)
        # Small data run twice: by the Python-driven loop (a process's first
        # small fits) and, under the "compiled/" keys, by the compiled loop.
        for tier, n_features, n_samples in (("", 3, 300), ("", 3, 60000), ("", 26, 200),
                                            ("", 26, 6000), ("compiled/", 3, 300),
                                            ("compiled/", 26, 200)):
            fastem.sources.COMPILED_LOOP_AFTER = 0 if tier else 10**9
            rng = np.random.default_rng(n_features * n_samples)
            X = rng.normal(size=(n_samples, n_features))
            X[: n_samples // 3] += 3.0
            for dtype in (np.float64, np.float32):
                Xd = X.astype(dtype)
                for cov in ("full", "tied", "diag", "spherical"):
                    key = f"{tier}{n_features}/{n_samples}/{np.dtype(dtype).name}/{cov}"
                    if only and key not in only:
                        continue
                    gm = GaussianMixture(3, covariance_type=cov, max_iter=8, tol=0.0,
                                         random_state=0).fit(Xd)
                    parts = [gm.means_, gm.covariances_, gm.predict_proba(Xd[:500]),
                             gm.score_samples(Xd[:500]), np.array(gm.lower_bounds_)]
                    digest = hashlib.sha256(b"".join(np.ascontiguousarray(p).tobytes()
                                                     for p in parts)).hexdigest()
                    digests[key] = digest
        # EM with missing values (its own kernel) and MAP EM.
        for n_features, n_samples in ((3, 20000), (26, 2000)) if not only else ():
            X = rng.normal(size=(n_samples, n_features))
            X[: n_samples // 3] += 3.0
            X[rng.random(X.shape) < 0.2] = np.nan
            for cov in ("full", "tied", "diag", "spherical"):
                gm = GaussianMixture(3, covariance_type=cov, max_iter=8, tol=0.0,
                                     random_state=0, missing="em", prior="default").fit(X)
                parts = [gm.means_, gm.covariances_, gm.predict_proba(X[:500]),
                         gm.impute(X[:500]), np.array(gm.lower_bounds_)]
                digest = hashlib.sha256(b"".join(np.ascontiguousarray(p).tobytes()
                                                 for p in parts)).hexdigest()
                digests[f"missing/{n_features}/{cov}"] = digest
        # Hidden Markov models: forward-backward (both recursions) and Viterbi.
        from fastem import GaussianHMM

        X = rng.normal(size=(3000, 3))
        X[1000:2000] += 2.5
        for cov in ("full", "tied", "diag", "spherical") if not only else ():
            for implementation in ("log", "scaling"):
                hmm = GaussianHMM(3, covariance_type=cov, n_iter=6, tol=-np.inf,
                                  implementation=implementation,
                                  random_state=0).fit(X, [1200, 1800])
                parts = [hmm.means_, hmm.covars_, hmm.transmat_,
                         hmm.predict_proba(X, [1200, 1800]), hmm.predict(X, [1200, 1800]),
                         np.array(hmm.lower_bounds_)]
                digest = hashlib.sha256(b"".join(np.ascontiguousarray(p).tobytes()
                                                 for p in parts)).hexdigest()
                digests[f"hmm/{cov}/{implementation}"] = digest
    print(json.dumps({"digests": digests, "compiled": sorted(seconds)}))
""")


def _run(args, cache_dir):
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache_dir)}
    done = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True,
                          timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_fresh_and_cached_compilations_give_the_same_bits_and_compile_warms_everything(
        tmp_path):
    """A process that compiled the kernels and one that loaded them agree to the bit;
    after ``fastem compile`` a first script compiles nothing."""
    script = tmp_path / "script.py"
    script.write_text(_SCRIPT)
    fresh = json.loads(_run([str(script)], tmp_path / "fresh").splitlines()[-1])
    assert fresh["compiled"], "the first process should have compiled the kernels"
    cached = json.loads(_run([str(script)], tmp_path / "fresh").splitlines()[-1])
    assert cached["compiled"] == [], f"compiled again: {cached['compiled']}"
    differ = [k for k in fresh["digests"] if fresh["digests"][k] != cached["digests"][k]]
    assert not differ, f"fresh and cached compilations differ for {differ}"
    # The compiled EM loop gives the Python-driven loop's bits.
    tiers = [k for k in fresh["digests"] if k.startswith("compiled/")]
    assert len(tiers) == 16
    differ = [k for k in tiers if fresh["digests"][k] != fresh["digests"][k[9:]]]
    assert not differ, f"the compiled and Python-driven loops differ for {differ}"

    # Cached bits must not depend on what the process writing the cache compiled
    # before: the wide diagonal fits alone, in a cache of their own, agree with
    # the fits the first process made after compiling everything else. (They did
    # not while helpers of the fast-math passes were left to LLVM to inline or not.)
    direct = [f"26/{n}/float64/{cov}" for n in (200, 6000) for cov in ("diag", "spherical")]
    alone = json.loads(_run([str(script), *direct], tmp_path / "alone").splitlines()[-1])
    assert sorted(alone["digests"]) == sorted(direct)
    differ = [k for k in direct if alone["digests"][k] != fresh["digests"][k]]
    assert not differ, f"caches written in another order differ for {differ}"

    report = _run(["-m", "fastem", "compile"], tmp_path / "warmed")
    assert "float32" in report and "float64" in report
    warmed = json.loads(_run([str(script)], tmp_path / "warmed").splitlines()[-1])
    assert warmed["compiled"] == [], f"not compiled by fastem compile: {warmed['compiled']}"
    assert warmed["digests"] == fresh["digests"]


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_starts_are_nested(covariance_type):
    """The first m starts of n_init = m + 1 are those of n_init = m."""
    X = make_mixture(400, 2, 3, seed=3)
    fits = [GaussianMixture(3, covariance_type=covariance_type, n_init=n, random_state=7,
                            max_iter=20).fit(X) for n in (2, 3)]
    assert fits[1].init_lower_bounds_[:2] == fits[0].init_lower_bounds_
    assert fits[1].lower_bound_ >= fits[0].lower_bound_


def test_statistics_add_scale_and_count_rows():
    X = make_mixture(1000, 3, 2, seed=4)
    gm = GaussianMixture(2, max_iter=0, random_state=0).fit(X)
    params = gm._current_parameters()
    whole = e_step_statistics(X, None, params, "full")
    halves = (e_step_statistics(X[:400], None, params, "full")
              + e_step_statistics(X[400:], None, params, "full"))
    assert whole.count == halves.count == 1000
    np.testing.assert_allclose(halves.sxx, whole.sxx, rtol=1e-12)
    np.testing.assert_allclose(halves.loglik, whole.loglik, rtol=1e-12)
    half = whole.scaled(0.5)
    assert isinstance(half, GaussianStatistics)
    np.testing.assert_array_equal(half.nk, whole.nk * 0.5)
    assert half.count == 500 and half.weight == 500


class _RecordingSource:
    """A source over an in-memory array that counts its passes (no compiled loop)."""

    def __init__(self, X):
        self.inner = InMemorySource(X, None, "full")
        self.passes = 0

    def statistics(self, params):
        self.passes += 1
        return self.inner.statistics(params)


def test_driver_runs_any_source_and_matches_the_estimator():
    X = make_mixture(2000, 2, 3, seed=5)
    start = GaussianMixture(3, max_iter=0, random_state=0).fit(X)
    source = _RecordingSource(X)
    result = em.run_em(source, MaximumLikelihood("full", 1e-6), start._current_parameters(),
                       em.ConvergenceMonitor(1e-8), 200)
    assert result.converged and source.passes == result.n_iter
    fitted = GaussianMixture(3, tol=1e-8, max_iter=200, weights_init=start.weights_,
                             means_init=start.means_, precisions_init=start.precisions_).fit(X)
    np.testing.assert_allclose(result.params.means, fitted.means_, rtol=1e-9)
    assert result.n_iter == fitted.n_iter_


def test_driver_reseeds_a_collapsed_component_once():
    X = make_mixture(300, 2, 2, seed=6)
    start = GaussianMixture(3, max_iter=0, random_state=0).fit(X)
    params = start._current_parameters()
    params.means[2] = 1e4  # no row near it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = em.run_em(_RecordingSource(X), MaximumLikelihood("full", 1e-6), params,
                           em.ConvergenceMonitor(1e-6), 50)
    assert any(issubclass(w.category, em.DegenerateDataWarning) for w in caught)
    assert np.all(np.abs(result.params.means) < 100), result.params.means


def test_verbose_progress_is_printed(capsys):
    X = make_mixture(500, 2, 2, seed=7)
    GaussianMixture(2, verbose=2, verbose_interval=1, max_iter=3, tol=0.0,
                    random_state=0).fit(X)
    out = capsys.readouterr().out
    assert "Initialization 0" in out and "Iteration 3" in out and "lower bound" in out
    # scikit-learn's line, then the objective and the time per iteration.
    line = next(text for text in out.splitlines() if "Iteration 2" in text)
    assert re.fullmatch(r"  Iteration 2\t time lapse [0-9.]+s\t ll change -?[0-9.]+"
                        r"\t lower bound -?[0-9.]+\t [0-9.]+ ms/iter", line), line


def test_small_fits_switch_to_the_compiled_loop_after_enough_python_iterations(monkeypatch):
    """A process runs small fits through the Python-driven loop until it has run
    COMPILED_LOOP_AFTER small-data iterations of an engine and dtype; from then on
    the compiled loop runs them, with the same bits."""
    import fastem.sources as sources

    calls = []
    loops = {engine: (lambda loop: lambda *args: calls.append(1) or loop(*args))(loop)
             for engine, loop in sources.emloop.em_loop.items()}
    monkeypatch.setattr(sources, "emloop", types.SimpleNamespace(
        em_loop=loops, em_loop_whitened=sources.emloop.em_loop_whitened))
    monkeypatch.setattr(sources, "COMPILED_LOOP_AFTER", 20)
    monkeypatch.setattr(sources, "_python_iterations", type(sources._python_iterations)())
    monkeypatch.setattr(sources, "_compiled_variants", set())
    X = make_mixture(300, 2, 2, seed=9)

    def fit(dtype=np.float64):
        return GaussianMixture(2, max_iter=12, tol=0.0, random_state=0).fit(X.astype(dtype))

    first = fit()
    assert calls == [] and sources._python_iterations[(0, "float64", False)] == 12
    second = fit()                      # 24 iterations: over the threshold from now on
    assert calls == []
    third = fit()
    assert len(calls) == 1, "the third small fit should run the compiled loop"
    assert third.lower_bounds_ == first.lower_bounds_ == second.lower_bounds_
    np.testing.assert_array_equal(third.means_, first.means_)
    fit(np.float32)                     # another dtype: its own count
    assert len(calls) == 1
    # Large data never run the compiled loop, and do not count.
    big = make_mixture(300_000, 2, 2, seed=9)
    GaussianMixture(2, max_iter=2, random_state=0).fit(big)
    assert len(calls) == 1 and sources._python_iterations[(0, "float64", False)] == 24


def test_importing_fastem_leaves_numba_to_the_first_fit():
    """``import fastem`` and its public names cost scikit-learn's import and
    fastem's own, not Numba's: the kernel modules load on first use."""
    code = textwrap.dedent("""
        import sys
        import numpy as np
        import fastem
        from fastem import (BayesianGaussianMixture, GaussianHMM, GaussianMixture,
                            GaussianPrior, select_model)
        import fastem.cli, fastem.selection, fastem.io, fastem.blocks
        before = sorted(n for n in sys.modules if n == "numba" or n.startswith("numba."))
        X = np.random.default_rng(0).normal(size=(300, 2))
        model = GaussianMixture(2, random_state=0).fit(X)
        print(before, "numba" in sys.modules, np.isfinite(model.score(X)))
    """)
    out = subprocess.run([sys.executable, "-c", code], check=True, timeout=300,
                         capture_output=True, text=True).stdout.split()
    assert out == ["[]", "True", "True"], out
