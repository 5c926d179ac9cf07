"""The Python face of the csrc kernels (xcompile._C), each beside its plain torch reference.

The kernels take raw pointers, so everything that can go wrong with a pointer is checked here:
dtype, contiguity, shape and overlap, each with a ValueError that says what to pass instead.
Each fast path (`rmsnorm`, `linear`, ...) and its reference (`rmsnorm_reference`,
`linear_reference`, ...) compute the same thing; tests/csrc holds every ISA path to the references.

The fast paths take and return numpy arrays (bf16 as arrays.BF16 bits, or ml_dtypes.bfloat16):
the runtime imports no torch. They take CPU torch tensors too (tests, the --reference path),
viewed as numpy without a copy, and then return torch tensors viewing their results (an `out`
given is returned itself).
The references are torch, imported when one is called.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import TYPE_CHECKING

import numpy as np

from xcompile import _C
from xcompile._C import isa, num_threads, set_isa, set_num_threads, supported_isas
from xcompile.runtime.arrays import BF16, dtype_name, from_torch, widen

if TYPE_CHECKING:
    import torch

__all__ = [
    "attention",
    "attention_reference",
    "dequantize_nbits",
    "dequantize_nbits_reference",
    "gather_nbits",
    "gather_nbits_reference",
    "gelu_tanh",
    "gelu_tanh_reference",
    "isa",
    "isa_at_least",
    "linear",
    "linear_nbits",
    "linear_nbits_reference",
    "linear_nbits_q8_reference",
    "quantize_activations_reference",
    "linear_reference",
    "num_threads",
    "quantize_nbits_reference",
    "rmsnorm",
    "rmsnorm_reference",
    "rotary",
    "rotary_reference",
    "set_isa",
    "set_num_threads",
    "silu_mul",
    "silu_mul_reference",
    "skip_rmsnorm",
    "skip_rmsnorm_reference",
    "supported_isas",
]

# csrc/dispatch.h's Isa levels, slowest first: each level runs every path of the ones before it
ISA_LEVELS = ("scalar", "avx2", "avx512", "avx512_vnni", "avx512_bf16", "amx")


def isa_at_least(level: str) -> bool:
    """Whether the kernels' current path (`isa()`) is `level` or a later one."""
    return ISA_LEVELS.index(_C.isa()) >= ISA_LEVELS.index(level)


F32 = np.dtype(np.float32)
U8 = np.dtype(np.uint8)
F16 = np.dtype(np.float16)
I32 = np.dtype(np.int32)
I64 = np.dtype(np.int64)

_LINEAR_WEIGHT_KERNELS = {F32: _C.gemv_f32, BF16: _C.gemv_bf16}


def _is_torch(a: object) -> bool:
    # by the type's module, so that asking never imports torch
    return type(a).__module__.startswith("torch")


def _from_torch(t: torch.Tensor) -> np.ndarray | None:
    """A numpy view of a CPU tensor's memory (bf16 through int16), or None for a dtype numpy
    lacks."""
    try:
        return from_torch(t)
    except TypeError:
        return None


def _array(name: str, a: np.ndarray | torch.Tensor, dtypes: tuple[np.dtype, ...]) -> np.ndarray:
    """a checked for a kernel's pointer: a numpy array (a CPU torch tensor is viewed as one) of
    one of dtypes, C-contiguous."""
    if _is_torch(a):
        if a.device.type != "cpu":
            raise ValueError(f"{name} is on {a.device}; xcompile kernels run on CPU arrays only")
        array = _from_torch(a)
    elif isinstance(a, np.ndarray):
        array = a.view(BF16) if a.dtype.name == "bfloat16" else a  # ml_dtypes': its bits
    else:
        raise TypeError(f"{name} must be a numpy array, got {type(a).__name__}")
    if array is None or array.dtype not in dtypes:
        wanted = " or ".join(dtype_name(d) for d in dtypes)
        shown = dtype_name(a.dtype) if isinstance(a, np.ndarray) else a.dtype
        raise ValueError(f"{name} has dtype {shown}; pass {wanted}")
    if not array.flags.c_contiguous:
        raise ValueError(f"{name} is not contiguous; pass np.ascontiguousarray({name}) instead")
    return array


def _out(out: np.ndarray | torch.Tensor, shape: tuple[int, ...], name: str = "out") -> np.ndarray:
    out = _array(name, out, (F32,))
    if out.shape != shape:
        raise ValueError(f"{name} has shape {out.shape}; expected {shape}")
    if not out.flags.writeable:
        raise ValueError(f"{name} is read-only; pass a writable array")
    return out


