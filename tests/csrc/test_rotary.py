import pytest
import torch

from xcompile import _C
from xcompile.runtime import kernels

# (head_dim, rotary_dim): full rotary at awkward sizes, and partial rotary (GPT-J 64 of 256 and
# odd remainders) where dims past rotary_dim pass through.
DIMS = [(2, 2), (14, 14), (34, 34), (64, 64), (100, 100), (128, 128), (17, 2), (100, 34), (256, 64)]


def _tables(tokens: int, rotary_dim: int, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama's tables for positions start.., before duplication: (tokens, rotary_dim / 2)."""
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
    angles = torch.arange(start, start + tokens).float()[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


@pytest.mark.parametrize("interleaved", [False, True], ids=["half_split", "interleaved"])
@pytest.mark.parametrize("head_dim, rotary_dim", DIMS)
def test_rotary_matches_reference(isa, head_dim, rotary_dim, interleaved):
    for tokens, heads in ((1, 1), (5, 3)):
        gen = torch.Generator().manual_seed(head_dim * 100 + rotary_dim + tokens)
        x = torch.randn(tokens, heads, head_dim, generator=gen)
        cos, sin = _tables(tokens, rotary_dim, start=37)
        expected = kernels.rotary_reference(x, cos, sin, interleaved)
        got = kernels.rotary(x, cos, sin, interleaved, rotary_dim=rotary_dim)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
        assert torch.equal(got[..., rotary_dim:], x[..., rotary_dim:])
        y = x.clone()
        assert kernels.rotary(y, cos, sin, interleaved, out=y) is y
        assert torch.equal(y, got)


def test_rotary_reference_is_transformers_math():
    # Llama: cat(cos, cos), rotate_half; GPT-J: repeat_interleave, rotate_every_two. Checked on
    # one pair by hand: position 1, angle 1 radian for pair 0.
    x = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]])
    cos, sin = torch.tensor([[0.5, 1.0]]), torch.tensor([[0.25, 0.0]])
    half = kernels.rotary_reference(x, cos, sin, interleaved=False)
    pairs = kernels.rotary_reference(x, cos, sin, interleaved=True)
    # half split pairs (x0, x2) and (x1, x3); interleaved pairs (x0, x1) and (x2, x3)
    assert torch.equal(half, torch.tensor([[[0.5 - 0.75, 2.0, 1.5 + 0.25, 4.0]]]))
    assert torch.equal(pairs, torch.tensor([[[0.5 - 0.5, 1.0 + 0.25, 3.0, 4.0]]]))


def test_rotary_token_stride_rotates_a_slice_in_place(isa, threads):
    # The binding takes token strides, so q inside a fused (S, (heads + 2 kv) * d) QKV buffer can
    # be rotated where it lies; and 300 tokens x 8 heads is enough to use the pool.
    tokens, heads, kv_heads, d = 300, 8, 2, 64
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * d)
    cos, sin = _tables(tokens, d)
    q = qkv[:, : heads * d].reshape(tokens, heads, d)
    expected = kernels.rotary_reference(q, cos, sin, interleaved=False)
    before = qkv.clone()
    for n in (1, 2):
        kernels.set_num_threads(n)
        qkv.copy_(before)
        _C.rotary(
            qkv.data_ptr(),
            cos.data_ptr(),
            sin.data_ptr(),
            qkv.data_ptr(),
            tokens,
            heads,
            d,
            d,
            False,
            qkv.shape[1],
            qkv.shape[1],
        )
        torch.testing.assert_close(q, expected, rtol=1e-6, atol=1e-6)
        assert torch.equal(qkv[:, heads * d :], before[:, heads * d :])


@pytest.mark.parametrize(
    "x, cos, kwargs, match",
    [
        (torch.randn(2, 3, 8), torch.randn(2, 5), {}, "rotary_dim 10 exceeds head_dim 8"),
        (torch.randn(2, 3, 8), torch.randn(3, 2), {}, "expected both"),
        (torch.randn(2, 3, 8), torch.randn(2, 2), {"rotary_dim": 6}, "expected both"),
        (torch.randn(6, 8), torch.randn(6, 4), {}, r"expected \(S, heads, head_dim\)"),
        (torch.randn(2, 8, 3).transpose(1, 2), torch.randn(2, 4), {}, "contiguous"),
    ],
)
def test_rotary_rejects_bad_inputs(x, cos, kwargs, match):
    with pytest.raises(ValueError, match=match):
        kernels.rotary(x, cos, cos.clone(), False, **kwargs)


def test_rotary_rejects_partly_overlapping_out():
    buf = torch.randn(3, 2, 8)
    with pytest.raises(ValueError, match="overlaps x"):
        kernels.rotary(buf[:2], torch.randn(2, 4), torch.randn(2, 4), False, out=buf[1:])


@pytest.mark.parametrize("interleaved", [False, True], ids=["half_split", "interleaved"])
def test_rotary_reads_whole_tables_at_positions(isa, interleaved):
    # The decode path: whole (max_positions, rotary_dim / 2) tables and each token's position,
    # x a column slice of a wider buffer, out a separate buffer; partial rotary passes through.
    tokens, heads, head_dim, rotary_dim, table_rows = 3, 4, 34, 18, 50
    cos, sin = _tables(table_rows, rotary_dim)
    wide = torch.randn(tokens, heads * head_dim + 20)
    x = wide[:, : heads * head_dim]
    positions = torch.tensor([49, 0, 17])
    out = torch.full((tokens, heads, head_dim), float("nan"))
    _C.rotary(
        x.data_ptr(),
        cos.data_ptr(),
        sin.data_ptr(),
        out.data_ptr(),
        tokens,
        heads,
        head_dim,
        rotary_dim,
        interleaved,
        wide.stride(0),
        heads * head_dim,
        positions.data_ptr(),
        table_rows,
    )
    expected = kernels.rotary_reference(
        x.reshape(tokens, heads, head_dim), cos[positions], sin[positions], interleaved, rotary_dim
    )
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("position", [50, -1])
def test_rotary_refuses_a_position_outside_the_tables(position):
    cos, sin = _tables(50, 8)
    x = torch.randn(1, 2, 8)
    positions = torch.tensor([position])
    with pytest.raises(ValueError, match="outside the cos/sin tables"):
        _C.rotary(
            x.data_ptr(),
            cos.data_ptr(),
            sin.data_ptr(),
            x.data_ptr(),
            1,
            2,
            8,
            8,
            False,
            16,
            16,
            positions.data_ptr(),
            50,
        )
