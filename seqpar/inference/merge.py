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
"""

from __future__ import annotations

import torch

from seqpar.comm import all_gather_tensor
from seqpar.kernels import acc_dtype

__all__ = ["merge_partials", "merge_across"]


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
