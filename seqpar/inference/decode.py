"""Decode on a sharded KV cache: the new token's query attends to every rank's cache shard, merged exactly.

The query of the new token is the same on every rank (the decode step runs replicated). Each rank
attends it to the entries of its own :class:`~seqpar.inference.KVShard` with the existing single-tile
kernels (one full tile: a decode query sees every cached entry, earlier ones by construction and the
window's after :meth:`~seqpar.inference.KVShard.evict`; soft-cap and GQA as in training), giving a
partial ``(out, lse)`` in fp32; a rank that holds nothing visible skips its tile (``lse = -inf``,
weight 0). :func:`seqpar.inference.merge.merge_across` merges the partials exactly; attention sinks
join after the merge, as in training. Several new tokens replicated on every rank (pass-Q: a chunk on a
warm cache) take the same path, each rank's tile masked by global position (:func:`position_tile`).

Note
----
One decode step of one layer on P = 4 ranks (``.``: an entry outside the window, evicted)::

    q (B, Hq, 1, D), the same everywhere
      rank 0: [k0 k1 k9 k12]   -> tile -> (o0, l0)  \
      rank 1: [k3 k4 k13]      -> tile -> (o1, l1)   |  all-gather [o | l]   -> out = sum w_r o_r / sum w_r
      rank 2: [. . k10]        -> tile -> (o2, l2)   |  w_r = exp(l_r - max l)   (the same on every rank)
      rank 3: []               -> skip: l3 = -inf   /
"""

from __future__ import annotations

import math

import torch

from seqpar.inference.kv_shard import KVShard
from seqpar.inference.merge import MERGES, merge_across, merge_tree
from seqpar.kernels import TileMask, acc_dtype, block_attention, resolve_backend
from seqpar.methods.base import merge_sinks

__all__ = ["decode_attention", "attend_shard", "position_tile"]


def _check_query(q: torch.Tensor, shard: KVShard, *, is_causal, window_size, enable_gqa, cu_seqlens) -> None:
    if not isinstance(q, torch.Tensor) or q.ndim != 4:
        raise ValueError(f"decode: q must be a 4-D tensor (B, Hq, T, D), got "
                         f"{tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__}")
    if q.shape[-2] < 1:
        raise ValueError(f"decode: q has T={q.shape[-2]} new tokens; pass at least one")
    if not is_causal:
        raise ValueError("decode: is_causal=False; a KV cache serves causal decoding only (a later token would "
                         "change the earlier tokens' outputs)")
    if cu_seqlens is not None:
        raise ValueError("decode: cu_seqlens (packed documents) on a KV cache is not supported; decode one "
                         "sequence per batch row")
    if not (isinstance(window_size, tuple) and len(window_size) == 2):
        raise TypeError(f"decode: window_size must be a (left, right) tuple of ints, got {window_size!r}")
    if shard.keys is not None:
        hq, hkv = q.shape[1], shard.keys.shape[1]
        if q.shape[0] != shard.keys.shape[0] or q.shape[-1] != shard.keys.shape[-1] or hq % hkv:
            raise ValueError(f"decode: q (B, Hq, T, D) = {tuple(q.shape)} does not fit the cache's keys (B, Hkv, n, D) "
                             f"= {tuple(shard.keys.shape)} (same B and D, Hq a multiple of Hkv)")
        if hq != hkv and not enable_gqa:
            raise ValueError(f"decode: q has {hq} heads and the cache {hkv}: pass enable_gqa=True")


