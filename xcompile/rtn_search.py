"""Round-to-nearest with a searched scale (and offset) per block: llama.cpp's K-quant search.

Plain RTN takes a block's scale from its extremes (max |w| / 7, or (max - min) / 15), so one
outlier sets the step for all 32 or 128 weights. Here each block tries 21 scales around that one;
for each, the levels L = round(w / scale) are fixed and the scale (and offset) refitted by
weighted least squares, keeping the fit with the least weighted squared error
    err = sum_k  imp[k] * (scale * L[k] + offset - w[k])^2
(llama.cpp's make_qkx2_quants for "scale and min" blocks, make_qx_quants for symmetric ones).
The importance imp defaults to llama.cpp's data-free choice, rms(block) + |w|: large weights count
more, none counts for nothing. It is data-free: no calibration text, one weight at a time.

    q, scales, zero_points = quantize_searched(W, bits, group_size, zero_points)
    W (N, K) float  ->  q (N, K): unsigned levels [0, 2^bits) (float offsets, "float") or signed
    [-2^(bits-1), 2^(bits-1)) ("none"); scales (N, groups) f32; zero_points (N, groups) f32 or None
    W ~= (q - zero_points) * scales, per block (symmetric: q * scales)
"""

from __future__ import annotations

import torch

STEPS = 20  # candidate scales: nmax + (-1 + 0.1 i), i = 0..20, as llama.cpp's Q4_K search
CHUNK = 1 << 18  # weights searched at once (1 MB of fp32: the fastest here, ~2x the whole)


