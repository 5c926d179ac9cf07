"""The AMX tile kernels (csrc/gemm_tiles.cpp) against the references in runtime/kernels.py.

The kernels' one body runs on the AMX unit and on its C++ model (csrc/tiles.h): the model runs
here on every CPU, so packing, blocking and tails are tested everywhere; the unit is held to the
references and to the model where the CPU has AMX, and those tests skip elsewhere."""

import pytest
import torch

from xcompile import _C
from xcompile.runtime import kernels

from .test_gemv_nbits import ZPS, _weights

AMX = _C.amx_usable()
needs_amx = pytest.mark.skipif(
    not AMX, reason="this CPU (or its OS) has no AMX; the C++ model of the tiles runs instead"
)
UNITS = [True, False] if AMX else [True]  # emulate=True: the model; False: the AMX unit
unit_ids = {True: "model", False: "amx"}


def _bf16_tiles(x, w, bias, emulate):
    m, k = x.shape
    n = w.shape[0]
    out = torch.full((m, n), float("nan"))
    _C.gemm_bf16_tiles(
        x.data_ptr(), w.data_ptr(), 0 if bias is None else bias.data_ptr(), out.data_ptr(),
        m, n, k, emulate,
    )  # fmt: skip
    return out


def _q8_tiles(x, B, scales, zp, bias, bits, bs, k, emulate):
    m, n = x.shape[0], B.shape[0]
    out = torch.full((m, n), float("nan"))
    _C.gemm_nbits_q8_tiles(
        x.data_ptr(), B.data_ptr(), scales.data_ptr(), 0 if zp is None else zp.data_ptr(),
        zp is not None and zp.dtype == torch.float32, 0 if bias is None else bias.data_ptr(),
        out.data_ptr(), m, n, k, bits, bs, emulate,
    )  # fmt: skip
    return out


@pytest.mark.parametrize("emulate", UNITS, ids=lambda e: unit_ids[e])
@pytest.mark.parametrize("k", [32, 96, 1024])
def test_bf16_tiles_match_fp32_reference(emulate, k, threads):
    """x is carried as two bf16 (hi + lo): the result stays within fp32-GEMV tolerances, where
    rounding x once to bf16 (a plain BF16 GEMM) misses them by ~100x."""
    for n in [16, 48]:
        gen = torch.Generator().manual_seed(k + n)
        w = (torch.randn(n, k, generator=gen) / k**0.5).to(torch.bfloat16)
        bias = torch.randn(n, generator=gen)
        for m in [1, 15, 16, 17, 33, 50]:  # one tile, a tile and a row, pairs of tiles, tails
            x = torch.randn(m, k, generator=gen) * 3
            expected = kernels.linear_reference(x, w, bias)
            for t in (1, 2):
                _C.set_num_threads(t)
                got = _bf16_tiles(x, w, bias, emulate)
                error = (got - expected).abs().max().item()
                assert error <= 1e-4, f"M={m} N={n} threads={t}: {error:.3g}"
            once = kernels.linear_reference(x.bfloat16().float(), w, bias)
            assert (once - expected).abs().max().item() > 20 * max(error, 1e-6)
    no_bias = _bf16_tiles(x, w, None, emulate)
    torch.testing.assert_close(no_bias + bias, got, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("emulate", UNITS, ids=lambda e: unit_ids[e])
def test_bf16_tiles_blocking_edges(emulate, threads):
    """The blocking's edges: 5 weight tiles (a block of 3 and one of 2), 150 rows (a group of 8 x
    tiles, then 2 with a tail of 6 rows), K = 2080 (65 steps: a second span of K past the 64 that
    a group of 8 tiles holds in L2, its sums carried over in the scratch)."""
    m, n, k = 150, 80, 2080
    gen = torch.Generator().manual_seed(7)
    w = (torch.randn(n, k, generator=gen) / k**0.5).to(torch.bfloat16)
    bias = torch.randn(n, generator=gen)
    x = torch.randn(m, k, generator=gen) * 3
    expected = kernels.linear_reference(x, w, bias)
    for t in (1, 2):
        _C.set_num_threads(t)
        error = (_bf16_tiles(x, w, bias, emulate) - expected).abs().max().item()
        assert error <= 2e-4, f"threads={t}: {error:.3g}"


@pytest.mark.parametrize("emulate", UNITS, ids=lambda e: unit_ids[e])
@pytest.mark.parametrize("zp_kind", ZPS)
@pytest.mark.parametrize("bits,block", [(8, 64), (8, 256), (8, 512), (4, 128), (4, 256), (4, 512)])
def test_q8_tiles_match_reference(emulate, bits, block, zp_kind, threads):
    """The int8-activation matmul (MatMulNBits' accuracy_level 4) on tiles against the reference
    of the VNNI kernel, whose quantized activations it shares. K = 300 leaves a padded block (512:
    one block per row, as per-channel weights); zero points none, packed uint8 or float32."""
    k = 300
    for n in [16, 32]:
        B, scales, zp, _ = _weights(n, k, bits, block, zp_kind)
        gen = torch.Generator().manual_seed(n + bits)
        bias = torch.randn(n, generator=gen)
        for m in [1, 16, 17, 35]:
            x = torch.randn(m, k, generator=gen) * torch.rand(m, k, generator=gen) * 4
            expected = kernels.linear_nbits_q8_reference(x, B, scales, zp, bits, block, k, bias)
            for t in (1, 2):
                _C.set_num_threads(t)
                got = _q8_tiles(x, B, scales, zp, bias, bits, block, k, emulate)
                error = (got - expected).abs().max()
                assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4), f"M={m}: {error:.3g}"


