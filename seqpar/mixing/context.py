"""The distributed :class:`~seqpar.mixing.base.MixerContext`: halos and entry states over a group.

``make_context(group, layout, seq_len, cu_seqlens)`` -> a :class:`DistContext` whose ``runs`` are this
rank's (:mod:`seqpar.mixing.runs`; every rank knows every rank's runs without communicating) and whose two
exchanges are one all-gather each, of a buffer whose size does not grow with S (except under striped, where
every token is a run):

- ``halo(x, width)``: every rank sends the last ``min(width, len)`` rows of each of its runs; each run takes the
  ``width`` rows before its first token from the runs that precede it in global order (several when they are
  shorter than ``width``; zeros before global position 0). Backward: the gathered buffer's gradient is
  reduce-scattered, so each row's gradient reaches its owner, summed over every rank that read it.
- ``entry_states(maps, kind)``: every rank sends its runs' ``(M, b)`` in fp32; every rank scans all ``n`` runs in
  global order, ``h_0 = 0``, ``h_{i+1} = M_i . h_i + b_i``, and keeps the ``h_i`` of its own runs. Backward:
  the same reduce-scatter, so each rank gets the sum over ranks of the gradient of its own maps.

Note
----
P = 4, zigzag: 8 chunks, rank r holds chunks r and 7-r; rank 3's chunks 3 and 4 touch and form one run,
so there are n = 2P-1 = 7 runs::

    global     | c0 | c1 | c2 | c3 c4 | c5 | c6 | c7 |
    owner      | r0 | r1 | r2 |  r3   | r2 | r1 | r0 |
    run        |  0 |  1 |  2 |   3   |  4 |  5 |  6 |

    scan       h0 = 0 -> h1 = M0.h0 + b0 -> h2 = M1.h1 + b1 -> ... -> h6 = M5.h5 + b5
               (M_i, b_i: the map of run i, gathered from its owner; rank 1 keeps h1 and h5)

    halo       run 1 (r1) <- last `width` rows of c0 (r0)     a rank's two runs have different
               run 5 (r1) <- last `width` rows of c5 (r2)     predecessors, both in the one gather
               run 0 (r0) <- zeros                            (a run shorter than `width`: its own
                                                               predecessors fill the rest, then zeros)

The scan is sequential: O(n) maps applied on every rank (n = 2P-1 under zigzag, about 2P per document
under packed), after one all-gather. A tree (Blelloch) scan over ranks would need log2(P) exchange rounds
and composes maps (``M2 . M1``: an a x a x a matmul for ``"matrix"`` maps, costlier than an apply
``M . h``, a x a x c); it pays only when the n applies on one rank cost more than log2(P) collective
latencies, i.e. at thousands of runs or large states (a, c >= 256) -- not at the P <= 64 of a CP group.

All ranks must call ``halo`` / ``entry_states`` in the same order with the same non-sequence shapes (the
adapters do: they run in the same layer order everywhere), and every rank must back-propagate through what
it received (its output reaches the loss), since the backward's reduce-scatter is a collective.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

from seqpar.comm import TransportGroup, all_gather_tensor, reduce_scatter_tensor
from seqpar.layout import check_dim
from seqpar.mesh import group_rank_size, resolve_group
from seqpar.mixing.base import MapKind, Runs, apply_map, scan_dtype
from seqpar.mixing.runs import all_runs

__all__ = ["DistContext", "make_context"]

_KINDS = ("matrix", "scale")


class _AllGather(torch.autograd.Function):
    """``x`` (...) on every rank -> (P, ...) in rank order; backward: reduce-scatter (each rank gets the sum over
    ranks of the gradient of its own slice), in fp32 for lower-precision gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return torch.stack(all_gather_tensor(x.contiguous(), group))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        g = grad if grad.dtype in (torch.float32, torch.float64) else grad.float()
        return reduce_scatter_tensor(g.contiguous(), ctx.group).to(grad.dtype), None


