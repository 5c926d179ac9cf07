"""The Python face of the csrc kernels (xcompile._C), each beside its plain torch reference.

The kernels take raw pointers, so everything that can go wrong with a pointer is checked here:
dtype, device, contiguity and shape, each with a ValueError that says what to pass instead.
The fast path (`rmsnorm`, `linear`) and the reference (`rmsnorm_reference`, `linear_reference`)
compute the same thing; tests/csrc holds every ISA path to the references.
"""

from __future__ import annotations

import torch

from xcompile import _C
from xcompile._C import isa, num_threads, set_isa, set_num_threads, supported_isas

__all__ = [
    "isa",
    "linear",
    "linear_reference",
    "num_threads",
    "rmsnorm",
    "rmsnorm_reference",
    "set_isa",
    "set_num_threads",
    "supported_isas",
]

_LINEAR_WEIGHT_KERNELS = {torch.float32: _C.gemv_f32, torch.bfloat16: _C.gemv_bf16}


def _check(name: str, t: torch.Tensor, dtypes: tuple[torch.dtype, ...]) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"{name} is on {t.device}; xcompile kernels run on CPU tensors only")
    if t.dtype not in dtypes:
        wanted = " or ".join(str(d) for d in dtypes)
        raise ValueError(f"{name} has dtype {t.dtype}; pass {wanted}")
    if not t.is_contiguous():
        raise ValueError(f"{name} is not contiguous; call .contiguous() first")


def _check_out(out: torch.Tensor, shape: tuple[int, ...]) -> None:
    _check("out", out, (torch.float32,))
    if tuple(out.shape) != shape:
        raise ValueError(f"out has shape {tuple(out.shape)}; expected {shape}")


def rmsnorm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    """x (..., C) fp32, weight (C) fp32 -> (..., C) fp32; out may be x itself (in place)."""
    _check("x", x, (torch.float32,))
    _check("weight", weight, (torch.float32,))
    cols = x.shape[-1] if x.dim() else 0
    if x.dim() == 0 or tuple(weight.shape) != (cols,):
        raise ValueError(
            f"rmsnorm: weight has shape {tuple(weight.shape)}, x {tuple(x.shape)}; "
            "weight must be (C,) for x of shape (..., C)"
        )
    if out is None:
        out = torch.empty_like(x)
    else:
        _check_out(out, tuple(x.shape))
    _C.rmsnorm(
        x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.numel() // max(cols, 1), cols, eps
    )
    return out


def rmsnorm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm, fp32."""
    x = x.float()
    variance = x.pow(2).mean(-1, keepdim=True)
    return weight.float() * (x * torch.rsqrt(variance + eps))


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """x (..., K) fp32 @ weight (N, K).T + bias (N) -> (..., N) fp32.

    weight fp32 or bf16 (nn.Linear layout); a bf16 weight is widened to fp32 in registers and
    accumulated in fp32. bias fp32 (a bf16 bias is upcast, N elements). Meant for decode (few rows
    of x): the weight is streamed once for all of them.
    """
    _check("x", x, (torch.float32,))
    _check("weight", weight, tuple(_LINEAR_WEIGHT_KERNELS))
    if weight.dim() != 2 or x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"linear: x {tuple(x.shape)} and weight {tuple(weight.shape)} do not match; "
            "expected x (..., K) and weight (N, K)"
        )
    n, k = weight.shape
    if bias is not None:
        _check("bias", bias, (torch.float32, torch.bfloat16))
        if tuple(bias.shape) != (n,):
            raise ValueError(f"bias has shape {tuple(bias.shape)}; expected ({n},)")
        bias = bias.float()
    shape = (*x.shape[:-1], n)
    if out is None:
        out = torch.empty(shape, dtype=torch.float32)
    else:
        _check_out(out, shape)
        if out.numel() and out.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
            raise ValueError("out shares memory with x; linear cannot run in place")
    if k == 0:  # an empty sum: only the bias remains
        return out.copy_(bias.expand(shape)) if bias is not None else out.zero_()
    _LINEAR_WEIGHT_KERNELS[weight.dtype](
        x.data_ptr(),
        weight.data_ptr(),
        0 if bias is None else bias.data_ptr(),
        out.data_ptr(),
        x.numel() // k,
        n,
        k,
    )
    return out


def linear_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """torch's linear in fp32, with the (possibly bf16) weight and bias upcast exactly."""
    return torch.nn.functional.linear(
        x.float(), weight.float(), None if bias is None else bias.float()
    )
