"""fp16 block scales and float zero points (nbits.h's BlockFloats; `xcompile quantize`'s default,
as llama.cpp's Q4_0 / Q8_0 / Q4_1 keep theirs): every nbits kernel, on every ISA path and the tile
unit's model, reads them as their exact fp32 values, so its result is the same call's on them
widened to fp32 (bit for bit where no multiply-add can be fused differently; the fp32 kernels are
held to the references by test_gemv_nbits.py, test_tiles.py and test_gather_nbits.py)."""

import numpy as np
import pytest
import torch

from xcompile import _C
from xcompile.runtime import kernels

from .test_gemv_nbits import ZPS, _weights
from .test_tiles import UNITS, _q8_tiles, unit_ids


def _half(values: torch.Tensor | None):
    """scales or zero points: float ones rounded to fp16, and the same values in fp32 (packed
    uint8 zero points, or none, as they are)."""
    if values is None or not values.is_floating_point():
        return values, values
    half = values.half()
    return half, half.float()


def test_every_half_value_widens_exactly(isa):
    """All 65536 fp16 patterns (zeros, subnormals, normals, inf, NaN) as one weight's scales:
    dequantize_nbits (the scalar conversion) gives q * float(scale), as torch widens them."""
    n, k, bs = 4096, 256, 16  # 16 blocks a row: one scale for each pattern
    patterns = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(torch.float16)
    half = patterns.reshape(n, k // bs).contiguous()
    B = torch.full((n, k // bs, bs), 0x99, dtype=torch.uint8)  # INT8 q = 153: q - 128 = 25
    got = kernels.dequantize_nbits(B, half, None, 8, bs, k)
    expected = kernels.dequantize_nbits_reference(B, half.float(), None, 8, bs, k)
    torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)
    wrong = kernels.dequantize_nbits_reference(B, half.float() * (1 + 2**-10), None, 8, bs, k)
    finite = torch.isfinite(got) & (got != 0)
    assert not torch.equal(got[finite], wrong[finite])


@pytest.mark.parametrize("zp_kind", ZPS)
@pytest.mark.parametrize("block", [16, 32, 64, 128, 256])
@pytest.mark.parametrize("bits", [4, 8])
def test_kernels_read_half_scales_as_their_fp32_values(isa, bits, block, zp_kind):
    """Decode (1 row), batched decode (2..4), prompts (5, 17, 33): the VNNI kernels' vector
    scale loads (one unit a block, several blocks a chunk, several units a block), the fp32-x
    kernels' scalar reads, dequantize and the gather, with K off the 16-block groups."""
    for k, n in [(100, 5), (2048 + 3 * block, 67)]:
        B, scales, zp32, _ = _weights(n, k, bits, block, zp_kind)
        (half, widened), (zp, zp_wide) = _half(scales), _half(zp32)
        gen = torch.Generator().manual_seed(k + n)
        bias = torch.randn(n, generator=gen)
        for m in [1, 2, 4, 5, 17, 33]:
            x = torch.randn(m, k, generator=gen)
            for q8 in (False, True):
                got = kernels.linear_nbits(x, B, half, zp, bits, block, k, bias, None, q8)
                same = kernels.linear_nbits(x, B, widened, zp_wide, bits, block, k, bias, None, q8)
                # the same values in the same order; compilers may fuse a multiply-add in one
                # and not the other (the zero-point terms): one rounding apart at most
                error = (got - same).abs().max().item()
                assert torch.allclose(got, same, rtol=1e-6, atol=1e-6), f"K={k} M={m}: {error}"
        assert torch.equal(
            kernels.dequantize_nbits(B, half, zp, bits, block, k),
            kernels.dequantize_nbits(B, widened, zp_wide, bits, block, k),
        )
        ids = torch.tensor([0, n - 1, 2, -1, n])  # -1 from the end; n outside: a zero row
        assert torch.equal(
            kernels.gather_nbits(B, half, zp, ids, bits, block, k),
            kernels.gather_nbits(B, widened, zp_wide, ids, bits, block, k),
        )
        # and the half floats are read, not ignored: other scales (zero points) give another result
        got = kernels.linear_nbits(x, B, half, zp, bits, block, k, bias)
        other = kernels.linear_nbits(x, B, _half(scales * 1.5)[0], zp, bits, block, k, bias)
        assert not torch.equal(other, got)
        if zp_kind == "float":
            other = kernels.linear_nbits(x, B, half, _half(zp32 + 0.5)[0], bits, block, k, bias)
            assert not torch.equal(other, got)


def _q8_tiles_half(x, B, half, zp, bits, bs, k, emulate):
    m, n = x.shape[0], B.shape[0]
    out = torch.full((m, n), float("nan"))
    _C.gemm_nbits_q8_tiles(
        x.data_ptr(), B.data_ptr(), half.data_ptr(), 0 if zp is None else zp.data_ptr(),
        zp is not None and zp.is_floating_point(), 0, out.data_ptr(), m, n, k, bits, bs,
        emulate, fp16=True,
    )  # fmt: skip
    return out


@pytest.mark.parametrize("emulate", UNITS, ids=lambda e: unit_ids[e])
@pytest.mark.parametrize("zp_kind", ZPS)
@pytest.mark.parametrize("bits", [4, 8])
def test_tiles_read_half_scales_as_their_fp32_values(emulate, bits, zp_kind):
    """The AMX tile GEMM (its unit, or the C++ model on any CPU) on half scales."""
    k, n, m, bs = 2048 + 128, 48, 20, 128
    B, scales, zp32, _ = _weights(n, k, bits, bs, zp_kind)
    (half, widened), (zp, zp_wide) = _half(scales), _half(zp32)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(bits))
    got = _q8_tiles_half(x, B, half, zp, bits, bs, k, emulate)
    assert torch.equal(got, _q8_tiles(x, B, widened, zp_wide, None, bits, bs, k, emulate))


def test_the_plan_keeps_half_scales_and_the_graph_runs_on_onnxruntime(tmp_path):
    """A MatMulNBits whose scales are fp16 behind a Cast (passes/quantize_nbits.py): xrun's plan
    hands the kernel the fp16 array (not a folded fp32 copy), and the result is ONNX Runtime's."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from xcompile.runtime.plan import build_plan

    k, n, bs = 256, 40, 32
    B, scales, _, w_q = _weights(n, k, 4, bs, "none")
    half, _ = _half(scales)
    nodes = [
        helper.make_node("Cast", ["s16"], ["s32"], to=TensorProto.FLOAT, name="/w/scales_float"),
        helper.make_node(
            "MatMulNBits", ["x", "B", "s32"], ["y"], domain="com.microsoft", name="/w/MatMulNBits",
            K=k, N=n, bits=4, block_size=bs, accuracy_level=4,
        ),
    ]  # fmt: skip
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", n])],
        [numpy_helper.from_array(B.numpy(), "B"), numpy_helper.from_array(half.numpy(), "s16")],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    onnx.save(model, tmp_path / "m.onnx")
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(0)).numpy()
    expected = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"x": x})[0]
    plan = build_plan(model, {}, {}, fetch="y")
    fp16 = [s for s in plan.slots if isinstance(s, np.ndarray) and s.dtype == np.float16]
    fp32 = [
        s
        for s in plan.slots
        if isinstance(s, np.ndarray) and s.shape == half.shape and s.dtype == np.float32
    ]
    # one fp16 array, in the initializer's slot and the Cast's; no fp32 copy of it
    assert len({id(s) for s in fp16}) == 1 and fp16[0].shape == half.shape and not fp32
    got = plan.run({"x": x})
    # both round x to int8 (accuracy_level 4), each its own way: within that rounding
    np.testing.assert_allclose(got, expected, rtol=0, atol=0.02 * np.abs(expected).max())
    exact = x @ kernels.dequantize_nbits_reference(B, half.float(), None, 4, bs, k).numpy().T
    np.testing.assert_allclose(got, exact, rtol=0, atol=0.02 * np.abs(exact).max())
