"""``SeqparCache``: a transformers ``Cache`` whose layers are this rank's shards of a sharded KV cache.

Because it is a ``transformers.cache_utils.Cache``, ``model.generate`` and a model's ``cache=`` /
``past_key_values=`` argument take it unchanged. Each layer is a :class:`ShardLayer` holding a
:class:`~seqpar.inference.KVShard`. The forward hooks of a parallelized model
(:mod:`seqpar.passes.generate`) drive it through two phases per forward:

- ``prefill`` (the cache is empty): the prompt runs sharded under the layout with the model's
  sequence-parallel attention (the ring / ``auto``); ``update`` keeps this rank's K/V of the real
  prompt tokens and hands the shard on unchanged to the ring;
- ``decode`` (a forward on a warm cache): one new token, or a chunk of new tokens run by ``mode``:
  ``"pass_q"`` (replicated on every rank, like one token): ``update`` keeps each token's K/V on its owner
  rank only and returns this rank's whole shard; the attention then runs
  :func:`seqpar.inference.decode.attend_shard` on that layer's shard (:meth:`SeqparCache.attend`);
  ``"pass_kv"`` (the chunk sharded under the layout like a prompt): ``update`` holds the chunk's K/V
  shard until the attention runs :func:`seqpar.inference.extend_sharded` (its own ring plus the cache
  shards passed around the ring), which then keeps them. ``chunk=`` chooses between them for chunks of
  more than one token: ``"auto"`` (the cost model, :func:`seqpar.plan_inference.choose_chunk`) or one
  of the two.

``get_seq_length`` is the *global* number of tokens cached (what transformers numbers the next
position from); ``get_mask_sizes`` reports the global lengths. Nothing in it depends on transformers'
private state.
"""

from __future__ import annotations

from typing import Literal

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from seqpar.inference.decode import attend_shard
from seqpar.inference.extend import extend_sharded
from seqpar.inference.kv_shard import KVShard
from seqpar.inference.merge import MERGES, tree_applies
from seqpar.mesh import group_rank_size, resolve_group

__all__ = ["SeqparCache", "ShardLayer"]

Phase = Literal["idle", "prefill", "decode"]
Chunk = Literal["auto", "pass_q", "pass_kv"]
CHUNKS: tuple[str, ...] = ("auto", "pass_q", "pass_kv")


