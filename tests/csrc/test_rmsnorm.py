import pytest
import torch

from xcompile.runtime import kernels

COLS = [1, 7, 15, 16, 17, 64, 100, 2048 + 3]


@pytest.mark.parametrize("cols", COLS)
@pytest.mark.parametrize("rows", [1, 3, 33])
def test_rmsnorm_matches_reference(isa, rows, cols):
    gen = torch.Generator().manual_seed(rows * 10007 + cols)
    x = torch.randn(rows, cols, generator=gen) * 3.0
    weight = torch.randn(cols, generator=gen)
    eps = 1e-6
    torch.testing.assert_close(
        kernels.rmsnorm(x, weight, eps),
        kernels.rmsnorm_reference(x, weight, eps),
        rtol=1e-5,
        atol=1e-6,
    )


def test_rmsnorm_leading_dims_in_place_and_threads(isa, threads):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 9, 2051, generator=gen)  # rows * cols large enough to use the pool
    weight = torch.rand(2051, generator=gen) + 0.5
    expected = kernels.rmsnorm_reference(x, weight, 1e-5)
    for n in (1, 2):
        kernels.set_num_threads(n)
        torch.testing.assert_close(kernels.rmsnorm(x, weight, 1e-5), expected, rtol=1e-5, atol=1e-6)
    y = x.clone()
    assert kernels.rmsnorm(y, weight, 1e-5, out=y) is y
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)


def test_rmsnorm_eps_dominates_zero_row(isa):
    x = torch.zeros(2, 33)
    out = kernels.rmsnorm(x, torch.ones(33), 1e-6)
    assert torch.equal(out, torch.zeros(2, 33))


@pytest.mark.parametrize(
    "x, weight, match",
    [
        (torch.randn(2, 8, dtype=torch.float64), torch.randn(8), "dtype"),
        (torch.randn(8, 2).t(), torch.randn(8), "contiguous"),
        (torch.randn(2, 8), torch.randn(7), "shape"),
        (torch.randn(2, 8), torch.randn(8, dtype=torch.bfloat16), "dtype"),
    ],
)
def test_rmsnorm_rejects_bad_inputs(x, weight, match):
    with pytest.raises(ValueError, match=match):
        kernels.rmsnorm(x, weight, 1e-6)


def test_rmsnorm_rejects_wrong_out_shape():
    with pytest.raises(ValueError, match="out has shape"):
        kernels.rmsnorm(torch.randn(2, 8), torch.randn(8), 1e-6, out=torch.empty(2, 9))


SKIP_COLS = [1, 7, 17, 64, 100, 2048 + 3]


@pytest.mark.parametrize("cols", SKIP_COLS)
def test_skip_rmsnorm_matches_reference(isa, cols):
    for rows in (1, 5):
        gen = torch.Generator().manual_seed(rows * 10007 + cols)
        x, skip = torch.randn(2, rows, cols, generator=gen) * 3.0
        weight = torch.randn(cols, generator=gen)
        out, total = kernels.skip_rmsnorm(x, skip, weight, 1e-6)
        expected_out, expected_total = kernels.skip_rmsnorm_reference(x, skip, weight, 1e-6)
        assert torch.equal(total, expected_total)  # one fp32 add, exact on every path
        torch.testing.assert_close(out, expected_out, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sum_into", ["x", "skip"])
def test_skip_rmsnorm_in_place_residual_and_threads(isa, threads, sum_into):
    gen = torch.Generator().manual_seed(1)
    x, skip = torch.randn(2, 3, 11, 2051, generator=gen)  # large enough to use the pool
    weight = torch.rand(2051, generator=gen) + 0.5
    expected_out, expected_total = kernels.skip_rmsnorm_reference(x, skip, weight, 1e-5)
    for n in (1, 2):
        kernels.set_num_threads(n)
        a, b = x.clone(), skip.clone()
        # The decode-loop form: the residual stream updated in place, the normed output written
        # over the other input (it is dead after the add).
        sum_out, out = (a, b) if sum_into == "x" else (b, a)
        got_out, got_total = kernels.skip_rmsnorm(a, b, weight, 1e-5, out=out, sum_out=sum_out)
        assert got_out is out and got_total is sum_out
        assert torch.equal(got_total, expected_total)
        torch.testing.assert_close(got_out, expected_out, rtol=1e-5, atol=1e-6)


def test_skip_rmsnorm_rejects_bad_inputs():
    x, skip, w = torch.randn(2, 8), torch.randn(2, 8), torch.randn(8)
    with pytest.raises(ValueError, match="expected x and skip"):
        kernels.skip_rmsnorm(x, torch.randn(2, 9), w, 1e-6)
    with pytest.raises(ValueError, match="expected x and skip"):
        kernels.skip_rmsnorm(x, skip, torch.randn(9), 1e-6)
    with pytest.raises(ValueError, match="skip has dtype"):
        kernels.skip_rmsnorm(x, skip.double(), w, 1e-6)
    with pytest.raises(ValueError, match="out and sum_out share memory"):
        buf = torch.empty(2, 8)
        kernels.skip_rmsnorm(x, skip, w, 1e-6, out=buf, sum_out=buf)
    with pytest.raises(ValueError, match="overlaps x"):
        big = torch.randn(3, 8)
        kernels.skip_rmsnorm(big[:2], skip, w, 1e-6, sum_out=big[1:])
