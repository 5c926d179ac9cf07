"""A prompt's matmul on narrow weights, variant by variant: the choices prefill has for
x (M, K) fp32 @ W (N, K).T with W in BF16 or INT8, on the 1.1B model's projection shapes.

    python benchmarks/prompt_matmul.py [--rows 128] [--threads 2] [--rounds 3]
                                       [--onednn PATH/libdnnl.so.3] [--no-int8]

GFLOP/s (2 M N K per call), best of --rounds rounds, each round running every variant in turn
(--repeats calls each, the fastest kept) so that the shared host's drift hits them alike.
  BF16  1 widen the whole weight to fp32, torch's GEMM      (the runtime before panels)
        2 xcompile's GEMV kernel on every row, avx512        (the decode kernel, stretched)
        3 widen 256 rows at a time, numpy's GEMM per panel  (fused_ops.paneled_linear: the
                                                              runtime below avx512_bf16)
        4 AMX tiles, x as hi + lo bf16                        (gemm_bf16_tiles; CPUs with AMX)
        5 vdpbf16ps GEMM, x as hi + lo bf16                   (gemm_bf16_dp; AVX512_BF16: the
                                                              runtime from avx512_bf16 on)
  references, same shapes:
        torch fp32   F.linear on fp32 x and the fp32 weight (widened once, outside the timing)
        torch bf16   F.linear on bf16 x and W (x rounded once: llama.cpp's accuracy, not ours)
        oneDNN fp32 / bf16   oneDNN's matmul on the same operands (--onednn, benchmarks/onednn.py)
  INT8  1 dequantize the whole weight, torch's GEMM          (no int8 activations)
        2 dequantize 256 rows at a time, numpy's GEMM        (the runtime without VNNI)
        3 int8 activations, VNNI                              (accuracy_level 4: the runtime)
        4 int8 activations, AMX tiles                         (gemm_nbits_q8_tiles; CPUs with AMX)

Peak of this host (2 Zen 4 cores): vdpbf16ps issues one 512-bit instruction a cycle per core,
64 bf16 FLOP; x as hi + lo takes two, so 32 fp32-accurate FLOP a cycle per core, what fp32 FMA
gives (two 256-bit FMA pipes). --clock-ghz prints the variants as fractions of that.
Print only: nothing here is asserted.
"""

from __future__ import annotations

import argparse
import ctypes
import time
from collections.abc import Callable

import torch
from onednn import OneDnn  # benchmarks/onednn.py, beside this file

from xcompile import _C
from xcompile.runtime import fused_ops, kernels
from xcompile.runtime.arrays import from_torch, widen

# (N, K) of TinyLlama-1.1B's projections: q and o, k and v, fused gate/up, down
SHAPES = [(2048, 2048), (256, 2048), (11264, 2048), (2048, 5632)]


def seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def on_isa(isa: str, fn: Callable[[], object]) -> Callable[[], object]:
    def run() -> None:
        before = _C.isa()
        _C.set_isa(isa)
        try:
            fn()
        finally:
            _C.set_isa(before)

    return run


def bf16_variants(
    x: torch.Tensor, w: torch.Tensor, onednn: OneDnn | None
) -> dict[str, Callable[[], object]]:
    m, k = x.shape
    n = w.shape[0]
    out, buffers = torch.empty(m, n), fused_ops.OutputBuffers()
    x16, w32 = x.bfloat16(), w.float()
    xn, wn = from_torch(x), from_torch(w)  # the runtime's arrays: numpy, BF16 as its bits
    variants = {
        "1 widen all + torch": lambda: torch.nn.functional.linear(x, w.float()),
        "2 GEMV kernel": on_isa(
            "avx512", lambda: _C.gemv_bf16(x.data_ptr(), w.data_ptr(), 0, out.data_ptr(), m, n, k)
        ),
        "3 panels + numpy": lambda: fused_ops.paneled_linear(
            xn, n, lambda n0, n1, p: p.__setitem__(..., widen(wn[n0:n1])), buffers
        ),
    }
    if _C.amx_usable():
        variants["4 AMX tiles"] = lambda: _C.gemm_bf16_tiles(
            x.data_ptr(), w.data_ptr(), 0, out.data_ptr(), m, n, k, False
        )
    if _C.dpbf16_usable():
        variants["5 vdpbf16ps"] = lambda: _C.gemm_bf16_dp(
            x.data_ptr(), w.data_ptr(), 0, out.data_ptr(), m, n, k, False
        )
    variants["torch fp32"] = lambda: torch.nn.functional.linear(x, w32)
    variants["torch bf16"] = lambda: torch.nn.functional.linear(x16, w)
    if onednn is not None:
        variants["oneDNN fp32"] = onednn.matmul(x, w32, torch.empty(m, n))
        variants["oneDNN bf16"] = onednn.matmul(x16, w, torch.empty(m, n))
    return variants


