"""The per-tile work every method that computes (query block, kv block) tiles shares.

A tile is one :class:`seqpar.layout.Tile` of (this rank's queries, one K/V block): its mask and the
query / kv slices that have work. The ring (:mod:`seqpar.methods.ring`) and the all-gather
(:mod:`seqpar.methods.allgather`) visit the same tiles in the same order with the same code::

    forward_tile   first tile (the ring's diagonal, whole): block_attention -> the running (out, lse) in fp32
                   (a first tile that is not whole starts from out = 0, lse = -inf: the hybrid's sub-tiles,
                   masked pieces)
                   later tiles: block_attention_accumulate into views of (out, lse) (half tiles too)
    backward_tile  block_attention_backward against the global (out, lse); adds into dq (at home)
                   and into the block's fused dK/dV buffer (2, B, Hkv, S_local, D); a buffer not
                   started yet starts from a whole tile's gradients (no zero fill)

``kv`` is always one fused block (:func:`fuse_kv`, GQA heads never repeated): K and V stacked,
(2, B, Hkv, S_local, D); or, when v has its own head dim Dv != D (MLA: DeepSeek-V2/V3, MiniCPM3), K and V
concatenated along the head dim, (B, Hkv, S_local, D + Dv). :func:`split_kv` gives the K and V views of
either (and of a dK/dV buffer of the same shape)::

    D == Dv:  kv[0] = K, kv[1] = V               D != Dv:  kv[..., :D] = K, kv[..., D:] = V

:func:`block_order` is the ring's plan with a list of tiles per step, from the call's mask
(:func:`seqpar.masks.plan_tile`: the layouts' tiles, or the pieces of a window / document mask,
empty where nothing is visible); ``grid = U > 1`` (the hybrid, :mod:`seqpar.methods.hybrid`) makes
each ring block a super-block of U layout blocks, and the tile of a step the U x U grid of the
layout's tiles, each offset into its rows and kv columns. :func:`seqpar.masks.last_step` is where the
ring stops.
"""

from __future__ import annotations

import torch

from seqpar.kernels import block_attention, block_attention_accumulate, block_attention_backward
from seqpar.layout import Tile
from seqpar.masks import MaskSpec, plan_tile
from seqpar.methods.base import Recorder, step_timer

__all__ = ["forward_tile", "backward_tile", "block_order", "Step", "fuse_kv", "split_kv"]

Step = tuple[int, int, list[Tile]]  # (ring step, kv block, the tiles of that step: [] = no work)


