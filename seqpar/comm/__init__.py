"""Moving blocks between ranks: the ring exchange, and the small collectives around it.

The attention layer talks to a :class:`Ring` only: ``exchange(send, recv)`` posts "send ``send``
to the next rank, receive the previous rank's block into ``recv``" and returns a handle whose
``wait()`` returns ``recv``. Posting returns at once, so the caller computes the current block
while the next one is in flight::

      step s:   post exchange(kv_s -> r+1, kv_{s+1} <- r-1)     (batch_isend_irecv)
                compute tile (q, kv_s)                           overlaps the transfer
                wait()                                           kv_{s+1} has arrived

Every rank posts the same number of exchanges in the same order, so the pattern never deadlocks
(fully masked tiles skip the compute, not the exchange). Each attention call tags its messages with
its call number on the group (:func:`call_tags`), so ranks that fell out of step (one skipped a
call) never pair one call's blocks with another's: their waits time out instead, and the method
layer raises :class:`CommError` naming the call, the step and the peers. World size 1 is :class:`LocalRing`:
``exchange`` returns the send buffer itself and nothing moves.

Backends: :class:`TorchRing` (torch.distributed: NCCL, gloo) and :class:`LocalRing`; a
:class:`TransportGroup` (``seqpar.MPIGroup``, mpi4py) brings its own ring and all-gather.
"""

from __future__ import annotations

from typing import Callable, NoReturn, Protocol, runtime_checkable

import torch
import torch.distributed as dist

__all__ = [
    "Handle",
    "Ring",
    "LocalRing",
    "TorchRing",
    "make_ring",
    "all_gather_tensor",
    "gather_ints",
    "gather_rows",
    "agree",
    "agreement_failed",
    "judge",
    "control_device",
    "TAG_KV",
    "TAG_DKV",
    "call_tags",
    "CommError",
    "PeerAborted",
    "TransportGroup",
    "all_to_all",
    "reduce_scatter_tensor",
]

TAG_KV = 17
TAG_DKV = 23
_TAG_STRIDE, _TAG_CALLS = 64, 4096  # tags stay below 2**18 (MPI guarantees only 2**15 - 1; OpenMPI has 2**31 - 1)


def call_tags(call: int) -> tuple[int, int]:
    """(K/V tag, dK/dV tag) of attention call number ``call`` on a group: distinct for 4096 calls in a
    row, so blocks of different calls never match."""
    off = _TAG_STRIDE * (call % _TAG_CALLS)
    return TAG_KV + off, TAG_DKV + off


class CommError(RuntimeError):
    """A wait of a seqpar method failed (the transport's timeout, or a peer that is gone); the message
    names the method, the call, the step and the peer ranks."""


class PeerAborted(RuntimeError):
    """Raised by in-process transports (thread-ranks) when another rank already failed: not a fault of
    this rank's, so the method layer passes it on unwrapped."""


class Handle(Protocol):
    def wait(self) -> torch.Tensor: ...


class Ring(Protocol):
    rank: int
    size: int
    prev_rank: int  # the rank blocks come from, as the transport numbers ranks (global for torch.distributed)
    next_rank: int  # the rank blocks go to

    def exchange(self, send: torch.Tensor, recv: torch.Tensor | None = None, *, tag: int = TAG_KV,
                 hops: int = 1) -> Handle:
        """Post: send ``send`` to rank+hops, receive from rank-hops into ``recv`` (allocated like ``send`` if
        None; its shape is what rank-hops sends, which may differ from ``send``'s: the ring's last K/V hop
        carries only the rows the receiver reads). ``hops`` is 1 on the ring; a ring that stops early sends
        dK/dV home in one longer hop."""
        ...


@runtime_checkable
class TransportGroup(Protocol):
    """A group that is not a torch.distributed ProcessGroup (e.g. ``seqpar.MPIGroup``)."""

    rank: int
    size: int

    def ring(self) -> Ring: ...

    def all_gather(self, x: torch.Tensor) -> list[torch.Tensor]: ...

    def all_gather_ints(self, values: list[int]) -> list[list[int]]: ...