def position_tile(
    q: torch.Tensor,  # (B, Hq, T, D)
    q_pos: torch.Tensor,  # (T,) or per row (B, T) long: the queries' global positions
    k: torch.Tensor,  # (B, Hkv, n, D)
    v: torch.Tensor,  # (B, Hkv, n, Dv)
    k_pos: torch.Tensor,  # (n,) or per row (B, n) long: the keys' global positions (any order, gaps allowed)
    *,
    scale: float,
    softcap: float = 0.0,
    left: int = -1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One tile masked by global positions: query i sees key j iff ``k_pos[j] <= q_pos[i]`` and (``left >= 0``)
    ``k_pos[j] >= q_pos[i] - left``. -> ``(out (B, Hq, T, Dv), lse (B, Hq, T))`` in the accumulation dtype;
    a row that sees nothing gets out 0, lse -inf. Plain math in fp32 (fp64 for fp64), in row blocks of at
    most ~4M scores: the tile of several new tokens against a cache shard whose positions are not one
    contiguous run (the layout's chunks, then dealt tokens), which the kernels' band masks cannot express, or
    whose positions differ per row (rows of different lengths: :meth:`KVShard.row_positions`)."""
    acc = acc_dtype(q.dtype)
    B, Hq, T, D = q.shape
    Hkv, n, Dv = k.shape[1], k.shape[-2], v.shape[-1]
    out = torch.zeros((B, Hq, T, Dv), dtype=acc, device=q.device)
    lse = torch.full((B, Hq, T), float("-inf"), dtype=acc, device=q.device)
    if n == 0 or T == 0:
        return out, lse
    g = Hq // Hkv
    qq = q.to(acc).reshape(B, Hkv, g, T, D)
    kk, vv = k.to(acc).unsqueeze(2), v.to(acc).unsqueeze(2)  # (B, Hkv, 1, n, D)
    k_pos = k_pos.to(q.device).reshape(-1, 1, n)  # (B or 1, 1, n)
    q_pos = q_pos.to(q.device).reshape(-1, T, 1)  # (B or 1, T, 1)
    rows = max(1, (1 << 22) // max(1, B * Hq * n))
    for i in range(0, T, rows):
        s = (qq[:, :, :, i:i + rows] @ kk.transpose(-1, -2)) * scale  # (B, Hkv, g, t, n)
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        qp = q_pos[:, i:i + rows]  # (B or 1, t, 1)
        seen = k_pos <= qp  # (B or 1, t, n)
        if left >= 0:
            seen &= k_pos >= qp - left
        s = s.masked_fill(~seen[:, None, None], float("-inf"))
        m = torch.logsumexp(s, dim=-1)  # (B, Hkv, g, t)
        m_safe = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
        o = torch.exp(s - m_safe.unsqueeze(-1)) @ vv  # (B, Hkv, g, t, Dv): rows seeing nothing are 0
        t = o.shape[-2]
        out[:, :, i:i + t] = o.reshape(B, Hq, t, Dv)
        lse[:, :, i:i + t] = m.reshape(B, Hq, t)
    return out, lse


def attend_shard(
    q: torch.Tensor,  # (B, Hq, T, D), the same on every rank
    shard: KVShard,  # already holds the new tokens' K/V (each on its owner)
    *,
    is_causal: bool = True,
    scale: float | None = None,
    enable_gqa: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
    backend: str = "auto",
    cu_seqlens=None,
    merge: str = "all_gather",
) -> torch.Tensor:
    """The last T tokens' attention over the whole sharded cache -> (B, Hq, T, Dv) in q's dtype, the same on
    every rank. ``window_size=(left, right)``: entries before ``first position - left`` are evicted first.
    T = 1 (decode): one full tile of the kernels; T > 1 (pass-Q: a chunk on a warm cache, replicated): the
    chunk's queries against this rank's entries masked by global position (:func:`position_tile`: the
    cache before the chunk, and the chunk's own causal part, its tokens dealt over the ranks); rows of
    different lengths (a left-padded prompt): :func:`position_tile` with each row's own positions, its
    padding masked out. ``merge``: the
    partials merged by one all-gather (:func:`merge_across`) or log2 P exchanges (:func:`merge_tree`)."""
    _check_query(q, shard, is_causal=is_causal, window_size=window_size, enable_gqa=enable_gqa,
                 cu_seqlens=cu_seqlens)
    if merge not in MERGES:
        raise ValueError(f"decode: merge={merge!r}; expected one of {MERGES}")
    backend = resolve_backend(backend, q.device)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    T = q.shape[-2]
    position = shard.length - T  # the first query's global position (slot): the cache already holds its token
    if window_size[0] >= 0:  # rows of different lengths: a row may see up to shard.lag slots further back
        shard.evict(position - window_size[0] - shard.lag)
    acc = acc_dtype(q.dtype)
    dv = shard.values.shape[-1]
    rows = shard.row_positions()  # (B, n): rows of different lengths, each masked by its own positions
    if T > 1 or rows is not None:
        q_pos = shard.query_positions(position, T, q.device)
        out, lse = position_tile(q, q_pos, shard.keys, shard.values, shard.positions if rows is None else rows,
                                 scale=scale, softcap=float(softcap), left=window_size[0])
    elif shard.held:  # every held entry is visible: earlier (or the token itself) and inside the window
        mask = TileMask("full", softcap=float(softcap)) if softcap else TileMask("full")
        out, lse = block_attention(q, shard.keys, shard.values, mask=mask, scale=scale, backend=backend)
        out, lse = out.to(acc), lse.to(acc)
    else:  # nothing visible here: no tile, weight 0 in the merge
        out = torch.zeros((*q.shape[:-1], dv), dtype=acc, device=q.device)
        lse = torch.full(q.shape[:-1], float("-inf"), dtype=acc, device=q.device)
    out, lse = merge_tree(out, lse, shard.group) if merge == "tree" else merge_across(out, lse, shard.group)
    if sinks is not None:
        out, lse = merge_sinks(out, lse, sinks.detach())
    return out.to(q.dtype)


def decode_attention(
    q: torch.Tensor,  # (B, Hq, T, D), the same on every rank
    k: torch.Tensor,  # (B, Hkv, T, D), the same on every rank
    v: torch.Tensor,  # (B, Hkv, T, Dv)
    shard: KVShard,
    **options,
) -> torch.Tensor:
    """One decode step of one layer (T = 1), or a chunk of T new tokens replicated on every rank (pass-Q):
    the new tokens' ``k``, ``v`` each kept by its owner rank (:meth:`KVShard.append`), then
    :func:`attend_shard` (``options``: its keyword arguments)."""
    _check_query(q, shard, is_causal=options.get("is_causal", True), window_size=options.get("window_size", (-1, -1)),
                 enable_gqa=options.get("enable_gqa", False), cu_seqlens=options.get("cu_seqlens"))
    if k.shape[-2] != q.shape[-2]:
        raise ValueError(f"decode: q has {q.shape[-2]} new tokens and k {k.shape[-2]}; pass the new tokens' q, k, v")
    shard.append(k, v)
    return attend_shard(q, shard, **options)
