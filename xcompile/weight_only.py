"""Weight-only INT8 / INT4: neural-compressor's algorithms, repacked into MatMulNBits' layout.

    scheme = WeightOnly(bits=4, group_size=128, sym=True, algo="rtn")
    blocks, scales, zero_points = pack(W, scheme)     # W (N, K) float

RTN is INC's own `quant_tensor` (per tensor: the driver streams, one weight at a time); GPTQ and
AWQ are INC's too, run layer by layer on calibration text (xcompile/calibration.py), and come
back in RTN's integer form for `pack_quantized`. The layout is passes/quantize_nbits.py's (ONNX
Runtime's MatMulNBits).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from xcompile.errors import UserError
from xcompile.passes.quantize_nbits import block_size_for

ALGORITHMS = ("rtn", "gptq", "awq")


@dataclass(frozen=True)
class WeightOnly:
    bits: int  # 8 or 4
    group_size: int  # -1: per output channel
    sym: bool
    algo: str = "rtn"
    calib: Path | None = None  # gptq / awq: text, one sample a line (None: the shipped text)
    quantize_lm_head: bool = False
    # MatMulNBits' accuracy_level: 4 lets the runtime round activations to int8 (VNNI), 0 not
    accuracy_level: int = 4

    def describe(self) -> dict:
        """The manifest's `quant` entry."""
        out = {
            "bits": self.bits,
            "group_size": self.group_size,
            "sym": self.sym,
            "algo": self.algo,
            "lm_head": self.quantize_lm_head,
            "accuracy_level": self.accuracy_level,
        }
        if self.algo != "rtn":
            out["calib"] = self.calib.name if self.calib else "default"
        return out


def scheme_from_flags(
    bits: int | None,
    group_size: int | None,
    sym: bool,
    algo: str | None,
    calib: Path | None,
    quantize_lm_head: bool,
) -> WeightOnly | None:
    """Validate the CLI's quantization flags (UserError naming the fix) -> scheme or None."""
    if bits is None:
        for flag, given in (("--algo", algo), ("--group-size", group_size), ("--calib", calib)):
            if given is not None:
                raise UserError(f"{flag} applies to weight-only quantization; add --int8 or --int4")
        if quantize_lm_head:
            raise UserError("--quantize-lm-head applies to --int8 or --int4; add one")
        return None
    algo = algo or "rtn"
    if algo not in ALGORITHMS:
        raise UserError(f"--algo {algo!r}: choose one of {', '.join(ALGORITHMS)}")
    if group_size is None:
        group_size = -1 if bits == 8 else 128
    if group_size != -1 and (group_size < 16 or group_size & (group_size - 1)):
        raise UserError(
            f"--group-size {group_size}: use a power of two >= 16 (e.g. 32, 128), "
            "or -1 for one group per output channel"
        )
    if calib is not None:
        if algo == "rtn":
            raise UserError("--calib is for --algo gptq or awq (RTN needs no calibration)")
        if not Path(calib).is_file():
            raise UserError(f"--calib {calib}: no such file; give a text file, one sample a line")
        try:
            text = Path(calib).read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            raise UserError(
                f"--calib {calib}: unreadable ({e.strerror}); fix its permissions"
            ) from None
        if not text.strip():
            raise UserError(f"--calib {calib} is empty; give at least one line of text")
    return WeightOnly(bits, group_size, sym, algo, Path(calib) if calib else None, quantize_lm_head)


def _quiet_import_inc():
    from xcompile.quiet import quiet_imports

    with quiet_imports():
        from neural_compressor.torch.algorithms.weight_only.utility import quant_tensor
    return quant_tensor


def quantize_rtn(
    w: torch.Tensor, scheme: WeightOnly
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """INC's round-to-nearest: w (N, K) -> (q (N, K) int, scales (N, groups), zp or None)."""
    quant_tensor = _quiet_import_inc()

    q, scales, zp = quant_tensor(
        w.float().clone(),
        bits=scheme.bits,
        group_size=scheme.group_size,
        scheme="sym" if scheme.sym else "asym",
        return_int=True,
    )
    return q, scales, zp


def pack(
    w: torch.Tensor, scheme: WeightOnly
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """w (N, K) -> MatMulNBits' (B uint8 (N, k_blocks, blob), scales f32 (N, k_blocks),
    zero_points uint8 or None), by INC's RTN."""
    return pack_quantized(*quantize_rtn(w, scheme), scheme)


def pack_quantized(
    q: torch.Tensor, scales: torch.Tensor, zp: torch.Tensor | None, scheme: WeightOnly
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """quantize_rtn's form (q (N, K): signed when symmetric, else in [0, 2^bits); scales and
    zp (N, groups)), whichever algorithm made it -> MatMulNBits' layout, as `pack`."""
    n, k = q.shape
    bits = scheme.bits
    block = block_size_for(scheme.group_size, k)
    k_blocks = -(-k // block)
    q = q.to(torch.int32)
    if scheme.sym:  # INC's signed levels -> ORT's unsigned ones around the implicit 2^(bits-1)
        q = q + (1 << (bits - 1))
    q = q.clamp(0, (1 << bits) - 1).to(torch.uint8)
    padded = torch.zeros(n, k_blocks * block, dtype=torch.uint8)
    padded[:, :k] = q
    if bits == 4:
        pairs = padded.view(n, -1, 2)
        padded = (pairs[..., 0] | (pairs[..., 1] << 4)).contiguous()
    blocks = padded.view(n, k_blocks, block * bits // 8)
    scales = scales.float().reshape(n, -1)
    if scheme.group_size == -1 and scales.shape[1] == 1 and k_blocks > 1:
        # per channel over blocks that divide K (block_size_for): the row's scale, repeated
        scales = scales.expand(n, k_blocks)
        zp = None if zp is None else zp.reshape(n, 1).expand(n, k_blocks)
    if scales.shape[1] != k_blocks:
        raise RuntimeError(
            f"neural-compressor returned {scales.shape[1]} groups, expected {k_blocks}"
        )
    if zp is not None:
        zp = zp.to(torch.int32).clamp(0, (1 << bits) - 1).to(torch.uint8).reshape(n, k_blocks)
        if bits == 4:
            if k_blocks % 2:
                zp = torch.cat([zp, torch.full((n, 1), 8, dtype=torch.uint8)], dim=1)
            pairs = zp.view(n, -1, 2)
            zp = (pairs[..., 0] | (pairs[..., 1] << 4)).contiguous()
    return blocks.contiguous(), scales.contiguous(), zp


def unpack(
    blocks: torch.Tensor,
    scales: torch.Tensor,
    zp: torch.Tensor | None,
    bits: int,
    block: int,
    k: int,
) -> torch.Tensor:
    """The plain reference: MatMulNBits' layout -> W (N, K) float32."""
    n, k_blocks, _ = blocks.shape
    b = blocks.reshape(n, -1)
    if bits == 4:
        b = torch.stack([b & 0xF, b >> 4], dim=-1).reshape(n, -1)
    q = b.reshape(n, k_blocks, block).float()
    if zp is None:
        z = torch.full((n, k_blocks, 1), float(1 << (bits - 1)))
    else:
        z = zp
        if bits == 4:
            z = torch.stack([zp & 0xF, zp >> 4], dim=-1).reshape(n, -1)
        z = z[:, :k_blocks].float().unsqueeze(-1)
    w = (q - z) * scales.reshape(n, k_blocks, 1)
    return w.reshape(n, -1)[:, :k]
