"""Decode GEMV throughput: xcompile._C's kernels in GB/s of weight read, beside the machine's read
bandwidth and torch's linear, all measured in the same run.

BF16 weights run on two paths of ours, alternated round by round: `avx512` (bf16 widened to fp32
in registers, then FMA: the path below AVX512_BF16) and this CPU's best ISA (`avx512_bf16`:
vdpbf16ps with x as hi + lo bf16). The read bandwidth (torch.sum over a buffer far larger than
the last-level cache, bandwidth.py) is measured in every round too: the host is shared, and
figures swing from one second to the next, so each is printed as best and median of the rounds.
Weights rotate through copies larger than the last-level cache, so each call streams its weight
from DRAM as a decode step does.

    python benchmarks/gemv.py [--shapes 5632x2048,2048x2048,576x576,1536x576] [--m 1]
                              [--threads 2] [--rounds 5] [--hot]

Default shapes: TinyLlama-1.1B's gate/up (5632 x 2048) and q/o (2048 x 2048); SmolLM2-135M's
q/o (576 x 576) and gate/up (1536 x 576).
"""

from __future__ import annotations

import os

# The copies on huge pages, as xrun keeps a model's weights (runtime/weights.py): on 4 KiB pages
# every page boundary of a stream costs a TLB miss, ~25 % of a decode GEMV's bandwidth here.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # read by torch's allocator at import

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from bandwidth import read_bandwidth  # benchmarks/bandwidth.py, beside this file

from xcompile.runtime import kernels

OLD_ISA = "avx512"  # the BF16 GEMV before vdpbf16ps: widen to fp32, FMA


def gbps(fn, nbytes: int, seconds: float) -> float:
    fn(0)
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        fn(calls)
        calls += 1
    return nbytes * calls / elapsed / 1e9


def measure_shape(n: int, k: int, m: int, args, best_isa: str) -> None:
    cold_bytes = 128e6  # several times any last-level cache here
    x = torch.randn(m, k)
    out = torch.empty(m, n)
    weights = {}
    for dtype in (torch.bfloat16, torch.float32):
        size = n * k * dtype.itemsize
        copies = 1 if args.hot else int(cold_bytes // size) + 1
        weights[dtype] = [(torch.randn(n, k) / k**0.5).to(dtype) for _ in range(copies)]

    def ours(dtype):
        ws = weights[dtype]
        return lambda i: kernels.linear(x, ws[i % len(ws)], out=out)

    def torch_linear(dtype):
        ws, x_t = weights[dtype], x.to(dtype)
        return lambda i: F.linear(x_t, ws[i % len(ws)])

    bf16, f32 = n * k * 2, n * k * 4
    old, new = f"bf16 {OLD_ISA} (widen + FMA)", f"bf16 {best_isa}"
    paths = {  # name: (the kernels' ISA, fn, bytes of weight per call)
        old: (OLD_ISA, ours(torch.bfloat16), bf16),
        new: (best_isa, ours(torch.bfloat16), bf16),
        "bf16 torch linear": (best_isa, torch_linear(torch.bfloat16), bf16),
        f"fp32 {best_isa}": (best_isa, ours(torch.float32), f32),
        "fp32 torch linear": (best_isa, torch_linear(torch.float32), f32),
    }
    read = "read bandwidth (bandwidth.py)"
    figures: dict[str, list[float]] = {read: []}
    for _ in range(args.rounds):  # every path once per round: drift hits them alike
        figures[read].append(read_bandwidth(args.threads, mib=256))
        for name, (isa, fn, nbytes) in paths.items():
            kernels.set_isa(isa)
            figures.setdefault(name, []).append(gbps(fn, nbytes, args.seconds))
    kernels.set_isa(best_isa)
    read_best = max(figures[read])
    print(f"N={n} K={k} M={m}  (GB/s, best | median of {args.rounds} rounds)")
    for name, values in figures.items():
        best, median = max(values), statistics.median(values)
        ratio = "" if name == read else f"  ({best / read_best:.2f} of read, best)"
        print(f"  {name:34s} {best:6.1f} | {median:6.1f}{ratio}")
    ratio_best = max(figures[new]) / max(figures[old])
    ratio_median = statistics.median(figures[new]) / statistics.median(figures[old])
    print(f"  {new} / {OLD_ISA}: {ratio_best:.2f} (best), {ratio_median:.2f} (median)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="5632x2048,2048x2048,576x576,1536x576")
    parser.add_argument("--m", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=0.3, help="per path and round")
    parser.add_argument(
        "--hot", action="store_true", help="one weight copy, cache-resident if it fits"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kernels.set_num_threads(args.threads)
    best_isa = kernels.supported_isas()[-1]
    print(f"isa={kernels.isa()} threads={args.threads} old path={OLD_ISA}")
    for shape in args.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        measure_shape(n, k, args.m, args, best_isa)


if __name__ == "__main__":
    main()
