import math

import pytest
import torch

from xcompile.runtime import kernels

SIZES = [1, 7, 17, 64, 100, 5 * 100 + 3]

# The vector paths compute exp with a polynomial (csrc/vec_math.h): held to torch within
# 2e-6 absolute + 1e-6 relative (fp32's spacing at 20 is 1.9e-6).
TOL = {"rtol": 1e-6, "atol": 2e-6}


def _inputs(n: int, seed: int) -> torch.Tensor:
    """Values over [-20, 20], where both functions bend, plus the tails past the exp clamps."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, generator=gen) * 40.0 - 20.0
    specials = torch.tensor(
        [0.0, -0.0, 1e-30, -1e-7, 3.0, -3.0, 87.0, -87.0, 89.0, -89.0, 1e4, -1e4]
    )
    x[: min(n, len(specials))] = specials[: min(n, len(specials))]
    return x


@pytest.mark.parametrize("n", SIZES)
def test_silu_mul_matches_reference(isa, n):
    gate, up = _inputs(n, seed=n), torch.randn(n, generator=torch.Generator().manual_seed(-n))
    torch.testing.assert_close(
        kernels.silu_mul(gate, up), kernels.silu_mul_reference(gate, up), **TOL
    )


@pytest.mark.parametrize("n", SIZES)
def test_gelu_tanh_matches_reference(isa, n):
    x = _inputs(n, seed=n)
    torch.testing.assert_close(kernels.gelu_tanh(x), kernels.gelu_tanh_reference(x), **TOL)


def test_activations_within_a_few_ulp_of_exact(isa):
    # Closer than the torch tolerance: against float64, SiLU within 4 ulp and GELU within 4 ulp
    # + 1e-7 (its argument's rounding is amplified by exp where gelu(x) ~ 0, x < -3).
    x = torch.linspace(-20.0, 20.0, 40001)
    xd = x.double()
    exact_silu = xd / (1.0 + torch.exp(-xd))
    exact_gelu = 0.5 * xd * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (xd + 0.044715 * xd**3)))
    for got, exact, atol in (
        (kernels.silu_mul(x, torch.ones_like(x)), exact_silu, 0.0),
        (kernels.gelu_tanh(x), exact_gelu, 1e-7),
    ):
        ulp = torch.nextafter(exact.float().abs(), torch.tensor(math.inf)) - exact.float().abs()
        assert ((got.double() - exact).abs() <= 4 * ulp.double() + atol).all()


def test_activations_in_place_shapes_and_threads(isa, threads):
    gen = torch.Generator().manual_seed(3)
    gate, up = (torch.randn(2, 3, 12001, generator=gen) * 5).unbind(0)  # big enough for the pool
    expected_silu = kernels.silu_mul_reference(gate, up)
    expected_gelu = kernels.gelu_tanh_reference(gate)
    results = []
    for n in (1, 2):
        kernels.set_num_threads(n)
        results.append(kernels.silu_mul(gate, up))
        torch.testing.assert_close(results[-1], expected_silu, **TOL)
    assert torch.equal(results[0], results[1])
    g, u = gate.clone(), up.clone()
    assert kernels.silu_mul(g, u, out=u) is u
    torch.testing.assert_close(u, expected_silu, **TOL)
    assert kernels.gelu_tanh(g, out=g) is g
    torch.testing.assert_close(g, expected_gelu, **TOL)


def test_activations_propagate_nan(isa):
    x = torch.full((19,), math.nan)
    assert kernels.silu_mul(x, torch.ones(19)).isnan().all()
    assert kernels.gelu_tanh(x).isnan().all()


def test_activations_reject_bad_inputs():
    with pytest.raises(ValueError, match="one shape"):
        kernels.silu_mul(torch.randn(4), torch.randn(5))
    with pytest.raises(ValueError, match="up has dtype"):
        kernels.silu_mul(torch.randn(4), torch.randn(4, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="contiguous"):
        kernels.gelu_tanh(torch.randn(4, 3).t())
    with pytest.raises(ValueError, match="out has shape"):
        kernels.gelu_tanh(torch.randn(4), out=torch.empty(5))
    buf = torch.randn(9)
    with pytest.raises(ValueError, match="overlaps x"):
        kernels.gelu_tanh(buf[:8], out=buf[1:])


def test_silu_mul_reads_rows_where_they_lie(isa):
    # gate and up as column slices of one fused (rows, 2 * cols) projection output, as batched
    # decode has them; out contiguous. Row strides below n are refused.
    from xcompile import _C

    rows, cols = 5, 100
    fused = torch.randn(rows, 2 * cols + 3) * 4
    up, gate = fused[:, :cols], fused[:, cols : 2 * cols]
    out = torch.full((rows, cols), float("nan"))
    stride = fused.stride(0)
    _C.silu_mul(gate.data_ptr(), up.data_ptr(), out.data_ptr(), cols, rows, stride, stride)
    torch.testing.assert_close(out, kernels.silu_mul_reference(gate, up), **TOL)
    with pytest.raises(ValueError, match="row strides"):
        _C.silu_mul(gate.data_ptr(), up.data_ptr(), out.data_ptr(), cols, rows, cols - 1, stride)


@pytest.mark.parametrize("n", SIZES)
def test_gelu_mul_matches_reference(isa, n):
    """GeGLU (Gemma): gelu_tanh(gate) * up, contiguous and as column slices of a fused
    projection's rows; short row strides refused."""
    from xcompile import _C

    gate, up = _inputs(n, seed=n), torch.randn(n, generator=torch.Generator().manual_seed(-n))
    out = torch.full((n,), float("nan"))
    _C.gelu_mul(gate.data_ptr(), up.data_ptr(), out.data_ptr(), n)
    expected = kernels.gelu_tanh_reference(gate) * up
    torch.testing.assert_close(out, expected, **TOL)
    rows = 3
    fused = torch.randn(rows, 2 * n + 3) * 4
    up2, gate2 = fused[:, :n], fused[:, n : 2 * n]
    out2 = torch.full((rows, n), float("nan"))
    stride = fused.stride(0)
    _C.gelu_mul(gate2.data_ptr(), up2.data_ptr(), out2.data_ptr(), n, rows, stride, stride)
    torch.testing.assert_close(out2, kernels.gelu_tanh_reference(gate2) * up2, **TOL)
    if n > 1:
        with pytest.raises(ValueError, match="row strides"):
            _C.gelu_mul(gate2.data_ptr(), up2.data_ptr(), out2.data_ptr(), n, rows, n - 1, stride)
