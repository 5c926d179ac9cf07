"""xcompile/rtn_search.py: the searched scale (and offset) never loses to the plain one, and
its levels and offsets pack into MatMulNBits' layout exactly."""

from __future__ import annotations

import pytest
import torch

from xcompile.passes.quantize_nbits import Layout, block_size_for
from xcompile.rtn_search import importance, quantize_searched
from xcompile.weight_only import pack, unpack


def _weighted_error(w, qdq, group):
    x, q = w.reshape(-1, group), qdq.reshape(-1, group)
    return (importance(x, torch.ones_like(x)) * (q - x) ** 2).sum().item()


@pytest.mark.parametrize("zero_points", ["float", "none"])
@pytest.mark.parametrize("group", [32, 128])
def test_search_beats_the_plain_scale(zero_points, group):
    """On heavy-tailed weights (as trained ones are), the searched blocks' weighted error is
    at least 5 % below the extremes' scale, per block in sum."""
    torch.manual_seed(group)
    w = torch.distributions.StudentT(3.0).sample((64, 256)) * 0.02
    layout = Layout(4, group, zero_points)
    plain = unpack(*pack(w, layout, search=False), 4, group, 256)
    searched = unpack(*pack(w, layout, search=True), 4, group, 256)
    assert _weighted_error(w, searched, group) < 0.95 * _weighted_error(w, plain, group)


def test_float_offsets_recover_a_min_and_step_grid_exactly():
    """Weights made as step * L + min per block of 32 (llama.cpp's Q4_1) come back exactly with
    float offsets; uint8 zero points cannot hold the min."""
    torch.manual_seed(0)
    step = torch.rand(16, 4, 1) * 0.01 + 0.001
    low = -torch.rand(16, 4, 1) * 0.05
    levels = torch.randint(0, 16, (16, 4, 32)).float()
    levels[..., 0], levels[..., 1] = 0, 15  # each block spans every level
    w = (levels * step + low).reshape(16, 128)
    for search in (False, True):
        back = unpack(*pack(w, Layout(4, 32, "float"), search), 4, 32, 128)
        assert torch.allclose(back, w, atol=1e-6)
    uint8 = unpack(*pack(w, Layout(4, 32, "uint8")), 4, 32, 128)
    assert (uint8 - w).abs().max() > 1e-4


@pytest.mark.parametrize("k", [100, 576])
@pytest.mark.parametrize("zero_points", ["float", "none"])
def test_partial_last_block_and_per_channel(k, zero_points):
    """K not a multiple of the group: the padded tail neither moves a block's extremes nor
    counts in its fit; per channel (-1) is one block a row."""
    torch.manual_seed(k)
    w = torch.randn(8, k)
    for group in (64, -1):
        layout = Layout(4, group, zero_points)
        block = block_size_for(group, k)
        back = unpack(*pack(w, layout, search=True), 4, block, k)
        step = (w.abs().max() / 7).item()
        assert back.shape == w.shape and (back - w).abs().max().item() <= step


def test_flat_blocks_and_zero_blocks():
    w = torch.zeros(4, 64)
    w[1] = 0.5
    for zero_points in ("float", "none"):
        q, scales, zp = quantize_searched(w, 4, 32, zero_points)
        back = unpack(*pack(w, Layout(4, 32, zero_points), search=True), 4, 32, 64)
        assert torch.isfinite(scales).all() and torch.allclose(back, w)
