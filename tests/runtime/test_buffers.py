"""Shared output buffers (plan.share_buffers): steps whose outputs are never alive at the same
time write into the same blocks, so a prefill of S tokens holds a few blocks of S rows, not one
per step. Sharing must never let a step overwrite memory that a later step still reads."""

from __future__ import annotations

import numpy as np
import pytest

from xcompile.runtime import fused_ops
from xcompile.runtime.model import Model
from xcompile.runtime.plan import Step, share_buffers


def owning(fresh: bool = True):
    """A step function with its own OutputBuffers (fresh: never returns views of its inputs)."""

    def fn(*_):
        return None

    return fused_ops.owns_outputs(fn, fused_ops.OutputBuffers()) if fresh else _buffered(fn)


def _buffered(fn):
    fn.buffers = fused_ops.OutputBuffers()
    return fn


def colors(steps: list[Step], fetch: int) -> list[int | None]:
    share_buffers(steps, fetch)
    return [s.fn.buffers.color if hasattr(s.fn, "buffers") else None for s in steps]


def test_a_block_is_reused_only_after_its_last_reader():
    # a -> b -> c -> d, each reading the one before: a's block is free once b has read it, so c
    # may take it, b's once c has read it (d takes it); d, the fetched result, keeps its own.
    steps = [
        Step("a", owning(), (0,), (1,)),
        Step("b", owning(), (1,), (2,)),
        Step("c", owning(), (2,), (3,)),
        Step("d", owning(), (3,), (4,)),
    ]
    got = colors(steps, fetch=4)
    assert got[0] == got[2] != got[1]
    assert got[3] not in got[:3]


def test_a_view_keeps_its_block_alive_until_the_views_last_reader():
    # v is a view of a (no buffers of its own); c reads v, so a's block is still read at step c
    # and neither b (alive until c) nor c (reading it) may take it; d may.
    steps = [
        Step("a", owning(), (0,), (1,)),
        Step("v", lambda x: x, (1,), (2,)),
        Step("b", owning(), (0,), (3,)),
        Step("c", owning(), (2, 3), (4,)),
        Step("d", owning(), (4,), (5,)),
        Step("e", owning(), (5,), (6,)),
    ]
    got = colors(steps, fetch=6)
    a, b, c, d = got[0], got[2], got[3], got[4]
    assert len({a, b, c}) == 3  # all three alive at step c
    assert d in (a, b)  # both free after c


def test_a_step_that_may_return_its_input_passes_the_lifetime_on():
    # m has buffers but may hand back a view of its input (attention's general path): reading
    # m's output reads a's memory too.
    steps = [
        Step("a", owning(), (0,), (1,)),
        Step("m", owning(fresh=False), (1,), (2,)),
        Step("b", owning(), (2,), (3,)),
        Step("c", owning(), (3,), (4,)),
    ]
    got = colors(steps, fetch=4)
    assert got[2] != got[0]  # b reads m's output, which may be a's block
    assert got[2] != got[1]


@pytest.mark.parametrize("dtype", ["fp32", "int8"])
def test_shared_buffers_keep_logits_and_bound_the_prefill_memory(compiled, dtype):
    model = Model.load(compiled("llama", dtype))
    prompt = list(range(3, 3 + 40))
    cache = model.new_cache(64)
    shared = model.forward(prompt, 0, cache).copy()
    pool = model.plan.pool
    blocks = {color for color, _ in pool.blocks}
    owners = [s for s in model.plan.steps if hasattr(s.fn, "buffers")]
    # the same run with a block per step (sharing undone)
    for step in owners:
        step.fn.buffers.share(None)
    fused_ops.bump_generation()
    alone = model.forward(prompt, 0, cache)  # the same cache: a new one builds a new plan
    assert np.array_equal(shared, alone)
    per_step = sum(b.nbytes for s in owners for b in s.fn.buffers.pool.blocks.values())
    # the test model's 3 layers have ~10 buffered steps each; the values alive at once (the
    # residual stream, a layer's QKV and attention output, its MLP's input and output, the
    # logits) need a handful of blocks, however many layers there are
    assert len(blocks) <= 8 < len(owners)
    assert pool.nbytes() < per_step / 2
