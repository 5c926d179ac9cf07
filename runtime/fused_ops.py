"""The fused ops the passes emit (ONNX Runtime's com.microsoft vocabulary, and ai.xcompile) run
on csrc kernels over numpy arrays, each falling back to its numpy version (fallback_ops.FALLBACK)
for shapes the kernel does not take; the torch references are in reference_ops (--reference).

    fast_op((domain, op)) -> fn(*inputs, **attributes) -> output(s), or None (no kernel)
GroupQueryAttention is not here: it is bound to the KV cache by the plan (see `attention_step`).
Shapes: x (B, S, hidden); the fast versions take B == 1 (one sequence) and fall back otherwise.
"""

from __future__ import annotations

import numpy as np

from xcompile.runtime.arrays import BF16, F32, aligned, f32, ptr, round_bf16, stride
from xcompile.runtime.fallback_ops import FALLBACK, nbits_floats
from xcompile.runtime.replay import Start, emit, emit_at, work

MS = "com.microsoft"
XC = "ai.xcompile"


# -- fast versions (csrc kernels) ----------------------------------------------------------------
#
# Each node gets its own closure (`fast_op`) that calls xcompile._C directly (the checked wrappers
# in runtime/kernels.py cost 10-25 us a call, more than these kernels take at decode sizes) and
# writes into output buffers it keeps per input shape: after the first token a decode step
# allocates nothing. A buffer is reused at the next call with that shape, which is safe because a
# step's output lives only until the step after its last reader, within one forward pass.


_generation = [0]  # bumped whenever an output buffer is (re)allocated: recorded addresses move


def buffers_generation() -> int:
    return _generation[0]


def bump_generation() -> None:
    _generation[0] += 1


class OutputBuffers:
    """get(shape, tag) -> an fp32 tensor of `shape` that this node reuses at every call: one
    block per tag, grown to the largest size asked for (batched decode changes the row count at
    every step; a buffer per shape grew without bound under a server's load).

    The blocks live in a BufferPool. Alone, a node has a pool of its own and so holds its
    largest output for the life of the plan: a prefill of S tokens then kept S rows of every
    intermediate of every layer. build_plan instead puts every node on one shared pool
    (`share`), where nodes whose outputs are never alive at the same time use the same block in
    turn (plan.share_buffers).
    """

    def __init__(self) -> None:
        self.share(None)

    def share(self, pool: BufferPool | None, color: int = 0) -> None:
        """Use block `color` of `pool` from now on (None: a pool of its own)."""
        self.pool, self.color = pool or BufferPool(), color
        self.views: dict[tuple, np.ndarray] = {}  # (tag, shape) -> its view of the block
        self.epoch = -1  # pool.epoch the views were made in

    def _drop_stale_views(self) -> None:
        if self.pool.epoch != self.epoch:  # a block moved (another node's, or ours just now)
            self.views.clear()
            self.epoch = self.pool.epoch

    def __call__(self, shape: tuple[int, ...], tag: int = 0) -> np.ndarray:
        self._drop_stale_views()
        view = self.views.get((tag, shape))
        if view is not None:
            return view
        numel = 1
        for d in shape:
            numel *= d
        block = self.pool.block((self.color, tag), numel)
        self._drop_stale_views()
        if len(self.views) >= 32:  # row counts change under batching: keep this bounded
            self.views.clear()
        view = self.views[(tag, shape)] = block[:numel].reshape(shape)
        return view


class BufferPool:
    """Blocks shared by the nodes of one plan: key (color, tag) -> an fp32 block, grown to the
    largest size any of its nodes asks for. Growing one moves it: `epoch` tells the nodes to
    drop their views, and the buffers generation tells replays their addresses moved."""

    def __init__(self) -> None:
        self.blocks: dict[tuple[int, int], np.ndarray] = {}
        self.epoch = 0

    def block(self, key: tuple[int, int], numel: int) -> np.ndarray:
        block = self.blocks.get(key)
        if block is None or block.size < numel:
            block = self.blocks[key] = aligned(max(numel, 1))
            self.epoch += 1
            _generation[0] += 1
        return block

    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.blocks.values())


def owns_outputs(fn, buffers: OutputBuffers):
    """Mark fn as a step whose outputs are its own buffers or fresh tensors, never views of its
    inputs (what plan.share_buffers needs to know to end its inputs' lifetimes)."""
    if fn is not None:
        fn.buffers = buffers
        fn.fresh_outputs = True
    return fn


PANEL_ROWS = 256  # weight rows widened at a time for a prompt's matmul (see paneled_linear)


