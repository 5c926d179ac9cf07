import pytest
import torch

from xcompile import _C
from xcompile.runtime import kernels

# (heads, kv_heads): multi-query, grouped, and plain multi-head.
HEAD_LAYOUTS = [(4, 1), (4, 2), (4, 4), (8, 2)]
# (S new tokens, past): decode and prefill, from an empty cache and after 37 tokens.
STEPS = [(1, 0), (1, 37), (100, 0), (100, 37)]


def _cache(heads, kv_heads, d, tokens, past, seed, capacity=None):
    """q (S, heads, d) and a cache (kv_heads, capacity, d) with rows past + S .. filled with junk
    that no query may read."""
    gen = torch.Generator().manual_seed(seed)
    capacity = capacity or past + tokens + 3
    q = torch.randn(tokens, heads, d, generator=gen)
    k, v = torch.randn(2, kv_heads, capacity, d, generator=gen)
    k[:, past + tokens :] = 1e4
    v[:, past + tokens :] = float("nan")
    return q, k, v


@pytest.mark.parametrize("window", [0, 8], ids=["causal", "window8"])
@pytest.mark.parametrize("d", [16, 64, 128, 100])
def test_attention_matches_reference(isa, d, window):
    for heads, kv_heads in HEAD_LAYOUTS:
        for tokens, past in STEPS:
            q, k, v = _cache(heads, kv_heads, d, tokens, past, seed=d + heads * 7 + kv_heads + past)
            scale = d**-0.5
            got = kernels.attention(q, k, v, past, scale, window)
            expected = kernels.attention_reference(q, k, v, past, scale, window)
            assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5), (
                f"heads={heads} kv={kv_heads} S={tokens} P={past}: max abs error "
                f"{(got - expected).abs().max().item():.3g}"
            )


def test_attention_first_token_and_window_one_return_own_value(isa):
    # A query that sees one key gets that key's value exactly (softmax of one score is 1).
    q, k, v = _cache(8, 2, 64, 5, 0, seed=4)
    for past, window, tokens in ((0, 0, 1), (0, 1, 5)):
        out = kernels.attention(q[:tokens], k, v, past, 0.125, window)
        expected = v[:, :tokens].repeat_interleave(4, dim=0).transpose(0, 1)
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_attention_softmax_is_shift_stable(isa):
    # Scores of ~1e4: a softmax without the max shift overflows exp to inf and returns NaN.
    q, k, v = _cache(4, 1, 32, 3, 10, seed=5)
    q *= 300.0
    got = kernels.attention(q, k, v, 10, 1.0)
    assert not got.isnan().any()
    torch.testing.assert_close(
        got, kernels.attention_reference(q, k, v, 10, 1.0), rtol=1e-4, atol=1e-4
    )


# (S, heads, kv_heads, past, window), each large enough to use the pool. Prefill: many tasks.
# Decode with fewer KV heads than threads: a group's heads are split across threads (5 heads into
# 3 + 2); with a sliding window of 100 inside a 401-token context.
POOL_CASES = [(40, 8, 2, 200, 64), (1, 5, 1, 400, 0), (1, 8, 1, 400, 100)]


