"""``python -m fastem.bench``: the report's shape and its JSON twin (no timing assertions)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from fastem import bench

# Tiny budgets: these tests check the plumbing, not the speed.
FAST = ["--repeats", "1", "--budget", "0.3"]


def _table_rows(text: str, first_column: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the Markdown table whose first header cell is ``first_column``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines)
                 if line.startswith("|") and line.strip("| ").split()[0] == first_column)
    header = [cell.strip() for cell in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return header, rows


def _ratio(cell: str) -> float:
    assert cell.endswith("x"), f"not a ratio: {cell!r}"
    return float(cell[:-1])


def test_small_case_prints_every_column_and_positive_speedups(capsys, tmp_path):
    path = tmp_path / "small.json"
    assert bench.main(["--quick", "--cases", "small", *FAST, "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "CPU:" in out
    header, rows = _table_rows(out, "case")
    assert header == bench.RESULT_COLUMNS
    assert [(row[0], row[header.index("unit")]) for row in rows] == [
        ("small", "ms/fit"), ("small", "ms/iter")]
    for row in rows:
        for column in ("vs sklearn", "vs reference"):
            value = _ratio(row[header.index(column)])
            assert math.isfinite(value) and value > 0, f"{column} = {value} in {row}"


def test_json_holds_the_numbers_of_the_table(capsys, tmp_path):
    path = tmp_path / "small.json"
    assert bench.main(["--cases", "small", *FAST, "--json", str(path)]) == 0
    header, rows = _table_rows(capsys.readouterr().out, "case")
    report = json.loads(path.read_text())
    assert set(report) == {"machine", "settings", "results", "targets", "machine_limit"}
    assert report["settings"]["cases"] == ["small"]
    assert len(report["results"]) == len(rows)
    for result, row in zip(report["results"], rows):
        assert result["case"] == row[0] and result["unit"] == row[header.index("unit")]
        for library in ("fastem", "sklearn", "reference"):
            value = result["values"][library]
            assert math.isfinite(value) and value > 0, f"{library}: {value}"
            shown = float(row[header.index(library)])
            assert math.isclose(shown, value, rel_tol=0.01), f"{library}: {shown} vs {value}"
        for key, column in (("speedup_vs_sklearn", "vs sklearn"),
                            ("speedup_vs_reference", "vs reference")):
            shown = _ratio(row[header.index(column)])
            assert math.isclose(shown, result[key], rel_tol=0.01), (
                f"{column}: table {shown}, JSON {result[key]}")
            assert math.isclose(result[key],
                                result["values"][column.split()[1]] / result["values"]["fastem"])


def test_em_case_at_another_size_reports_its_target_as_off_size(capsys, tmp_path):
    path = tmp_path / "d2.json"
    assert bench.main(["--cases", "d2", "--n-samples", "3000", *FAST, "--json", str(path)]) == 0
    out = capsys.readouterr().out
    header, rows = _table_rows(out, "case")
    assert [row[:6] for row in rows] == [["d2", "3000", "2", "5", "full", "float64"]]
    assert rows[0][header.index("unit")] == "ms/iter"
    assert _ratio(rows[0][header.index("vs sklearn")]) > 0
    target_header, targets = _table_rows(out, "target")
    assert target_header == bench.TARGET_COLUMNS
    # The regression floor and the aim, both measured off their size.
    assert len(targets) == 2 and all(t[-1].endswith("*") for t in targets), targets
    assert [t[1] for t in targets] == [">= 30x", ">= 50x"], targets
    report = json.loads(path.read_text())
    for target in report["targets"]:
        assert target["case"] == "d2" and target["at_target_size"] is False
        assert math.isclose(target["measured"], report["results"][0]["speedup_vs_sklearn"])
    iterations = report["results"][0]["details"]["iterations_per_sample"]
    assert set(iterations) == {"fastem", "sklearn", "reference"}
    assert all(n >= 1 for n in iterations.values()), iterations


def test_no_reference_leaves_its_columns_empty(capsys):
    assert bench.main(["--cases", "d2", "--n-samples", "2000", "--no-reference", *FAST]) == 0
    header, rows = _table_rows(capsys.readouterr().out, "case")
    assert rows[0][header.index("reference")] == "-"
    assert rows[0][header.index("vs reference")] == "-"


@pytest.mark.parametrize("argv", [
    ["--cases", "no-such-case"], ["--repeats", "0"], ["--repeats", "-2"], ["--repeats", "1.5"],
    ["--n-samples", "10"], ["--n-samples", "-1000"], ["--n-samples", "1e6"],
    ["--budget", "-1"], ["--budget", "0"], ["--budget", "nan"], ["--budget", "inf"],
    ["--budget", "soon"], ["--json", "/no/such/folder/report.json"], ["--json", "."],
], ids=lambda argv: " ".join(argv))
def test_bad_arguments_exit_with_usage_error_before_running(argv, capsys, monkeypatch):
    monkeypatch.setattr(bench, "machine_info", lambda: pytest.fail("ran with bad arguments"))
    with pytest.raises(SystemExit) as error:
        bench.main(argv)
    assert error.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and (f"argument {argv[0]}" in err or "unknown case" in err), err


def test_quick_takes_one_sample_on_small_data_with_a_short_budget(capsys, tmp_path):
    path = tmp_path / "quick.json"
    assert bench.main(["--quick", "--cases", "small", "--json", str(path)]) == 0
    settings = json.loads(path.read_text())["settings"]
    assert (settings["repeats"], settings["budget_s"], settings["quick"]) == (1, 0.5, True)
    quick = bench._Settings(repeats=1, budget=0.5, n_samples=None, quick=True, reference=False,
                            sklearn=None)
    assert [quick.size(n) for n in (1_000_000, 200_000)] == [1000, 1000]
    assert quick.subprocess_repeats == 1 and not quick.warm_up_subprocesses
    full = bench._Settings(repeats=3, budget=20.0, n_samples=None, quick=False, reference=False,
                           sklearn=None)
    assert full.size(1_000_000) == 1_000_000 and full.warm_up_subprocesses
    assert full.subprocess_repeats == bench._MIN_SUBPROCESS_REPEATS


def test_a_zero_fastem_value_has_no_ratio_rather_than_crashing():
    # Small data: the fit adds no measurable memory.
    result = bench.Result("memory", "MiB", {"fastem": 0.0, "sklearn": 0.004})
    assert result.speedup("sklearn") is None
    cells = [c.strip() for c in bench.format_results([result]).splitlines()[-1].split("|")[1:-1]]
    assert cells[bench.RESULT_COLUMNS.index("fastem")] == "0"
    assert cells[bench.RESULT_COLUMNS.index("vs sklearn")] == "-"


def test_cases_accept_commas_and_run_in_canonical_order():
    parsed = bench._parse_cases(["d10,small", "d2"])
    assert parsed == ["small", "d2", "d10"]
    assert bench._parse_cases(["all"]) == list(bench.CASES)


def test_make_mixture_is_deterministic_and_contiguous():
    X = bench.make_mixture(5000, 3, 4, seed=7)
    assert X.shape == (5000, 3) and X.dtype == np.float64 and X.flags.c_contiguous
    np.testing.assert_array_equal(X, bench.make_mixture(5000, 3, 4, seed=7))
    assert not np.array_equal(X, bench.make_mixture(5000, 3, 4, seed=8))


def test_peak_fit_memory_reports_size_of_x_and_a_nonnegative_peak():
    report = bench.peak_fit_memory("fastem", 5000, 3, 2)
    assert math.isclose(report["x_mib"], 5000 * 3 * 8 / 2**20)
    assert report["peak_extra_mib"] >= 0, report
    assert report["method"] in ("VmHWM - VmRSS", "ru_maxrss growth")


def _scripted_runner(fixed_cost: float, unit_cost: float, noise: list[float]) -> bench._Runner:
    """A runner whose n units 'take' fixed_cost + n * unit_cost, plus scripted noise."""
    noise = iter(noise)

    def run(n):
        return fixed_cost + n * unit_cost + next(noise, 0.0)

    return bench._Runner(run, fixed=1, min_units=4)


def _settings(budget=0.3, repeats=1):
    return bench._Settings(repeats=repeats, budget=budget, n_samples=None, quick=True,
                           reference=False, sklearn=None)


def test_calibration_spans_enough_units_when_the_fixed_cost_dominates(monkeypatch):
    # Fixed cost 10 ms, 0.1 ms per unit: calibrating on the whole run(1)
    # would take 2 units per sample; on the marginal cost it takes 200.
    monkeypatch.setattr(bench, "_SETTLE_S", 0.0)
    timing = bench._measure({"x": _scripted_runner(0.010, 0.0001, [])}, _settings())["x"]
    assert timing.units == math.ceil(0.3 / 15 / 0.0001)
    assert math.isclose(timing.median, 0.0001, rel_tol=1e-9) and timing.differenced


def test_a_difference_lost_in_noise_is_reported_as_a_whole_run_not_a_negative_time(monkeypatch):
    monkeypatch.setattr(bench, "_SETTLE_S", 0.0)
    # Calibration is clean; then the measured run(fixed) comes out 1 s slow.
    runner = _scripted_runner(0.010, 0.0001, [0.0, 0.0, 1.0])
    timing = bench._measure({"x": runner}, _settings())["x"]
    assert timing.median > 0 and not timing.differenced
    whole_run = 0.010 + (1 + timing.units) * 0.0001
    assert math.isclose(timing.median, whole_run / (1 + timing.units))


def test_bayesian_and_hmm_cases_time_fastem_against_their_peers(capsys):
    pytest.importorskip("hmmlearn")
    assert bench.main(["--cases", "bayesian", "hmm", "--n-samples", "2000", *FAST]) == 0
    header, rows = _table_rows(capsys.readouterr().out, "case")
    by_case = {row[0]: row for row in rows}
    assert set(by_case) == {"bayesian", "hmm", "hmm-scaling"}
    assert _ratio(by_case["bayesian"][header.index("vs sklearn")]) > 0
    for case in ("hmm", "hmm-scaling"):
        assert by_case[case][header.index("unit")] == "ms/iter"
        assert _ratio(by_case[case][header.index("vs hmmlearn")]) > 0
        assert by_case[case][header.index("sklearn")] == "-"


def test_limit_table_gives_each_iteration_its_work_and_the_fraction_of_the_limit(capsys,
                                                                                  tmp_path):
    path = tmp_path / "d2.json"
    assert bench.main(["--cases", "d2", "--n-samples", "3000", *FAST, "--json", str(path)]) == 0
    out = capsys.readouterr().out
    report = json.loads(path.read_text())
    limit = report["machine_limit"]
    assert limit["gflops"]["float64"] > 0 and limit["read_gb_per_s"] > 0
    assert f"float64 matrix product {limit['gflops']['float64']:.1f} GFLOP/s" in out
    header, (row,) = _table_rows(out[out.index("Machine limit"):], "case")
    assert row[:2] == ["d2", "float64"]
    # d2 at 3000 rows, K=5, full: 3000 * 5 * (2 * 2 * 3 + 4 * 2) = 300,000 operations.
    assert float(row[header.index("GFLOP/iter")]) == pytest.approx(3.0e-4)
    assert float(row[header.index("MB read/iter")]) == pytest.approx(0.048)
    flops_ms = 3.0e-4 / limit["gflops"]["float64"] * 1e3
    bytes_ms = 0.048e-3 / limit["read_gb_per_s"] * 1e3
    expected = 100 * max(flops_ms, bytes_ms) / report["results"][0]["values"]["fastem"]
    assert row[header.index("of the limit")] == f"{expected:.0f}%"


def test_iteration_work_counts_each_covariance_types_arithmetic():
    from fastem.bench_limits import iteration_work

    # Per row: K (2 D(D+1) + 4D) full; K (D(D+1) + 4D) + D(D+1) tied; 8KD diag; 7KD spherical.
    assert iteration_work(10, 3, 2, "full") == (10 * 2 * (24 + 12), 240)
    assert iteration_work(10, 3, 2, "tied") == (10 * (2 * (12 + 12) + 12), 240)
    assert iteration_work(10, 3, 2, "diag", itemsize=4) == (10 * 48, 120)
    assert iteration_work(10, 3, 2, "spherical") == (10 * 42, 240)
    # The figure for the lecture's case: about 1.4 GFLOP.
    assert iteration_work(1_000_000, 10, 5, "full")[0] == pytest.approx(1.3e9)
