"""How a global sequence maps onto P ranks, and the causal structure of each ring tile.

Pure functions of (layout, sequence length, rank, world): no process groups here.

Note
----
A layout is a permutation of the global positions. With P = 2 and 8 tokens::

    global       0 1 2 3 4 5 6 7
    contiguous   r0: 0 1 2 3        r1: 4 5 6 7
    striped      r0: 0 2 4 6        r1: 1 3 5 7        rank r holds r, r+P, r+2P, ...
    zigzag       r0: 0 1 6 7        r1: 2 3 4 5        2P chunks; rank r holds chunks r, 2P-1-r

Under a causal mask the tile (query rank i, kv rank j) of the ring has one of a few shapes
(rows: the query rank's local tokens, columns: the kv rank's local tokens)::

    contiguous            striped                 zigzag
    j <  i: full          j <= i: causal          j <  i: all q x first half of kv, full
    j == i: causal        j >  i: strict          j == i: causal
    j >  i: skip                  (no diagonal)   j >  i: second half of q x all kv, full

      full     causal    strict    zigzag j<i   zigzag j>i
      x x x x  x . . .   . . . .   x x . .      . . . .
      x x x x  x x . .   x . . .   x x . .      . . . .
      x x x x  x x x .   x x . .   x x . .      x x x x
      x x x x  x x x x   x x x .   x x . .      x x x x

Contiguous leaves rank 0 one tile and rank P-1 P tiles (imbalanced); striped and zigzag give every
rank the same work at every ring step (striped: P tiles of ~S_local^2/2; zigzag: one causal tile
then P-1 half tiles of exactly S_local^2/2).
"""

from __future__ import annotations

import functools
import operator
from dataclasses import dataclass, field

import torch

from seqpar.kernels.backend import TileMask, as_mask
from seqpar.vocab import LAYOUT_CHOICES, LAYOUTS, Layout, check_choice

__all__ = [
    "Layout",
    "LAYOUTS",
    "Tile",
    "check_layout",
    "as_int",
    "check_offsets",
    "offsets_digest",
    "packed_chunks",
    "check_dim",
    "check_seq_len",
    "unit",
    "padding_needed",
    "global_indices",
    "shard_tensor",
    "unshard_tensor",
    "tile",
]

@dataclass(frozen=True)
class Tile:
    """The part of one (query block, kv block) pair that has work, and its mask kind.

    ``q`` and ``kv`` slice the local sequence dim of the query and the kv block; ``mask`` is the
    :class:`seqpar.kernels.TileMask` of the sliced tile.
    """

    mask: TileMask  # a kind name ("causal") is taken as TileMask("causal")
    q: slice = field(default_factory=lambda: slice(None))
    kv: slice = field(default_factory=lambda: slice(None))

    def __post_init__(self) -> None:
        object.__setattr__(self, "mask", as_mask(self.mask))

    @property
    def whole(self) -> bool:
        return self.q == slice(None) and self.kv == slice(None)


def check_layout(layout: str) -> None:
    check_choice("layout", layout, LAYOUT_CHOICES)


def check_offsets(cu_seqlens: object, seq_len: int, name: str = "cu_seqlens") -> tuple[int, ...]:
    """Global document offsets ``[0, s1, s1+s2, ..., S]`` (a 1-D int tensor or a list of ints) -> a tuple;
    ``TypeError``/``ValueError`` naming ``name`` unless they start at 0, increase strictly and end at ``seq_len``."""
    if isinstance(cu_seqlens, torch.Tensor):
        if cu_seqlens.ndim != 1 or cu_seqlens.is_floating_point() or cu_seqlens.is_complex() \
                or cu_seqlens.dtype == torch.bool:
            raise TypeError(f"{name} must be a 1-D integer tensor [0, s1, s1+s2, ..., S], got a "
                            f"{cu_seqlens.ndim}-D {cu_seqlens.dtype} tensor")
        values = [int(x) for x in cu_seqlens.tolist()]
    elif isinstance(cu_seqlens, (list, tuple)) and all(as_int(x) is not None for x in cu_seqlens):
        values = [as_int(x) for x in cu_seqlens]
    else:
        raise TypeError(f"{name} must be a 1-D integer tensor (or a list of ints) [0, s1, s1+s2, ..., S], got "
                        f"{type(cu_seqlens).__name__}")
    short = str(values) if len(values) <= 12 else f"[{', '.join(map(str, values[:6]))}, ..., {values[-1]}] " \
                                                   f"({len(values)} entries)"
    if len(values) < 2 or values[0] != 0 or values[-1] != seq_len:
        raise ValueError(f"{name} must start at 0 and end at the global sequence length S={seq_len} (global "
                         f"document offsets [0, s1, s1+s2, ..., S], the same on every rank), got {short}")
    bad = next((i for i in range(1, len(values)) if values[i] <= values[i - 1]), None)
    if bad is not None:
        raise ValueError(f"{name} must be strictly increasing (every document at least one token), got "
                         f"{values[bad - 1]} then {values[bad]} at index {bad}: {short}")
    return tuple(values)


