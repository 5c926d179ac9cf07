"""runtime/kernels.py's wrappers on numpy arrays (the slim runtime's way to call them: no torch),
bf16 as ml_dtypes.bfloat16, held to the torch references; and importing them imports no torch."""

import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
import torch

from xcompile.runtime import kernels


def _tensor(a: np.ndarray) -> torch.Tensor:
    """The torch tensor viewing a numpy array (bf16 through int16), for the references."""
    if a.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def _close(got: np.ndarray, expected: torch.Tensor, tol: float = 1e-5) -> None:
    assert type(got) is np.ndarray and got.dtype == np.float32
    torch.testing.assert_close(torch.from_numpy(got), expected, rtol=tol, atol=tol)


def test_importing_the_kernels_imports_no_torch():
    code = "import sys, xcompile.runtime.kernels; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_rmsnorm_and_skip_rmsnorm_on_numpy(isa):
    rng = np.random.default_rng(0)
    x, skip = rng.standard_normal((2, 3, 40), dtype=np.float32)
    weight = rng.standard_normal(40, dtype=np.float32)
    _close(
        kernels.rmsnorm(x, weight, 1e-6),
        kernels.rmsnorm_reference(_tensor(x), _tensor(weight), 1e-6),
    )
    normed, total = kernels.skip_rmsnorm_reference(_tensor(x), _tensor(skip), _tensor(weight), 1e-6)
    out = np.empty_like(x)
    got, got_sum = kernels.skip_rmsnorm(x.copy(), skip, weight, 1e-6, out=out, sum_out=skip)
    assert got is out and got_sum is skip  # the buffers given come back, the residual in place
    _close(got, normed)
    _close(got_sum, total)


@pytest.mark.parametrize("weight_dtype", [np.float32, ml_dtypes.bfloat16], ids=["f32", "bf16"])
def test_linear_on_numpy(isa, weight_dtype):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 72), dtype=np.float32)
    weight = rng.standard_normal((33, 72), dtype=np.float32).astype(weight_dtype)
    bias = rng.standard_normal(33, dtype=np.float32).astype(ml_dtypes.bfloat16)
    expected = kernels.linear_reference(_tensor(x), _tensor(weight), _tensor(bias))
    _close(kernels.linear(x, weight, bias), expected, tol=1e-4)
    assert np.array_equal(
        kernels.linear(np.zeros((2, 0), np.float32), weight[:, :0], bias),
        np.broadcast_to(bias.astype(np.float32), (2, 33)),
    )


@pytest.mark.parametrize("bits", [4, 8])
def test_nbits_kernels_on_numpy(isa, bits):
    w = torch.randn(24, 100, generator=torch.Generator().manual_seed(bits))
    B, scales, zero_points = (
        t.numpy() for t in kernels.quantize_nbits_reference(w, bits, 32, False)
    )
    ref_args = (_tensor(B), _tensor(scales), _tensor(zero_points), bits, 32, 100)
    x = np.random.default_rng(2).standard_normal((2, 100), dtype=np.float32)
    got = kernels.linear_nbits(x, B, scales, zero_points, bits, 32, 100)
    _close(got, kernels.linear_nbits_reference(_tensor(x), *ref_args), tol=1e-4)
    w_ref = kernels.dequantize_nbits_reference(*ref_args)
    assert torch.equal(
        torch.from_numpy(kernels.dequantize_nbits(B, scales, zero_points, bits, 32, 100)), w_ref
    )
    ids = np.array([[3, -1], [24, 0]], dtype=np.int64)
    rows = kernels.gather_nbits(B, scales, zero_points, ids, bits, 32, 100)
    expected = kernels.gather_nbits_reference(*ref_args[:3], _tensor(ids), bits, 32, 100)
    assert rows.shape == (2, 2, 100) and torch.equal(torch.from_numpy(rows), expected)


def test_rotary_and_activations_on_numpy(isa):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 2, 16), dtype=np.float32)
    cos, sin = rng.standard_normal((2, 5, 6), dtype=np.float32)
    for interleaved in (False, True):
        expected = kernels.rotary_reference(_tensor(x), _tensor(cos), _tensor(sin), interleaved)
        _close(kernels.rotary(x, cos, sin, interleaved), expected)
    gate, up = rng.standard_normal((2, 3, 50), dtype=np.float32)
    _close(kernels.silu_mul(gate, up), kernels.silu_mul_reference(_tensor(gate), _tensor(up)))
    expected = kernels.gelu_tanh_reference(_tensor(gate))
    assert kernels.gelu_tanh(gate, out=gate) is gate  # in place
    _close(gate, expected)


@pytest.mark.parametrize("cache_dtype", [np.float32, ml_dtypes.bfloat16], ids=["f32", "bf16"])
def test_attention_on_numpy(isa, cache_dtype):
    rng = np.random.default_rng(4)
    q = rng.standard_normal((3, 4, 16), dtype=np.float32)
    k, v = rng.standard_normal((2, 2, 12, 16), dtype=np.float32).astype(cache_dtype)
    expected = kernels.attention_reference(_tensor(q), _tensor(k), _tensor(v), 5, 0.25, softcap=2.0)
    _close(kernels.attention(q, k, v, 5, 0.25, softcap=2.0), expected)
    slot_of = np.zeros(8, np.int32)  # every position from slot 0: the plain cache
    got = kernels.attention(q, k[None], v[None], 5, 0.25, slot_of=slot_of, softcap=2.0)
    _close(got, expected)


def test_numpy_inputs_are_checked():
    x = np.ones((2, 8), np.float32)
    weight = np.ones(8, np.float32)
    with pytest.raises(ValueError, match="x has dtype float64; pass float32"):
        kernels.rmsnorm(x.astype(np.float64), weight, 1e-6)
    with pytest.raises(ValueError, match="weight has dtype float16; pass float32 or bfloat16"):
        kernels.linear(x, np.ones((4, 8), np.float16))
    with pytest.raises(ValueError, match="not contiguous"):
        kernels.rmsnorm(np.ones((8, 2), np.float32).T, weight, 1e-6)
    with pytest.raises(TypeError, match="numpy array, got list"):
        kernels.gelu_tanh([1.0, 2.0])
    read_only = np.zeros_like(x)
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        kernels.rmsnorm(x, weight, 1e-6, out=read_only)
    buf = np.ones((3, 8), np.float32)
    with pytest.raises(ValueError, match="overlaps gate"):
        kernels.silu_mul(buf[:2], buf[:2], out=buf[1:])
    with pytest.raises(ValueError, match="shares memory"):
        kernels.linear(buf[:2], np.ones((8, 8), np.float32), out=buf[1:])
    # side by side in one buffer is no overlap
    got = kernels.linear(buf[:1], np.ones((8, 8), np.float32), out=buf[1:2])
    assert np.array_equal(got, np.full((1, 8), 8.0, np.float32))
