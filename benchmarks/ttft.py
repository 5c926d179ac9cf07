"""Time to first token of `xrun`, from process start (imports, load, plan, prefill), and the
process's peak RSS beside the size of its shard, warm page cache, in one run.

    python benchmarks/ttft.py ARTIFACTS [--weights copy map] [--repeats 3]

Each run starts `xrun ARTIFACTS --prompt ... --max-new-tokens 1` in a fresh process and stops
the clock at the first byte it prints (the first token's text). Peak RSS is the child's own
(wait4's rusage). One run before the timed ones warms the page cache. Print only: nothing
here is asserted.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time
from pathlib import Path

PROMPT = "Once upon a time there was a small village by the sea"


def first_token_seconds(root: Path, weights: str) -> tuple[float, int]:
    """(seconds to the first printed byte, the child's peak RSS in bytes)"""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        ["xrun", str(root), "--prompt", PROMPT, "--max-new-tokens", "1", "--weights", weights],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    proc.stdout.read(1)
    seconds = time.perf_counter() - t0
    proc.stdout.read()
    _, _, usage = os.wait4(proc.pid, 0)  # this child's own rusage
    proc.returncode = 0
    return seconds, usage.ru_maxrss * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", type=Path)
    parser.add_argument("--weights", nargs="+", default=["copy", "map"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    shard = sum(p.stat().st_size for p in args.artifacts.glob("rank0.safetensors"))
    first_token_seconds(args.artifacts, "map")  # warm the page cache
    print(f"{args.artifacts}: rank-0 shard {shard / 1e6:.0f} MB, {os.cpu_count()} cpus")
    print(f"{'--weights':10s} {'first token s (best)':>21s} {'all runs':>24s} {'peak RSS MB':>12s}")
    for weights in args.weights:
        runs, peaks = [], []
        for _ in range(args.repeats):
            s, peak = first_token_seconds(args.artifacts, weights)
            runs.append(s)
            peaks.append(peak)
        print(
            f"{weights:10s} {min(runs):21.2f} {' '.join(f'{r:.2f}' for r in runs):>24s} "
            f"{max(peaks) / 1e6:12.0f}"
        )


if __name__ == "__main__":
    main()
