"""_C.erf_f32 (csrc/erf.cpp): std::erf on each element, held to math.erf (fp64, rounded to fp32),
in place and across the OpenMP pool."""

import math

import numpy as np
import pytest

from xcompile import _C


def _exact(x: np.ndarray) -> np.ndarray:
    return np.array([math.erf(v) for v in x.tolist()], dtype=np.float64).astype(np.float32)


@pytest.mark.parametrize("n", [1, 7, 100, (1 << 16) + 5])  # the last one wakes the pool
def test_erf_matches_math_erf(n):
    x = np.linspace(-6, 6, n, dtype=np.float32)
    x[: min(n, 4)] = np.float32([0.0, -0.0, 1e-30, -np.inf])[: min(n, 4)]
    out = np.full_like(x, np.nan)
    _C.erf_f32(x.ctypes.data, out.ctypes.data, n)
    np.testing.assert_allclose(out, _exact(x), rtol=2e-7, atol=1e-7)  # within about an ulp


def test_erf_in_place_and_empty():
    x = np.linspace(-2, 2, 33, dtype=np.float32)
    want = _exact(x)
    _C.erf_f32(x.ctypes.data, x.ctypes.data, x.size)
    np.testing.assert_allclose(x, want, rtol=2e-7, atol=1e-7)
    _C.erf_f32(0, 0, 0)  # nothing to do: no pointer read
    with pytest.raises(ValueError, match="null pointer"):
        _C.erf_f32(0, x.ctypes.data, 1)
