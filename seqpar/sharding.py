"""``shard`` / ``unshard`` / ``positions``: the layouts of ``seqpar.layout`` applied over a group.

Every argument is checked, naming the argument and the fix: ``dim`` is an int in ``[-ndim, ndim)``
(never taken modulo ``ndim``), the sequence is not empty and divides evenly under the layout.
``shard`` and ``positions`` do not communicate, so they raise on the ranks whose input is bad.
``unshard`` gathers: its ranks first all-gather a few ints (an error code and the local shape, dim,
dtype and layout), so input that is bad on one rank, or local shapes that differ between ranks, raise
a ``ValueError``/``TypeError`` on every rank instead of hanging or crashing the transport.
"""

from __future__ import annotations

import torch

from seqpar import layout as _layout
from seqpar.comm import agree, all_gather_tensor
from seqpar.mesh import group_rank_size, resolve_group

__all__ = ["shard", "unshard", "positions"]

# unshard's agreement: which argument a rank rejected (error code = 1 + index), and the dtype codes
_ARGS = ("local", "dim", "layout")
_DTYPES = tuple(sorted({v for v in vars(torch).values() if isinstance(v, torch.dtype)}, key=str))
_SHAPE_SLOTS = 8  # local shapes are compared exactly up to this many dims, beyond by a hash


def _tag(e: Exception, arg: str) -> Exception:
    """``e``, marked with the argument it is about (for unshard's cross-rank error report)."""
    e.seqpar_argument = arg  # type: ignore[attr-defined]
    return e


