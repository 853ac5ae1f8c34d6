"""The numba float parser and frame scanner against Python's own parsing."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ensemble.io import xyz_kernels as K


def parse(text: str):
    buf = np.frombuffer(text.encode() + b"\n", dtype=np.uint8)
    return K._parse_float(buf, 0, len(buf) - 1)


@settings(max_examples=400, deadline=None)
@given(st.floats(min_value=-1e5, max_value=1e5, allow_nan=False), st.sampled_from(["%.10f", "%20.10f", "%.6f", "%.3f"]))
def test_fixed_point_numbers_parse_exactly(x, fmt):
    text = (fmt % x).strip()
    value, _, status = parse(text)
    assert status == K.OK
    assert value == float(text)          # Clinger fast path: correctly rounded


@settings(max_examples=300, deadline=None)
@given(st.floats(min_value=-1e300, max_value=1e300, allow_nan=False, allow_infinity=False))
def test_exponent_notation_within_a_few_ulp(x):
    for text in ("%.15e" % x, ("%.8E" % x).replace("E", "D")):
        value, _, status = parse(text)
        assert status == K.OK
        expected = float(text.replace("D", "E"))
        assert abs(value - expected) <= 4 * np.spacing(abs(expected))


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=-10**15, max_value=10**15), st.integers(min_value=-22, max_value=22))
def test_fast_path_exponents_are_exact(m, e):
    text = f"{m}e{e}"
    value, _, status = parse(text)
    assert status == K.OK and value == float(text)


@pytest.mark.parametrize("text", ["NaN", "-NaN", "Infinity", "-Infinity", "********", "inf"])
def test_non_finite_tokens_are_flagged(text):
    assert parse(text)[2] == K.NON_FINITE


@pytest.mark.parametrize("text", ["abc", "1.2.3", "--1", "1e", "1x5", "."])
def test_garbage_is_flagged(text):
    assert parse(text)[2] == K.BAD_NUMBER


def test_many_digits_and_leading_zeros():
    for text in ["0.000000000000000000012345678901234567890", "123456789012345678901234.5", "-0.0", "007.25"]:
        value, _, status = parse(text)
        assert status == K.OK
        assert value == pytest.approx(float(text), rel=4e-16, abs=0)


def test_scan_reports_truncation_and_frame_structure():
    frame = "  2\n i = 7, time = 3.500, E = -1.25\n O 0.0 0.0 0.0\n H 1.0 0.0 0.0\n"
    buf = np.frombuffer((frame * 2 + " 2\n i = 9, time = 4.5, E = 0\n O 1 2 3\n").encode(), dtype=np.uint8)
    out = [np.zeros(8, np.int64), np.zeros(8, np.int64), np.zeros(8), np.zeros(8)]
    n, consumed, status, lines = K.scan_frames(buf, 2, True, *out)
    assert (n, status, lines) == (2, -1, 3)
    assert consumed == 2 * len(frame)
    assert out[1][:2].tolist() == [7, 7] and out[2][0] == 3.5 and out[3][0] == -1.25
    n, consumed, status, _ = K.scan_frames(buf, 2, False, *out)
    assert (n, status, consumed) == (2, K.OK, 2 * len(frame))   # not final: wait for more bytes


def test_scan_rejects_headers_that_are_not_cp2k():
    buf = np.frombuffer(b"  1\nwritten by something else\n O 0 0 0\n", dtype=np.uint8)
    out = [np.zeros(4, np.int64), np.zeros(4, np.int64), np.zeros(4), np.zeros(4)]
    assert K.scan_frames(buf, 1, True, *out)[2] == K.BAD_HEADER
