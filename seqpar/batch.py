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


_FLASH_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")  # DataCollatorWithFlattening


def _documents(pos_row: torch.Tensor) -> list[int]:
    """Start offsets (> 0) of the documents in one row of ``position_ids`` (B=1 packing: a position that
    does not follow its predecessor, e.g. a restart at 0, starts a document: flash-attention's convention)."""
    if pos_row.numel() < 2:
        return []
    starts = torch.nonzero((pos_row[1:] == 0) | (pos_row[1:] < pos_row[:-1])).flatten() + 1
    return starts.tolist()


def _check_offsets(batch: Mapping[str, Any], B: int, S: int) -> list[int] | None:
    """``cu_seq_lens_q/k`` (+ ``max_length_q/k``) of a flattened batch -> the inner document starts."""
    cu_q, cu_k = batch.get("cu_seq_lens_q"), batch.get("cu_seq_lens_k")
    if cu_q is None and cu_k is None:
        for key in ("max_length_q", "max_length_k"):
            if batch.get(key) is not None:
                raise ValueError(f"batch[{key!r}] without cu_seq_lens_q/k: pass the document offsets too")
        return None
    for key, t in (("cu_seq_lens_q", cu_q), ("cu_seq_lens_k", cu_k)):
        if t is None:
            raise ValueError(f"batch has only one of cu_seq_lens_q / cu_seq_lens_k; pass both (equal), as "
                             f"DataCollatorWithFlattening(return_flash_attn_kwargs=True) does")
        _check_tensor(t, key, integer=True)
        if t.ndim != 1:
            raise ValueError(f"batch[{key!r}] must be 1-D [0, s1, s1+s2, ..., S], got shape {tuple(t.shape)}")
    if not torch.equal(cu_q.cpu().long(), cu_k.cpu().long()):
        raise ValueError("batch['cu_seq_lens_q'] and batch['cu_seq_lens_k'] differ: seqpar runs self-attention "
                         "over one packed stream, so they must be equal")
    if B != 1:
        raise ValueError(f"cu_seq_lens_q/k describe one packed row, but input_ids has B={B} rows; flatten the "
                         f"batch into one row (B=1), as DataCollatorWithFlattening does")
    cu = _layout.check_offsets(cu_q, S, name="batch['cu_seq_lens_q']")
    longest = max(b - a for a, b in zip(cu, cu[1:]))
    for key in ("max_length_q", "max_length_k"):
        m = batch.get(key)
        if m is not None and int(m) != longest:
            raise ValueError(f"batch[{key!r}]={int(m)} is not the longest document of cu_seq_lens_q ({longest})")
    return list(cu[1:-1])