def fuse_kv(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """k (B, Hkv, S, D), v (B, Hkv, S, Dv) -> one buffer (one message per ring step): (2, B, Hkv, S, D) when
    Dv == D, else (B, Hkv, S, D + Dv) (MLA)."""
    return torch.stack([k, v]) if k.shape == v.shape else torch.cat([k, v], dim=-1)


def split_kv(kv: torch.Tensor, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (K, V) views of a :func:`fuse_kv` buffer (or a dK/dV buffer of its shape); ``d``: K's head dim.
    Unambiguous: a stacked buffer's last dim is D, a concatenated one's D + Dv > D."""
    return (kv[0], kv[1]) if kv.shape[-1] == d else (kv[..., :d], kv[..., d:])


def block_order(mask: MaskSpec, layout: str, rank: int, size: int, s_local: int, grid: int = 1) -> list[Step]:
    """The ring's plan: (step, kv block, tiles) of this rank's query block against every K/V block, step s
    meeting the block of rank ``rank - s``, the tiles of each step from :func:`seqpar.masks.plan_tile`
    (``[]`` = no work). ``grid`` = U > 1: each block of ``s_local`` tokens is U blocks of the layout over
    ``size * U`` ranks (``s = s_local / U`` tokens each, rank-major: ring rank u holds layout ranks
    u U .. u U + U - 1); the tiles of a step are the layout's tiles (u U + a, u' U + b), offset to rows
    [a s, (a+1) s) and kv columns [b s, (b+1) s). Every row meets its diagonal (sub-)tile at step 0."""
    s, world = s_local // grid, size * grid
    plan = []
    for step in range(size):
        j = (rank - step) % size
        tiles = [t if grid == 1 else Tile(t.mask, q=_shift(t.q, a * s, s), kv=_shift(t.kv, b * s, s))
                 for a in range(grid) for b in range(grid)
                 for t in plan_tile(mask, layout, rank * grid + a, j * grid + b, world, s)]
        plan.append((step, j, tiles))
    return plan


def _shift(part: slice, start: int, n: int) -> slice:
    """``part`` of a block of ``n`` tokens -> the same tokens of a super-block where that block starts at ``start``."""
    lo, hi, _ = part.indices(n)
    return slice(start + lo, start + hi)


def forward_tile(
    q: torch.Tensor,  # (B, Hq, S_local, D)
    kv: torch.Tensor,  # fused K/V (fuse_kv): (2, B, Hkv, S_local, D) or (B, Hkv, S_local, D + Dv)
    t: Tile,
    out: torch.Tensor | None,  # running (B, Hq, S_local, Dv) in acc; None before the first tile
    lse: torch.Tensor | None,  # running (B, Hq, S_local) in acc
    *,
    scale: float,
    backend: str,
    acc: torch.dtype,
    record: Recorder | None,
    step: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tile ``t`` of (q, kv) merged into the running (out, lse); -> the running (out, lse). A whole first
    tile (``out is None``: the ring's diagonal) writes the running state in one kernel; a first tile that
    is not whole (the hybrid's sub-tiles) starts from out = 0, lse = -inf, rows not seen yet taking the
    tile's values in the merge. Every row must be seen by some tile (its diagonal) before the caller uses
    the result; fully masked rows of a tile (lse_t = -inf) are no-ops."""
    opts = dict(scale=scale, backend=backend)
    k, v = split_kv(kv, q.shape[-1])
    qt, kt, vt = q[:, :, t.q], k[:, :, t.kv], v[:, :, t.kv]  # views (zigzag: half tiles)
    with step_timer(record, "forward", step):
        if out is None:
            if t.whole:
                o, l = block_attention(qt, kt, vt, mask=t.mask, **opts)
                return o.to(acc), l.to(acc)
            out = torch.zeros((*q.shape[:-1], v.shape[-1]), dtype=acc, device=q.device)  # (B, Hq, S_local, Dv)
            lse = torch.full(q.shape[:-1], float("-inf"), dtype=acc, device=q.device)  # (B, Hq, S_local)
        # merged into strided views of the running (out, lse): in-kernel where the backend can
        block_attention_accumulate(qt, kt, vt, out[:, :, t.q], lse[:, :, t.q], mask=t.mask, **opts)
    return out, lse


def backward_tile(
    dout: torch.Tensor,  # (B, Hq, S_local, Dv)
    q: torch.Tensor,
    kv: torch.Tensor,  # fused K/V (fuse_kv)
    out: torch.Tensor,  # global out
    lse: torch.Tensor,  # global lse
    t: Tile,
    dq: torch.Tensor | None,  # (B, Hq, S_local, D) in acc: added into; None = not started yet
    dkv: torch.Tensor | None,  # like kv, in acc, this block's: added into; None = not started yet
    *,
    acc: torch.dtype,
    scale: float,
    backend: str,
    record: Recorder | None,
    step: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tile ``t``'s gradients, recomputed against the global (out, lse), added into ``dq`` and ``dkv`` ->
    (dq, dkv). An accumulator that is None starts from this tile: its gradients themselves when the tile
    covers all of its rows (the ring's diagonal: no zero fill and no add over the whole buffer), else zeros."""
    d = q.shape[-1]
    k, v = split_kv(kv, d)
    with step_timer(record, "backward", step):
        gq, gk, gv = block_attention_backward(
            dout[:, :, t.q], q[:, :, t.q], k[:, :, t.kv], v[:, :, t.kv], out[:, :, t.q],
            lse[:, :, t.q], mask=t.mask, scale=scale, backend=backend,
        )
    if dq is None and t.q == slice(None):
        dq = gq.to(acc)
    else:
        if dq is None:
            dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        dq[:, :, t.q] += gq
    if dkv is None and t.kv == slice(None):
        dkv = fuse_kv(gk.to(acc), gv.to(acc))
    else:
        if dkv is None:
            dkv = torch.zeros(kv.shape, dtype=acc, device=kv.device)
        dk, dv = split_kv(dkv, d)
        dk[:, :, t.kv] += gk
        dv[:, :, t.kv] += gv
    return dq, dkv
