"""The exact merge of per-rank partial attention results ``(out, lse)`` into one, in fp32 (fp64 for fp64).

Each rank attended the same query rows to its own shard of the keys: ``out_r`` is the softmax-weighted
mean of its values and ``lse_r`` the log-sum-exp of its scores (``-inf`` where it saw no key). The
whole-sequence result is their weighted mean, each weighted by its share of the softmax mass::

    m     = max_r lse_r                       (a row no rank saw: m = -inf -> out 0, lse -inf)
    w_r   = exp(lse_r - m)                    in [0, 1], one of them exactly 1: no overflow, den in [1, P]
    out   = sum_r w_r out_r / sum_r w_r
    lse   = m + log(sum_r w_r)

Note
----
:func:`merge_across` gathers every rank's partial in one all-gather (one latency hop; ``B Hq T (Dv + 1)``
floats per rank) and merges them locally in rank order, so every rank computes bit-identical results
(the decode logits and hence greedy or seeded sampled tokens agree on every rank)::

    rank 0: (o0, l0) --.                       .--> merge(o0..o3, l0..l3) = (out, lse) on rank 0
    rank 1: (o1, l1) --+-- all-gather [o | l] -+--> the same on rank 1
    rank 2: (o2, l2) --+                       +--> ...
    rank 3: (o3, l3) --'                       '--> ...

:func:`merge_tree` merges in log2 P exchanges instead (recursive doubling, Tree Attention's reduction): at
step d = 1, 2, 4, ... each rank swaps its running partial with rank ``r xor d`` and both merge the two in
the same order (the lower ranks' first, with :func:`seqpar.kernels.merge_partial`, the ring's stable pairwise
merge, in place), so every rank again ends bit-identical. It moves ``log2 P`` blocks
per rank where the all-gather moves ``P - 1``, for ``log2 P`` latencies instead of one: it pays for large
batches on many ranks (``seqpar.plan_inference`` picks)::

    d=1:  (0 1) (2 3)      ranks 0, 1 hold m01; 2, 3 hold m23
    d=2:  (0 2) (1 3)      every rank holds merge(m01, m23)
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist

from seqpar.comm import all_gather_tensor
from seqpar.kernels import acc_dtype, merge_partial

__all__ = ["merge_partials", "merge_across", "merge_tree", "tree_applies", "MergeKind", "MERGES", "TAG_MERGE"]

MergeKind = Literal["all_gather", "tree"]
MERGES: tuple[str, ...] = ("all_gather", "tree")
TAG_MERGE = 27  # the tree's messages: never an attention call's tag (seqpar.comm.call_tags: 17, 23 mod 64)


def merge_partials(outs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``outs`` (P, ..., Dv), ``lses`` (P, ...) -> the merged ``(out (..., Dv), lse (...))`` in the
    accumulation dtype (fp32; fp64 for fp64). Partials with ``lse = -inf`` contribute nothing (their
    ``out`` is never read, so it may hold anything finite or not)."""
    if outs.ndim != lses.ndim + 1 or outs.shape[:-1] != lses.shape:
        raise ValueError(f"merge_partials: outs (P, ..., Dv) and lses (P, ...) must agree on their leading dims, got "
                         f"{tuple(outs.shape)} and {tuple(lses.shape)}")
    acc = acc_dtype(outs.dtype if outs.dtype == torch.float64 else lses.dtype)
    outs, lses = outs.to(acc), lses.to(acc)
    m = lses.max(dim=0).values  # (...)
    m_safe = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    w = torch.exp(lses - m_safe)  # (P, ...): 0 where lse = -inf
    den = w.sum(dim=0)  # (...), >= 1 where any rank saw a key
    seen = den > 0
    num = (w.unsqueeze(-1) * torch.where(w.unsqueeze(-1) > 0, outs, torch.zeros_like(outs))).sum(dim=0)
    out = torch.where(seen.unsqueeze(-1), num / torch.where(seen, den, torch.ones_like(den)).unsqueeze(-1),
                      torch.zeros_like(num))
    lse = torch.where(seen, m_safe + torch.log(torch.where(seen, den, torch.ones_like(den))),
                      torch.full_like(m, float("-inf")))
    return out, lse


def merge_across(out: torch.Tensor, lse: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's partial ``out`` (..., Dv) and ``lse`` (...) -> the merge over every rank of ``group``
    (a resolved group; one rank: as is, in the accumulation dtype). One all-gather."""
    acc = acc_dtype(out.dtype if out.dtype == torch.float64 else lse.dtype)
    packed = torch.cat([out.to(acc), lse.to(acc).unsqueeze(-1)], dim=-1)  # (..., Dv + 1)
    parts = torch.stack(all_gather_tensor(packed, group))  # (P, ..., Dv + 1)
    return merge_partials(parts[..., :-1], parts[..., -1])


def tree_applies(group) -> bool:
    """The tree needs a torch.distributed group of a power-of-two size."""
    if not isinstance(group, dist.ProcessGroup):
        return False
    size = dist.get_world_size(group)
    return size > 1 and not size & (size - 1)


def merge_tree(out: torch.Tensor, lse: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor]:
    """As :func:`merge_across`, by recursive doubling: log2 P pairwise exchanges (``group``: a torch.distributed
    group of a power-of-two size; ``ValueError`` otherwise). Bit-identical on every rank."""
    if not tree_applies(group):
        raise ValueError("merge_tree needs a torch.distributed group of a power-of-two size (2, 4, 8, ...); use "
                         "merge='all_gather' for this group")
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    acc = acc_dtype(out.dtype if out.dtype == torch.float64 else lse.dtype)
    lse = lse.to(acc)
    # rows this rank saw no key of: out zeroed (it may hold NaN), so the pairwise merge's weight 0 reads a 0; merged
    # partials keep it (two unseen rows merge to the zero row, out 0 and lse -inf, as merge_partials gives)
    out = torch.where(torch.isneginf(lse).unsqueeze(-1), 0.0, out.to(acc))
    mine = torch.cat([out, lse.unsqueeze(-1)], dim=-1).contiguous()  # (..., Dv + 1)
    d = 1
    while d < size:
        peer = dist.get_global_rank(group, rank ^ d)
        theirs = torch.empty_like(mine)
        for work in dist.batch_isend_irecv([dist.P2POp(dist.isend, mine, peer, group, TAG_MERGE),
                                            dist.P2POp(dist.irecv, theirs, peer, group, TAG_MERGE)]):
            work.wait()
        low, high = (mine, theirs) if rank & d == 0 else (theirs, mine)  # the same order on both ranks
        merge_partial(low[..., :-1], low[..., -1], high[..., :-1], high[..., -1])  # into low, in place
        mine = low
        d *= 2
    return mine[..., :-1], mine[..., -1]