class _Done:
    def __init__(self, t: torch.Tensor):
        self._t = t

    def wait(self) -> torch.Tensor:
        return self._t


class _Pending:
    def __init__(self, works, send: torch.Tensor, recv: torch.Tensor):
        self._works = works
        self._send = send  # keep the send buffer alive until the transfer is done
        self._recv = recv

    def wait(self) -> torch.Tensor:
        for w in self._works:
            w.wait()
        self._works = []
        self._send = None
        return self._recv


class LocalRing:
    """World size 1: the block "received" is the block sent."""

    rank = 0
    size = 1
    prev_rank = next_rank = 0

    def exchange(self, send, recv=None, *, tag=TAG_KV, hops=1):
        return _Done(send)


class TorchRing:
    """A ring over a torch.distributed process group (ranks in group order)."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.next_rank = dist.get_global_rank(group, (self.rank + 1) % self.size)
        self.prev_rank = dist.get_global_rank(group, (self.rank - 1) % self.size)

    def _peer(self, offset: int) -> int:
        return dist.get_global_rank(self.group, (self.rank + offset) % self.size)

    def exchange(self, send, recv=None, *, tag=TAG_KV, hops=1):
        if recv is None:
            recv = torch.empty_like(send)
        send = send.contiguous()
        to, frm = (self.next_rank, self.prev_rank) if hops == 1 else (self._peer(hops), self._peer(-hops))
        ops = [
            dist.P2POp(dist.isend, send, to, self.group, tag),
            dist.P2POp(dist.irecv, recv, frm, self.group, tag),
        ]
        return _Pending(dist.batch_isend_irecv(ops), send, recv)


def make_ring(group: dist.ProcessGroup | TransportGroup | None) -> Ring:
    """``None`` (or a 1-rank group) -> :class:`LocalRing`, else :class:`TorchRing` (or the
    transport group's own ring)."""
    if isinstance(group, TransportGroup):
        return group.ring()
    if group is None or dist.get_world_size(group) == 1:
        return LocalRing()
    return TorchRing(group)


def all_gather_tensor(x: torch.Tensor, group: dist.ProcessGroup | None) -> list[torch.Tensor]:
    """Every rank's ``x`` (same shape everywhere), in group rank order."""
    if isinstance(group, TransportGroup):
        return group.all_gather(x)
    if group is None or dist.get_world_size(group) == 1:
        return [x]
    x = x.contiguous()
    out = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, x, group=group)
    return out


def control_device(group) -> torch.device:
    """Where small control collectives of ``group`` run, the same device on every rank: the current
    CUDA device for NCCL, else the CPU."""
    if group is None or isinstance(group, TransportGroup):
        return torch.device("cpu")
    backend = str(dist.get_backend(group))
    if "nccl" in backend and "gloo" not in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_ints(values: list[int], group: dist.ProcessGroup | TransportGroup | None) -> list[list[int]]:
    """All-gather a short list of ints (same length on every rank) -> one list per rank."""
    if isinstance(group, TransportGroup):
        return group.all_gather_ints(values)
    t = torch.tensor(values, dtype=torch.int64, device=control_device(group))
    flat, n = torch.cat(all_gather_tensor(t, group)).tolist(), len(values)  # one read, not one per rank
    return [flat[i:i + n] for i in range(0, len(flat), n)]


def agree(group, signature: list[int], error: Exception | None, *, what: str, disagreement: Callable,
          code: int = 1, names: tuple[str, ...] = ()) -> None:
    """Every rank of ``group`` learns, in one small all-gather, whether any rank rejected its input and
    whether the ranks' ``signature``s (ints, the same count everywhere; zeros on a rank with an error)
    differ, and raises the same way on every rank, so no rank is left waiting:

    - this rank's own ``error`` (a rank that rejected its input);
    - else ``ValueError`` naming the ranks that rejected theirs (and, with ``names``, the argument each
      named: its ``code`` is 1 + the argument's index in ``names``);
    - else ``ValueError(what + ": " + disagreement(rows))`` when the signatures differ (``rows``: every
      rank's signature, in rank order).

    If the all-gather itself fails (the other ranks are not in it: they skipped or repeated a call, or
    one stopped), this rank raises its own ``error`` if it has one, else :class:`CommError`."""
    try:
        rows = gather_ints([0 if error is None else code, *signature], group)
    except RuntimeError as e:
        agreement_failed(what, error, e)
    judge(rows, error, what=what, disagreement=disagreement, names=names)


