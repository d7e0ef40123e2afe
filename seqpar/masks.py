"""The mask of one attention call, and the ring's tile planner: global mask -> per-tile :class:`TileMask` pieces.

Pure functions of (mask, layout, ranks, lengths): no process groups, no tensors of data.

A call's mask (:class:`MaskSpec`) is stated in *global* positions: causal (key <= query), a
sliding window ``(left, right)`` (query i sees key j iff ``i - left <= j <= i + right``; -1 =
unbounded), packed documents ``cu_seqlens`` (``[0, s1, s1+s2, ..., S]``: attention stays inside a
document) and a logit soft-cap. The planner turns it into the work of one (query rank, kv rank) tile.

Note
----
Each rank's shard is one or two *runs*: arithmetic progressions of global positions (contiguous: one
run of stride 1; striped: one run of stride P; zigzag: two runs of stride 1). For a query run
``q_i = a + t i`` and a kv run ``k_j = b + t j`` every mask above is a band on ``j - i``::

    causal       k_j <= q_i           <=>  j - i <= floor((a - b) / t)            = hi
    window left  k_j >= q_i - left    <=>  j - i >= ceil((a - b - left) / t)      = lo
    window right k_j <= q_i + right   <=>  j - i <= floor((a - b + right) / t)    (min with hi)
    documents    doc(q_i) == doc(k_j):     each run cuts into one segment per document

One run pair gives at most one piece: the rows and columns that see anything (trimmed to the band
and to the documents both sides share), with the band re-based to the piece's corner::

    kv run ->                                  piece = [rows r0..r1] x [cols c0..c1]
    q   . . . . . . . .                         mask  = TileMask(lo', hi', docs, softcap)
    run . x x x . . . .   <- r0
        . . x x x . . .                         a run pair with nothing visible: no piece,
        . . . x x x . .   <- r1                 a tile with no piece: no kernel call, and when no
              ^c0   ^c1                         rank has work left the ring stops early

Without a window or documents the planner returns :func:`seqpar.layout.tile` (the layouts' own
tiles: zigzag's half tiles stay one kernel call).
"""

from __future__ import annotations

import bisect
import functools
import math
import struct
import zlib
from dataclasses import dataclass

from seqpar.kernels.backend import Segment, TileMask
from seqpar.layout import Tile, as_int, check_layout, check_offsets, packed_chunks, tile

__all__ = ["MaskSpec", "Run", "runs", "plan_tile", "last_step", "sequence_tile", "visible_pairs",
           "mask_spec", "mask_signature"]


@dataclass(frozen=True)
class MaskSpec:
    """One call's mask in global positions (hashable: the planner caches by it)."""

    causal: bool = False
    window: tuple[int, int] = (-1, -1)  # (left, right); -1 = unbounded
    cu_seqlens: tuple[int, ...] | None = None  # (0, s1, s1+s2, ..., S) global document offsets
    softcap: float = 0.0

    @property
    def structured(self) -> bool:
        """Needs the run planner (a window or documents); else the layouts' own tiles do."""
        return self.window != (-1, -1) or self.cu_seqlens is not None


@dataclass(frozen=True)
class Run:
    """``n`` local positions ``start .. start+n-1`` holding global positions ``g0, g0+stride, ...``."""

    start: int
    n: int
    g0: int
    stride: int


def runs(layout: str, seq_len: int, rank: int, world: int, cu_seqlens: tuple[int, ...] | None = None) -> tuple[Run, ...]:
    """``rank``'s shard of a sequence of ``seq_len`` as runs, in local order (``cu_seqlens``: the
    documents the ``packed`` layout deals; one run per non-empty chunk of a document)."""
    check_layout(layout)
    n = seq_len // world
    if layout == "packed":
        out, start = [], 0
        for g0, k in packed_chunks(cu_seqlens or (0, seq_len), world)[rank]:
            out.append(Run(start, k, g0, 1))
            start += k
        return tuple(out)
    if layout == "contiguous":
        return (Run(0, n, rank * n, 1),)
    if layout == "striped":
        return (Run(0, n, rank, world),)
    c = n // 2
    return (Run(0, c, rank * c, 1), Run(c, c, (2 * world - 1 - rank) * c, 1))


def _floor_div(a: int, b: int) -> int:
    return a // b


