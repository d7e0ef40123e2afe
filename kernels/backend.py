"""The declared interface of a kernel backend, and the tile-mask description every backend takes.

A backend is data: its entry points and what it can do natively (``KernelBackend``). The dispatcher
in :mod:`seqpar.kernels` reads the capabilities to route work: a mask kind the backend lacks is
sliced into one it has, a dtype it lacks goes to the ``reference`` backend, a backend without an
in-kernel merge gets a separate merge pass.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Literal

import torch

from seqpar.vocab import MASK_KINDS, MaskKind, check_choice

__all__ = ["TileMask", "Segment", "as_mask", "KernelBackend", "acc_dtype", "FEATURES", "UNBOUNDED", "check_tile",
           "doc_ids", "visible_rows", "Piece", "split_mask", "pad_head_dim", "forward_padded", "backward_padded"]

FEATURES = frozenset({"band", "docs", "softcap"})  # what TileMask.features may hold
UNBOUNDED = 1 << 30  # an "unbounded" band edge as an int (kernels take ints: lo = -UNBOUNDED, hi = UNBOUNDED)


Segment = tuple[int, int, int]  # (start, stop, document id): rows [start, stop) of a tile belong to one document


@dataclass(frozen=True)
class TileMask:
    """What one tile masks, in tile-local coordinates (query row i of the tile, key column j)::

        full     causal    strict     band lo=-1, hi=1    docs q: A A B B, kv: A B B B
        x x x x  x . . .   . . . .    x x . .             x . . .
        x x x x  x x . .   x . . .    x x x .             x . . .
        x x x x  x x x .   x x . .    . x x x             . x x x
        x x x x  x x x x   x x x .    . . x x             . x x x

    Row i sees column j iff all of:

    - ``kind``: full (always), causal (``j <= i``), strict (``j < i``: causal minus the diagonal);
    - the band: ``lo <= j - i`` unless ``lo`` is None, and ``j - i <= hi`` unless ``hi`` is None
      (a sliding window or a causal diagonal that is not the tile's own, after the ring's planner
      has translated global positions into tile offsets);
    - ``docs = (q_segments, kv_segments)``: each a tuple of ``(start, stop, doc)`` covering the tile's
      rows / columns in order; row i sees column j only if both lie in segments of the same ``doc``
      (packed documents; ``None`` = one document).

    ``softcap > 0`` maps each visible score ``s = scale * q.k`` to ``softcap * tanh(s / softcap)``
    before the softmax (Gemma 2); 0 = off. A row that sees no column gets out 0 and lse -inf.

    A description, not a materialised matrix: backends turn it into block skips and in-register
    predicates, or (``aten``) into pieces their fused kernels run. :attr:`plain` masks (a kind only)
    are what every backend takes natively.
    """

    kind: MaskKind = "full"
    lo: int | None = None
    hi: int | None = None
    softcap: float = 0.0
    docs: tuple[tuple[Segment, ...], tuple[Segment, ...]] | None = None

    def __post_init__(self) -> None:
        check_choice("mask kind", self.kind, MASK_KINDS)
        for name in ("lo", "hi"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise TypeError(f"TileMask.{name} must be an int or None, got {value!r}")
        if not isinstance(self.softcap, (int, float)) or isinstance(self.softcap, bool) or not self.softcap >= 0:
            raise ValueError(f"TileMask.softcap must be a float >= 0 (0 = off), got {self.softcap!r}")

    @property
    def plain(self) -> bool:
        """Only a kind: no band, no documents, no soft-cap."""
        return self.lo is None and self.hi is None and self.docs is None and not self.softcap

    def band(self) -> tuple[int | None, int | None]:
        """``(lo, hi)`` with the kind folded in: row i sees column j iff ``lo <= j - i <= hi`` (None: unbounded)."""
        hi = {"full": None, "causal": 0, "strict": -1}[self.kind]
        if self.hi is not None:
            hi = self.hi if hi is None else min(hi, self.hi)
        return self.lo, hi

    @property
    def features(self) -> frozenset[str]:
        """What a backend must support to run this mask as it is: subset of ``{"band", "docs", "softcap"}``."""
        f = set()
        if self.lo is not None or self.hi is not None:
            f.add("band")
        if self.docs is not None:
            f.add("docs")
        if self.softcap:
            f.add("softcap")
        return frozenset(f)


def as_mask(mask: TileMask | str) -> TileMask:
    """A :class:`TileMask`, or a mask kind name (``"causal"``) as shorthand for ``TileMask(kind)``."""
    if isinstance(mask, TileMask):
        return mask
    if isinstance(mask, str):
        return TileMask(mask)
    raise TypeError(f"mask must be a seqpar.kernels.TileMask or one of {MASK_KINDS}, got {type(mask).__name__}")


@dataclass(frozen=True)
class KernelBackend:
    """One backend's entry points and capabilities.

    ``forward(q, k, v, *, mask, scale) -> (out, lse)``; ``backward(dout, q, k, v, out, lse, *, mask,
    scale) -> (dq, dk, dv)``; ``forward_accumulate(q, k, v, out, lse, *, mask, scale)`` merges a tile
    into fp32 ``(out, lse)`` views in place (``None``: the dispatcher merges). ``native_masks``: the
    mask kinds the kernels take as they are; ``dtypes``: the input dtypes they compute;
    ``positive_scale_only``: the kernels are wrong for ``scale <= 0`` (such calls go to ``reference``).
    """

    name: str
    forward: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    backward: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    native_masks: frozenset[str]
    dtypes: frozenset[torch.dtype]
    forward_accumulate: Callable[..., None] | None = None
    positive_scale_only: bool = False
    native_features: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if not self.native_features <= FEATURES:
            raise ValueError(f"KernelBackend {self.name!r}: native_features must be a subset of {sorted(FEATURES)}, "
                             f"got {sorted(self.native_features)}")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of out, lse and dK/dV for inputs of ``dtype``: fp64 for fp64, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------------------------
# v with its own head dim (MLA: DeepSeek-V2/V3, MiniCPM3) on kernels that take one head dim
# ----------------------------------------------------------------------------------------------------------------

def pad_head_dim(x: torch.Tensor, d: int) -> torch.Tensor:
    """``x`` with zero columns appended to its last dim up to ``d`` (``x`` itself when it has ``d``)."""
    return x if x.shape[-1] == d else torch.nn.functional.pad(x, (0, d - x.shape[-1]))


def forward_padded(forward: Callable, q, k, v, **kw):
    """``forward(q, k, v, **kw) -> (out, lse)`` of a kernel that needs one head dim, for a v with its own head
    dim Dv != D (MLA): q, k and v zero-padded to max(D, Dv), the output's first Dv columns returned
    (contiguous). Exact: zero columns of q and k add nothing to the scores (the scale is explicit), zero
    columns of v only give zero output columns."""
    D, Dv = q.shape[-1], v.shape[-1]
    if D == Dv:
        return forward(q, k, v, **kw)
    m = max(D, Dv)
    out, lse = forward(pad_head_dim(q, m), pad_head_dim(k, m), pad_head_dim(v, m), **kw)
    return out[..., :Dv].contiguous(), lse


def backward_padded(backward: Callable, dout, q, k, v, out, lse, **kw):
    """The backward of :func:`forward_padded`: ``dout`` and ``out`` (Dv columns) padded with zero columns
    too (``rowsum(dO * O)`` unchanged), the gradients cut back to q's, k's and v's head dims."""
    D, Dv = q.shape[-1], v.shape[-1]
    if D == Dv:
        return backward(dout, q, k, v, out, lse, **kw)
    m = max(D, Dv)
    dq, dk, dv = backward(*(pad_head_dim(x, m) for x in (dout, q, k, v, out)), lse, **kw)
    return dq[..., :D], dk[..., :D], dv[..., :Dv]