_DIGEST_MOD, _DIGEST_MUL = 2**31 - 1, 48271  # a Lehmer (Park-Miller) generator's modulus and multiplier


def offsets_digest(cu_seqlens: torch.Tensor, seq_len: int) -> torch.Tensor:
    """A 1-D integer tensor of offsets -> int64 ``[count, checksum, valid]`` on its device, without reading it
    to the host (no sync): what ranks gather to agree on their ``cu_seqlens`` without a read per check.
    ``checksum``: sum of ``(offset mod M) * w_i mod M`` with distinct weights ``w_i`` (M = 2**31 - 1; exact
    int64, the same on every device); ``valid``: 1 iff :func:`check_offsets` accepts them (start at 0,
    strictly increasing, end at ``seq_len``)."""
    x = cu_seqlens.reshape(-1).to(torch.int64)
    n = x.numel()
    i = torch.arange(1, n + 1, dtype=torch.int64, device=x.device)
    w = (i * _DIGEST_MUL) % _DIGEST_MOD + 1
    checksum = ((x % _DIGEST_MOD) * w % _DIGEST_MOD).sum() % _DIGEST_MOD
    if n < 2:
        valid = torch.zeros((), dtype=torch.int64, device=x.device)
    else:
        valid = ((x[0] == 0) & (x[-1] == seq_len) & (x[1:] > x[:-1]).all()).to(torch.int64)
    return torch.stack([torch.full((), n, dtype=torch.int64, device=x.device), checksum, valid])


@functools.lru_cache(maxsize=256)
def packed_chunks(cu: tuple[int, ...], world: int) -> tuple[tuple[tuple[int, int], ...], ...]:
    """The ``packed`` layout: per rank, its (global start, length) runs in local order.

    Every document is cut into 2P chunks, rank r taking chunks r and 2P-1-r (zigzag inside each
    document, so the causal work of every document is balanced over the ranks). A document of length
    L = 2P q + m gives each chunk q tokens plus one of its m extra tokens, dealt round-robin over the
    ranks by one counter that runs on across documents (a rank takes an extra in its first chunk, then
    in its second), so every rank holds exactly S/P tokens and no document is padded."""
    P = world
    runs: list[list[tuple[int, int]]] = [[] for _ in range(P)]
    counter = 0
    for a, b in zip(cu, cu[1:]):
        q, m = divmod(b - a, 2 * P)
        sizes = [q] * (2 * P)
        for e in range(m):
            r = (counter + e) % P
            sizes[r if sizes[r] == q else 2 * P - 1 - r] += 1
        counter += m
        starts = [a + sum(sizes[:c]) for c in range(2 * P)]
        for r in range(P):
            for c in (r, 2 * P - 1 - r):
                if sizes[c]:
                    runs[r].append((starts[c], sizes[c]))
    return tuple(tuple(r) for r in runs)


def as_int(value: object) -> int | None:
    """``value`` as an int if it is an integer (int, numpy int, 0-d integer tensor), not a bool; else None."""
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def check_dim(dim: object, ndim: int, tensor: str = "x", name: str = "dim") -> int:
    """``dim`` of a ``ndim``-D tensor named ``tensor`` -> the non-negative dim; ``TypeError`` unless it is
    an int (not a bool), ``ValueError`` unless ``-ndim <= dim < ndim`` (never taken modulo ``ndim``)."""
    d = as_int(dim)
    if d is None:
        raise TypeError(f"{name} must be an int (the sequence dim of {tensor}), got {type(dim).__name__} {dim!r}")
    if ndim == 0:
        raise ValueError(f"{tensor} is a 0-D tensor (a scalar): it has no sequence dim; pass a tensor with the "
                         f"sequence along {name}")
    if not -ndim <= d < ndim:
        raise ValueError(f"{name}={d} is out of range for a {ndim}-D tensor {tensor}: pass a dim in "
                         f"[{-ndim}, {ndim - 1}] (the sequence dim, e.g. {name}=2 for (B, H, S, D))")
    return d % ndim


def check_seq_len(seq_len: object, name: str = "seq_len") -> int:
    """``seq_len`` -> an int >= 1: ``TypeError`` unless an int (not a bool), ``ValueError`` if < 1."""
    n = as_int(seq_len)
    if n is None:
        raise TypeError(f"{name} must be an int (the global sequence length), got {type(seq_len).__name__} "
                        f"{seq_len!r}")
    if n < 1:
        raise ValueError(f"{name} must be a positive int (the global sequence length), got {n}")
    return n


def unit(layout: str, world: int) -> int:
    """The global sequence length must be a multiple of this."""
    check_layout(layout)
    return 2 * world if layout == "zigzag" else world


def _packed_cu(cu_seqlens, seq_len: int) -> tuple[int, ...]:
    """The documents of the ``packed`` layout (one document when ``cu_seqlens`` is None)."""
    return (0, seq_len) if cu_seqlens is None else check_offsets(cu_seqlens, seq_len)


