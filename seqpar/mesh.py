"""Meshes and groups: ``init_mesh``, and what a ``group=`` / ``mesh`` argument resolves to.

On the attention path (every call resolves its group), so it imports no launcher machinery. The
mesh dims are named by :mod:`seqpar.vocab` (``("dp", "cp")``); the sequence is sharded over "cp".
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from seqpar.comm import TransportGroup
from seqpar.vocab import CP_DIM, DP_DIM, MESH_DIMS

__all__ = [
    "init_mesh",
    "resolve_group",
    "group_rank_size",
    "check_mesh",
    "cp_mesh",
    "flat_mesh",
]


def init_mesh(cp: int, dp: int | None = None) -> DeviceMesh:
    """A 2-D DeviceMesh with dims ("dp", "cp") over the whole world; ``dp`` defaults to world // cp."""
    if not dist.is_initialized():
        raise ValueError("init_mesh: call seqpar.init_distributed() first")
    world = dist.get_world_size()
    if not isinstance(cp, int) or cp < 1:
        raise ValueError(f"cp must be a positive int, got {cp!r}")
    if world % cp:
        raise ValueError(f"cp={cp} must divide the world size {world}")
    dp = world // cp if dp is None else dp
    if dp * cp != world:
        raise ValueError(f"dp*cp must equal the world size: dp={dp}, cp={cp}, world={world}")
    device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    return init_device_mesh(device_type, (dp, cp), mesh_dim_names=MESH_DIMS)


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
        if CP_DIM in names:
            return group[CP_DIM].get_group()
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
    """-> (dp, cp). ``mesh`` must be a DeviceMesh with a "cp" dim (1-D "cp", or 2-D ("dp", "cp"))."""
    if not isinstance(mesh, DeviceMesh):
        raise TypeError(f"{what} must be a torch DeviceMesh with a {CP_DIM!r} dim (seqpar.init_mesh(cp=...)), got "
                        f"{type(mesh).__name__}")
    names = tuple(mesh.mesh_dim_names or ())
    if CP_DIM not in names:
        raise ValueError(f"{what} has dims {names or '(unnamed)'}, no {CP_DIM!r} dim to shard the sequence over; "
                         f"build it with seqpar.init_mesh(cp=..., dp=...) (dims {MESH_DIMS})")
    if mesh.ndim > 2 or (mesh.ndim == 2 and set(names) != set(MESH_DIMS)):
        raise ValueError(f"{what} must have dims ({CP_DIM!r},) or {MESH_DIMS}, got {names}")
    cp = cp_mesh(mesh).size()
    return mesh.size() // cp, cp


def cp_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The 1-D "cp" part of a mesh that :func:`check_mesh` accepted."""
    return mesh[CP_DIM] if mesh.ndim == 2 else mesh


def flat_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The dp x cp ranks as one 1-D mesh (FSDP's shard dim and the gradient all-reduce group)."""
    if mesh.ndim == 1:
        return mesh
    ranks = sorted(mesh.mesh.flatten().tolist())
    name = f"{DP_DIM}_{CP_DIM}"
    if ranks == list(range(dist.get_world_size())):
        return DeviceMesh.from_group(dist.group.WORLD, mesh.device_type, mesh_dim_names=(name,))
    return mesh._flatten(name)  # a sub-world mesh: torch's own flattening
