"""Continuous batching: every request gets a KV-cache slot, and one forward pass per step serves
all of them, so the weights are read once per step however many requests are decoding.

    engine = Engine(model, slots=8)            # model: Model, or Leader under tensor parallelism
    request = engine.submit(prompt_ids, max_new_tokens, SamplingParams(), eos_ids, emit)
    # emit(token, finish_reason) is called from the engine's thread: a token, then at the end
    # (None, "stop" | "length" | "cancelled" | "error")
    engine.cancel(request)                      # a client went away: its slot is free next step
    engine.close()

A step takes the decoding requests' last tokens (one row each) and, within `step_tokens`, the
next chunk of the prompts waiting for prefill (a long prompt is prefilled over several steps, so
it never stalls the others for long). A request that arrives while others decode joins at the
next step; a finished one frees its slot at once. Requests beyond the slots are refused (Busy):
the server turns that into HTTP 429.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from xcompile.errors import UserError
from xcompile.runtime.kv_cache import Segment
from xcompile.runtime.sampling import Sampler, SamplingParams

Emit = Callable[[int | None, str | None], None]


class Busy(Exception):
    """Every slot is taken."""


class EngineFailed(Exception):
    """The engine stopped (a rank died, or a step raised): nothing more can run."""


@dataclass(eq=False)
class Request:
    id: int
    prompt_ids: list[int]
    max_new_tokens: int  # already clipped to the context
    sampler: Sampler
    eos_ids: set[int]
    emit: Emit
    slot: int = -1
    prefilled: int = 0  # prompt tokens in the cache so far
    tokens: list[int] = field(default_factory=list)
    cancelled: bool = False
    submitted: float = field(default_factory=time.perf_counter)

    @property
    def position(self) -> int:
        """Tokens in the cache: the prompt's and all generated but the last."""
        return len(self.prompt_ids) + max(0, len(self.tokens) - 1)


