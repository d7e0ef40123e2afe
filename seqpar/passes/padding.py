"""Padding (Hugging Face models): the ``attention_mask`` a parallelized model is called with, checked on one rank.

:func:`seqpar.shard_batch` never returns one (padding becomes packed documents), but a user may pass one
next to the sharded ``input_ids``. The model's own code then reads it as a mask of its *local* tokens:
transformers' recurrent-mask helpers (``create_recurrent_attention_mask`` style) slice the last
``S_local`` columns of whatever mask they got, the state adapters apply a ``(B, S_local)`` mask per token,
and seqpar's attention mask hook refuses zeros -- on the ranks that see them only, which left the
others waiting in the next collective (a hang). :func:`check_attention_mask` judges this rank's mask; the
agreement pass (passes/agreement.py) gathers every rank's verdict and the kind of mask it passed (none too) in
the forward's one small all-gather, so all ranks decide the same before the model runs:

Note
----
P = 4, S = 40, S_local = 10, a mask (B, L)::

    L = 40 (the whole sequence), all ones     ->  this rank's (B, 10) columns (ones)
    L = 40 with zeros (padding)                ->  ValueError on every rank: build the batch with shard_batch
    L = 10 (this rank's tokens), all ones      ->  as it is
    L = 10 with zeros on rank r                ->  ValueError on rank r; "rank(s) [r] rejected" on the others
    a mask on some ranks, none (or another
    length / dtype) on others                  ->  the same ValueError on every rank naming attention_mask
    any other L, or B differs from input_ids   ->  ValueError naming the shapes
    a cached forward (generate)                ->  untouched (passes/generate.py reads it as left padding)

Masks that are not 2-D tensors (4-D masks, None) pass through to the model and seqpar's mask hook.
"""

from __future__ import annotations

__all__ = ["check_attention_mask"]


def check_attention_mask(mask, batch: int, local: int, world: int):
    """-> the mask this rank's tokens get, or ``ValueError``: ``mask`` (B, L) beside ``batch`` x ``local`` tokens
    on each of ``world`` ranks. No communication (passes/agreement.py agrees on the verdict)."""
    shape = tuple(mask.shape)
    if mask.ndim != 2 or shape[0] != batch or shape[1] not in (local, local * world):
        raise ValueError(f"seqpar: attention_mask has shape {shape}; beside input_ids of this rank's (B={batch}, "
                         f"S_local={local}) tokens it must be (B, S_local) = ({batch}, {local}) or the whole "
                         f"sequence's (B, S) = ({batch}, {local * world}). Better: no attention_mask, and the batch "
                         f"built with seqpar.shard_batch (padding becomes packed documents)")
    if not bool(mask.bool().all()):
        which = "this rank's tokens" if shape[1] == local and world > 1 else "the whole sequence"
        raise ValueError(f"seqpar: attention_mask (of {which}, shape {shape}) has zeros (padding), which a sharded "
                         f"model cannot honour. Pass the full batch with its attention_mask to seqpar.shard_batch "
                         f"instead: it drops the padding and keeps the rows apart as packed documents")
    return mask if shape[1] == local else mask.new_ones(batch, local)  # all ones: this rank's columns