def paneled_linear(x: np.ndarray, n: int, widen, out: OutputBuffers) -> np.ndarray:
    """x (..., K) fp32 @ W (N, K).T -> (..., N) fp32 for many rows of x (a prompt), W held
    narrower than fp32 (BF16, INT8, INT4): widen(n0, n1, panel) writes rows n0 .. n1 - 1 of W as
    fp32 into panel (n1 - n0, K). PANEL_ROWS rows at a time, each panel multiplied by numpy's
    GEMM (its BLAS) while it is still in cache. Widening the whole weight first wrote and read
    back N x K fp32 through memory, into a fresh allocation each call: 128 rows of x times
    11264 x 2048 (a fused gate/up) went from 85 to 138 GFLOP/s, 2048 x 5632 (down) from 84 to
    157 (measured with torch's GEMM).

    Scratch: out's tags 1 (the panel) and 2 (its columns of the result, then copied into place):
    M x 256 floats, not another M x N."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    panel = out((min(n, PANEL_ROWS), k), 1)
    y = out((*x.shape[:-1], n))
    y2 = y.reshape(m, n)
    work()  # the GEMMs below are numpy's: a replay re-runs this step
    for n0 in range(0, n, PANEL_ROWS):
        n1 = min(n, n0 + PANEL_ROWS)
        rows = panel[: n1 - n0]
        widen(n0, n1, rows)
        columns = out((m, n1 - n0), 2)
        np.matmul(x2, rows.T, out=columns)
        y2[:, n0:n1] = columns
    return y


def dequantize_panels(blocks, scales, zero_points, n: int, k: int, bits: int, block_size: int):
    """widen(n0, n1, panel) for paneled_linear on MatMulNBits weights: rows n0 .. n1 - 1 of W
    dequantized from their own rows of blocks, scales (fp32 or fp16) and zero points (packed
    uint8 or fp32)."""
    from xcompile import _C

    scales, zero_points, zp_float, fp16 = nbits_floats(scales, zero_points)
    b_ptr, s_ptr = ptr(blocks), ptr(scales)
    zp_ptr = 0 if zero_points is None else ptr(zero_points)
    b_row, s_row = blocks.size // n, scales.nbytes // n
    zp_row = 0 if zero_points is None else zero_points.nbytes // n

    def widen(n0: int, n1: int, panel: np.ndarray, held=(scales, zero_points)) -> None:
        emit(
            _C.dequantize_nbits,
            b_ptr + n0 * b_row,
            s_ptr + n0 * s_row,
            zp_ptr and zp_ptr + n0 * zp_row,
            zp_float,
            ptr(panel),
            n1 - n0,
            k,
            bits,
            block_size,
            fp16,
        )

    return widen


def fast_op(key: tuple[str, str]):
    """A fresh fast implementation of op `key` for one node, or None (use the reference). Its
    outputs are its own buffers (or fresh tensors on a fallback path), never its inputs."""
    out = OutputBuffers()
    return owns_outputs(_fast_op(key, out), out)


def _fast_op(key: tuple[str, str], out: OutputBuffers):
    from xcompile import _C
    from xcompile.runtime import kernels

    domain, op = key
    fallback = FALLBACK.get(key)  # numpy, for what the kernel does not take

    if op == "SimplifiedLayerNormalization":

        def rmsnorm(x, scale, axis=-1, epsilon=1e-5, stash_type=1):
            if scale.dtype != F32 or x.dtype != F32:
                return fallback(x, scale, axis, epsilon, stash_type)
            x = f32(x)
            y = out(tuple(x.shape))
            cols = x.shape[-1]
            emit(
                _C.rmsnorm,
                ptr(x),
                ptr(scale),
                ptr(y),
                x.size // cols,
                cols,
                epsilon,
            )
            return y

        return rmsnorm

    if key == (MS, "SkipSimplifiedLayerNormalization"):

        def skip_rmsnorm(x, skip, gamma, bias=None, epsilon=1e-5):
            if bias is not None or gamma.dtype != F32:
                return fallback(x, skip, gamma, bias, epsilon)
            x, skip = f32(x), f32(skip)
            y, total = out(tuple(x.shape), 0), out(tuple(x.shape), 1)
            cols = x.shape[-1]
            emit(
                _C.skip_rmsnorm,
                ptr(x),
                ptr(skip),
                ptr(gamma),
                ptr(y),
                ptr(total),
                x.size // cols,
                cols,
                epsilon,
            )
            return y, None, None, total

        return skip_rmsnorm

    if key == (MS, "RotaryEmbedding"):

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
            if x.ndim != 3 or x.shape[0] != 1 or not num_heads:
                return fallback(
                    x,
                    position_ids,
                    cos_cache,
                    sin_cache,
                    interleaved,
                    num_heads,
                    rotary_embedding_dim,
                    scale,
                )
            s, hidden = x.shape[1], x.shape[2]
            d = hidden // num_heads
            r = rotary_embedding_dim or 2 * cos_cache.shape[-1]
            y = out((s, num_heads, d))
            if (
                x.dtype == F32
                and stride(x, 2) == 1
                and cos_cache.dtype == sin_cache.dtype == F32
                and cos_cache.flags.c_contiguous
                and sin_cache.flags.c_contiguous
                and cos_cache.shape == sin_cache.shape
                and cos_cache.shape[-1] * 2 == r
                and position_ids.dtype == np.int64
                and position_ids.flags.c_contiguous
                and position_ids.size == s
            ):  # one call: x read in place (often a column slice of the fused QKV output), the
                # tables read at each token's position
                emit(
                    _C.rotary,
                    ptr(x),
                    ptr(cos_cache),
                    ptr(sin_cache),
                    ptr(y),
                    s,
                    num_heads,
                    d,
                    r,
                    bool(interleaved),
                    stride(x, 1),
                    hidden,
                    ptr(position_ids),
                    cos_cache.shape[0],
                )
                return y.reshape(x.shape)
            work()
            y[...] = x.reshape(y.shape)
            pos = position_ids[0]
            kernels.rotary(
                y,
                cos_cache[pos],
                sin_cache[pos],
                bool(interleaved),
                rotary_embedding_dim or None,
                out=y,
            )
            return y.reshape(x.shape)

        return rotary

    if key in ((XC, "SiluMul"), (XC, "GeluMul")):
        kernel = _C.silu_mul if key[1] == "SiluMul" else _C.gelu_mul

        def gated(g, up):
            shape = tuple(g.shape)
            cols = shape[-1] if shape else 1
            if (  # rows of gate and up as column slices of the fused projection's output: read
                # where they lie
                g.dtype == up.dtype == F32
                and g.ndim == 3
                and shape == tuple(up.shape)
                and shape[0] == 1
                and stride(g, -1) == stride(up, -1) == 1
                and min(stride(g, 1), stride(up, 1)) >= cols
            ):
                rows, g_stride, up_stride = shape[1], stride(g, 1), stride(up, 1)
            else:
                g, up = f32(g), f32(up)
                rows, g_stride, up_stride = g.size // max(cols, 1), cols, cols
            y = out(shape)
            emit(
                kernel,
                ptr(g),
                ptr(up),
                ptr(y),
                cols,
                rows,
                g_stride,
                up_stride,
            )
            return y

        return gated

    if key == (MS, "MatMulNBits") and hasattr(_C, "gemv_nbits"):
        # as dispatched when the plan is built (amx: VNNI for decode, tiles for prompts)
        vnni = kernels.isa_at_least("avx512_vnni")
        bound: list = [None, None]  # [the blocks tensor, its constant pointers and kernel]

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
            if bound[0] is not blocks:  # the weights are constants: resolve them once
                # accuracy_level 4 allows int8 activations: taken where VNNI makes them pay, for
                # any number of rows (prefill too: 64 multiply-adds an instruction beat
                # dequantizing the weight for an fp32 GEMM)
                q8 = accuracy_level == 4 and vnni and _C.gemv_nbits_q8_supported(bits, block_size)
                s, zp, zp_float, fp16 = nbits_floats(scales, zero_points)
                bound[0] = blocks
                bound[1] = (
                    _C.gemv_nbits_q8 if q8 else _C.gemv_nbits,
                    q8,
                    ptr(blocks),
                    ptr(s),
                    0 if zp is None else ptr(zp),
                    zp_float,
                    0 if bias is None else ptr(bias),
                    fp16,
                    (s, zp),  # kept alive
                )
            kernel, q8, b_ptr, s_ptr, zp_ptr, zp_float, bias_ptr, fp16, floats = bound[1]
            rows = x.size // K
            if g_idx is not None or (rows > 64 and not q8):  # dequantize, then numpy's GEMM
                widen = dequantize_panels(blocks, *floats, N, K, bits, block_size)
                y = paneled_linear(f32(x), N, widen, out)
                return y if bias is None else np.add(y, bias, out=y)
            x = f32(x)
            y = out((*x.shape[:-1], N))
            emit(
                kernel,
                ptr(x),
                b_ptr,
                s_ptr,
                zp_ptr,
                zp_float,
                bias_ptr,
                ptr(y),
                rows,
                N,
                K,
                bits,
                block_size,
                fp16,
            )
            return y

        return matmul_nbits

    if key in ((MS, "GatherBlockQuantized"), (XC, "GatherNBits")):
        # the embedding lookup on a quantized table: one kernel call reading the token ids through
        # their pointer, so a replayed step (runtime/replay.py) looks up that step's tokens
        bound: list = [None, None]  # [the blocks tensor, its constant pointers]

        def gather_nbits(
            blocks,
            indices,
            scales,
            zero_points=None,
            *,
            K=None,
            bits=4,
            block_size=128,
            gather_axis=0,
            quantize_axis=1,
        ):
            if bound[0] is not blocks:  # the weights are constants: resolve them once
                if op == "GatherBlockQuantized":
                    K = _gather_block_quantized_k(blocks, gather_axis, quantize_axis, bits)
                s, zp, zp_float, fp16 = nbits_floats(scales, zero_points)
                bound[0] = blocks
                bound[1] = (
                    ptr(blocks),
                    ptr(s),
                    0 if zp is None else ptr(zp),
                    zp_float,
                    scales.shape[0],
                    K,
                    fp16,
                    (s, zp),  # kept alive
                )
            b_ptr, s_ptr, zp_ptr, zp_float, n, K, fp16, _ = bound[1]
            if indices.dtype != np.int64 or not indices.flags.c_contiguous:
                work()  # a conversion of its own: such a step is re-run at each replay
                indices = np.ascontiguousarray(indices, dtype=np.int64)
            y = out((*indices.shape, K))
            emit(
                _C.gather_nbits,
                b_ptr,
                s_ptr,
                zp_ptr,
                zp_float,
                ptr(indices),
                ptr(y),
                indices.size,
                n,
                K,
                bits,
                block_size,
                fp16,
            )
            return y

        return gather_nbits

    if key == (MS, "FastGelu"):

        def gelu_tanh(x, bias=None):
            if bias is not None:
                work()
                x = x + bias
            x = f32(x)
            y = out(tuple(x.shape))
            emit(_C.gelu_tanh, ptr(x), ptr(y), x.size)
            return y

        return gelu_tanh

    return None


def _gather_block_quantized_k(data, gather_axis: int, quantize_axis: int, bits: int) -> int:
    """The (padded) row length of GatherBlockQuantized's uint8 data (N, k_blocks * blob)."""
    if data.ndim != 2 or gather_axis not in (0, -2) or quantize_axis not in (1, -1):
        raise NotImplementedError(
            "GatherBlockQuantized runs here on 2-D uint8 data gathered along axis 0 only"
        )
    return data.shape[1] * 8 // bits


