"""What runtime/kernels.py's checked wrappers cost per call on numpy arrays (the slim runtime's
way) against torch tensors (tests, --reference: viewed as numpy, results viewed back as torch),
beside the bare _C call, at TinyLlama-1.1B decode shapes (hidden 2048, 32 query heads of 64 over
4 KV heads, 512 tokens of context).

The three ways are timed in alternating rounds in one process (the machine is shared and noisy);
microseconds per call, the median over rounds of each round's mean. Print only: nothing here is
asserted.

    python benchmarks/kernels_numpy_io.py [--rounds 15] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from xcompile import _C
from xcompile.runtime import kernels

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, CONTEXT = 2048, 32, 4, 64, 512


def mean_microseconds(fn: Callable[[], object], seconds: float = 0.02) -> float:
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        calls += 1
    return (time.perf_counter() - start) / calls * 1e6


def ptr(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def cases() -> dict[str, dict[str, Callable[[], object]]]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, HIDDEN), dtype=np.float32)
    w = rng.standard_normal(HIDDEN, dtype=np.float32)
    out = np.empty_like(x)
    xt, wt, outt = (torch.from_numpy(a) for a in (x, w, out))
    q = rng.standard_normal((1, HEADS, HEAD_DIM), dtype=np.float32)
    k, v = rng.standard_normal((2, KV_HEADS, CONTEXT + 1, HEAD_DIM), dtype=np.float32)
    qo = np.empty_like(q)
    qt, kt, vt, qot = (torch.from_numpy(a) for a in (q, k, v, qo))
    scale = HEAD_DIM**-0.5
    return {
        "rmsnorm (1, 2048)": {
            "bare _C": lambda: _C.rmsnorm(ptr(x), ptr(w), ptr(out), 1, HIDDEN, 1e-6),
            "numpy": lambda: kernels.rmsnorm(x, w, 1e-6, out=out),
            "torch": lambda: kernels.rmsnorm(xt, wt, 1e-6, out=outt),
        },
        f"attention decode, {CONTEXT} past": {
            "bare _C": lambda: _C.attention(
                ptr(q),
                ptr(k),
                ptr(v),
                ptr(qo),
                1,
                HEADS,
                KV_HEADS,
                HEAD_DIM,
                CONTEXT + 1,
                CONTEXT,
                0,
                scale,
                0,
                0,
                0.0,
            ),
            "numpy": lambda: kernels.attention(q, k, v, CONTEXT, scale, out=qo),
            "torch": lambda: kernels.attention(qt, kt, vt, CONTEXT, scale, out=qot),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    # one thread: on a shared machine two threads' wake-ups swamp a 100 us kernel
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    _C.set_num_threads(args.threads)
    print(
        f"isa {_C.isa()}, threads {_C.num_threads()}; us per call, median of {args.rounds} rounds"
    )
    for name, ways in cases().items():
        times: dict[str, list[float]] = {way: [] for way in ways}
        for fn in ways.values():
            fn()  # warm-up
        for round_ in range(args.rounds):
            order = list(ways) if round_ % 2 == 0 else list(reversed(ways))
            for way in order:
                times[way].append(mean_microseconds(ways[way]))
        cells = "  ".join(f"{way} {statistics.median(t):7.2f}" for way, t in times.items())
        print(f"{name:32s} {cells}")


if __name__ == "__main__":
    main()