def _check_tensor(x, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")


def _packed(layout: str, cu_seqlens, seq_len: int):
    """``cu_seqlens`` checked for the ``packed`` layout (None: one document); the others ignore it."""
    if layout != "packed" or cu_seqlens is None:
        return None
    return _layout.check_offsets(cu_seqlens, seq_len)


def shard(x: torch.Tensor, dim: int = 2, group=None, layout: str = "zigzag", cu_seqlens=None) -> torch.Tensor:
    """The full tensor (the same on every rank) -> this rank's shard along ``dim``.

    ``x`` (..., S, ...) -> (..., S/P, ...). Raises ``ValueError`` naming the padding needed when
    S is not a multiple of P (2P for zigzag), ``ValueError`` when ``dim`` is out of range and
    ``TypeError`` when it is not an int. Differentiable (it is indexing). No communication; a tensor
    on the "meta" device gives the meta shard (shapes only). ``layout="packed"`` deals every document
    of ``cu_seqlens`` (global offsets, as :func:`seqpar.attention` takes them) zigzag-wise over the ranks.
    """
    _check_tensor(x)
    _layout.check_layout(layout)
    d = _layout.check_dim(dim, x.ndim)
    rank, world = group_rank_size(resolve_group(group))
    return _layout.shard_tensor(x, d, rank, world, layout, _packed(layout, cu_seqlens, x.shape[d]))


class _Unshard(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local, dim, group, layout, cu):
        ctx.dim, ctx.group, ctx.layout, ctx.cu = dim, group, layout, cu
        moved = local.movedim(dim, 0).contiguous()  # gather along dim 0, then move back
        # as bytes: every transport moves uint8 (gloo has no int16 / uint16 / float8 ...); bit-exact
        raw = moved.reshape(-1).view(torch.uint8)
        parts = [p.view(local.dtype).reshape(moved.shape).movedim(0, dim) for p in all_gather_tensor(raw, group)]
        return _layout.unshard_tensor(parts, dim, layout, cu)

    @staticmethod
    def backward(ctx, grad_full):
        # The output is replicated on every rank, so its gradient is too: keep this rank's part.
        rank, world = group_rank_size(ctx.group)
        return _layout.shard_tensor(grad_full, ctx.dim, rank, world, ctx.layout, ctx.cu), None, None, None, None


def _check_unshard(local, dim, layout: str, world: int) -> int:
    """unshard's local checks -> the non-negative dim; errors are tagged with their argument."""
    try:
        _check_tensor(local, "local")
    except TypeError as e:
        raise _tag(e, "local")
    try:
        _layout.check_layout(layout)
    except ValueError as e:
        raise _tag(e, "layout")
    try:
        d = _layout.check_dim(dim, local.ndim, tensor="local")
    except (TypeError, ValueError) as e:
        raise _tag(e, "local" if local.ndim == 0 else "dim")
    if local.device.type == "meta":
        raise _tag(ValueError(
            "local is on the meta device (a shape without data): unshard gathers the shards' data; "
            "materialise it on a real device first"), "local")
    n = local.shape[d]
    if n < 1:
        raise _tag(ValueError(
            f"local.shape[{d}]=0: the shard is empty along dim={d}; unshard a tensor sharded with seqpar.shard "
            f"(at least one token per rank)"), "local")
    if layout == "zigzag" and n % 2:
        raise _tag(ValueError(
            f"local.shape[{d}]={n} is odd, but layout='zigzag' shards hold two halves of equal length (the "
            f"global length a multiple of 2P={2 * world}): shard with seqpar.shard(..., layout='zigzag'), "
            f"or pass the layout the tensor was sharded with"), "local")
    return d


def _unshard_signature(local: torch.Tensor, d: int, layout: str) -> list[int]:
    shape = [int(s) for s in local.shape]
    head = (shape + [-1] * _SHAPE_SLOTS)[:_SHAPE_SLOTS]
    return [local.ndim, d, _layout.LAYOUT_CHOICES.index(layout), _DTYPES.index(local.dtype), *head,
            hash(tuple(shape[_SHAPE_SLOTS:]))]


def _agree_unshard(group, signature: list[int] | None, error: Exception | None) -> None:
    """Every rank learns whether any rank rejected its input, or whether the ranks' shards differ."""
    code = 0 if error is None else 1 + _ARGS.index(getattr(error, "seqpar_argument", "local"))

    def disagreement(rows):
        seen = {r: f"ndim={row[0]} dim={row[1]} layout={_layout.LAYOUT_CHOICES[row[2]]!r} dtype={_DTYPES[row[3]]} "
                   f"shape={tuple(row[4:4 + min(row[0], _SHAPE_SLOTS)])}" for r, row in enumerate(rows)}
        return (f"ranks disagree on the local shard (local, dim, layout): {seen}. Every rank must pass its shard "
                f"of one tensor (seqpar.shard with the same dim and layout)")

    agree(group, signature or [0] * (5 + _SHAPE_SLOTS), error, what="seqpar.unshard", disagreement=disagreement,
          code=code, names=_ARGS)


def unshard(local: torch.Tensor, dim: int = 2, group=None, layout: str = "zigzag", cu_seqlens=None) -> torch.Tensor:
    """Inverse of :func:`shard`: all-gather the shards and undo the layout's permutation.

    Differentiable. The result is replicated, so the backward keeps this rank's slice of the
    incoming gradient (no communication), as for a DTensor redistributed from Shard to Replicate.
    Any dtype (moved as bytes). Bad input on any rank, or shards whose shape, dtype, dim or layout
    differ between ranks, raise on every rank (one small all-gather of ints first).
    """
    g = resolve_group(group)
    _, world = group_rank_size(g)
    error, d, sig, cu = None, 0, None, None
    try:
        d = _check_unshard(local, dim, layout, world)
        sig = _unshard_signature(local, d, layout)
        try:
            cu = _packed(layout, cu_seqlens, local.shape[d] * world)
        except (TypeError, ValueError) as e:
            raise _tag(e, "layout")
    except (TypeError, ValueError) as e:
        if world == 1:
            raise
        error = e
    if world > 1:
        _agree_unshard(g, sig, error)
    return _Unshard.apply(local, d, g, layout, cu)


def positions(seq_len: int, group=None, layout: str = "zigzag", device=None, cu_seqlens=None) -> torch.Tensor:
    """LongTensor (seq_len / P,): the global positions of this rank's tokens, in local order.

    ``device`` as for ``torch.arange`` (``"meta"`` gives the shape only). No communication.
    """
    n = _layout.check_seq_len(seq_len)
    _layout.check_layout(layout)
    if device is not None:
        if isinstance(device, bool) or not isinstance(device, (str, int, torch.device)):
            raise TypeError(f"device must be a torch.device, a str such as 'cpu' or 'cuda:0', or None, got "
                            f"{type(device).__name__} {device!r}")
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError, ValueError) as e:
            raise ValueError(f"device={device!r} is not a torch device (e.g. 'cpu', 'cuda:0', torch.device(...)): "
                             f"{e}") from None
    rank, world = group_rank_size(resolve_group(group))
    idx = _layout.global_indices(n, rank, world, layout, _packed(layout, cu_seqlens, n))
    if device is None:
        return idx
    try:
        return idx.to(device)
    except (RuntimeError, AssertionError) as e:  # e.g. 'cuda' in a build or on a machine without CUDA
        raise ValueError(f"device={str(device)!r} is not usable here: {e}") from None
