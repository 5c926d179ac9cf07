"""The machine's read bandwidth: torch.sum over a buffer far larger than the last-level cache,
best of several passes (the host is shared; the figure swings from one minute to the next).

    python benchmarks/bandwidth.py [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch


def read_bandwidth(threads: int | None = None, mib: int = 1024, passes: int = 5) -> float:
    """GB/s of reading `mib` MiB of fp32 with `threads` torch threads, best of `passes`."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        buf = torch.ones(mib * 1024 * 1024 // 4)
        buf.sum()
        best = 0.0
        for _ in range(passes):
            t0 = time.perf_counter()
            buf.sum()
            best = max(best, buf.numel() * 4 / (time.perf_counter() - t0) / 1e9)
        return best
    finally:
        torch.set_num_threads(before)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None)
    print(f"read bandwidth: {read_bandwidth(parser.parse_args().threads):.1f} GB/s")