def _ptr(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def _span(a: np.ndarray) -> tuple[int, int]:
    """The byte range [start, end) of a contiguous array."""
    start = _ptr(a)
    return start, start + a.nbytes


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> bool:
    # Empty ranges overlap nothing; views side by side in one buffer (the K and V halves of
    # one cache block) do not overlap either.
    return a[0] < a[1] and b[0] < b[1] and a[0] < b[1] and b[0] < a[1]


def _check_alias(out: tuple[int, int], name: str, t: tuple[int, int], same_ok: bool) -> None:
    """Rejects out's span overlapping t's, except (when same_ok) out being exactly t: kernels
    that run in place read each element before writing it at the same address, no other overlap."""
    if not _overlap(out, t) or (same_ok and out == t):
        return
    how = "be it exactly or not overlap it" if same_ok else "not share memory with it"
    raise ValueError(f"out overlaps {name}; out must {how}")


def _takes_torch(wrapper):
    """Lets a numpy wrapper be called with torch tensors: given any, it returns torch tensors
    viewing the arrays it returns, and returns a torch `out` (or `sum_out`) given as itself.
    The wrapper returns its out parameters in the order of its signature, allocated when None."""
    params = list(inspect.signature(wrapper).parameters)
    out_places = [(name, params.index(name)) for name in ("out", "sum_out") if name in params]

    @functools.wraps(wrapper)
    def call(*args, **kwargs):
        result = wrapper(*args, **kwargs)
        if not any(_is_torch(a) for a in (*args, *kwargs.values())):
            return result
        import torch

        given = [kwargs.get(name, args[i] if i < len(args) else None) for name, i in out_places]
        arrays = result if isinstance(result, tuple) else (result,)
        tensors = []
        for i, array in enumerate(arrays):
            out = given[i] if i < len(given) else None
            tensors.append(out if _is_torch(out) else torch.from_numpy(array))
        return tuple(tensors) if isinstance(result, tuple) else tensors[0]

    return call


@_takes_torch
def rmsnorm(
    x: np.ndarray, weight: np.ndarray, eps: float, out: np.ndarray | None = None
) -> np.ndarray:
    """x (..., C) fp32, weight (C) fp32 -> (..., C) fp32; out may be x itself (in place)."""
    x = _array("x", x, (F32,))
    weight = _array("weight", weight, (F32,))
    cols = x.shape[-1] if x.ndim else 0
    if x.ndim == 0 or weight.shape != (cols,):
        raise ValueError(
            f"rmsnorm: weight has shape {weight.shape}, x {x.shape}; "
            "weight must be (C,) for x of shape (..., C)"
        )
    out = np.empty_like(x) if out is None else _out(out, x.shape)
    _C.rmsnorm(_ptr(x), _ptr(weight), _ptr(out), x.size // max(cols, 1), cols, eps)
    return out


def rmsnorm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm, fp32."""
    import torch

    x = x.float()
    variance = x.pow(2).mean(-1, keepdim=True)
    return weight.float() * (x * torch.rsqrt(variance + eps))


def _bias(bias: np.ndarray | None, n: int) -> np.ndarray | None:
    """A checked fp32 or bf16 bias (N,) as fp32 (a bf16 one upcast: N elements)."""
    if bias is None:
        return None
    bias = _array("bias", bias, (F32, BF16))
    if bias.shape != (n,):
        raise ValueError(f"bias has shape {bias.shape}; expected ({n},)")
    return widen(bias) if bias.dtype == BF16 else bias


@_takes_torch
def linear(
    x: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """x (..., K) fp32 @ weight (N, K).T + bias (N) -> (..., N) fp32.

    weight fp32 or bf16 (nn.Linear layout); a bf16 weight is widened to fp32 in registers and
    accumulated in fp32. bias fp32 (a bf16 bias is upcast, N elements). Meant for decode (few rows
    of x): the weight is streamed once for all of them.
    """
    x = _array("x", x, (F32,))
    weight = _array("weight", weight, tuple(_LINEAR_WEIGHT_KERNELS))
    if weight.ndim != 2 or x.ndim == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"linear: x {x.shape} and weight {weight.shape} do not match; "
            "expected x (..., K) and weight (N, K)"
        )
    n, k = weight.shape
    bias = _bias(bias, n)
    shape = (*x.shape[:-1], n)
    if out is None:
        out = np.empty(shape, F32)
    else:
        out = _out(out, shape)
        if _overlap(_span(out), _span(x)):
            raise ValueError("out shares memory with x; linear cannot run in place")
    if k == 0:  # an empty sum: only the bias remains
        out[...] = 0 if bias is None else bias
        return out
    _LINEAR_WEIGHT_KERNELS[weight.dtype](
        _ptr(x), _ptr(weight), 0 if bias is None else _ptr(bias), _ptr(out), x.size // k, n, k
    )
    return out


def linear_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """torch's linear in fp32, with the (possibly bf16) weight and bias upcast exactly."""
    import torch

    return torch.nn.functional.linear(
        x.float(), weight.float(), None if bias is None else bias.float()
    )


def _nbits_weight(
    B: np.ndarray,
    scales: np.ndarray,
    zero_points: np.ndarray | None,
    bits: int,
    block_size: int,
    K: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int]:
    """Checks a MatMulNBits weight (B, scales, zero_points) against bits, block_size and K;
    returns it as numpy arrays, and N."""
    if bits not in (4, 8):
        raise ValueError(f"bits is {bits}; MatMulNBits weights here are 4 or 8 bits")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size is {block_size}; pass a power of two >= 16")
    if K < 0:
        raise ValueError(f"K is {K}; pass the number of input features, >= 0")
    B = _array("B", B, (U8,))
    scales = _array("scales", scales, (F32, F16))
    n = B.shape[0] if B.ndim else 0
    k_blocks = -(-K // block_size)
    blob = block_size * bits // 8
    if B.shape != (n, k_blocks, blob):
        raise ValueError(
            f"B has shape {B.shape}; for K={K}, bits={bits}, block_size={block_size} "
            f"expected (N, {k_blocks}, {blob})"
        )
    if scales.shape != (n, k_blocks):
        raise ValueError(f"scales has shape {scales.shape}; expected ({n}, {k_blocks})")
    if zero_points is not None:
        zero_points = _array("zero_points", zero_points, (U8, F32, F16))
        if zero_points.dtype != U8 and zero_points.dtype != scales.dtype:
            raise ValueError(
                f"zero_points are {zero_points.dtype} and scales {scales.dtype}; "
                "give float zero points in the scales' dtype"
            )
        packed = zero_points.dtype == U8
        cols = k_blocks if bits == 8 or not packed else -(-k_blocks // 2)
        if zero_points.shape != (n, cols):
            raise ValueError(
                f"zero_points has shape {zero_points.shape}; expected ({n}, {cols})"
                + (" (two 4-bit zero points per byte)" if bits == 4 and packed else "")
                + ("" if packed else " (float zero points: one per block, like scales)")
            )
    return B, scales, zero_points, n


def _scales_args(scales: np.ndarray) -> tuple[int, bool]:
    """(address, fp16) of checked scales: fp32, or fp16 (float zero points then too)."""
    return _ptr(scales), scales.dtype == F16


def _zero_points_args(zero_points: np.ndarray | None) -> tuple[int, bool]:
    """(address, float_zero_points) of checked zero points, as the nbits kernels take them."""
    if zero_points is None:
        return 0, False
    return _ptr(zero_points), zero_points.dtype != U8


@_takes_torch
def linear_nbits(
    x: np.ndarray,
    B: np.ndarray,
    scales: np.ndarray,
    zero_points: np.ndarray | None,
    bits: int,
    block_size: int,
    K: int,
    bias: np.ndarray | None = None,
    out: np.ndarray | None = None,
    int8_activations: bool = False,
) -> np.ndarray:
    """x (..., K) fp32 @ W.T + bias -> (..., N) fp32, W (N, K) held as com.microsoft MatMulNBits
    weights (ONNX Runtime's layout), dequantized in registers. For decode (few rows of x).
    int8_activations: x quantized to int8 first (MatMulNBits' accuracy_level 4; see
    linear_nbits_q8_reference), multiplied with AVX512_VNNI where the CPU has it.

    B             uint8 (N, k_blocks, block_size * bits / 8), k_blocks = ceil(K / block_size);
                  INT4: element 2j of a block in the low nibble of byte j, 2j + 1 in the high one;
                  the last block's padding past K is ignored
    scales        float32 or float16 (N, k_blocks)
    zero_points   uint8: INT8 (N, k_blocks); INT4 (N, ceil(k_blocks / 2)), block 2j in the low
                  nibble; or float32 / float16 (the scales' dtype) (N, k_blocks), not packed
                  (ONNX Runtime's zero points of A's type: a block's float offset, llama.cpp
                  Q4_1 / Q4_K's min = -zp * scale); or None (then 2^(bits-1))
    W[n, k] = (q[n, k] - zp[n, k // block_size]) * scales[n, k // block_size], in fp32:
              (float(q) - zp) * scale, the subtraction exact for integer zero points
    """
    B, scales, zero_points, n = _nbits_weight(B, scales, zero_points, bits, block_size, K)
    x = _array("x", x, (F32,))
    if x.ndim == 0 or x.shape[-1] != K:
        raise ValueError(f"linear_nbits: x has shape {x.shape}; expected (..., {K})")
    bias = _bias(bias, n)
    shape = (*x.shape[:-1], n)
    if out is None:
        out = np.empty(shape, F32)
    else:
        out = _out(out, shape)
        _check_alias(_span(out), "x", _span(x), same_ok=False)
    if K == 0:  # an empty sum: only the bias remains
        out[...] = 0 if bias is None else bias
        return out
    s_ptr, fp16 = _scales_args(scales)
    (_C.gemv_nbits_q8 if int8_activations else _C.gemv_nbits)(
        _ptr(x),
        _ptr(B),
        s_ptr,
        *_zero_points_args(zero_points),
        0 if bias is None else _ptr(bias),
        _ptr(out),
        x.size // K,
        n,
        K,
        bits,
        block_size,
        fp16,
    )
    return out


@_takes_torch
def dequantize_nbits(
    B: np.ndarray,
    scales: np.ndarray,
    zero_points: np.ndarray | None,
    bits: int,
    block_size: int,
    K: int,
) -> np.ndarray:
    """W (N, K) fp32 from MatMulNBits weights (layout in linear_nbits), bit for bit the
    reference's; prefill multiplies by it with a matmul."""
    B, scales, zero_points, n = _nbits_weight(B, scales, zero_points, bits, block_size, K)
    out = np.empty((n, K), F32)
    s_ptr, fp16 = _scales_args(scales)
    _C.dequantize_nbits(
        _ptr(B), s_ptr, *_zero_points_args(zero_points), _ptr(out), n, K, bits, block_size,
        fp16,
    )
    return out


def dequantize_nbits_reference(
    B: torch.Tensor,
    scales: torch.Tensor,
    zero_points: torch.Tensor | None,
    bits: int,
    block_size: int,
    K: int,
) -> torch.Tensor:
    """The MatMulNBits layout unpacked with torch ops: (N, K) fp32, (float(q) - zp) * scale
    with fp32 roundings (zero points packed uint8, float32 (N, k_blocks) or None)."""
    import torch

    n, k_blocks = scales.shape
    if bits == 4:  # byte j of a block holds elements 2j (low nibble) and 2j + 1 (high)
        q = torch.stack((B & 0xF, B >> 4), dim=-1).reshape(n, k_blocks, block_size)
    else:
        q = B
    if zero_points is None:
        zp = torch.full((n, k_blocks), float(1 << (bits - 1)))
    elif zero_points.is_floating_point():
        zp = zero_points.float()
    elif bits == 4:
        zp = torch.stack((zero_points & 0xF, zero_points >> 4), dim=-1).reshape(n, -1)[:, :k_blocks]
    else:
        zp = zero_points
    w = (q.float() - zp.float()[..., None]) * scales.float()[..., None]
    return w.reshape(n, k_blocks * block_size)[:, :K]


@_takes_torch
def gather_nbits(
    B: np.ndarray,
    scales: np.ndarray,
    zero_points: np.ndarray | None,
    indices: np.ndarray,
    bits: int,
    block_size: int,
    K: int,
) -> np.ndarray:
    """Rows `indices` (int64, any shape) of W (N, K) held as MatMulNBits weights (layout in
    linear_nbits) -> (*indices.shape, K) fp32, bit for bit the reference's: an embedding lookup
    on a quantized table. Negative indices count from N; those outside [-N, N) give zero rows."""
    B, scales, zero_points, n = _nbits_weight(B, scales, zero_points, bits, block_size, K)
    indices = _array("indices", indices, (I64,))
    out = np.empty((*indices.shape, K), F32)
    s_ptr, fp16 = _scales_args(scales)
    _C.gather_nbits(
        _ptr(B),
        s_ptr,
        *_zero_points_args(zero_points),
        _ptr(indices),
        _ptr(out),
        indices.size,
        n,
        K,
        bits,
        block_size,
        fp16,
    )
    return out


def gather_nbits_reference(
    B: torch.Tensor,
    scales: torch.Tensor,
    zero_points: torch.Tensor | None,
    indices: torch.Tensor,
    bits: int,
    block_size: int,
    K: int,
) -> torch.Tensor:
    """The rows dequantized by dequantize_nbits_reference, zeros outside [-N, N)."""
    import torch

    n = scales.shape[0]
    flat = indices.reshape(-1).long()
    flat = torch.where(flat < 0, flat + n, flat)
    inside = (flat >= 0) & (flat < n)
    rows = torch.where(inside, flat, 0)
    w = dequantize_nbits_reference(
        B.reshape(n, scales.shape[1], -1)[rows],
        scales[rows],
        None if zero_points is None else zero_points[rows],
        bits,
        block_size,
        K,
    )
    return w.masked_fill(~inside[:, None], 0.0).reshape(*indices.shape, K)


def linear_nbits_reference(
    x: torch.Tensor,
    B: torch.Tensor,
    scales: torch.Tensor,
    zero_points: torch.Tensor | None,
    bits: int,
    block_size: int,
    K: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """torch's linear on the reference-dequantized weight, fp32."""
    import torch

    w = dequantize_nbits_reference(B, scales, zero_points, bits, block_size, K)
    return torch.nn.functional.linear(x.float(), w, None if bias is None else bias.float())


def quantize_activations_reference(
    x: torch.Tensor, K: int, block_size: int, bits: int
) -> torch.Tensor:
    """x (M, K) fp32 -> x rounded to int8 levels as gemv_nbits_q8 rounds it, (M, K) fp32: per row,
    in units of min(block_size, 64 for INT8 / 128 for INT4) elements, scale = max|x| / 127 and
    q = rint(x * 127 / max|x|) (float32 arithmetic, ties to even), clamped to [-127, 127]."""
    import torch

    unit = min(block_size, 64 if bits == 8 else 128)
    k_pad = -(-K // block_size) * block_size
    xp = torch.nn.functional.pad(x.float(), (0, k_pad - K)).view(x.shape[0], -1, unit)
    amax = xp.abs().amax(dim=-1, keepdim=True)
    inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros_like(amax))
    q = torch.round(xp * inv).clamp(-127, 127)
    return (q.double() * (amax / 127.0).double()).view(x.shape[0], -1)[:, :K]


def linear_nbits_q8_reference(
    x: torch.Tensor,
    B: torch.Tensor,
    scales: torch.Tensor,
    zero_points: torch.Tensor | None,
    bits: int,
    block_size: int,
    K: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """linear_nbits(int8_activations=True) with torch ops: the activations as the kernel rounds
    them times the reference-dequantized weight, in float64, -> (..., N) fp32."""
    w = dequantize_nbits_reference(B, scales, zero_points, bits, block_size, K).double()
    xq = quantize_activations_reference(x.reshape(-1, K), K, block_size, bits)
    y = xq @ w.T
    if bias is not None:
        y = y + bias.double()
    return y.float().reshape(*x.shape[:-1], -1)


def quantize_nbits_reference(
    w: torch.Tensor, bits: int, block_size: int, sym: bool, float_zero_points: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Round-to-nearest MatMulNBits weights (B, scales, zero_points or None) of w (N, K), for
    tests. sym: scale = absmax / (2^(bits-1) - 1), zero point 2^(bits-1) left implicit; asym:
    scale = (max - min) / (2^bits - 1) over a range stretched to hold 0, zp = round(-min / scale);
    float_zero_points (asym): the block's own min and max, zp = -min / scale unrounded, float32
    (N, k_blocks), q = round((w - min) / scale) (llama.cpp's Q4_1 / Q8_1 min and scale). The
    last block is zero-padded past K."""
    import torch

    n, k = w.shape
    k_blocks = -(-k // block_size)
    padded = torch.nn.functional.pad(w.float(), (0, k_blocks * block_size - k))
    blocks = padded.reshape(n, k_blocks, block_size)
    top = (1 << bits) - 1
    if float_zero_points and not sym:
        low, high = blocks.amin(dim=-1), blocks.amax(dim=-1)
        scales = (high - low) / top
        scales = torch.where(scales > 0, scales, 1)  # a constant block: q = 0, zp = -min
        q = torch.round((blocks - low[..., None]) / scales[..., None]).clamp(0, top)
        q = q.to(torch.uint8)
        if bits == 4:
            q = q[..., 0::2] | (q[..., 1::2] << 4)
        return q.contiguous(), scales.contiguous(), (-low / scales).contiguous()
    if sym:
        absmax = blocks.abs().amax(dim=-1)
        scales = absmax / ((1 << (bits - 1)) - 1)
        zp = torch.full_like(scales, 1 << (bits - 1))
    else:
        low = blocks.amin(dim=-1).clamp(max=0)
        high = blocks.amax(dim=-1).clamp(min=0)
        scales = (high - low) / top
        zp = torch.round(-low / torch.where(scales > 0, scales, 1)).clamp(0, top)
    scales = torch.where(scales > 0, scales, 1)  # an all-zero block: any scale, q = zp
    q = (torch.round(blocks / scales[..., None]) + zp[..., None]).clamp(0, top).to(torch.uint8)
    if bits == 4:
        q = q[..., 0::2] | (q[..., 1::2] << 4)
    zero_points = None
    if not sym:
        zero_points = zp.to(torch.uint8)
        if bits == 4:
            zero_points = torch.nn.functional.pad(zero_points, (0, k_blocks % 2))
            zero_points = zero_points[:, 0::2] | (zero_points[:, 1::2] << 4)
    return q.contiguous(), scales.contiguous(), zero_points


@_takes_torch
def skip_rmsnorm(
    x: np.ndarray,
    skip: np.ndarray,
    weight: np.ndarray,
    eps: float,
    out: np.ndarray | None = None,
    sum_out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Residual add then RMSNorm: (rmsnorm(x + skip) * weight, x + skip), all fp32.

    x, skip (..., C), weight (C). ONNX Runtime's com.microsoft SkipSimplifiedLayerNormalization
    (outputs 0 and 3) without its optional bias. sum_out may be x or skip (the residual updated in
    place); out may be x or skip too, but not sum_out.
    """
    x = _array("x", x, (F32,))
    skip = _array("skip", skip, (F32,))
    weight = _array("weight", weight, (F32,))
    cols = x.shape[-1] if x.ndim else 0
    if x.ndim == 0 or skip.shape != x.shape or weight.shape != (cols,):
        raise ValueError(
            f"skip_rmsnorm: x {x.shape}, skip {skip.shape}, weight "
            f"{weight.shape}; expected x and skip (..., C) alike and weight (C,)"
        )
    out = np.empty_like(x) if out is None else _out(out, x.shape)
    sum_out = np.empty_like(x) if sum_out is None else _out(sum_out, x.shape, "sum_out")
    out_span, sum_span = _span(out), _span(sum_out)
    for name, t in (("x", x), ("skip", skip)):
        span = _span(t)
        _check_alias(out_span, name, span, same_ok=True)
        _check_alias(sum_span, name, span, same_ok=True)
    if _overlap(out_span, sum_span):
        raise ValueError("out and sum_out share memory; pass two separate buffers")
    _C.skip_rmsnorm(
        _ptr(x),
        _ptr(skip),
        _ptr(weight),
        _ptr(out),
        _ptr(sum_out),
        x.size // max(cols, 1),
        cols,
        eps,
    )
    return out, sum_out


def skip_rmsnorm_reference(
    x: torch.Tensor, skip: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(LlamaRMSNorm(x + skip), x + skip) in fp32."""
    total = x.float() + skip.float()
    return rmsnorm_reference(total, weight, eps), total


@_takes_torch
def rotary(
    x: np.ndarray,
    cos: np.ndarray,
    sin: np.ndarray,
    interleaved: bool,
    rotary_dim: int | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Rotary position embedding of x (S, heads, head_dim) fp32; out may be x (in place).

    cos, sin (S, rotary_dim / 2) fp32: cos(p * inv_freq), sin(p * inv_freq) for each token's
    position p, not duplicated. interleaved=False rotates pairs (i, i + rotary_dim / 2) (Llama's
    rotate_half), True pairs (2i, 2i + 1) (GPT-J's rotate_every_two). rotary_dim defaults to
    2 * cos.shape[-1] (and must equal it when given); dims past it pass through.
    """
    x = _array("x", x, (F32,))
    cos = _array("cos", cos, (F32,))
    sin = _array("sin", sin, (F32,))
    if x.ndim != 3:
        raise ValueError(f"rotary: x has shape {x.shape}; expected (S, heads, head_dim)")
    tokens, heads, head_dim = x.shape
    half = cos.shape[-1] if cos.ndim == 2 else -1
    if rotary_dim is None:
        rotary_dim = 2 * half
    if cos.shape != sin.shape or cos.shape != (tokens, rotary_dim // 2) or rotary_dim % 2:
        raise ValueError(
            f"rotary: cos {cos.shape}, sin {sin.shape} for x {x.shape} and "
            f"rotary_dim {rotary_dim}; expected both ({tokens}, rotary_dim / 2), rotary_dim even"
        )
    if rotary_dim > head_dim:
        raise ValueError(f"rotary: rotary_dim {rotary_dim} exceeds head_dim {head_dim}")
    if out is None:
        out = np.empty_like(x)
    else:
        out = _out(out, x.shape)
        _check_alias(_span(out), "x", _span(x), same_ok=True)
    row = heads * head_dim
    _C.rotary(
        _ptr(x),
        _ptr(cos),
        _ptr(sin),
        _ptr(out),
        tokens,
        heads,
        head_dim,
        rotary_dim,
        interleaved,
        row,
        row,
    )
    return out


def rotary_reference(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    interleaved: bool,
    rotary_dim: int | None = None,
) -> torch.Tensor:
    """transformers' apply_rotary_pos_emb (Llama, rotate_half) or GPT-J's rotate_every_two, on
    the first rotary_dim dims of x (S, heads, head_dim); cos, sin (S, rotary_dim / 2)."""
    import torch

    rotary_dim = 2 * cos.shape[-1] if rotary_dim is None else rotary_dim
    x = x.float()
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    cos, sin = cos.float()[:, None, :], sin.float()[:, None, :]  # broadcast over heads
    if interleaved:
        cos, sin = cos.repeat_interleave(2, dim=-1), sin.repeat_interleave(2, dim=-1)
        rotated = torch.stack((-x_rot[..., 1::2], x_rot[..., ::2]), dim=-1).flatten(-2)
    else:
        cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)
        x1, x2 = x_rot[..., : rotary_dim // 2], x_rot[..., rotary_dim // 2 :]
        rotated = torch.cat((-x2, x1), dim=-1)
    return torch.cat((x_rot * cos + rotated * sin, x_pass), dim=-1)


def _elementwise_out(out: np.ndarray | None, like: np.ndarray) -> np.ndarray:
    return np.empty_like(like) if out is None else _out(out, like.shape)


@_takes_torch
def silu_mul(gate: np.ndarray, up: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """silu(gate) * up, fp32, any shape (gate and up alike); out may be gate or up."""
    gate = _array("gate", gate, (F32,))
    up = _array("up", up, (F32,))
    if gate.shape != up.shape:
        raise ValueError(f"silu_mul: gate {gate.shape} and up {up.shape} must have one shape")
    out = _elementwise_out(out, gate)
    out_span = _span(out)
    _check_alias(out_span, "gate", _span(gate), same_ok=True)
    _check_alias(out_span, "up", _span(up), same_ok=True)
    _C.silu_mul(_ptr(gate), _ptr(up), _ptr(out), gate.size)
    return out


def silu_mul_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Llama's MLP activation: act_fn(gate_proj(x)) * up_proj(x), act_fn = SiLU."""
    import torch

    return torch.nn.functional.silu(gate.float()) * up.float()


@_takes_torch
def gelu_tanh(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), fp32, any shape; out may be x."""
    x = _array("x", x, (F32,))
    out = _elementwise_out(out, x)
    _check_alias(_span(out), "x", _span(x), same_ok=True)
    _C.gelu_tanh(_ptr(x), _ptr(out), x.size)
    return out


def gelu_tanh_reference(x: torch.Tensor) -> torch.Tensor:
    """GPT-J's gelu_new: torch's GELU with the tanh approximation."""
    import torch

    return torch.nn.functional.gelu(x.float(), approximate="tanh")


@_takes_torch
def attention(
    q: np.ndarray,
    k_cache: np.ndarray,
    v_cache: np.ndarray,
    past: int,
    scale: float,
    window: int = 0,
    out: np.ndarray | None = None,
    slot_of: np.ndarray | None = None,
    softcap: float = 0.0,
) -> np.ndarray:
    """Causal grouped-query attention of S new tokens over a preallocated KV cache: q and out
    fp32, the caches both fp32 or both bf16 (widened to fp32 as they are read). softcap > 0:
    each score s = scale * q . k becomes softcap * tanh(s / softcap) before the softmax.

    slot_of (past + S,) int32, or None: indirect access (beam search). The caches are then
    (slots, kv_heads, capacity, d) and key position j is read from slot slot_of[j].

    q (S, heads, d) at positions past .. past + S - 1; k_cache, v_cache (kv_heads, capacity, d)
    with rows 0 .. past + S - 1 valid (the new tokens' K and V already written). Query head h
    reads KV head h // (heads // kv_heads). The query at position p sees keys 0 .. p, or
    p - window + 1 .. p when window > 0 (Mistral's sliding_window). Returns out (S, heads, d);
    out may be q (in place).
    """
    q = _array("q", q, (F32,))
    k_cache = _array("k_cache", k_cache, (F32, BF16))
    v_cache = _array("v_cache", v_cache, (k_cache.dtype,))
    slot_stride = 0
    if slot_of is not None:
        slot_of = _array("slot_of", slot_of, (I32,))
        if k_cache.ndim != 4 or k_cache.shape != v_cache.shape:
            raise ValueError(
                "attention: with slot_of the caches are (slots, kv_heads, capacity, d)"
            )
        if slot_of.ndim != 1 or slot_of.size < past + q.shape[0]:
            raise ValueError(f"attention: slot_of needs {past + q.shape[0]} entries")
        used = slot_of[: past + q.shape[0]]
        if used.size and (int(used.min()) < 0 or int(used.max()) >= k_cache.shape[0]):
            raise ValueError(f"attention: slot_of names slots outside 0..{k_cache.shape[0] - 1}")
        slot_stride = k_cache[0].size
        whole_k, whole_v = k_cache, v_cache
        k_cache, v_cache = k_cache[0], v_cache[0]
    if q.ndim != 3 or k_cache.ndim != 3 or k_cache.shape != v_cache.shape:
        raise ValueError(
            f"attention: q {q.shape}, k_cache {k_cache.shape}, v_cache "
            f"{v_cache.shape}; expected q (S, heads, d) and both caches "
            "(kv_heads, capacity, d)"
        )
    tokens, heads, head_dim = q.shape
    kv_heads, capacity, cache_dim = k_cache.shape
    if cache_dim != head_dim or kv_heads == 0 or heads % kv_heads:
        raise ValueError(
            f"attention: q has {heads} heads of {head_dim}, the caches {kv_heads} of {cache_dim}; "
            "head sizes must match and heads be a multiple of kv_heads"
        )
    if past < 0 or past + tokens > capacity:
        raise ValueError(
            f"attention: past {past} + {tokens} new tokens does not fit the cache capacity "
            f"{capacity}; allocate a larger cache"
        )
    if out is None:
        out = np.empty_like(q)
    else:
        out = _out(out, q.shape)
        out_span = _span(out)
        _check_alias(out_span, "q", _span(q), same_ok=True)
        _check_alias(out_span, "k_cache", _span(whole_k if slot_stride else k_cache), False)
        _check_alias(out_span, "v_cache", _span(whole_v if slot_stride else v_cache), False)
    kernel = _C.attention if k_cache.dtype == F32 else _C.attention_bf16
    kernel(
        _ptr(q),
        _ptr(k_cache),
        _ptr(v_cache),
        _ptr(out),
        tokens,
        heads,
        kv_heads,
        head_dim,
        capacity,
        past,
        window,
        scale,
        0 if slot_of is None else _ptr(slot_of),
        slot_stride,
        softcap,
    )
    return out


def gather_slots(cache: torch.Tensor, slot_of: torch.Tensor, total: int) -> torch.Tensor:
    """cache (slots, kv_heads, capacity, d), slot_of (>= total,) -> (kv_heads, total, d): position
    j taken from slot slot_of[j] (a copy: the reference's way to read through the indices)."""
    import torch

    positions = torch.arange(total)
    return cache[slot_of[:total].long(), :, positions].transpose(0, 1)


def attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    past: int,
    scale: float,
    window: int = 0,
    softcap: float = 0.0,
) -> torch.Tensor:
    """The same with repeat_interleave of the KV heads, an explicit mask and torch's softmax
    (and the soft-cap as transformers' Gemma 2 writes it)."""
    import torch

    tokens, heads, _ = q.shape
    kv_heads, total = k_cache.shape[0], past + tokens
    k = k_cache[:, :total].float().repeat_interleave(heads // kv_heads, dim=0)  # (heads, T, d)
    v = v_cache[:, :total].float().repeat_interleave(heads // kv_heads, dim=0)
    scores = torch.einsum("shd,htd->hst", q.float(), k) * scale  # (heads, S, T)
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    query_pos = torch.arange(past, total)[:, None]
    key_pos = torch.arange(total)[None, :]
    visible = key_pos <= query_pos
    if window > 0:
        visible &= key_pos > query_pos - window
    scores = scores.masked_fill(~visible, -math.inf)
    return torch.einsum("hst,htd->shd", torch.softmax(scores, dim=-1), v)
