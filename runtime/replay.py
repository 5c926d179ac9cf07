"""Replaying a decode step: the kernel calls of one forward, recorded once, then called again
without the plan's Python around them (CUDA graphs' idea, for the interpreter's overhead on CPU).

A decode step of the 1.1B model is ~270 steps; each costs 10-50 us of Python around a kernel
that often takes less, ~7 ms a token in all. Replayed, the step is one loop over (kernel, args).

    with recording() as calls:        # the fast ops `emit` their kernel calls into `calls`
        run the step
    for fn, args in calls: fn(*args)  # the next forward with the same shapes

Fast ops call kernels through `emit(fn, *args)` on paths that do nothing else to data (their
outputs live in buffers that stay put, see fused_ops.OutputBuffers); a path that also runs a
torch op calls its kernels directly. While recording, a TorchFunctionMode notes every torch
function a step calls beyond reading metadata and making views: such a step (or one that emits
nothing) is re-run as Python at each replay, with its outputs' addresses checked against the
recording. A program becomes ready only after two recordings of the same key agree call for
call, so an address that moves between forwards keeps it from ever replaying.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_calls: list | None = None  # the current step's emitted calls, while recording


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


# Tensor functions that read metadata or make a view: what a pure step may call besides emit.
_HARMLESS = {
    "data_ptr",
    "stride",
    "is_contiguous",
    "numel",
    "dim",
    "size",
    "view",
    "split",
    "split_with_sizes",
    "narrow",
    "__get__",  # attribute reads: .shape, .dtype, ...
}


class _TorchWork(TorchFunctionMode):
    """Notes whether any torch function that may do work on data ran."""

    def __init__(self):
        super().__init__()
        self.work = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name not in _HARMLESS:
            self.work = True
        return func(*args, **(kwargs or {}))


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
    whether it did torch work of its own."""
    global _calls
    mode = _TorchWork()
    record = _StepRecord()
    _calls = record.calls
    try:
        with mode:
            yield record
    finally:
        _calls = None
        record.work = mode.work


class _StepRecord:
    def __init__(self):
        self.calls: list = []
        self.work = False


def addresses(values: Any) -> tuple:
    values = values if isinstance(values, tuple) else (values,)
    return tuple(v.data_ptr() if isinstance(v, torch.Tensor) else None for v in values)
