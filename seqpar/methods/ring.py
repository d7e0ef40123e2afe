"""Ring attention: one loop, parameterised by layout, ring (comm) and kernel backend.

Note
----
P ranks each hold a query block Q_r and a key/value block KV_r (one fused buffer, K and V stacked,
never repeated for GQA). At step s rank r computes its tile against KV_{r-s} while KV_{r-s-1} is
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
dK/dV of a block accumulate in fp32 in a buffer that travels one hop behind the block: at step s
rank r adds its contribution to the buffer of KV_{r-s} and sends it on; after P hops the buffer
of KV_r arrives back at rank r holding every rank's contribution::

    step s:  post KV exchange (s+1)  |  tile grads  |  wait dKV(s-1) from r-1, add, post dKV -> r+1
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from seqpar.comm import Ring, call_tags, make_ring
from seqpar.kernels import acc_dtype
from seqpar.methods.base import CallOptions, guarded
from seqpar.methods.tiles import backward_tile, forward_tile, ring_order

__all__ = ["RingMethod"]


@dataclass(frozen=True)
class RingMethod(CallOptions):
    """The ring over ``ring`` (a :class:`seqpar.comm.Ring`) with one call's options; a
    :class:`seqpar.methods.Method`. ``call`` also tags the messages (see :func:`seqpar.comm.call_tags`)."""

    ring: Ring
    name: str = "ring"

    def _comm(self, fn, phase: str, step: int, what: str):
        ring = self.ring
        return guarded(fn, method=self.name, rank=ring.rank, size=ring.size, call=self.call,
                       where=f"{phase} ring step {step + 1} of {ring.size}, waiting to receive {what} from rank "
                             f"{ring.prev_rank} and send to rank {ring.next_rank}",
                       suspects=f"rank {ring.prev_rank} or rank {ring.next_rank}")

    def _post(self, send, recv, tag: int, phase: str, step: int, what: str):
        return self._comm(lambda: self.ring.exchange(send, recv, tag=tag), phase, step, what)

    def _wait(self, handle, phase: str, step: int, what: str) -> torch.Tensor:
        return self._comm(handle.wait, phase, step, what)

    @classmethod
    def from_group(cls, group, **opts) -> "RingMethod":
        """The ring over a resolved group (ProcessGroup, transport group or ``None``)."""
        return cls(make_ring(group), **opts)

    @staticmethod
    def check(*, hq: int, hkv: int, s_local: int, world: int, layout: str) -> None:
        """The ring takes any head counts and local lengths the layout allows."""

    def _tiles(self, s_local: int) -> list:
        return ring_order(self.layout, self.causal, self.ring.rank, self.ring.size, s_local)

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
        kv = torch.stack([k, v])  # (2, B, Hkv, S_local, D): one message per step
        spare = torch.empty_like(kv) if ring.size > 2 else None
        out = lse = None
        for step, _, t in self._tiles(q.shape[2]):
            pending = self._post(kv, spare, tag_kv, "forward", step, "K/V") if step + 1 < ring.size else None
            if t is not None:
                assert out is not None or step == 0, "the diagonal tile must come first"
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
        ring, opts = self.ring, dict(scale=self.scale, backend=self.backend)
        tag_kv, tag_dkv = call_tags(self.call)
        acc = acc_dtype(q.dtype)
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        kv = torch.stack([k, v])  # (2, B, Hkv, S_local, D)
        spare = torch.empty_like(kv) if ring.size > 2 else None
        dkv_pending = None
        for step, _, t in self._tiles(q.shape[2]):
            kv_pending = self._post(kv, spare, tag_kv, "backward", step, "K/V") if step + 1 < ring.size else None
            dkv = torch.zeros(kv.shape, dtype=acc, device=kv.device)  # (2, B, Hkv, S_local, D)
            if t is not None:
                backward_tile(dout, q, kv, out, lse, t, dq, dkv, record=self.record, step=step, **opts)
            if dkv_pending is not None:
                dkv += self._wait(dkv_pending, "backward", step, "dK/dV")  # this KV block's buffer, from the rank before
            dkv_pending = self._post(dkv, None, tag_dkv, "backward", step, "dK/dV")
            if kv_pending is not None:
                kv, spare = self._wait(kv_pending, "backward", step, "K/V"), kv
        dkv = self._wait(dkv_pending, "backward", ring.size - 1, "dK/dV")  # our own block's buffer, home after P hops
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)
