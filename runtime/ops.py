"""ONNX standard ops on numpy arrays: what the execution plan runs for a node no csrc kernel takes.

Each function takes the node's inputs (ndarrays, None for an omitted optional input) and its
attributes as keywords, and returns its output(s) as ndarrays (never numpy scalars), in the dtypes
ONNX gives (opset 18: Slice, ReduceMean, ReduceMax, Squeeze and Unsqueeze take their axes as
inputs). Reshape, Transpose, Slice, Squeeze, Unsqueeze and Expand return views of their input.
The torch references these are held to are runtime/reference_ops.py's OPS.
"""

from __future__ import annotations

import numpy as np

from xcompile.runtime.arrays import BF16, as_ml, from_ml, round_bf16, widen

# ONNX TensorProto.DataType -> numpy dtype
DTYPES = {
    1: np.dtype(np.float32),
    2: np.dtype(np.uint8),
    3: np.dtype(np.int8),
    5: np.dtype(np.int16),
    6: np.dtype(np.int32),
    7: np.dtype(np.int64),
    9: np.dtype(np.bool_),
    10: np.dtype(np.float16),
    11: np.dtype(np.float64),
    16: BF16,  # bfloat16's bits (arrays.py)
}

_WIDE = (np.dtype(np.float32), np.dtype(np.float64))  # float types numpy reduces in place

_CATEGORY = {"b": 0, "u": 1, "i": 1, "f": 2, "V": 2}  # bfloat16 (both kinds) has kind "V"


def _category(dtype: np.dtype) -> int:
    return _CATEGORY.get(dtype.kind, 2)


def _result_dtype(x: np.ndarray, y: np.ndarray) -> np.dtype:
    """torch's promotion of two tensors: a 0-d operand does not widen a dimensioned one of its
    category or above (float32 (S,) * int64 () -> float32, where numpy 2 gives float64)."""
    if x.dtype == y.dtype:
        return x.dtype
    if (x.ndim == 0) != (y.ndim == 0):
        scalar, tensor = (x, y) if x.ndim == 0 else (y, x)
        if _category(scalar.dtype) <= _category(tensor.dtype):
            return tensor.dtype
        return scalar.dtype
    return np.result_type(x, y)


def _binary(ufunc):
    def op(x, y):
        x, y = np.asarray(x), np.asarray(y)
        if x.dtype != y.dtype:
            dtype = _result_dtype(x, y)
            x, y = x.astype(dtype, copy=False), y.astype(dtype, copy=False)
        return np.asarray(ufunc(x, y))

    return op


def _unary(ufunc):
    return lambda x: np.asarray(ufunc(x))


def _axes(a: np.ndarray | None) -> list[int]:
    return [] if a is None else [int(v) for v in np.asarray(a).reshape(-1)]


def div(x, y):
    """Integers: the quotient truncated toward zero (ONNX, C), not floored (numpy's //)."""
    x, y = np.asarray(x), np.asarray(y)
    if x.dtype != y.dtype:
        dtype = _result_dtype(x, y)
        x, y = x.astype(dtype, copy=False), y.astype(dtype, copy=False)
    if x.dtype.kind not in "iu":
        return np.asarray(np.true_divide(x, y))
    q = np.floor_divide(x, y)
    return np.asarray(np.where((q * y != x) & ((x < 0) != (y < 0)), q + 1, q))


def matmul(x, y):
    """(..., M, K) @ (..., K, N) -> (..., M, N) in the inputs' dtype (ml_dtypes' bf16 matmul gives
    fp32)"""
    x, y = np.asarray(x), np.asarray(y)
    dtype = _result_dtype(x, y)
    out = np.matmul(x.astype(dtype, copy=False), y.astype(dtype, copy=False))
    return np.asarray(out).astype(dtype, copy=False)


def pow_(x, y):
    """ONNX Pow: the result has x's type whatever y's is."""
    return np.asarray(np.power(x, np.asarray(y).astype(x.dtype, copy=False)))