def by_rows(w: torch.Tensor, weights: int, quantize, *args):
    """quantize(w, *args) -> a tuple of (rows, ...) tensors or None, run on slices of about
    `weights` weights of w's rows (rows quantize independently) and concatenated back."""
    rows = max(1, weights // max(w.shape[1], 1))
    parts = [quantize(w[i : i + rows], *args) for i in range(0, w.shape[0], rows)]
    if len(parts) == 1:
        return parts[0]
    return tuple(None if p[0] is None else torch.cat(p) for p in zip(*parts))


def _blocks(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """w (N, K) -> blocks (N * groups, g) f32, a mask (padding of a partial last block is 0),
    and g. group_size -1: one block per row."""
    n, k = w.shape
    g = k if group_size == -1 else group_size
    groups = -(-k // g)
    padded = torch.zeros(n, groups * g, dtype=torch.float32)
    padded[:, :k] = w
    mask = torch.zeros(n, groups * g, dtype=torch.float32)
    mask[:, :k] = 1
    if groups * g > k:  # padding takes the block's first weight: it moves neither extreme
        first = padded[:, (groups - 1) * g : (groups - 1) * g + 1]
        padded[:, k:] = first
    return padded.view(-1, g), mask.view(-1, g), g


def importance(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """llama.cpp's data-free weights for the fit: rms of the block + |w| (x (B, g))."""
    count = mask.sum(1, keepdim=True).clamp_min(1)
    rms = ((x * x * mask).sum(1, keepdim=True) / count).sqrt()
    return (rms + x.abs()) * mask


@torch.no_grad()
def quantize_searched(
    w: torch.Tensor, bits: int, group_size: int, zero_points: str, search: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """See the module docstring. zero_points: "float" (scale and offset) or "none".
    search False: the plain scale from the block's extremes (min/max; symmetric max |w| / 2^(b-1)
    on the side of the largest magnitude), no fit."""
    steps = STEPS if search else -1
    n, k = w.shape
    if n * k > CHUNK:  # the search's temporaries stay in cache, not GBs
        return by_rows(w, CHUNK, quantize_searched, bits, group_size, zero_points, search)
    x, mask, g = _blocks(w.float(), group_size)
    imp = importance(x, mask)
    if zero_points == "float":
        q, scale, offset = _search_offset(x, imp, (1 << bits) - 1, steps)
        zp = torch.where(scale != 0, -offset / scale.where(scale != 0, 1.0), 0.0)
        q = q.view(n, -1)[:, :k].to(torch.uint8)
        return q, scale.view(n, -1), zp.view(n, -1)
    if zero_points == "none":
        q, scale = _search_symmetric(x, imp, 1 << (bits - 1), steps)
        return q.view(n, -1)[:, :k].to(torch.int8), scale.view(n, -1), None
    raise ValueError(f"searched RTN stores float offsets or none, not {zero_points}")


def _search_offset(x, imp, nmax: int, steps: int):
    """x, imp (B, g) -> levels (B, g) in [0, nmax], scale (B, 1), offset (B, 1)."""
    lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
    span = hi - lo
    flat = span == 0
    span = span.where(~flat, 1.0)
    best_scale, best_offset = span / nmax, lo
    best_err = _error(x, imp, _levels(x, best_scale, best_offset, 0, nmax), best_scale, best_offset)
    sw, sx = imp.sum(1, keepdim=True), (imp * x).sum(1, keepdim=True)
    sxx = (imp * x * x).sum(1, keepdim=True)
    for i in range(steps + 1):
        levels = ((x - lo) * ((nmax - 1.0 + 0.1 * i) / span)).round().clamp(0, nmax)
        sl = (imp * levels).sum(1, keepdim=True)
        sl2 = (imp * levels * levels).sum(1, keepdim=True)
        sxl = (imp * levels * x).sum(1, keepdim=True)
        det = sw * sl2 - sl * sl
        ok = det > 0
        det = det.where(ok, 1.0)
        scale = (sw * sxl - sx * sl) / det
        offset = (sl2 * sx - sl * sxl) / det
        ok &= scale > 0
        # sum imp (scale L + offset - x)^2, from the sums already made (no pass over x)
        err = (
            scale * scale * sl2 + 2 * scale * offset * sl - 2 * scale * sxl
            + offset * offset * sw - 2 * offset * sx + sxx
        )  # fmt: skip
        better = ok & (err < best_err)
        best_err = err.where(better, best_err)
        best_scale = scale.where(better, best_scale)
        best_offset = offset.where(better, best_offset)
    best_scale = best_scale.where(~flat, 1.0)  # a flat block: every level 0, offset its value
    levels = _levels(x, best_scale, best_offset, 0, nmax)
    return levels, best_scale, best_offset


def _search_symmetric(x, imp, half: int, steps: int):
    """x, imp (B, g) -> signed levels (B, g) in [-half, half), scale (B, 1). As llama.cpp's
    make_qx_quants: the block's largest-magnitude weight maps near -half (the one-sided extra
    level), scales around it tried and refitted."""
    idx = x.abs().argmax(1, keepdim=True)
    peak = x.gather(1, idx)
    flat = peak == 0
    peak = peak.where(~flat, 1.0)
    best_scale = torch.zeros_like(peak)
    best_err = torch.full_like(peak, float("inf"))
    sxx = (imp * x * x).sum(1, keepdim=True)
    for i in range(-9, 10) if steps >= 0 else [0]:
        levels = (x * (-(half + 0.1 * i) / peak)).round().clamp(-half, half - 1)
        sl2 = (imp * levels * levels).sum(1, keepdim=True)
        sxl = (imp * levels * x).sum(1, keepdim=True)
        ok = sl2 > 0
        scale = sxl / sl2.where(ok, 1.0)
        if steps < 0:  # the plain scale: max |w| on the level -half
            scale = peak / -half
        err = scale * scale * sl2 - 2 * scale * sxl + sxx  # sum imp (scale L - x)^2
        better = ok & (err < best_err)
        best_err = err.where(better, best_err)
        best_scale = scale.where(better, best_scale)
    best_scale = best_scale.where((best_scale != 0) & ~flat, 1.0)
    levels = (x / best_scale).round().clamp(-half, half - 1)
    return levels, best_scale


def _levels(x, scale, offset, low: int, high: int) -> torch.Tensor:
    return ((x - offset) / scale).round().clamp(low, high)


def _error(x, imp, levels, scale, offset) -> torch.Tensor:
    return (imp * (scale * levels + offset - x) ** 2).sum(1, keepdim=True)
