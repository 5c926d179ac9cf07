"""Decode GEMV on weight-only INT8 / INT4 (MatMulNBits layout) in GB/s of weight bytes read.

Side by side in one run, on one shape (TinyLlama's MLP up/gate: N=5632, K=2048, M=1):
  read bandwidth         torch.sum over a buffer far larger than the last-level cache
  xcompile bf16          kernels.linear on a bf16 weight (csrc/gemv.cpp)
  xcompile int8/channel  kernels.linear_nbits, bits=8, block_size = next power of two >= K, no zp
  xcompile int4/g128     kernels.linear_nbits, bits=4, block_size=128, with zero points
  torch int8pack_mm      torch.ops.aten._weight_int8pack_mm(x, int8 (N, K), fp32 scales (N,)),
                         torch's own weight-only int8 per-channel matmul
Bytes read are the weight's: B + scales (+ zero points), or the bf16 / int8 matrix + scales.
Weights rotate through copies larger than the last-level cache, so each call streams its weight
from DRAM as a decode step does. Print only: nothing here is asserted.

    python benchmarks/gemv_nbits.py [--n 5632] [--k 2048] [--m 1] [--threads 2]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from xcompile.runtime import kernels

COLD_BYTES = 128e6  # several times any last-level cache here


def gbps(fn: Callable[[int], object], nbytes: int, seconds: float = 1.0) -> tuple[float, float]:
    """(GB/s, microseconds per call) of fn(i) over `seconds`, after a warm-up call."""
    fn(0)
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        fn(calls)
        calls += 1
    return nbytes * calls / elapsed / 1e9, elapsed / calls * 1e6


def copies(make: Callable[[], tuple[torch.Tensor, ...]]) -> list[tuple[torch.Tensor, ...]]:
    """Enough independent copies of a weight (a tuple of tensors) to overflow the caches."""
    first = make()
    size = sum(t.nbytes for t in first if t is not None)
    return [first] + [make() for _ in range(int(COLD_BYTES // size))]


def weight_bytes(parts: tuple[torch.Tensor | None, ...]) -> int:
    return sum(t.nbytes for t in parts if t is not None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5632)
    parser.add_argument("--k", type=int, default=2048)
    parser.add_argument("--m", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kernels.set_num_threads(args.threads)
    n, k, m = args.n, args.k, args.m
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=gen)
    out = torch.empty(m, n)

    def dense() -> torch.Tensor:
        return torch.randn(n, k, generator=gen) / k**0.5

    channel = max(16, 1 << (k - 1).bit_length())
    rows: list[tuple[str, Callable[[int], object], int]] = []

    bf16 = copies(lambda: (dense().bfloat16(),))
    rows.append(
        (
            "xcompile bf16",
            lambda i: kernels.linear(x, bf16[i % len(bf16)][0], out=out),
            weight_bytes(bf16[0]),
        )
    )
    for label, bits, block, sym in (
        ("xcompile int8/channel", 8, channel, True),
        ("xcompile int4/g128 (zp)", 4, 128, False),
    ):
        ws = copies(
            lambda b=bits, bs=block, s=sym: kernels.quantize_nbits_reference(dense(), b, bs, s)
        )
        rows.append(
            (
                label,
                lambda i, ws=ws, b=bits, bs=block: kernels.linear_nbits(
                    x, *ws[i % len(ws)], b, bs, k, out=out
                ),
                weight_bytes(ws[0]),
            )
        )

    def int8pack() -> tuple[torch.Tensor, torch.Tensor]:
        w = dense()
        scales = w.abs().amax(dim=1) / 127
        return torch.round(w / scales[:, None]).to(torch.int8), scales

    packed = copies(int8pack)
    rows.append(
        (
            "torch _weight_int8pack_mm",
            lambda i: torch.ops.aten._weight_int8pack_mm(x, *packed[i % len(packed)]),
            weight_bytes(packed[0]),
        )
    )

    stream = torch.ones(int(COLD_BYTES) // 4)
    read_bw, _ = gbps(lambda i: stream.sum(), stream.nbytes)
    print(f"isa={kernels.isa()} threads={args.threads} N={n} K={k} M={m}")
    print(f"{'read bandwidth (torch.sum)':28s} {read_bw:6.1f} GB/s")
    print(f"{'kernel':28s} {'GB/s':>6s} {'of read':>8s} {'us/call':>8s} {'MB read':>8s}")
    for label, fn, nbytes in rows:
        rate, us = gbps(fn, nbytes)
        print(f"{label:28s} {rate:6.1f} {rate / read_bw:8.2f} {us:8.1f} {nbytes / 1e6:8.2f}")


if __name__ == "__main__":
    main()