@pytest.mark.parametrize("tokens, heads, kv_heads, past, window", POOL_CASES)
def test_attention_threads_agree_and_in_place(isa, threads, tokens, heads, kv_heads, past, window):
    q, k, v = _cache(heads, kv_heads, 64, tokens, past, seed=6)
    expected = kernels.attention_reference(q, k, v, past, 0.125, window)
    results = []
    for n in (1, 2):
        kernels.set_num_threads(n)
        results.append(kernels.attention(q, k, v, past, 0.125, window))
        torch.testing.assert_close(results[-1], expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(results[0], results[1])  # a head's sums do not depend on the split
    y = q.clone()
    assert kernels.attention(y, k, v, past, 0.125, window, out=y) is y
    assert torch.equal(y, results[0])


@pytest.mark.parametrize(
    "q, k, v, past, match",
    [
        (torch.randn(2, 4, 8), torch.randn(3, 10, 8), torch.randn(3, 10, 8), 0, "multiple of"),
        (torch.randn(2, 4, 8), torch.randn(2, 10, 9), torch.randn(2, 10, 9), 0, "head sizes"),
        (torch.randn(2, 4, 8), torch.randn(2, 10, 8), torch.randn(2, 11, 8), 0, "expected q"),
        (torch.randn(2, 4, 8), torch.randn(2, 10, 8), torch.randn(2, 10, 8), 9, "capacity 10"),
        (torch.randn(2, 4, 8), torch.randn(2, 10, 8), torch.randn(2, 10, 8), -1, "capacity 10"),
        (torch.randn(8, 4), torch.randn(2, 10, 4), torch.randn(2, 10, 4), 0, "expected q"),
    ],
)
def test_attention_rejects_bad_inputs(q, k, v, past, match):
    with pytest.raises(ValueError, match=match):
        kernels.attention(q, k, v, past, 0.5)


def test_attention_rejects_out_in_the_cache():
    q, k, v = _cache(2, 1, 8, 1, 0, seed=7)
    with pytest.raises(ValueError, match="overlaps v_cache"):
        kernels.attention(q, k, v, 0, 0.5, out=v[0, :2].view(1, 2, 8))


@pytest.mark.parametrize("window", [0, 8], ids=["causal", "window8"])
def test_attention_reads_through_slot_indices(isa, window):
    """Indirect access (beam search): key j from slot slot_of[j], in runs that switch slot
    mid-block; the same as the reference on the gathered rows, and slots no index names (junk)
    are never read."""
    heads, kv_heads, d, slots, capacity = 8, 2, 64, 4, 90
    gen = torch.Generator().manual_seed(3)
    k = torch.randn(slots, kv_heads, capacity, d, generator=gen)
    v = torch.randn(slots, kv_heads, capacity, d, generator=gen)
    k[3], v[3] = 1e4, float("nan")  # slot 3 is never named
    for tokens, past in [(1, 0), (1, 70), (5, 40), (20, 60)]:
        total = past + tokens
        slot_of = torch.randint(0, 3, (capacity,), generator=gen, dtype=torch.int32)
        slot_of[: total // 2] = 0  # a long shared prefix, then short runs
        q = torch.randn(tokens, heads, d, generator=gen)
        got = kernels.attention(q, k, v, past, d**-0.5, window, slot_of=slot_of)
        keys = kernels.gather_slots(k, slot_of, total)
        values = kernels.gather_slots(v, slot_of, total)
        expected = kernels.attention_reference(q, keys, values, past, d**-0.5, window)
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5), f"S={tokens} P={past}"


def test_kv_write_places_rows_at_slot_and_positions():
    slots, kv_heads, capacity, d, tokens = 3, 2, 10, 8, 4
    cache = torch.zeros(slots, kv_heads, capacity, d)
    wide = torch.randn(tokens, kv_heads * d + 5)  # token stride wider than kv_heads * d

    def write(slot: int, start: int, rows: int) -> None:
        _C.kv_write(
            wide.data_ptr(), wide.stride(0), cache.data_ptr(), slot, slots, start, rows,
            kv_heads, d, capacity,
        )  # fmt: skip

    write(1, 6, tokens)
    expected = torch.zeros_like(cache)
    expected[1, :, 6:10] = wide[:, : kv_heads * d].reshape(tokens, kv_heads, d).transpose(0, 1)
    assert torch.equal(cache, expected)
    with pytest.raises(ValueError, match="outside the cache"):
        write(3, 0, 1)  # no slot 3
    with pytest.raises(ValueError, match="outside the cache"):
        write(0, 7, tokens)  # positions 7..10 of 10


def test_attention_step_direct_path_matches_reference():
    # GroupQueryAttention as the plan runs it: two segments (slots 2 and 0, one prefill of 3 and
    # one decode token) with q/k/v column slices of one fused QKV output; the kernels' direct
    # path (numpy in and out) against the torch reference (torch q/k/v in, torch out, writing
    # the same numpy caches through views), both the outputs and the caches they wrote.
    from xcompile.runtime import fused_ops
    from xcompile.runtime.arrays import to_torch
    from xcompile.runtime.kv_cache import KVCache, Segment

    heads, kv_heads, d, layers = 4, 2, 16, 1
    segments = [Segment(2, 5, 3), Segment(0, 7, 1)]
    gen = torch.Generator().manual_seed(3)
    results = []
    for use_kernels in (True, False):
        kv = KVCache(layers, kv_heads, d, capacity=16, slots=3)
        for buf in kv.buffers.values():
            buf[...] = torch.randn(buf.shape, generator=torch.Generator().manual_seed(1)).numpy()
        qkv = torch.randn(1, 4, (heads + 2 * kv_heads) * d, generator=gen.manual_seed(3))
        if use_kernels:
            qkv = qkv.numpy()  # the runtime's arrays; k3, v3 stay strided column slices
        q3, k3, v3 = (
            qkv[..., : heads * d],
            qkv[..., heads * d : (heads + kv_heads) * d],
            qkv[..., (heads + kv_heads) * d :],
        )
        q3 = q3.copy() if use_kernels else q3.contiguous()
        k_cache, v_cache = (
            kv.buffers["past_key_values.0.key"],
            kv.buffers["past_key_values.0.value"],
        )
        step = fused_ops.attention_step(k_cache, v_cache, use_kernels, kv=kv)
        kv.segments = segments
        out, _, _ = step(q3, k3, v3, k_cache, v_cache, num_heads=heads, kv_num_heads=kv_heads)
        results.append(tuple(to_torch(a).clone() for a in (out, k_cache, v_cache)))
    for got, expected in zip(results[0], results[1]):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# -- a bf16 cache, and decode split over keys (flash-decoding) ----------------------------------
# (S, past): decode within one chunk of keys (512), across 2 and 5 chunks, a few tokens at once
# (still split), and a prefill (not split).
LONG_STEPS = [(1, 37), (1, 600), (1, 2100), (5, 700), (40, 300)]


def _bf16(*tensors):
    return [t.to(torch.bfloat16) for t in tensors]


@pytest.mark.parametrize("window", [0, 300], ids=["causal", "window300"])
@pytest.mark.parametrize("d", [64, 100])
def test_attention_bf16_cache_matches_reference(isa, d, window):
    # The kernel widens bf16 exactly, so it is held to the reference on the same (widened)
    # values as tightly as the fp32 cache is.
    for heads, kv_heads in [(4, 1), (8, 2)]:
        for tokens, past in LONG_STEPS:
            q, k, v = _cache(heads, kv_heads, d, tokens, past, seed=d + past + heads)
            k, v = _bf16(k, v)
            got = kernels.attention(q, k, v, past, d**-0.5, window)
            expected = kernels.attention_reference(q, k, v, past, d**-0.5, window)
            assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5), (
                f"heads={heads} kv={kv_heads} S={tokens} P={past}: max abs error "
                f"{(got - expected).abs().max().item():.3g}"
            )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [0, 700], ids=["causal", "window700"])
