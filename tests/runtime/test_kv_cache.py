"""Several sequences in one forward (slots of one KV cache) and the indirect rows beams use:
every sequence gets the logits it gets alone, and reordering beams moves indices, not K/V."""

from __future__ import annotations

import numpy as np
import pytest

from xcompile.runtime.kv_cache import Segment
from xcompile.runtime.model import Model

PROMPTS = [[5, 9, 13, 2, 7], [11, 4], [3, 3, 8, 1, 6, 10, 12]]


def alone(model: Model, ids: list[int], steps: list[int]) -> list[np.ndarray]:
    """Logits of the last row after the prompt, then after each decode token, one sequence."""
    cache = model.new_cache(32)
    out = [model.forward(ids, 0, cache)[-1]]
    for i, token in enumerate(steps):
        out.append(model.forward([token], len(ids) + i, cache)[-1])
    return out


@pytest.mark.parametrize("family", ["llama", "gptj", "mistral"])
@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "reference"])
def test_batched_sequences_equal_each_alone(compiled, family, kernels):
    model = Model.load(compiled(family), use_kernels=kernels)
    steps = [[17, 2], [6, 30], [21, 9]]
    want = [alone(model, p, s) for p, s in zip(PROMPTS, steps)]

    cache = model.new_cache(32, slots=4)
    # prefill two sequences together (slots 2 and 0), then decode them while the third joins
    segs = [Segment(2, 0, len(PROMPTS[0])), Segment(0, 0, len(PROMPTS[1]))]
    logits = model.forward_batch(segs, PROMPTS[0] + PROMPTS[1], cache)
    got = {0: [logits[len(PROMPTS[0]) - 1]], 1: [logits[-1]]}
    segs = [
        Segment(2, len(PROMPTS[0]), 1),
        Segment(3, 0, len(PROMPTS[2])),
        Segment(0, len(PROMPTS[1]), 1),
    ]
    logits = model.forward_batch(segs, [steps[0][0]] + PROMPTS[2] + [steps[1][0]], cache)
    got[0].append(logits[0])
    got[2] = [logits[len(PROMPTS[2])]]
    got[1].append(logits[-1])
    # one more decode step each, every sequence in one pass
    segs = [Segment(2, len(PROMPTS[0]) + 1, 1), Segment(0, len(PROMPTS[1]) + 1, 1)]
    segs.append(Segment(3, len(PROMPTS[2]), 1))
    logits = model.forward_batch(segs, [steps[0][1], steps[1][1], steps[2][0]], cache)
    got[0].append(logits[0])
    got[1].append(logits[1])
    got[2].append(logits[2])
    for seq in range(3):
        for a, b in zip(got[seq], want[seq]):
            assert np.abs(a - b).max() <= 1e-4 * max(1.0, np.abs(b).max())


def test_beam_fork_and_reorder_move_indices_not_cache_data(compiled):
    model = Model.load(compiled("llama"))
    prompt = PROMPTS[0]
    cache = model.new_cache(32, slots=3)
    model.forward_batch([Segment(0, 0, len(prompt))], prompt, cache)
    model.fork(cache, 0, [1, 2], len(prompt))  # three beams share the prompt's K/V in slot 0
    n = len(prompt)
    beams = [Segment(s, n, 1) for s in range(3)]
    model.forward_batch(beams, [4, 8, 15], cache)
    before = {k: v.copy() for k, v in cache.buffers.items()}
    rows_before = cache.rows.copy()
    model.reorder(cache, [2, 2, 0], n + 1)
    for name, buf in cache.buffers.items():
        assert np.array_equal(buf.view(np.uint8), before[name].view(np.uint8)), (
            f"{name} changed on reorder"
        )
    assert np.array_equal(cache.rows[:, : n + 1], rows_before[[2, 2, 0], : n + 1])
    assert (cache.rows[:, :n] == 0).all()  # the prompt is still read from slot 0 by every beam
    # each beam now continues its parent: the next step equals running that sequence alone
    logits = model.forward_batch([Segment(s, n + 1, 1) for s in range(3)], [23, 42, 16], cache)
    for slot, (parent_token, token) in enumerate([(15, 23), (15, 42), (4, 16)]):
        want = alone(model, prompt + [parent_token], [token])[-1]
        assert np.abs(logits[slot] - want).max() <= 1e-4 * max(1.0, np.abs(want).max())


def test_primitive_graph_refuses_slots(compiled):
    from xcompile.errors import UserError

    model = Model.load(compiled("llama", passes=[]))
    with pytest.raises(UserError, match="primitive graph"):
        model.new_cache(16, slots=2)
    cache = model.new_cache(16)
    with pytest.raises(UserError, match="primitive graph"):
        model.forward_batch([Segment(0, 0, 2)], [5, 9], cache)


@pytest.mark.parametrize("family", ["llama", "gptj"])
def test_logits_of_chosen_rows_only(compiled, family):
    """The output projection can run on the rows that need logits (prefill's last token)."""
    model = Model.load(compiled(family))
    ids = PROMPTS[2]
    full = model.forward(ids, 0, model.new_cache(16))
    last = model.forward(ids, 0, model.new_cache(16), last_only=True)
    assert last.shape == (1, full.shape[1])
    assert np.allclose(last[0], full[-1], rtol=1e-5, atol=1e-5)
    cache = model.new_cache(16, slots=2)
    segs = [Segment(0, 0, 3), Segment(1, 0, 4)]
    picked = model.forward_batch(segs, ids, cache, rows=[2, 6])
    assert np.allclose(picked[0], full[2], rtol=1e-5, atol=1e-5)
