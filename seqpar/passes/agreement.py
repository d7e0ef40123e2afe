"""Pass agreement (Hugging Face models): each forward's per-call inputs agreed by the cp ranks before the model runs.

A parallelized forward makes collectives (ring steps, a mixer's state exchange, the loss's all-reduce) that every
cp rank must join. An input checked on one rank only used to leave the others there: a rank without
``position_ids`` raised while the others waited in the ring until the process-group timeout; a rank passing an
``attention_mask`` where another passed none made an all-gather the other did not (gloo: a collective mismatch that
aborts the process); ``labels`` on some ranks only left them in the loss's all-reduce. So every rank checks its own
call (no communication), then one all-gather of a few ints per forward -- whatever each rank passed, a rank without
a mask says "none" -- and every rank raises the same way before the model runs.

Note
----
One row per rank: [error code, attention_mask (ndim, last dim, dtype), position_ids?, labels?, router logits?]::

    rank 0: mask (1, 40) int64, position_ids, labels   ->  [0, 2, 40, 6, 1, 1, 0]
    rank 1: no mask,            position_ids, labels   ->  [0, 0,  0, 0, 1, 1, 0]
      rows differ                                       ->  the same ValueError on both, naming attention_mask
    rank 1: labels without shift_labels                ->  [3, ...]: its own ValueError there, and
                                                            "rank(s) [1] rejected ... ['labels']" on rank 0
    every rank the same, no error                       ->  the model runs (a 2-D mask localised: padding.py)

Cost: one all-gather of 7 ints per forward (a host read; on NCCL one device sync), where before a forward without
a mask had none: a rank cannot learn what another passed without it. A world of one rank gathers nothing. A forward
on a KV cache (``generate``) is not agreed here: passes/generate.py owns it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from seqpar.comm import agree
from seqpar.passes.padding import check_attention_mask
from seqpar.passes.router import RouterLoss
from seqpar.passes.runtime import Runtime

__all__ = ["agreement_pass", "check_call"]

# agree()'s codes: 1 + the index of the argument a rejecting rank names
_NAMES = ("attention_mask", "position_ids", "labels", "past_key_values", "output_router_logits")
# a mask's dtype as an int in the row (0: none, or a dtype not listed)
_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16,
           torch.bfloat16, torch.float32, torch.float64)


def check_call(kwargs: dict[str, Any], router: RouterLoss | None = None) -> None:
    """The per-call checks of a forward without a KV cache (no communication): ``ValueError`` naming the argument
    and the fix, with its name in ``error.argument`` (one of ``_NAMES``)."""
    def refuse(argument: str, message: str) -> None:
        error = ValueError(message)
        error.argument = argument
        raise error

    if router is not None:
        try:
            router.check_call(kwargs)
        except ValueError as e:
            refuse("output_router_logits", str(e))
    if kwargs.get("labels") is not None and ("num_items_in_batch" not in kwargs or "shift_labels" not in kwargs):
        refuse("labels", "seqpar: labels without shift_labels/num_items_in_batch; build the batch with "
                         "seqpar.shard_batch(batch, mesh, layout=...) so the loss is the global-token mean")
    if kwargs.get("position_ids") is None and (kwargs.get("input_ids") is not None
                                               or kwargs.get("inputs_embeds") is not None):  # absent or None
        refuse("position_ids", "seqpar: no position_ids; the model would number the local shard 0..S/P-1. Use "
                               "seqpar.shard_batch, which adds the global positions")
    if kwargs.get("past_key_values") is not None:
        refuse("past_key_values", "seqpar: past_key_values (KV cache) is not supported on a sharded sequence")


def _mask_row(mask: Any) -> list[int]:
    """[ndim, last dim, dtype code]: [0, 0, 0] for None, [-1, 0, 0] for a mask that is not a tensor."""
    if mask is None:
        return [0, 0, 0]
    if not isinstance(mask, torch.Tensor):
        return [-1, 0, 0]
    code = _DTYPES.index(mask.dtype) + 1 if mask.dtype in _DTYPES else 0
    return [mask.ndim, int(mask.shape[-1]) if mask.ndim else 0, code]


def _mask_text(row: list[int]) -> str:
    ndim, length, code = row
    if ndim == 0:
        return "none"
    if ndim < 0:
        return "an object that is not a tensor"
    dtype = str(_DTYPES[code - 1]).removeprefix("torch.") if code else "another dtype"
    return f"a {ndim}-D {dtype} mask of length {length}"


def _ranks(rows: list[list[int]], i: int) -> list[int]:
    return [r for r, row in enumerate(rows) if row[i]]


def _disagreement(rows: list[list[int]]) -> str:
    """What the ranks' rows (``[mask ndim, length, dtype, position_ids, labels, router]``) disagree on, and the fix."""
    parts = []
    if any(row[:3] != rows[0][:3] for row in rows):
        each = ", ".join(f"rank {r}: {_mask_text(row[:3])}" for r, row in enumerate(rows))
        parts.append(f"attention_mask differs between the ranks ({each}); pass the same kind of attention_mask "
                     f"on every rank (the whole sequence's (B, S) or this rank's (B, S_local) columns, all ones, "
                     f"one dtype), or none on every rank: give the batch with its attention_mask to "
                     f"seqpar.shard_batch, which turns padding into packed documents and returns no mask")
    for i, name, fix in ((3, "position_ids", "every rank needs its global position_ids (seqpar.shard_batch adds them)"),
                         (4, "labels", "pass labels on every rank or on none (the loss is reduced over the cp "
                                       "ranks; seqpar.shard_batch shards them)"),
                         (5, "output_router_logits", "pass the same output_router_logits on every rank")):
        if any(row[i] != rows[0][i] for row in rows):
            parts.append(f"{name} given on rank(s) {_ranks(rows, i)} only; {fix}")
    return "; ".join(parts)


