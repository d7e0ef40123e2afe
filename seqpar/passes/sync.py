"""Pass 1, sync: parameters and buffers broadcast from the group's first rank (all ranks start equal)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["sync_params"]


def sync_params(model: nn.Module, group: dist.ProcessGroup) -> None:
    src = dist.get_global_rank(group, 0)
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.device.type != "meta":
                dist.broadcast(t.data, src=src, group=group)