def padding_needed(seq_len: int, layout: str, world: int) -> int:
    """How many tokens to append so ``seq_len`` divides evenly under ``layout``."""
    return (-seq_len) % unit(layout, world)


def _check_len(seq_len: int, layout: str, world: int, what: str = "seq_len") -> None:
    if seq_len < 1:
        raise ValueError(f"{what}={seq_len}: the sequence is empty; seqpar shards a sequence of at least "
                         f"{unit(layout, world)} tokens along it (layout={layout!r} over {world} ranks)")
    pad = padding_needed(seq_len, layout, world)
    if pad:
        u = unit(layout, world)
        raise ValueError(
            f"{what}={seq_len} is not divisible by {u} (layout={layout!r} over {world} ranks needs a "
            f"multiple of {u}); pad the sequence by {pad} tokens to {seq_len + pad}"
        )


def global_indices(seq_len: int, rank: int, world: int, layout: str, cu_seqlens=None) -> torch.Tensor:
    """LongTensor (seq_len // world,): the global positions of ``rank``'s tokens, in local order
    (``cu_seqlens``: the documents of the ``packed`` layout; ignored by the others)."""
    seq_len = check_seq_len(seq_len)
    check_layout(layout)
    _check_len(seq_len, layout, world)
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, {world}), got {rank}")
    n = seq_len // world
    if layout == "packed":
        runs = packed_chunks(_packed_cu(cu_seqlens, seq_len), world)[rank]
        return torch.cat([torch.arange(g, g + k) for g, k in runs])
    if layout == "contiguous":
        return torch.arange(rank * n, (rank + 1) * n)
    if layout == "striped":
        return torch.arange(rank, seq_len, world)
    c = seq_len // (2 * world)  # zigzag chunk length
    first = torch.arange(rank * c, (rank + 1) * c)
    second = torch.arange((2 * world - 1 - rank) * c, (2 * world - rank) * c)
    return torch.cat([first, second])


def shard_tensor(x: torch.Tensor, dim: int, rank: int, world: int, layout: str, cu_seqlens=None) -> torch.Tensor:
    """``x`` (..., S, ...) -> this rank's (..., S/P, ...) along ``dim`` (a view where possible)."""
    check_layout(layout)
    dim = check_dim(dim, x.ndim)
    S = x.shape[dim]
    _check_len(S, layout, world, what=f"x.shape[{dim}]")
    n = S // world
    if layout == "packed":
        runs = packed_chunks(_packed_cu(cu_seqlens, S), world)[rank]
        return torch.cat([x.narrow(dim, g, k) for g, k in runs], dim=dim)
    if layout == "contiguous":
        return x.narrow(dim, rank * n, n)
    if layout == "striped":
        return x.unflatten(dim, (n, world)).select(dim + 1, rank)
    c = n // 2
    return torch.cat(
        [x.narrow(dim, rank * c, c), x.narrow(dim, (2 * world - 1 - rank) * c, c)], dim=dim
    )


def unshard_tensor(shards: list[torch.Tensor], dim: int, layout: str, cu_seqlens=None) -> torch.Tensor:
    """Inverse of :func:`shard_tensor`: the P shards in rank order -> the global tensor."""
    check_layout(layout)
    dim = check_dim(dim, shards[0].ndim, tensor="the shards")
    L = shards[0].shape[dim]
    if any(s.shape != shards[0].shape for s in shards):
        raise ValueError(f"the shards must have one shape, got {[tuple(s.shape) for s in shards]}")
    if layout == "packed":
        world = len(shards)
        order = torch.cat([global_indices(L * world, r, world, layout, cu_seqlens) for r in range(world)])
        return torch.cat(shards, dim=dim).index_select(dim, torch.argsort(order).to(shards[0].device))
    if layout == "zigzag" and L % 2:
        raise ValueError(f"layout='zigzag' shards hold two halves of equal length, got shards of odd length {L} "
                         f"along dim {dim}")
    if layout == "contiguous":
        return torch.cat(shards, dim=dim)
    if layout == "striped":
        return torch.stack(shards, dim=dim + 1).flatten(dim, dim + 1)
    c = shards[0].shape[dim] // 2
    firsts = [s.narrow(dim, 0, c) for s in shards]
    seconds = [s.narrow(dim, c, c) for s in reversed(shards)]
    return torch.cat(firsts + seconds, dim=dim)


def tile(layout: str, causal: bool, q_rank: int, kv_rank: int, world: int, s_local: int) -> Tile | None:
    """The work of the tile (query block of ``q_rank``, kv block of ``kv_rank``); ``None`` = skip."""
    check_layout(layout)
    if not causal:
        return Tile("full")
    if q_rank == kv_rank:
        return Tile("causal")
    if layout == "contiguous":
        return Tile("full") if kv_rank < q_rank else None
    if layout == "striped":
        return Tile("causal") if kv_rank < q_rank else Tile("strict")
    half = s_local // 2  # zigzag
    if kv_rank < q_rank:
        return Tile("full", kv=slice(0, half))
    return Tile("full", q=slice(half, s_local))
