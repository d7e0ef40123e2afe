"""Cases for tests/test_padding.py: an ``attention_mask`` passed beside a sharded batch (seqpar/passes/padding.py).

The reference is the unmodified tiny model (seqpar.testing.zoo) on the whole sequence in this process.
"""

from __future__ import annotations

import copy

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
    m = torch.ones(1, local, dtype=torch.long)
    if variant == "local_zeros_rank1" and rank == 1:
        m[0, 0] = 0
    return m


VARIANTS = ("none", "global_ones", "local_ones", "global_zeros", "local_zeros_rank1", "bad_length")


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
    out = {}
    for variant in VARIANTS:
        kw = dict(sharded)
        mask = _mask(variant, rank, kw["input_ids"].shape[1])
        if mask is not None:
            kw["attention_mask"] = mask
        try:
            got = model(**kw).loss.item()
            out[variant] = f"loss rel {abs(got - want) / abs(want):.2e}"
        except ValueError as e:
            out[variant] = f"ValueError: {e}"
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
