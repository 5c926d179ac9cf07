"""A prompt's matmul on narrow weights (fused_ops.paneled_linear): the weight widened a panel of
rows at a time, each multiplied by torch's GEMM, equals the matmul on the whole widened weight."""

import pytest
import torch

from xcompile.runtime import fused_ops, kernels
from xcompile.runtime.plan import linear_step

from ..csrc.test_gemv_nbits import ZPS, _weights


@pytest.fixture
def small_panels(monkeypatch):
    monkeypatch.setattr(fused_ops, "PANEL_ROWS", 64)  # several panels, and a partial last one


@pytest.mark.parametrize("n", [10, 64, 150])
def test_bf16_prompt_matmul_equals_widened_weight(small_panels, n):
    gen = torch.Generator().manual_seed(n)
    k = 96
    weight = torch.randn(n, k, generator=gen).to(torch.bfloat16)
    step = linear_step(weight, use_kernels=True)
    for shape in [(70, k), (2, 40, k)]:  # past the GEMV's rows, with and without a batch dim
        x = torch.randn(shape, generator=gen)
        got = step(x)
        expected = torch.nn.functional.linear(x, weight.float())
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("zp_kind", ZPS)
@pytest.mark.parametrize("bits", [4, 8])
def test_nbits_prompt_matmul_dequantizes_by_panels(small_panels, bits, zp_kind):
    """MatMulNBits on fp32 activations for many rows: each panel dequantized from its own rows'
    blocks, scales and zero points (packed uint8: a row's bytes; float32: 4 bytes a block)."""
    n, k, block = 150, 300, 32
    B, scales, zp, _ = _weights(n, k, bits, block, zp_kind)
    gen = torch.Generator().manual_seed(bits)
    bias = torch.randn(n, generator=gen)
    x = torch.randn(1, 80, k, generator=gen)
    matmul = fused_ops.fast_op(("com.microsoft", "MatMulNBits"))
    got = matmul(x, B, scales, zp, None, bias, K=k, N=n, bits=bits, block_size=block)
    expected = kernels.linear_nbits_reference(x, B, scales, zp, bits, block, k, bias)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # the plan's reference op (xrun --reference) reads the same zero points
    reference = fused_ops.REFERENCE[("com.microsoft", "MatMulNBits")]
    plain = reference(x, B, scales, zp, None, bias, K=k, N=n, bits=bits, block_size=block)
    torch.testing.assert_close(plain, expected, rtol=1e-5, atol=1e-5)
