"""The torch references the execution plan runs on with --reference (use_kernels=False) and the
tests hold the numpy ops (runtime/ops.py, runtime/fallback_ops.py) and csrc kernels to.

OPS: ONNX standard ops. Each function takes the node's inputs (torch tensors, None for an omitted
optional input) and its attributes as keywords, and returns its output(s). Only the ops the
frontends and passes emit are here; a graph with another op is refused when the plan is built.
REFERENCE[(domain, op)]: the fused ops the passes emit (ONNX Runtime's com.microsoft vocabulary, and
ai.xcompile), fn(*inputs, **attributes) -> output(s); attention_reference: GroupQueryAttention's
arithmetic over gathered keys and values.

Only the reference plan (xrun --reference, Model.load(use_kernels=False)) and the tests import
this module, and it imports torch then: one line naming --reference if torch is not installed.
"""

from __future__ import annotations

import math

from xcompile.runtime.optional import require_torch

torch = require_torch("--reference")
F = torch.nn.functional

MS = "com.microsoft"
XC = "ai.xcompile"

# ONNX TensorProto.DataType -> torch dtype
DTYPES = {
    1: torch.float32,
    2: torch.uint8,
    3: torch.int8,
    5: torch.int16,
    6: torch.int32,
    7: torch.int64,
    9: torch.bool,
    10: torch.float16,
    11: torch.float64,
    16: torch.bfloat16,
}


def _axes(t: torch.Tensor | None) -> list[int]:
    return [] if t is None else [int(a) for a in t.tolist()]


def reshape(x, shape, allowzero=0):
    dims = [int(d) for d in shape.tolist()]
    if not allowzero:  # 0 means "copy this dimension of the input"
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(dims)


def unsqueeze(x, axes):
    axes = _axes(axes)
    rank = x.dim() + len(axes)
    for a in sorted(a % rank for a in axes):
        x = x.unsqueeze(a)
    return x


def squeeze(x, axes=None):
    if axes is None:
        return x.squeeze()
    for a in sorted((a % x.dim() for a in _axes(axes)), reverse=True):
        x = x.squeeze(a)
    return x


def slice_(x, starts, ends, axes=None, steps=None):
    starts, ends = _axes(starts), _axes(ends)
    axes = _axes(axes) if axes is not None else list(range(len(starts)))
    steps = _axes(steps) if steps is not None else [1] * len(starts)
    index = [slice(None)] * x.dim()
    for s, e, a, st in zip(starts, ends, axes, steps):
        if st != 1:
            raise NotImplementedError("Slice with step != 1")
        n = x.shape[a]
        s = max(0, min(n, s + n if s < 0 else s))
        e = max(0, min(n, e + n if e < 0 else e))
        index[a] = slice(s, e)
    return x[tuple(index)]


def shape(x, start=0, end=None):
    dims = list(x.shape)[start:end]
    return torch.tensor(dims, dtype=torch.int64)


def reduce_mean(x, axes_input=None, keepdims=1, axes=None, noop_with_empty_axes=0):
    """opset 18 takes the axes as an input; older opsets as an attribute"""
    dims = _axes(axes_input) if axes_input is not None else list(axes or range(x.dim()))
    return x.mean(dim=dims, keepdim=bool(keepdims))


def reduce_max(x, axes_input=None, keepdims=1, noop_with_empty_axes=0):
    """opset 18; no axes: over every dimension (longrope's longest position)"""
    dims = _axes(axes_input) if axes_input is not None else list(range(x.dim()))
    return x.amax(dim=dims, keepdim=bool(keepdims))


def layer_norm(x, scale, bias=None, axis=-1, epsilon=1e-5):
    dims = x.shape[axis % x.dim() :]
    return F.layer_norm(x, dims, scale, bias, epsilon)


def gather(x, indices, axis=0):
    axis %= x.dim()
    out = torch.index_select(x, axis, indices.reshape(-1))
    return out.reshape((*x.shape[:axis], *indices.shape, *x.shape[axis + 1 :]))  # () for 0-d


def expand(x, shape):
    return x.expand(torch.broadcast_shapes(x.shape, tuple(int(d) for d in shape.tolist())))


