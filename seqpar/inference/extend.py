"""A long chunk prefilled on a warm cache, sharded (pass-KV): ``extend_sharded``.

A chunk of T new tokens after L cached ones (a second prompt turn, a long document appended) runs
sharded under the cache's layout like a prompt (padded at the end to the layout's multiple; the
padding comes after every real token and is never kept). Each rank's chunk queries (positions
``L + the layout's``) need two parts, merged exactly like any two partial results:

1. the chunk's own causal part: the ring of training over the chunk's sharded K/V (:func:`seqpar.attention`
   with ``return_lse``; causal and window masks depend on ``i - j`` only, so the offset L changes nothing);
2. the cache: every rank's :class:`~seqpar.inference.KVShard` (entries before ``L - left`` of a window
   evicted first) travels the ring, padded to the largest shard (padding at a position no query sees),
   and each rank attends its chunk queries to each visiting block (:func:`~seqpar.inference.decode.position_tile`;
   every cached entry is earlier than every chunk query, so only the window masks).

Then sinks join the merged result, and each rank keeps its real chunk tokens' K/V (:meth:`KVShard.fill`).
Compare pass-Q (:func:`~seqpar.inference.decode_attention` with T > 1): the chunk replicated on every rank,
its queries against each rank's shard, one all-gather of the partials. pass-KV moves the cache
(``2 B Hkv (L/P) D`` elements per hop, P - 1 hops) and the chunk's K/V, and computes the model's other
layers on T/P tokens per rank; pass-Q moves only ``B Hq T (Dv + 1)`` floats per rank but computes every
layer on all T tokens on every rank: ``seqpar.plan_inference`` says which is faster.

Note
----
One layer, P = 2, cache 0..9 held ``r0: 0 1 2 9``, ``r1: 3..8``, chunk 10..17 (zigzag: r0 10 11 16 17,
r1 12..15)::

    r0: q(10 11 16 17) -- ring over the chunk --> self part (o_a, l_a)   merge(a, b) -> out, then sinks
                       -- own block [0 1 2 9], then r1's [3..8] --> cache part (o_b, l_b)
    r1: q(12..15)      -- the same with the blocks in the other order
    kept after:  r0: 0 1 2 9 10 11 16 17   r1: 3..8 12..15
"""

from __future__ import annotations

import math

import torch

from seqpar.comm import gather_ints, make_ring
from seqpar.inference.decode import position_tile
from seqpar.inference.kv_shard import KVShard
from seqpar.kernels import merge_partial
from seqpar.layout import global_indices
from seqpar.methods.base import merge_sinks

__all__ = ["extend_sharded", "TAG_CACHE"]

TAG_CACHE = 29  # the cache ring's messages: never an attention call's tag (seqpar.comm.call_tags: 17, 23 mod 64)
_NOWHERE = 1 << 62  # the position of a padding entry of a cache block: after every query, so never seen


