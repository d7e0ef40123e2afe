"""One attention layer's KV cache on this rank of a sequence sharded over a group: ``KVShard``.

A prompt is prefilled sharded under a layout (:mod:`seqpar.layout`): each rank keeps the K/V of the
prompt tokens it owns (:meth:`KVShard.fill`). Each new token (decode: replicated on every rank) is
assigned to exactly one rank, the least loaded one (ties: the lowest rank), and only that rank keeps
its K/V (:meth:`KVShard.append`). Every rank makes the same assignment without communication (the
counts follow from the layout and the assignments before), so the cache stays balanced as it grows
(per-rank sizes differ by at most one token plus the prompt's padding). Every entry carries its global
position, for causal and window masks; a sliding-window layer drops what no later query can see
(:meth:`KVShard.evict`).

Note
----
A prompt of 10 tokens on P = 2 ranks under ``zigzag`` (padded to 12: the 2 padding tokens are never
kept), then 5 new tokens (positions 10..14) dealt to the least loaded rank::

    prompt (zigzag):  rank 0: 0 1 2 | 9 10 11     keeps 0 1 2 9        (4)
                      rank 1: 3 4 5 | 6  7  8     keeps 3 4 5 6 7 8    (6)
    new tokens:       10 -> 0 (4 < 6), 11 -> 0 (5 < 6), 12 -> 0 (6 = 6: lowest), 13 -> 1, 14 -> 0
    held:             rank 0: 0 1 2 9 10 11 12 14 (8)   rank 1: 3 4 5 6 7 8 13 (7)

Rows of different lengths (a left-padded batch, ``fill(..., lengths=)``): every row is prefilled
left-justified in one slot space (row b's real tokens at slots 0 .. L_b - 1, its padding moved after them,
so causally no real token sees it), and new tokens take the next slots, the same for every row. A slot
is an entry of every row; what it is *for row b* is :meth:`KVShard.row_positions`: its real position,
or nothing (the padding, ``NO_POSITION``: no query sees it)::

    width 6, lengths (6, 4, 2), 2 new tokens:
      slot:        0 1 2 3 4 5 | 6 7
      row 0 (6):   0 1 2 3 4 5 | 6 7        row b's position = slot - (width - L_b) from the new tokens on
      row 1 (4):   0 1 2 3 - - | 4 5        (HF numbers a left-padded row's tokens from 0 the same way)
      row 2 (2):   0 1 - - - - | 2 3
"""

from __future__ import annotations

from collections import deque

import torch

from seqpar.layout import check_layout, global_indices, padding_needed
from seqpar.mesh import group_rank_size, resolve_group

__all__ = ["KVShard", "place", "CROPPABLE", "NO_POSITION"]

CROPPABLE = 4096  # the latest dealt tokens whose owners a KVShard remembers, so that crop can roll them back
NO_POSITION = 1 << 62  # a row's position of a slot that is its padding: later than every query, so never seen


def place(counts: list[int], n: int) -> list[int]:
    """The owners of ``n`` new tokens given each rank's token count (updated in place): each token to the
    least loaded rank, ties to the lowest rank. Pure and deterministic: every rank computes the same."""
    owners = []
    for _ in range(n):
        r = min(range(len(counts)), key=lambda i: (counts[i], i))
        counts[r] += 1
        owners.append(r)
    return owners


