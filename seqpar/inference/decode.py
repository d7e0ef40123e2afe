"""Decode on a sharded KV cache: the new token's query attends to every rank's cache shard, merged exactly.

The query of the new token is the same on every rank (the decode step runs replicated). Each rank
attends it to the entries of its own :class:`~seqpar.inference.KVShard` with the existing single-tile
kernels (one full tile: a decode query sees every cached entry, earlier ones by construction and the
window's after :meth:`~seqpar.inference.KVShard.evict`; soft-cap and GQA as in training), giving a
partial ``(out, lse)`` in fp32; a rank that holds nothing visible skips its tile (``lse = -inf``,
weight 0). :func:`seqpar.inference.merge.merge_across` merges the partials exactly; attention sinks
join after the merge, as in training.

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
from seqpar.inference.merge import merge_across
from seqpar.kernels import TileMask, acc_dtype, block_attention, resolve_backend
from seqpar.methods.base import merge_sinks

__all__ = ["decode_attention", "attend_shard"]


def _check_query(q: torch.Tensor, shard: KVShard, *, is_causal, window_size, enable_gqa, cu_seqlens) -> None:
    if not isinstance(q, torch.Tensor) or q.ndim != 4:
        raise ValueError(f"decode: q must be a 4-D tensor (B, Hq, T, D), got "
                         f"{tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__}")
    if q.shape[-2] != 1:
        raise ValueError(f"decode: q has T={q.shape[-2]} new tokens; decode on a sharded cache takes one token per "
                         f"step (several new tokens on a warm cache, chunked prefill / pass-Q or speculative "
                         f"decoding, are not implemented)")
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
            raise ValueError(f"decode: q (B, Hq, 1, D) = {tuple(q.shape)} does not fit the cache's keys (B, Hkv, n, D) "
                             f"= {tuple(shard.keys.shape)} (same B and D, Hq a multiple of Hkv)")
        if hq != hkv and not enable_gqa:
            raise ValueError(f"decode: q has {hq} heads and the cache {hkv}: pass enable_gqa=True")


def attend_shard(
    q: torch.Tensor,  # (B, Hq, 1, D), the same on every rank
    shard: KVShard,  # already holds the new token's K/V (on its owner)
    *,
    is_causal: bool = True,
    scale: float | None = None,
    enable_gqa: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
    backend: str = "auto",
    cu_seqlens=None,
) -> torch.Tensor:
    """The last token's attention over the whole sharded cache -> (B, Hq, 1, Dv) in q's dtype, the same on
    every rank. ``window_size=(left, right)``: entries before ``position - left`` are evicted first."""
    _check_query(q, shard, is_causal=is_causal, window_size=window_size, enable_gqa=enable_gqa,
                 cu_seqlens=cu_seqlens)
    backend = resolve_backend(backend, q.device)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    position = shard.length - 1  # the query's global position: the cache already holds its token
    if window_size[0] >= 0:
        shard.evict(position - window_size[0])
    acc = acc_dtype(q.dtype)
    dv = shard.values.shape[-1]
    if shard.held:  # every held entry is visible: earlier (or the token itself) and inside the window
        mask = TileMask("full", softcap=float(softcap)) if softcap else TileMask("full")
        out, lse = block_attention(q, shard.keys, shard.values, mask=mask, scale=scale, backend=backend)
        out, lse = out.to(acc), lse.to(acc)
    else:  # nothing visible here: no tile, weight 0 in the merge
        out = torch.zeros((*q.shape[:-1], dv), dtype=acc, device=q.device)
        lse = torch.full(q.shape[:-1], float("-inf"), dtype=acc, device=q.device)
    out, lse = merge_across(out, lse, shard.group)
    if sinks is not None:
        out, lse = merge_sinks(out, lse, sinks.detach())
    return out.to(q.dtype)


def decode_attention(
    q: torch.Tensor,  # (B, Hq, 1, D), the same on every rank
    k: torch.Tensor,  # (B, Hkv, 1, D), the same on every rank
    v: torch.Tensor,  # (B, Hkv, 1, Dv)
    shard: KVShard,
    **options,
) -> torch.Tensor:
    """One decode step of one layer: the new token's ``k``, ``v`` kept by its owner rank
    (:meth:`KVShard.append`), then :func:`attend_shard` (``options``: its keyword arguments)."""
    _check_query(q, shard, is_causal=options.get("is_causal", True), window_size=options.get("window_size", (-1, -1)),
                 enable_gqa=options.get("enable_gqa", False), cu_seqlens=options.get("cu_seqlens"))
    if k.shape[-2] != q.shape[-2]:
        raise ValueError(f"decode: q has {q.shape[-2]} new tokens and k {k.shape[-2]}; pass the new tokens' q, k, v")
    shard.append(k, v)
    return attend_shard(q, shard, **options)