def sigmoid(x):
    with np.errstate(over="ignore"):  # exp(-x) overflows to inf for x < -88: 1 / inf = 0
        return np.asarray(1 / (1 + np.exp(-x)))


def erf(x):
    """erf on the csrc kernel (numpy has none): fp32, other float types through fp32."""
    from xcompile import _C

    x = np.asarray(x)
    x32 = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty_like(x32)
    _C.erf_f32(x32.ctypes.data, out.ctypes.data, x32.size)
    return out if x.dtype == np.float32 else out.astype(x.dtype)


def relu(x):
    return np.asarray(np.maximum(x, 0))  # the Python 0 takes x's dtype; NaN stays NaN


def softmax(x, axis=-1):
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return np.asarray(e / np.sum(e, axis=axis, keepdims=True))


def _reduce_axes(x: np.ndarray, dims: list[int], noop_with_empty_axes: int) -> tuple | None:
    if not dims:  # ONNX: no axes reduces every dimension, unless noop_with_empty_axes
        return () if noop_with_empty_axes else None
    return tuple(dims)


def reduce_mean(x, axes_input=None, keepdims=1, axes=None, noop_with_empty_axes=0):
    """opset 18 takes the axes as an input; older opsets as an attribute"""
    dims = _axes(axes_input) if axes_input is not None else list(axes or [])
    axis = _reduce_axes(x, dims, noop_with_empty_axes)
    if axis == ():
        return x
    wide = x if x.dtype in _WIDE else x.astype(np.float32)  # bf16, fp16: summed in fp32
    return np.asarray(np.mean(wide, axis=axis, keepdims=bool(keepdims))).astype(x.dtype, copy=False)


def reduce_max(x, axes_input=None, keepdims=1, noop_with_empty_axes=0):
    """opset 18; no axes: over every dimension (longrope's longest position)"""
    axis = _reduce_axes(x, _axes(axes_input), noop_with_empty_axes)
    if axis == ():
        return x
    return np.asarray(np.max(x, axis=axis, keepdims=bool(keepdims)))


def layer_norm(x, scale, bias=None, axis=-1, epsilon=1e-5):
    """x normalized over its dimensions axis.. (mean 0, biased variance 1), times scale, + bias"""
    dims = tuple(range(axis % x.ndim, x.ndim))
    wide = x if x.dtype in _WIDE else x.astype(np.float32)  # bf16, fp16: normalized in fp32
    centred = wide - np.mean(wide, axis=dims, keepdims=True)
    var = np.mean(centred * centred, axis=dims, keepdims=True)
    y = centred / np.sqrt(var + epsilon) * scale
    y = y if bias is None else y + bias
    return y.astype(x.dtype, copy=False)


def gather(x, indices, axis=0):
    """out (*x.shape[:axis], *indices.shape, *x.shape[axis+1:]); negative indices: from the end"""
    return np.asarray(np.take(x, indices, axis=axis))


def cast(x, to):
    """BF16 in or out through arrays.widen / round_bf16 (exact, to nearest even)."""
    x = np.asarray(x)
    if x.dtype == BF16:
        if to == 16:
            return x
        x = widen(x)
    if to == 16:
        return round_bf16(x.astype(np.float32, copy=False))
    return x.astype(DTYPES[to], copy=False)


def transpose(x, perm=None):
    return np.transpose(x, perm)


def reshape(x, shape, allowzero=0):
    dims = _axes(shape)
    if not allowzero:  # 0 means "copy this dimension of the input"
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return np.reshape(x, dims)


def unsqueeze(x, axes):
    return np.expand_dims(x, tuple(_axes(axes)))  # axes count in the output's rank


def squeeze(x, axes=None):
    if axes is None:
        return np.squeeze(x)
    # as torch's squeeze: an axis whose size is not 1 stays
    dims = tuple(a % x.ndim for a in _axes(axes) if x.shape[a] == 1)
    return np.squeeze(x, axis=dims)


