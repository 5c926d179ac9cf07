"""The runtime's numpy ops (runtime/ops.py's OPS, runtime/fallback_ops.py's FALLBACK and
attention_reference) held to their torch references (runtime/reference_ops.py) on seeded random
inputs: values, dtypes and shapes; and importing them loads no torch."""

from __future__ import annotations

import itertools
import subprocess
import sys

import numpy as np
import pytest
import torch

from xcompile.runtime import fallback_ops, ops, reference_ops
from xcompile.runtime.arrays import BF16, round_bf16, widen

NUMPY_OF = {reference_ops.DTYPES[k]: ops.DTYPES[k] for k in reference_ops.DTYPES}
INT64_MAX, INT64_MIN = 2**63 - 1, -(2**63)
MS, XC = "com.microsoft", "ai.xcompile"

rng = np.random.default_rng(0)


def f32(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def bf16(*shape, plus: float = 0.0):
    """BF16 bits (the runtime's arrays.BF16) of standard normal values (+ plus)"""
    return round_bf16(f32(*shape) + plus)


def i64(*values):
    return np.array(values, dtype=np.int64)


def to_torch(a):
    if a is None or not isinstance(a, np.ndarray):
        return a
    if a.dtype == BF16:
        return torch.from_numpy(np.array(a).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.array(a))  # a copy: broadcast views are read-only


def to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(BF16)
    return t.numpy()


def assert_matches(got, want, rtol=1e-5, atol=1e-5):
    """got (ndarray) equals want (torch tensor) in shape, dtype and values; tuples elementwise"""
    if isinstance(want, (tuple, list)):
        assert isinstance(got, (tuple, list)) and len(got) == len(want)
        for g, w in zip(got, want):
            assert_matches(g, w, rtol, atol)
        return
    if want is None:
        assert got is None
        return
    assert type(got) is np.ndarray, type(got)  # never a numpy scalar
    assert got.shape == tuple(want.shape)
    assert got.dtype == NUMPY_OF[want.dtype], (got.dtype, want.dtype)
    expected = to_numpy(want)
    if got.dtype.kind in "biu":
        np.testing.assert_array_equal(got, expected)
    else:
        if got.dtype == BF16:  # the runtime's BF16 bits: compared widened
            rtol, atol = max(rtol, 1e-2), max(atol, 1e-2)
            got, expected = widen(got), widen(expected)
        np.testing.assert_allclose(
            got.astype(np.float64), expected.astype(np.float64), rtol=rtol, atol=atol
        )


_numbers = itertools.count()


def case(op, *inputs, tol=1e-5, **attributes):
    return pytest.param(op, inputs, attributes, tol, id=f"{op}-{next(_numbers)}")


CASES: list = []
CASES += [
    case("Identity", f32(2, 3)),
    case("Gather", f32(5, 4), i64(0, 4, 2).reshape(3, 1)),
    case("Gather", f32(5, 4), i64(3, 1), axis=-1),
    case("Gather", i64(2, 7, 16), np.array(1)),  # shape arithmetic: a 0-d int64, not a scalar
    case("Cast", f32(3, 4), to=16),
    case("Cast", bf16(3, 4), to=1),
    case("Cast", f32(3, 4) * 10, to=7),  # toward zero
    case("Cast", i64(3, -4, 5), to=1),
    case("Cast", f32(6).round(), to=9),
    case("Cast", f32(6), to=10),
    case("Cast", np.array(7), to=1),
    case("Transpose", f32(2, 3, 4), perm=[0, 2, 1]),
    case("Transpose", f32(2, 3, 4)),
    case("MatMul", f32(2, 3, 8), f32(8, 5)),
    case("MatMul", f32(1, 2, 3, 8), f32(2, 8, 5)),
    case("MatMul", f32(8), f32(8)),
    case("MatMul", bf16(3, 8), bf16(8, 2), tol=2e-2),
]
for op in ("Add", "Sub", "Mul", "Div"):
    CASES += [
        case(op, f32(2, 3, 4), f32(4) + 3),
        case(op, f32(2, 1, 4), f32(3, 1) + 3),
        case(op, f32(5), np.array(2.5, dtype=np.float32)),
        case(op, f32(5), np.array(3)),  # fp32 with a 0-d int64: stays fp32 (NEP 50 would widen)
        case(op, np.array(4.0, dtype=np.float32), np.array(2.0, dtype=np.float32)),
        case(op, bf16(4, 3), bf16(3, plus=3), tol=2e-2),
    ]
for op in ("Add", "Sub", "Mul"):
    CASES += [
        case(op, i64(2, 7, 16), np.array(3)),
        case(op, np.array(6), np.array(-4)),
    ]
CASES += [
    case("Neg", f32(3, 4)),
    case("Neg", i64(3, -4)),
    case("Sqrt", np.abs(f32(3, 4))),
    case("Reciprocal", f32(3, 4) + 5),
    case("Pow", np.abs(f32(3, 4)), np.array(2.0, dtype=np.float32)),
    case("Pow", np.abs(f32(3, 4)) + 0.5, f32(4)),
    case("Pow", f32(3, 4), np.array(3)),  # ONNX: the result takes x's type
    case("Sigmoid", f32(3, 4) * 4),
    case("Sigmoid", np.array([-100.0, -30.0, 0.0, 30.0, 100.0], dtype=np.float32)),
    case("Sigmoid", bf16(8), tol=2e-2),
    case("Tanh", f32(3, 4) * 3),
    case("Erf", f32(3, 50) * 2),
    case("Erf", np.array([-np.inf, -6.0, 0.0, 1e-8, 6.0, np.inf], dtype=np.float32)),
    case("Erf", bf16(16), tol=2e-2),
    case("Relu", f32(3, 4)),
    case("Cos", f32(3, 4) * 5),
    case("Sin", f32(3, 4) * 5),
    case("Softmax", f32(2, 3, 5) * 3),
    case("Softmax", f32(2, 3, 5), axis=1),
    case("ReduceMean", f32(2, 3, 8), i64(-1)),
    case("ReduceMean", f32(2, 3, 8), i64(0, 2), keepdims=0),
    case("ReduceMean", f32(2, 3, 8), axes=[1]),
    case("ReduceMean", f32(2, 3, 8)),
    case("ReduceMean", bf16(2, 64), i64(-1), tol=2e-2),
    case("ReduceMax", f32(2, 3, 8), i64(-1)),
    case("ReduceMax", f32(2, 3, 8), i64(0, -2), keepdims=0),
    case("ReduceMax", i64(5, 9, 2).reshape(1, 3)),
    case("ReduceMax", f32(2, 3), keepdims=0),
    case("LayerNormalization", f32(2, 3, 8) * 3 + 1, f32(8), f32(8)),
    case("LayerNormalization", f32(2, 3, 8), f32(3, 8), axis=-2, epsilon=1e-6),
    case("Reshape", f32(2, 3, 4), i64(0, -1)),
    case("Reshape", f32(2, 3, 4), i64(4, 6)),
    case("Reshape", f32(2, 3, 4), i64(-1)),
    case("Unsqueeze", f32(3, 4), i64(0, -1)),
    case("Unsqueeze", f32(3, 4), i64(1)),
    case("Unsqueeze", np.array(7), i64(0)),  # a scalar into a shape vector
    case("Squeeze", f32(1, 3, 1, 4), i64(-2)),
    case("Squeeze", f32(1, 3, 1, 4), i64(0, 2)),
    case("Squeeze", f32(1, 3, 1, 4)),
    case("Squeeze", i64(5), i64(0)),
    case("Slice", f32(4, 6, 8), i64(1, -3), i64(3, INT64_MAX), i64(0, -1)),
    case("Slice", f32(4, 6, 8), i64(1, 2), i64(-1, 100)),
    case("Slice", f32(4, 6, 8), i64(-100), i64(2), i64(1), i64(1)),
    case("Slice", i64(2, 7, 16), i64(-1), i64(INT64_MAX), i64(0)),
    case("Concat", f32(2, 3), f32(2, 5), axis=-1),
    case("Concat", i64(1), i64(7, 16), i64(-1), axis=0),
    case("Shape", f32(2, 3, 4)),
    case("Shape", f32(2, 3, 4), start=1),
    case("Shape", f32(2, 3, 4), start=-2, end=-1),
    case("Range", np.array(0), np.array(7), np.array(2)),
    case("Range", np.array(5), np.array(-3), np.array(-3)),
    case("Range", np.array(2, dtype=np.int32), np.array(6, dtype=np.int32), np.array(1, np.int32)),
]
for op in ("LessOrEqual", "Greater", "GreaterOrEqual", "Less", "Equal"):
    CASES += [
        case(op, rng.integers(-2, 3, (3, 4)).astype(np.float32), np.float32([0, 1, -1, 2])),
        case(op, i64(3, 7, 9), np.array(7)),
    ]
CASES += [
    case("Not", rng.random((3, 4)) < 0.5),
    case("And", rng.random((3, 4)) < 0.5, rng.random(4) < 0.5),
    case("Where", rng.random((2, 1, 4)) < 0.5, f32(3, 4), np.array(-np.inf, dtype=np.float32)),
    case("Where", rng.random(3) < 0.5, i64(1, 2, 3), i64(-1)),
    case("Expand", f32(3, 1), i64(2, 3, 4)),
    case("Expand", f32(3, 4), i64(1, 1)),
    case("Expand", i64(5), i64(3)),
]


def test_every_op_has_cases():
    assert {c.values[0] for c in CASES} == set(ops.OPS) == set(reference_ops.OPS)


@pytest.mark.parametrize("op,inputs,attributes,tol", CASES)
def test_op_matches_torch_reference(op, inputs, attributes, tol):
    got = ops.OPS[op](*inputs, **attributes)
    reference = reference_ops.OPS[op]
    if op == "Div" and inputs[0].dtype.kind == "i":  # ONNX truncates; the reference divides
        reference = lambda x, y: torch.div(x, y, rounding_mode="trunc")  # noqa: E731
    want = reference(*(to_torch(a) for a in inputs), **attributes)
    assert_matches(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize(
    "x,y",
    [(i64(7, -7, 7, -7, 6, 0), i64(2, 2, -2, -2, 3, 5)), (i64(-9, 9), np.array(4))],
)
def test_integer_div_truncates_toward_zero(x, y):
    got = ops.OPS["Div"](x, y)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, np.trunc(x / y).astype(np.int64))


def test_slice_steps():
    """Steps the torch reference does not take: forwards against indexing, backwards as ONNX
    clamps them (start to [0, n-1], end to [-1, n-1], INT64_MIN: through index 0)."""
    x = f32(4, 6, 8)
    slice_ = ops.OPS["Slice"]
    np.testing.assert_array_equal(slice_(x, i64(1), i64(7), i64(-1), i64(2)), x[:, :, 1:7:2])
    np.testing.assert_array_equal(slice_(x, i64(-1), i64(INT64_MIN), i64(1), i64(-1)), x[:, ::-1])
    np.testing.assert_array_equal(slice_(x, i64(100), i64(1), i64(0), i64(-2)), x[3:1:-2])


def test_reduce_with_empty_axes():
    x = f32(2, 3)
    assert ops.OPS["ReduceMean"](x, i64(), noop_with_empty_axes=1) is x
    np.testing.assert_allclose(ops.OPS["ReduceMean"](x, i64(), keepdims=0), x.mean(), rtol=1e-6)
    assert ops.OPS["ReduceMax"](x, i64(), keepdims=1).shape == (1, 1)


def test_views_where_torch_made_views():
    x = f32(2, 3, 4)
    for out in (
        ops.OPS["Reshape"](x, i64(6, 4)),
        ops.OPS["Transpose"](x, perm=[2, 0, 1]),
        ops.OPS["Slice"](x, i64(1), i64(3), i64(-1)),
        ops.OPS["Unsqueeze"](x, i64(0)),
        ops.OPS["Squeeze"](x[None], i64(0)),
    ):
        assert np.shares_memory(out, x)


# -- fused ops (FALLBACK) -------------------------------------------------------------------------


def _nbits_weights(n: int, k: int, bits: int, block_size: int, zero_points: str):
    """random MatMulNBits weights: B (N, k_blocks, blob) uint8, scales (N, k_blocks) fp32, zero
    points none, packed uint8 or fp32"""
    k_blocks = -(-k // block_size)
    blocks = rng.integers(0, 256, (n, k_blocks, block_size * bits // 8), dtype=np.uint8)
    scales = (rng.random((n, k_blocks)) * 0.1 + 0.01).astype(np.float32)
    if zero_points == "none":
        zp = None
    elif zero_points == "float":
        zp = (rng.random((n, k_blocks)) * 2**bits).astype(np.float32)
    else:
        cols = k_blocks if bits == 8 else -(-k_blocks // 2)
        zp = rng.integers(0, 256, (n, cols), dtype=np.uint8)
    return blocks, scales, zp


def _rotary_inputs(four_d: bool):
    b, s, heads, d, positions = 2, 5, 4, 8, 32
    x = f32(b, heads, s, d) if four_d else f32(b, s, heads * d)
    position_ids = rng.integers(0, positions, (b, s))
    angles = rng.random((positions, 4)).astype(np.float32) * 6
    return x, position_ids, np.cos(angles), np.sin(angles)


def fused(key, inputs, attributes):
    return pytest.param(key, inputs, attributes, id=f"{key[1]}-{next(_numbers)}")


FUSED: list = [
    fused(("", "SimplifiedLayerNormalization"), (f32(2, 5, 16), f32(16)), {}),
    fused((MS, "SimplifiedLayerNormalization"), (f32(5, 16) * 4, f32(16)), {"epsilon": 1e-6}),
    fused((MS, "SkipSimplifiedLayerNormalization"), (f32(2, 5, 16), f32(2, 5, 16), f32(16)), {}),
    fused(
        (MS, "SkipSimplifiedLayerNormalization"),
        (f32(1, 3, 16), f32(1, 3, 16), f32(16), f32(16)),
        {"epsilon": 1e-6},
    ),
    fused((MS, "SkipLayerNormalization"), (f32(2, 5, 16), f32(2, 5, 16), f32(16)), {}),
    fused(
        (MS, "SkipLayerNormalization"),
        (f32(1, 3, 16), f32(1, 3, 16), f32(16), f32(16), f32(16)),
        {"epsilon": 1e-6},
    ),
    fused((MS, "RotaryEmbedding"), _rotary_inputs(False), {"num_heads": 4}),
    fused((MS, "RotaryEmbedding"), _rotary_inputs(False), {"num_heads": 4, "interleaved": 1}),
    fused(
        (MS, "RotaryEmbedding"),
        _rotary_inputs(False),
        {"num_heads": 4, "rotary_embedding_dim": 4},
    ),
    fused((MS, "RotaryEmbedding"), _rotary_inputs(True), {}),
    fused((MS, "FastGelu"), (f32(3, 40) * 3,), {}),
    fused((MS, "FastGelu"), (f32(3, 40), f32(40)), {}),
    fused((MS, "Gelu"), (f32(3, 40) * 3,), {}),
    fused((MS, "Gelu"), (f32(3, 40), f32(40)), {}),
    fused((XC, "SiluMul"), (f32(2, 3, 40) * 3, f32(2, 3, 40)), {}),
    fused((XC, "GeluMul"), (f32(2, 3, 40) * 3, f32(2, 3, 40)), {}),
    fused(("", "Split"), (f32(2, 3, 6), i64(2, 3, 1)), {"axis": -1}),
    fused(("", "Split"), (f32(7, 3),), {"num_outputs": 3}),
    fused(("", "Split"), (f32(2, 8),), {"num_outputs": 2, "axis": 1}),
]
for bits, zero_points, k in (
    (4, "none", 64),
    (4, "packed", 40),
    (8, "packed", 64),
    (4, "float", 48),
):
    n, block_size = 12, 16
    blocks, scales, zp = _nbits_weights(n, k, bits, block_size, zero_points)
    nbits = {"K": k, "N": n, "bits": bits, "block_size": block_size}
    FUSED += [
        fused((MS, "MatMulNBits"), (f32(2, 3, k), blocks, scales, zp), nbits),
        fused(
            (MS, "MatMulNBits"), (f32(5, k), blocks, scales.reshape(-1), zp, None, f32(n)), nbits
        ),
        fused(
            (XC, "GatherNBits"),
            (blocks, i64(0, 11, -1, -12, 12, -13).reshape(2, 3), scales, zp),
            {"K": k, "bits": bits, "block_size": block_size},
        ),
    ]
    if zero_points != "float":
        FUSED.append(
            fused(
                (MS, "GatherBlockQuantized"),
                (blocks.reshape(n, -1), i64(3, 0, 7), scales, zp),
                {"bits": bits, "block_size": block_size},
            )
        )


def test_every_fused_op_has_cases():
    assert (
        {p.values[0] for p in FUSED} == set(fallback_ops.FALLBACK) == set(reference_ops.REFERENCE)
    )


@pytest.mark.parametrize("key,inputs,attributes", FUSED)
def test_fused_op_matches_torch_reference(key, inputs, attributes):
    got = fallback_ops.FALLBACK[key](*inputs, **attributes)
    want = reference_ops.REFERENCE[key](*(to_torch(a) for a in inputs), **attributes)
    assert_matches(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "past,window,softcap", [(0, 0, 0.0), (4, 0, 0.0), (4, 3, 0.0), (4, 0, 5.0), (2, 2, 3.0)]
)
def test_attention_reference_matches_torch(past, window, softcap):
    b, s, heads, kv, d = 2, 3, 4, 2, 8
    q3, keys, values = f32(b, s, heads * d), f32(b, kv, past + s, d), f32(b, kv, past + s, d)
    args = (past, heads, d**-0.5, window, softcap)
    got = fallback_ops.attention_reference(q3, keys, values, *args)
    want = reference_ops.attention_reference(to_torch(q3), to_torch(keys), to_torch(values), *args)
    assert_matches(got, want, rtol=1e-5, atol=1e-6)


def test_numpy_ops_import_no_torch():
    code = (
        "import sys, numpy as np\n"
        "from xcompile.runtime import fallback_ops, ops\n"
        "ops.OPS['Erf'](np.zeros(3, np.float32))\n"
        "fallback_ops.FALLBACK[('com.microsoft', 'Gelu')](np.zeros(3, np.float32))\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
