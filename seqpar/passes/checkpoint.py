"""Pass 4, checkpoint: every transformer block under non-reentrant ``torch.utils.checkpoint``.

The attention's ``(out, lse)`` of the first forward are kept (``Runtime.frame``), so the
recomputation replays them instead of running the method again (no K/V exchange); the backward is
the method's own. Replaces transformers' gradient checkpointing, which would re-run the ring.
"""

from __future__ import annotations

from torch import nn

from seqpar.passes.runtime import Frame, Runtime

__all__ = ["checkpoint_pass"]


def checkpoint_pass(model: nn.Module, blocks: list[nn.Module], rt: Runtime) -> None:
    from torch.utils.checkpoint import checkpoint

    if getattr(model, "is_gradient_checkpointing", False):
        model.gradient_checkpointing_disable()  # ours replaces HF's (which would re-run the ring)
    for block in blocks:
        inner = block.forward  # the bound forward; hooks stay outside the checkpoint

        def forward(*args, _inner=inner, **kwargs):
            frame = Frame()
            return checkpoint(_inner, *args, use_reentrant=False,
                              context_fn=lambda: (rt.frame(frame, True), rt.frame(frame, False)), **kwargs)

        block.forward = forward
