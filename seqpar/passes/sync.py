"""Pass 1, sync: parameters and buffers broadcast from the group's first rank (all ranks start equal).

One broadcast per bucket, not per tensor: the tensors of one (dtype, device) are flattened into buckets of
at most ``bucket_bytes`` (a tensor larger than that is its own bucket), each bucket broadcast once and
copied back (a model of thousands of small parameters took thousands of collectives before)::

    params/buffers (fp32)  a  b  c  d  e ...  ->  [a b c] [d e] ...  one broadcast each  ->  copied back
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["sync_params"]

_BUCKET_BYTES = 64 << 20


def _buckets(tensors: list[torch.Tensor], bucket_bytes: int) -> list[list[torch.Tensor]]:
    """``tensors`` grouped by (dtype, device), each group cut into runs of at most ``bucket_bytes``."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    out = []
    for group in groups.values():
        run, size = [], 0
        for t in group:
            n = t.numel() * t.element_size()
            if run and size + n > bucket_bytes:
                out.append(run)
                run, size = [], 0
            run.append(t)
            size += n
        if run:
            out.append(run)
    return out


def sync_params(model: nn.Module, group: dist.ProcessGroup, *, bucket_bytes: int = _BUCKET_BYTES) -> None:
    src = dist.get_global_rank(group, 0)
    tensors = [t.data for t in (*model.parameters(), *model.buffers()) if t.device.type != "meta"]
    with torch.no_grad():
        for t in [t for t in tensors if t.layout != torch.strided]:  # sparse and the like: one by one
            dist.broadcast(t, src=src, group=group)
        for run in _buckets([t for t in tensors if t.layout == torch.strided], bucket_bytes):
            if len(run) == 1 and run[0].is_contiguous():
                dist.broadcast(run[0], src=src, group=group)
                continue
            flat = torch.cat([t.reshape(-1) for t in run])
            dist.broadcast(flat, src=src, group=group)
            offset = 0
            for t in run:
                t.copy_(flat[offset:offset + t.numel()].view(t.shape))
                offset += t.numel()