class Engine:
    def __init__(self, model, slots: int = 8, capacity: int | None = None, step_tokens: int = 256):
        """capacity: tokens per slot (default: the model's context)."""
        if slots < 1:
            raise UserError(f"--slots {slots}: give at least 1")
        self.model = model
        self.slots = slots
        self.capacity = min(capacity or model.context, model.context)
        self.step_tokens = max(1, step_tokens)
        self.free = list(range(slots))
        self.active: list[Request] = []  # in arrival order: prefilling or decoding
        self.ids = itertools.count(1)
        self.failed: str | None = None
        self.steps = 0
        self._lock = threading.Condition()
        self._stopping = False
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="xcompile-engine", daemon=True)
        self._thread.start()
        self._started.wait()
        if self._start_error is not None:
            raise self._start_error

    # ---- called from any thread ---------------------------------------------------------------
    def submit(
        self,
        prompt_ids: list[int],
        max_new_tokens: int,
        sampling: SamplingParams,
        eos_ids: set[int],
        emit: Emit,
    ) -> Request:
        if not prompt_ids:
            raise UserError("the prompt is empty after tokenization; give some text")
        if len(prompt_ids) >= self.capacity:
            raise UserError(
                f"the prompt is {len(prompt_ids)} tokens, the context is {self.capacity}; "
                "shorten the prompt"
            )
        if max_new_tokens < 1:
            raise UserError("max_tokens must be at least 1")
        budget = min(max_new_tokens, self.capacity - len(prompt_ids))
        with self._lock:
            if self.failed:
                raise EngineFailed(self.failed)
            if not self.free:
                raise Busy(f"all {self.slots} slots are in use")
            request = Request(
                next(self.ids), list(prompt_ids), budget, Sampler(sampling), eos_ids, emit
            )
            request.slot = self.free.pop(0)
            self.active.append(request)
            self._lock.notify()
        return request

    def cancel(self, request: Request) -> None:
        with self._lock:
            request.cancelled = True
            self._lock.notify()

    @property
    def busy_slots(self) -> int:
        with self._lock:
            return self.slots - len(self.free)

    def close(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify()
        self._thread.join()

    # ---- the engine's thread ------------------------------------------------------------------
    def _run(self) -> None:
        # The cache is made here, where every forward runs: libgomp keeps a thread pool for each
        # thread that starts parallel work, and the main thread's (from zeroing the cache) made it
        # count more threads than cores, so its threads slept between a step's kernels instead of
        # spinning (the 1.1B INT8's step took 47 ms served against 36 ms in xrun).
        try:
            self.cache = self.model.new_cache(self.capacity, slots=self.slots)
        except BaseException as e:  # handed to __init__, in the caller's thread
            self._start_error = e
            return
        finally:
            self._started.set()
        self._loop()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not self.active:
                    self._lock.wait()
                if self._stopping:
                    break
                for r in [r for r in self.active if r.cancelled]:
                    self._finish(r, "cancelled")
                batch = list(self.active)
            if not batch:
                continue
            try:
                self._step(batch)
            except BaseException as e:  # a rank died, or a bug: fail every request, once
                self._fail(f"{e.__class__.__name__}: {e}" if str(e) else e.__class__.__name__)
                if not isinstance(e, Exception):
                    raise
                return
        with self._lock:
            for r in list(self.active):
                self._finish(r, "cancelled")

    def _step(self, batch: list[Request]) -> None:
        """One forward: a row per decoding request, then prompt chunks within step_tokens.
        longrope (Phi-3): the graph picks the long factors for a whole forward when its longest
        position + 1 passes the switch, so the rows on either side of it run in forwards of
        their own; a prompt past the switch is prefilled whole (a chunk within it would pick the
        short ones), and a request whose next position is the switch re-runs its whole sequence
        (prompt and tokens) with the long factors, as transformers (and generate) do."""
        switch = self.model.config.get("rope_switch") or 0
        parts: list[tuple[Request, Segment, list[int], bool]] = []  # bool: its last row samples
        for r in batch:
            if not r.tokens:
                continue
            if switch and r.position == switch:
                sequence = r.prompt_ids + r.tokens
                parts.append((r, Segment(r.slot, 0, len(sequence)), sequence, True))
            else:
                parts.append((r, Segment(r.slot, r.position, 1), [r.tokens[-1]], True))
        room = max(self.step_tokens - sum(seg.length for _, seg, _, _ in parts), 0)

        def chunk(r: Request, most: int) -> None:
            left = len(r.prompt_ids) - r.prefilled
            take = left if switch and len(r.prompt_ids) > switch else min(left, most)
            ids = r.prompt_ids[r.prefilled : r.prefilled + take]
            parts.append((r, Segment(r.slot, r.prefilled, take), ids, take == left))
            r.prefilled += take

        for r in batch:
            if r.tokens or room == 0:
                continue
            chunk(r, room)
            room = max(room - parts[-1][1].length, 0)
        if not parts:  # every prompt is waiting on room that decode rows took: one each
            chunk(next(r for r in batch if not r.tokens), 1)
        sides = [parts]
        if switch:  # short-factor rows, then long-factor rows
            long = [p for p in parts if p[1].start + p[1].length > switch]
            sides = [side for side in ([p for p in parts if p not in long], long) if side]
        for side in sides:
            self._forward(side)

    def _forward(self, parts: list[tuple[Request, Segment, list[int], bool]]) -> None:
        segments, ids, last_row = [], [], {}
        for r, seg, tokens, samples in parts:
            segments.append(seg)
            ids.extend(tokens)
            if samples:
                last_row[r.id] = len(ids) - 1
        wanted = sorted(last_row.values())  # logits only for the rows that make a token
        logits = self.model.forward_batch(segments, ids, self.cache, wanted)
        at = {row: i for i, row in enumerate(wanted)}
        self.steps += 1
        for r, *_ in parts:
            row = last_row.get(r.id)
            if row is None:
                continue
            token = r.sampler(logits[at[row]])
            r.tokens.append(token)
            r.emit(token, None)
            if token in r.eos_ids:
                reason = "stop"
            elif len(r.tokens) >= r.max_new_tokens:
                reason = "length"
            else:
                continue
            with self._lock:
                self._finish(r, reason)

    def _finish(self, request: Request, reason: str) -> None:
        """With the lock held: the request leaves the batch and its slot is free."""
        if request not in self.active:
            return
        self.active.remove(request)
        self.free.append(request.slot)
        request.emit(None, reason)

    def _fail(self, reason: str) -> None:
        with self._lock:
            self.failed = reason
            for r in list(self.active):
                self.active.remove(r)
                r.emit(None, "error")