def test_split_decode_matches_unsplit_at_any_thread_count(isa, threads, dtype, window):
    """A token decoded alone (S = 1: its keys split into chunks of 512, combined after) against
    the same token as the last row of a 12-token step (S > 8: one pass over all its keys):
    the same within rounding; and bit for bit the same at 1, 2 and 3 threads."""
    heads, kv_heads, d, past = 9, 3, 64, 1500  # SmolLM2's heads: 3 KV heads on 2 threads
    q, k, v = _cache(heads, kv_heads, d, 12, past, seed=11)
    k, v = k.to(dtype), v.to(dtype)
    last = past + 11
    results = []
    for n in (1, 2, 3):
        kernels.set_num_threads(n)
        results.append(kernels.attention(q[11:].contiguous(), k, v, last, 0.125, window))
    unsplit = kernels.attention(q, k, v, past, 0.125, window)[11:]
    expected = kernels.attention_reference(q[11:], k, v, last, 0.125, window)
    torch.testing.assert_close(results[0], unsplit, rtol=1e-5, atol=1e-5)
    _C.set_attention_split(False)  # the same S = 1 call in one pass over the keys
    try:
        one_pass = kernels.attention(q[11:].contiguous(), k, v, last, 0.125, window)
    finally:
        _C.set_attention_split(True)
    assert torch.equal(one_pass, unsplit)  # one pass is the S = 12 path, bit for bit
    torch.testing.assert_close(results[0], expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_decode_reads_through_slot_indices(isa, threads, dtype):
    """Beams over a long shared prefix: the split's chunks cut where the slot changes too."""
    heads, kv_heads, d, slots, capacity = 8, 2, 64, 4, 1200
    gen = torch.Generator().manual_seed(5)
    k = torch.randn(slots, kv_heads, capacity, d, generator=gen).to(dtype)
    v = torch.randn(slots, kv_heads, capacity, d, generator=gen).to(dtype)
    k[3], v[3] = 1e4, float("nan")  # slot 3 is never named
    for tokens, past, window in [(1, 1100, 0), (1, 1100, 700), (3, 900, 0)]:
        total = past + tokens
        slot_of = torch.randint(0, 3, (capacity,), generator=gen, dtype=torch.int32)
        slot_of[: total - 300] = 0  # a long shared prefix, then short runs across two chunks
        q = torch.randn(tokens, heads, d, generator=gen)
        expected = kernels.attention_reference(
            q,
            kernels.gather_slots(k, slot_of, total),
            kernels.gather_slots(v, slot_of, total),
            past,
            d**-0.5,
            window,
        )
        for n in (1, 2):
            kernels.set_num_threads(n)
            got = kernels.attention(q, k, v, past, d**-0.5, window, slot_of=slot_of)
            assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5), f"S={tokens} P={past}"


