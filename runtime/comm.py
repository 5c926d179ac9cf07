"""Collectives between the ranks of one model: what the graph's ai.xcompile AllReduce and
AllGather ops call, and how rank 0 tells the others what to run.

    single  one rank: every collective is the identity
    shm     ranks on one machine: csrc's POSIX shared-memory allreduce (xcompile._C)
    torch   ranks anywhere: torch.distributed (gloo, or oneCCL's ccl when installed), as
            launched by torchrun
A peer that dies makes a collective raise PeerLost within seconds instead of hanging.
Arrays are numpy's, or torch tensors where --reference runs the plan on torch's references
(each collective returns what it was given); torch is imported only for those and TorchComm.
"""

from __future__ import annotations

import numpy as np

from xcompile.errors import UserError


class PeerLost(UserError):
    """A rank died or stopped answering."""


class Communicator:
    rank = 0
    ranks = 1

    def all_reduce(self, x: np.ndarray) -> np.ndarray:
        """Sum over ranks; returns the (fp32, contiguous) sum, maybe x itself."""
        return x

    def all_gather(self, x: np.ndarray, axis: int) -> np.ndarray:
        """x (..., n, ...) on each rank -> (..., ranks * n, ...): rank r's slice at r * n."""
        return x

    def broadcast_ints(self, values: list[int] | None, length: int) -> list[int]:
        """Rank 0's `values` (exactly `length` ints < 2**24: exact in fp32) on every rank."""
        buf = np.zeros(length, np.float32)
        if self.rank == 0:
            buf[:] = values
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

        self.torch = require_torch("--backend torch")
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

    def _tensor(self, x):
        """A contiguous torch tensor of x: an ndarray's own memory where it is contiguous fp32."""
        if isinstance(x, np.ndarray):
            return self.torch.from_numpy(np.ascontiguousarray(x, np.float32))
        return x.contiguous()

    def all_reduce(self, x):
        t = self._tensor(x)
        try:
            self.dist.all_reduce(t)  # in place
        except RuntimeError as e:
            raise PeerLost(
                f"rank {self.rank}: a peer was lost during all_reduce "
                f"({str(e).splitlines()[0][:120]}); see the other ranks' output"
            ) from None
        return t.numpy() if isinstance(x, np.ndarray) else t

    def all_gather(self, x, axis):
        t = self._tensor(x)
        parts = [self.torch.empty_like(t) for _ in range(self.ranks)]
        try:
            self.dist.all_gather(parts, t)
        except RuntimeError as e:
            raise PeerLost(
                f"rank {self.rank}: a peer was lost during all_gather "
                f"({str(e).splitlines()[0][:120]})"
            ) from None
        gathered = self.torch.cat(parts, dim=axis)
        return gathered.numpy() if isinstance(x, np.ndarray) else gathered

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
        if not isinstance(x, np.ndarray):  # a torch tensor (--reference)
            t = x.contiguous().float()
            self.all_reduce(t.numpy())  # summed in place: the tensor's own memory
            return t
        x = np.ascontiguousarray(x, np.float32)  # x itself when it already is: summed in place
        try:
            self.shm.all_reduce(x.__array_interface__["data"][0], x.size)
        except RuntimeError as e:
            raise PeerLost(f"rank {self.rank}: {e}") from None
        return x

    def all_gather(self, x, axis):
        if not isinstance(x, np.ndarray):  # a torch tensor (--reference)
            import torch

            return torch.from_numpy(self.all_gather(x.contiguous().float().numpy(), axis))
        # gather = place my slice in a zero array of the full size, then sum over ranks
        axis %= x.ndim
        n = x.shape[axis]
        shape = list(x.shape)
        shape[axis] = n * self.ranks
        full = np.zeros(shape, np.float32)
        mine = [slice(None)] * x.ndim
        mine[axis] = slice(self.rank * n, (self.rank + 1) * n)
        full[tuple(mine)] = x
        return self.all_reduce(full)

    def abort(self) -> None:
        self.shm.abort()

    def close(self):
        self.shm.close()
