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
        for step, _, tiles in plan:
            pending = self._post(kv, spare, tag_kv, "forward", step, "K/V") if step + 1 < len(plan) else None
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
        plan = self._tiles(q.shape[2])
        last = len(plan) - 1
        for step, _, tiles in plan:
            kv_pending = self._post(kv, spare, tag_kv, "backward", step, "K/V") if step < last else None
            dkv = None  # like kv, in acc: this step's block's contributions
            for t in tiles:
                dq, dkv = backward_tile(dout, q, kv, out, lse, t, dq, dkv, acc=acc, record=self.record, step=step,
                                        **opts)
            if dkv_pending is not None:  # this KV block's buffer, from the rank before
                got = self._wait(dkv_pending, "backward", step, "dK/dV")
                dkv = got if dkv is None else dkv.add_(got)
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
            home.add_(self._wait(self._post(dkv, None, tag_dkv, "backward", last, "dK/dV", hops=ring.size - last),
                                 "backward", last, "dK/dV"))
        if dq is None:  # no tile at all (every row meets its diagonal at step 0, so not with a real plan)
            dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        return (dq, *split_kv(home, q.shape[-1]))
