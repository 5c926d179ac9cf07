"""Decode GEMV on weight-only INT8 / INT4 (MatMulNBits layout) in GB/s of weight bytes read.

Side by side in one run, on one shape (TinyLlama's MLP up/gate: N=5632, K=2048, M=1):
  read bandwidth         benchmarks/bandwidth.py: torch.sum over 1 GiB, best of 5
  xcompile bf16          kernels.linear on a bf16 weight (csrc/gemv.cpp)
  xcompile int8/channel  kernels.linear_nbits, bits=8, per-channel scales (block_size_for), no zp
  xcompile int4/g128     kernels.linear_nbits, bits=4, block_size=128, with zero points (uint8,
                         two per byte; or float32, one per block: llama.cpp Q4_1's min and scale)
  ... q8                 the same on int8-quantized activations (accuracy_level 4: AVX512_VNNI
                         where the CPU has it, else the scalar reference)
  torch int8pack_mm      torch.ops.aten._weight_int8pack_mm(x, int8 (N, K), fp32 scales (N,)),
                         torch's own weight-only int8 per-channel matmul
Bytes read are the weight's: B + scales (+ zero points), or the bf16 / int8 matrix + scales.
Weights rotate through copies larger than the last-level cache, so each call streams its weight
from DRAM as a decode step does; each figure is the best of --rounds passes over the copies.
Print only: nothing here is asserted.

    python benchmarks/gemv_nbits.py [--n 5632] [--k 2048] [--m 1] [--threads 2]

With --blocks B (the --int4 default's groups: 32, float zero points), per shape of --shapes
(default: TinyLlama's MLP up and attention, SmolLM2-135M's MLP up and down), the old path (fp32
activations, gemv_nbits.cpp) beside the VNNI kernel on int8 activations
(gemv_nbits_vnni_small.cpp below 64 / 128), each at M = 1 and M = 4 (batched decode: 4 clients
as one forward), for INT4 with float zero points (fp32, or fp16 as `xcompile quantize` stores
them), INT4 symmetric (Q4_0's blocks) and INT8 without zero points (fp16 or fp32 scales); the
read bandwidth measured after them:

    python benchmarks/gemv_nbits.py --blocks 32 [--shapes 5632x2048 2048x2048 1536x576 576x1536]
"""

from __future__ import annotations

import os

# The copies on huge pages, as xrun keeps a model's weights (runtime/weights.py): on 4 KiB pages
# every page boundary of a stream costs a TLB miss, ~25 % of a decode GEMV's bandwidth here.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # read by torch's allocator at import

from pathlib import Path

import argparse
import time
from collections.abc import Callable

import torch
from bandwidth import read_bandwidth  # benchmarks/bandwidth.py, beside this file

from xcompile import _C
from xcompile.passes.quantize_nbits import block_size_for
from xcompile.runtime import kernels

def _last_level_cache_bytes() -> int:
    """The largest cache sysfs names for CPU 0 (the L3 of a 2-vCPU guest can be 480 MiB)."""
    sizes = [0]
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KMG")) * scale)
    return max(sizes)


COLD_BYTES = max(128e6, 2.5 * _last_level_cache_bytes())  # copies overflow the last level


