"""Every rank's runs of consecutive global positions under a layout: pure functions, cached.

A run is a maximal stretch of a rank's tokens, in local order, whose global positions are consecutive.
Its ``index`` is its place among all ranks' runs sorted by global start (the order a recurrence visits
them); ``n`` counts them. The runs of all ranks tile ``[0, S)`` with no gap, so the run before run ``i``
in global order ends exactly where run ``i`` starts.

Note
----
P = 2, S = 16 (``|`` separates runs, ``runK``: global run index K)::

    contiguous   r0: 0..7 (run0)                  r1: 8..15 (run1)                       n = P
    zigzag       r0: 0..3 (run0) | 12..15 (run3)  r1: 4..7 (run1) 8..11 (run2) merged: 4..11 (run1), n = 3
    striped      r0: 0 | 2 | 4 | ...              r1: 1 | 3 | 5 | ...                    n = S (every token)
    packed       per document the zigzag of its 2P chunks; empty chunks vanish, touching ones merge

Rank P-1's two zigzag chunks touch (chunks P-1 and P), so zigzag has 2P-1 runs; striped has one run per
token, so a mixer's payload under striped grows with S (state passing is for contiguous / zigzag /
packed). Runs ignore document boundaries: a run may hold the end of one document and the start of the
next (packed with short documents); the adapter resets its state where ``cu_seqlens`` says so.
"""

from __future__ import annotations

import functools

import torch

from seqpar.layout import check_layout, check_offsets, check_seq_len, global_indices
from seqpar.mixing.base import Runs

__all__ = ["local_runs", "all_runs"]


def _check(seq_len: object, world: object, layout: str, cu_seqlens) -> tuple[int, int, tuple[int, ...] | None]:
    seq_len = check_seq_len(seq_len)
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"world must be a positive int (the number of ranks), got {world!r}")
    check_layout(layout)
    cu = None
    if layout == "packed" and cu_seqlens is not None:
        cu = check_offsets(cu_seqlens, seq_len)
    return seq_len, world, cu


def all_runs(seq_len: int, world: int, layout: str, cu_seqlens=None) -> tuple[Runs, ...]:
    """Every rank's :class:`Runs`, in rank order (``cu_seqlens``: the documents of ``layout="packed"``, a tuple,
    list or 1-D int tensor of global offsets; ignored by the other layouts, as in
    :func:`seqpar.layout.global_indices`)."""
    seq_len, world, cu = _check(seq_len, world, layout, cu_seqlens)
    return _all_runs(seq_len, world, layout, cu)


def local_runs(seq_len: int, rank: int, world: int, layout: str, cu_seqlens=None) -> Runs:
    """``rank``'s :class:`Runs` (see :func:`all_runs`)."""
    seq_len, world, cu = _check(seq_len, world, layout, cu_seqlens)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world:
        raise ValueError(f"rank must be an int in [0, {world}), got {rank!r}")
    return _all_runs(seq_len, world, layout, cu)[rank]


@functools.lru_cache(maxsize=64)
def _all_runs(seq_len: int, world: int, layout: str, cu: tuple[int, ...] | None) -> tuple[Runs, ...]:
    per_rank = []  # per rank: (local start, local end, global start) of each run
    for r in range(world):
        pos = global_indices(seq_len, r, world, layout, cu)  # (S/P,)
        cut = (torch.nonzero(pos[1:] != pos[:-1] + 1).flatten() + 1).tolist()
        edges = [0, *cut, pos.numel()]
        first = pos[edges[:-1]].tolist()
        per_rank.append([(a, b, g) for a, b, g in zip(edges, edges[1:], first)])
    order = sorted((g, r, j) for r, runs in enumerate(per_rank) for j, (_, _, g) in enumerate(runs))
    index = {(r, j): i for i, (_, r, j) in enumerate(order)}
    n = len(order)
    return tuple(Runs(bounds=tuple((a, b) for a, b, _ in runs), starts=tuple(g for _, _, g in runs),
                      index=tuple(index[r, j] for j in range(len(runs))), n=n)
                 for r, runs in enumerate(per_rank))
