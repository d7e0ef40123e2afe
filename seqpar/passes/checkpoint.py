"""Pass 4, checkpoint: every transformer block under non-reentrant ``torch.utils.checkpoint``.

The attention's ``(out, lse)`` of the first forward are kept, so the recomputation does not run the
method's forward communication again (no K/V exchange); the backward is the method's own. Replaces
transformers' gradient checkpointing, which would re-run the ring. Two mechanisms, one rule:

- eager: ``Runtime.frame`` keeps the ``(out, lse)`` of each attention call in a host-side frame and
  the recomputation replays them (``seqpar.api.attend(kept=...)``);
- ``compile=True``: selective activation checkpointing whose policy saves the outputs of the
  ``seqpar::attention_fwd`` op (and recomputes the rest), which dynamo traces inside the compiled
  block, as torchtitan checkpoints its SDPA calls.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from seqpar.passes.runtime import Frame, Runtime

__all__ = ["checkpoint_pass"]


def _save_attention(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    if op is torch.ops.seqpar.attention_fwd.default:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def checkpoint_pass(model: nn.Module, blocks: list[nn.Module], rt: Runtime, *, compiled: bool = False) -> None:
    from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

    if getattr(model, "is_gradient_checkpointing", False):
        model.gradient_checkpointing_disable()  # ours replaces HF's (which would re-run the ring)
    for block in blocks:
        inner = block.forward  # the bound forward; hooks stay outside the checkpoint

        if compiled:
            context_fn = functools.partial(create_selective_checkpoint_contexts, _save_attention)

            def forward(*args, _inner=inner, _ctx=context_fn, **kwargs):
                return checkpoint(_inner, *args, use_reentrant=False, context_fn=_ctx, **kwargs)
        else:
            def forward(*args, _inner=inner, **kwargs):
                frame = Frame()
                return checkpoint(_inner, *args, use_reentrant=False,
                                  context_fn=lambda: (rt.frame(frame, True), rt.frame(frame, False)), **kwargs)

        block.forward = forward
