"""Ulysses attention (DeepSpeed-Ulysses): an all-to-all over heads, then single-device attention.

Note
----
Each of P ranks holds all H heads of S/P tokens. One all-to-all scatters the heads and gathers the
sequence, so each rank holds H/P heads of all S tokens and runs ordinary (unsharded) attention on
them; a second all-to-all turns the output back::

    rank r holds (B, H, S/P, D)            all-to-all              rank r holds (B, H/P, S, D)
         heads ->  h0 h1 h2 h3                                       heads h_r of every token
    r0  [s0   ]    a  b  c  d        chunk j (heads j) -> rank j     r0: h0 [s0 s1 s2 s3]
    r1  [s1   ]    e  f  g  h        ------------------------->      r1: h1 [s0 s1 s2 s3]
    r2  [s2   ]    ...                                               r2: h2 [...]
    r3  [s3   ]                                                      r3: h3 [...]

The gathered sequence is in *layout order* (rank 0's shard, rank 1's, ...); for striped and zigzag
that is a permutation of the global order, so it is permuted to global order (the inverse of
``cat(global_indices(S, r, P, layout) for r)``) before the kernel, and back after (contiguous: the
identity, skipped). The causal mask then is the plain causal mask of the whole sequence.

GQA / MQA: K/V heads are scattered like q heads when ``Hkv % P == 0``: rank r gets q heads
[r Hq/P, (r+1) Hq/P) and kv heads [r Hkv/P, (r+1) Hkv/P), and q head h still reads kv head
h // (Hq/Hkv). When ``Hkv < P`` (``P % Hkv == 0``) each kv head is copied P/Hkv times (not Hq times)
so that every rank receives the one kv head its q heads read; the backward sums the copies' gradients.

The attention on the gathered sequence is :meth:`UlyssesMethod._attend` / ``_attend_backward`` (one
single-device kernel); :class:`seqpar.methods.hybrid.HybridMethod` reuses this class with a ring there
instead, on the gathered sequence in rank-major order (its ``_perm`` is the identity).

Messages: forward 2 all-to-alls (q, k, v fused in one; out and lse fused back in one); backward 2
(dout; dq, dk, dv fused back): the method object keeps the forward's gathered q, k, v, out and lse
for the backward of the same call, as DeepSpeed-Ulysses keeps its activations (memory: one more copy
of q, k, v, out per attention call until its backward). A backward without them (a checkpoint replay,
where the forward did not run; attention sinks merged after the forward) scatters q, k, v, dout, out
and lse again: 3 all-to-alls. ``Hq`` must divide by P (see :meth:`check`). A v with its own head dim
Dv != D (MLA) travels in the same messages: tensors whose trailing dims differ are flattened per
destination rank into one message row (:meth:`_scatter_flat` / :meth:`_gather_flat`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from seqpar import layout as _layout
from seqpar.comm import TransportGroup, all_to_all
from seqpar.kernels import TileMask, acc_dtype, block_attention, block_attention_backward
from seqpar.masks import sequence_tile
from seqpar.methods.base import CollectiveMethod, step_timer

__all__ = ["UlyssesMethod"]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _or(items: list[int]) -> str:
    items = [str(i) for i in items]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " or " + items[-1]


@dataclass(frozen=True)
class UlyssesMethod(CollectiveMethod):
    """All-to-all over heads with one call's options; a :class:`seqpar.methods.Method`. ``group`` is a
    resolved torch.distributed group or ``None`` (one process); ``backend`` is resolved; ``call`` is the
    call's number on the group (unused: collectives match by order, not by tag)."""

    name: str = "ulysses"
    # the permutation index tensors of this call, per (global length S, device): (to_global, to_layout)
    _perms: dict = field(default_factory=dict, compare=False, repr=False)
    # the forward's gathered (q, k, v, out, lse) for the backward of the same call (then no re-scatter)
    _kept: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_group(cls, group, **opts) -> "UlyssesMethod":
        """Ulysses over a resolved group: a ProcessGroup, ``None``, or a transport group with an all-to-all
        (``seqpar.MPIGroup``)."""
        if isinstance(group, TransportGroup) and not hasattr(group, "all_to_all"):
            raise TypeError(f"group: method='ulysses' needs a torch.distributed group, seqpar.MPIGroup or None; "
                            f"{type(group).__name__} has no all-to-all: use method='ring' with it")
        return super().from_group(group, **opts)

    @staticmethod
    def check(*, hq: int, hkv: int, s_local: int, world: int, layout: str) -> None:
        """Heads must split over the group: ``Hq % P == 0``, and ``Hkv % P == 0`` or ``P % Hkv == 0``."""
        P = world
        ok = [d for d in _divisors(hq) if hkv % d == 0 or d % hkv == 0]  # the group sizes that would work
        if hq % P:
            raise ValueError(
                f"ulysses needs the number of query heads (Hq) divisible by the group size P: Hq={hq}, P={P}; "
                f"use a group of size {_or(ok)}, or method='ring'")
        if hkv % P and P % hkv:
            raise ValueError(
                f"ulysses needs the number of kv heads (Hkv) divisible by the group size P, or P divisible by "
                f"Hkv (each kv head is then sent P/Hkv times): Hkv={hkv}, P={P}; use a group of size {_or(ok)}, "
                f"or method='ring'")

    # ------------------------------------------------------------------ layout permutation

    def _perm(self, S: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(to_global, to_layout) index tensors for the gathered sequence of length S (None: identity).
        ``gathered[:, :, to_global]`` is in global order; ``full[:, :, to_layout]`` is in layout order."""
        if self.layout == "contiguous" or self.size == 1:
            return None
        key = (S, device)
        if key not in self._perms:
            to_layout = torch.cat([_layout.global_indices(S, r, self.size, self.layout, self.mask.cu_seqlens)
                                   for r in range(self.size)])
            self._perms[key] = (torch.argsort(to_layout).to(device), to_layout.to(device))
        return self._perms[key]

    def _to_global(self, t: torch.Tensor, S: int) -> torch.Tensor:
        p = self._perm(S, t.device)
        return t if p is None else t.index_select(2, p[0])

    def _to_layout(self, t: torch.Tensor, S: int) -> torch.Tensor:
        p = self._perm(S, t.device)
        return t if p is None else t.index_select(2, p[1])

    # ------------------------------------------------------------------ heads <-> sequence

    def _scatter_heads(self, ts: list[torch.Tensor], what: str) -> list[torch.Tensor]:
        """Tensors (B, H_i, S/P, *rest) of one dtype -> (B, H_i/P, S, *rest) in global order, one all-to-all."""
        P = self.size
        if P == 1:
            return list(ts)
        if len({t.shape[2:] for t in ts}) > 1:  # MLA: v (dout, out) with its own head dim
            return self._scatter_flat(ts, what)
        x = torch.cat([t.unflatten(1, (P, t.shape[1] // P)) for t in ts], dim=2)  # (B, P, sum H_i/P, s, ...)
        y = self._all_to_all(x, 1, 3, what).squeeze(1)  # (B, sum H_i/P, S, ...)
        S = y.shape[2]
        return [self._to_global(part, S) for part in y.split([t.shape[1] // P for t in ts], dim=1)]

    def _gather_heads(self, ts: list[torch.Tensor], what: str) -> list[torch.Tensor]:
        """Inverse of :meth:`_scatter_heads`: (B, H_i/P, S, *rest) in global order -> (B, H_i, S/P, *rest)."""
        P = self.size
        if P == 1:
            return list(ts)
        if len({t.shape[2:] for t in ts}) > 1:  # MLA: dv with its own head dim
            return self._gather_flat(ts, what)
        S = ts[0].shape[2]
        x = torch.cat([self._to_layout(t, S) for t in ts], dim=1)  # (B, sum H_i/P, S, ...)
        y = self._all_to_all(x, 2, 1, what)  # (B, P * sum H_i/P, S/P, ...)
        y = y.unflatten(1, (P, x.shape[1]))
        return [part.flatten(1, 2) for part in y.split([t.shape[1] for t in ts], dim=2)]

    def _scatter_flat(self, ts: list[torch.Tensor], what: str) -> list[torch.Tensor]:
        """:meth:`_scatter_heads` for tensors whose trailing dims differ (v's head dim Dv != D): each rank's
        chunk of every tensor flattened into one message row, (B, P, sum H_i/P s D_i) -> the same from each rank."""
        P = self.size
        x = torch.cat([t.unflatten(1, (P, t.shape[1] // P)).flatten(2) for t in ts], dim=2)  # (B, P, sum n_i)
        y = self._all_to_all(x, 1, 1, what)  # (B, P (source rank), sum n_i)
        out = []
        for t, part in zip(ts, y.split([t.shape[1] // P * math.prod(t.shape[2:]) for t in ts], dim=2)):
            h = t.shape[1] // P
            part = part.unflatten(2, (h, *t.shape[2:])).transpose(1, 2).flatten(2, 3)  # (B, h, P s, ...)
            out.append(self._to_global(part, part.shape[2]))
        return out

    def _gather_flat(self, ts: list[torch.Tensor], what: str) -> list[torch.Tensor]:
        """Inverse of :meth:`_scatter_flat`: (B, H_i/P, S, D_i) in global order -> (B, H_i, S/P, D_i)."""
        P = self.size
        S = ts[0].shape[2]
        parts = [self._to_layout(t, S).unflatten(2, (P, S // P)).transpose(1, 2) for t in ts]  # (B, P, h, s, D_i)
        x = torch.cat([p.flatten(2) for p in parts], dim=2)  # (B, P (destination rank), sum n_i)
        y = self._all_to_all(x, 1, 1, what)  # (B, P (source rank: its heads), sum n_i)
        out = []
        for p, part in zip(parts, y.split([math.prod(p.shape[2:]) for p in parts], dim=2)):
            out.append(part.unflatten(2, p.shape[2:]).flatten(1, 2))  # (B, P h, s, D_i)
        return out

    def _all_to_all(self, x: torch.Tensor, scatter_dim: int, gather_dim: int, what: str) -> torch.Tensor:
        """:func:`seqpar.comm.all_to_all`; a transport failure becomes a :class:`CommError` saying where."""
        return self._collective(lambda: all_to_all(x, self.group, scatter_dim, gather_dim),
                                f"in the all-to-all of {what}")

    def _kv_copies(self, hkv: int) -> int:
        """How often each kv head is sent: 1 if Hkv % P == 0, else P / Hkv."""
        return 1 if hkv % self.size == 0 else self.size // hkv

    # ------------------------------------------------------------------ the attention on the gathered sequence

    def _attend(self, q, k, v) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, Hq/P, S, D) q, (B, Hkv/P, S, D) k, v of the whole sequence (global order) -> (out, lse): one
        single-device kernel (:class:`seqpar.methods.hybrid.HybridMethod` runs a ring here instead)."""
        with step_timer(self.record, "forward", 0):
            return block_attention(q, k, v, mask=self._mask(q.shape[2]), scale=self.scale, backend=self.backend)

    def _attend_backward(self, dout, q, k, v, out, lse) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The gradients of :meth:`_attend` against the global (out, lse), shapes as its inputs."""
        with step_timer(self.record, "backward", 0):
            return block_attention_backward(dout, q, k, v, out, lse, mask=self._mask(q.shape[2]), scale=self.scale,
                                            backend=self.backend)

    def _mask(self, S: int) -> TileMask:
        """The call's mask on the whole sequence in global order (one piece: every row sees itself)."""
        (whole,) = sequence_tile(self.mask, S)
        assert whole.q.indices(S)[:2] == whole.kv.indices(S)[:2] == (0, S), whole
        return whole.mask

    # ------------------------------------------------------------------ the method

    def forward(self, q, k, v) -> tuple[torch.Tensor, torch.Tensor]:
        """-> out (B, Hq, S_local, D) fp32, lse (B, Hq, S_local) fp32 (fp64 for fp64 inputs)."""
        acc = acc_dtype(q.dtype)
        rep = self._kv_copies(k.shape[1])
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, P, s, D)
        qg, kg, vg = self._scatter_heads([q, k, v], "forward q/k/v")  # (B, Hq/P, S, D), (B, Hkv/P or 1, S, D)
        o, l = self._attend(qg, kg, vg)
        ol = torch.cat([o.to(acc), l.to(acc).unsqueeze(-1)], dim=-1)  # (B, Hq/P, S, D + 1): one message
        ol = self._gather_heads([ol], "forward out/lse")[0]
        out, lse = ol[..., :-1].contiguous(), ol[..., -1].contiguous()
        self._kept.update(gathered=(qg, kg, vg, o, l), lse_ptr=lse.data_ptr())
        return out, lse

    def backward(self, dout, q, k, v, out, lse) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Shapes as in :class:`seqpar.methods.base.Method` (``out``/``lse``: the global ones)."""
        acc = acc_dtype(q.dtype)
        hkv = k.shape[1]
        rep = self._kv_copies(hkv)
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        dt = q.dtype
        gathered = self._kept.pop("gathered", None)
        if gathered is not None and self._kept.pop("lse_ptr", None) == lse.data_ptr():
            # the backward of this object's own forward (not a replay, no sinks merged after it): its
            # gathered q, k, v, out, lse are still here, so only dout travels
            qg, kg, vg, og, lg = gathered
            og, lg = og.to(dt), lg.to(acc)
            (dog,) = self._scatter_heads([dout.to(dt)], "backward dout")
        else:
            qg, kg, vg, dog, og = self._scatter_heads([q, k.to(dt), v.to(dt), dout.to(dt), out.to(dt)],
                                                      "backward q/k/v/dout/out")
            (lg,) = self._scatter_heads([lse.to(acc)], "backward lse")
        gq, gk, gv = self._attend_backward(dog, qg, kg, vg, og, lg)
        dq, dk, dv = self._gather_heads([gq.to(acc), gk.to(acc), gv.to(acc)], "backward dq/dk/dv")
        if rep > 1:  # the copies' gradients, summed in the accumulation dtype
            dk, dv = (g.unflatten(1, (hkv, rep)).sum(2) for g in (dk, dv))
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