@needs_amx
def test_amx_unit_equals_its_model():
    """The same dots (integer ones exact) scaled by the same fp32 formula: the unit and its model
    agree to fp32 rounding (the unit's build may fuse a multiply and an add; its BF16 adds may
    round in another order than the model's reading of the SDM)."""
    k, n, m = 512, 64, 40
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=gen)
    w = torch.randn(n, k, generator=gen).to(torch.bfloat16)
    torch.testing.assert_close(
        _bf16_tiles(x, w, None, False), _bf16_tiles(x, w, None, True), rtol=1e-4, atol=1e-4
    )
    for zp_kind in ("uint8", "float"):
        B, scales, zp, _ = _weights(n, k, 8, 128, zp_kind)
        torch.testing.assert_close(
            _q8_tiles(x, B, scales, zp, None, 8, 128, k, False),
            _q8_tiles(x, B, scales, zp, None, 8, 128, k, True),
            rtol=1e-5,
            atol=1e-5,
        )


@needs_amx
def test_amx_isa_takes_tiles_for_prompts():
    """Under the amx ISA, gemv_bf16 hands 4 rows and more (a prompt, or a batched decode step)
    to the tiles, gemv_nbits_q8 5 and more (their results equal the tile kernels' own), and
    fewer rows go to the avx512_bf16 kernels (vdpbf16ps for BF16, VNNI for INT8)."""
    before = _C.isa()
    k, n = 256, 32
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(n, k, generator=gen).to(torch.bfloat16)
    B, scales, zp, _ = _weights(n, k, 8, 128, "none")

    def both(x, isa):
        _C.set_isa(isa)
        try:
            return (
                kernels.linear(x, w),
                kernels.linear_nbits(x, B, scales, zp, 8, 128, k, int8_activations=True),
            )
        finally:
            _C.set_isa(before)

    for m in (1, 3, 4, 5, 16, 20):
        x = torch.randn(m, k, generator=gen)
        bf16, q8 = both(x, "amx")
        below = both(x, "avx512_bf16")
        if m >= 4:
            assert torch.equal(bf16, _bf16_tiles(x, w, None, False))
        else:
            assert torch.equal(bf16, below[0])
        if m >= 5:
            assert torch.equal(q8, _q8_tiles(x, B, scales, zp, None, 8, 128, k, False))
        else:
            assert torch.equal(q8, below[1])


def test_tiles_say_which_shapes_they_take():
    assert _C.gemm_bf16_tiles_supported(32, 64)
    assert not _C.gemm_bf16_tiles_supported(24, 64)
    assert not _C.gemm_bf16_tiles_supported(32, 40)


def test_tiles_refuse_shapes_they_do_not_take():
    x, w = torch.randn(16, 64), torch.randn(24, 64).to(torch.bfloat16)
    with pytest.raises(ValueError, match="multiple of 16"):
        _bf16_tiles(x, w, None, True)
    with pytest.raises(ValueError, match="multiple of 16"):
        _bf16_tiles(torch.randn(16, 40), torch.randn(16, 40).to(torch.bfloat16), None, True)
    B, scales, zp, _ = _weights(3, 256, 8, 128, "none")
    with pytest.raises(ValueError, match="multiple of 16"):
        _q8_tiles(torch.randn(16, 256), B, scales, zp, None, 8, 128, 256, True)


@pytest.mark.skipif(AMX, reason="this CPU has AMX")
def test_without_amx_the_unit_is_refused_by_name():
    x, w = torch.randn(16, 64), torch.randn(16, 64).to(torch.bfloat16)
    with pytest.raises(ValueError, match="no AMX.*emulate=True"):
        _bf16_tiles(x, w, None, False)
    assert "amx" not in _C.supported_isas()
    with pytest.raises(ValueError, match="cannot run ISA 'amx'"):
        _C.set_isa("amx")
