"""All-gather attention (Llama 3's context parallelism): K/V all-gathered, local queries against all of it.

Note
----
P ranks each hold a query block Q_r and a key/value block KV_r (one fused buffer, K and V stacked,
never repeated for GQA). The forward all-gathers the fused blocks once, then computes this rank's
queries against every block with the tiles the ring computes (``seqpar.layout.tile``: the same masks
and half tiles, skipped tiles skipped), in the ring's order of arrival: the diagonal first, then
KV_{r-1}, KV_{r-2}, ... so the running (out, lse) merges exactly as in the ring::

    all-gather       KV0 KV1 KV2 KV3 -> every rank             one collective, O(S) K/V per rank
    r1 tiles:        Q1.KV1  Q1.KV0  Q1.KV3  Q1.KV2             diagonal first, then ring order

Backward: K/V are all-gathered again (not kept between forward and backward: what Llama 3 does),
each tile is recomputed against the *global* (out, lse) (:func:`seqpar.methods.tiles.backward_tile`);
dq accumulates at home in fp32, and the dK/dV of every block accumulate in one fp32 buffer
(P, 2, B, Hkv, S_local, D) that is reduce-scattered (SUM), so each rank receives its own block's
dK/dV summed over every rank's queries::

    all-gather K/V | P tiles -> dq, dKV[0..P-1] | reduce-scatter dKV -> dKV[r]

Memory per rank: the gathered K/V, 2 B Hkv S D elements in the input dtype (O(S), where the ring
holds two blocks, O(S/P)); in the backward also the fp32 dK/dV buffer of the whole sequence,
2 B Hkv S D fp32 elements. Communication: one all-gather (forward); one all-gather and one
reduce-scatter (backward); no overlap with compute (the collectives are blocking).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from seqpar.comm import all_gather_tensor, reduce_scatter_tensor
from seqpar.kernels import acc_dtype
from seqpar.methods.base import CollectiveMethod
from seqpar.methods.tiles import backward_tile, block_order, forward_tile, fuse_kv, split_kv

__all__ = ["AllGatherMethod"]


@dataclass(frozen=True)
class AllGatherMethod(CollectiveMethod):
    """All-gather attention over ``group`` (a resolved group: ProcessGroup, transport group or ``None``)
    with one call's options; a :class:`seqpar.methods.Method`. ``backend`` as :class:`~seqpar.methods.base.CallOptions` has it;
    ``call`` is the call's number on the group (named in errors; collectives carry no tags).
    ``record`` gets one :class:`~seqpar.methods.StepRecord` per computed tile, ``step`` = the kv rank."""

    name: str = "allgather"

    @staticmethod
    def check(*, hq: int, hkv: int, s_local: int, world: int, layout: str) -> None:
        """All-gather takes any head counts and local lengths the layout allows."""

    def _gather(self, k: torch.Tensor, v: torch.Tensor, phase: str) -> list[torch.Tensor]:
        kv = fuse_kv(k, v)  # (2, B, Hkv, S_local, D) or, MLA, (B, Hkv, S_local, D + Dv): GQA heads not repeated
        return self._collective(lambda: all_gather_tensor(kv, self.group), f"{phase}, in the K/V all-gather")

    def _tiles(self, s_local: int):
        """(kv rank, tile) of every tile with work, in the ring's order: the diagonal first."""
        return [(j, t) for _, j, tiles in block_order(self.mask, self.layout, self.rank, self.size, s_local)
                for t in tiles]

    def forward(self, q, k, v) -> tuple[torch.Tensor, torch.Tensor]:
        """-> out (B, Hq, S_local, D) fp32, lse (B, Hq, S_local) fp32 (fp64 for fp64 inputs)."""
        opts = dict(scale=self.scale, backend=self.backend)
        acc = acc_dtype(q.dtype)
        blocks = self._gather(k, v, "forward")  # P x (2, B, Hkv, S_local, D), rank order
        out = lse = None
        for j, t in self._tiles(q.shape[2]):
            out, lse = forward_tile(q, blocks[j], t, out, lse, acc=acc, record=self.record, step=j, **opts)
        return out, lse

    def backward(self, dout, q, k, v, out, lse) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Shapes as in :class:`seqpar.methods.base.Method` (``out``/``lse``: the global ones)."""
        opts = dict(scale=self.scale, backend=self.backend)
        acc = acc_dtype(q.dtype)
        blocks = self._gather(k, v, "backward")
        dq = None  # (B, Hq, S_local, D) in acc: started by the diagonal tile's dq (backward_tile)
        # every block's dK/dV; P leads so that rank j's block is one contiguous chunk of the reduce-scatter
        dkv = torch.zeros((self.size, *blocks[0].shape), dtype=acc, device=k.device)  # (P, *fused K/V)
        for j, t in self._tiles(q.shape[2]):
            dq, _ = backward_tile(dout, q, blocks[j], out, lse, t, dq, dkv[j], acc=acc, record=self.record, step=j,
                                  **opts)
        del blocks
        if dq is None:
            dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        mine = self._collective(lambda: reduce_scatter_tensor(dkv, self.group), "backward, in the dK/dV reduce-scatter")
        dk, dv = split_kv(mine, k.shape[-1])
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
