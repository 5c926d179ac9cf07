"""gather_nbits (csrc/gather_nbits.cpp) on every ISA path against the torch reference in
runtime/kernels.py: rows of random MatMulNBits weights, as the embedding lookup on a quantized
table reads them."""

import pytest
import torch

from xcompile.runtime import kernels


def _weights(n: int, k: int, bits: int, block: int, zp: str, seed: int):
    """Every byte random (the padding past K too), scales O(1), zero points of kind zp."""
    gen = torch.Generator().manual_seed(seed)
    k_blocks = -(-k // block)
    B = torch.randint(0, 256, (n, k_blocks, block * bits // 8), generator=gen, dtype=torch.uint8)
    scales = torch.rand(n, k_blocks, generator=gen) + 0.5
    zero_points = {
        "none": None,
        "uint8": torch.randint(
            0, 256, (n, k_blocks if bits == 8 else -(-k_blocks // 2)), generator=gen
        ).to(torch.uint8),
        "float": torch.rand(n, k_blocks, generator=gen) * ((1 << bits) + 1) - 1,
    }[zp]
    return B, scales, zero_points


@pytest.mark.parametrize("zp", ["none", "uint8", "float"])
@pytest.mark.parametrize("k,block", [(64, 64), (96, 32), (100, 32), (17, 16), (576, 64)])
@pytest.mark.parametrize("bits", [4, 8])
def test_rows_equal_the_reference_bit_for_bit(isa, bits, k, block, zp):
    n = 37
    B, scales, zero_points = _weights(n, k, bits, block, zp, seed=k * 10 + bits)
    w = kernels.dequantize_nbits_reference(B, scales, zero_points, bits, block, k)
    ids = torch.tensor([[0, 36, 5, 5], [-1, 12, 3, -37]])  # repeats, negatives from the end
    got = kernels.gather_nbits(B, scales, zero_points, ids, bits, block, k)
    assert got.shape == (2, 4, k)
    assert torch.equal(
        got, kernels.gather_nbits_reference(B, scales, zero_points, ids, bits, block, k)
    )
    assert torch.equal(got, w[ids % n])


def test_indices_outside_the_table_give_zero_rows(isa):
    B, scales, zero_points = _weights(8, 64, 4, 32, "uint8", seed=1)
    ids = torch.tensor([8, -9, 2, 1 << 40])
    got = kernels.gather_nbits(B, scales, zero_points, ids, 4, 32, 64)
    w = kernels.dequantize_nbits_reference(B, scales, zero_points, 4, 32, 64)
    assert torch.equal(got[[0, 1, 3]], torch.zeros(3, 64))
    assert torch.equal(got[2], w[2])
    assert torch.equal(got, kernels.gather_nbits_reference(B, scales, zero_points, ids, 4, 32, 64))


def test_wrong_indices_dtype_is_refused():
    B, scales, _ = _weights(4, 32, 8, 32, "none", seed=2)
    with pytest.raises(ValueError, match="indices has dtype torch.int32"):
        kernels.gather_nbits(B, scales, None, torch.tensor([1], dtype=torch.int32), 8, 32, 32)
