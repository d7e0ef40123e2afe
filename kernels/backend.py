"""The declared interface of a kernel backend, and the tile-mask description every backend takes.

A backend is data: its entry points and what it can do natively (``KernelBackend``). The dispatcher
in :mod:`seqpar.kernels` reads the capabilities to route work: a mask kind the backend lacks is
sliced into one it has, a dtype it lacks goes to the ``reference`` backend, a backend without an
in-kernel merge gets a separate merge pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from seqpar.vocab import MASK_KINDS, MaskKind, check_choice

__all__ = ["TileMask", "as_mask", "KernelBackend", "acc_dtype"]


@dataclass(frozen=True)
class TileMask:
    """What one tile masks, top-left aligned (query row i of the tile, key column j)::

        full     causal    strict
        x x x x  x . . .   . . . .      strict = causal minus the diagonal (row 0 sees nothing)
        x x x x  x x . .   x . . .
        x x x x  x x x .   x x . .
        x x x x  x x x x   x x x .

    A description, not a materialised matrix: backends turn it into block skips and in-register
    predicates. Windows, documents and soft-capping extend it as fields.
    """

    kind: MaskKind = "full"

    def __post_init__(self) -> None:
        check_choice("mask kind", self.kind, MASK_KINDS)


def as_mask(mask: TileMask | str) -> TileMask:
    """A :class:`TileMask`, or a mask kind name (``"causal"``) as shorthand for ``TileMask(kind)``."""
    if isinstance(mask, TileMask):
        return mask
    if isinstance(mask, str):
        return TileMask(mask)
    raise TypeError(f"mask must be a seqpar.kernels.TileMask or one of {MASK_KINDS}, got {type(mask).__name__}")


@dataclass(frozen=True)
class KernelBackend:
    """One backend's entry points and capabilities.

    ``forward(q, k, v, *, mask, scale) -> (out, lse)``; ``backward(dout, q, k, v, out, lse, *, mask,
    scale) -> (dq, dk, dv)``; ``forward_accumulate(q, k, v, out, lse, *, mask, scale)`` merges a tile
    into fp32 ``(out, lse)`` views in place (``None``: the dispatcher merges). ``native_masks``: the
    mask kinds the kernels take as they are; ``dtypes``: the input dtypes they compute;
    ``positive_scale_only``: the kernels are wrong for ``scale <= 0`` (such calls go to ``reference``).
    """

    name: str
    forward: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    backward: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    native_masks: frozenset[str]
    dtypes: frozenset[torch.dtype]
    forward_accumulate: Callable[..., None] | None = None
    positive_scale_only: bool = False


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of out, lse and dK/dV for inputs of ``dtype``: fp64 for fp64, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