def shard_batch(
    batch: Mapping[str, Any],
    mesh,
    layout: str = "zigzag",
    *,
    ignore_index: int = -100,
) -> dict[str, Any]:
    """Shard a full-sequence batch (the same on every cp rank) along the sequence over ``mesh["cp"]``.

    ``batch``: ``input_ids`` (B, S) [required], ``labels`` (B, S) unshifted (ignored targets marked
    ``ignore_index``), ``position_ids`` (B, S), (1, S) or (S,) [default arange(S)], ``attention_mask``
    (B, S) with 1 for tokens and 0 for padding (left, right or anywhere), and the flattened-batch keys
    of ``DataCollatorWithFlattening``: ``cu_seq_lens_q/k`` (equal, B=1) with ``max_length_q/k``.

    What comes back (local tensors; integer tensors only, ``attention_mask``: any dtype):

    - ``input_ids``, ``position_ids`` (the batch's positions, so RoPE / learned positions see the
      true ones), and with labels: ``labels`` and ``shift_labels`` (both the targets, shifted on the
      whole row before sharding) and ``num_items_in_batch`` (0-d long, the global count of
      non-ignored targets);
    - when the batch holds documents (``position_ids`` that restart, as flash-attention-2 reads them;
      ``cu_seq_lens_q/k``), padding (``attention_mask`` zeros) or a length S that is not a multiple of
      the layout's unit (cp, 2 cp for zigzag): ``cu_seq_lens_q`` / ``cu_seq_lens_k`` (global document
      offsets, int32, the same on every rank) and ``max_length_q/k``, which seqpar's attention reads
      (it keeps documents apart). Padding is dropped: rows with padding are flattened into one packed
      row (B=1) of their tokens, each row its own document(s), as DataCollatorWithFlattening does; a
      length that does not divide is padded at the end with one extra document of ignored tokens.
      Outputs and loss of the real tokens equal the single-device ones (padded tokens neither attend
      nor are attended to by real tokens, and their targets are ignored);
    - only when that end padding was added: ``seqpar_tokens``, this rank's (B, S_local) bool shard of
      the padded sequence, True for a real token, False for the padding. A model made by
      ``seqpar.parallelize`` takes it out of the forward's arguments (it never reaches the model) and
      leaves the padding out of the MoE router load-balancing loss; a model that is not parallelized
      does not accept it.

    Bad input raises ``ValueError``/``TypeError`` naming the key; there is no communication, so only
    the ranks with bad input raise.
    """
    _, cp = check_mesh(mesh)
    _layout.check_layout(layout)
    if not isinstance(batch, Mapping):
        raise TypeError(f"batch must be a mapping of tensors (e.g. {{'input_ids': ids, 'labels': ids}}), got "
                        f"{type(batch).__name__}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int (the label of ignored targets, e.g. -100), got "
                        f"{type(ignore_index).__name__} {ignore_index!r}")
    known = (*_SEQ_KEYS, "attention_mask", *_FLASH_KEYS)
    unknown = [k for k in batch if k not in known]
    if unknown:
        raise ValueError(f"shard_batch: unknown batch keys {sorted(map(repr, unknown))}; supported: {list(known)}")
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
    allowed = {"labels": [(B, S)], "attention_mask": [(B, S)], "position_ids": [(B, S), (1, S), (S,)]}
    for key, shapes in allowed.items():
        t = batch.get(key)
        if t is not None and tuple(t.shape) not in shapes:
            want = " or ".join(str(s) for s in shapes)
            raise ValueError(f"batch[{key!r}] must have shape {want} like input_ids (B, S) = ({B}, {S}), got "
                             f"{tuple(t.shape)}")
    given_docs = _check_offsets(batch, B, S)

    dev = ids.device
    pos = batch.get("position_ids")
    pos = torch.arange(S, device=dev).expand(B, S) if pos is None else pos.to(dev).expand(B, S)
    mask = batch.get("attention_mask")
    keep = None if mask is None or bool(mask.bool().all()) else mask.to(dev).bool()  # (B, S) True = token
    if keep is not None and not bool(keep.any()):
        raise ValueError("batch['attention_mask'] is all zeros: there is no token to train on")
    labels = batch.get("labels")
    target = None
    if labels is not None:
        labels = labels.to(dev)
        if keep is not None:
            labels = labels.masked_fill(~keep, ignore_index)  # a padded token is never a target
        target = shift_labels(labels, ignore_index)  # (B, S), shifted on each whole row
        if keep is not None:
            target = target.masked_fill(~keep, ignore_index)  # ... nor does it predict one
    docs = [given_docs if given_docs is not None else _documents(pos[b]) for b in range(B)]

    cu: list[int] | None = None
    if keep is not None or (B > 1 and any(docs)):  # rows differ: one packed row of the real tokens
        rows = [keep[b] if keep is not None else torch.ones(S, dtype=torch.bool, device=dev) for b in range(B)]
        cu = _packed_offsets(rows, docs)
        ids = torch.cat([ids[b][rows[b]] for b in range(B)])[None]
        pos = torch.cat([pos[b][rows[b]] for b in range(B)])[None]
        if target is not None:
            target = torch.cat([target[b][rows[b]] for b in range(B)])[None]
        B, S = ids.shape
    elif B == 1 and docs[0]:  # one packed row
        cu = [0, *docs[0], S]
    pad = _layout.padding_needed(S, layout, cp)
    if pad:  # one extra document of ignored tokens at the end
        cu = (cu or [0, S]) + [S + pad]
        ids = torch.cat([ids, ids.new_zeros(B, pad)], dim=1)
        pos = torch.cat([pos, pos[:, -1:] + 1 + torch.arange(pad, device=dev, dtype=pos.dtype)], dim=1)
        if target is not None:
            target = torch.cat([target, target.new_full((B, pad), ignore_index)], dim=1)
        S += pad

    rank = cp_mesh(mesh).get_local_rank()
    docs_of = tuple(cu) if cu is not None else None  # the packed layout deals these documents
    local = lambda t: _layout.shard_tensor(t, -1, rank, cp, layout, docs_of).contiguous()  # noqa: E731
    out: dict[str, Any] = {"input_ids": local(ids), "position_ids": local(pos.expand(B, S))}
    if target is not None:
        out["labels"] = out["shift_labels"] = local(target)
        out["num_items_in_batch"] = (target != ignore_index).sum()
    if pad:  # which tokens are real: the router loss (passes/router.py) leaves the padding out
        real = torch.ones(B, S, dtype=torch.bool, device=dev)
        real[:, S - pad:] = False
        out["seqpar_tokens"] = local(real)
    if cu is not None and len(cu) > 2:
        offsets = torch.tensor(cu, dtype=torch.int32, device=dev)
        longest = max(b - a for a, b in zip(cu, cu[1:]))  # from the host list: no read of the device tensor
        # one tensor for both: every layer's attention finds it agreed by identity (no host read per layer)
        out.update(cu_seq_lens_q=offsets, cu_seq_lens_k=offsets, max_length_q=longest, max_length_k=longest)
    return out


def _packed_offsets(rows: list[torch.Tensor], docs: list[list[int]]) -> list[int]:
    """Document offsets of the packed row made of each row's kept tokens: a document ends at the end of a
    row and where the row's own documents start (``docs[b]``: start offsets in the unpacked row)."""
    cu, total = [0], 0
    for keep, starts in zip(rows, docs):
        idx = torch.nonzero(keep).flatten()  # kept positions of this row, increasing
        if not idx.numel():  # a row of padding only: no document
            continue
        # a kept token starts a document if it is the row's first, or a document start lies in (prev, it]
        doc_of = torch.bucketize(idx, torch.tensor(starts, dtype=idx.dtype, device=idx.device), right=True) \
            if starts else torch.zeros_like(idx)
        new = torch.nonzero(doc_of[1:] != doc_of[:-1]).flatten() + 1
        cu += [total + int(n) for n in new.tolist()]
        total += idx.numel()
        cu.append(total)
    return cu
