"""Collectives between the ranks of one model: what the graph's ai.xcompile AllReduce and
AllGather ops call, and how rank 0 tells the others what to run.

    single  one rank: every collective is the identity
    shm     ranks on one machine: csrc's POSIX shared-memory allreduce (xcompile._C)
    torch   ranks anywhere: torch.distributed (gloo, or oneCCL's ccl when installed), as
            launched by torchrun
A peer that dies makes a collective raise PeerLost within seconds instead of hanging.
"""

from __future__ import annotations

import torch

from xcompile.errors import UserError


class PeerLost(UserError):
    """A rank died or stopped answering."""


class Communicator:
    rank = 0
    ranks = 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks; returns the (fp32, contiguous) sum, maybe x itself."""
        return x

    def all_gather(self, x: torch.Tensor, axis: int) -> torch.Tensor:
        return x

    def broadcast_ints(self, values: list[int] | None, length: int) -> list[int]:
        """Rank 0's `values` (exactly `length` ints < 2**24) on every rank."""
        buf = torch.zeros(length)
        if self.rank == 0:
            buf[:] = torch.tensor(values, dtype=torch.float32)
        return [int(v) for v in self.all_reduce(buf).tolist()]

    def close(self) -> None:
        pass


class SingleRank(Communicator):
    pass


class TorchComm(Communicator):
    """torch.distributed: the cross-machine engine. Launch with torchrun (it sets RANK,
    WORLD_SIZE, MASTER_ADDR/PORT)."""

    def __init__(self, backend: str | None = None):
        import datetime

        from xcompile.runtime.optional import require_torch

        require_torch("--backend torch")
        import torch.distributed as dist

        self.dist = dist
        if not dist.is_initialized():
            if backend is None:
                try:
                    import oneccl_bindings_for_pytorch  # noqa: F401

                    backend = "ccl"
                except ImportError:
                    backend = "gloo"
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=60))
        self.rank, self.ranks = dist.get_rank(), dist.get_world_size()

    def all_reduce(self, x):
        x = x.contiguous()
        try:
            self.dist.all_reduce(x)
        except RuntimeError as e:
            raise PeerLost(
                f"rank {self.rank}: a peer was lost during all_reduce "
                f"({str(e).splitlines()[0][:120]}); see the other ranks' output"
            ) from None
        return x

    def all_gather(self, x, axis):
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.ranks)]
        try:
            self.dist.all_gather(parts, x)
        except RuntimeError as e:
            raise PeerLost(
                f"rank {self.rank}: a peer was lost during all_gather "
                f"({str(e).splitlines()[0][:120]})"
            ) from None
        return torch.cat(parts, dim=axis)

    def close(self):
        if self.dist.is_initialized():
            self.dist.destroy_process_group()


class ShmComm(Communicator):
    """One POSIX shared-memory segment (csrc/shm_allreduce.cpp) shared by the ranks of this
    machine: created by rank 0 (O_EXCL, mode 0600, a random name), unlinked as soon as every
    rank has mapped it, so nothing is left in /dev/shm on any exit."""

    def __init__(
        self, name: str, rank: int, ranks: int, create: bool = False, timeout_s: float = 5.0
    ):
        from xcompile import _C

        self.rank, self.ranks = rank, ranks
        self.shm = _C.ShmAllReduce(name, rank, ranks, create, timeout_s)

    @staticmethod
    def new_name() -> str:
        import secrets

        return f"/xcompile-{secrets.token_hex(16)}"

    def all_reduce(self, x):
        x = x.contiguous()
        if x.dtype != torch.float32:
            x = x.float()
        try:
            self.shm.all_reduce(x.data_ptr(), x.numel())
        except RuntimeError as e:
            raise PeerLost(f"rank {self.rank}: {e}") from None
        return x

    def all_gather(self, x, axis):
        # gather = place my slice in a zero tensor of the full size, then sum over ranks
        x = x.contiguous().float()
        axis %= x.dim()
        shape = list(x.shape)
        n = shape[axis]
        shape[axis] = n * self.ranks
        full = torch.zeros(shape)
        full.narrow(axis, self.rank * n, n).copy_(x)
        return self.all_reduce(full)

    def abort(self) -> None:
        self.shm.abort()

    def close(self):
        self.shm.close()