def slice_(x, starts, ends, axes=None, steps=None):
    starts, ends = _axes(starts), _axes(ends)
    axes = _axes(axes) if axes is not None else list(range(len(starts)))
    steps = _axes(steps) if steps is not None else [1] * len(starts)
    index = [slice(None)] * x.ndim
    for s, e, a, st in zip(starts, ends, axes, steps):
        if st > 0:  # Python's clamping is ONNX's here
            index[a] = slice(s, e, st)
            continue
        n = x.shape[a]  # backwards: start clamped to [0, n-1], end to [-1, n-1] (-1: past 0)
        s = max(0, min(n - 1, s + n if s < 0 else s))
        e = max(-1, min(n - 1, e + n if e < 0 else e))
        index[a] = slice(s, None if e < 0 else e, st)
    return x[tuple(index)]


def shape(x, start=0, end=None):
    return np.array(x.shape[start:end], dtype=np.int64)


def range_(start, limit, delta):
    start = np.asarray(start)
    return np.arange(start.item(), np.asarray(limit).item(), np.asarray(delta).item()).astype(
        start.dtype, copy=False
    )


def concat(*xs, axis):
    return np.concatenate(xs, axis=axis)


def where(condition, x, y):
    x, y = np.asarray(x), np.asarray(y)
    dtype = _result_dtype(x, y)
    return np.where(condition, x.astype(dtype, copy=False), y.astype(dtype, copy=False))


def expand(x, shape):
    x = np.asarray(x)
    return np.broadcast_to(x, np.broadcast_shapes(x.shape, tuple(_axes(shape))))


def bf16_arithmetic(op):
    """op computing on ml_dtypes' bfloat16 where an input is BF16 storage (viewed, ml_dtypes
    imported then), its BF16 results viewed back as storage."""

    def run(*args, **attrs):
        if not any(isinstance(a, np.ndarray) and a.dtype == BF16 for a in args):
            return op(*args, **attrs)
        args = [as_ml(a) if isinstance(a, np.ndarray) and a.dtype == BF16 else a for a in args]
        result = op(*args, **attrs)
        return tuple(map(from_ml, result)) if isinstance(result, tuple) else from_ml(result)

    return run


OPS = {
    "Identity": lambda x: x,
    "Gather": gather,
    "Cast": cast,
    "Transpose": transpose,
    "MatMul": matmul,
    "Add": _binary(np.add),
    "Sub": _binary(np.subtract),
    "Mul": _binary(np.multiply),
    "Div": div,
    "Neg": _unary(np.negative),
    "Sqrt": _unary(np.sqrt),
    "Reciprocal": _unary(np.reciprocal),
    "Pow": pow_,
    "Sigmoid": sigmoid,
    "Tanh": _unary(np.tanh),
    "Erf": erf,
    "Relu": relu,
    "Cos": _unary(np.cos),
    "Sin": _unary(np.sin),
    "Softmax": softmax,
    "ReduceMean": reduce_mean,
    "ReduceMax": reduce_max,
    "LayerNormalization": layer_norm,
    "Reshape": reshape,
    "Unsqueeze": unsqueeze,
    "Squeeze": squeeze,
    "Slice": slice_,
    "Concat": concat,
    "Shape": shape,
    "Range": range_,
    "LessOrEqual": _binary(np.less_equal),
    "Greater": _binary(np.greater),
    "GreaterOrEqual": _binary(np.greater_equal),
    "Less": _binary(np.less),
    "Equal": _binary(np.equal),
    "Not": _unary(np.logical_not),
    "And": _binary(np.logical_and),
    "Where": where,
    "Expand": expand,
}

# data movement (indexing, views, Cast's own conversions) takes BF16 storage as it is; the rest
# computes on it through ml_dtypes
_MOVES = {"Identity", "Gather", "Cast", "Transpose", "Reshape", "Unsqueeze", "Squeeze", "Slice"}
_MOVES |= {"Concat", "Shape", "Expand"}
OPS = {name: op if name in _MOVES else bf16_arithmetic(op) for name, op in OPS.items()}
