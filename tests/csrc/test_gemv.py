import subprocess
import sys

import pytest
import torch

from xcompile import _C
from xcompile.runtime import kernels

from .test_dpbf16 import hi_lo_tolerance

KS = [1, 7, 15, 16, 17, 64, 100, 2048 + 3]
NS = [1, 3, 33, 257]
MS = [1, 2, 3, 4, 5, 17, 128]  # 17, 128: a prompt (avx512_bf16 and amx: the GEMMs)


def _assert_linear_close(got, x, w, b, isa):
    """fp32 tolerances; BF16 weights on vdpbf16ps (avx512_bf16 and amx) carry x as hi + lo bf16,
    held to that split's tolerance (test_dpbf16.py)."""
    expected = kernels.linear_reference(x, w, b)
    tolerance = 1e-5 + 1e-5 * expected.abs()
    if w.dtype == torch.bfloat16 and isa in ("avx512_bf16", "amx"):
        flat = expected.reshape(-1, expected.shape[-1])
        tolerance = hi_lo_tolerance(x.reshape(-1, x.shape[-1]), w, flat).reshape(got.shape)
    error = (got - expected).abs()
    assert got.shape == expected.shape and (error <= tolerance).all(), (
        f"max abs error {error.max().item():.3g}"
    )


def _operands(m, n, k, dtype, bias, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen)
    # Scaled like a trained layer so outputs are O(1) and one tolerance fits every K.
    w = (torch.randn(n, k, generator=gen) / k**0.5).to(dtype)
    b = torch.randn(n, generator=gen) if bias else None
    return x, w, b


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("k", KS)
def test_linear_matches_reference(isa, k, dtype, bias):
    for n in NS:
        for m in MS:
            x, w, b = _operands(m, n, k, dtype, bias, seed=k * 1000 + n * 10 + m)
            _assert_linear_close(kernels.linear(x, w, b), x, w, b, isa)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_linear_threads_agree_and_rows_beyond_block(isa, threads, dtype):
    # M = 9 spans several x-row blocks on every path; N * K is large enough to use the pool.
    x, w, b = _operands(9, 515, 1031, dtype, True, seed=1)
    results = []
    for n in (1, 2):  # more threads than cores would only measure OpenMP's spin-waiting
        kernels.set_num_threads(n)
        results.append(kernels.linear(x, w, b))
        _assert_linear_close(results[-1], x, w, b, isa)
    # Each output is one thread's sum in a fixed order, so the split does not change a bit.
    assert torch.equal(results[0], results[1])


def test_linear_leading_dims_out_and_bf16_bias():
    x, w, _ = _operands(6, 33, 100, torch.bfloat16, False, seed=2)
    b = torch.randn(33).to(torch.bfloat16)
    x = x.reshape(2, 3, 100)
    out = torch.empty(2, 3, 33)
    assert kernels.linear(x, w, b, out=out) is out
    _assert_linear_close(out, x, w, b, kernels.isa())


def test_linear_empty_k_is_bias():
    out = kernels.linear(torch.empty(2, 0), torch.empty(3, 0), torch.tensor([1.0, 2.0, 3.0]))
    assert torch.equal(out, torch.tensor([[1.0, 2.0, 3.0]] * 2))


@pytest.mark.parametrize(
    "x, w, b, match",
    [
        (torch.randn(2, 8, dtype=torch.bfloat16), torch.randn(4, 8), None, "x has dtype"),
        (torch.randn(2, 8), torch.randn(4, 8, dtype=torch.float16), None, "weight has dtype"),
        (torch.randn(2, 8), torch.randn(8, 4).t(), None, "contiguous"),
        (torch.randn(2, 8), torch.randn(4, 7), None, "do not match"),
        (torch.randn(2, 8), torch.randn(4, 8), torch.randn(5), "bias has shape"),
    ],
)
def test_linear_rejects_bad_inputs(x, w, b, match):
    with pytest.raises(ValueError, match=match):
        kernels.linear(x, w, b)


def test_linear_rejects_out_aliasing_x():
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match="shares memory"):
        kernels.linear(x, torch.randn(4, 4), out=x)


def test_set_isa_rejects_unknown_and_unsupported_names():
    before = _C.isa()
    unsupported = [n for n in ("amx", "avx512_bf16") if n not in _C.supported_isas()]
    for name in ("avx1024", "", *unsupported):
        with pytest.raises(ValueError, match="choose one of: scalar"):
            _C.set_isa(name)
    assert _C.isa() == before
    assert _C.supported_isas()[0] == "scalar" and before == _C.supported_isas()[-1]


def test_set_num_threads_rejects_zero():
    with pytest.raises(ValueError, match=">= 1"):
        _C.set_num_threads(0)


def test_extension_does_not_link_libtorch():
    dynamic = subprocess.run(
        ["readelf", "-d", _C.__file__], capture_output=True, text=True, check=True
    ).stdout
    needed = [line for line in dynamic.splitlines() if "(NEEDED)" in line]
    assert needed, dynamic
    assert not [lib for lib in needed if "torch" in lib or "c10" in lib], needed
    # And importing it pulls in no torch either.
    probe = "import sys, xcompile._C; print('torch' in sys.modules)"
    assert (
        subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, check=True
        ).stdout.strip()
        == "False"
    )