def int8_variants(x: torch.Tensor, n: int) -> dict[str, Callable[[], object]]:
    m, k = x.shape
    block = 128
    B = torch.randint(0, 256, (n, k // block, block), dtype=torch.uint8)
    scales = torch.rand(n, k // block) / (64 * k**0.5)
    out, buffers = torch.empty(m, n), fused_ops.OutputBuffers()
    p = B.data_ptr(), scales.data_ptr()
    dequantize = fused_ops.dequantize_panels(B.numpy(), scales.numpy(), None, n, k, 8, block)

    variants = {
        "1 dequantize all + torch": lambda: torch.nn.functional.linear(
            x, kernels.dequantize_nbits(B, scales, None, 8, block, k)
        ),
        "2 panels + numpy": lambda: fused_ops.paneled_linear(x.numpy(), n, dequantize, buffers),
        "3 int8 x, VNNI": lambda: _C.gemv_nbits_q8(
            x.data_ptr(), *p, 0, False, 0, out.data_ptr(), m, n, k, 8, block
        ),
    }
    if _C.amx_usable():
        variants["4 int8 x, AMX tiles"] = lambda: _C.gemm_nbits_q8_tiles(
            x.data_ptr(), *p, 0, False, 0, out.data_ptr(), m, n, k, 8, block, False
        )
    return variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=128, help="rows of x (prompt tokens)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--onednn", help="oneDNN's libdnnl.so.3 (see benchmarks/onednn.py)")
    parser.add_argument("--no-int8", action="store_true", help="BF16 weights only")
    parser.add_argument("--clock-ghz", type=float, help="core clock, for fractions of peak")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kernels.set_num_threads(args.threads)
    onednn = None
    if args.onednn:
        ctypes.CDLL("libgomp.so.1").omp_set_num_threads(args.threads)  # oneDNN's OpenMP pool
        onednn = OneDnn(args.onednn)
    peak = 32 * args.threads * args.clock_ghz if args.clock_ghz else None
    print(f"isa={kernels.isa()} amx={_C.amx_usable()} threads={args.threads} rows={args.rows}")
    print(
        f"GFLOP/s, best of {args.rounds} rounds" + (f"; (fraction of {peak:.0f})" if peak else "")
    )
    for n, k in SHAPES:
        x = torch.randn(args.rows, k)
        w = (torch.randn(n, k) / k**0.5).to(torch.bfloat16)
        flops = 2 * args.rows * n * k
        groups = {"BF16": bf16_variants(x, w, onednn)}
        if not args.no_int8:
            groups["INT8"] = int8_variants(x, n)
        best: dict[str, float] = {}
        for _ in range(args.rounds):
            for variants in groups.values():
                for name, fn in variants.items():
                    rate = flops / seconds(fn, args.repeats) / 1e9
                    best[name] = max(best.get(name, 0.0), rate)
        line = [f"N={n} K={k}:"]
        for kind, variants in groups.items():
            line.append(f"\n  {kind}")
            for name in variants:
                share = f" ({best[name] / peak:.2f})" if peak else ""
                line.append(f" [{name}] {best[name]:.0f}{share}")
        print("".join(line))


if __name__ == "__main__":
    main()