def range_(start, limit, delta):
    return torch.arange(int(start), int(limit), int(delta), dtype=start.dtype)


OPS = {
    "Identity": lambda x: x,
    "Gather": gather,
    "Cast": lambda x, to: x.to(DTYPES[to]),
    "Transpose": lambda x, perm=None: (
        x.permute(*perm) if perm is not None else x.permute(*reversed(range(x.dim())))
    ),
    "MatMul": torch.matmul,
    "Add": torch.add,
    "Sub": torch.sub,
    "Mul": torch.mul,
    "Div": torch.div,
    "Neg": torch.neg,
    "Sqrt": torch.sqrt,
    "Reciprocal": torch.reciprocal,
    "Pow": torch.pow,
    "Sigmoid": torch.sigmoid,
    "Tanh": torch.tanh,
    "Erf": torch.erf,
    "Relu": torch.relu,
    "Cos": torch.cos,
    "Sin": torch.sin,
    "Softmax": lambda x, axis=-1: torch.softmax(x, dim=axis),
    "ReduceMean": reduce_mean,
    "ReduceMax": reduce_max,
    "LayerNormalization": layer_norm,
    "Reshape": reshape,
    "Unsqueeze": unsqueeze,
    "Squeeze": squeeze,
    "Slice": slice_,
    "Concat": lambda *xs, axis: torch.cat(xs, dim=axis),
    "Shape": shape,
    "Range": range_,
    "LessOrEqual": torch.le,
    "Greater": torch.gt,
    "GreaterOrEqual": torch.ge,
    "Less": torch.lt,
    "Equal": torch.eq,
    "Not": torch.logical_not,
    "And": torch.logical_and,
    "Where": torch.where,
    "Expand": expand,
}


# -- fused ops' references ---------------------------------------------------------------------


def rmsnorm_ref(x, scale, axis=-1, epsilon=1e-5, stash_type=1):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + epsilon) * scale


def skip_rmsnorm_ref(x, skip, gamma, bias=None, epsilon=1e-5):
    total = x + skip if bias is None else x + skip + bias
    return rmsnorm_ref(total, gamma, epsilon=epsilon), None, None, total


def skip_layernorm_ref(x, skip, gamma, beta=None, bias=None, epsilon=1e-5):
    total = x + skip if bias is None else x + skip + bias
    return F.layer_norm(total, total.shape[-1:], gamma, beta, epsilon), None, None, total


def rotate(x, cos, sin, interleaved: bool):
    """x (..., r) with cos, sin (..., r/2)"""
    if interleaved:
        even, odd = x[..., 0::2], x[..., 1::2]
        return torch.stack((even * cos - odd * sin, odd * cos + even * sin), -1).flatten(-2)
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    return torch.cat((a * cos - b * sin, b * cos + a * sin), -1)


def rotary_ref(
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
    """x (B, S, heads*d) or (B, heads, S, d); position_ids (B, S)"""
    four_d = x.dim() == 4
    b, s = x.shape[0], x.shape[2] if four_d else x.shape[1]
    heads = x.shape[1] if four_d else num_heads
    y = x.transpose(1, 2) if four_d else x.reshape(b, s, heads, -1)  # (B,S,heads,d)
    r = rotary_embedding_dim or 2 * cos_cache.shape[-1]
    cos = cos_cache[position_ids][:, :, None, : r // 2]  # (B,S,1,r/2)
    sin = sin_cache[position_ids][:, :, None, : r // 2]
    out = torch.cat((rotate(y[..., :r], cos, sin, bool(interleaved)), y[..., r:]), -1)
    return out.transpose(1, 2) if four_d else out.reshape(x.shape)


def gelu_tanh_ref(x, bias=None):
    x = x if bias is None else x + bias
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x * x * x)))


def gelu_ref(x, bias=None):
    x = x if bias is None else x + bias
    return F.gelu(x)


def silu_mul_ref(g, up):
    return g * torch.sigmoid(g) * up


def gelu_mul_ref(g, up):
    return gelu_tanh_ref(g) * up


def split(x, sizes=None, axis=0, num_outputs=None):
    if sizes is None:
        return torch.tensor_split(x, num_outputs, dim=axis)
    return torch.split(x, [int(s) for s in sizes.tolist()], dim=axis)


