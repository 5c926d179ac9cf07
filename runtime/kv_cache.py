"""The KV cache: one preallocated block per layer, sized once for the whole generation.

    keys[i], values[i]: (batch, kv_heads, capacity, head_dim) float32

The plan's KV-append steps write new rows behind the `past` views this hands out; nothing is
reallocated or concatenated while generating.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, layers: int, kv_heads: int, head_dim: int, capacity: int, batch: int = 1):
        shape = (batch, kv_heads, capacity, head_dim)
        self.capacity = capacity
        self.buffers = {}
        for i in range(layers):
            for kind in ("key", "value"):
                self.buffers[f"past_key_values.{i}.{kind}"] = torch.zeros(shape)

    def past(self, length: int) -> dict[str, torch.Tensor]:
        """Views of the first `length` positions, fed to the graph as past_key_values.*."""
        return {name: buf[:, :, :length] for name, buf in self.buffers.items()}

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers.values())