def test_split_decode_in_place(threads):
    q, k, v = _cache(8, 2, 64, 1, 999, seed=9)
    kernels.set_num_threads(2)
    expected = kernels.attention(q, k, v, 999, 0.125)
    y = q.clone()
    assert kernels.attention(y, k, v, 999, 0.125, out=y) is y
    assert torch.equal(y, expected)


def test_kv_write_bf16_rounds_to_nearest_even():
    # torch's fp32 -> bf16 conversion rounds to nearest even: ties both ways, the largest finite
    # values, infinities and NaN, at a slot and positions inside a larger cache.
    slots, kv_heads, capacity, d, tokens = 2, 2, 6, 8, 3
    ties = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 3.3895314e38, 1e-40])
    special = torch.tensor([float("inf"), float("-inf"), 0.0, -0.0])
    wide = torch.randn(tokens, kv_heads * d + 3)
    wide.view(-1)[: ties.numel()] = ties
    wide.view(-1)[ties.numel() : ties.numel() + special.numel()] = special
    cache = torch.zeros(slots, kv_heads, capacity, d, dtype=torch.bfloat16)
    _C.kv_write_bf16(
        wide.data_ptr(), wide.stride(0), cache.data_ptr(), 1, slots, 2, tokens, kv_heads, d,
        capacity,
    )  # fmt: skip
    expected = torch.zeros_like(cache)
    rows = wide[:, : kv_heads * d].reshape(tokens, kv_heads, d).transpose(0, 1)
    expected[1, :, 2:5] = rows.to(torch.bfloat16)
    assert torch.equal(cache.view(torch.int16), expected.view(torch.int16))
    nan = torch.full((1, 1), float("nan"))
    _C.kv_write_bf16(nan.data_ptr(), 1, cache.data_ptr(), 0, slots, 0, 1, 1, 1, capacity * d)
    assert cache.view(-1)[0].isnan()


# Soft-caps: Gemma 2's 50 over scores of ~1 (s / cap ~ 0.02: tanh's series near 0), and 0.5,
# 2 over scores of ~N(0, 4) (s / cap up to ~15: exp's side, and saturation at +-cap).
SOFTCAPS = [(50.0, 1.0), (2.0, 4.0), (0.5, 4.0)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [0, 8], ids=["causal", "window8"])
@pytest.mark.parametrize("cap, spread", SOFTCAPS, ids=["cap50", "cap2", "cap0.5"])
def test_attention_softcap_matches_reference(isa, dtype, window, cap, spread):
    """softcap * tanh(s / softcap) on each scaled score before the softmax: prefill and decode,
    split (decode) and one pass (prefill), every head layout, held to torch's tanh."""
    d, capped = 64, 0.0
    for heads, kv_heads in HEAD_LAYOUTS:
        for tokens, past in STEPS + [(1, 700)]:
            q, k, v = _cache(heads, kv_heads, d, tokens, past, seed=heads + past + int(cap))
            q *= spread
            k, v = k.to(dtype), v.to(dtype)
            got = kernels.attention(q, k, v, past, d**-0.5, window, softcap=cap)
            expected = kernels.attention_reference(q, k, v, past, d**-0.5, window, softcap=cap)
            assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5), (
                f"heads={heads} kv={kv_heads} S={tokens} P={past}: max abs error "
                f"{(got - expected).abs().max().item():.3g}"
            )
            plain = kernels.attention_reference(q, k, v, past, d**-0.5, window)
            capped = max(capped, (plain - expected).abs().max().item())
    assert capped > (1e-4 if cap > 10 else 1e-1)  # the cap changes the result: this could fail


def test_attention_softcap_through_slot_indices(isa):
    heads, kv_heads, d, slots, capacity = 8, 2, 64, 3, 64
    gen = torch.Generator().manual_seed(8)
    k, v = torch.randn(2, slots, kv_heads, capacity, d, generator=gen)
    slot_of = torch.randint(0, slots, (capacity,), generator=gen, dtype=torch.int32)
    q = 4 * torch.randn(2, heads, d, generator=gen)
    got = kernels.attention(q, k, v, 40, d**-0.5, slot_of=slot_of, softcap=1.5)
    keys, values = (kernels.gather_slots(t, slot_of, 42) for t in (k, v))
    expected = kernels.attention_reference(q, keys, values, 40, d**-0.5, softcap=1.5)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_attention_rejects_a_negative_softcap():
    q, k, v = _cache(4, 2, 16, 1, 0, seed=1)
    with pytest.raises(ValueError, match="softcap"):
        kernels.attention(q, k, v, 0, 0.25, softcap=-1.0)
