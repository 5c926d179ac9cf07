"""vdpbf16ps (csrc/dpbf16.h) and the BF16-weight kernels written on it (csrc/gemm_dpbf16.cpp).

The kernels' one body runs on the instruction and on its C++ model: the model runs here on every
CPU, so blocking, packing and tails are tested everywhere; where the CPU has AVX512_BF16 the
instruction is held to the model bit for bit, and those tests skip elsewhere. x is carried as
hi + lo bf16, so results are held to the double-precision reference within the split's bound
(each product within 2^-16 of x w) plus fp32's accumulation."""

import numpy as np
import pytest
import torch

from xcompile import _C
from xcompile.runtime import kernels

HARDWARE = _C.dpbf16_usable()
needs_hardware = pytest.mark.skipif(
    not HARDWARE, reason="this CPU has no AVX512_BF16; the C++ model of vdpbf16ps runs instead"
)
UNITS = [True, False] if HARDWARE else [True]  # emulate=True: the model; False: the instruction
unit_ids = {True: "model", False: "vdpbf16ps"}
KERNELS = {"gemv": _C.gemv_bf16_dp, "gemm": _C.gemm_bf16_dp}


def _dp(acc, a, b, emulate):
    """One vdpbf16ps: acc (16) fp32, a and b (32) bf16 -> (16) fp32."""
    out = torch.full((16,), float("nan"))
    _C.dpbf16ps(acc.data_ptr(), a.data_ptr(), b.data_ptr(), out.data_ptr(), emulate)
    return out


def _sdm(acc, a, b, odd_first=True):
    """The SDM's operation section in numpy, for normal numbers whose sums double holds exactly:
    per lane, acc + a[2i+1] b[2i+1], rounded to fp32, then + a[2i] b[2i], rounded."""
    a, b = a.float().double().numpy(), b.float().double().numpy()
    c = acc.double().numpy()
    first, second = (1, 0) if odd_first else (0, 1)
    out = np.empty(16, np.float32)
    for i in range(16):
        s = np.float32(c[i] + a[2 * i + first] * b[2 * i + first])
        out[i] = np.float32(np.float64(s) + a[2 * i + second] * b[2 * i + second])
    return torch.from_numpy(out)


def test_model_follows_the_sdm_order_of_roundings():
    """Two FMAs per lane, the odd pair's first: the other order, or one rounding of both
    products, would differ in a few lanes of these sums (~1 in 30)."""
    gen = torch.Generator().manual_seed(0)
    other = 0
    for _ in range(200):
        a, b = torch.randn(32, generator=gen).bfloat16(), torch.randn(32, generator=gen).bfloat16()
        acc = torch.randn(16, generator=gen) * torch.rand(16, generator=gen).mul(8).exp2()
        got = _dp(acc, a, b, emulate=True)
        assert torch.equal(got, _sdm(acc, a, b))
        other += int((got != _sdm(acc, a, b, odd_first=False)).sum())
    assert other > 30


def test_model_treats_denormals_as_zero():
    tiny = torch.tensor(1e-39).bfloat16()  # a bf16 denormal
    assert tiny.item() != 0 and abs(tiny.item()) < torch.finfo(torch.float32).tiny
    a = torch.zeros(32, dtype=torch.bfloat16)
    b = torch.zeros(32, dtype=torch.bfloat16)
    a[0], b[0] = tiny, torch.tensor(2.0**100).bfloat16()  # lane 0: a denormal input counts as 0
    a[2], b[2] = 2.0**-70, 2.0**-70  # lane 1: 2^-140, a denormal result, flushes to 0
    a[4], b[4] = 2.0**-60, 2.0**-60  # lane 2: 2^-120, normal
    a[8], b[8] = 2.0**-62, 2.0**-63  # lane 4: 2^-125 onto a denormal accumulator, 2^-127,
    acc = torch.zeros(16)  # that counts as 0
    acc[4] = 2.0**-127
    got = _dp(acc, a, b, emulate=True)
    assert got[0] == 0 and got[1] == 0 and got[2] == 2.0**-120 and got[4] == 2.0**-125
    if HARDWARE:
        assert torch.equal(_dp(acc, a, b, emulate=False).view(torch.int32), got.view(torch.int32))


@needs_hardware
def test_model_equals_the_instruction_bit_for_bit():
    """Normal data at every scale, denormal ranges, and raw random bits (NaN payloads are not
    modelled: a NaN lane need only be NaN on both)."""
    gen = torch.Generator().manual_seed(1)
    for trial in range(4000):
        if trial % 4 == 0:
            a, b = (
                torch.randint(-(2**15), 2**15, (32,), generator=gen, dtype=torch.int16).view(
                    torch.bfloat16
                )
                for _ in range(2)
            )
            acc = torch.randint(-(2**31), 2**31, (16,), generator=gen, dtype=torch.int64)
            acc = acc.to(torch.int32).view(torch.float32)
        else:
            scale = (1.0, 1e-19, 1e-20)[trial % 4 - 1]  # products near fp32's denormals
            a = (torch.randn(32, generator=gen) * scale).bfloat16()
            b = (torch.randn(32, generator=gen) * scale).bfloat16()
            magnitude = torch.rand(16, generator=gen).mul(16).exp2()
            acc = torch.randn(16, generator=gen) * magnitude * scale**2
        model, unit = _dp(acc, a, b, True), _dp(acc, a, b, False)
        same = (model.view(torch.int32) == unit.view(torch.int32)) | (model.isnan() & unit.isnan())
        assert same.all(), f"trial {trial}: lanes {(~same).nonzero().flatten().tolist()}"


