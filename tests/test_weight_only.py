"""weight_only.py: neural-compressor's RTN repacked into MatMulNBits' layout, exactly."""

from __future__ import annotations

import pytest
import torch

from xcompile.passes.quantize_nbits import Layout, block_size_for
from xcompile.weight_only import WeightOnly, pack, unpack


@pytest.mark.parametrize(
    "bits,group,sym,k",
    [
        (8, -1, True, 100),
        (8, -1, False, 64),
        (8, 32, True, 96),
        (4, 128, True, 256),
        (4, 32, False, 100),
        (4, 16, True, 40),
        (4, -1, False, 2048),
        (8, -1, True, 5632),  # per channel in 11 blocks of 512, the scale repeated
        (8, -1, False, 192),
        (4, -1, False, 192),  # 3 blocks: an odd count of packed zero points
    ],
)
def test_layout_dequantizes_to_inc_qdq(bits, group, sym, k):
    from neural_compressor.torch.algorithms.weight_only.utility import quant_tensor

    torch.manual_seed(bits * k)
    w = torch.randn(9, k)
    blocks, scales, zp = pack(w, WeightOnly(bits, group, sym))
    block = block_size_for(group, k)
    assert blocks.dtype == torch.uint8 and blocks.shape == (9, -(-k // block), block * bits // 8)
    assert (zp is None) == sym
    qdq = quant_tensor(w.clone(), bits=bits, group_size=group, scheme="sym" if sym else "asym")
    assert torch.equal(unpack(blocks, scales, zp, bits, block, k), qdq)
    # and the error is what the bits allow: a step is at most range / levels
    step = (w.abs().max() * 2 / (2**bits - 1)).item()
    assert (qdq - w).abs().max().item() <= step


@pytest.mark.parametrize(
    "k,block", [(2048, 2048), (5632, 512), (192, 64), (100, 128), (96, 128), (5, 16)]
)
def test_per_channel_blocks_divide_k_when_they_can(k, block):
    """No padding where a power of two >= 64 divides K; else one block of the next power."""
    assert block_size_for(-1, k) == block


@pytest.mark.parametrize("bits,group,sym", [(4, 32, True), (4, 16, False), (8, -1, False)])
def test_fused_weight_is_its_parts_row_concatenated(bits, group, sym):
    """GPTQ and AWQ quantize Q, K and V (gate and up) one by one; the fused weight's blocks are
    their integers concatenated along N, which packs to the rows of each part's own blocks."""
    from xcompile.weight_only import pack_quantized, quantize_rtn

    torch.manual_seed(bits + group)
    scheme = WeightOnly(bits, group, sym)
    parts = [torch.randn(n, 80) for n in (12, 4, 4)]
    q, s, z = zip(*(quantize_rtn(w, scheme) for w in parts))
    fused = pack_quantized(torch.cat(q), torch.cat(s), None if sym else torch.cat(z), scheme)
    each = [pack(w, scheme) for w in parts]
    for i, t in enumerate(fused):
        if t is not None:
            assert torch.equal(t, torch.cat([e[i] for e in each]))


HALF = "float16"  # the CLI's block scales (scheme_from_flags' default)


def test_gptq_and_awq_flags_make_a_scheme(tmp_path):
    """No calibration file: the shipped text; the manifest entry says which."""
    from xcompile.weight_only import scheme_from_flags

    scheme = scheme_from_flags(4, 32, True, "gptq", None, None)
    assert (scheme.algo, scheme.calib, scheme.describe()["calib"]) == ("gptq", None, "default")
    text = tmp_path / "lines.txt"
    text.write_text("one line\n")
    scheme = scheme_from_flags(8, None, False, "awq", text, False)
    assert scheme.describe() | {"accuracy_level": None} == {
        "bits": 8,
        "group_size": -1,
        "sym": False,
        "zero_points": "uint8",
        "scales": "float16",
        "algo": "awq",
        "search": False,
        "plan": "uniform",
        "lm_head": False,
        "calib": "lines.txt",
        "accuracy_level": None,
    }
    assert "calib" not in scheme_from_flags(4, None, True, None, None, None).describe()


def test_int4_defaults_to_the_measured_recipe():
    """--int4 alone: groups of 32, float offsets, searched scales, the mixed plan; --int8
    alone: per channel, symmetric, INC's RTN, uniform."""
    from xcompile.passes.quantize_nbits import Layout
    from xcompile.weight_only import scheme_from_flags

    int4 = scheme_from_flags(4, None, None, None, None, None)
    assert (int4.layout, int4.search, int4.mixed) == (Layout(4, 32, "float", HALF), True, True)
    int8 = scheme_from_flags(8, None, None, None, None, False)
    assert (int8.layout, int8.search, int8.mixed) == (Layout(8, -1, "none", HALF), False, False)
    plain = scheme_from_flags(4, 128, True, None, None, False, search=False, plan="uniform")
    assert (plain.layout, plain.search, plain.mixed) == (Layout(4, 128, "none", HALF), False, False)


@pytest.mark.parametrize(
    "args,says",
    [
        ((8, None, None, None, None, None, "float"), "--zero-points float is for --int4"),
        ((4, None, True, None, None, None, "float"), "--zero-points is for --asym"),
        ((4, None, None, None, None, None, "int"), "choose uint8 or float"),
        ((8, None, None, None, None, None, None, None, "mixed"), "it is for --int4"),
        ((8, None, None, None, None, None, None, None, "head8"), "--quantize-lm-head"),
        ((4, None, None, None, None, None, None, None, "q4"), "mixed, uniform or head8"),
        ((None, None, None, None, None, False), "--no-quantize-lm-head applies to --int8"),
        ((4, None, False, None, None, None, "uint8", True), "add --no-search"),
        ((None, None, None, None, None, None, None, None, "mixed"), "add --int8 or --int4"),
    ],
)
def test_recipe_flags_refused_with_the_fix(args, says):
    from xcompile.errors import UserError
    from xcompile.weight_only import scheme_from_flags

    with pytest.raises(UserError, match=says):
        scheme_from_flags(*args)


def test_mixed_plan_is_q4_k_m_more_bits_layers():
    """llama.cpp's use_more_bits over 30 layers: 0-2, 26-29 and every third from 5."""
    from xcompile.weight_only import more_bits

    more = [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]
    assert [i for i in range(30) if more_bits(i, 30)] == more


def test_head8_plan_keeps_the_main_layout_and_lm_head_at_8_bits():
    from types import SimpleNamespace

    from xcompile.weight_only import scheme_from_flags

    scheme = scheme_from_flags(4, 64, True, None, None, None, None, None, "head8")
    spec = SimpleNamespace(layers=8)  # head8 names no layer: no names needed
    layout_for = scheme.plan(spec, {})
    main = Layout(4, 64, "none", HALF)
    assert layout_for("/model/layers.0/mlp/down_proj/MatMul", "model.layers.0.mlp.down_proj.weight") == main
    assert layout_for("/lm_head/MatMul", "lm_head.weight") == Layout(8, 32, scales=HALF)  # blocks, as Q8_0
    assert scheme.describe()["plan"] == "head8" and scheme.describe()["lm_head"]


def test_an_8_bit_lm_head_takes_blocks_of_32_where_the_layers_are_per_channel():
    """--int8 --quantize-lm-head: the layers per channel, the lm_head (and a tied table) in
    blocks of 32 as Q8_0 (SmolLM2: PPL +0.57 % over FP32 against +0.97 % per channel); a group
    size the user gives is kept for both."""
    from types import SimpleNamespace

    from xcompile.weight_only import scheme_from_flags

    spec = SimpleNamespace(layers=4)
    per_channel = scheme_from_flags(8, None, None, None, None, True).plan(spec, {})
    assert per_channel("/lm_head/MatMul", "lm_head.weight") == Layout(8, 32, scales=HALF)
    assert per_channel("/model/layers.0/attn/o_proj/MatMul", "o.weight") == Layout(8, -1, scales=HALF)
    grouped = scheme_from_flags(8, 128, None, None, None, True).plan(spec, {})
    assert grouped("/lm_head/MatMul", "lm_head.weight") == Layout(8, 128, scales=HALF)
    assert scheme_from_flags(8, None, None, None, None, False).plan(spec, {})(
        "/lm_head/MatMul", "lm_head.weight"
    ) is None


def test_int8_quantizes_the_lm_head_unless_told_not_to():
    from xcompile.weight_only import scheme_from_flags

    assert scheme_from_flags(8, None, None, None, None, None).quantize_lm_head
    assert not scheme_from_flags(8, None, None, None, None, False).quantize_lm_head
    assert not scheme_from_flags(4, None, None, None, None, None, plan="uniform").quantize_lm_head
    assert scheme_from_flags(None, None, None, None, None, None) is None
