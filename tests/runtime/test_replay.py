"""Replayed forwards (runtime/replay.py): the kernel calls of a decode step recorded, then called
again without the plan around them. Replays must give the plain run's logits bit for bit, and
fall back whenever an address or a shape the recording relied on changes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xcompile import _C
from xcompile.runtime.kv_cache import Segment
from xcompile.runtime.model import Model
from xcompile.runtime.replay import PYTHON


def decode(model: Model, replay: bool, prompt: list[int], tokens: list[int], slots: int = 1):
    """Logits of the prompt's last row, then of each forced decode token."""
    cache = model.new_cache(64, slots=slots)
    model.plan.replay = replay
    out = [model.forward(prompt, 0, cache, last_only=True)[-1]]
    for i, token in enumerate(tokens):
        out.append(model.forward([token], len(prompt) + i, cache, last_only=True)[-1])
    return out, model.plan.replayed


@pytest.mark.parametrize("family", ["llama", "gptj", "mistral"])
@pytest.mark.parametrize("dtype", ["fp32", "int8", "int4"])
def test_replayed_decode_equals_plain_run(compiled, family, dtype):
    model = Model.load(compiled(family, dtype))
    prompt, tokens = [5, 9, 13, 2, 7], [17, 2, 30, 6, 21, 9, 4, 11]
    plain, none = decode(model, False, prompt, tokens)
    replayed, count = decode(model, True, prompt, tokens)
    assert none == 0
    assert count >= len(tokens) - 3  # two recordings agree, then every step replays
    for a, b in zip(replayed, plain):
        assert np.array_equal(a, b)
    # every kernel call replays from C++ (_C.Tape); only Python steps stay entries
    (program,) = model.plan._ready.values()
    calls = sum(1 for kind, *_ in program.entries if kind != PYTHON)
    assert sum(len(run) for run in program.runs if type(run) is _C.Tape) == calls > 0
    assert all(type(run) is _C.Tape or run[0] == PYTHON for run in program.runs)


def test_replay_survives_buffers_that_grow_and_batches_that_change(compiled):
    # A long prefill between decode steps grows every node's output buffer (their addresses
    # move); a batch whose composition changes gets a recording per composition. Each forward
    # must still equal the plain run's.
    model = Model.load(compiled("llama"))
    script = [
        [Segment(0, 0, 4)],
        *[[Segment(0, 4 + i, 1)] for i in range(4)],
        [Segment(1, 0, 30)],  # grows the buffers of every node
        *[[Segment(0, 8 + i, 1), Segment(1, 30 + i, 1)] for i in range(4)],
        *[[Segment(1, 34 + i, 1)] for i in range(4)],
    ]
    results = {}
    for replay in (False, True):
        cache = model.new_cache(64, slots=2)
        model.plan.replay = replay
        gen = torch.Generator().manual_seed(0)
        outs = []
        for segments in script:
            ids = torch.randint(0, 100, (sum(s.length for s in segments),), generator=gen).tolist()
            outs.append(model.forward_batch(segments, ids, cache))
        results[replay] = (outs, model.plan.replayed)
    assert results[False][1] == 0 and results[True][1] >= 3
    for a, b in zip(*[results[r][0] for r in (False, True)]):
        assert np.array_equal(a, b)


def test_a_step_whose_output_moves_is_not_replayed_stale(compiled, monkeypatch):
    # The plain numpy steps (here the embedding's Gather) are re-run at each replay and their
    # outputs copied where the recorded kernels read them: a fresh allocation every call must
    # not leave a kernel reading the recording's memory.
    model = Model.load(compiled("llama"))
    prompt, tokens = [5, 9, 13], [17, 2, 30, 6, 21, 9]
    plain, _ = decode(model, False, prompt, tokens)
    gather = next(s for s in model.plan.steps if s.name.endswith("Gather"))
    inner = gather.fn
    gather.fn = lambda *a, **k: inner(*a, **k).copy()  # a new address at every call
    replayed, count = decode(model, True, prompt, tokens)
    assert count >= 2
    for a, b in zip(replayed, plain):
        assert np.array_equal(a, b)


def test_keys_recorded_once_are_not_kept_forever(compiled):
    # A server's batches keep making keys (slots x lengths) that never come back: their first
    # recordings wait for a second that never comes. The plan keeps the latest _MAX_SEEN.
    model = Model.load(compiled("llama"))
    cache = model.new_cache(64, slots=8)
    plan = model.plan
    keys = 0
    for slot in range(8):
        for length in range(1, 11):  # 80 keys, each forward recorded once
            model.forward_batch([Segment(slot, 0, length)], list(range(1, length + 1)), cache)
            keys += 1
    assert keys > plan._MAX_SEEN
    assert len(plan._seen) == plan._MAX_SEEN and len(plan._tries) <= plan._MAX_SEEN + 1
    assert ((7, 10),) in {key[0] for key in plan._seen}  # the latest kept
    assert ((0, 1),) not in {key[0] for key in plan._seen}  # the oldest dropped
