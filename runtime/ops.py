"""ONNX ops as plain torch functions: the reference the execution plan runs on.

Each function takes the node's inputs (torch tensors, None for an omitted optional input) and its
attributes as keywords, and returns its output(s). Only the ops the frontends and passes emit are
here; a graph with another op is refused when the plan is built.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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
    return out.reshape(*x.shape[:axis], *indices.shape, *x.shape[axis + 1 :])


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
