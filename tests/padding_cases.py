"""Cases for tests/test_padding.py: an ``attention_mask`` passed beside a sharded batch (seqpar/passes/padding.py).

The reference is the unmodified tiny model (seqpar.testing.zoo) on the whole sequence in this process.
"""

from __future__ import annotations

import copy
import time

import torch

import seqpar
from seqpar.testing import zoo

S = 40
_MESHES: dict = {}


def _mesh(size: int):
    if size not in _MESHES:
        _MESHES[size] = seqpar.init_mesh(cp=size)
    return _MESHES[size]


def _mask(variant: str, rank: int, local: int) -> torch.Tensor | None:
    """global_ones / global_zeros (B, S); local_ones / local_zeros_rank1 (B, S_local), zeros on rank 1 only;
    bad_length (B, S_local + 1); none."""
    if variant == "none":
        return None
    if variant.startswith("global"):
        m = torch.ones(1, S, dtype=torch.long)
        if variant == "global_zeros":
            m[0, :3] = 0  # left padding
        return m
    if variant == "bad_length":
        return torch.ones(1, local + 1, dtype=torch.long)
    if variant == "rank0_only":  # the whole sequence's ones on rank 0, none elsewhere
        return torch.ones(1, S, dtype=torch.long) if rank == 0 else None
    if variant == "rank1_only":  # this rank's ones on rank 1, none elsewhere
        return torch.ones(1, local, dtype=torch.long) if rank == 1 else None
    m = torch.ones(1, local, dtype=torch.bool if variant == "dtype_rank0" and rank == 0 else torch.long)
    if variant == "local_zeros_rank1" and rank == 1:
        m[0, 0] = 0
    return m


VARIANTS = ("none", "global_ones", "local_ones", "global_zeros", "local_zeros_rank1", "bad_length")
# the ranks pass different kinds of input (none of them wrong on its own rank); then "none" again: the world still runs
ASYMMETRIC = ("rank0_only", "rank1_only", "dtype_rank0", "labels_rank0_only", "no_position_ids_rank1",
              "none_position_ids_rank1", "none_after")


def _asymmetric(variant: str, rank: int, kw: dict) -> dict:
    """kw (a shard_batch batch) as ``variant`` has it on ``rank``: a mask from :func:`_mask`, or labels on rank 0
    only, or no position_ids on rank 1."""
    if variant == "labels_rank0_only" and rank != 0:
        return {k: v for k, v in kw.items() if k not in ("labels", "shift_labels", "num_items_in_batch")}
    if variant == "no_position_ids_rank1" and rank == 1:
        return {k: v for k, v in kw.items() if k != "position_ids"}
    if variant == "none_position_ids_rank1" and rank == 1:  # present but None: HF would number 0..S/P-1
        return {**kw, "position_ids": None}
    mask = None if variant in ("labels_rank0_only", "no_position_ids_rank1", "none_position_ids_rank1",
                               "none_after") else \
        _mask(variant, rank, kw["input_ids"].shape[1])
    return kw if mask is None else {**kw, "attention_mask": mask}


def mask_variants(rank: int, size: int, *, model_type: str, class_name: str) -> dict[str, str]:
    """variant -> "loss rel X" (the sharded model's loss against the single-process one without a mask) or the error
    this rank raised (``Type: message``). Every variant in one call: a rank that hangs would fail the call."""
    mesh = _mesh(size)
    ref = zoo._reference(model_type, class_name)
    ids = torch.randint(3, 60, (1, S), generator=torch.Generator().manual_seed(7))
    batch = {"input_ids": ids, "labels": ids.clone()}
    want = ref(**batch, use_cache=False).loss.item()
    model = seqpar.parallelize(copy.deepcopy(ref), mesh, fsdp=False, mixers="auto")
    sharded = seqpar.shard_batch(batch, mesh)
    out, seconds = {}, {}
    for variant in VARIANTS + ASYMMETRIC:
        kw = dict(sharded)
        if variant in ASYMMETRIC:
            kw = _asymmetric(variant, rank, kw)
        else:
            mask = _mask(variant, rank, kw["input_ids"].shape[1])
            if mask is not None:
                kw["attention_mask"] = mask
        start = time.monotonic()
        try:
            got = model(**kw).loss.item()
            out[variant] = f"loss rel {abs(got - want) / abs(want):.2e}"
        except ValueError as e:
            out[variant] = f"ValueError: {e}"
        seconds[variant] = time.monotonic() - start
    out["seconds"] = seconds
    return out


def shard_batch_padding(rank: int, size: int, *, model_type: str, class_name: str) -> dict:
    """A right-padded row (35 tokens + 5 padding, labels -100 there) through shard_batch: no attention_mask comes
    back (the padding becomes an ignored end document), and the sharded model's loss equals the single-process
    model's given the mask."""
    mesh = _mesh(size)
    ref = zoo._reference(model_type, class_name)
    ids = torch.randint(3, 60, (1, S), generator=torch.Generator().manual_seed(8))
    mask = torch.ones(1, S, dtype=torch.long)
    mask[0, -5:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    want = ref(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss.item()
    model = seqpar.parallelize(copy.deepcopy(ref), mesh, fsdp=False, mixers="auto")
    sharded = seqpar.shard_batch({"input_ids": ids, "labels": labels, "attention_mask": mask}, mesh)
    got = model(**sharded).loss.item()
    return {"keys": sorted(sharded), "loss": abs(got - want) / abs(want)}
