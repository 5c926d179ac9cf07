"""The fused ops the passes emit, on numpy: what the plan runs where a fast path (fused_ops) does
not take a node's shapes or dtypes. Held to runtime/reference_ops.py's REFERENCE, key for key.

    FALLBACK[(domain, op)]: fn(*inputs, **attributes) -> output(s), ndarrays in and out
Shapes: x (B, S, hidden). MatMulNBits and the quantized gathers run on the csrc kernels
(_C.dequantize_nbits, _C.gather_nbits), whose layouts are in runtime/kernels.py's linear_nbits.
"""

from __future__ import annotations

import math

import numpy as np

from xcompile.runtime.ops import bf16_arithmetic, erf, layer_norm, sigmoid

MS = "com.microsoft"
XC = "ai.xcompile"


def rmsnorm(x, scale, axis=-1, epsilon=1e-5, stash_type=1):
    """x (..., n) * rsqrt(mean(x², -1) + epsilon) * scale (n)"""
    return x * (1 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + float(epsilon))) * scale


def skip_rmsnorm(x, skip, gamma, bias=None, epsilon=1e-5):
    """-> (rmsnorm(x + skip [+ bias]), None, None, the sum)"""
    total = x + skip if bias is None else x + skip + bias
    return rmsnorm(total, gamma, epsilon=epsilon), None, None, total


def skip_layernorm(x, skip, gamma, beta=None, bias=None, epsilon=1e-5):
    """-> (layer_norm(x + skip [+ bias]) over the last axis, None, None, the sum)"""
    total = x + skip if bias is None else x + skip + bias
    return layer_norm(total, gamma, beta, axis=-1, epsilon=epsilon), None, None, total


def rotate(x, cos, sin, interleaved: bool):
    """x (..., r) with cos, sin (..., r/2): pairs (x[2i], x[2i+1]) interleaved, else
    (x[i], x[i + r/2]), turned by the angle whose cos and sin are given"""
    if interleaved:
        even, odd = x[..., 0::2], x[..., 1::2]
        pairs = np.stack((even * cos - odd * sin, odd * cos + even * sin), -1)
        return pairs.reshape(*pairs.shape[:-2], -1)
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    return np.concatenate((a * cos - b * sin, b * cos + a * sin), -1)


def rotary(
    x,
    position_ids,
    cos_cache,
    sin_cache,
    interleaved=0,
    num_heads=0,
    rotary_embedding_dim=0,
    scale=1.0,
    is_packed_batching=0,
):
    """x (B, S, heads*d) or (B, heads, S, d); position_ids (B, S); caches (max_position, r/2)"""
    four_d = x.ndim == 4
    b, s = x.shape[0], x.shape[2] if four_d else x.shape[1]
    heads = x.shape[1] if four_d else num_heads
    y = x.transpose(0, 2, 1, 3) if four_d else x.reshape(b, s, heads, -1)  # (B,S,heads,d)
    r = rotary_embedding_dim or 2 * cos_cache.shape[-1]
    cos = cos_cache[position_ids][:, :, None, : r // 2]  # (B,S,1,r/2)
    sin = sin_cache[position_ids][:, :, None, : r // 2]
    out = np.concatenate((rotate(y[..., :r], cos, sin, bool(interleaved)), y[..., r:]), -1)
    return out.transpose(0, 2, 1, 3) if four_d else out.reshape(x.shape)


def gelu_tanh(x, bias=None):
    x = x if bias is None else x + bias
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x * x * x)))


def gelu(x, bias=None):
    """exact: 0.5 x (1 + erf(x / sqrt(2)))"""
    x = x if bias is None else x + bias
    return 0.5 * x * (1 + erf(x * (1 / math.sqrt(2))))


def silu_mul(g, up):
    return g * sigmoid(g) * up


def gelu_mul(g, up):
    return gelu_tanh(g) * up


def split(x, sizes=None, axis=0, num_outputs=None):
    """views of x; num_outputs: sizes as torch.tensor_split's (the first ones one longer)"""
    if sizes is None:
        return tuple(np.array_split(x, num_outputs, axis=axis))
    bounds = np.cumsum([int(s) for s in np.asarray(sizes).reshape(-1)])[:-1]
    return tuple(np.split(x, bounds, axis=axis))


def nbits_floats(scales: np.ndarray, zero_points: np.ndarray | None) -> tuple:
    """(scales, zero_points, float_zero_points, fp16) as the nbits kernels read them, contiguous:
    fp16 scales and float zero points as stored where both are fp16 (or the zero points are
    packed uint8, or none), else both as fp32 (a graph mixing the two: widened here). The caller
    keeps the returned arrays alive while their pointers are in use."""
    float_zp = zero_points is not None and zero_points.dtype != np.uint8
    fp16 = scales.dtype == np.float16 and (not float_zp or zero_points.dtype == np.float16)
    floats = np.float16 if fp16 else np.float32
    scales = np.ascontiguousarray(scales, dtype=floats)
    if zero_points is not None:
        zero_points = np.ascontiguousarray(zero_points, dtype=floats if float_zp else np.uint8)
    return scales, zero_points, float_zp, fp16


def dequantize(blocks, scales, zero_points, n: int, k: int, bits: int, block_size: int):
    """W (N, K) fp32 from MatMulNBits' B (N, k_blocks, blob) uint8, scales (N, k_blocks) fp32 or
    fp16 and zero points (packed uint8, floats (N, k_blocks) or None), on _C.dequantize_nbits"""
    from xcompile import _C

    blocks = np.ascontiguousarray(blocks, dtype=np.uint8)
    scales, zp, zp_float, fp16 = nbits_floats(scales, zero_points)
    w = np.empty((n, k), dtype=np.float32)
    _C.dequantize_nbits(
        blocks.ctypes.data,
        scales.ctypes.data,
        0 if zp is None else zp.ctypes.data,
        zp_float,
        w.ctypes.data,
        n,
        k,
        bits,
        block_size,
        fp16,
    )
    return w


