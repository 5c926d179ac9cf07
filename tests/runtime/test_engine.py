"""The continuous-batching engine (runtime/engine.py) in process, no HTTP: requests decoded in one
batch get the greedy tokens each gets alone (generate(), the path `xrun --prompt` takes), one that
arrives mid-decode joins at the next step, a long prompt prefilled in chunks gives the same
tokens, a finished or cancelled request frees its slot at once, a full engine says Busy."""

from __future__ import annotations

import math
import threading

import pytest

from xcompile.errors import UserError
from xcompile.runtime.engine import Busy, Engine, EngineFailed
from xcompile.runtime.generate import generate
from xcompile.runtime.model import Model
from xcompile.runtime.sampling import Sampler, SamplingParams
from xcompile.runtime.tokenizer import TextTokenizer

PROMPTS = [
    "The quick brown fox jumps over the lazy dog and then",
    "Once upon a time",
    "In a village by the sea there lived an old fisherman who every morning",
]
GREEDY = SamplingParams(temperature=0.0)
NO_EOS: set[int] = set()  # every request runs to its max_new_tokens: step counts are exact


@pytest.fixture(scope="module")
def art(compiled):
    return compiled("llama")


@pytest.fixture(scope="module")
def tokenizer(art):
    return TextTokenizer(art)


@pytest.fixture(scope="module")
def alone(art):
    """alone(prompt_ids, n) -> the greedy tokens of generate() on a model of its own."""
    model = Model.load(art)

    def run(ids: list[int], n: int) -> list[int]:
        return generate(model, ids, n, Sampler(GREEDY), NO_EOS).tokens

    return run


@pytest.fixture
def engine_of(art):
    """engine_of(**kwargs) -> an Engine on a freshly loaded model, closed after the test."""
    made = []

    def make(**kwargs) -> Engine:
        made.append(Engine(Model.load(art), **kwargs))
        return made[-1]

    yield make
    for engine in made:
        engine.close()


class Stream:
    """An emit callback that keeps what the engine sends: tokens, then the finish reason.
    on_token(stream) runs in the engine's thread after each token."""

    def __init__(self, on_token=None):
        self.tokens: list[int] = []
        self.reason: str | None = None
        self.done = threading.Event()
        self.on_token = on_token

    def __call__(self, token: int | None, reason: str | None) -> None:
        if token is not None:
            self.tokens.append(token)
            if self.on_token:
                self.on_token(self)
        else:
            self.reason = reason
            self.done.set()

    def wait(self, timeout: float = 60) -> Stream:
        assert self.done.wait(timeout), f"no finish within {timeout} s ({len(self.tokens)} tokens)"
        return self


def test_batched_tokens_equal_each_alone_and_a_late_request_joins_next_step(
    engine_of, tokenizer, alone
):
    n, join_at = 24, 5
    ids = [tokenizer.encode(p) for p in PROMPTS]
    engine = engine_of(slots=3)
    busy_at_finish = []

    def finished(stream):
        def emit(token, reason):
            if token is None:  # the engine frees the slot before it says so
                busy_at_finish.append(engine.busy_slots)
            stream(token, reason)

        return emit

    late = Stream()

    def submit_late(stream: Stream) -> None:  # the engine's thread, while a and b decode
        if len(stream.tokens) == join_at:
            engine.submit(ids[2], n, GREEDY, NO_EOS, finished(late))

    a, b = Stream(on_token=submit_late), Stream()
    with engine._lock:  # both are waiting when the engine wakes: they share the first step
        engine.submit(ids[0], n, GREEDY, NO_EOS, finished(a))
        engine.submit(ids[1], n, GREEDY, NO_EOS, finished(b))
    for stream in (a, b, late):
        stream.wait()

    assert [a.tokens, b.tokens, late.tokens] == [alone(i, n) for i in ids]
    assert (a.reason, b.reason, late.reason) == ("length",) * 3
    # a and b: steps 1..n; the late one: prefilled at step join_at + 1, done at step n + join_at.
    # One at a time it would be 3n forward passes.
    assert engine.steps == n + join_at
    assert busy_at_finish == [2, 1, 0]
    assert engine.busy_slots == 0


@pytest.mark.parametrize("step_tokens", [4, 7])
def test_chunked_prefill_gives_the_same_tokens(engine_of, tokenizer, alone, step_tokens):
    n = 10
    ids = tokenizer.encode(PROMPTS[2] * 2)
    assert len(ids) > 4 * step_tokens  # several chunks
    engine = engine_of(slots=1, step_tokens=step_tokens)
    stream = Stream()
    engine.submit(ids, n, GREEDY, NO_EOS, stream)
    assert stream.wait().tokens == alone(ids, n)
    # ceil(P / step_tokens) prefill steps (the last one samples the first token), then n - 1
    assert engine.steps == math.ceil(len(ids) / step_tokens) + n - 1


def test_chunked_prefill_beside_a_decoding_request(engine_of, tokenizer, alone):
    """Decode rows come first in a step; the long prompt gets what is left of step_tokens."""
    n, step_tokens = 12, 10
    short, long = tokenizer.encode(PROMPTS[1]), tokenizer.encode(PROMPTS[2] * 2)
    assert len(short) <= step_tokens
    engine = engine_of(slots=2, step_tokens=step_tokens)
    second = Stream()

    def submit_long(stream: Stream) -> None:
        if len(stream.tokens) == 1:
            engine.submit(long, n, GREEDY, NO_EOS, second)

    first = Stream(on_token=submit_long)
    engine.submit(short, n, GREEDY, NO_EOS, first)
    first.wait()
    second.wait()
    assert first.tokens == alone(short, n)
    assert second.tokens == alone(long, n)
    # step 1 prefills `short`; from step 2 its decode row leaves step_tokens - 1 for `long`
    prefill_steps = math.ceil(len(long) / (step_tokens - 1))
    assert 1 + prefill_steps <= n  # `short` still decodes all through the long prefill
    assert engine.steps == max(n, 1 + prefill_steps + n - 1)