def _check(q, k, v, shard: KVShard, length, *, is_causal, window_size, enable_gqa, cu_seqlens) -> int:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.ndim != 4:
            raise ValueError(f"extend_sharded: {name} must be a 4-D tensor (B, H, T_local, D), got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if not is_causal:
        raise ValueError("extend_sharded: is_causal=False; a KV cache serves causal attention only")
    if cu_seqlens is not None:
        raise ValueError("extend_sharded: cu_seqlens (packed documents) on a KV cache is not supported")
    if not (isinstance(window_size, tuple) and len(window_size) == 2):
        raise TypeError(f"extend_sharded: window_size must be a (left, right) tuple of ints, got {window_size!r}")
    if shard.keys is None:
        raise ValueError("extend_sharded: the cache is empty; prefill the prompt first (KVShard.fill or "
                         "seqpar.attention(..., cache=))")
    if shard.lengths is not None:
        raise ValueError("extend_sharded: the cache holds rows of different lengths (a left-padded prompt), each "
                         "numbered from its own first token, and a sharded chunk's ring numbers one set of positions "
                         "for the batch: run the chunk replicated (pass-Q: decode_attention, SeqparCache(chunk="
                         "'pass_q'))")
    if q.shape[0] != shard.keys.shape[0] or q.shape[-2] != k.shape[-2] or q.shape[-1] != shard.keys.shape[-1] \
            or q.shape[1] % shard.keys.shape[1]:
        raise ValueError(f"extend_sharded: q {tuple(q.shape)}, k {tuple(k.shape)} do not fit the cache's keys "
                         f"(B, Hkv, n, D) = {tuple(shard.keys.shape)} (same B and D, as many q as k tokens, Hq a "
                         f"multiple of Hkv)")
    if q.shape[1] != shard.keys.shape[1] and not enable_gqa:
        raise ValueError(f"extend_sharded: q has {q.shape[1]} heads and the cache {shard.keys.shape[1]}: pass "
                         f"enable_gqa=True")
    return shard.real_length(q.shape[-2], length, "extend_sharded")


def _cache_part(q, q_pos, shard: KVShard, *, scale: float, softcap: float, left: int):
    """This rank's chunk queries against every rank's cache shard, the shards passed around the ring."""
    n = max(r[0] for r in gather_ints([shard.held], shard.group))
    B, Hkv, _, D = shard.keys.shape
    Dv = shard.values.shape[-1]
    block = torch.zeros((B, Hkv, n, D + Dv), dtype=shard.keys.dtype, device=q.device)  # [K | V], padded
    block[:, :, :shard.held] = torch.cat([shard.keys, shard.values], dim=-1)
    pos = torch.full((n,), _NOWHERE, dtype=torch.long, device=q.device)
    pos[:shard.held] = shard.positions
    ring = make_ring(shard.group)
    out = lse = None  # the running (B, Hq, T_local, Dv), (B, Hq, T_local) in acc: one, not P partials
    for step in range(shard.size):
        if step < shard.size - 1:  # the next block in flight while this one is computed
            pending = (ring.exchange(block, tag=TAG_CACHE), ring.exchange(pos, tag=TAG_CACHE + 1))
        o, l = position_tile(q, q_pos, block[..., :D], block[..., D:], pos, scale=scale, softcap=softcap, left=left)
        if out is None:
            out, lse = o, l  # fresh tensors in acc, unseen rows out 0 / lse -inf
        else:
            merge_partial(out, lse, o, l)
        if step < shard.size - 1:
            block, pos = pending[0].wait(), pending[1].wait()
    return out, lse


def extend_sharded(
    q: torch.Tensor,  # (B, Hq, T_local, D): this rank's shard of the chunk under the cache's layout
    k: torch.Tensor,  # (B, Hkv, T_local, D)
    v: torch.Tensor,  # (B, Hkv, T_local, Dv)
    shard: KVShard,  # warm: holds this rank's entries of the L tokens before the chunk
    *,
    length: int | None = None,
    is_causal: bool = True,
    scale: float | None = None,
    enable_gqa: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
    backend: str = "auto",
    method: str = "ring",
    cu_seqlens=None,
) -> torch.Tensor:
    """pass-KV: a chunk of ``T_local * P`` tokens (``length`` of them real, the rest end padding), sharded
    under ``shard.layout``, attends to the cache and to itself causally -> this rank's shard of the output,
    (B, Hq, T_local, Dv) in q's dtype; the shard then holds the chunk's real tokens too. Every rank calls
    it (collective). ``method``: the chunk's own ring (:func:`seqpar.attention`'s)."""
    from seqpar.api import attention  # the layer above: imported on use

    length = _check(q, k, v, shard, length, is_causal=is_causal, window_size=window_size, enable_gqa=enable_gqa,
                    cu_seqlens=cu_seqlens)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    s = q.shape[-2] * shard.size
    cached = shard.length
    q_pos = cached + global_indices(s, shard.rank, shard.size, shard.layout).to(q.device)
    own, own_lse = attention(q, k, v, group=shard.group, is_causal=True, scale=scale, enable_gqa=enable_gqa,
                             layout=shard.layout, method=method, backend=backend, window_size=window_size,
                             softcap=softcap, return_lse=True)
    if window_size[0] >= 0:
        shard.evict(cached - window_size[0])  # what the chunk's first query can still see
    past, past_lse = _cache_part(q, q_pos, shard, scale=scale, softcap=float(softcap), left=window_size[0])
    merge_partial(past, past_lse, own.detach(), own_lse)  # in place into the fresh cache part, not into own
    out, lse = past, past_lse
    if sinks is not None:
        out, lse = merge_sinks(out, lse, sinks.detach())
    shard.fill(k, v, length)
    return out.to(q.dtype)