class KVShard:
    """This rank's K/V of one attention layer: ``keys`` (B, Hkv, n, D), ``values`` (B, Hkv, n, Dv),
    ``positions`` (n,) long, the global position of each entry; ``length``: the tokens of the whole
    sequence so far (every rank's); ``counts``: the tokens assigned to each rank (what placement reads).

    ``group``: the ranks the sequence is sharded over (a ProcessGroup, ``mesh["cp"]``, a seqpar transport
    group, or None: the default world); ``layout``: the prompt's layout (``"packed"`` is refused: its
    shards follow documents, and a prompt is one)."""

    def __init__(self, group=None, layout: str = "zigzag"):
        check_layout(layout)
        if layout == "packed":
            raise ValueError("KVShard: layout='packed' deals documents, and a prompt is one sequence; use 'zigzag', "
                             "'striped' or 'contiguous'")
        self.group = resolve_group(group)
        self.rank, self.size = group_rank_size(self.group)
        self.layout = layout
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.positions = torch.empty(0, dtype=torch.long)
        self.length = 0
        self.counts = [0] * self.size
        self.dealt: deque[int] = deque(maxlen=CROPPABLE)  # owners of the latest tokens (what crop rolls back)
        # rows of different lengths: each row's real prompt tokens (B,) long, of a prompt ``width`` slots wide
        # (None: every row is the whole sequence, slot = position)
        self.lengths: torch.Tensor | None = None
        self.width = 0

    @property
    def held(self) -> int:
        """The number of entries this rank holds."""
        return int(self.positions.numel())

    def _check(self, k: torch.Tensor, v: torch.Tensor, what: str) -> None:
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor) or t.ndim != 4:
                raise ValueError(f"{what}: {name} must be a 4-D tensor (B, Hkv, S, D), got "
                                 f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if k.shape[:-1] != v.shape[:-1]:
            raise ValueError(f"{what}: k (B, Hkv, S, D) and v (B, Hkv, S, Dv) must agree on (B, Hkv, S), got "
                             f"{tuple(k.shape)} and {tuple(v.shape)}")
        if self.keys is not None and (k.shape[:2] != self.keys.shape[:2] or k.shape[-1] != self.keys.shape[-1]
                                      or v.shape[-1] != self.values.shape[-1] or k.dtype != self.keys.dtype):
            raise ValueError(f"{what}: k {tuple(k.shape)} {k.dtype} / v {tuple(v.shape)} do not match the cache's "
                             f"(B, Hkv, n, D) = {tuple(self.keys.shape)} {self.keys.dtype} / Dv = "
                             f"{self.values.shape[-1]}: one cache serves one layer of one batch")

    def real_length(self, s_local: int, length: int | None, what: str) -> int:
        """A shard of ``s_local`` tokens per rank is a prompt / chunk of ``S = s_local * P`` tokens under the
        layout, ``length`` of them real (default S) -> ``length``; ``ValueError`` naming ``what`` unless
        0 < length <= S and S divides under the layout."""
        s = s_local * self.size
        length = s if length is None else length
        if not 0 < length <= s or padding_needed(s, self.layout, self.size):
            raise ValueError(f"{what}: a shard of {s_local} tokens on {self.size} ranks is a sequence of {s} tokens "
                             f"(a multiple of layout={self.layout!r}'s unit) of which length={length} are real; pad "
                             f"it at the end to that multiple and pass its real length")
        return length

    def fill(self, k: torch.Tensor, v: torch.Tensor, length: int | None = None, *,
             lengths: torch.Tensor | None = None) -> None:
        """Prefill: ``k`` (B, Hkv, S_local, D), ``v`` (B, Hkv, S_local, Dv), this rank's shard of a prompt of
        ``S = S_local * P`` tokens under the layout; entries at positions >= ``length`` (the prompt's padding
        to the layout's multiple; default S) are not kept. On a warm cache (a chunk prefilled sharded, pass-KV:
        :func:`seqpar.inference.extend_sharded`) the chunk's positions start at the cache's ``length``.

        ``lengths`` (B,) ints in 1 .. length: rows of different lengths, each prefilled left-justified (row b's
        real tokens at slots 0 .. lengths[b] - 1, the rest its padding, never seen: :meth:`row_positions`);
        an empty shard only."""
        self._check(k, v, "KVShard.fill")
        length = self.real_length(k.shape[-2], length, "KVShard.fill")
        s = k.shape[-2] * self.size  # the prompt / chunk with its end padding
        if self.lengths is not None:
            raise ValueError("KVShard.fill: this cache holds rows of different lengths (a left-padded prompt); a "
                             "chunk sharded over the ranks (pass-KV) numbers one set of positions for the batch: run "
                             "the chunk replicated (pass-Q: decode_attention / SeqparCache(chunk='pass_q'))")
        if lengths is not None:
            lengths = torch.as_tensor(lengths).to("cpu", torch.long).reshape(-1)
            if self.length or lengths.numel() != k.shape[0] or not bool(((lengths >= 1) & (lengths <= length)).all()):
                raise ValueError(f"KVShard.fill: lengths={lengths.tolist()} must give each of the B={k.shape[0]} rows "
                                 f"1 .. length={length} real tokens, on an empty cache (a first prompt)")
        owner = torch.empty(s, dtype=torch.long)  # the rank of each position of the (padded) prompt / chunk
        for r in range(self.size):
            pos = global_indices(s, r, self.size, self.layout)
            keep = pos < length
            owner[pos] = r
            self.counts[r] += int(keep.sum())
            if r == self.rank:
                idx = torch.nonzero(keep).flatten().to(k.device)
                mine = (k.detach().index_select(-2, idx), v.detach().index_select(-2, idx))
                if self.keys is None:
                    self.keys, self.values = mine
                    self.positions = (self.length + pos[keep]).to(k.device)
                else:
                    self.keys = torch.cat([self.keys, mine[0]], dim=-2)
                    self.values = torch.cat([self.values, mine[1]], dim=-2)
                    self.positions = torch.cat([self.positions, (self.length + pos[keep]).to(self.positions.device)])
        self.length += length
        self.dealt.extend(owner[max(0, length - CROPPABLE):length].tolist())
        if lengths is not None and bool((lengths < length).any()):
            self.lengths, self.width = lengths, length

    def append(self, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """New tokens ``k`` (B, Hkv, T, D), ``v`` (B, Hkv, T, Dv), the same on every rank, at global positions
        ``length .. length + T - 1``: each kept by its owner (:func:`place`) only. Returns their positions."""
        self._check(k, v, "KVShard.append")
        n = k.shape[-2]
        dealt = place(self.counts, n)
        self.dealt.extend(dealt)
        owners = torch.tensor(dealt)
        pos = torch.arange(self.length, self.length + n)
        mine = torch.nonzero(owners == self.rank).flatten()
        if self.keys is None:  # nothing prefilled on any rank: an empty shard of the right shape
            self.keys = k.detach()[..., :0, :]
            self.values = v.detach()[..., :0, :]
            self.positions = self.positions.to(k.device)
        if mine.numel():
            idx = mine.to(k.device)
            self.keys = torch.cat([self.keys, k.detach().index_select(-2, idx)], dim=-2)
            self.values = torch.cat([self.values, v.detach().index_select(-2, idx)], dim=-2)
            self.positions = torch.cat([self.positions, pos[mine].to(self.positions.device)])
        self.length += n
        return pos

    def row_positions(self) -> torch.Tensor | None:
        """Rows of different lengths: each row's position of each held entry, (B, n) long, ``NO_POSITION`` where
        the slot is the row's padding; None when every row is the whole sequence (the slot is the position)."""
        if self.lengths is None:
            return None
        lengths = self.lengths.to(self.positions.device)[:, None]  # (B, 1)
        slots = self.positions[None, :]  # (1, n)
        gap = self.width - lengths
        return torch.where(slots < lengths, slots, torch.where(slots >= self.width, slots - gap, NO_POSITION))

    def query_positions(self, first: int, count: int, device=None) -> torch.Tensor:
        """The positions of ``count`` new tokens from slot ``first`` on: (count,) long, or (B, count) for rows of
        different lengths (row b's = slot - (width - L_b): what HF numbers them from a left-padded mask)."""
        slots = torch.arange(first, first + count, device=device)
        if self.lengths is None:
            return slots
        return slots[None, :] - (self.width - self.lengths.to(device))[:, None]

    @property
    def lag(self) -> int:
        """How many slots before a query's own window the longest padding lets a row still see (0 without rows):
        entries at slots < first query slot - left - lag are seen by no row (what a window evicts)."""
        return 0 if self.lengths is None else self.width - int(self.lengths.min())

    def crop(self, n: int) -> None:
        """Roll back the latest ``n`` tokens (a rejected speculative draft): each owner drops its entries of
        them and the counts that placement reads go back, on every rank without communication. At most the
        latest :data:`CROPPABLE` tokens (their owners are remembered)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"KVShard.crop: n must be an int >= 0 tokens to remove, got {n!r}")
        if n > len(self.dealt):
            raise ValueError(f"KVShard.crop: {n} tokens to roll back, but the cache remembers the owners of its latest "
                             f"{len(self.dealt)} only (at most {CROPPABLE}); start a new cache")
        if self.lengths is not None and self.length - n < self.width:
            raise ValueError(f"KVShard.crop: {n} tokens to roll back reach into a prompt of rows of different lengths "
                             f"({self.width} slots); only tokens after it can be rolled back: start a new cache")
        for _ in range(n):
            self.counts[self.dealt.pop()] -= 1
        self.length -= n
        if self.keys is not None and self.held:
            idx = torch.nonzero(self.positions < self.length).flatten()
            self.keys = self.keys.index_select(-2, idx)
            self.values = self.values.index_select(-2, idx)
            self.positions = self.positions[idx]

    def evict(self, before: int) -> None:
        """Drop the entries at positions < ``before`` (a sliding window's: no later query sees them)."""
        if self.keys is None or not self.held or int(self.positions.min()) >= before:
            return
        idx = torch.nonzero(self.positions >= before).flatten()
        self.keys = self.keys.index_select(-2, idx)
        self.values = self.values.index_select(-2, idx)
        self.positions = self.positions[idx]

    def select_batch(self, index: torch.Tensor) -> None:
        """Keep / reorder / repeat the batch rows ``index`` (beam search, batch expansion)."""
        if self.keys is not None:
            self.keys = self.keys.index_select(0, index.to(self.keys.device))
            self.values = self.values.index_select(0, index.to(self.values.device))
        if self.lengths is not None:
            self.lengths = self.lengths.index_select(0, index.to(self.lengths.device))