class ShardLayer(CacheLayerMixin):
    """One layer of a :class:`SeqparCache`: its :class:`KVShard` on this rank."""

    is_sliding = False
    is_compileable = False
    is_croppable = True

    def __init__(self, owner: "SeqparCache"):  # noqa: UP037
        # not CacheLayerMixin.__init__: keys / values are the shard's (read-only properties)
        self.owner = owner
        self.shard = KVShard(owner.group, owner.layout)
        self.step = -1  # the cache step that last updated this layer
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None  # pass-KV: the chunk's K/V shard

    keys = property(lambda self: self.shard.keys)
    values = property(lambda self: self.shard.values)
    is_initialized = property(lambda self: self.shard.keys is not None)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass  # the shard takes its shapes from its first fill / append

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        phase = self.owner.phase
        self.step = self.owner.step
        if phase == "prefill":  # this rank's prompt shard: kept (the real tokens), passed on to the ring as is
            self.shard.fill(key_states, value_states, self.owner.prompt_length, lengths=self.owner.prompt_rows)
            return key_states, value_states
        if phase == "decode" and self.owner.mode == "pass_kv":  # kept by extend_sharded, after its attention
            self.pending = (key_states, value_states)
            return key_states, value_states
        if phase == "decode":
            self.shard.append(key_states, value_states)
            return self.shard.keys, self.shard.values
        raise ValueError("SeqparCache: updated outside a forward of a model made by seqpar.parallelize (the model's "
                         "forward hooks prefill and decode it); pass it to that model, or use KVShard with "
                         "seqpar.attention(..., cache=) in a hand-written loop")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.owner.length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.shard = KVShard(self.owner.group, self.owner.layout)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.shard.select_batch(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.shard.keys is not None:
            self.shard.select_batch(torch.arange(self.shard.keys.shape[0]).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.shard.select_batch(indices)

    def crop(self, tokens_to_remove: int) -> None:
        self.shard.crop(_to_remove(tokens_to_remove))


def _to_remove(tokens_to_remove: int) -> int:
    """transformers' crop argument (``-n``: remove n tokens; 0: nothing) -> n; a positive value (an absolute
    length, transformers' legacy form) is refused by name, as transformers' own layers do."""
    if isinstance(tokens_to_remove, bool) or not isinstance(tokens_to_remove, int) or tokens_to_remove > 0:
        raise ValueError(f"SeqparCache.crop({tokens_to_remove!r}): pass -n to remove the latest n tokens")
    return -tokens_to_remove


class SeqparCache(Cache):
    """A KV cache sharded over ``group`` (``mesh["cp"]``, a ProcessGroup, or None: the default world) under
    ``layout``: this rank holds its layers' :class:`ShardLayer` s. Made by a parallelized model's forward
    (``model.generate(input_ids=prompt)``), or passed as ``cache=SeqparCache(mesh["cp"], layout)``; it must
    be the model's own group and layout (checked: ``ValueError`` otherwise).

    ``chunk``: how a forward of several new tokens on a warm cache runs: ``"pass_q"`` (replicated),
    ``"pass_kv"`` (sharded), or ``"auto"``: the faster by :func:`seqpar.plan_inference.choose_chunk` on
    ``machine`` (a :class:`seqpar.plan.Machine`; None: ``seqpar.plan.H100`` on CUDA, else
    ``seqpar.plan_inference.CPU``). ``merge``: how the partials of the replicated tokens (decode, pass-Q) are
    merged: ``"all_gather"`` (one collective), ``"tree"`` (log2 P exchanges; a power-of-two torch.distributed
    group), or ``"auto"``: the cheaper for each forward's bytes on ``machine``
    (:func:`seqpar.plan_inference.merge_choice`)."""

    def __init__(self, group=None, layout: str = "zigzag", *, chunk: Chunk = "auto", machine=None,
                 merge: str = "auto"):
        self.group = resolve_group(group)
        self.layout = layout
        KVShard(self.group, layout)  # checks the layout (raises before anything is built)
        if chunk not in CHUNKS:
            raise ValueError(f"SeqparCache: chunk={chunk!r}; expected one of {CHUNKS}")
        if merge not in ("auto", *MERGES):
            raise ValueError(f"SeqparCache: merge={merge!r}; expected 'auto' or one of {MERGES}")
        if merge == "tree" and group_rank_size(self.group)[1] > 1 and not tree_applies(self.group):
            raise ValueError(f"SeqparCache: merge='tree' needs a torch.distributed group of a power-of-two size; this "
                             f"one has {group_rank_size(self.group)[1]} ranks: use merge='all_gather' or 'auto'")
        self.chunk, self.machine, self.merge = chunk, machine, merge
        self.mode: str | None = None  # the current forward's: "pass_q" / "pass_kv" (a warm cache), else None
        super().__init__(layers=[])
        self.phase: Phase = "idle"
        self.length = 0  # global tokens cached (every rank's)
        self.prompt_length = 0
        self.prompt_rows: torch.Tensor | None = None  # a prefill of rows of different lengths: each row's (B,)
        self.step = 0  # forwards run on this cache
        self.new_tokens = 0  # tokens of the current forward

    # -- transformers' Cache interface

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        while len(self.layers) <= layer_idx:
            self.layers.append(ShardLayer(self))
        return self.layers[layer_idx].update(key_states, value_states)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.length

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    @property
    def is_initialized(self) -> bool:
        return self.length > 0

    @property
    def batch_size(self) -> int:
        shards = [layer.shard.keys for layer in self.layers if layer.shard.keys is not None]
        return shards[0].shape[0] if shards else -1

    def crop(self, tokens_to_remove: int) -> None:
        """Roll back the latest ``-tokens_to_remove`` tokens (assisted / speculative decoding's rejected draft):
        only tokens decoded or run as a replicated chunk (pass-Q) since the last sharded prefill."""
        n = _to_remove(tokens_to_remove)
        if self.phase != "idle":
            raise ValueError("SeqparCache.crop inside a forward on this cache; crop between forwards")
        for layer in self.layers:
            layer.crop(-n)
        self.length -= n

    # -- what seqpar's hooks and attention use

    def check_for(self, group, layout: str) -> None:
        """``ValueError`` unless this cache was made for ``group`` and ``layout`` (the model's)."""
        group = resolve_group(group)
        if group is not self.group or layout != self.layout:
            rank, size = group_rank_size(self.group)
            raise ValueError(f"cache: this SeqparCache is sharded over another group ({size} ranks) or layout "
                             f"({self.layout!r}) than the model's (layout {layout!r}): a cache serves the mesh and "
                             f"layout of the parallelize call that filled it; start a new cache for this model")

    def begin(self, phase: Phase, new_tokens: int, mode: str | None = None, *,
              lengths: torch.Tensor | None = None) -> None:
        """Start a forward of ``new_tokens``; a prefill of rows of different lengths passes each row's real
        tokens ``lengths`` (B,), the rows left-justified (:meth:`KVShard.fill`)."""
        if self.phase != "idle":
            raise ValueError("SeqparCache: a forward on this cache did not finish (it raised); the cache is "
                             "incomplete, start a new one")
        self.phase, self.new_tokens, self.mode = phase, new_tokens, mode
        if phase == "prefill":
            self.prompt_length, self.prompt_rows = new_tokens, lengths

    def end(self) -> None:
        self.length += self.new_tokens
        self.phase, self.new_tokens, self.mode = "idle", 0, None
        self.step += 1

    def attend(self, layer_idx: int | None, q: torch.Tensor, **options) -> torch.Tensor:
        """The attention of layer ``layer_idx`` on the warm cache: the new tokens' (replicated; the shard
        already holds them), or with mode "pass_kv" this rank's shard of the chunk's (extend_sharded)."""
        if layer_idx is None or layer_idx >= len(self.layers) or self.layers[layer_idx].step != self.step:
            raise ValueError(f"SeqparCache: attention of layer {layer_idx} without this step's cache update of that "
                             f"layer (a model sharing K/V between layers, or an attention module without layer_idx) "
                             f"is not supported on a sharded cache")
        layer = self.layers[layer_idx]
        if self.mode == "pass_kv":
            (k, v), layer.pending = layer.pending, None
            return extend_sharded(q, k, v, layer.shard, length=self.new_tokens, **options)
        return attend_shard(q, layer.shard, merge=self._merge_for(q), **options)

    def _merge_for(self, q: torch.Tensor) -> str:
        size = group_rank_size(self.group)[1]
        if self.merge != "auto":
            return self.merge if size > 1 else "all_gather"
        if not tree_applies(self.group):
            return "all_gather"
        from seqpar.plan_inference import machine_for, merge_choice

        nbytes = q.shape[0] * q.shape[1] * q.shape[2] * (self.layers[0].shard.values.shape[-1] + 1) * 4
        return merge_choice(self.machine if self.machine is not None else machine_for(q.device), nbytes, size)

    def rows(self) -> tuple[torch.Tensor, int] | None:
        """Rows of different lengths (a left-padded prompt): (each row's real prompt tokens (B,), the prompt's
        width); None when every row is the whole sequence."""
        shard = self.layers[0].shard if self.layers else None
        return None if shard is None or shard.lengths is None else (shard.lengths, shard.width)

    def held(self) -> list[int]:
        """The entries this rank holds, per layer."""
        return [layer.shard.held for layer in self.layers]