def matmul_nbits(
    x,
    blocks,
    scales,
    zero_points=None,
    g_idx=None,
    bias=None,
    *,
    K,
    N,
    bits,
    block_size,
    accuracy_level=0,
):
    """x (..., K) @ W(N, K)ᵀ (+ bias) -> (..., N), W dequantized whole (as the reference; g_idx
    unused there too)"""
    w = dequantize(blocks, scales, zero_points, N, K, bits, block_size)
    y = np.matmul(x, w.T)
    return y if bias is None else y + bias


def gather_nbits(blocks, indices, scales, zero_points=None, *, K, bits, block_size):
    """ai.xcompile GatherNBits: rows `indices` of W (N, K) held as MatMulNBits' B, scales and zero
    points -> (*indices.shape, K) fp32; zero rows for indices outside [-N, N)."""
    from xcompile import _C

    n = scales.shape[0]
    blocks = np.ascontiguousarray(blocks, dtype=np.uint8)
    scales, zp, zp_float, fp16 = nbits_floats(scales, zero_points)
    indices = np.ascontiguousarray(indices, dtype=np.int64)
    out = np.empty((*indices.shape, K), dtype=np.float32)
    _C.gather_nbits(
        blocks.ctypes.data,
        scales.ctypes.data,
        0 if zp is None else zp.ctypes.data,
        zp_float,
        indices.ctypes.data,
        out.ctypes.data,
        indices.size,
        n,
        K,
        bits,
        block_size,
        fp16,
    )
    return out


def gather_block_quantized(
    data,
    indices,
    scales,
    zero_points=None,
    *,
    gather_axis=0,
    quantize_axis=1,
    block_size=128,
    bits=4,
):
    """com.microsoft GatherBlockQuantized on uint8 data (N, k_blocks * blob), rows gathered
    (axis 0), blocks along axis 1 -> (*indices.shape, k_blocks * block_size) fp32."""
    k = gather_block_quantized_k(data, gather_axis, quantize_axis, bits)
    return gather_nbits(data, indices, scales, zero_points, K=k, bits=bits, block_size=block_size)


def gather_block_quantized_k(data, gather_axis: int, quantize_axis: int, bits: int) -> int:
    """The (padded) row length of GatherBlockQuantized's uint8 data (N, k_blocks * blob)."""
    if data.ndim != 2 or gather_axis not in (0, -2) or quantize_axis not in (1, -1):
        raise NotImplementedError(
            "GatherBlockQuantized runs here on 2-D uint8 data gathered along axis 0 only"
        )
    return data.shape[1] * 8 // bits


def attention_reference(
    q3, keys, values, past: int, heads: int, scale: float, window: int, softcap: float = 0.0
):
    """q3 (B,S,heads*d); keys/values (B,kv,T,d) -> (B,S,heads*d): query i (at position past + i)
    attends to keys 0 .. past + i (the last `window` of them when window > 0); softcap: scores ->
    softcap * tanh(scores / softcap) before the mask (0: none)"""
    b, s, _ = q3.shape
    scale, softcap = float(scale), float(softcap)  # Python floats: fp32 stays fp32 (NEP 50)
    kv, t, d = keys.shape[1], keys.shape[2], keys.shape[3]
    q = q3.reshape(b, s, heads, d).transpose(0, 2, 1, 3)  # (B,heads,S,d)
    k = np.repeat(keys, heads // kv, axis=1)  # (B,heads,T,d): query head h reads kv head h // group
    v = np.repeat(values, heads // kv, axis=1)
    qpos = np.arange(past, past + s)[:, None]
    kpos = np.arange(t)[None, :]
    allowed = kpos <= qpos  # (S,T)
    if window:
        allowed &= kpos > qpos - window
    scores = (q @ k.swapaxes(-1, -2)) * scale  # (B,heads,S,T)
    if softcap:
        scores = softcap * np.tanh(scores / softcap)
    scores = np.where(allowed, scores, np.finfo(scores.dtype).min)
    scores = np.exp(scores - scores.max(-1, keepdims=True))
    out = (scores / scores.sum(-1, keepdims=True)) @ v
    return out.transpose(0, 2, 1, 3).reshape(b, s, heads * d)


FALLBACK = {
    ("", "SimplifiedLayerNormalization"): rmsnorm,
    (MS, "SimplifiedLayerNormalization"): rmsnorm,
    (MS, "SkipSimplifiedLayerNormalization"): skip_rmsnorm,
    (MS, "SkipLayerNormalization"): skip_layernorm,
    (MS, "RotaryEmbedding"): rotary,
    (MS, "FastGelu"): gelu_tanh,
    (MS, "Gelu"): gelu,
    (XC, "SiluMul"): silu_mul,
    (XC, "GeluMul"): gelu_mul,
    ("", "Split"): split,
    (MS, "MatMulNBits"): matmul_nbits,
    (MS, "GatherBlockQuantized"): gather_block_quantized,
    (XC, "GatherNBits"): gather_nbits,
}
# BF16 storage inputs (arrays.py) computed on through ml_dtypes
FALLBACK = {key: bf16_arithmetic(op) for key, op in FALLBACK.items()}
