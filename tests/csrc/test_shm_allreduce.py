"""xcompile._C.ShmAllReduce between real processes (multiprocessing spawn), each pinned to its own
core where there are enough.

The test process is the launcher: it creates the segment (rank -1), checks its mode, unlinks it
once every rank has attached, and kills or aborts ranks. Workers import torch after pinning.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import secrets
import signal
import time

import pytest

from xcompile import _C

SIZES = [1, 7, 2048, 8192 + 5, (1 << 20) + 3, 4 << 20]  # small path, large path, several chunks


def _pin(rank: int, ranks: int) -> None:
    """Rank r on the r-th allowed core, where there are enough (else the scheduler places them)."""
    if hasattr(os, "sched_setaffinity") and len(cpus := sorted(os.sched_getaffinity(0))) >= ranks:
        os.sched_setaffinity(0, {cpus[rank]})


def _inputs(n: int, rank: int, kind: str):
    import torch

    if kind == "int":  # sums of integers below 2**24 are exact in fp32, in any order
        return ((torch.arange(n, dtype=torch.int32) * (2 * rank + 7) + rank) % 2001 - 1000).float()
    return torch.randn(n, generator=torch.Generator().manual_seed(n * 16 + rank))


def _sums(comm, rank: int, ranks: int, event) -> dict:
    """Every size and ISA path, fp32 and bf16, 100 small calls in a row, mixed sizes."""
    import hashlib

    import torch

    failures, digests = [], []

    def check(what, got, expected, exact):
        err = torch.dist(got.float(), expected.float(), float("inf")).item()
        if not (torch.equal(got, expected) if exact else err <= 1e-5):
            failures.append(f"rank {rank} {what}: max abs error {err:.3g}")
        if not exact:  # exact results are equal on every rank already
            digests.append(hashlib.sha1(got.numpy().tobytes()).hexdigest())

    for n in SIZES:
        # every ISA path with 2 ranks up to many chunks; beyond, and with more ranks, the default
        isas = _C.supported_isas() if ranks == 2 and n < 4 << 20 else [_C.isa()]
        for kind in ("int", "randn"):
            xs = [_inputs(n, r, kind) for r in range(ranks)]
            expected = sum(xs[1:], xs[0].clone())
            for isa in isas:
                _C.set_isa(isa)
                x = xs[rank].clone()
                comm.all_reduce(x.data_ptr(), n)
                check(f"fp32 {kind} n={n} {isa}", x, expected, exact=kind == "int")
        xs = [x.bfloat16() for x in xs]
        expected = sum((x.float() for x in xs[1:]), xs[0].float()).bfloat16()  # fp32, rounded once
        for isa in isas:
            _C.set_isa(isa)
            x = xs[rank].clone()
            comm.all_reduce_bf16(x.data_ptr(), n)
            check(f"bf16 n={n} {isa}", x, expected, exact=True)

    for i in range(100):  # back to back: both slot buffers reused many times
        x = torch.full((2048,), float(rank + i))
        comm.all_reduce(x.data_ptr(), x.numel())
        check(f"small call {i}", x, torch.full((2048,), float(sum(range(ranks)) + ranks * i)), True)
    for i, n in enumerate([5, 300_000, 9, 300_001, 1 << 20, 3]):  # small and large paths mixed
        x = torch.full((n,), float(rank * 10 + i))
        comm.all_reduce(x.data_ptr(), n)
        check(f"mixed n={n}", x, torch.full((n,), float(10 * sum(range(ranks)) + ranks * i)), True)
    return {"failures": failures, "digests": digests}


def _wait_then_call(comm, rank: int, ranks: int, event) -> dict:
    """One collective together; then rank 0 calls alone (and waits), rank 1 idles until `event`
    and then calls too."""
    import numpy as np

    x = np.ones(2048, np.float32)
    comm.all_reduce(x.ctypes.data, x.size)
    _report(rank, "ready", None)
    if rank == 1:
        event.wait(30)
    comm.all_reduce(x.ctypes.data, x.size)
    return {"second call returned": float(x[0])}


def _disagree(comm, rank: int, ranks: int, event) -> dict:
    import numpy as np

    x = np.ones(2048 >> rank, np.float32)  # rank 0: 2048 values, rank 1: 1024
    comm.all_reduce(x.ctypes.data, x.size)
    return {}


JOBS = {"sums": _sums, "wait_then_call": _wait_then_call, "disagree": _disagree}
_queue = None


def _report(rank, status, payload) -> None:
    _queue.put((rank, status, payload))


def _worker(name, rank, ranks, job, queue, event) -> None:
    global _queue
    _queue = queue
    try:
        _pin(rank, ranks)
        _C.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)
        comm = _C.ShmAllReduce(name, rank, ranks, False, 30.0)
        _report(rank, "done", JOBS[job](comm, rank, ranks, event))
    except Exception as e:  # noqa: BLE001 -- the parent asserts on what each rank reports
        _report(rank, "error", f"{type(e).__name__}: {e}")


class Ranks:
    """Spawns `ranks` workers running JOBS[job] on a fresh segment this process creates."""

    def __init__(self, ranks: int, job: str):
        ctx = mp.get_context("spawn")
        self.name = f"/xcompile-test-{secrets.token_hex(8)}"
        self.creator = _C.ShmAllReduce(self.name, -1, ranks, True, 0.0)
        self.queue, self.event = ctx.Queue(), ctx.Event()
        self.procs = [
            ctx.Process(target=_worker, args=(self.name, r, ranks, job, self.queue, self.event))
            for r in range(ranks)
        ]
        for p in self.procs:
            p.start()
        assert self.creator.wait_attached(60), "workers did not attach"
        self.mode = os.stat(f"/dev/shm/{self.name[1:]}").st_mode & 0o777
        self.creator.unlink()  # as the launcher does: nothing stays in /dev/shm on any exit

    def get(self, timeout: float = 60) -> tuple[int, str, object]:
        return self.queue.get(timeout=timeout)

    def close(self) -> None:
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
        self.creator.close()


@pytest.mark.parametrize("ranks", [2, 3])
def test_sums_equal_reference_on_every_rank(ranks):
    group = Ranks(ranks, "sums")
    try:
        assert group.mode == 0o600
        assert not os.path.exists(f"/dev/shm/{group.name[1:]}")
        reports = [group.get(120) for _ in range(ranks)]
    finally:
        group.close()
    for rank, status, payload in reports:
        assert status == "done", f"rank {rank}: {payload}"
        assert payload["failures"] == []
    # fixed summation order: every rank holds the same bits after every call
    assert all(payload["digests"] == reports[0][2]["digests"] for _, _, payload in reports)


def test_killed_peer_makes_waiting_rank_raise():
    group = Ranks(2, "wait_then_call")
    try:
        assert sorted(group.get()[:2] for _ in range(2)) == [(0, "ready"), (1, "ready")]
        time.sleep(0.2)  # rank 0 is now spinning in its second all_reduce
        start = time.monotonic()
        os.kill(group.procs[1].pid, signal.SIGKILL)  # not reaped: rank 1 stays a zombie meanwhile
        rank, status, message = group.get(timeout=10)
        elapsed = time.monotonic() - start
    finally:
        group.close()
    assert (rank, status) == (0, "error")
    assert f"rank 1 (pid {group.procs[1].pid}) died" in message
    assert elapsed < 5


def test_abort_makes_waiting_and_later_calls_raise():
    group = Ranks(2, "wait_then_call")
    try:
        assert sorted(group.get()[:2] for _ in range(2)) == [(0, "ready"), (1, "ready")]
        time.sleep(0.2)  # rank 0 waits in its second all_reduce, rank 1 on the event
        group.creator.abort("stop for the test")
        first = group.get(timeout=10)
        group.event.set()
        second = group.get(timeout=10)
        assert group.creator.aborted()
    finally:
        group.close()
    assert first == (0, "error", "RuntimeError: aborted: stop for the test")
    assert second == (1, "error", "RuntimeError: aborted: stop for the test")


def test_ranks_that_disagree_on_the_size_both_raise():
    group = Ranks(2, "disagree")
    try:
        reports = sorted(group.get() for _ in range(2))
    finally:
        group.close()
    assert [status for _, status, _ in reports] == ["error", "error"]
    assert any("ranks disagree on a collective" in message for _, _, message in reports)


def test_single_rank_creator_takes_part_and_reduces_to_itself():
    import numpy as np

    name = f"/xcompile-test-{secrets.token_hex(8)}"
    comm = _C.ShmAllReduce(name, 0, 1, True, 0.0)
    try:
        assert (comm.rank, comm.ranks, comm.name, comm.attached()) == (0, 1, name, 1)
        assert comm.wait_attached(0.0)
        x = np.arange(10, dtype=np.float32)
        comm.all_reduce(x.ctypes.data, x.size)
        assert (x == np.arange(10)).all()
        with pytest.raises(ValueError, match="null pointer"):
            comm.all_reduce(0, 4)
    finally:
        comm.close()  # the creator's close also unlinks
    assert not os.path.exists(f"/dev/shm/{name[1:]}")


def test_second_create_fails_and_unlink_is_idempotent():
    name = f"/xcompile-test-{secrets.token_hex(8)}"
    first = _C.ShmAllReduce(name, -1, 2, True, 0.0)
    try:
        assert os.stat(f"/dev/shm/{name[1:]}").st_mode & 0o777 == 0o600
        with pytest.raises(RuntimeError, match="already exists"):
            _C.ShmAllReduce(name, -1, 2, True, 0.0)
        with pytest.raises(RuntimeError, match="created for 2 ranks, not 3"):
            _C.ShmAllReduce(name, 0, 3, False, 0.0)
        rank0 = _C.ShmAllReduce(name, 0, 2, False, 0.0)
        with pytest.raises(RuntimeError, match="rank 0 .* already taken"):
            _C.ShmAllReduce(name, 0, 2, False, 0.0)
        assert first.attached() == 1 and not first.wait_attached(0.01)
        first.unlink()
        first.unlink()
        assert not os.path.exists(f"/dev/shm/{name[1:]}")
        rank0.close()
        rank0.close()
        with pytest.raises(RuntimeError, match="closed"):
            rank0.all_reduce(1, 1)
    finally:
        first.close()
    with pytest.raises(RuntimeError, match="did not appear within"):
        _C.ShmAllReduce(name, 1, 2, False, 0.05)
