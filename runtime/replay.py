"""Replaying a decode step: the kernel calls of one forward, recorded once, then called again
without the plan's Python around them (CUDA graphs' idea, for the interpreter's overhead on CPU).

A decode step of the 1.1B model is ~270 steps; each costs 10-50 us of Python around a kernel
that often takes less, ~7 ms a token in all. Replayed, the step is one loop over (kernel, args).

    with recording() as calls:        # the fast ops `emit` their kernel calls into `calls`
        run the step
    for fn, args in calls: fn(*args)  # the next forward with the same shapes

Fast ops call kernels through `emit(fn, *args)` on paths that do nothing else to data (their
outputs live in buffers that stay put, see fused_ops.OutputBuffers). A path that also computes on
data itself (a numpy op, a conversion) says so with `work()`: such a step, like one that emits
nothing, is re-run as Python at each replay, with its outputs' addresses checked against the
recording. A program becomes ready only after two recordings of the same key agree call for
call, so an address that moves between forwards keeps it from ever replaying.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

_calls: list | None = None  # the current step's emitted calls, while recording
_record = None  # the current step's _StepRecord, while recording


@dataclass(frozen=True)
class Start:
    """An argument that is the start position of segment `index` of the forward (it moves by
    one every decode step): resolved from the replayed forward's segments."""

    index: int


def emit(fn: Callable, *args: Any) -> None:
    """Call kernel fn(*args); while recording, keep the call. A Start(i) argument stands for
    segment i's start position; `starts` gives the values for this call."""
    fn(*args)
    if _calls is not None:
        _calls.append((fn, args))


def emit_at(fn: Callable, args: tuple, starts: list[int]) -> None:
    """emit with Start markers in args, resolved against `starts` for this call."""
    fn(*[starts[a.index] if type(a) is Start else a for a in args])
    if _calls is not None:
        _calls.append((fn, args))


def work() -> None:
    """The current step computes on data outside its emitted kernel calls: re-run it as Python
    at each replay (a no-op when nothing is being recorded)."""
    if _record is not None:
        _record.work = True


NATIVE, DYNAMIC, PYTHON = 0, 1, 2  # a kernel call; one with Start markers; a step to re-run


@dataclass
class Program:
    """entries: (NATIVE | DYNAMIC, fn, args) or (PYTHON, step index, output addresses)."""

    entries: list = field(default_factory=list)
    feeds: tuple = ()  # the feed tensors' addresses at recording
    generation: int = -1  # fused_ops.buffers_generation() at recording
    runs: list = field(default_factory=list)  # compile(): _C.Tapes and the entries left as they are

    def same_as(self, other: Program) -> bool:
        return self.feeds == other.feeds and self.entries == other.entries

    def compile(self) -> None:
        """Runs of consecutive kernel calls into _C.Tapes, each replayed by one call into C++
        (a call from Python costs ~3 us, ~1 ms over a decode step's ~300); calls to anything
        else and PYTHON steps stay entries."""
        from xcompile import _C

        runs: list = []
        tape = None
        for entry in self.entries:
            kind, fn, args = entry
            name = getattr(fn, "__name__", "") if kind != PYTHON else ""
            if name and getattr(_C, name, None) is fn:
                if tape is None:
                    tape = _C.Tape()
                try:
                    tape.add(
                        name,
                        tuple(0 if type(a) is Start else a for a in args),
                        [(i, a.index) for i, a in enumerate(args) if type(a) is Start],
                    )
                except (ValueError, TypeError):  # not a taped kernel: called from Python
                    pass
                else:
                    if not runs or runs[-1] is not tape:
                        runs.append(tape)
                    continue
            tape = None
            runs.append(entry)
        self.runs = runs


@contextmanager
def recording_step():
    """Record one step: yields a record whose `.calls` are its emitted calls and `.work` says
    whether it computed anything itself (`work()`)."""
    global _calls, _record
    record = _StepRecord()
    _calls, _record = record.calls, record
    try:
        yield record
    finally:
        _calls = _record = None


class _StepRecord:
    def __init__(self):
        self.calls: list = []
        self.work = False


def address(value: Any) -> int | None:
    """The first byte of an ndarray's data, None for anything else."""
    if type(value) is np.ndarray:
        return value.__array_interface__["data"][0]
    return None


def addresses(values: Any) -> tuple:
    values = values if isinstance(values, tuple) else (values,)
    return tuple(address(v) for v in values)