def copies(make: Callable[[], tuple[torch.Tensor | None, ...]]) -> list[tuple]:
    """Enough independent copies of a weight (a tuple of tensors) to overflow the caches."""
    first = make()
    return [first] + [make() for _ in range(int(COLD_BYTES // weight_bytes(first)))]


def weight_bytes(parts: tuple[torch.Tensor | None, ...]) -> int:
    return sum(t.nbytes for t in parts if t is not None)


def best_rates(rows: dict[str, tuple[list[tuple], Callable[[tuple], object]]], rounds: int):
    """name -> best GB/s of weight bytes over `rounds` passes over each row's weight copies.
    Rounds interleave the kernels, so a noisy neighbour on a shared host hits them alike."""
    best = dict.fromkeys(rows, 0.0)
    for _ in range(rounds):
        for name, (ws, call) in rows.items():
            call(ws[-1])
            start = time.perf_counter()
            for w in ws:
                call(w)
            rate = weight_bytes(ws[0]) * len(ws) / (time.perf_counter() - start) / 1e9
            best[name] = max(best[name], rate)
    return best


def small_blocks(args: argparse.Namespace) -> None:
    """Old path (fp32 x) against the VNNI kernel (int8 x) on blocks of args.blocks, M = 1 and 4."""
    gen = torch.Generator().manual_seed(0)
    bs = args.blocks
    # bits, symmetric, float zero points, fp16 scales (and zero points; xcompile's default)
    kinds = {
        "int4 f32 zp": (4, False, True, False),
        "int4 f16 zp f16": (4, False, True, True),  # the --int4 recipe's blocks
        "int4 sym f16": (4, True, False, True),  # Q4_0's
        "int8 no zp f16": (8, True, False, True),  # Q8_0's
        "int8 no zp": (8, True, False, False),
    }
    rows, nbytes = {}, {}
    for shape in args.shapes:
        n, k = (int(v) for v in shape.split("x"))
        for kind, (bits, sym, floating, half) in kinds.items():

            def make(n=n, k=k, bits=bits, sym=sym, floating=floating, half=half):
                w = torch.randn(n, k, generator=gen)
                B, scales, zp = kernels.quantize_nbits_reference(w, bits, bs, sym, floating)
                if half:
                    scales, zp = scales.half(), zp.half() if floating else zp
                return B, scales, zp

            ws = copies(make)
            for m in (1, 4):
                x, out = torch.randn(m, k, generator=gen), torch.empty(m, n)
                # the kernels called as a replayed decode step calls them: no Python checks
                # (linear_nbits' cost ~7 us a call, a quarter of a 1536 x 576 INT4 GEMV)
                sizes = (m, n, k, bits, bs, half)
                for path, kernel in (("old", _C.gemv_nbits), ("vnni", _C.gemv_nbits_q8)):
                    name = f"{n}x{k} {kind} M={m} {path}"
                    rows[name] = (
                        ws,
                        lambda w, x=x, out=out, kernel=kernel, args=sizes: kernel(
                            x.data_ptr(),
                            w[0].data_ptr(),
                            w[1].data_ptr(),
                            0 if w[2] is None else w[2].data_ptr(),
                            w[2] is not None and w[2].is_floating_point(),
                            0,
                            out.data_ptr(),
                            *args,
                        ),
                    )
                    nbytes[name] = weight_bytes(ws[0])
    best = best_rates(rows, args.rounds)
    read_bw = read_bandwidth(args.threads)
    print(f"isa={kernels.isa()} threads={args.threads} blocks of {bs}")
    print(f"{'read bandwidth (torch.sum)':34s} {read_bw:6.1f} GB/s")
    print(
        f"{'N x K, weights, M, path':34s} {'GB/s':>6s} {'of read':>8s} {'us/call':>8s} "
        f"{'MB read':>8s} {'vs old':>7s} {'M=4/M=1':>8s}"
    )
    us = {name: nbytes[name] / best[name] / 1e3 for name in rows}
    for name in rows:
        rate = best[name]
        old = name.replace(" vnni", " old")
        m1 = name.replace("M=4", "M=1")
        print(
            f"{name:34s} {rate:6.1f} {rate / read_bw:8.2f} {us[name]:8.1f} "
            f"{nbytes[name] / 1e6:8.2f} {us[old] / us[name]:7.2f}x {us[name] / us[m1]:8.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5632)
    parser.add_argument("--k", type=int, default=2048)
    parser.add_argument("--m", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7, help="passes per kernel; best is shown")
    parser.add_argument("--blocks", type=int, default=None, help="old path vs VNNI on these blocks")
    parser.add_argument(
        "--shapes", nargs="+", default=["5632x2048", "2048x2048", "1536x576", "576x1536"]
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kernels.set_num_threads(args.threads)
    if args.blocks:
        small_blocks(args)
        return
    n, k, m = args.n, args.k, args.m
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=gen)
    out = torch.empty(m, n)

    def dense() -> torch.Tensor:
        return torch.randn(n, k, generator=gen) / k**0.5

    def int8pack() -> tuple[torch.Tensor, torch.Tensor]:
        w = dense()
        scales = w.abs().amax(dim=1) / 127
        return torch.round(w / scales[:, None]).to(torch.int8), scales

    channel = block_size_for(-1, k)  # per-channel INT8, blocked as the artifacts are
    int8 = copies(lambda: kernels.quantize_nbits_reference(dense(), 8, channel, True))
    int4 = copies(lambda: kernels.quantize_nbits_reference(dense(), 4, 128, False))
    int4_float = copies(lambda: kernels.quantize_nbits_reference(dense(), 4, 128, False, True))
    bf16 = copies(lambda: (dense().bfloat16(),))
    packed = copies(int8pack)
    # name -> (weight copies, call on one copy)
    rows: dict[str, tuple[list[tuple], Callable[[tuple], object]]] = {
        "xcompile bf16": (bf16, lambda w: kernels.linear(x, w[0], out=out)),
        "xcompile int8/channel": (
            int8,
            lambda w: kernels.linear_nbits(x, *w, 8, channel, k, out=out),
        ),
        "xcompile int4/g128 (zp)": (
            int4,
            lambda w: kernels.linear_nbits(x, *w, 4, 128, k, out=out),
        ),
        "xcompile int4/g128 (f32 zp)": (
            int4_float,
            lambda w: kernels.linear_nbits(x, *w, 4, 128, k, out=out),
        ),
        "xcompile int8/channel q8": (
            int8,
            lambda w: kernels.linear_nbits(x, *w, 8, channel, k, out=out, int8_activations=True),
        ),
        "xcompile int4/g128 (zp) q8": (
            int4,
            lambda w: kernels.linear_nbits(x, *w, 4, 128, k, out=out, int8_activations=True),
        ),
        "xcompile int4/g128 (f32 zp) q8": (
            int4_float,
            lambda w: kernels.linear_nbits(x, *w, 4, 128, k, out=out, int8_activations=True),
        ),
        "torch _weight_int8pack_mm": (
            packed,
            lambda w: torch.ops.aten._weight_int8pack_mm(x, *w),
        ),
    }

    best = best_rates(rows, args.rounds)
    read_bw = read_bandwidth(args.threads)

    print(f"isa={kernels.isa()} threads={args.threads} N={n} K={k} M={m}")
    print(f"{'read bandwidth (torch.sum)':28s} {read_bw:6.1f} GB/s")
    print(f"{'kernel':28s} {'GB/s':>6s} {'of read':>8s} {'us/call':>8s} {'MB read':>8s}")
    for name, (ws, _) in rows.items():
        nbytes = weight_bytes(ws[0])
        rate = best[name]
        us = nbytes / rate / 1e3
        print(f"{name:28s} {rate:6.1f} {rate / read_bw:8.2f} {us:8.1f} {nbytes / 1e6:8.2f}")


if __name__ == "__main__":
    main()
