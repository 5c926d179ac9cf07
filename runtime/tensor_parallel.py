"""Rank 0 drives, the other ranks follow: every Model call rank 0 makes is announced to the
followers first (a few ints over the communicator), so they run the same forward passes, keep
the same cache indices and meet it in the same collectives.

    rank 0:     model = Leader(Model.load(root, rank=0, comm=comm), comm); generate(model, ...)
    rank 1..:   follow(Model.load(root, rank=r, comm=comm), comm)
"""

from __future__ import annotations

from xcompile.runtime.comm import Communicator
from xcompile.runtime.kv_cache import KVCache, Segment
from xcompile.runtime.model import Model

STOP, NEW_CACHE, FORWARD, FORWARD_BATCH, FORK, REORDER = range(6)
HEADER = 4  # command, a, b, c


class Leader:
    """A Model whose cache and forward calls run on every rank (same interface as Model)."""

    def __init__(self, model: Model, comm: Communicator):
        self.model, self.comm = model, comm

    def __getattr__(self, name):
        return getattr(self.model, name)

    def new_cache(self, capacity: int, slots: int = 1) -> KVCache:
        self.comm.broadcast_ints([NEW_CACHE, capacity, slots, 0], HEADER)
        return self.model.new_cache(capacity, slots)

    def forward(self, ids: list[int], start: int, cache: KVCache, last_only: bool = False):
        self.comm.broadcast_ints([FORWARD, start, len(ids), int(last_only)], HEADER)
        self.comm.broadcast_ints(ids, len(ids))
        return self.model.forward(ids, start, cache, last_only)

    def forward_batch(
        self,
        segments: list[Segment],
        ids: list[int],
        cache: KVCache,
        rows: list[int] | None = None,
    ):
        picked = [] if rows is None else rows
        header = [FORWARD_BATCH, len(segments), len(ids), -1 if rows is None else len(picked)]
        self.comm.broadcast_ints(header, HEADER)
        layout = [v for seg in segments for v in (seg.slot, seg.start, seg.length)]
        self.comm.broadcast_ints(layout + ids + picked, len(layout) + len(ids) + len(picked))
        return self.model.forward_batch(segments, ids, cache, rows)

    def fork(self, cache: KVCache, source: int, targets: list[int], length: int) -> None:
        self.comm.broadcast_ints([FORK, source, len(targets), length], HEADER)
        self.comm.broadcast_ints(targets, len(targets))
        self.model.fork(cache, source, targets, length)

    def reorder(self, cache: KVCache, parents: list[int], length: int) -> None:
        self.comm.broadcast_ints([REORDER, len(parents), length, 0], HEADER)
        self.comm.broadcast_ints(parents, len(parents))
        self.model.reorder(cache, parents, length)

    def stop(self) -> None:
        self.comm.broadcast_ints([STOP, 0, 0, 0], HEADER)


def follow(model: Model, comm: Communicator) -> None:
    """Run what rank 0 announces until it says stop."""
    cache = None
    while True:
        command, a, b, c = comm.broadcast_ints(None, HEADER)
        if command == STOP:
            return
        if command == NEW_CACHE:
            cache = model.new_cache(a, b)
        elif command == FORWARD:
            ids = comm.broadcast_ints(None, b)
            model.forward(ids, a, cache, bool(c))
        elif command == FORWARD_BATCH:
            values = comm.broadcast_ints(None, 3 * a + b + max(c, 0))
            segments = [Segment(*values[3 * i : 3 * i + 3]) for i in range(a)]
            rows = None if c < 0 else values[3 * a + b :]
            model.forward_batch(segments, values[3 * a : 3 * a + b], cache, rows)
        elif command == FORK:
            model.fork(cache, a, comm.broadcast_ints(None, b), c)
        elif command == REORDER:
            model.reorder(cache, comm.broadcast_ints(None, a), b)