# ----------------------------------------------------------------------------------------------------------------
# helpers the backends share: validation, per-token document ids, visibility of row blocks, the aten split
# ----------------------------------------------------------------------------------------------------------------

def _check_segments(segs, n: int, what: str) -> None:
    if not isinstance(segs, tuple) or not all(isinstance(seg, tuple) for seg in segs):
        raise TypeError(f"TileMask.docs: {what} segments must be a tuple of (start, stop, doc) tuples (the mask is "
                        f"hashed and cached), got {segs!r}")
    pos = 0
    for seg in segs:
        if len(seg) != 3 or not all(isinstance(x, int) and not isinstance(x, bool) for x in seg):
            raise TypeError(f"TileMask.docs: {what} segments must be (start, stop, doc) ints, got {seg!r}")
        start, stop, _ = seg
        if start != pos or stop < start:
            raise ValueError(f"TileMask.docs: {what} segments must cover [0, {n}) in order without gaps, got {segs!r}")
        pos = stop
    if pos != n:
        raise ValueError(f"TileMask.docs: {what} segments cover [0, {pos}), the tile has {n} {what} positions: {segs!r}")


def check_tile(mask: TileMask, Sq: int, Sk: int) -> None:
    """Raise ``ValueError`` / ``TypeError`` when ``mask.docs`` does not cover a ``Sq x Sk`` tile exactly."""
    if mask.docs is None:
        return
    if not (isinstance(mask.docs, tuple) and len(mask.docs) == 2):
        raise TypeError(f"TileMask.docs must be (q_segments, kv_segments), got {mask.docs!r}")
    _check_segments(mask.docs[0], Sq, "q")
    _check_segments(mask.docs[1], Sk, "kv")


