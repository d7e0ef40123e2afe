"""Pass 5, compile (``compile=True``): each transformer block's ``forward`` under ``torch.compile``.

After activation checkpointing and before data parallelism, as torchtitan does: the checkpoint
(selective, saving the attention op's outputs; see :mod:`seqpar.passes.checkpoint`) is inside the
compiled region, the module hooks (FSDP2's, the plain-model overrides) outside it, so FSDP2's
collectives stay eager and overlap as usual. seqpar's attention compiles to its registered ops
(:mod:`seqpar.methods.ops`) with no graph break.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["compile_pass"]


def compile_pass(blocks: list[nn.Module], backend: str = "inductor") -> None:
    for block in blocks:
        block.forward = torch.compile(block.forward, backend=backend)  # the bound forward; hooks stay outside
