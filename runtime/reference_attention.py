"""GroupQueryAttention over the KV cache on torch ops alone: what `xrun --reference` runs in place
of fused_ops.attention_step (same contract; torch imported by the caller that asks for it)."""

from __future__ import annotations

from xcompile.runtime.arrays import to_torch
from xcompile.runtime.gqa_call import GqaCall
from xcompile.runtime.kernels import gather_slots
from xcompile.runtime.optional import require_torch
from xcompile.runtime.reference_ops import attention_reference

torch = require_torch("--reference")  # only the reference plan imports this module


def attention_step(k_cache, v_cache, kv=None):
    """k_cache, v_cache (slots, kv, capacity, d) numpy or torch (viewed as torch, no copy): the new
    K/V written with torch's copy_ (rounding to the cache's dtype), then attention_reference over
    the positions each query sees, read through kv.rows when there is a KVCache."""
    k_cache, v_cache = to_torch(k_cache), to_torch(v_cache)

    def run(*inputs, **attrs):
        call = GqaCall.read(inputs, attrs, kv, k_cache.shape[2], k_cache.shape[-1])
        q3, k3, v3, num_heads, d = call.q3, call.k3, call.v3, call.heads, call.d
        kv_num_heads, segments = call.kv_heads, call.segments
        q = q3.reshape(-1, num_heads, d)
        k = k3.reshape(-1, kv_num_heads, d).transpose(0, 1)  # (kv, T, d)
        v = v3.reshape(-1, kv_num_heads, d).transpose(0, 1)
        rows = None if kv is None else torch.from_numpy(kv.rows)
        outs, row = [], 0
        for seg in segments:
            p, s = seg.start, seg.length
            k_cache[seg.slot, :, p : p + s].copy_(k[:, row : row + s])
            v_cache[seg.slot, :, p : p + s].copy_(v[:, row : row + s])
            keys, values = k_cache[0, :, : p + s], v_cache[0, :, : p + s]
            if rows is not None:
                keys = gather_slots(k_cache, rows[seg.slot], p + s)
                values = gather_slots(v_cache, rows[seg.slot], p + s)
            out = attention_reference(
                q[row : row + s].reshape(1, s, -1),
                keys[None].float(),
                values[None].float(),
                p,
                num_heads,
                call.scale,
                call.window,
                call.softcap,
            )
            outs.append(out.reshape(s, -1))
            row += s
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        return out.view(1, row, -1), k_cache, v_cache

    return run
