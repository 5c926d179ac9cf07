"""Starting the ranks of sharded artifacts on one machine, each on its own cores.

    xrun (supervisor: no torch, creates the SHM segment)
      ├─ rank 0  (tokenizes, samples, streams to stdout)   cores 0..k-1
      └─ rank 1  (follows rank 0)                          cores k..
The supervisor unlinks the segment as soon as every rank has mapped it (so /dev/shm keeps
nothing on any exit, SIGKILL included), waits for the ranks, and when one dies it raises the
segment's abort flag: the others leave their collective at once and exit, and the supervisor
prints one line naming the rank that died.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from xcompile.errors import UserError

PEER_LOST_EXIT = 3  # a rank that stopped because another died (the supervisor reports it)


def parse_ranges(text: str) -> list[int]:
    """ "0-3,8,10-11" -> [0, 1, 2, 3, 8, 10, 11] (Linux cpulist syntax)"""
    cores: list[int] = []
    for part in text.strip().split(","):
        lo, _, hi = part.partition("-")
        cores.extend(range(int(lo), int(hi or lo) + 1))
    return cores


def parse_core_list(text: str, ranks: int) -> list[list[int]]:
    """ "0-27|28-55" -> [[0..27], [28..55]]: one group per rank."""
    try:
        groups = [parse_ranges(group) for group in text.split("|")]
    except ValueError:
        raise UserError(
            f"--core-list {text!r}: write one group per rank like '0-27|28-55'"
        ) from None
    if len(groups) != ranks or any(not g for g in groups):
        raise UserError(
            f"--core-list names {len(groups)} groups for {ranks} ranks; give one "
            "non-empty group per rank, separated by '|'"
        )
    allowed = os.sched_getaffinity(0)
    bad = sorted({c for g in groups for c in g} - allowed)
    if bad:
        raise UserError(
            f"--core-list uses cores {bad} this process may not run on (allowed: {sorted(allowed)})"
        )
    return groups


def split_cores(ranks: int) -> list[list[int]] | None:
    """The allowed cores in `ranks` contiguous groups, or None when there are too few."""
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < ranks:
        return None
    size = len(allowed) // ranks
    return [allowed[r * size : (r + 1) * size] for r in range(ranks)]


def numa_node(cores: list[int]) -> int | None:
    """The NUMA node holding these cores, when the machine has more than one."""
    nodes = sorted(Path("/sys/devices/system/node").glob("node[0-9]*"))
    if len(nodes) < 2:
        return None
    for node in nodes:
        try:
            cpulist = (node / "cpulist").read_text().strip()
        except OSError:
            continue
        if cores and cpulist and cores[0] in parse_ranges(cpulist):
            return int(node.name[4:])
    return None


_bound: list[int] = []  # the cores bind() gave this process
SPIN_COUNT = 3_000_000  # libgomp's spins before a waiting thread sleeps (its default: 300_000)


def bind(cores: list[int]) -> None:
    """Pin this process to `cores`, and each of its OpenMP threads to one of them (read when
    libgomp starts: call before torch or xcompile._C is imported)."""
    _bound[:] = cores
    os.sched_setaffinity(0, cores)
    os.environ["OMP_NUM_THREADS"] = str(len(cores))
    os.environ.setdefault("OMP_PROC_BIND", "close")
    os.environ.setdefault("OMP_PLACES", "{" + "},{".join(map(str, cores)) + "}")
    # The pool's threads own these cores: they wait for the next kernel spinning, not asleep.
    # libgomp's default spin (300k) ran out between a decode step's kernels, so each parallel
    # region woke its threads with a futex, and a woken vCPU answers late: SmolLM2-135M INT8
    # decoded at 15.5-18.3 ms/token against 7.4-7.7 with this (2 threads, quiet machine,
    # alternating). Bounded (~10-50 ms of spinning), so an idle server's threads still sleep.
    os.environ.setdefault("GOMP_SPINCOUNT", str(SPIN_COUNT))


def cores() -> int:
    """How many cores this process may use: the ones bind() gave it (libgomp then pins the
    importing thread to the first, so the thread's own affinity says 1), else its affinity."""
    return len(_bound) or len(os.sched_getaffinity(0))


def _child_setup() -> None:
    """In each rank: die with the supervisor (PR_SET_PDEATHSIG), so no rank outlives it."""
    import ctypes

    try:
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def supervise(argv: list[str], ranks: int, cores: list[list[int]] | None) -> int:
    from xcompile import _C
    from xcompile.runtime.comm import ShmComm

    name = ShmComm.new_name()
    creator = _C.ShmAllReduce(name, -1, ranks, True, 5.0)
    procs: list[subprocess.Popen] = []
    try:
        for rank in range(ranks):
            cmd = [
                sys.executable,
                "-m",
                "xcompile.runtime.cli",
                *argv,
                "--rank",
                str(rank),
                "--comm",
                name,
            ]
            if cores:
                cmd += ["--cores", ",".join(map(str, cores[rank]))]
                node = numa_node(cores[rank])
                if node is not None and _which("numactl"):
                    cmd = ["numactl", f"--membind={node}", *cmd]
            procs.append(
                subprocess.Popen(
                    cmd, preexec_fn=_child_setup, stdin=subprocess.DEVNULL if rank else None
                )
            )
        return _watch(procs, creator)
    except KeyboardInterrupt:
        creator.abort()
        return 130
    finally:
        creator.unlink()
        # ranks leave by themselves once the segment is aborted (or rank 0 said stop): give
        # them a moment, then terminate, then kill whatever is still there
        for p in procs:
            try:
                p.wait(timeout=2)
            except subprocess.TimeoutExpired:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=2)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        creator.close()


def _watch(procs: list[subprocess.Popen], creator) -> int:
    import time

    unlinked = False
    while True:
        if not unlinked and creator.attached() == len(procs):
            creator.unlink()  # every rank has it mapped: the name is no longer needed
            unlinked = True
        codes = [p.poll() for p in procs]
        for rank, code in enumerate(codes):
            if code is not None and code != 0 and code != PEER_LOST_EXIT:
                if code < 0 or code not in (1, 2):  # a crash or a kill, not a reported error
                    how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
                    creator.abort()
                    print(
                        f"xrun: error: rank {rank} (pid {procs[rank].pid}) died ({how}); "
                        "stopped the other ranks",
                        file=sys.stderr,
                    )
                    return 1
                creator.abort()  # it reported its own error: stop the others quietly
                return code
        if all(c is not None for c in codes):
            return max(codes)
        time.sleep(0.02)


def _which(program: str) -> bool:
    import shutil

    return shutil.which(program) is not None
