"""Meshes and groups: ``init_mesh``, and what a ``group=`` / ``mesh`` argument resolves to.

On the attention path (every call resolves its group), so it imports no launcher machinery. The
mesh dims are named by :mod:`seqpar.vocab` (``("dp", "cp")``); the sequence is sharded over "cp".
With ``init_mesh(cp, ulysses=U)`` (U > 1, for ``method="hybrid"``) the mesh is 3-D,
``("dp", "cp_ring", "cp_ulysses")``, with the two cp sub-dims flattened into "cp" (cp rank =
ring index * U + ulysses index), so every ``group=mesh`` path still sees the whole cp group::

    cp = 4, ulysses = 2            cp_ulysses ->  (adjacent ranks: one node)
                         cp_ring   [ cp0  cp1 ]   ring index 0
                            |      [ cp2  cp3 ]   ring index 1
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from seqpar.comm import TransportGroup
from seqpar.vocab import CP_DIM, CP_RING_DIM, CP_ULYSSES_DIM, DP_DIM, HYBRID_MESH_DIMS, MESH_DIMS

__all__ = [
    "is_hybrid_mesh",
    "init_mesh",
    "resolve_group",
    "group_rank_size",
    "check_mesh",
    "cp_mesh",
    "flat_mesh",
    "hybrid_groups",
]

_SUB_DIMS = (CP_RING_DIM, CP_ULYSSES_DIM)


def init_mesh(cp: int, dp: int | None = None, ulysses: int = 1) -> DeviceMesh:
    """A DeviceMesh over the whole world; ``dp`` defaults to world // cp. ``ulysses`` = 1: 2-D, dims
    ("dp", "cp"). ``ulysses`` = U > 1 (a divisor of cp; ``method="hybrid"``): 3-D, dims ("dp", "cp_ring",
    "cp_ulysses") of sizes (dp, cp // U, U), the two cp sub-dims flattened into "cp" (``mesh["cp"]``)."""
    if not dist.is_initialized():
        raise ValueError("init_mesh: call seqpar.init_distributed() first")
    world = dist.get_world_size()
    if not isinstance(cp, int) or cp < 1:
        raise ValueError(f"cp must be a positive int, got {cp!r}")
    if world % cp:
        raise ValueError(f"cp={cp} must divide the world size {world}")
    if not isinstance(ulysses, int) or isinstance(ulysses, bool) or ulysses < 1 or cp % ulysses:
        allowed = [d for d in range(1, cp + 1) if cp % d == 0]
        raise ValueError(f"ulysses must be a positive int dividing cp={cp} (one of {allowed}), got {ulysses!r}")
    dp = world // cp if dp is None else dp
    if dp * cp != world:
        raise ValueError(f"dp*cp must equal the world size: dp={dp}, cp={cp}, world={world}")
    device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    if ulysses == 1:
        return init_device_mesh(device_type, (dp, cp), mesh_dim_names=MESH_DIMS)
    return _hybrid_mesh(device_type, dp, cp // ulysses, ulysses)


def _hybrid_mesh(device_type: str, dp: int, ring: int, ulysses: int) -> DeviceMesh:
    """The 3-D ("dp", "cp_ring", "cp_ulysses") mesh of sizes (dp, ring, ulysses) with "cp" flattened
    (also for ulysses = 1, which :func:`init_mesh` builds 2-D: tests of the degenerate hybrid use it)."""
    mesh = init_device_mesh(device_type, (dp, ring, ulysses), mesh_dim_names=HYBRID_MESH_DIMS)
    mesh[_SUB_DIMS]._flatten(CP_DIM)  # registers mesh["cp"]: cp rank = ring index * ulysses + ulysses index
    return mesh


def is_hybrid_mesh(mesh: Any) -> bool:
    """Whether ``mesh`` is a mesh of ``init_mesh(cp, ulysses=U > 1)`` (its "cp" dim split into sub-dims)."""
    return isinstance(mesh, DeviceMesh) and _has_sub_dims(mesh)


def _has_sub_dims(mesh: DeviceMesh) -> bool:
    return set(_SUB_DIMS) <= set(mesh.mesh_dim_names or ())


def _cp_of(mesh: DeviceMesh) -> DeviceMesh:
    """The 1-D "cp" mesh of a mesh with a "cp" dim or the two cp sub-dims (flattened: cached by torch,
    no new group; slicing ``mesh["cp"]`` from the root would work too, with a deprecation warning)."""
    if _has_sub_dims(mesh):
        return mesh[_SUB_DIMS]._flatten(CP_DIM)
    return mesh[CP_DIM]


def resolve_group(group) -> dist.ProcessGroup | TransportGroup | None:
    """``group`` argument -> a ProcessGroup, or ``None`` for a single process.

    Accepts a ProcessGroup, a 1-D DeviceMesh (e.g. ``mesh["cp"]``), a DeviceMesh with a "cp" dim,
    a transport group such as ``seqpar.MPIGroup(comm)`` (passed through),
    or ``None`` (the default world when torch.distributed is initialised, else a single process).
    """
    # ProcessGroup first: torch.compile traces this function, and an isinstance check against the
    # runtime-checkable TransportGroup protocol does not trace on a ProcessGroup
    if isinstance(group, dist.ProcessGroup):
        return group
    if group is None:
        return dist.group.WORLD if dist.is_initialized() else None
    if isinstance(group, DeviceMesh):
        if group.ndim == 1:
            return group.get_group()
        names = group.mesh_dim_names or ()
        if CP_DIM in names or _has_sub_dims(group):
            return _cp_of(group).get_group()
        raise ValueError(
            f"group: a {group.ndim}-D DeviceMesh with dims {names} has no {CP_DIM!r} dim; pass mesh['<dim>'] "
            f"for the dim the sequence is sharded over"
        )
    if isinstance(group, TransportGroup):
        return group
    raise TypeError(f"group must be a ProcessGroup, a DeviceMesh, a seqpar.MPIGroup or None, got "
                    f"{type(group).__name__}")


def group_rank_size(group: dist.ProcessGroup | TransportGroup | None) -> tuple[int, int]:
    if isinstance(group, dist.ProcessGroup):  # first, as in resolve_group
        return dist.get_rank(group), dist.get_world_size(group)
    if group is None:
        return 0, 1
    return group.rank, group.size


def check_mesh(mesh: Any, what: str = "mesh") -> tuple[int, int]:
    """-> (dp, cp). ``mesh`` must be a DeviceMesh with a "cp" dim (1-D "cp", or 2-D ("dp", "cp")), or the
    3-D ("dp", "cp_ring", "cp_ulysses") of ``init_mesh(cp, ulysses=U)``."""
    if not isinstance(mesh, DeviceMesh):
        raise TypeError(f"{what} must be a torch DeviceMesh with a {CP_DIM!r} dim (seqpar.init_mesh(cp=...)), got "
                        f"{type(mesh).__name__}")
    names = tuple(mesh.mesh_dim_names or ())
    if mesh.ndim == 3 and set(names) == set(HYBRID_MESH_DIMS):
        cp = cp_mesh(mesh).size()
        return mesh.size() // cp, cp
    if CP_DIM not in names:
        raise ValueError(f"{what} has dims {names or '(unnamed)'}, no {CP_DIM!r} dim to shard the sequence over; "
                         f"build it with seqpar.init_mesh(cp=..., dp=...) (dims {MESH_DIMS})")
    if mesh.ndim > 2 or (mesh.ndim == 2 and set(names) != set(MESH_DIMS)):
        raise ValueError(f"{what} must have dims ({CP_DIM!r},), {MESH_DIMS} or {HYBRID_MESH_DIMS}, got {names}")
    cp = cp_mesh(mesh).size()
    return mesh.size() // cp, cp


def cp_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The 1-D "cp" part of a mesh that :func:`check_mesh` accepted."""
    return mesh if mesh.ndim == 1 else _cp_of(mesh)


def flat_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The dp x cp ranks as one 1-D mesh (FSDP's shard dim and the gradient all-reduce group)."""
    if mesh.ndim == 1:
        return mesh
    ranks = sorted(mesh.mesh.flatten().tolist())
    name = f"{DP_DIM}_{CP_DIM}"
    if ranks == list(range(dist.get_world_size())):
        return DeviceMesh.from_group(dist.group.WORLD, mesh.device_type, mesh_dim_names=(name,))
    return mesh._flatten(name)  # a sub-world mesh: torch's own flattening


def hybrid_groups(group) -> tuple[dist.ProcessGroup | None, dist.ProcessGroup | None]:
    """``group`` argument of ``method="hybrid"`` -> (ulysses sub-group, ring sub-group) of its cp group.

    Accepts the mesh of ``seqpar.init_mesh(cp, ulysses=U)`` (dims "cp_ring", "cp_ulysses"), or its "cp"
    part (``mesh["cp"]``); ``None`` in a single process (no torch.distributed): ``(None, None)``. Anything
    else (a ProcessGroup, a mesh without the sub-dims) is a ``ValueError`` saying how to build the mesh.
    """
    if group is None and not dist.is_initialized():
        return None, None
    mesh = group
    if isinstance(mesh, DeviceMesh) and not _has_sub_dims(mesh) and mesh.ndim == 1:
        root = mesh._get_root_mesh()  # mesh["cp"] of a hybrid mesh: its root has the sub-dims
        if root is not mesh and _has_sub_dims(root) and _cp_of(root).get_group() is mesh.get_group():
            mesh = root
    if isinstance(mesh, DeviceMesh) and _has_sub_dims(mesh):
        return mesh[CP_ULYSSES_DIM].get_group(), mesh[CP_RING_DIM].get_group()
    what = (f"a DeviceMesh with dims {tuple(group.mesh_dim_names or ())}" if isinstance(group, DeviceMesh)
            else "None (the default world)" if group is None else f"a {type(group).__name__}")
    raise ValueError(f"group: method='hybrid' needs the mesh of seqpar.init_mesh(cp=..., ulysses=U) (U > 1: dims "
                     f"{_SUB_DIMS} inside 'cp') passed as group (or its mesh['cp']), got {what}; build it with "
                     f"seqpar.init_mesh(cp=..., ulysses=U), or use method='ring' or 'ulysses' with this group")