def _ceil_div(a: int, b: int) -> int:
    return -((-a) // b)


def _segments(cu: tuple[int, ...], r: Run, lo: int, hi: int) -> list[Segment]:
    """The document segments of run ``r``'s local indices ``lo..hi`` (inclusive), run-relative."""
    g_lo, g_hi = r.g0 + r.stride * lo, r.g0 + r.stride * hi
    d0, d1 = bisect.bisect_right(cu, g_lo) - 1, bisect.bisect_right(cu, g_hi) - 1
    segs = []
    for d in range(d0, d1 + 1):
        a = max(lo, _ceil_div(cu[d] - r.g0, r.stride))
        b = min(hi + 1, _ceil_div(cu[d + 1] - r.g0, r.stride))
        if a < b:
            segs.append((a, b, d))
    return segs


def _band(spec: MaskSpec, qr: Run, kr: Run) -> tuple[int | None, int | None]:
    """(lo, hi) on j - i for query run ``qr`` x kv run ``kr`` (None: unbounded)."""
    t, d = qr.stride, qr.g0 - kr.g0
    left, right = spec.window
    lo = _ceil_div(d - left, t) if left >= 0 else None
    his = ([_floor_div(d, t)] if spec.causal else []) + ([_floor_div(d + right, t)] if right >= 0 else [])
    return lo, (min(his) if his else None)


def _rect(lo, hi, r0: int, r1: int, c0: int, c1: int) -> tuple[int, int, int, int] | None:
    """The rows / cols of the rectangle [r0..r1] x [c0..c1] that see anything under the band, or None."""
    if lo is not None and hi is not None and lo > hi:
        return None
    if hi is not None:
        r0 = max(r0, c0 - hi)  # row i sees a column only if i + hi >= c0
    if lo is not None:
        r1 = min(r1, c1 - lo)  # ... and i + lo <= c1
    if r0 > r1:
        return None
    if lo is not None:
        c0 = max(c0, r0 + lo)
    if hi is not None:
        c1 = min(c1, r1 + hi)
    return (r0, r1, c0, c1) if c0 <= c1 else None


def _kind(lo: int | None, hi: int | None, nq: int, nk: int) -> tuple[str, int | None, int | None]:
    """The plainest TileMask (kind, lo, hi) for a band on an nq x nk piece."""
    if lo is not None and lo <= -(nq - 1):
        lo = None  # every row's band reaches column 0 or before
    if hi is not None and hi >= nk - 1:
        hi = None
    if lo is None and hi == 0:
        return "causal", None, None
    if lo is None and hi == -1:
        return "strict", None, None
    return "full", lo, hi


def _piece(spec: MaskSpec, qr: Run, kr: Run) -> Tile | None:
    lo, hi = _band(spec, qr, kr)
    box = _rect(lo, hi, 0, qr.n - 1, 0, kr.n - 1)
    if box is None:
        return None
    r0, r1, c0, c1 = box
    docs = None
    if spec.cu_seqlens is not None:
        qs = _segments(spec.cu_seqlens, qr, r0, r1)
        k_segs = _segments(spec.cu_seqlens, kr, c0, c1)
        ks = {d: (a, b) for a, b, d in k_segs}
        boxes = [bx for a, b, d in qs if d in ks
                 for bx in [_rect(lo, hi, a, b - 1, ks[d][0], ks[d][1] - 1)] if bx is not None]
        if not boxes:
            return None
        r0, r1 = min(b[0] for b in boxes), max(b[1] for b in boxes)
        c0, c1 = min(b[2] for b in boxes), max(b[3] for b in boxes)
        if len(boxes) > 1:  # more than one document: the kernel keeps them apart
            docs = (tuple((max(a, r0) - r0, min(b, r1 + 1) - r0, d) for a, b, d in qs if a <= r1 and b > r0),
                    tuple((max(a, c0) - c0, min(b, c1 + 1) - c0, d) for a, b, d in k_segs if a <= c1 and b > c0))
    shift = c0 - r0  # j - i = j' - i' + shift
    kind, lo, hi = _kind(None if lo is None else lo - shift, None if hi is None else hi - shift,
                         r1 - r0 + 1, c1 - c0 + 1)
    return Tile(TileMask(kind, lo=lo, hi=hi, softcap=spec.softcap, docs=docs),
                q=slice(qr.start + r0, qr.start + r1 + 1), kv=slice(kr.start + c0, kr.start + c1 + 1))


def _with_softcap(t: Tile, softcap: float) -> Tile:
    if not softcap:
        return t
    return Tile(TileMask(t.mask.kind, softcap=softcap), q=t.q, kv=t.kv)


@functools.lru_cache(maxsize=4096)
def plan_tile(spec: MaskSpec, layout: str, q_rank: int, kv_rank: int, world: int, s_local: int) -> tuple[Tile, ...]:
    """The pieces of tile (queries of ``q_rank``, K/V of ``kv_rank``); empty = no work (skip it)."""
    if not spec.structured and layout != "packed":
        t = tile(layout, spec.causal, q_rank, kv_rank, world, s_local)
        return () if t is None else (_with_softcap(t, spec.softcap),)
    S = s_local * world
    q_runs, kv_runs = (runs(layout, S, r, world, spec.cu_seqlens) for r in (q_rank, kv_rank))
    if layout == "packed" and spec.cu_seqlens is not None:  # every run lies in one document: pair within it
        doc = lambda r: bisect.bisect_right(spec.cu_seqlens, r.g0) - 1  # noqa: E731
        by_doc: dict[int, list[Run]] = {}
        for kr in kv_runs:
            by_doc.setdefault(doc(kr), []).append(kr)
        found = (_piece(spec, qr, kr) for qr in q_runs for kr in by_doc.get(doc(qr), ()))
    else:
        found = (_piece(spec, qr, kr) for qr in q_runs for kr in kv_runs)
    return tuple(p for p in found if p is not None)


@functools.lru_cache(maxsize=1024)
def last_step(spec: MaskSpec, layout: str, world: int, s_local: int, grid: int = 1) -> int:
    """The last ring step at which *any* of the ``world`` ring ranks has work: the ring stops after it (no
    K/V exchange beyond, dK/dV sent home in one hop); ``world - 1`` without a window or documents.
    ``grid`` = U > 1: each ring block is U layout blocks of ``s_local / U`` tokens (the hybrid's ring, see
    :func:`seqpar.methods.tiles.block_order`), a step having work if any of its U x U sub-tiles has."""
    if not spec.structured:
        return world - 1
    s, P = s_local // grid, world * grid
    return max((step for u in range(world) for step in range(world)
                if any(plan_tile(spec, layout, u * grid + a, ((u - step) % world) * grid + b, P, s)
                       for a in range(grid) for b in range(grid))), default=0)


def sequence_tile(spec: MaskSpec, seq_len: int) -> tuple[Tile, ...]:
    """The whole sequence in global order as pieces (what a method that gathers the sequence runs)."""
    whole = Run(0, seq_len, 0, 1)
    if not spec.structured:
        return (Tile(TileMask("causal" if spec.causal else "full", softcap=spec.softcap)),)
    p = _piece(spec, whole, whole)
    return () if p is None else (p,)


def visible_pairs(spec: MaskSpec, q_pos, k_pos):
    """Boolean (len(q_pos), len(k_pos)) visibility of global positions under ``spec``: the dense truth
    for tests and benchmarks (materialises the matrix; small sizes only)."""
    import torch

    q, k = torch.as_tensor(q_pos)[:, None], torch.as_tensor(k_pos)[None, :]
    vis = torch.ones(q.shape[0], k.shape[1], dtype=torch.bool)
    if spec.causal:
        vis &= k <= q
    left, right = spec.window
    if left >= 0:
        vis &= k >= q - left
    if right >= 0:
        vis &= k <= q + right
    if spec.cu_seqlens is not None:
        cu = torch.tensor(spec.cu_seqlens)
        vis &= torch.bucketize(q, cu, right=True) == torch.bucketize(k, cu, right=True)
    return vis



def mask_spec(*, is_causal: bool, window_size: object, cu_seqlens: object, softcap: object,
              seq_len: int) -> MaskSpec:
    """The attention arguments of one call -> its :class:`MaskSpec`; ``TypeError``/``ValueError`` naming
    the argument and the fix. ``seq_len`` is the global length (S_local x P). Local: the same on every
    rank for the same arguments (the cross-rank agreement compares :func:`mask_signature`)."""
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2 or any(
            as_int(w) is None for w in window_size):
        raise TypeError(f"window_size must be a pair of ints (left, right), -1 = unbounded (flash-attn's "
                        f"convention), got {window_size!r}")
    left, right = (as_int(w) for w in window_size)
    if left < -1 or right < -1:
        raise ValueError(f"window_size entries must be >= -1 (-1 = unbounded), got {tuple(window_size)}: a query "
                         f"at global position i sees keys j with i - left <= j <= i + right")
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not math.isfinite(softcap):
        raise TypeError(f"softcap must be a finite float (0 = off), got {softcap!r}")
    if softcap < 0:
        raise ValueError(f"softcap must be >= 0 (logits -> softcap * tanh(logits / softcap); 0 = off), got {softcap}")
    cu = None
    if cu_seqlens is not None:
        cu = check_offsets(cu_seqlens, seq_len)
        if cu == (0, seq_len):
            cu = None  # one document: the plain mask
    if left >= seq_len - 1:
        left = -1  # the window reaches every key: no window
    if right >= seq_len - 1 or is_causal:
        right = -1  # causal already hides every key to the right
    return MaskSpec(causal=is_causal, window=(left, right), cu_seqlens=cu, softcap=float(softcap))


def mask_signature(spec: MaskSpec) -> tuple[int, int, int]:
    """3 ints every rank must agree on: (left, right, crc32 of softcap). The documents are agreed apart
    (once per cu_seqlens, see seqpar.layout.offsets_digest): the signature stays the same across batches."""
    return spec.window[0], spec.window[1], zlib.crc32(struct.pack("<d", spec.softcap))
