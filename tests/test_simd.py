"""fastem._kernels.simd: explicit vectors and fused multiply-adds, checked against NumPy."""

from __future__ import annotations

import math

import numpy as np
import pytest
from numba import njit

from fastem._kernels._blocks import log_normal_positive, transpose_block
from fastem._kernels.estep import sum_rows
from fastem._kernels.simd import (
    fma,
    lanes,
    vadd,
    vbroadcast,
    vfirst,
    vfma,
    vload,
    vmin,
    vmul,
    vstore,
    vsub,
    vsum,
)


@njit
def _lane_ops(a, b, c, out):
    width = lanes(a)
    for start in range(0, a.shape[0], width):
        x = vload(a, start)
        y = vload(b, start)
        z = vload(c, start)
        vstore(out, start, vfma(x, y, vadd(vmul(x, z), vbroadcast(a, 2.0))))
    return width


@njit
def _difference_and_minimum(a, b, difference, minimum, first):
    width = lanes(a)
    for start in range(0, a.shape[0], width):
        vstore(difference, start, vsub(vload(a, start), vload(b, start)))
        vstore(minimum, start, vmin(vload(a, start), vload(b, start)))
        first[start // width] = vfirst(vload(a, start))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_vsub_vmin_and_vfirst_are_lane_wise(dtype):
    rng = np.random.default_rng(2)
    a = rng.normal(size=64).astype(dtype)
    b = rng.normal(size=64).astype(dtype)
    b[::5] = a[::5]  # ties
    a[1], b[1] = np.inf, 3.0
    difference, minimum = np.empty_like(a), np.empty_like(a)
    width = 64 // a.itemsize
    first = np.empty(64 // width, dtype=dtype)
    _difference_and_minimum(a, b, difference, minimum, first)
    np.testing.assert_array_equal(difference, a - b)
    np.testing.assert_array_equal(minimum, np.minimum(a, b))
    np.testing.assert_array_equal(first, a[::width])


@njit
def _tree_sum(a):
    return vsum(vload(a, 0))


@njit
def _scalar_fma(a, b, c):
    return fma(a, b, c)


@pytest.mark.parametrize("dtype, width", [(np.float64, 8), (np.float32, 16)])
def test_vector_operations_are_lane_wise_ieee_operations(dtype, width):
    rng = np.random.default_rng(0)
    a, b, c = (rng.normal(size=4 * width).astype(dtype) for _ in range(3))
    out = np.empty_like(a)
    assert _lane_ops(a, b, c, out) == width
    # fma rounds once: compare with the exact product-sum rounded once (float64
    # holds a float32 product exactly; for float64 use Python's exact fractions).
    expected = np.empty_like(a)
    for i in range(a.size):
        inner = dtype(dtype(a[i] * c[i]) + dtype(2.0))
        if dtype == np.float32:
            expected[i] = np.float32(np.float64(a[i]) * np.float64(b[i]) + np.float64(inner))
        else:
            from fractions import Fraction
            expected[i] = float(Fraction(float(a[i])) * Fraction(float(b[i]))
                                + Fraction(float(inner)))
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("dtype, width", [(np.float64, 8), (np.float32, 16)])
def test_vsum_adds_halves_in_a_fixed_tree(dtype, width):
    rng = np.random.default_rng(1)
    a = (rng.normal(size=width) * 10.0 ** rng.integers(-8, 8, size=width)).astype(dtype)
    values = list(a)
    while len(values) > 1:
        half = len(values) // 2
        values = [dtype(x + y) for x, y in zip(values[:half], values[half:])]
    assert _tree_sum(a) == values[0]


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 33, 256])
def test_sum_rows_is_lane_sums_then_the_tail_in_order(n):
    rng = np.random.default_rng(n)
    a = rng.normal(size=max(n, 1)) * 1e3
    width = 8
    whole = n - n % width
    lane_sums = np.zeros(width)
    for r in range(whole):
        lane_sums[r % width] += a[r]
    values = list(lane_sums)
    while len(values) > 1:
        half = len(values) // 2
        values = [x + y for x, y in zip(values[:half], values[half:])]
    expected = values[0]
    for r in range(whole, n):
        expected += a[r]
    assert sum_rows(a, n) == expected
    assert math.isclose(sum_rows(a, n), math.fsum(a[:n]), rel_tol=1e-12, abs_tol=1e-9)


def test_scalar_fma_rounds_once():
    # 1 + 2^-30 squared is 1 + 2^-29 + 2^-60: plain float64 arithmetic loses the
    # last term, a fused multiply-add keeps it.
    x = 1.0 + 2.0 ** -30
    assert _scalar_fma(x, x, -(1.0 + 2.0 ** -29)) == 2.0 ** -60
    assert x * x - (1.0 + 2.0 ** -29) == 0.0


@njit
def _log_block(values, out, bits):
    log_normal_positive(values, out, bits, values.shape[0])


def test_vectorised_log_is_within_three_ulp_of_libm():
    rng = np.random.default_rng(2)
    values = np.concatenate([1.0 + rng.random(20_000) * 20.0,       # row sums: [1, K]
                             np.exp(rng.uniform(-700.0, 700.0, 20_000)),
                             [1.0, 2.0, 0.5, np.sqrt(2.0), np.nextafter(np.sqrt(2.0), 0.0),
                              np.nextafter(1.0, 2.0), np.nextafter(1.0, 0.0),
                              np.finfo(np.float64).tiny, np.finfo(np.float64).max]])
    out = np.empty_like(values)
    _log_block(values, out, np.empty(values.shape[0], dtype=np.int64))
    expected = np.log(values)
    ulps = np.abs(out - expected) / np.spacing(np.maximum(np.abs(expected), 1e-300))
    assert ulps.max() <= 3.0, f"{ulps.max()} ulp at {values[np.argmax(ulps)]!r}"
    assert out[-9] == 0.0 and out[-8] == expected[-8] and out[-7] == expected[-7]


def test_vectorised_log_of_values_outside_its_domain_does_not_fault():
    values = np.array([0.0, -1.0, np.inf, np.nan, 5e-324])
    out = np.empty_like(values)
    _log_block(values, out, np.empty(5, dtype=np.int64))  # meaningless values, no fault
    assert out.shape == (5,)


@njit
def _transpose(X, start, n_rows, out):
    transpose_block(X, start, n_rows, out)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("n_features", [1, 2, 7, 8, 9, 10, 16, 17, 23])
def test_transposition_copies_every_value_and_nothing_else(dtype, n_features):
    # W x W register tiles (masked to the row's end) for C-contiguous data,
    # element copies for other layouts and the rows past the last whole vector.
    rng = np.random.default_rng(n_features)
    X = rng.normal(size=(301, n_features)).astype(dtype)
    for data in (X, np.asfortranarray(X), X[::-1]):
        # (45, 256) and (285, 16): whole tiles that end on the last row.
        for start, n_rows in ((0, 256), (3, 100), (45, 256), (285, 16), (290, 11), (0, 5)):
            out = np.full((n_features, 256), -7.0, dtype=dtype)
            _transpose(data, start, n_rows, out)
            expected = np.full_like(out, -7.0)
            expected[:, :n_rows] = data[start:start + n_rows].T
            np.testing.assert_array_equal(out, expected)