class _ZerosLike(torch.autograd.Function):
    """Zeros of ``shape`` that depend on ``x`` in the graph (gradient zero): the first run's entry state stays
    connected to the gather, so every rank's backward reaches the reduce-scatter."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x.new_zeros(shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        return torch.zeros_like(x), None


def _global_order(runs: tuple[Runs, ...]) -> tuple[tuple[int, int], ...]:
    """(rank, local run) of every run, in global run order."""
    order: list[tuple[int, int] | None] = [None] * runs[0].n
    for r, rr in enumerate(runs):
        for j, i in enumerate(rr.index):
            order[i] = (r, j)
    return tuple(order)  # type: ignore[arg-type]


def _halo_plan(runs: tuple[Runs, ...], rank: int, width: int) -> tuple[tuple[int, ...], int, tuple[int, ...]]:
    """(local rows this rank sends, rows per rank's buffer T, rows of [gathered (P*T) ; one zero row] that make up
    this rank's halos, ``width`` per run in local run order)."""
    tails = [[min(width, b - a) for a, b in rr.bounds] for rr in runs]
    offsets = [[sum(t[:j]) for j in range(len(t))] for t in tails]
    T = max(sum(t) for t in tails)
    send = tuple(i for (a, b), t in zip(runs[rank].bounds, tails[rank]) for i in range(b - t, b))
    order = _global_order(runs)
    zero = len(runs) * T
    recv: list[int] = []
    for i in runs[rank].index:
        rows: list[int] = []  # the `width` rows before run i, walked backwards from its predecessor
        k = i - 1
        while len(rows) < width and k >= 0:
            r, j = order[k]
            take = min(width - len(rows), tails[r][j])
            base = r * T + offsets[r][j] + tails[r][j]  # one past the run's last row in the gathered buffer
            rows = list(range(base - take, base)) + rows
            k -= 1
        recv += [zero] * (width - len(rows)) + rows
    return send, T, tuple(recv)


class DistContext:
    """:class:`~seqpar.mixing.base.MixerContext` over ``group`` (a ProcessGroup, a
    :class:`seqpar.comm.TransportGroup` such as ``seqpar.MPIGroup`` or ``ThreadGroup``, or ``None`` for one
    process), given every rank's :class:`Runs` in rank order (``runs_of_all_ranks``; see
    :func:`seqpar.mixing.runs.all_runs`). With one rank nothing is communicated.

    Payload per call (C: the product of ``x``'s non-sequence dims; R: the most runs a rank holds, 1 contiguous,
    2 zigzag, about 2 per document packed):

    - ``halo``: each rank sends T = max over ranks of sum over its runs of min(width, run length) rows of C
      elements (<= R * width; S / P under striped) and receives P * T; the backward reduce-scatters as much.
    - ``entry_states``: each rank sends R * (|M| + |b|) fp32 numbers and receives P times that; the backward
      reduce-scatters as much.
    """

    def __init__(self, group, runs_of_all_ranks: Sequence[Runs]):
        if group is not None and not isinstance(group, (dist.ProcessGroup, TransportGroup)):
            raise TypeError(f"group must be a ProcessGroup, a seqpar TransportGroup or None (one process), got "
                            f"{type(group).__name__}; make_context(group, ...) also resolves a DeviceMesh")
        all_r = tuple(runs_of_all_ranks)
        if not all_r or not all(isinstance(r, Runs) for r in all_r):
            raise TypeError("runs_of_all_ranks must be a non-empty sequence of Runs, one per rank "
                            "(seqpar.mixing.runs.all_runs)")
        rank, size = group_rank_size(group)
        if len(all_r) != size:
            raise ValueError(f"runs_of_all_ranks has {len(all_r)} entries for a group of {size} ranks: pass every "
                             f"rank's Runs, in rank order")
        n = all_r[0].n
        if sorted(i for r in all_r for i in r.index) != list(range(n)) or any(r.n != n for r in all_r):
            raise ValueError("runs_of_all_ranks: the runs' index must number all ranks' runs 0 .. n-1 exactly once")
        self.group = group
        self.rank, self.size = rank, size
        self.all_runs = all_r
        self.runs = all_r[rank]
        self._plans: dict[int, tuple] = {}  # width -> _halo_plan (the layers of one forward share a width)

    # -- local ---------------------------------------------------------------------------------------------
    def _check_x(self, x: object, dim: object, what: str) -> int:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{what}: x must be a tensor, got {type(x).__name__}")
        d = check_dim(dim, x.ndim)
        if x.shape[d] != self.runs.length:
            raise ValueError(f"{what}: x.shape[{d}] = {x.shape[d]} is not this rank's token count "
                             f"{self.runs.length}; pass dim= the sequence dim of x (local tokens)")
        return d

    def split(self, x: torch.Tensor, dim: int = 1) -> list[torch.Tensor]:
        d = self._check_x(x, dim, "split")
        return [x.narrow(d, a, b - a) for a, b in self.runs.bounds]

    def join(self, pieces: list[torch.Tensor], dim: int = 1) -> torch.Tensor:
        if len(pieces) != len(self.runs.bounds):
            raise ValueError(f"join: pieces has {len(pieces)} entries, this rank has {len(self.runs.bounds)} runs")
        return torch.cat(pieces, dim=dim)

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        """x (...) -> (P, ...), differentiable (no communication with one rank)."""
        if self.size == 1:
            return x.unsqueeze(0)
        return _AllGather.apply(x, self.group)

    # -- halo ----------------------------------------------------------------------------------------------
    def halo(self, x: torch.Tensor, width: int, dim: int = 1) -> list[torch.Tensor]:
        """Per run: ``width`` rows before its first token in global order (zeros before position 0), then the run's
        own rows of ``x`` along ``dim``. One all-gather of T rows per rank (see the class)."""
        d = self._check_x(x, dim, "halo")
        if isinstance(width, bool) or not isinstance(width, int):
            raise TypeError(f"halo: width must be an int (rows before each run), got {type(width).__name__}")
        if width < 0:
            raise ValueError(f"halo: width must be >= 0 (rows before each run, e.g. kernel_size - 1), got {width}")
        pieces = self.split(x, d)
        if width == 0:
            return pieces
        if width not in self._plans:
            self._plans[width] = _halo_plan(self.all_runs, self.rank, width)
        send, T, recv = self._plans[width]
        xs = x.movedim(d, 0)  # (S_local, *rest)
        buf = xs.index_select(0, torch.tensor(send, dtype=torch.long, device=x.device))  # (T_rank, *rest)
        if buf.shape[0] < T:
            buf = torch.cat([buf, buf.new_zeros((T - buf.shape[0], *buf.shape[1:]))])
        gathered = self._gather(buf).flatten(0, 1)  # (P * T, *rest)
        gathered = torch.cat([gathered, gathered.new_zeros((1, *gathered.shape[1:]))])  # + the zero row
        rows = gathered.index_select(0, torch.tensor(recv, dtype=torch.long, device=x.device))
        halos = rows.movedim(0, d).split(width, dim=d)  # one (..., width, ...) per run
        return [torch.cat([h, p], dim=d) for h, p in zip(halos, pieces)]

    # -- entry states --------------------------------------------------------------------------------------
    def _check_maps(self, maps: object, kind: object) -> tuple[torch.Size, torch.Size]:
        if kind not in _KINDS:
            raise ValueError(f"entry_states: kind must be one of {_KINDS} (how M acts on a state), got {kind!r}")
        nruns = len(self.runs.bounds)
        if not isinstance(maps, (list, tuple)):
            raise TypeError(f"entry_states: maps must be a list of (M, b) pairs, one per run, got "
                            f"{type(maps).__name__}")
        if len(maps) != nruns:
            raise ValueError(f"entry_states: maps has {len(maps)} entries, this rank has {nruns} runs: pass one "
                             f"(M, b) per run, in local run order (ctx.runs)")
        for i, mb in enumerate(maps):
            if not (isinstance(mb, (list, tuple)) and len(mb) == 2 and all(isinstance(t, torch.Tensor) for t in mb)):
                raise TypeError(f"entry_states: maps[{i}] must be a pair of tensors (M, b)")
            if not (mb[0].is_floating_point() and mb[1].is_floating_point()):
                raise TypeError(f"entry_states: maps[{i}] must be floating-point, got {mb[0].dtype}, {mb[1].dtype}")
        m_shape, b_shape = maps[0][0].shape, maps[0][1].shape
        for i, (m, b) in enumerate(maps):
            if m.shape != m_shape or b.shape != b_shape:
                raise ValueError(f"entry_states: maps[{i}] has shapes M {tuple(m.shape)}, b {tuple(b.shape)}; maps[0] "
                                 f"has M {tuple(m_shape)}, b {tuple(b_shape)}: every run's map must have one shape")
            if m.device != maps[0][0].device or b.device != maps[0][0].device:
                raise ValueError(f"entry_states: maps[{i}] is on {m.device} / {b.device}, maps[0] on "
                                 f"{maps[0][0].device}: put every map on one device")
        try:
            if kind == "matrix":
                ok = len(m_shape) >= 2 and len(b_shape) >= 2 and m_shape[-1] == m_shape[-2] == b_shape[-2] \
                    and torch.broadcast_shapes(m_shape[:-2], b_shape[:-2]) == b_shape[:-2]
            else:
                ok = torch.broadcast_shapes(m_shape, b_shape) == b_shape
        except RuntimeError:
            ok = False
        if not ok:
            want = "M (..., a, a) and b (..., a, c), M's batch dims broadcasting to b's" if kind == "matrix" else \
                "M broadcasting to b's shape"
            raise ValueError(f"entry_states: maps with M {tuple(m_shape)} and b {tuple(b_shape)} do not fit "
                             f"kind={kind!r}: it needs {want}")
        return m_shape, b_shape

    def entry_states(self, maps: list[tuple[torch.Tensor, torch.Tensor]], kind: MapKind) -> list[torch.Tensor]:
        """Per run (local order): its entry state (fp32; fp64 when a map is fp64), shaped like ``b``, from every rank's
        maps. One all-gather of R * (|M| + |b|) such numbers per rank, then a sequential scan of the n runs in global order (see the
        module's Note)."""
        m_shape, b_shape = self._check_maps(maps, kind)
        nm = m_shape.numel()
        R = max(len(r.bounds) for r in self.all_runs)
        dt = scan_dtype(maps)
        rows = torch.stack([torch.cat([m.to(dt).reshape(-1), b.to(dt).reshape(-1)]) for m, b in maps])  # (runs, F)
        if rows.shape[0] < R:
            rows = torch.cat([rows, rows.new_zeros((R - rows.shape[0], rows.shape[1]))])
        gathered = self._gather(rows)  # (P, R, F)
        own = dict(zip(self.runs.index, range(len(maps))))
        out: list[torch.Tensor | None] = [None] * len(maps)
        h = _ZerosLike.apply(gathered, tuple(b_shape))
        last = max(self.runs.index)
        for i, (r, j) in enumerate(_global_order(self.all_runs)[:last + 1]):
            if i in own:
                out[own[i]] = h
            if i < last:
                row = gathered[r, j]
                h = apply_map(row[:nm].view(m_shape), row[nm:].view(b_shape), h, kind)
        return out  # type: ignore[return-value]


def make_context(group, layout: str, seq_len: int, cu_seqlens=None) -> DistContext:
    """The context of one forward: ``group`` (a ProcessGroup, a 1-D DeviceMesh or one with a "cp" dim, a
    TransportGroup, or None: the default world if torch.distributed is initialised, else one process), the
    layout the sequence is sharded with, the global length and (``layout="packed"``) the documents. Every
    rank's runs are computed locally (cached); nothing is communicated here."""
    g = resolve_group(group)
    _, size = group_rank_size(g)
    return DistContext(g, all_runs(seq_len, size, layout, cu_seqlens))
