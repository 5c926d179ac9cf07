"""The runtime's arrays: numpy ndarrays, BF16 as ml_dtypes.bfloat16, handed to the csrc kernels as
addresses. No torch: the references alone convert (to_torch / from_torch, torch imported by the
caller that asks)."""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np

BF16 = np.dtype(ml_dtypes.bfloat16)
F32 = np.dtype(np.float32)


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
    if a.dtype == BF16:
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
        return t.detach().contiguous().view(torch.int16).numpy().view(BF16)
    return t.detach().numpy()
