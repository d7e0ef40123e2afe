"""``shard`` / ``unshard`` / ``positions``: the layouts of ``seqpar.layout`` applied over a group."""

from __future__ import annotations

import torch

from seqpar import layout as _layout
from seqpar.comm import all_gather_tensor
from seqpar.mesh import group_rank_size, resolve_group

__all__ = ["shard", "unshard", "positions"]


def _check_tensor(x, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")


def shard(x: torch.Tensor, dim: int = 2, group=None, layout: str = "zigzag") -> torch.Tensor:
    """The full tensor (the same on every rank) -> this rank's shard along ``dim``.

    ``x`` (..., S, ...) -> (..., S/P, ...). Raises ``ValueError`` naming the padding needed when
    S is not a multiple of P (2P for zigzag). Differentiable (it is indexing).
    """
    _check_tensor(x)
    _layout.check_layout(layout)
    rank, world = group_rank_size(resolve_group(group))
    return _layout.shard_tensor(x, dim, rank, world, layout)


class _Unshard(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local, dim, group, layout):
        ctx.dim, ctx.group, ctx.layout = dim, group, layout
        moved = local.movedim(dim, 0)  # gather along dim 0, then move back
        parts = [p.movedim(0, dim) for p in all_gather_tensor(moved, group)]
        return _layout.unshard_tensor(parts, dim, layout)

    @staticmethod
    def backward(ctx, grad_full):
        # The output is replicated on every rank, so its gradient is too: keep this rank's part.
        rank, world = group_rank_size(ctx.group)
        return _layout.shard_tensor(grad_full, ctx.dim, rank, world, ctx.layout), None, None, None


def unshard(local: torch.Tensor, dim: int = 2, group=None, layout: str = "zigzag") -> torch.Tensor:
    """Inverse of :func:`shard`: all-gather the shards and undo the layout's permutation.

    Differentiable. The result is replicated, so the backward keeps this rank's slice of the
    incoming gradient (no communication), as for a DTensor redistributed from Shard to Replicate.
    """
    _check_tensor(local, "local")
    _layout.check_layout(layout)
    g = resolve_group(group)
    if not -local.ndim <= dim < local.ndim:
        raise ValueError(f"dim={dim} is out of range for a {local.ndim}-D tensor")
    return _Unshard.apply(local, dim % local.ndim, g, layout)


def positions(seq_len: int, group=None, layout: str = "zigzag", device=None) -> torch.Tensor:
    """LongTensor (seq_len / P,): the global positions of this rank's tokens, in local order."""
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    rank, world = group_rank_size(resolve_group(group))
    return _layout.global_indices(seq_len, rank, world, layout).to(device)
