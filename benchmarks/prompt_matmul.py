"""A prompt's matmul on narrow weights, variant by variant: the choices prefill has for
x (M, K) fp32 @ W (N, K).T with W in BF16 or INT8, on the 1.1B model's projection shapes.

    python benchmarks/prompt_matmul.py [--rows 128] [--threads 2]

Numbered variants, GFLOP/s (best of --repeats), beside torch's own BF16 matmul (oneDNN: AMX where
the CPU has it) on the same shapes as the reference:
  BF16  1 widen the whole weight to fp32, torch's GEMM      (the runtime before panels)
        2 xcompile's GEMV kernel on every row                (the decode kernel, stretched)
        3 widen 256 rows at a time, torch's GEMM per panel  (fused_ops.paneled_linear: the runtime)
        4 AMX tiles, x as hi + lo bf16                        (gemm_bf16_tiles; CPUs with AMX)
  INT8  1 dequantize the whole weight, torch's GEMM          (no int8 activations)
        2 dequantize 256 rows at a time, torch's GEMM        (the runtime without VNNI)
        3 int8 activations, VNNI                              (accuracy_level 4: the runtime)
        4 int8 activations, AMX tiles                         (gemm_nbits_q8_tiles; CPUs with AMX)
Print only: nothing here is asserted.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from xcompile import _C
from xcompile.runtime import fused_ops, kernels

# (N, K) of TinyLlama-1.1B's projections: fused QKV, o, fused gate/up, down
SHAPES = [(2560, 2048), (2048, 2048), (11264, 2048), (2048, 5632)]


def seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bf16_variants(x: torch.Tensor, w: torch.Tensor) -> dict[str, Callable[[], object]]:
    m, k = x.shape
    n = w.shape[0]
    out, buffers = torch.empty(m, n), fused_ops.OutputBuffers()
    variants = {
        "1 widen all + torch": lambda: torch.nn.functional.linear(x, w.float()),
        "2 GEMV kernel": lambda: _C.gemv_bf16(
            x.data_ptr(), w.data_ptr(), 0, out.data_ptr(), m, n, k
        ),
        "3 panels + torch": lambda: fused_ops.paneled_linear(
            x, n, lambda n0, n1, p: p.copy_(w[n0:n1]), buffers
        ),
    }
    if _C.amx_usable():
        variants["4 AMX tiles"] = lambda: _C.gemm_bf16_tiles(
            x.data_ptr(), w.data_ptr(), 0, out.data_ptr(), m, n, k, False
        )
    return variants


def int8_variants(x: torch.Tensor, n: int) -> dict[str, Callable[[], object]]:
    m, k = x.shape
    block = 128
    B = torch.randint(0, 256, (n, k // block, block), dtype=torch.uint8)
    scales = torch.rand(n, k // block) / (64 * k**0.5)
    out, buffers = torch.empty(m, n), fused_ops.OutputBuffers()
    p = B.data_ptr(), scales.data_ptr()
    dequantize = fused_ops.dequantize_panels(B, scales, None, n, k, 8, block)

    variants = {
        "1 dequantize all + torch": lambda: torch.nn.functional.linear(
            x, kernels.dequantize_nbits(B, scales, None, 8, block, k)
        ),
        "2 panels + torch": lambda: fused_ops.paneled_linear(x, n, dequantize, buffers),
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
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kernels.set_num_threads(args.threads)
    print(f"isa={kernels.isa()} amx={_C.amx_usable()} threads={args.threads} rows={args.rows}")
    print("GFLOP/s; torch bf16: torch.matmul on bf16 x and W, the reference")
    for n, k in SHAPES:
        x = torch.randn(args.rows, k)
        w = (torch.randn(n, k) / k**0.5).to(torch.bfloat16)
        flops = 2 * args.rows * n * k
        x16 = x.to(torch.bfloat16)
        reference = flops / seconds(lambda a=x16, b=w: torch.matmul(a, b.T), args.repeats) / 1e9
        line = [f"N={n} K={k}: torch bf16 {reference:.0f} |"]
        for kind, variants in (("BF16", bf16_variants(x, w)), ("INT8", int8_variants(x, n))):
            line.append(f" {kind}")
            for name, fn in variants.items():
                line.append(f" [{name}] {flops / seconds(fn, args.repeats) / 1e9:.0f}")
        print("".join(line))


if __name__ == "__main__":
    main()
