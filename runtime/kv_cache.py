"""The KV cache: one preallocated block per layer, sized once, with a slot per sequence.

    keys[i], values[i]: (slots, kv_heads, capacity, head_dim) float32 or bfloat16
    rows: (slots, capacity) int32, sequence s reads position t from slot rows[s, t]

The cache's dtype (`xrun --kv-cache`, `cache_dtype`): bfloat16 for BF16/INT8/INT4 artifacts (half
the bytes a long-context decode step reads; new K/V rounded to nearest even as written, widened
to fp32 as attention reads them), float32 for FP32 ones, whose parity with transformers holds.

A slot is one sequence: a request of the server's running batch, or a beam. `rows` is the indirect
access of beam search: beams that share a prefix point at the slot that holds it, and reordering
beams after a step rewrites rows only (fork / reorder), never K or V. Until then rows[s] = s.
The plan's attention steps write new K/V at their sequence's own slot and read through `rows`;
nothing is reallocated, concatenated or copied while generating.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from xcompile.errors import UserError
from xcompile.runtime.arrays import BF16, F32, aligned


def check_room(total: int, capacity: int) -> None:
    """One refusal for every path that writes K/V: `total` positions in a cache of `capacity`."""
    if total > capacity:
        raise UserError(
            f"context full: {total} tokens do not fit the KV cache of {capacity}; "
            "ask for fewer tokens"
        )


KV_CACHE_CHOICES = ("auto", "float32", "bfloat16")


def cache_dtype(choice: str, artifacts_dtype: str) -> np.dtype:
    """--kv-cache `choice` for artifacts of manifest dtype fp32 | bf16 | int8 | int4: auto keeps
    FP32 artifacts' cache FP32 and gives the others a BF16 one."""
    if choice not in KV_CACHE_CHOICES:
        raise UserError(f"--kv-cache {choice!r}: choose {', '.join(KV_CACHE_CHOICES)}")
    if choice == "auto":
        choice = "float32" if artifacts_dtype == "fp32" else "bfloat16"
    return F32 if choice == "float32" else BF16


@dataclass(frozen=True)
class Segment:
    """`length` new tokens of the sequence in `slot`, at positions start .. start + length - 1:
    one piece of a batched forward (its rows of input_ids, in order)."""

    slot: int
    start: int
    length: int


class KVCache:
    def __init__(
        self,
        layers: int,
        kv_heads: int,
        head_dim: int,
        capacity: int,
        slots: int = 1,
        dtype: np.dtype = F32,
    ):
        shape = (slots, kv_heads, capacity, head_dim)
        self.capacity, self.slots, self.dtype = capacity, slots, np.dtype(dtype)
        self.buffers = {}
        for i in range(layers):
            for kind in ("key", "value"):
                self.buffers[f"past_key_values.{i}.{kind}"] = aligned(shape, self.dtype, zero=True)
        self.rows = np.repeat(np.arange(slots, dtype=np.int32)[:, None], capacity, axis=1)
        self.segments: list[Segment] | None = None  # set by Model.forward_batch while it runs

    def past(self, length: int) -> dict[str, np.ndarray]:
        """Views of the first `length` positions, fed to the graph as past_key_values.*."""
        return {name: buf[:, :, :length] for name, buf in self.buffers.items()}

    def claim(self, segments: list[Segment]) -> None:
        """Before a forward: each segment's new positions will be written in its own slot."""
        for seg in segments:
            if not 0 <= seg.slot < self.slots:
                raise ValueError(f"slot {seg.slot} outside 0..{self.slots - 1}")
            check_room(seg.start + seg.length, self.capacity)
            self.rows[seg.slot, seg.start : seg.start + seg.length] = seg.slot

    def fork(self, source: int, targets: list[int], length: int) -> None:
        """Sequences `targets` continue `source`'s first `length` positions (shared, not copied)."""
        self.rows[targets, :length] = self.rows[source, :length]

    def reorder(self, parents: list[int], length: int) -> None:
        """Beam search after a step: slot s now continues the sequence that was in parents[s]
        (the first `length` positions). Indices only: K and V stay where they are."""
        self.rows[: len(parents), :length] = self.rows[parents, :length]  # a gather: a copy

    def release(self, slot: int) -> None:
        """The slot's sequence is done: its rows point back at itself."""
        self.rows[slot] = slot

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buffers.values())
