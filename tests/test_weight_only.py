"""weight_only.py: neural-compressor's RTN repacked into MatMulNBits' layout, exactly."""

from __future__ import annotations

import pytest
import torch

from xcompile.passes.quantize_nbits import block_size_for
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