@functools.lru_cache(maxsize=256)
def _dense_docs(docs) -> tuple[tuple[tuple[int, int, int], ...], tuple[tuple[int, int, int], ...]]:
    """The segments with their doc ids renumbered 0, 1, ... (first seen first): same equality, ids >= 0."""
    ids: dict[int, int] = {}
    return tuple(tuple((a, b, ids.setdefault(d, len(ids))) for a, b, d in segs) for segs in docs)


@functools.lru_cache(maxsize=256)
def _doc_ids_cached(docs, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    out = []
    for segs in _dense_docs(docs):
        lengths = torch.tensor([b - a for a, b, _ in segs], dtype=torch.long)
        out.append(torch.repeat_interleave(torch.tensor([d for _, _, d in segs], dtype=torch.int32), lengths)
                   .to(device))
    return out[0], out[1]


def doc_ids(mask: TileMask, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token document ids ``(q_doc (Sq,), kv_doc (Sk,))`` int32 on ``device`` (renumbered to 0, 1, ...;
    equal ids = same document). Cached per (docs, device): the ring repeats its tiles' masks."""
    if mask.docs is None:
        raise ValueError("doc_ids: the mask has no documents")
    return _doc_ids_cached(mask.docs, str(torch.device(device)))


def visible_rows(mask: TileMask, r0: int, r1: int, Sk: int, device) -> torch.Tensor | None:
    """``(r1 - r0, Sk)`` bool: which keys rows ``r0 .. r1-1`` of the tile see (kind, band and documents);
    ``None`` when every pair is visible. Materialises only these rows (callers chunk the rows)."""
    lo, hi = mask.band()
    if lo is None and hi is None and mask.docs is None:
        return None
    i = torch.arange(r0, r1, device=device)[:, None]
    j = torch.arange(Sk, device=device)[None, :]
    vis = torch.ones(r1 - r0, Sk, dtype=torch.bool, device=device)
    if lo is not None:
        vis &= j - i >= lo
    if hi is not None:
        vis &= j - i <= hi
    if mask.docs is not None:
        qd, kd = doc_ids(mask, device)
        vis &= qd[r0:r1, None] == kd[None, :]
    return vis


PieceShape = Literal["full", "causal", "flip"]


@dataclass(frozen=True)
class Piece:
    """One piece of a tile a fused kernel runs: rows ``[q0, q1)`` x columns ``[k0, k1)`` of the tile.

    ``full``: every pair; ``causal``: square, top-left causal (local ``j' <= i'``); ``flip``: square,
    local ``j' >= i'`` (the lower edge of a band), run as a causal piece on the rows and columns reversed.
    """

    q0: int
    q1: int
    k0: int
    k1: int
    shape: PieceShape

    def visible_pairs(self) -> int:
        n = self.q1 - self.q0
        return n * (self.k1 - self.k0) if self.shape == "full" else n * (n + 1) // 2


def _upper(a: int, b: int, c: int, m: int, n: int, out: list) -> None:
    """Square [a, a+c) x [b, b+c), visible j - b <= i - a, clipped to [0, m) x [0, n) -> square causal
    triangles and full rectangles (local coordinates, tuples (r0, r1, c0, c1, shape))."""
    if b < 0:  # the rows above a - b see only columns < 0
        a, c, b = a - b, c + b, 0
    if a < 0:
        b, c, a = b - a, c + a, 0
    c = min(c, m - a)
    if c <= 0 or b >= n:
        return
    t = min(c, n - b)
    out.append((a, a + t, b, b + t, "causal"))
    if t < c:  # cut on the right: the rows below the cut see every remaining column
        out.append((a + t, a + c, b, n, "full"))


def _lower(a: int, b: int, c: int, m: int, n: int, out: list) -> None:
    """Square [a, a+c) x [b, b+c), visible j - b >= i - a, clipped: :func:`_upper` on the tile rotated by 180°."""
    rot: list = []
    _upper(m - a - c, n - b - c, c, m, n, rot)
    for r0, r1, c0, c1, shape in rot:
        out.append((m - r1, m - r0, n - c1, n - c0, "flip" if shape == "causal" else "full"))


def _halve(r0: int, r1: int, c0: int, c1: int, shape: str, leaf: int, out: list) -> None:
    """A square triangle of side > ``leaf`` as two half triangles and the full square between them::

        causal        flip
        T . . .       F F R R
        T T . .       . F R R        T / F: the halves (recursively), R: full
        R R T .       . . F F
        R R T T       . . . F
    """
    c = r1 - r0
    if shape == "full" or c <= leaf:
        out.append((r0, r1, c0, c1, shape))
        return
    h = c // 2
    _halve(r0, r0 + h, c0, c0 + h, shape, leaf, out)
    if shape == "causal":
        out.append((r0 + h, r1, c0, c0 + h, "full"))
    else:
        out.append((r0, r0 + h, c0 + h, c1, "full"))
    _halve(r0 + h, r1, c0 + h, c1, shape, leaf, out)


def _full(r0: int, r1: int, c0: int, c1: int, m: int, n: int, out: list) -> None:
    r0, r1, c0, c1 = max(r0, 0), min(r1, m), max(c0, 0), min(c1, n)
    if r0 < r1 and c0 < c1:
        out.append((r0, r1, c0, c1, "full"))


def _cover(m: int, n: int, lo: int | None, hi: int | None, out: list, chunk: int | None = None) -> None:
    """Exact cover of the pairs ``lo <= j - i <= hi`` of an m x n rectangle (local coordinates)::

        band lo=-3, hi=1, chunks of c = w-1 = 4 rows: L = lower-edge triangle (flip), U = upper-edge
        triangle (causal), M = full middle (empty when c = w-1; ``chunk`` < w-1 rows make it wider)

          L U U . . . . .
          L L U U . . . .          per chunk of rows [r, r+c):
          L L L U U . . .            L  rows [r, r+c) x cols [r+lo, r+lo+c)     j - i >= lo
          L L L L U U . .            M  rows [r, r+c) x cols [r+lo+c, r+hi)     all
          . L U U U U U .            U  rows [r, r+c) x cols [r+hi, r+hi+c)     j - i <= hi
          . . L U U U U U          (clipped to the rectangle: smaller squares + full rows)
    """
    if lo is None and hi is None:
        _full(0, m, 0, n, m, n, out)
    elif lo is None:  # j <= i + hi: one triangle along the edge + everything left of it
        _upper(0, hi, m, m, n, out)
        _full(0, m, 0, hi, m, n, out)
    elif hi is None:  # j >= i + lo: one flipped triangle + everything right of it
        _lower(0, lo, m, m, n, out)
        _full(0, m, lo + m, n, m, n, out)
    elif hi >= lo:
        w = hi - lo + 1
        if w == 1:  # one diagonal: one pair per row
            for i in range(max(0, -lo), min(m, n - lo)):
                out.append((i, i + 1, i + lo, i + lo + 1, "full"))
            return
        c = max(1, min(w - 1, m, chunk or w))
        for r in range(0, m, c):
            cc = min(c, m - r)
            _lower(r, r + lo, cc, m, n, out)
            _full(r, r + cc, r + lo + cc, r + hi, m, n, out)
            _upper(r, r + hi, cc, m, n, out)


@functools.lru_cache(maxsize=1024)
def split_mask(mask: TileMask, Sq: int, Sk: int, chunk: int | None = None,
               leaf: int | None = None) -> tuple[Piece, ...]:
    """The pieces (full rectangles, causal and flipped triangles, all square but the rectangles) that
    cover the visible pairs of a ``Sq x Sk`` tile exactly once; pieces with nothing visible are not
    made, so the work is proportional to the visible area. Documents: one sub-rectangle per pair of
    q / kv segments of the same document, the band shifted by its origin
    (``j - i = j' - i' + (k0 - q0)``); then :func:`_cover` on each. Cached (the ring repeats masks).

    ``chunk``: rows per band chunk (default the band width - 1: two triangles per chunk; fewer rows
    trade triangles for a full middle). ``leaf``: triangles wider than this are halved recursively into
    two triangles and a full square (:func:`_halve`), for kernels that skip nothing inside a triangle
    narrower than their key block (torch's CPU flash kernel: 512 keys)."""
    check_tile(mask, Sq, Sk)
    lo, hi = mask.band()
    if mask.docs is None:
        rects = [(0, Sq, 0, Sk)]
    else:
        rects = [(qa, qb, ka, kb) for qa, qb, qd in mask.docs[0] if qb > qa
                 for ka, kb, kd in mask.docs[1] if kb > ka and kd == qd]
    pieces = []
    for q0, q1, k0, k1 in rects:
        off = k0 - q0
        local: list = []
        _cover(q1 - q0, k1 - k0, None if lo is None else lo - off, None if hi is None else hi - off, local, chunk)
        if leaf is not None:
            halved: list = []
            for piece in local:
                _halve(*piece, leaf, halved)
            local = halved
        pieces += [Piece(q0 + r0, q0 + r1, k0 + c0, k0 + c1, shape) for r0, r1, c0, c1, shape in local]
    return tuple(pieces)