def matmul_nbits_ref(
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
    """x (..., K) @ W(N, K)ᵀ with W in MatMulNBits' layout (see passes/quantize_nbits.py; zero
    points packed uint8, float32 (N, k_blocks) or none)."""
    from xcompile.runtime.kernels import dequantize_nbits_reference

    scales = scales.reshape(N, -1)
    if zero_points is not None and zero_points.is_floating_point():
        zero_points = zero_points.reshape(N, -1)
    w = dequantize_nbits_reference(
        blocks.reshape(N, scales.shape[1], -1), scales, zero_points, bits, block_size, K
    )
    y = x @ w.T
    return y if bias is None else y + bias


def gather_nbits_ref(blocks, indices, scales, zero_points=None, *, K, bits, block_size):
    """ai.xcompile GatherNBits: rows `indices` of W (N, K) held as MatMulNBits' B (N, k_blocks,
    blob), scales and zero points (see passes/quantized_embedding.py) -> (*indices.shape, K)
    fp32; zero rows for indices outside [-N, N)."""
    from xcompile.runtime.kernels import gather_nbits_reference

    return gather_nbits_reference(blocks, scales, zero_points, indices, bits, block_size, K)


def gather_block_quantized_ref(
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
    """com.microsoft GatherBlockQuantized on uint8 data as passes/quantized_embedding.py emits
    it: data (N, k_blocks * blob), rows gathered (axis 0), blocks along axis 1 -> (*indices.shape,
    k_blocks * block_size) fp32 (the padded row, as ONNX Runtime gives it)."""
    k = _gather_block_quantized_k(data, gather_axis, quantize_axis, bits)
    return gather_nbits_ref(
        data, indices, scales, zero_points, K=k, bits=bits, block_size=block_size
    )


def _gather_block_quantized_k(data, gather_axis: int, quantize_axis: int, bits: int) -> int:
    """The (padded) row length of GatherBlockQuantized's uint8 data (N, k_blocks * blob)."""
    if data.dim() != 2 or gather_axis not in (0, -2) or quantize_axis not in (1, -1):
        raise NotImplementedError(
            "GatherBlockQuantized runs here on 2-D uint8 data gathered along axis 0 only"
        )
    return data.shape[1] * 8 // bits


REFERENCE = {
    ("", "SimplifiedLayerNormalization"): rmsnorm_ref,
    (MS, "SimplifiedLayerNormalization"): rmsnorm_ref,
    (MS, "SkipSimplifiedLayerNormalization"): skip_rmsnorm_ref,
    (MS, "SkipLayerNormalization"): skip_layernorm_ref,
    (MS, "RotaryEmbedding"): rotary_ref,
    (MS, "FastGelu"): gelu_tanh_ref,
    (MS, "Gelu"): gelu_ref,
    (XC, "SiluMul"): silu_mul_ref,
    (XC, "GeluMul"): gelu_mul_ref,
    ("", "Split"): split,
    (MS, "MatMulNBits"): matmul_nbits_ref,
    (MS, "GatherBlockQuantized"): gather_block_quantized_ref,
    (XC, "GatherNBits"): gather_nbits_ref,
}


def attention_reference(
    q3, keys, values, past: int, heads: int, scale: float, window: int, softcap: float = 0.0
):
    """q3 (B,S,heads*d); keys/values (B,kv,T,d) -> (B,S,heads*d); softcap: scores ->
    softcap * tanh(scores / softcap) before the mask (0: none)"""
    b, s, _ = q3.shape
    kv, t, d = keys.shape[1], keys.shape[2], keys.shape[3]
    q = q3.view(b, s, heads, d).transpose(1, 2)
    k = keys.repeat_interleave(heads // kv, dim=1)
    v = values.repeat_interleave(heads // kv, dim=1)
    qpos = torch.arange(past, past + s)[:, None]
    kpos = torch.arange(t)[None, :]
    allowed = kpos <= qpos
    if window:
        allowed &= kpos > qpos - window
    scores = (q @ k.transpose(-1, -2)) * scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    out = torch.softmax(scores, dim=-1) @ v
    return out.transpose(1, 2).reshape(b, s, heads * d)
