"""Inference on a sharded sequence: a sharded KV cache, exact decode, and HF ``generate``.

- :class:`KVShard` (``kv_shard.py``): one layer's K/V on this rank, with global positions; prompt
  prefilled under the layout, new tokens dealt to the least loaded rank, windows evicted;
- :func:`decode_attention` / :func:`attend_shard` (``decode.py``): the new tokens' queries (one token, or a
  chunk replicated on every rank: pass-Q) against every rank's shard, partial (out, lse) merged exactly
  (:func:`merge_across`: one all-gather, or :func:`merge_tree`: log2 P exchanges; ``merge.py``);
- :func:`extend_sharded` (``extend.py``): a long chunk on a warm cache, sharded under the layout (pass-KV:
  its own ring plus every rank's cache shard passed around the ring);
- :class:`SeqparCache` (``cache.py``, needs transformers): a ``transformers`` Cache of KVShards, what
  ``model.generate`` on a parallelized model runs on (the hooks: :mod:`seqpar.passes.generate`).
"""

from seqpar.inference.decode import attend_shard, decode_attention, position_tile
from seqpar.inference.extend import extend_sharded
from seqpar.inference.kv_shard import KVShard, place
from seqpar.inference.merge import merge_across, merge_partials, merge_tree

__all__ = ["KVShard", "place", "decode_attention", "attend_shard", "position_tile", "extend_sharded", "merge_partials",
           "merge_across", "merge_tree", "SeqparCache"]


def __getattr__(name: str):
    if name == "SeqparCache":  # transformers is optional: imported on first use
        from seqpar.inference.cache import SeqparCache

        return SeqparCache
    raise AttributeError(f"module 'seqpar.inference' has no attribute {name!r}")