def test_cancel_frees_the_slot_and_the_next_request_in_it_is_exact(engine_of, tokenizer, alone):
    ids = tokenizer.encode(PROMPTS[0])
    engine = engine_of(slots=1)
    started = threading.Event()
    long = Stream(on_token=lambda s: len(s.tokens) == 3 and started.set())
    request = engine.submit(ids, 200, GREEDY, NO_EOS, long)
    assert started.wait(60)
    engine.cancel(request)
    assert long.wait().reason == "cancelled"
    assert 3 <= len(long.tokens) < 200
    assert engine.busy_slots == 0
    # the slot's cache still holds the cancelled request's keys: the next one must not see them
    other = tokenizer.encode(PROMPTS[1])
    again = Stream()
    engine.submit(other, 8, GREEDY, NO_EOS, again)
    assert again.wait().tokens == alone(other, 8)


def test_busy_when_every_slot_is_taken(engine_of, tokenizer):
    ids = tokenizer.encode(PROMPTS[0])
    engine = engine_of(slots=2)
    held = [Stream(), Stream()]
    requests = [engine.submit(ids, 200, GREEDY, NO_EOS, stream) for stream in held]
    assert engine.busy_slots == 2
    with pytest.raises(Busy, match="all 2 slots"):
        engine.submit(ids, 4, GREEDY, NO_EOS, Stream())
    engine.cancel(requests[0])
    held[0].wait()
    third = Stream()
    engine.submit(ids, 4, GREEDY, NO_EOS, third)  # the freed slot takes it
    assert len(third.wait().tokens) == 4 and third.reason == "length"
    engine.cancel(requests[1])
    assert held[1].wait().reason == "cancelled"
    assert engine.busy_slots == 0


def test_submit_refuses_bad_requests_and_clips_to_the_context(engine_of, tokenizer):
    engine = engine_of(slots=1, capacity=32)
    with pytest.raises(UserError, match="empty"):
        engine.submit([], 4, GREEDY, NO_EOS, Stream())
    with pytest.raises(UserError, match="32"):
        engine.submit([5] * 32, 4, GREEDY, NO_EOS, Stream())
    with pytest.raises(UserError, match="at least 1"):
        engine.submit([5, 6], 0, GREEDY, NO_EOS, Stream())
    ids = tokenizer.encode(PROMPTS[1])
    clipped = Stream()
    engine.submit(ids, 1000, GREEDY, NO_EOS, clipped)
    assert len(clipped.wait().tokens) == 32 - len(ids) and clipped.reason == "length"
    assert engine.busy_slots == 0


class FailingModel:
    """A model whose forward pass raises from the `fail_at`-th on, as when a rank dies."""

    def __init__(self, model: Model, fail_at: int):
        self.model, self.fail_at, self.calls = model, fail_at, 0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def forward_batch(self, *args):
        self.calls += 1
        if self.calls >= self.fail_at:
            raise RuntimeError("rank 1 is gone")
        return self.model.forward_batch(*args)


def test_a_failed_step_ends_every_request_and_refuses_new_ones(art, tokenizer):
    engine = Engine(FailingModel(Model.load(art), fail_at=4), slots=2)
    try:
        streams = [Stream(), Stream()]
        with engine._lock:  # both in the batch from the first step
            for stream in streams:
                engine.submit(tokenizer.encode(PROMPTS[0]), 50, GREEDY, NO_EOS, stream)
        for stream in streams:
            assert stream.wait().reason == "error" and len(stream.tokens) == 3
        assert engine.failed == "RuntimeError: rank 1 is gone"
        with pytest.raises(EngineFailed, match="rank 1 is gone"):
            engine.submit([1, 2, 3], 4, GREEDY, NO_EOS, Stream())
    finally:
        engine.close()


@pytest.mark.parametrize("step_tokens", [256, 4])
def test_phi3_longrope_served_gives_transformers_tokens(phi3_switch, hf_greedy_of, step_tokens):
    """Phi-3 with longrope switching at 12 tokens, three requests in one batch: a short prompt
    that crosses the switch while decoding (its whole sequence re-run with the long factors),
    and two prompts past it (long from the prefill, even in chunks of 4) decoding beside it:
    each gets transformers' 16 greedy tokens."""
    ckpt, art = phi3_switch
    tok = TextTokenizer(art)
    prompts = [tok.encode(p) for p in PROMPTS]
    assert len(prompts[1]) <= 12 < len(prompts[0]) < len(prompts[2])
    engine = Engine(Model.load(art), slots=3, step_tokens=step_tokens)
    try:
        streams = [Stream() for _ in prompts]
        for ids, stream in zip(prompts, streams):
            engine.submit(ids, 16, GREEDY, NO_EOS, stream)
        for ids, stream in zip(prompts, streams):
            assert stream.wait().tokens == hf_greedy_of(ckpt, ids, 16)
    finally:
        engine.close()
