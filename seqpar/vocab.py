"""The vocabulary every layer shares: layouts, methods, mask kinds, kernel backends, mesh dim names.

One place for the names a user passes and the code dispatches on, so a new layout or method is one
line here (plus its implementation) and every check, error message and test grid picks it up.
Pure data: imports nothing of seqpar.
"""

from __future__ import annotations

from typing import Literal, get_args

__all__ = [
    "Layout",
    "LAYOUTS",
    "DataLayout",
    "LAYOUT_CHOICES",
    "Method",
    "METHODS",
    "AUTO",
    "MethodChoice",
    "METHOD_CHOICES",
    "MaskKind",
    "MASK_KINDS",
    "Backend",
    "BACKENDS",
    "CP_DIM",
    "DP_DIM",
    "MESH_DIMS",
    "CP_RING_DIM",
    "CP_ULYSSES_DIM",
    "HYBRID_MESH_DIMS",
    "check_choice",
]

Layout = Literal["contiguous", "striped", "zigzag"]  # how the global sequence is dealt to the ranks
LAYOUTS: tuple[str, ...] = get_args(Layout)
# layouts that depend on the data: "packed" deals every document of cu_seqlens zigzag-wise (seqpar.layout)
DataLayout = Literal["packed"]
LAYOUT_CHOICES: tuple[str, ...] = (*LAYOUTS, *get_args(DataLayout))

Method = Literal["ring", "ulysses", "allgather", "hybrid"]  # the distributed algorithm (one module each in seqpar.methods)
METHODS: tuple[str, ...] = get_args(Method)
AUTO = "auto"  # method="auto": seqpar picks one of METHODS per shape and group (seqpar.plan's cost model)
MethodChoice = Literal[Method, "auto"]  # what a user may pass as method=
METHOD_CHOICES: tuple[str, ...] = (*METHODS, AUTO)

MaskKind = Literal["full", "causal", "strict"]  # the structure of one tile (seqpar.kernels.TileMask)
MASK_KINDS: tuple[str, ...] = get_args(MaskKind)

Backend = Literal["auto", "aten", "reference", "triton"]  # the single-device tile kernels
BACKENDS: tuple[str, ...] = get_args(Backend)

CP_DIM = "cp"  # the mesh dim the sequence is sharded over
DP_DIM = "dp"  # the data-parallel mesh dim
MESH_DIMS: tuple[str, str] = (DP_DIM, CP_DIM)
CP_RING_DIM = "cp_ring"  # method="hybrid": the outer sub-dim of cp (the ring, across nodes)
CP_ULYSSES_DIM = "cp_ulysses"  # method="hybrid": the inner sub-dim of cp (the all-to-all, adjacent ranks)
HYBRID_MESH_DIMS: tuple[str, str, str] = (DP_DIM, CP_RING_DIM, CP_ULYSSES_DIM)  # init_mesh(ulysses > 1); "cp" flattened


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    """``ValueError`` naming the argument and the allowed values unless ``value in choices``."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
