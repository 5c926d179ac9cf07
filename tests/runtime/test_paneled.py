"""A prompt's matmul on narrow weights (fused_ops.paneled_linear): the weight widened a panel of
rows at a time, each multiplied by numpy's GEMM, equals the matmul on the whole widened weight."""

import pytest
import torch

from xcompile import _C
from xcompile.runtime import fused_ops, kernels, reference_ops
from xcompile.runtime.arrays import from_torch
from xcompile.runtime.plan import linear_step

from ..csrc.test_gemv_nbits import ZPS, _weights


@pytest.fixture
def small_panels(monkeypatch):
    monkeypatch.setattr(fused_ops, "PANEL_ROWS", 64)  # several panels, and a partial last one


@pytest.fixture
def below_bf16():
    """Panels are the BF16 prompt path below avx512_bf16 (from there on, the kernel's GEMM)."""
    before = _C.isa()
    _C.set_isa([i for i in _C.supported_isas() if i not in ("avx512_bf16", "amx")][-1])
    yield
    _C.set_isa(before)


@pytest.mark.parametrize("n", [10, 64, 150])
def test_bf16_prompt_matmul_equals_widened_weight(small_panels, below_bf16, n):
    gen = torch.Generator().manual_seed(n)
    k = 96
    weight = torch.randn(n, k, generator=gen).to(torch.bfloat16)
    step = linear_step(from_torch(weight), use_kernels=True)
    for shape in [(70, k), (2, 40, k)]:  # past the GEMV's rows, with and without a batch dim
        x = torch.randn(shape, generator=gen)
        got = torch.from_numpy(step(x.numpy()))
        expected = torch.nn.functional.linear(x, weight.float())
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_bf16_prompts_take_the_dp_gemm_from_avx512_bf16_on():
    """linear_step hands a prompt on BF16 weights to gemv_bf16, whose vdpbf16ps GEMM carries x
    as hi + lo bf16 (tests/csrc/test_dpbf16.py holds it to the reference)."""
    if "avx512_bf16" not in _C.supported_isas():
        pytest.skip("this CPU has no AVX512_BF16")
    before = _C.isa()
    _C.set_isa("avx512_bf16")
    try:
        gen = torch.Generator().manual_seed(3)
        weight = torch.randn(150, 96, generator=gen).to(torch.bfloat16)
        x = torch.randn(2, 40, 96, generator=gen)
        got = torch.from_numpy(linear_step(from_torch(weight), use_kernels=True)(x.numpy()))
        direct = torch.empty(80, 150)
        _C.gemm_bf16_dp(x.data_ptr(), weight.data_ptr(), 0, direct.data_ptr(), 80, 150, 96, False)
        assert torch.equal(got.reshape(80, 150), direct)
    finally:
        _C.set_isa(before)


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
    args = [from_torch(a) for a in (x, B, scales, zp, None, bias)]
    got = torch.from_numpy(matmul(*args, K=k, N=n, bits=bits, block_size=block))
    expected = kernels.linear_nbits_reference(x, B, scales, zp, bits, block, k, bias)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # the plan's reference op (xrun --reference) reads the same zero points
    reference = reference_ops.REFERENCE[("com.microsoft", "MatMulNBits")]
    plain = reference(x, B, scales, zp, None, bias, K=k, N=n, bits=bits, block_size=block)
    torch.testing.assert_close(plain, expected, rtol=1e-5, atol=1e-5)
