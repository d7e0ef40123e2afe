"""The gather path: a sequence mixer run on the whole sequence, gathered from the ranks' shards.

Any token mixer (a convolution, a recurrence, a hand-written linear attention) is exact on the whole
sequence in global order. :func:`gather_sequence` all-gathers a local ``(B, S_local, ...)`` tensor
into the global ``(B, S, ...)`` one (the layout's permutation undone, packed documents included), the
unmodified module runs on it on every rank, and :func:`keep_local` keeps this rank's tokens of its
output. The cost: the layer's activations are O(S), not O(S/P), and its compute is replicated P times.

Note
----
P = 2, zigzag, 8 tokens (rank 0 holds 0 1 6 7, rank 1 holds 2 3 4 5)::

    forward    x_local (B, 4, ...)  --all-gather, un-permute-->  x (B, 8, ...) in global order, every rank
               y = mixer(x)                                      (B, 8, ...) on every rank
               y_local = y[:, (0 1 6 7)] on rank 0, y[:, (2 3 4 5)] on rank 1     (keep: no communication)
    backward   keep:   dy (B, 8, ...) = dy_local scattered into zeros at my positions
               mixer:  dx_r (B, 8, ...) = what my outputs owe every input token, on each rank r
               gather: dx_local = sum over r of dx_r[:, my positions]        (one reduce-scatter)

Every rank's loss reads only its own outputs, so the gradients of the P copies of the module sum to
the single-process gradient: the reduce-scatter sums the inputs' parts, the data-parallel pass the
parameters'.
"""

from __future__ import annotations

import functools

import torch

from seqpar import layout as _layout
from seqpar.comm import all_gather_tensor, reduce_scatter_tensor
from seqpar.mesh import group_rank_size

__all__ = ["gather_sequence", "keep_local", "global_order"]


@functools.lru_cache(maxsize=64)
def global_order(seq_len: int, world: int, layout: str, cu: tuple[int, ...] | None = None) -> torch.Tensor:
    """LongTensor (S,): the global position of each token of the ranks' shards concatenated in rank order
    (rank 0's S/P tokens, then rank 1's, ...); ``cu``: the documents of the ``packed`` layout."""
    return torch.cat([_layout.global_indices(seq_len, r, world, layout, cu) for r in range(world)])


@functools.lru_cache(maxsize=64)
def _inverse(seq_len: int, world: int, layout: str, cu: tuple[int, ...] | None) -> torch.Tensor:
    return torch.argsort(global_order(seq_len, world, layout, cu))


def _on(index: torch.Tensor, device: torch.device) -> torch.Tensor:
    return index if index.device == device else index.to(device)


class _Gather(torch.autograd.Function):
    """Forward: all-gather along dim 1 into global order. Backward: reduce-scatter (sum over ranks of
    the gradient at each rank's own tokens)."""

    @staticmethod
    def forward(ctx, x, group, layout, cu):
        world = group_rank_size(group)[1]
        S = x.shape[1] * world
        ctx.group, ctx.order = group, (S, world, layout, cu)
        moved = x.movedim(1, 0).contiguous()  # (S_local, B, ...): the gather runs along dim 0
        # as bytes: every transport moves uint8 (gloo has no bool / float8 ...); bit-exact
        parts = all_gather_tensor(moved.reshape(-1).view(torch.uint8), group)
        stacked = torch.cat([p.view(x.dtype).reshape(moved.shape) for p in parts])  # (S, B, ...) rank order
        return stacked.index_select(0, _on(_inverse(*ctx.order), x.device)).movedim(0, 1)

    @staticmethod
    def backward(ctx, grad):  # grad (B, S, ...) -> (B, S_local, ...)
        S, world, _, _ = ctx.order
        by_rank = grad.index_select(1, _on(global_order(*ctx.order), grad.device))  # (B, S, ...) rank order
        by_rank = by_rank.unflatten(1, (world, S // world)).movedim(1, 0)  # (P, B, S_local, ...)
        return reduce_scatter_tensor(by_rank, ctx.group), None, None, None


def _cu(cu_seqlens, seq_len: int, layout: str) -> tuple[int, ...] | None:
    if layout != "packed" or cu_seqlens is None:
        return None
    return _layout.check_offsets(cu_seqlens, seq_len, name="cu_seqlens")


def gather_sequence(x: torch.Tensor, group, layout: str, cu_seqlens=None) -> torch.Tensor:
    """``x`` (B, S_local, ...) on every rank of ``group`` -> (B, S, ...) in global token order (the same on
    every rank). Differentiable: the gradient of a rank's tokens is the sum over ranks of their gradients
    at them (a reduce-scatter). ``cu_seqlens``: global document offsets, read by the ``packed`` layout."""
    if x.ndim < 2:
        raise ValueError(f"gather_sequence: x must be (B, S_local, ...), got shape {tuple(x.shape)}")
    cu = _cu(cu_seqlens, x.shape[1] * group_rank_size(group)[1], layout)
    return _Gather.apply(x, group, layout, cu)


def keep_local(y: torch.Tensor, group, layout: str, cu_seqlens=None) -> torch.Tensor:
    """``y`` (B, S, ...) in global order -> this rank's tokens (B, S_local, ...), in local order. No
    communication; the backward scatters the gradient into zeros at this rank's positions."""
    rank, world = group_rank_size(group)
    S = y.shape[1]
    idx = _layout.global_indices(S, rank, world, layout, _cu(cu_seqlens, S, layout))
    return y.index_select(1, _on(idx, y.device))
