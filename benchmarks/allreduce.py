"""Allreduce latency between the ranks of one machine: xcompile's SHM allreduce (xcompile._C
.ShmAllReduce, as runtime/comm.py ShmComm uses it) beside torch.distributed gloo, measured in the
same run on the same processes and buffers.

Each rank is a process pinned to its own core; figures are the median microseconds of one fp32
all_reduce over many back-to-back calls, on rank 0.

    python benchmarks/allreduce.py [--cores 0,1] [--sizes 8K,64K,1M,16M]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import secrets
import statistics
import tempfile
import time


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units else int(text)


def median_us(fn, shm, ranks: int, seconds: float = 1.0) -> tuple[float, int]:
    """Median of fn's duration over about `seconds` of calls, and the number of calls. The ranks
    agree on that number (an SHM allreduce of each rank's wish), as a collective must."""
    import torch

    start = time.perf_counter()
    for _ in range(10):  # warm up: pages touched, caches and branch predictors
        fn()
    per_call = (time.perf_counter() - start) / 10
    wish = torch.tensor([min(5000.0, max(20.0, seconds / per_call))])
    shm.all_reduce(wish.data_ptr(), 1)
    iters = int(wish.item() / ranks)
    times = []
    for _ in range(iters):
        start = time.perf_counter_ns()
        fn()
        times.append(time.perf_counter_ns() - start)
    return statistics.median(times) / 1e3, iters


def rank_main(rank: int, ranks: int, core: int, name: str, init_file: str, sizes, queue) -> None:
    os.sched_setaffinity(0, {core})  # before torch and _C start their thread pools
    import torch
    import torch.distributed as dist

    from xcompile import _C

    torch.set_num_threads(1)
    _C.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=ranks)
    shm = _C.ShmAllReduce(name, rank, ranks, False, 30.0)
    rows = []
    for nbytes in sizes:
        x = torch.zeros(nbytes // 4)  # zeros stay zeros: no inf or denormals after many sums
        ours, iters = median_us(lambda x=x: shm.all_reduce(x.data_ptr(), x.numel()), shm, ranks)
        gloo, gloo_iters = median_us(lambda x=x: dist.all_reduce(x), shm, ranks)
        rows.append((nbytes, ours, iters, gloo, gloo_iters))
    if rank == 0:
        queue.put((_C.isa(), rows))
    dist.barrier()
    dist.destroy_process_group()
    shm.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    allowed = sorted(os.sched_getaffinity(0))
    parser.add_argument(
        "--cores",
        default=",".join(map(str, allowed[:2])),
        help="one core per rank, comma-separated (default: the first two allowed)",
    )
    parser.add_argument("--sizes", default="8K,64K,1M,16M", help="message sizes in bytes")
    args = parser.parse_args()
    cores = [int(c) for c in args.cores.split(",")]
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    ranks = len(cores)

    from xcompile import _C

    ctx = mp.get_context("spawn")
    name = f"/xcompile-bench-{secrets.token_hex(8)}"
    creator = _C.ShmAllReduce(name, -1, ranks, True, 0.0)
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "gloo-init")
        procs = [
            ctx.Process(target=rank_main, args=(r, ranks, cores[r], name, init_file, sizes, queue))
            for r in range(ranks)
        ]
        for p in procs:
            p.start()
        try:
            if not creator.wait_attached(120):
                raise SystemExit("ranks did not attach to the SHM segment")
            creator.unlink()
            isa, rows = queue.get(timeout=600)
        finally:
            for p in procs:
                p.join(timeout=60)
                if p.is_alive():
                    p.kill()
            creator.close()

    print(
        f"{ranks} ranks on cores {cores}, fp32 all_reduce, median of back-to-back calls, isa={isa}"
    )
    print(
        f"{'size':>8} {'shm us':>9} {'(calls)':>7} {'gloo us':>9} {'(calls)':>7} {'gloo/shm':>9}"
        f" {'shm GB/s':>9}"
    )
    for nbytes, ours, iters, gloo, gloo_iters in rows:
        size = f"{nbytes >> 20} MiB" if nbytes >= 1 << 20 else f"{nbytes >> 10} KiB"
        print(
            f"{size:>8} {ours:9.1f} {iters:7d} {gloo:9.1f} {gloo_iters:7d} {gloo / ours:8.1f}x "
            f"{nbytes / ours / 1e3:9.2f}"
        )


if __name__ == "__main__":
    main()
