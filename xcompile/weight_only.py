"""Weight-only INT8 / INT4: neural-compressor's algorithms, repacked into MatMulNBits' layout.

    scheme = WeightOnly(bits=4, group_size=128, sym=True, algo="rtn")
    layout_for = scheme.plan(spec, concat)           # weight -> Layout (bits, group, zero points)
    blocks, scales, zero_points = pack(W, layout)    # W (N, K) float

RTN is INC's own `quant_tensor` (per tensor: the driver streams, one weight at a time), or with
`search` our weighted search of each block's scale and offset (xcompile/rtn_search.py, llama.cpp's
K-quant search); GPTQ and AWQ are INC's, run layer by layer on calibration text
(xcompile/calibration.py), and come back in RTN's integer form for `pack_quantized`. The layout
is passes/quantize_nbits.py's (ONNX Runtime's MatMulNBits).

`mixed` is llama.cpp Q4_K_M's plan in this format: the tensors that hurt most when quantized
(V and the MLP's down projection in the first and last eighth of the layers and every third one
between) and the lm_head (with a tied embedding table, the table too) at 8 bits per channel.
`head8` is Q4_0's: every projection in the main layout, the lm_head (and a tied table) at 8 bits
per channel (llama-quantize gives Q4_0's output tensor 6 bits); `uniform` quantizes the lm_head
only with --quantize-lm-head, in the main layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from xcompile.errors import UserError
from xcompile.passes.quantize_nbits import Layout, block_size_for
from xcompile.rtn_search import by_rows

ALGORITHMS = ("rtn", "gptq", "awq")
LM_HEAD_GROUP = 32
RTN_SLICE = 1 << 22  # weights quantized at once


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
    float_zero_points: bool = False  # asymmetric: offsets in float32 (Q4_1 / K-quant mins)
    search: bool = False  # RTN: search each block's scale (and offset), xcompile/rtn_search.py
    mixed: bool = False  # Q4_K_M's plan (module docstring); lm_head at 8 bits
    head8: bool = False  # every projection in the main layout, lm_head at 8 bits (Q4_0's plan)
    scales: str = "float32"  # block scales stored as float32 or float16 (as llama.cpp's)

    @property
    def layout(self) -> Layout:
        """The main layout: every projection's unless the plan says otherwise."""
        if self.sym:
            zero_points = "none"
        else:
            zero_points = "float" if self.float_zero_points else "uint8"
        return Layout(self.bits, self.group_size, zero_points, self.scales)

    def plan(self, spec, concat: dict[str, list[str]]):
        """-> layout_for(node name, weight name) for passes/quantize_nbits.py. concat: a fused
        weight's parts (the graph's `xcompile.concat`)."""
        main, wide = self.layout, Layout(8, -1, scales=self.scales)
        # an 8-bit lm_head (and tied table): blocks, as Q8_0
        head = Layout(8, LM_HEAD_GROUP, scales=self.scales)
        more = set()
        if self.mixed:
            for i in range(spec.layers):
                if more_bits(i, spec.layers):
                    prefix = spec.names.layer.format(i=i)
                    more |= {f"{prefix}{spec.names.v}.weight", f"{prefix}{spec.names.down}.weight"}

        def layout_for(node_name: str, weight_name: str) -> Layout | None:
            if node_name.startswith("/lm_head/"):
                if self.mixed or self.head8:
                    return head if main.bits < 8 else main
                if not self.quantize_lm_head:
                    return None
                return head if main == wide else main
            if more & set(concat.get(weight_name, [weight_name])):
                return wide
            return main

        return layout_for

    def describe(self) -> dict:
        """The manifest's `quant` entry."""
        out = {
            "bits": self.bits,
            "group_size": self.group_size,
            "sym": self.sym,
            "zero_points": self.layout.zero_points,
            "scales": self.scales,
            "algo": self.algo,
            "search": self.search,
            "plan": "mixed" if self.mixed else "head8" if self.head8 else "uniform",
            "lm_head": self.quantize_lm_head or self.mixed or self.head8,
            "accuracy_level": self.accuracy_level,
        }
        if self.algo != "rtn":
            out["calib"] = self.calib.name if self.calib else "default"
        return out


