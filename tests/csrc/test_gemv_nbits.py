"""gemv_nbits / dequantize_nbits (csrc/gemv_nbits.cpp) on every ISA path against the torch
references in runtime/kernels.py, on random MatMulNBits weights (ONNX Runtime's layout)."""

import functools

import pytest
import torch

from xcompile.runtime import kernels

KS = [16, 17, 100, 2048 + 16, 5632]
NS = [1, 3, 33, 257]
MS = [1, 3, 8]
BLOCKS = ["16", "32", "128", "channel"]
# zero points: none (2^(bits-1)), packed uint8, or float32 (N, k_blocks) like the scales
ZPS = ["none", "uint8", "float"]


def _block_size(block: str, k: int) -> int:
    if block != "channel":
        return int(block)
    return max(16, 1 << (k - 1).bit_length())  # per-channel: the next power of two >= K


@functools.cache
def _weights(n: int, k: int, bits: int, block_size: int, zp: str):
    """Random MatMulNBits weights (every byte random, padding past K included, so a kernel that
    reads the padding gets a wrong answer) scaled so outputs are O(1), and the reference's
    dequantized W (N, K). zp: one of ZPS; float zero points are off the integer grid and spread a
    little past [0, 2^bits - 1], so that ignoring them (2^(bits-1)) or reading their bytes as
    packed uint8 gives other weights. Cached across ISA paths."""
    gen = torch.Generator().manual_seed(k * 1000 + n * 10 + bits + ZPS.index(zp))
    k_blocks = -(-k // block_size)

    def random_bytes(*shape: int) -> torch.Tensor:
        return torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)

    B = random_bytes(n, k_blocks, block_size * bits // 8)
    spread = (1 << bits) / 12**0.5  # std of a uniform q - zp
    scales = (torch.rand(n, k_blocks, generator=gen) + 0.5) / (spread * k**0.5)
    zero_points = {
        "none": lambda: None,
        "uint8": lambda: random_bytes(n, k_blocks if bits == 8 else -(-k_blocks // 2)),
        "float": lambda: torch.rand(n, k_blocks, generator=gen) * ((1 << bits) + 1) - 1,
    }[zp]()
    w_q = kernels.dequantize_nbits_reference(B, scales, zero_points, bits, block_size, k)
    return B, scales, zero_points, w_q


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("zp_kind", ZPS)
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("bits", [4, 8])
def test_linear_nbits_and_dequantize_match_reference(isa, bits, block, zp_kind, k):
    bs = _block_size(block, k)
    for n in NS:
        B, scales, zp, w_q = _weights(n, k, bits, bs, zp_kind)
        assert torch.equal(kernels.dequantize_nbits(B, scales, zp, bits, bs, k), w_q), f"N={n}"
        gen = torch.Generator().manual_seed(n)
        bias = torch.randn(n, generator=gen)
        for m in MS:
            x = torch.randn(m, k, generator=gen)
            for b in (None, bias):
                got = kernels.linear_nbits(x, B, scales, zp, bits, bs, k, bias=b)
                expected = torch.nn.functional.linear(x, w_q, b)  # linear_nbits_reference, cached W
                # torch.allclose, not assert_close: same test, a tenth of the cost.
                ok = got.shape == expected.shape and torch.allclose(
                    got, expected, rtol=1e-4, atol=1e-4
                )
                error = (got - expected).abs().max()
                assert ok, f"N={n} M={m} bias={b is not None}: max abs error {error:.3g}"


@pytest.mark.parametrize("zp_kind", ZPS)
@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_reference_round_trips(bits, zp_kind):
    # K = 100 over blocks of 32: a partial last block, an odd k_blocks for INT4 zero points.
    w = torch.randn(33, 100)
    sym, floating = zp_kind == "none", zp_kind == "float"
    B, scales, zp = kernels.quantize_nbits_reference(w, bits, 32, sym, float_zero_points=floating)
    assert B.shape == (33, 4, 32 * bits // 8) and scales.shape == (33, 4)
    assert (zp is None) == sym
    if zp_kind == "uint8":
        assert zp.dtype == torch.uint8 and zp.shape == (33, 4 if bits == 8 else 2)
    if floating:  # the blocks' own minima, off the integer grid
        assert zp.dtype == torch.float32 and zp.shape == (33, 4)
        assert (zp != zp.round()).float().mean() > 0.9
    w_q = kernels.dequantize_nbits_reference(B, scales, zp, bits, 32, 100)
    step = scales.repeat_interleave(32, dim=1)[:, :100]
    assert ((w_q - w).abs() <= 0.5001 * step).all()  # round to nearest
    x, bias = torch.randn(2, 100), torch.randn(33)
    torch.testing.assert_close(
        kernels.linear_nbits_reference(x, B, scales, zp, bits, 32, 100, bias), x @ w_q.T + bias
    )


@pytest.mark.parametrize("bs", [32, 128])
@pytest.mark.parametrize("zp_kind", ["uint8", "float"])
@pytest.mark.parametrize("bits", [4, 8])
def test_threads_agree(isa, threads, bits, zp_kind, bs):
    # N * K large enough for the pool; M = 8 spans several x-row chunks on every path.
    k, n = 2048 + 16, 257
    B, scales, zp, w_q = _weights(n, k, bits, bs, zp_kind)
    x, bias = torch.randn(8, k), torch.randn(n)
    outs, deqs = [], []
    for t in (1, 2):
        kernels.set_num_threads(t)
        outs.append(
            [
                kernels.linear_nbits(x, B, scales, zp, bits, bs, k, bias=bias, int8_activations=q8)
                for q8 in (False, True)
            ]
        )
        deqs.append(kernels.dequantize_nbits(B, scales, zp, bits, bs, k))
    # Each output is one thread's sum in a fixed order, so the split does not change a bit.
    assert all(torch.equal(a, b) for a, b in zip(outs[0], outs[1], strict=True))
    assert torch.equal(deqs[0], deqs[1]) and torch.equal(deqs[0], w_q)


def test_linear_nbits_leading_dims_out_and_empty_k():
    B, scales, zp, w_q = _weights(3, 17, 8, 16, "none")
    x = torch.randn(2, 2, 17)
    out = torch.empty(2, 2, 3)
    assert kernels.linear_nbits(x, B, scales, zp, 8, 16, 17, out=out) is out
    torch.testing.assert_close(out, x @ w_q.T, rtol=1e-4, atol=1e-4)
    bias = torch.tensor([1.0, 2.0, 3.0])
    B, scales = torch.empty(3, 0, 16, dtype=torch.uint8), torch.empty(3, 0)
    got = kernels.linear_nbits(torch.empty(2, 0), B, scales, None, 8, 16, 0, bias=bias)
    assert torch.equal(got, torch.tensor([[1.0, 2.0, 3.0]] * 2))


def _bad(**changes):
    args = {
        "x": torch.randn(2, 100),
        "B": torch.zeros(5, 4, 16, dtype=torch.uint8),
        "scales": torch.ones(5, 4),
        "zero_points": torch.zeros(5, 2, dtype=torch.uint8),
        "bits": 4,
        "block_size": 32,
        "K": 100,
    }
    args.update(changes)
    return args


@pytest.mark.parametrize(
    "args, match",
    [
        (_bad(bits=3), "bits is 3"),
        (_bad(block_size=48), "power of two"),
        (_bad(B=torch.zeros(5, 4, 32, dtype=torch.uint8)), r"expected \(N, 4, 16\)"),
        (_bad(B=torch.zeros(5, 4, 16, dtype=torch.int8)), "B has dtype"),
        (_bad(scales=torch.ones(5, 3)), r"expected \(5, 4\)"),
        (_bad(zero_points=torch.zeros(5, 4, dtype=torch.uint8)), "two 4-bit zero points"),
        (_bad(zero_points=torch.zeros(5, 2)), r"expected \(5, 4\) \(float zero points"),
        (_bad(zero_points=torch.zeros(5, 4, dtype=torch.float64)), "zero_points has dtype"),
        (_bad(x=torch.randn(2, 99)), r"expected \(..., 100\)"),
        (_bad(x=torch.randn(2, 100, dtype=torch.float64)), "x has dtype"),
    ],
)
def test_linear_nbits_rejects_bad_inputs(args, match):
    with pytest.raises(ValueError, match=match):
        kernels.linear_nbits(**args)


# K: a partial block (100, 577: odd), fewer blocks than one group of 16, 16 and a tail (2064)
@pytest.mark.parametrize("k", [17, 100, 577, 2048 + 16, 5632])
@pytest.mark.parametrize("zp_kind", ZPS)
# 16, 32 (INT8, INT4), 64 (INT4): several blocks to a 64-byte chunk (gemv_nbits_vnni_small.cpp)
@pytest.mark.parametrize("block", ["16", "32", "64", "128", "256", "channel"])
@pytest.mark.parametrize("bits", [4, 8])
def test_linear_nbits_int8_activations_match_reference(isa, bits, block, zp_kind, k):
    """accuracy_level 4: the VNNI kernels (or their scalar reference) against the activations as
    the kernel rounds them times the exact weights, in float64."""
    bs = _block_size(block, k)
    for n in [1, 5, 67]:  # 67: tasks of 4 weight rows, then 3
        B, scales, zp, w_q = _weights(n, k, bits, bs, zp_kind)
        gen = torch.Generator().manual_seed(n)
        bias = torch.randn(n, generator=gen)
        # the one-row kernels, batched decode (2..4), prompts (5, 17: groups of 4 x rows and less)
        for m in [1, 2, 3, 4, 5, 17]:
            x = torch.randn(m, k, generator=gen) * torch.rand(m, k, generator=gen) * 4
            got = kernels.linear_nbits(
                x, B, scales, zp, bits, bs, k, bias=bias, int8_activations=True
            )
            expected = kernels.linear_nbits_q8_reference(x, B, scales, zp, bits, bs, k, bias)
            error = (got - expected).abs().max()
            assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4), f"N={n} M={m}: {error:.3g}"
            # and within int8 rounding of the exact product: |error| <= 1% of |x_m| |w_n|
            exact = kernels.linear_nbits_reference(x, B, scales, zp, bits, bs, k, bias)
            bound = 0.01 * x.norm(dim=1, keepdim=True) * w_q.norm(dim=1)
            assert ((got - exact).abs() <= bound).all()


@pytest.mark.parametrize("bs", [32, 128])
@pytest.mark.parametrize("int8_activations", [False, True], ids=["fp32-x", "int8-x"])
@pytest.mark.parametrize("bits", [4, 8])
def test_float_zero_points_are_neither_ignored_nor_read_as_bytes(isa, bits, int8_activations, bs):
    """The other tests' float zero points are not a case the uint8 reading passes by chance: the
    kernels' result sits on the float reference, far from both misreadings (2^(bits-1) and the
    float's bytes as packed uint8 zero points)."""
    # 17 (65) blocks: 16 (64) for the VNNI kernels' lanes, then a tail
    k, n = 2048 + 16, 64
    B, scales, zp, _ = _weights(n, k, bits, bs, "float")
    x = torch.randn(4, k, generator=torch.Generator().manual_seed(bits))
    got = kernels.linear_nbits(x, B, scales, zp, bits, bs, k, int8_activations=int8_activations)
    if int8_activations:
        expected = kernels.linear_nbits_q8_reference(x, B, scales, zp, bits, bs, k)
    else:
        expected = kernels.linear_nbits_reference(x, B, scales, zp, bits, bs, k)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4)
    k_blocks = scales.shape[1]
    as_bytes = zp.view(torch.uint8)[:, : k_blocks if bits == 8 else -(-k_blocks // 2)]
    for wrong in (None, as_bytes.contiguous()):
        misread = kernels.linear_nbits_reference(x, B, scales, wrong, bits, bs, k)
        assert (got - misread).abs().max() > 100 * (got - expected).abs().max() + 0.1


@pytest.mark.parametrize("zp_kind", ZPS)
@pytest.mark.parametrize("block", ["16", "32", "64", "128", "channel"])
@pytest.mark.parametrize("bits", [4, 8])
def test_prompt_gemm_matches_reference(isa, bits, block, zp_kind):
    """Prompts (16 rows and more) take the panel GEMM on AVX512_VNNI (gemm_nbits_vnni.cpp):
    held to the same float64 reference as the decode kernels, across a partial last panel
    (N = 67: 32 + 32 + 3 columns), row counts off the 4-row step, and K off the block."""
    from xcompile import _C

    for k, n, m in [(100, 67, 17), (2048 + 16, 33, 16), (576, 96, 128), (5632, 5, 18)]:
        bs = _block_size(block, k)
        B, scales, zp, w_q = _weights(n, k, bits, bs, zp_kind)
        gen = torch.Generator().manual_seed(m)
        x = torch.randn(m, k, generator=gen) * torch.rand(m, k, generator=gen) * 4
        bias = torch.randn(n, generator=gen)
        got = kernels.linear_nbits(x, B, scales, zp, bits, bs, k, bias=bias, int8_activations=True)
        expected = kernels.linear_nbits_q8_reference(x, B, scales, zp, bits, bs, k, bias)
        error = (got - expected).abs().max()
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4), (
            f"K={k} N={n} M={m}: {error:.3g}"
        )
        # the panel path really ran where this ISA has it (else the decode kernels did)
        assert _C.gemm_nbits_vnni_supported(bits, bs) == (isa not in ("scalar", "avx2", "avx512"))
