"""Ring attention: one loop, parameterised by layout, ring (comm) and kernel backend.

Note
----
P ranks each hold a query block Q_r and a key/value block KV_r (one fused buffer, K and V stacked,
never repeated for GQA; a v with its own head dim Dv != D, MLA, is concatenated to K along the head dim
instead: :func:`seqpar.methods.tiles.fuse_kv`). At step s rank r computes its tile against KV_{r-s} while KV_{r-s-1} is
already on the wire::

    step 0          step 1          step 2          ...  step P-1
    r0: Q0.KV0      r0: Q0.KV3      r0: Q0.KV2           r0: Q0.KV1
    r1: Q1.KV1      r1: Q1.KV0      r1: Q1.KV3           r1: Q1.KV2      KV moves r -> r+1
    r2: Q2.KV2      r2: Q2.KV1      r2: Q2.KV0           ...

Forward: each tile gives (out_t, lse_t) for its query rows; they merge into the running (out, lse)
in fp32 with the stable form ``out -= sigmoid(lse_t - lse) * (out - out_t)``,
``lse -= logsigmoid(lse - lse_t)``. Step 0 (the diagonal tile) covers every query row, so the
running lse is finite from then on and fully masked rows of later tiles (lse_t = -inf) are no-ops.
Steps > 0 call ``block_attention_accumulate``, which merges inside the kernel (triton) or by a
separate merge pass (other backends), writing through views of (out, lse) for half tiles.

Backward: each tile is recomputed against the *global* (out, lse); dq accumulates at home in fp32.
dK/dV of a block accumulate in fp32: the owner's own contribution (step 0, the diagonal) stays at
home; the other ranks' contributions go in a buffer that travels one hop behind the block, started
at step 1 by rank r + 1: at step s >= 1 rank r adds its contribution to the buffer of KV_{r-s} and
sends it on; after the last step the buffer goes home and is added to the owner's part (P - 1
dK/dV messages per rank, not P)::

    step 0:      post KV exchange (1)      |  diagonal grads -> home (kept)
    step s >= 1: post KV exchange (s + 1)  |  tile grads  |  wait dKV(s-1) from r-1 (s >= 2), add,
                                                             post dKV -> r+1 (s < last)
    after:       dKV of KV_{r-last} -> its owner;  home += ours (from r + last)

The K/V message before the last step carries only the rows the receiving rank reads there (the hull
of its tiles' kv slices, known to both sides from the plan: :meth:`RingMethod._reads`); a dK/dV buffer
started at the last step goes home with those rows only. Causal zigzag on 2 ranks: one direction
sends half its block.

Masks (:mod:`seqpar.masks`): a step's tiles are the pieces with something visible (none: no kernel
call, the exchange still runs); when no rank has work after step L (a window shorter than the ranks'
distance, documents that stay on their ranks), the ring stops after step L: no K/V exchange beyond
it, and each dK/dV buffer goes home in one hop of P - L ranks instead of P - L ring hops::

    step:      0     1    ...   L   | L+1 ... P-1
    K/V        post  post       -   |  (none)
    dK/dV      post  post       home (r -> r - L)

The tiles of a step come from :func:`seqpar.methods.tiles.block_order`: one tile (or none) per step,
or, with ``grid = U > 1`` (:mod:`seqpar.methods.hybrid`), the U x U grid of the layout's tiles between
two super-blocks of U layout blocks. The loop is the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from seqpar.comm import Ring, call_tags, make_ring
from seqpar.kernels import acc_dtype
from seqpar.layout import Tile
from seqpar.methods.base import CallOptions, guarded
from seqpar.masks import last_step
from seqpar.methods.tiles import Step, backward_tile, block_order, forward_tile, fuse_kv, split_kv

__all__ = ["RingMethod"]


@dataclass(frozen=True)
class RingMethod(CallOptions):
    """The ring over ``ring`` (a :class:`seqpar.comm.Ring`) with one call's options; a
    :class:`seqpar.methods.Method`. ``call`` also tags the messages (see :func:`seqpar.comm.call_tags`).
    ``grid``: the tile plan (:func:`seqpar.methods.tiles.block_order`): 1 = one layout block per rank;
    U > 1 = each rank's block is a super-block of U layout blocks (the hybrid's ring, ``name="hybrid"``)."""

    ring: Ring
    name: str = "ring"
    grid: int = 1

    def _comm(self, fn, phase: str, step: int, what: str):
        ring = self.ring
        return guarded(fn, method=self.name, rank=ring.rank, size=ring.size, call=self.call,
                       where=f"{phase} ring step {step + 1} of {ring.size}, waiting to receive {what} from rank "
                             f"{ring.prev_rank} and send to rank {ring.next_rank}",
                       suspects=f"rank {ring.prev_rank} or rank {ring.next_rank}")

    def _post(self, send, recv, tag: int, phase: str, step: int, what: str, hops: int = 1):
        return self._comm(lambda: self.ring.exchange(send, recv, tag=tag, hops=hops), phase, step, what)

    def _wait(self, handle, phase: str, step: int, what: str) -> torch.Tensor:
        return self._comm(handle.wait, phase, step, what)

    @classmethod
    def from_group(cls, group, **opts) -> "RingMethod":
        """The ring over a resolved group (ProcessGroup, transport group or ``None``)."""
        return cls(make_ring(group), **opts)

    @staticmethod
    def check(*, hq: int, hkv: int, s_local: int, world: int, layout: str) -> None:
        """The ring takes any head counts and local lengths the layout allows."""

    def _tiles(self, s_local: int) -> list[Step]:
        """The steps this call runs: 0 .. the last step at which any rank has work (all P without a window
        or documents; see :func:`seqpar.masks.last_step`)."""
        last = last_step(self.mask, self.layout, self.ring.size, s_local, self.grid)
        return block_order(self.mask, self.layout, self.ring.rank, self.ring.size, s_local, grid=self.grid)[:last + 1]

    def _reads(self, rank: int, s_local: int, last: int) -> slice | None:
        """The kv rows rank ``rank`` reads of the block it meets at step ``last`` (the hull of its tiles there),
        or None when that is the whole block or nothing (then the whole block travels)."""
        P = self.ring.size
        tiles = block_order(self.mask, self.layout, rank % P, P, s_local, grid=self.grid)[last][2]
        if not tiles:
            return None
        spans = [t.kv.indices(s_local)[:2] for t in tiles]
        lo, hi = min(a for a, _ in spans), max(b for _, b in spans)
        return None if (lo, hi) == (0, s_local) else slice(lo, hi)

    def _trim(self, s_local: int, last: int) -> tuple[slice | None, slice | None]:
        """(rows the next rank reads of the block we send it before the last step, rows we read of the one we
        receive): the last K/V hop carries only those (causal zigzag on 2 ranks: half of one direction)."""
        if last == 0:
            return None, None
        return self._reads(self.ring.rank + 1, s_local, last), self._reads(self.ring.rank, s_local, last)

    def _last_hop(self, kv: torch.Tensor, spare: torch.Tensor | None, give: slice | None, take: slice | None):
        """(send, recv) of the K/V exchange before the last step: only the rows the next rank reads there
        (``give``), into a buffer of the rows this rank reads (``take``); whole blocks otherwise."""
        send = kv if give is None else kv[..., give, :]
        if take is None:
            return send, spare if spare is not None else torch.empty_like(kv)
        return send, kv.new_empty((*kv.shape[:-2], take.stop - take.start, kv.shape[-1]))

    def _kv_step(self, step: int, last: int, kv: torch.Tensor, spare: torch.Tensor | None,
                 trim: tuple[slice | None, slice | None], tiles: list[Tile], s_local: int, tag: int, phase: str):
        """Step ``step``'s K/V post (None at the last step; the one before it trimmed, :meth:`_last_hop`) and its
        tiles (at the last step shifted onto the received rows) -> (pending, tiles)."""
        give, take = trim
        pending = None
        if step + 1 < last:
            pending = self._post(kv, spare, tag, phase, step, "K/V")
        elif step + 1 == last:
            pending = self._post(*self._last_hop(kv, spare, give, take), tag, phase, step, "K/V")
        if step == last and take is not None:
            tiles = [_shift_kv(t, take, s_local) for t in tiles]
        return pending, tiles

    def forward(
        self,
        q: torch.Tensor,  # (B, Hq, S_local, D)
        k: torch.Tensor,  # (B, Hkv, S_local, D)
        v: torch.Tensor,  # (B, Hkv, S_local, D)
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> out (B, Hq, S_local, D) fp32, lse (B, Hq, S_local) fp32 (fp64 for fp64 inputs)."""
        ring, opts = self.ring, dict(scale=self.scale, backend=self.backend)
        tag_kv, _ = call_tags(self.call)
        acc = acc_dtype(q.dtype)
        kv = fuse_kv(k, v)  # (2, B, Hkv, S_local, D) or, MLA, (B, Hkv, S_local, D + Dv): one message per step
        spare = torch.empty_like(kv) if ring.size > 2 else None
        out = lse = None
        plan = self._tiles(q.shape[2])
        last = len(plan) - 1
        trim = self._trim(q.shape[2], last)
        for step, _, tiles in plan:
            pending, tiles = self._kv_step(step, last, kv, spare, trim, tiles, q.shape[2], tag_kv, "forward")
            assert out is not None or (step == 0 and tiles), "the diagonal tile(s) must come first"
            for t in tiles:
                out, lse = forward_tile(q, kv, t, out, lse, acc=acc, record=self.record, step=step, **opts)
            if pending is not None:
                kv, spare = self._wait(pending, "forward", step, "K/V"), kv
        return out, lse

    def backward(
        self,
        dout: torch.Tensor,  # (B, Hq, S_local, D)
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,  # (B, Hq, S_local, D) global output
        lse: torch.Tensor,  # (B, Hq, S_local) global lse
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dq, dk, dv = self.grads(dout, q, k, v, out, lse)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)

    def grads(self, dout, q, k, v, out, lse) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`backward` in the accumulation dtype (fp32, fp64 for fp64 inputs): the hybrid gathers
        and sums them over heads before rounding."""
        ring, opts = self.ring, dict(scale=self.scale, backend=self.backend)
        tag_kv, tag_dkv = call_tags(self.call)
        acc = acc_dtype(q.dtype)
        dq = None  # (B, Hq, S_local, D) in acc: started by the diagonal tile's dq (backward_tile)
        kv = fuse_kv(k, v)  # (2, B, Hkv, S_local, D) or (B, Hkv, S_local, D + Dv)
        spare = torch.empty_like(kv) if ring.size > 2 else None
        dkv_pending = home = dkv = None  # home: our own block's dK/dV (step 0's), like kv, in acc
        S = q.shape[2]
        plan = self._tiles(S)
        last = len(plan) - 1
        trim = self._trim(S, last)
        take = trim[1]
        for step, _, tiles in plan:
            kv_pending, tiles = self._kv_step(step, last, kv, spare, trim, tiles, S, tag_kv, "backward")
            dkv = None  # like kv (the last step's: only the rows read), in acc: this step's block's contributions
            for t in tiles:
                dq, dkv = backward_tile(dout, q, kv, out, lse, t, dq, dkv, acc=acc, record=self.record, step=step,
                                        **opts)
            if dkv_pending is not None:  # this KV block's buffer, from the rank before (whole rows)
                got = self._wait(dkv_pending, "backward", step, "dK/dV")
                if dkv is None:
                    dkv = got
                elif dkv.shape == got.shape:
                    dkv = dkv.add_(got)
                else:  # the last step's contributions cover the rows read
                    got[..., take, :] += dkv
                    dkv = got
            elif dkv is None:
                dkv = torch.zeros(kv.shape, dtype=acc, device=kv.device)
            if step == 0:
                home = dkv  # stays here: the travelling buffers carry the other ranks' contributions
            elif step < last:
                dkv_pending = self._post(dkv, None, tag_dkv, "backward", step, "dK/dV")
            if kv_pending is not None:
                kv, spare = self._wait(kv_pending, "backward", step, "K/V"), kv
        # dkv: the other ranks' complete buffer of block rank - last; home in one hop of P - last ranks (1
        # without an early stop: the ring's own next hop), and ours arrives from rank + last
        if last > 0:
            # a buffer started at the last step (last == 1) holds only the rows its rank, rank + 1, read there:
            # what we sent it (trim[0])
            rows = trim[0] if last == 1 else None
            n = S if rows is None else rows.stop - rows.start
            recv = home.new_empty((*home.shape[:-2], n, home.shape[-1]))
            got = self._wait(self._post(dkv, recv, tag_dkv, "backward", last, "dK/dV", hops=ring.size - last),
                             "backward", last, "dK/dV")
            if rows is None:
                home.add_(got)
            else:
                home[..., rows, :] += got
        if dq is None:  # no tile at all (every row meets its diagonal at step 0, so not with a real plan)
            dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        return (dq, *split_kv(home, q.shape[-1]))


def _shift_kv(t: Tile, rows: slice, s_local: int) -> Tile:
    """Tile ``t`` of a whole block, on a buffer that holds only the block's ``rows``."""
    a, b, _ = t.kv.indices(s_local)
    return Tile(t.mask, q=t.q, kv=slice(a - rows.start, b - rows.start))