def agreement_pass(model: nn.Module, rt: Runtime, router: RouterLoss | None = None) -> None:
    """A forward pre-hook on ``model`` (registered before the loss pass's, after generate's): each rank's call
    checked, agreed in one all-gather, a 2-D ``attention_mask`` localised (see the module Note)."""

    def pre(module, args, kwargs):
        if rt.cache is not None:  # a cached forward (generate): passes/generate.py; the router loss refused here
            if router is not None:
                router.check_call(kwargs)
            return None
        error, mask = None, kwargs.get("attention_mask")
        local_mask = mask
        try:
            check_call(kwargs, router)
            ref = kwargs.get("input_ids")
            ref = kwargs.get("inputs_embeds") if ref is None else ref
            if ref is None and args:
                ref = args[0]
            if isinstance(mask, torch.Tensor) and mask.ndim == 2 and isinstance(ref, torch.Tensor) and ref.ndim >= 2:
                try:
                    local_mask = check_attention_mask(mask, ref.shape[0], ref.shape[1], rt.world)
                except ValueError as e:
                    e.argument = "attention_mask"
                    raise
        except ValueError as e:
            error = e
        row = [*_mask_row(mask), int(kwargs.get("position_ids") is not None), int(kwargs.get("labels") is not None),
               int(router is not None and router.enabled(kwargs))]
        if rt.world > 1:  # every rank learns what the others passed, before any other collective of the forward
            code = 1 + _NAMES.index(getattr(error, "argument", "attention_mask")) if error is not None else 1
            agree(rt.group, row, error, what="seqpar: the forward's inputs", names=_NAMES, code=code,
                  disagreement=_disagreement)
        elif error is not None:
            raise error
        if local_mask is mask:
            return None
        kwargs["attention_mask"] = local_mask
        return args, kwargs

    model.register_forward_pre_hook(pre, with_kwargs=True)
