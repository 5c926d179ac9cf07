"""One GroupQueryAttention call as the plan makes it, read once for both of its runners (the
kernels' fused_ops.attention_step and the torch reference's reference_attention.attention_step).

    call = GqaCall.read(inputs, attributes, kv, capacity, head_dim)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from xcompile.runtime.kv_cache import Segment, check_room


@dataclass
class GqaCall:
    q3: Any  # (1, T, heads * d): the T new tokens of `segments`, one after the other
    k3: Any  # (1, T, kv_heads * d)
    v3: Any
    segments: list[Segment]
    heads: int
    kv_heads: int
    d: int
    scale: float
    window: int  # 0: none (Mistral's sliding_window otherwise)
    softcap: float  # 0: none; else each scaled score s -> softcap * tanh(s / softcap)

    @classmethod
    def read(cls, inputs: tuple, attrs: dict, kv, capacity: int, head_dim: int) -> GqaCall:
        """inputs: (q3, k3, v3, past_k, past_v, ...) as the plan passes them; attrs: the node's
        (num_heads, kv_num_heads, scale, local_window_size, softcap). Without a KVCache's
        segments (the single-sequence path), past_k (1, kv, P, d) says where the new tokens go."""
        q3, k3, v3, past_k = inputs[:4]
        segments = kv.segments if kv is not None else None
        if segments is None:
            segments = [Segment(0, past_k.shape[2], q3.shape[1])]
            check_room(segments[0].start + segments[0].length, capacity)
        window = attrs.get("local_window_size", -1)
        return cls(
            q3,
            k3,
            v3,
            segments,
            attrs["num_heads"],
            attrs["kv_num_heads"],
            head_dim,
            attrs.get("scale") or head_dim**-0.5,
            window if window and window > 0 else 0,
            float(attrs.get("softcap") or 0.0),
        )
