"""The per-tile work every method that computes (query block, kv block) tiles shares.

A tile is one :class:`seqpar.layout.Tile` of (this rank's queries, one K/V block): its mask and the
query / kv slices that have work. The ring (:mod:`seqpar.methods.ring`) and the all-gather
(:mod:`seqpar.methods.allgather`) visit the same tiles in the same order with the same code::

    forward_tile   first tile (the diagonal, whole): block_attention -> the running (out, lse) in fp32
                   later tiles: block_attention_accumulate into views of (out, lse) (half tiles too)
    backward_tile  block_attention_backward against the global (out, lse); adds into dq (at home)
                   and into the block's fused dK/dV buffer (2, B, Hkv, S_local, D)

``kv`` is always the fused (2, B, Hkv, S_local, D) block (K and V stacked, GQA heads never repeated).
"""

from __future__ import annotations

import torch

from seqpar.kernels import block_attention, block_attention_accumulate, block_attention_backward
from seqpar.layout import Tile, tile
from seqpar.methods.base import Recorder, step_timer

__all__ = ["forward_tile", "backward_tile", "ring_order"]


def ring_order(layout: str, causal: bool, rank: int, size: int, s_local: int) -> list[tuple[int, int, Tile | None]]:
    """(step, kv rank, tile or None = no work) of this rank's queries against every K/V block, in the
    ring's order: step s meets the block of rank ``rank - s``, so step 0 is the (whole) diagonal tile."""
    out = []
    for step in range(size):
        j = (rank - step) % size
        out.append((step, j, tile(layout, causal, rank, j, size, s_local)))
    return out


def forward_tile(
    q: torch.Tensor,  # (B, Hq, S_local, D)
    kv: torch.Tensor,  # (2, B, Hkv, S_local, D)
    t: Tile,
    out: torch.Tensor | None,  # running (B, Hq, S_local, D) in acc; None before the first tile
    lse: torch.Tensor | None,  # running (B, Hq, S_local) in acc
    *,
    scale: float,
    backend: str,
    acc: torch.dtype,
    record: Recorder | None,
    step: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tile ``t`` of (q, kv) merged into the running (out, lse); -> the running (out, lse). The first
    tile (``out is None``) must be whole (the diagonal covers every query row, so the running lse is
    finite from then on and fully masked rows of later tiles are no-ops)."""
    opts = dict(scale=scale, backend=backend)
    qt, kt, vt = q[:, :, t.q], kv[0][:, :, t.kv], kv[1][:, :, t.kv]  # views (zigzag: half tiles)
    with step_timer(record, "forward", step):
        if out is None:
            assert t.whole, "the diagonal tile must come first and cover every row"
            o, l = block_attention(qt, kt, vt, mask=t.mask, **opts)
            return o.to(acc), l.to(acc)
        # merged into strided views of the running (out, lse): in-kernel where the backend can
        block_attention_accumulate(qt, kt, vt, out[:, :, t.q], lse[:, :, t.q], mask=t.mask, **opts)
    return out, lse


def backward_tile(
    dout: torch.Tensor,  # (B, Hq, S_local, D)
    q: torch.Tensor,
    kv: torch.Tensor,  # (2, B, Hkv, S_local, D)
    out: torch.Tensor,  # global out
    lse: torch.Tensor,  # global lse
    t: Tile,
    dq: torch.Tensor,  # (B, Hq, S_local, D) in acc: added into
    dkv: torch.Tensor,  # (2, B, Hkv, S_local, D) in acc, this block's: added into
    *,
    scale: float,
    backend: str,
    record: Recorder | None,
    step: int,
) -> None:
    """Tile ``t``'s gradients, recomputed against the global (out, lse), added into ``dq`` and ``dkv``."""
    with step_timer(record, "backward", step):
        gq, gk, gv = block_attention_backward(
            dout[:, :, t.q], q[:, :, t.q], kv[0][:, :, t.kv], kv[1][:, :, t.kv], out[:, :, t.q],
            lse[:, :, t.q], mask=t.mask, scale=scale, backend=backend,
        )
    dq[:, :, t.q] += gq
    dkv[0][:, :, t.kv] += gk
    dkv[1][:, :, t.kv] += gv
