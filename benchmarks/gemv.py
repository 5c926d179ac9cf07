"""Decode GEMV throughput: xcompile._C gemv vs torch's linear, in GB/s of weight read.

Prints figures side by side with torch measured in the same run and with the machine's read
bandwidth (torch.sum over a large fp32 buffer). Weights rotate through copies larger than the
last-level cache, so each call streams its weight from DRAM as a decode step does.

    python benchmarks/gemv.py [--n 5632] [--k 2048] [--m 1] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from bandwidth import read_bandwidth  # benchmarks/bandwidth.py, beside this file

from xcompile.runtime import kernels


def gbps(fn, nbytes: int, seconds: float = 1.0) -> float:
    fn(0)
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        fn(calls)
        calls += 1
    return nbytes * calls / elapsed / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5632)
    parser.add_argument("--k", type=int, default=2048)
    parser.add_argument("--m", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--hot", action="store_true", help="one weight copy, cache-resident if it fits"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kernels.set_num_threads(args.threads)
    n, k, m = args.n, args.k, args.m

    cold_bytes = 128e6  # several times any last-level cache here
    read_bw = read_bandwidth(args.threads)
    print(f"isa={kernels.isa()} threads={args.threads} N={n} K={k} M={m}")
    print(f"{'read bandwidth (bandwidth.py)':32s} {read_bw:6.1f} GB/s")

    x = torch.randn(m, k)
    for dtype in (torch.bfloat16, torch.float32):
        size = n * k * dtype.itemsize
        copies = 1 if args.hot else int(cold_bytes // size) + 1
        ws = [(torch.randn(n, k) / k**0.5).to(dtype) for _ in range(copies)]
        out = torch.empty(m, n)
        x_t = x.to(dtype)
        ours = gbps(lambda i, ws=ws, out=out: kernels.linear(x, ws[i % len(ws)], out=out), size)
        theirs = gbps(lambda i, ws=ws, x_t=x_t: F.linear(x_t, ws[i % len(ws)]), size)
        name = str(dtype).removeprefix("torch.")
        print(f"{'xcompile linear, ' + name:32s} {ours:6.1f} GB/s  ({ours / read_bw:.2f} of read)")
        print(
            f"{'torch linear, ' + name:32s} {theirs:6.1f} GB/s  "
            f"(xcompile/torch {ours / theirs:.2f})"
        )


if __name__ == "__main__":
    main()
