"""Rank 0 drives, the other ranks follow: every Model call rank 0 makes is announced to the
followers first (a few ints over the communicator), so they run the same forward passes and
meet it in the same collectives.

    rank 0:     model = Leader(Model.load(root, rank=0, comm=comm), comm); generate(model, ...)
    rank 1..:   follow(Model.load(root, rank=r, comm=comm), comm)
"""

from __future__ import annotations

from xcompile.runtime.comm import Communicator
from xcompile.runtime.kv_cache import KVCache
from xcompile.runtime.model import Model

STOP, NEW_CACHE, FORWARD = 0, 1, 2
HEADER = 4  # command, a, b, c


class Leader:
    """A Model whose new_cache/forward run on every rank (same interface as Model)."""

    def __init__(self, model: Model, comm: Communicator):
        self.model, self.comm = model, comm

    def __getattr__(self, name):
        return getattr(self.model, name)

    def new_cache(self, capacity: int) -> KVCache:
        self.comm.broadcast_ints([NEW_CACHE, capacity, 0, 0], HEADER)
        return self.model.new_cache(capacity)

    def forward(self, ids: list[int], start: int, cache: KVCache):
        self.comm.broadcast_ints([FORWARD, start, len(ids), 0], HEADER)
        self.comm.broadcast_ints(ids, len(ids))
        return self.model.forward(ids, start, cache)

    def stop(self) -> None:
        self.comm.broadcast_ints([STOP, 0, 0, 0], HEADER)


def follow(model: Model, comm: Communicator) -> None:
    """Run what rank 0 announces until it says stop."""
    cache = None
    while True:
        command, a, b, _ = comm.broadcast_ints(None, HEADER)
        if command == STOP:
            return
        if command == NEW_CACHE:
            cache = model.new_cache(a)
        elif command == FORWARD:
            ids = comm.broadcast_ints(None, b)
            model.forward(ids, a, cache)
