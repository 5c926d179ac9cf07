"""The runtime's arrays: numpy ndarrays handed to the csrc kernels as addresses. No torch: the
references alone convert (to_torch / from_torch, torch imported by the caller that asks).

BF16 is held as its bits in a 2-byte opaque dtype (`BF16`, numpy's "V2"): the kernels read it by
address, data movement (gather, reshape, slices) works on it as it is, and any arithmetic on it
fails loudly instead of computing on integers. numpy has no bfloat16; ml_dtypes' takes ~0.55 s to
import (it registers every float8/float4 type), more than the rest of xrun's start-up together,
so it is imported only by the rare op that computes in BF16 (ops.py, `as_ml` / `from_ml`). The
two conversions a run needs are here, exact: `widen` (BF16 -> fp32) and `round_bf16` (fp32 ->
BF16, to nearest even, as torch and the kernels round).
"""

from __future__ import annotations

from typing import Any

import numpy as np

BF16 = np.dtype("V2")  # bfloat16's bits
F32 = np.dtype(np.float32)


def is_bf16(dtype: Any) -> bool:
    """BF16 storage, or ml_dtypes' bfloat16 (told by name: asking imports nothing)."""
    return dtype == BF16 or getattr(dtype, "name", "") == "bfloat16"


def dtype_name(dtype: Any) -> str:
    """numpy's name for a dtype, "bfloat16" for BF16 storage."""
    return "bfloat16" if dtype == BF16 else np.dtype(dtype).name


def widen(a: np.ndarray) -> np.ndarray:
    """BF16 (..., n) -> fp32 (..., n), exactly: the bits shifted into an fp32's high half."""
    wide = a.view(np.uint16).astype(np.uint32)
    wide <<= 16
    return wide.view(np.float32)


def round_bf16(a: np.ndarray) -> np.ndarray:
    """fp32 -> BF16, rounded to nearest even; NaN stays a (quiet) NaN."""
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
    rounded = np.where(np.isnan(a), 0x7FC0, rounded)
    return rounded.astype(np.uint16).view(BF16)


def as_ml(a: np.ndarray) -> np.ndarray:
    """BF16 storage viewed as ml_dtypes' bfloat16 (imported now), for numpy arithmetic."""
    import ml_dtypes

    return a.view(ml_dtypes.bfloat16)


def from_ml(a: Any) -> Any:
    """ml_dtypes' bfloat16 viewed back as BF16 storage; anything else unchanged."""
    if isinstance(a, np.ndarray) and a.dtype.name == "bfloat16":
        return a.view(BF16)
    return a


ALIGN = 64  # bytes: a cache line, an AVX-512 register (numpy itself aligns to 16)


def aligned(shape: tuple[int, ...] | int, dtype: Any = F32, zero: bool = False) -> np.ndarray:
    """An uninitialized (or zeroed) C-contiguous array whose data starts on an ALIGN boundary:
    the kernels' vector loads then never straddle cache lines (numpy aligns to 16 bytes)."""
    dtype = np.dtype(dtype)
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    count = 1
    for d in shape:
        count *= d
    raw = (np.zeros if zero else np.empty)(count * dtype.itemsize + ALIGN, np.uint8)
    skip = -ptr(raw) % ALIGN
    return raw[skip : skip + count * dtype.itemsize].view(dtype).reshape(shape)


def ptr(a: np.ndarray) -> int:
    """Address of a's first element."""
    return a.__array_interface__["data"][0]


def stride(a: np.ndarray, axis: int) -> int:
    """a's stride along `axis` in elements (numpy's are in bytes)."""
    return a.strides[axis] // a.itemsize


def f32(a: np.ndarray) -> np.ndarray:
    """a as contiguous fp32: itself when it is already (no work for a replay to redo), else a
    copy, which the recording step is told of (replay.work)."""
    if a.dtype == F32 and a.flags.c_contiguous:
        return a
    from xcompile.runtime.replay import work

    work()
    return np.ascontiguousarray(a, dtype=F32)


def to_torch(a: Any):
    """An ndarray as a torch tensor sharing its memory (BF16 through an int16 view); anything
    else unchanged. For the torch reference path only."""
    import torch

    if type(a) is not np.ndarray:
        return a
    if is_bf16(a.dtype):
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
    if not a.flags.writeable:  # a mapped, read-only weight: torch warns on those; copy
        a = a.copy()
    return torch.from_numpy(a)


def from_torch(t: Any) -> Any:
    """A torch tensor as an ndarray sharing its memory; anything else (None, tuples of them)
    converted element by element."""
    if isinstance(t, tuple):
        return tuple(from_torch(x) for x in t)
    if type(t).__module__.split(".")[0] != "torch":
        return t
    import torch

    if t.dtype == torch.bfloat16:
        return t.detach().view(torch.int16).numpy().view(BF16)
    return t.detach().numpy()