def agreement_failed(what: str, error: Exception | None, e: RuntimeError) -> NoReturn:
    """The gather of an agreement failed: this rank's own ``error`` if it has one, else :class:`CommError`."""
    if error is not None:
        raise error from e
    raise CommError(f"{what}: the cross-rank agreement failed (the other ranks did not join it: they skipped or "
                    f"repeated a call, or one of them stopped). Transport: {type(e).__name__}: {e}") from e


def judge(rows: list[list[int]], error: Exception | None, *, what: str, disagreement: Callable,
          names: tuple[str, ...] = ()) -> None:
    """:func:`agree`'s verdict on gathered ``rows`` (``[error code, *signature]`` per rank, in rank order):
    this rank's ``error``, else the other ranks' rejection, else a disagreement, else nothing."""
    if error is not None:
        raise error
    bad = {r: row[0] for r, row in enumerate(rows) if row[0]}
    if bad:
        args = f" (argument(s) {sorted({names[c - 1] for c in bad.values()})}; see the error there)" if names else \
            " (see their error)"
        raise ValueError(f"{what}: rank(s) {sorted(bad)} rejected their input{args}; no rank runs")
    if any(row[1:] != rows[0][1:] for row in rows):
        raise ValueError(f"{what}: {disagreement([row[1:] for row in rows])}")


def gather_rows(row: torch.Tensor, group: dist.ProcessGroup | TransportGroup | None,
                keep: torch.Tensor | None = None) -> tuple[list[list[int]], list[int]]:
    """All-gather the 1-D int64 ``row`` (the same length on every rank; on any device) -> (every rank's row in
    rank order, this rank's ``keep`` as ints), read to the host in **one** read: one host sync on a GPU,
    where :func:`gather_ints` reads each rank's row. ``keep`` (1-D int, any length) rides along the read
    without being gathered (the agreement on ``cu_seqlens`` gathers their checksum and keeps their values)."""
    keep = torch.zeros(0, dtype=torch.int64) if keep is None else keep.reshape(-1).to(torch.int64)
    n = row.numel()
    if isinstance(group, TransportGroup):  # a host transport: read first, then gather the ints
        flat = torch.cat([row.cpu(), keep.cpu()]).tolist()
        return group.all_gather_ints(flat[:n]), flat[n:]
    dev = control_device(group)
    local = torch.cat([row, keep.to(row.device)]).to(dev)  # one copy to the control device (a sync only off it)
    parts = all_gather_tensor(local[:n], group)
    flat = torch.cat([*parts, local[n:]]).tolist()
    return [flat[i * n:(i + 1) * n] for i in range(len(parts))], flat[len(parts) * n:]