def more_bits(i: int, layers: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth of the layers, every third between."""
    return i < layers // 8 or i >= 7 * layers // 8 or (i - layers // 8) % 3 == 2


def scheme_from_flags(
    bits: int | None,
    group_size: int | None,
    sym: bool | None,
    algo: str | None,
    calib: Path | None,
    quantize_lm_head: bool | None,
    zero_points: str | None = None,
    search: bool | None = None,
    plan: str | None = None,
    scales: str | None = None,
) -> WeightOnly | None:
    """Validate the CLI's quantization flags (UserError naming the fix) -> scheme or None.
    Defaults: --int8 per channel, symmetric, INC's RTN, every projection alike, the lm_head too
    (in blocks of 32, as Q8_0: quantize_lm_head None means on for 8 bits); --int4 the
    best recipe measured (benchmarks/quality.py): groups of 32 with float offsets, searched
    scales, the mixed plan. Block scales in float16 for both (as llama.cpp's Q8_0 / Q4_0)."""
    if bits is None:
        given = (
            ("--algo", algo),
            ("--group-size", group_size),
            ("--calib", calib),
            ("--sym/--asym", sym),
            ("--zero-points", zero_points),
            ("--search/--no-search", search),
            ("--plan", plan),
            ("--scales", scales),
        )
        for flag, value in given:
            if value is not None:
                raise UserError(f"{flag} applies to weight-only quantization; add --int8 or --int4")
        if quantize_lm_head is not None:
            flag = "--quantize-lm-head" if quantize_lm_head else "--no-quantize-lm-head"
            raise UserError(f"{flag} applies to --int8 or --int4; add one")
        return None
    algo = algo or "rtn"
    if algo not in ALGORITHMS:
        raise UserError(f"--algo {algo!r}: choose one of {', '.join(ALGORITHMS)}")
    if group_size is None:
        group_size = -1 if bits == 8 else 32
    if group_size != -1 and (group_size < 16 or group_size & (group_size - 1)):
        raise UserError(
            f"--group-size {group_size}: use a power of two >= 16 (e.g. 32, 128), "
            "or -1 for one group per output channel"
        )
    if zero_points not in (None, "uint8", "float"):
        raise UserError(f"--zero-points {zero_points}: choose uint8 or float")
    if zero_points is not None and sym:
        raise UserError("--zero-points is for --asym blocks; drop --sym or --zero-points")
    if sym is None:
        sym = bits == 8 and zero_points is None
    if scales not in (None, "float16", "float32"):
        raise UserError(f"--scales {scales}: choose float16 or float32")
    if plan not in (None, "mixed", "uniform", "head8"):
        raise UserError(f"--plan {plan}: choose mixed, uniform or head8")
    plan = plan or ("mixed" if bits == 4 else "uniform")
    if quantize_lm_head is None:
        quantize_lm_head = bits == 8
    if plan in ("mixed", "head8") and bits == 8:
        raise UserError(
            f"--plan {plan} keeps some tensors at 8 bits; it is for --int4 "
            "(with --int8, --quantize-lm-head quantizes lm_head)"
        )
    if zero_points == "float" and bits == 8:
        raise UserError("--zero-points float is for --int4 (8-bit blocks take uint8 offsets)")
    search = bits == 4 if search is None else search
    if search and not sym and (zero_points == "uint8" or bits == 8):
        raise UserError("--search fits float offsets or symmetric blocks; add --no-search")
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
    if zero_points is None and not sym:
        zero_points = "float" if bits == 4 else "uint8"
    return WeightOnly(
        bits,
        group_size,
        sym,
        algo,
        Path(calib) if calib else None,
        quantize_lm_head,
        # float offsets where ONNX Runtime takes them (4 bits; its 8-bit kernel wants uint8)
        float_zero_points=zero_points == "float",
        search=search,
        mixed=plan == "mixed",
        head8=plan == "head8",
        scales=scales or "float16",
    )


def _quiet_import_inc():
    from xcompile.quiet import quiet_imports

    with quiet_imports():
        from neural_compressor.torch.algorithms.weight_only.utility import quant_tensor
    return quant_tensor


def layout_of(entry: dict) -> Layout:
    """A weight's Layout from its `xcompile.nbits` entry (the quantize pass's plan)."""
    zero_points = entry.get("zero_points", "none" if entry["sym"] else "uint8")
    return Layout(entry["bits"], entry["group_size"], zero_points, entry.get("scales", "float32"))


def as_layout(layout) -> Layout:
    """A Layout, or a WeightOnly scheme's main layout."""
    return layout.layout if isinstance(layout, WeightOnly) else layout


def quantize_rtn(
    w: torch.Tensor, layout: Layout | WeightOnly, search: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Round-to-nearest: w (N, K) -> (q (N, K) int, scales (N, groups), zp or None).
    search: our weighted search of each 4-bit block's scale (rtn_search.py); else INC's RTN.
    INC has no float offsets: those come from rtn_search.py (min/max, or searched)."""
    layout = as_layout(layout)
    if w.numel() > RTN_SLICE:  # rows are independent: slices keep INC's copies small (a 1.1B
        # model's 65M-weight lm_head made a 0.6 GB spike at the end of a compile)
        return by_rows(w, RTN_SLICE, quantize_rtn, layout, search)
    # 8-bit blocks keep INC's RTN: a 4-bit block's step is 16x coarser, where the search pays
    if layout.zero_points == "float" or (search and layout.sym and layout.bits < 8):
        from xcompile.rtn_search import quantize_searched

        return quantize_searched(w, layout.bits, layout.group_size, layout.zero_points, search)
    quant_tensor = _quiet_import_inc()
    q, scales, zp = quant_tensor(
        w.float().clone(),
        bits=layout.bits,
        group_size=layout.group_size,
        scheme="sym" if layout.sym else "asym",
        return_int=True,
    )
    return q, scales, zp


def pack(
    w: torch.Tensor, layout: Layout | WeightOnly, search: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """w (N, K) -> MatMulNBits' (B uint8 (N, k_blocks, blob), scales (N, k_blocks) as the
    layout stores them (f32 or f16),
    zero_points uint8, f32 or None), by RTN (quantize_rtn); a slice of rows at a time, so
    that no whole-tensor int32 copy is made."""

    def packed(rows: torch.Tensor):
        return pack_quantized(*quantize_rtn(rows, layout, search), layout)

    return by_rows(w, RTN_SLICE, packed)


def pack_quantized(
    q: torch.Tensor,
    scales: torch.Tensor,
    zp: torch.Tensor | None,
    layout: Layout | WeightOnly,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """quantize_rtn's form (q (N, K): signed when symmetric, else in [0, 2^bits); scales and
    zp (N, groups), zp uint8 levels or float offsets), whichever algorithm made it ->
    MatMulNBits' layout, as `pack`."""
    layout = as_layout(layout)
    n, k = q.shape
    bits = layout.bits
    block = block_size_for(layout.group_size, k)
    k_blocks = -(-k // block)
    q = q.to(torch.int32)
    if layout.sym:  # signed levels -> ORT's unsigned ones around the implicit 2^(bits-1)
        q = q + (1 << (bits - 1))
    q = q.clamp(0, (1 << bits) - 1).to(torch.uint8)
    padded = torch.zeros(n, k_blocks * block, dtype=torch.uint8)
    padded[:, :k] = q
    if bits == 4:
        pairs = padded.view(n, -1, 2)
        padded = (pairs[..., 0] | (pairs[..., 1] << 4)).contiguous()
    blocks = padded.view(n, k_blocks, block * bits // 8)
    scales = scales.float().reshape(n, -1)
    if layout.group_size == -1 and scales.shape[1] == 1 and k_blocks > 1:
        # per channel over blocks that divide K (block_size_for): the row's scale, repeated
        scales = scales.expand(n, k_blocks)
        zp = None if zp is None else zp.reshape(n, 1).expand(n, k_blocks)
    if scales.shape[1] != k_blocks:
        raise RuntimeError(f"the quantizer returned {scales.shape[1]} groups, expected {k_blocks}")
    if layout.scales == "float16":
        scales = to_half(scales)
    if zp is not None and layout.zero_points == "float":
        zp = zp.float().reshape(n, k_blocks).contiguous()
        if layout.scales == "float16":  # offsets stored as the scales are (Q4_1's fp16 min)
            zp = to_half(zp)
    elif zp is not None:
        zp = zp.to(torch.int32).clamp(0, (1 << bits) - 1).to(torch.uint8).reshape(n, k_blocks)
        if bits == 4:
            if k_blocks % 2:
                zp = torch.cat([zp, torch.full((n, 1), 8, dtype=torch.uint8)], dim=1)
            pairs = zp.view(n, -1, 2)
            zp = (pairs[..., 0] | (pairs[..., 1] << 4)).contiguous()
    return blocks.contiguous(), scales.contiguous(), zp


def to_half(values: torch.Tensor) -> torch.Tensor:
    """Block scales (or float offsets, in levels) rounded to float16 (to nearest), refused past
    its range (65504): a block of weights beyond ~4.6e5 at 4 bits, none a trained model has."""
    big = values.abs().max().item() if values.numel() else 0.0
    if big > torch.finfo(torch.float16).max:
        raise UserError(
            f"a block scale or offset of {big:.4g} does not fit float16; "
            "quantize with --scales float32"
        )
    return values.to(torch.float16)


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
    elif zp.is_floating_point():  # float offsets: (N, k_blocks), not packed
        z = zp.reshape(n, k_blocks, 1).float()
    else:
        z = zp
        if bits == 4:
            z = torch.stack([zp & 0xF, zp >> 4], dim=-1).reshape(n, -1)
        z = z[:, :k_blocks].float().unsqueeze(-1)
    w = (q - z) * scales.float().reshape(n, k_blocks, 1)
    return w.reshape(n, -1)[:, :k]
