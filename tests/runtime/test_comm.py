"""runtime/comm.py's ShmComm on numpy arrays, and on torch tensors (--reference runs the plan on
torch): two ranks in two processes, sums and gathers held to numpy's own on the same inputs."""

from __future__ import annotations

import multiprocessing

import numpy as np

RANKS = 2


def inputs(rank: int) -> tuple[np.ndarray, np.ndarray]:
    """(activations (3, 8) fp32, a column slice (2, 3) fp32) of this rank."""
    rng = np.random.default_rng(rank)
    return rng.standard_normal((3, 8), dtype=np.float32), rng.standard_normal(
        (2, 3), dtype=np.float32
    )


def rank_main(name: str, rank: int, queue) -> None:
    from xcompile.runtime.comm import ShmComm

    comm = ShmComm(name, rank, RANKS)
    try:
        x, part = inputs(rank)
        summed = comm.all_reduce(x)
        in_place = summed is x  # contiguous fp32: summed where it lies, as the plan relies on
        gathered = comm.all_gather(part, -1)
        ints = comm.broadcast_ints([7, 0, 2**24 - 1] if rank == 0 else None, 3)
        widened = comm.all_reduce(np.ones((2, 4), np.float64)[:, ::2])  # strided, float64
        import torch

        x, part = inputs(rank)
        tensors = comm.all_reduce(torch.from_numpy(x)), comm.all_gather(torch.from_numpy(part), 1)
        assert all(isinstance(t, torch.Tensor) for t in tensors)  # what it was given
        tensors = [t.numpy() for t in tensors]
        queue.put((rank, summed, in_place, gathered, ints, widened, tensors))
    finally:
        comm.close()


def test_shm_collectives_on_numpy_arrays():
    from xcompile import _C
    from xcompile.runtime.comm import ShmComm

    name = ShmComm.new_name()
    creator = _C.ShmAllReduce(name, -1, RANKS, True, 5.0)
    spawn = multiprocessing.get_context("spawn")
    queue = spawn.Queue()
    procs = [spawn.Process(target=rank_main, args=(name, r, queue)) for r in range(RANKS)]
    try:
        for p in procs:
            p.start()
        results = dict((r[0], r[1:]) for r in (queue.get(timeout=60) for _ in procs))
        for p in procs:
            p.join(timeout=30)
            assert p.exitcode == 0
    finally:
        creator.unlink()
    xs, parts = zip(*(inputs(r) for r in range(RANKS)))
    for rank in range(RANKS):
        summed, in_place, gathered, ints, widened, tensors = results[rank]
        assert summed.dtype == np.float32 and in_place
        np.testing.assert_allclose(summed, xs[0] + xs[1], rtol=1e-6)
        assert gathered.dtype == np.float32 and gathered.shape == (2, 3 * RANKS)
        np.testing.assert_array_equal(gathered, np.concatenate(parts, axis=-1))
        assert ints == [7, 0, 2**24 - 1]
        assert widened.dtype == np.float32 and widened.flags.c_contiguous
        np.testing.assert_array_equal(widened, np.full((2, 2), 2.0, np.float32))
        np.testing.assert_array_equal(tensors[0], summed)
        np.testing.assert_array_equal(tensors[1], gathered)