def all_to_all(x: torch.Tensor, group: dist.ProcessGroup | None, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Split ``x`` into P equal chunks along ``scatter_dim`` and send chunk j to rank j; the chunks received
    (one from each rank) are concatenated along ``gather_dim`` in group rank order. E.g. (B, H, S/P, D) with
    scatter_dim=1, gather_dim=2 -> (B, H/P, S, D). ``None`` or a 1-rank group: ``x`` itself, nothing moves.
    torch.distributed groups (``dist.all_to_all_single``; gloo runs it on CPU) and transport groups with
    an ``all_to_all(send (P, *chunk)) -> recv`` method (``seqpar.MPIGroup``: mpi4py ``Ialltoall``)."""
    if isinstance(group, TransportGroup) and not hasattr(group, "all_to_all"):
        raise TypeError(f"group: {type(group).__name__} has no all-to-all; method='ulysses' needs a "
                        f"torch.distributed group or seqpar.MPIGroup (or use method='ring', which runs on every "
                        f"transport)")
    scatter_dim, gather_dim = scatter_dim % x.ndim, gather_dim % x.ndim
    P = 1 if group is None else group.size if isinstance(group, TransportGroup) else dist.get_world_size(group)
    if P == 1:
        return x
    n = x.shape[scatter_dim]
    if n % P:
        raise ValueError(f"all_to_all: dim {scatter_dim} of size {n} does not split into {P} equal chunks")
    send = x.unflatten(scatter_dim, (P, n // P)).movedim(scatter_dim, 0).contiguous()  # (P, *chunk)
    if isinstance(group, TransportGroup):
        recv = group.all_to_all(send)
    else:
        recv = torch.empty_like(send)
        if send.numel():
            dist.all_to_all_single(recv, send, group=group)
    return recv.movedim(0, gather_dim).flatten(gather_dim, gather_dim + 1)  # chunk i (from rank i) at block i


def reduce_scatter_tensor(x: torch.Tensor, group: dist.ProcessGroup | TransportGroup | None) -> torch.Tensor:
    """``x`` (P, ...) on every rank -> this rank's ``sum over ranks of x[rank]`` (shape ``x.shape[1:]``).
    ``None`` or a 1-rank group: ``x[0]``, nothing moves.

    torch.distributed: ``dist.reduce_scatter_single`` (the name of ``reduce_scatter_tensor`` since torch 2.13)
    on the flattened buffer: gloo (CPU) supports it, but only with "concatenated" shapes (input dim 0 = P x
    output dim 0), so both sides travel as 1-D views of contiguous buffers. ``seqpar.MPIGroup``: mpi4py
    ``Reduce_scatter_block`` with ``MPI.SUM`` on float32 / float64 buffers (others are refused). Other
    transport groups need a ``reduce_scatter(x)`` method."""
    if isinstance(group, TransportGroup):
        if hasattr(group, "reduce_scatter"):
            return group.reduce_scatter(x)
        from seqpar.comm.mpi import MPIGroup  # mpi imports this module

        if not isinstance(group, MPIGroup):
            raise TypeError(f"group: {type(group).__name__} has no reduce-scatter (a transport group needs a "
                            f"reduce_scatter(x) method); use method='ring', which runs on every transport")
        return _mpi_reduce_scatter(x, group)
    P = 1 if group is None else dist.get_world_size(group)
    if x.shape[0] != P:
        raise ValueError(f"reduce_scatter_tensor: dim 0 of x must be the group size {P}, got shape {tuple(x.shape)}")
    if P == 1:
        return x[0]
    x = x.contiguous()
    out = torch.empty(x.shape[1:], dtype=x.dtype, device=x.device)
    if out.numel():
        rs = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        rs(out.view(-1), x.view(-1), op=dist.ReduceOp.SUM, group=group)
    return out


def _mpi_reduce_scatter(x: torch.Tensor, group) -> torch.Tensor:
    """:func:`reduce_scatter_tensor` over an ``seqpar.MPIGroup`` (mpi4py ``Reduce_scatter_block``, MPI.SUM)."""
    if x.shape[0] != group.size:
        raise ValueError(f"reduce_scatter_tensor: dim 0 of x must be the group size {group.size}, got shape "
                         f"{tuple(x.shape)}")
    if group.size == 1:
        return x[0]
    if x.device.type != "cpu":
        raise ValueError(f"seqpar.MPIGroup moves CPU tensors only; the reduce-scatter buffer is on {x.device}")
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"seqpar.MPIGroup reduce-scatters float32 / float64 buffers only (MPI.SUM on numpy floats), "
                        f"got {x.dtype}")
    from mpi4py import MPI

    x = x.detach().contiguous()
    out = torch.empty(x.shape[1:], dtype=x.dtype)
    if out.numel():
        group.comm.Reduce_scatter_block(x.view(-1).numpy(), out.view(-1).numpy(), op=MPI.SUM)
    return out