def _call(kernel, x, w, bias, emulate):
    m, k = x.shape
    n = w.shape[0]
    out = torch.full((m, n), float("nan"))
    KERNELS[kernel](
        x.data_ptr(), w.data_ptr(), 0 if bias is None else bias.data_ptr(), out.data_ptr(),
        m, n, k, emulate,
    )  # fmt: skip
    return out


def hi_lo_tolerance(x, w, expected):
    """What carrying x as hi + lo costs, per output: each product x w off by at most 2^-16 x w,
    about 2^-18 x w on average and of either sign, so the error sums like a random walk:
    3 * 2^-16 * ||x * w||_2 (~12 of its standard deviations; the whole worst case up to K = 9)
    plus the fp32 tolerance the fp32 paths are held to."""
    walk = ((x.double() ** 2) @ (w.double() ** 2).T).sqrt().float()
    return 3 * 2.0**-16 * walk + 1e-5 + 1e-5 * expected.abs()


def _operands(m, n, k, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen) * 3
    w = (torch.randn(n, k, generator=gen) / k**0.5).bfloat16()
    return x, w, torch.randn(n, generator=gen)


@pytest.mark.parametrize("emulate", UNITS, ids=lambda e: unit_ids[e])
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("k", [1, 2, 31, 32, 33, 64, 65, 100, 1027])
def test_kernels_match_reference(kernel, k, emulate):
    """K on and off the 32-column steps (odd K: a half pair); N on and off the prompt GEMM's
    16-column vectors and 64-column panels; M 1 .. 5 (the decode kernel's 4-row chunks), 17
    (the GEMM's 6-row tiles and a tail)."""
    for n in [1, 3, 16, 17, 64, 65, 130]:
        for m in [1, 2, 3, 4, 5, 17]:
            x, w, bias = _operands(m, n, k, seed=k * 1000 + n * 10 + m)
            expected = kernels.linear_reference(x, w, bias)
            got = _call(kernel, x, w, bias, emulate)
            error = (got - expected).abs()
            assert (error <= hi_lo_tolerance(x, w, expected)).all(), (
                f"M={m} N={n}: {error.max().item():.3g}"
            )


@pytest.mark.parametrize("emulate", UNITS, ids=lambda e: unit_ids[e])
def test_prompt_gemm_on_a_prompt(emulate, threads):
    """M = 128 rows (21 full 6-row tiles and a 2-row one), panels split between threads: the
    threads' share does not change a bit; no bias writes the sums alone."""
    x, w, bias = _operands(128, 200, 300, seed=5)
    expected = kernels.linear_reference(x, w, bias)
    results = []
    for t in (1, 2):
        _C.set_num_threads(t)
        results.append(_call("gemm", x, w, bias, emulate))
        assert ((results[-1] - expected).abs() <= hi_lo_tolerance(x, w, expected)).all()
    assert torch.equal(results[0], results[1])
    torch.testing.assert_close(_call("gemm", x, w, None, emulate) + bias, results[0])


@pytest.mark.parametrize("kernel", KERNELS)
def test_lo_half_is_needed(kernel):
    """x rounded once to bf16 (a plain BF16 matmul, llama.cpp's) misses the tolerance by far."""
    x, w, bias = _operands(17, 64, 512, seed=7)
    expected = kernels.linear_reference(x, w, bias)
    tolerance = hi_lo_tolerance(x, w, expected)
    assert ((_call(kernel, x, w, bias, True) - expected).abs() <= tolerance).all()
    once = kernels.linear_reference(x.bfloat16().float(), w, bias)
    assert ((once - expected).abs() / tolerance).max() > 10


@needs_hardware
@pytest.mark.parametrize("kernel", KERNELS)
def test_instruction_kernels_equal_the_model(kernel):
    """Same operations in the same order on both: equal bit for bit, tails included."""
    for m, n, k in [(1, 5, 2051), (4, 64, 96), (5, 33, 31), (17, 130, 100), (128, 67, 64)]:
        x, w, bias = _operands(m, n, k, seed=m + n + k)
        assert torch.equal(_call(kernel, x, w, bias, False), _call(kernel, x, w, bias, True))


def test_bf16_isa_takes_the_dp_kernels():
    """Under avx512_bf16, gemv_bf16 hands fewer than 8 rows to the streaming GEMV and 8 and
    more to the prompt GEMM (their results equal the kernels' own)."""
    if "avx512_bf16" not in _C.supported_isas():
        pytest.skip("this CPU has no AVX512_BF16")
    before = _C.isa()
    try:
        _C.set_isa("avx512_bf16")
        for m, kernel in [(1, "gemv"), (7, "gemv"), (8, "gemm"), (40, "gemm")]:
            x, w, bias = _operands(m, 48, 96, seed=m)
            assert torch.equal(kernels.linear(x, w, bias), _call(kernel, x, w, bias, False))
    finally:
        _C.set_isa(before)


@pytest.mark.skipif(HARDWARE, reason="this CPU has AVX512_BF16")
def test_without_the_instruction_it_is_refused_by_name():
    x, w, _ = _operands(2, 16, 64, seed=0)
    for kernel in KERNELS:
        with pytest.raises(ValueError, match="no AVX512_BF16.*emulate=True"):
            _call(kernel, x, w, None, False)
    assert "avx512_bf16" not in _C.supported_isas()
