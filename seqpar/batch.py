"""``seqpar.shard_batch``: a language-modelling batch -> this cp rank's shard of it, loss-correct.

Note
----
Next-token labels are shifted on the *whole* sequence before sharding, so the label of the last
token of a shard (whose target sits on another rank) is not lost::

    global        t0  t1  t2  t3  t4  t5  t6  t7
    labels        t0  t1  t2  t3  t4  t5  t6  t7     (HF convention: labels = input_ids)
    shifted       t1  t2  t3  t4  t5  t6  t7  -100   (target of each position)
    zigzag P=2    r0: t0 t1 t6 t7 | t1 t2 t7 -100     r1: t2 t3 t4 t5 | t3 t4 t5 t6
                      input_ids     labels               input_ids     labels

The models must then not shift again: Hugging Face causal LMs get ``shift_labels`` (their
``ForCausalLMLoss`` uses it as is); plain models treat ``labels`` as targets (nanoGPT style).
``num_items_in_batch`` is the number of non-ignored targets of the *whole* sequence, so the
per-rank loss sum / num_items_in_batch, summed over cp (``seqpar.parallelize`` does it), is the
single-device mean however unevenly ignored labels are spread over the shards.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from seqpar import layout as _layout
from seqpar.mesh import check_mesh, cp_mesh

__all__ = ["shard_batch", "shift_labels"]

_SEQ_KEYS = ("input_ids", "labels", "position_ids")


def _check_tensor(t: Any, key: str, *, integer: bool) -> None:
    """``batch[key]`` (if present) is a tensor with data, of an integer dtype when ``integer``."""
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"batch[{key!r}] must be a torch.Tensor (B, S), got {type(t).__name__}")
    if t.device.type == "meta":
        raise ValueError(f"batch[{key!r}] is on the meta device (a shape without data): shard_batch needs the data; "
                         f"materialise the batch on a real device first")
    if integer and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
        raise TypeError(f"batch[{key!r}] must be an integer tensor (token ids / positions, e.g. torch.long), got "
                        f"{t.dtype}")


def shift_labels(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """(B, S) labels -> (B, S) next-token targets: ``out[:, i] = labels[:, i + 1]``, last = ignore."""
    pad = torch.full_like(labels[:, :1], ignore_index)
    return torch.cat([labels[:, 1:], pad], dim=1)


def shard_batch(
    batch: Mapping[str, Any],
    mesh,
    layout: str = "zigzag",
    *,
    ignore_index: int = -100,
) -> dict[str, Any]:
    """Shard a full-sequence batch (the same on every cp rank) along the sequence over ``mesh["cp"]``.

    ``batch``: ``input_ids`` (B, S) [required], ``labels`` (B, S) unshifted (padding/prompt marked
    ``ignore_index``), ``position_ids`` (B, S), (1, S) or (S,) [default arange(S)], ``attention_mask``
    (B, S) only if all ones (padding is marked in labels instead). S must be a multiple of the
    layout's unit (cp, 2*cp for zigzag). Returns local tensors (B, S/cp): ``input_ids``,
    ``position_ids`` (global positions, so RoPE / learned positions see true positions),
    and with labels: ``labels`` and ``shift_labels`` (both the shifted targets), and
    ``num_items_in_batch`` (0-d long, the global count of non-ignored targets). Integer tensors only
    (``attention_mask``: any dtype). Bad input raises ``ValueError``/``TypeError`` naming the key; there
    is no communication, so only the ranks with bad input raise.
    """
    _, cp = check_mesh(mesh)
    _layout.check_layout(layout)
    if not isinstance(batch, Mapping):
        raise TypeError(f"batch must be a mapping of tensors (e.g. {{'input_ids': ids, 'labels': ids}}), got "
                        f"{type(batch).__name__}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int (the label of ignored targets, e.g. -100), got "
                        f"{type(ignore_index).__name__} {ignore_index!r}")
    unknown = [k for k in batch if k not in (*_SEQ_KEYS, "attention_mask")]
    if unknown:
        raise ValueError(f"shard_batch: unknown batch keys {sorted(map(repr, unknown))}; supported: "
                         f"{[*_SEQ_KEYS, 'attention_mask']}")
    if batch.get("input_ids") is None:
        raise ValueError("batch has no 'input_ids': pass {'input_ids': ids (B, S), ...}")
    for key in (*_SEQ_KEYS, "attention_mask"):
        _check_tensor(batch.get(key), key, integer=key != "attention_mask")
    ids = batch["input_ids"]
    if ids.ndim != 2:
        raise ValueError(f"batch['input_ids'] must be a 2-D tensor (B, S), got shape {tuple(ids.shape)}")
    B, S = ids.shape
    if S < 1:
        raise ValueError(f"batch['input_ids'] has shape {tuple(ids.shape)}: the sequence is empty (S=0)")
    pad = _layout.padding_needed(S, layout, cp)
    if pad:
        u = _layout.unit(layout, cp)
        raise ValueError(f"batch sequence length {S} is not divisible by {u} (layout={layout!r} over cp={cp} needs a "
                         f"multiple of {u}); pad the sequence by {pad} tokens to {S + pad} (labels={ignore_index})")
    allowed = {"labels": [(B, S)], "attention_mask": [(B, S)], "position_ids": [(B, S), (1, S), (S,)]}
    for key, shapes in allowed.items():
        t = batch.get(key)
        if t is not None and tuple(t.shape) not in shapes:
            want = " or ".join(str(s) for s in shapes)
            raise ValueError(f"batch[{key!r}] must have shape {want} like input_ids (B, S) = ({B}, {S}), got "
                             f"{tuple(t.shape)}")
    mask = batch.get("attention_mask")
    if mask is not None and not bool(mask.bool().all()):
        raise ValueError("shard_batch: attention_mask has zeros; seqpar does not mask keys. Mark padded positions "
                         f"with labels={ignore_index} (and pad at the end) instead")

    rank = cp_mesh(mesh).get_local_rank()
    local = lambda t: _layout.shard_tensor(t, -1, rank, cp, layout).contiguous()  # noqa: E731

    pos = batch.get("position_ids")
    pos = torch.arange(S, device=ids.device) if pos is None else pos.to(ids.device)
    if S > 1 and bool((pos[..., 1:] < pos[..., :-1]).any()):
        raise ValueError("batch['position_ids'] restart within a sequence (documents packed the way "
                         "DataCollatorWithFlattening marks them): seqpar's attention does not yet keep packed "
                         "documents apart, so tokens would attend across documents; pass one document per "
                         "sequence (or position_ids that only increase)")
    out: dict[str, Any] = {"input_ids": local(ids), "position_ids": local(pos.expand(B, S))}
    labels = batch.get("labels")
    if labels is not None:
        target = shift_labels(labels.to(ids.device), ignore_index)  # (B, S), shifted on the whole sequence
        out["labels"] = out["shift_labels"] = local(target)
        out["num_items_in_batch"] = (target != ignore_index).sum()
    return out