# -- attention over the KV cache -----------------------------------------------------------------


def attention_step(k_cache: np.ndarray, v_cache: np.ndarray, use_kernels: bool, kv=None):
    """GroupQueryAttention bound to this layer's cache buffers (slots, kv, capacity, d).

    q3 (1,T,heads*d), k3/v3 (1,T,kv*d): the T new tokens of the segments `kv.segments` (a
    KVCache's, set for each forward), one after the other. Each segment's new K/V are written into
    its slot at start..start+length-1, then its queries attend to the positions before and
    including their own, read through the cache's `rows` (beams share prefixes). Returns out
    (1,T,heads*d) and the caches as present_k/v.
    Without segments (the single-sequence path, B = 1): past_k (1,kv,P,d), a view of the cache,
    says where the new tokens go.
    The cache is fp32 or bf16 (KVCache's dtype): new K/V are rounded to it as they are written
    (kv_write_bf16, or numpy's cast, both to nearest even) and read back widened to fp32.
    """
    from xcompile import _C
    from xcompile.runtime import kernels
    from xcompile.runtime.gqa_call import GqaCall

    if not use_kernels:
        from xcompile.runtime.reference_attention import attention_step as reference

        return reference(k_cache, v_cache, kv)
    bf16 = k_cache.dtype == BF16
    to_cache = round_bf16 if bf16 else (lambda x: x)  # new K/V in the cache's dtype
    fast = k_cache.dtype == v_cache.dtype in (F32, BF16)
    kv_write = _C.kv_write_bf16 if bf16 else _C.kv_write
    attention = _C.attention_bf16 if bf16 else _C.attention
    slots, _, capacity, _ = k_cache.shape
    k_ptr, v_ptr = ptr(k_cache), ptr(v_cache)
    slot_stride = k_cache[0].size
    out_buffer = OutputBuffers()

    def direct(q3, k3, v3, segments, heads, kv_heads, d, scale, window, softcap):
        # Decode's path, straight to the kernels: the new K/V written into each segment's slot
        # from wherever they sit (columns of the fused QKV output), then attention read through
        # the cache's rows (KVCache keeps them inside 0..slots-1). No numpy op per call.
        out = out_buffer((1, q3.shape[1], heads * d))
        q_stride, k_stride, v_stride = stride(q3, 1), stride(k3, 1), stride(v3, 1)
        q0, k0, v0, o0 = ptr(q3), ptr(k3), ptr(v3), ptr(out)
        rows, row_stride = ptr(kv.rows), stride(kv.rows, 0)
        starts = [seg.start for seg in segments]
        row = 0
        for i, seg in enumerate(segments):
            s, p = seg.length, Start(i)  # the start moves every step: replays resolve it
            k_row, v_row = k0 + 4 * row * k_stride, v0 + 4 * row * v_stride
            emit_at(
                kv_write,
                (k_row, k_stride, k_ptr, seg.slot, slots, p, s, kv_heads, d, capacity),
                starts,
            )
            emit_at(
                kv_write,
                (v_row, v_stride, v_ptr, seg.slot, slots, p, s, kv_heads, d, capacity),
                starts,
            )
            emit_at(
                attention,
                (
                    q0 + 4 * row * q_stride,
                    k_ptr,
                    v_ptr,
                    o0 + 4 * row * heads * d,
                    s,
                    heads,
                    kv_heads,
                    d,
                    capacity,
                    p,
                    window,
                    scale,
                    rows + 4 * seg.slot * row_stride,
                    slot_stride,
                    softcap,
                ),
                starts,
            )
            row += s
        return out, k_cache, v_cache

    def run(*inputs, **attrs):
        call = GqaCall.read(inputs, attrs, kv, capacity, k_cache.shape[-1])
        q3, k3, v3, segments = call.q3, call.k3, call.v3, call.segments
        num_heads, kv_num_heads, d = call.heads, call.kv_heads, call.d
        scale, window, softcap = call.scale, call.window, call.softcap
        if fast and kv is not None and _direct(q3, k3, v3, num_heads, kv_num_heads, d):
            return direct(q3, k3, v3, segments, num_heads, kv_num_heads, d, scale, window, softcap)
        work()  # the general path: numpy copies into the cache, then the kernel
        q = q3.reshape(-1, num_heads, d)
        k = k3.reshape(-1, kv_num_heads, d).transpose(1, 0, 2)  # (kv, T, d)
        v = v3.reshape(-1, kv_num_heads, d).transpose(1, 0, 2)
        outs = []
        row = 0
        for seg in segments:
            p, s = seg.start, seg.length
            k_cache[seg.slot, :, p : p + s] = to_cache(k[:, row : row + s])
            v_cache[seg.slot, :, p : p + s] = to_cache(v[:, row : row + s])
            q_seg = np.ascontiguousarray(q[row : row + s], dtype=F32)
            if kv is None:
                out = kernels.attention(
                    q_seg, k_cache[0], v_cache[0], p, scale, window, q_seg, softcap=softcap
                )
            else:
                out = kernels.attention(
                    q_seg,
                    k_cache,
                    v_cache,
                    p,
                    scale,
                    window,
                    q_seg,
                    slot_of=kv.rows[seg.slot],
                    softcap=softcap,
                )
            outs.append(out.reshape(s, -1))
            row += s
        out = outs[0] if len(outs) == 1 else np.concatenate(outs)
        return out.reshape(1, row, -1), k_cache, v_cache

    run.buffers = out_buffer  # fresh_outputs unset: its general path writes into q's memory
    return run


def _direct(q3, k3, v3, heads: int, kv_heads: int, d: int) -> bool:
    """q3 (1,T,heads*d) with whole rows, k3/v3 (1,T,kv*d) whose rows may be column slices:
    the shapes the kernels can read as they are."""
    return (
        q3.dtype == k3.dtype == v3.dtype == F32
        and q3.ndim == k3.ndim == v3.ndim == 3
        and q3.shape[0] == 1
        and q3.shape[2] == heads * d
        and k3.shape[2] == v3.shape[2] == kv_heads * d
        and stride(q3, 2) == stride(k3, 2) == stride(v3, 2) == 1
        and stride(q3, 1) == heads * d
    )
