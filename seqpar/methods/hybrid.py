"""Hybrid attention (Ulysses x Ring): all-to-all over heads inside a node, a ring across nodes.

Note
----
The cp group of P = U x R ranks is the 2-D mesh of ``seqpar.init_mesh(cp=P, ulysses=U)``: U adjacent
ranks (one node, a fast all-to-all) form a Ulysses sub-group, and the R sub-groups form a ring
(cp rank = ring index u * U + ulysses index a)::

    P = 4, U = 2, R = 2         cp_ulysses (all-to-all over heads, in a node)
                                  a=0    a=1
    cp_ring (ring over     u=0  [ cp0 <-> cp1 ]   node 0
    super-blocks, across        [  ^       ^  ]
    nodes)                 u=1  [ cp2 <-> cp3 ]   node 1

1. Ulysses on the U sub-group (the code of :class:`~seqpar.methods.ulysses.UlyssesMethod`):
   (B, H, S/P, D) -> (B, H/U, U S/P, D), the gathered sequence kept in *rank-major* order (the shard of
   cp rank u U + 0, then u U + 1, ...: no permutation to global order), a super-block of U layout blocks.
2. The ring (:class:`~seqpar.methods.ring.RingMethod`, ``grid=U``) over the R sub-group on the
   super-blocks. The tile between super-block u (queries) and u' (K/V) is the U x U grid of the
   layout's own tiles over P ranks, each offset into its rows and kv columns
   (:func:`seqpar.methods.tiles.block_order`), so every layout is exact and the causal work is as
   balanced as the plain ring over P::

       super-tile (u, u'), U = 2, s = S/P          kv cols  [0, s)              [s, 2s)
       rows [0, s)    tile(uU+0, u'U+0)  tile(uU+0, u'U+1)
       rows [s, 2s)   tile(uU+1, u'U+0)  tile(uU+1, u'U+1)      tile = seqpar.layout.tile(layout,
                                                                 causal, q rank, kv rank, P, s)
3. Ulysses back: out / lse (forward); dq / dk / dv (backward, gathered in fp32 before rounding).

The backward scatters q, k, v, dout, out, lse as Ulysses does, runs the ring backward on the
super-blocks, and gathers the gradients. GQA / MQA: the Ulysses rules for the U sub-group (``Hq % U
== 0``; ``Hkv % U == 0``, or ``U % Hkv == 0`` with each kv head sent U/Hkv times). U = 1 is the plain
ring over P (no all-to-all); R = 1 is Ulysses on the rank-major order (one local super-tile grid).

Messages: forward 2 all-to-alls (U sub-group) + R-1 K/V exchanges (ring sub-group, tagged with the
call's number); backward 2 all-to-alls (dout in, gradients back: the gathered tensors of the forward
are kept, as in Ulysses) + R-1 K/V and R-1 dK/dV exchanges.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from seqpar.comm import make_ring
from seqpar.mesh import group_rank_size, hybrid_groups
from seqpar.methods.ring import RingMethod
from seqpar.methods.ulysses import UlyssesMethod, _divisors, _or

__all__ = ["HybridMethod"]


@dataclass(frozen=True)
class HybridMethod(UlyssesMethod):
    """Ulysses over ``group`` (the U sub-group) around ``ring`` (a :class:`RingMethod` over the R sub-group
    with ``grid=U``), with one call's options; a :class:`seqpar.methods.Method`. Built by
    :meth:`from_group` from the ``(ulysses, ring)`` sub-groups of :func:`seqpar.mesh.hybrid_groups`."""

    name: str = "hybrid"
    ring: RingMethod = field(kw_only=True)

    @classmethod
    def from_group(cls, groups, **opts) -> "HybridMethod":
        """``groups`` = (ulysses sub-group, ring sub-group) (:meth:`groups`; ``(None, None)``: one process)."""
        if not (isinstance(groups, tuple) and len(groups) == 2):
            raise TypeError(f"group: method='hybrid' is built from the (ulysses, ring) sub-groups of a mesh of "
                            f"seqpar.init_mesh(cp=..., ulysses=U) (seqpar.mesh.hybrid_groups), got "
                            f"{type(groups).__name__}")
        ulysses, ring = groups
        rank, size = group_rank_size(ulysses)
        return cls(ulysses, rank, size, ring=RingMethod(make_ring(ring), name="hybrid", grid=size, **opts), **opts)

    @staticmethod
    def check(*, hq: int, hkv: int, s_local: int, world: int, layout: str) -> None:
        """Any shapes the layout allows; the heads against the mesh's ulysses degree: :meth:`groups`."""

    @staticmethod
    def check_heads(*, hq: int, hkv: int, ulysses: int, cp: int) -> None:
        """Heads must split over the U sub-group: ``Hq % U == 0``, and ``Hkv % U == 0`` or ``U % Hkv == 0``."""
        U = ulysses
        ok = [d for d in _divisors(hq) if cp % d == 0 and (hkv % d == 0 or d % hkv == 0)]  # degrees that work
        fix = f"use ulysses={_or(ok)} in seqpar.init_mesh(cp={cp}, ulysses=...), or method='ring'"
        if hq % U:
            raise ValueError(f"method='hybrid' needs the number of query heads (Hq) divisible by the ulysses degree "
                             f"U: Hq={hq}, U={U}; {fix}")
        if hkv % U and U % hkv:
            raise ValueError(f"method='hybrid' needs the number of kv heads (Hkv) divisible by the ulysses degree U, "
                             f"or U divisible by Hkv: Hkv={hkv}, U={U}; {fix}")

    @staticmethod
    def groups(group, *, hq: int, hkv: int) -> tuple:
        """The user's ``group=`` (the hybrid mesh or its "cp" part) -> the (ulysses, ring) sub-groups, the
        heads checked against the ulysses degree; ``ValueError`` (local, before any communication)."""
        sub = hybrid_groups(group)
        U, R = (group_rank_size(g)[1] for g in sub)
        HybridMethod.check_heads(hq=hq, hkv=hkv, ulysses=U, cp=U * R)
        return sub

    def _perm(self, S: int, device: torch.device) -> None:
        """Rank-major order, never permuted: the ring's tiles follow the layout (:func:`block_order`)."""
        return None

    def _attend(self, q, k, v) -> tuple[torch.Tensor, torch.Tensor]:
        """The ring over the super-blocks: (B, Hq/U, U S/P, D) -> (out, lse) in the accumulation dtype."""
        return self.ring.forward(q, k, v)

    def _attend_backward(self, dout, q, k, v, out, lse) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.ring.grads(dout, q, k, v, out, lse)
