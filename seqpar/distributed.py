"""Process-group setup: ``init_distributed`` from launcher environments, ``init_mesh``, group lookup.

Nothing here is stored in module state: the process group lives in torch.distributed, and meshes
and groups are returned to the caller and passed explicitly afterwards.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

__all__ = ["init_distributed", "init_mesh", "resolve_group", "group_rank_size", "LaunchEnv", "discover_env"]


class LaunchEnv:
    """Rank, world size, local rank and rendezvous address as a launcher set them."""

    def __init__(self, rank: int, world_size: int, local_rank: int, master_addr: str | None,
                 master_port: int | None, source: str):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.master_addr, self.master_port, self.source = master_addr, master_port, source

    def __repr__(self) -> str:
        return (f"LaunchEnv(source={self.source!r}, rank={self.rank}, world_size={self.world_size}, "
                f"local_rank={self.local_rank}, master={self.master_addr}:{self.master_port})")


def discover_env(environ: dict[str, str] | None = None) -> LaunchEnv | None:
    """The launcher environment (torchrun variables), or ``None`` when there is none."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", "0")),
            master_addr=env.get("MASTER_ADDR"),
            master_port=int(env["MASTER_PORT"]) if "MASTER_PORT" in env else None,
            source="torchrun",
        )
    return None


def init_distributed(backend: str | None = None, *, timeout: float | datetime.timedelta | None = None) -> None:
    """Initialise torch.distributed from the launcher's environment; idempotent.

    ``backend=None`` picks ``nccl`` when CUDA is available, else ``gloo``. Without any launcher
    environment a 1-rank world is created in-process, so single-process scripts run unchanged.
    On CUDA the device of this process is set from the local rank.
    """
    if dist.is_initialized():
        return
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend must be a str such as 'gloo' or 'nccl', got {type(backend).__name__}")
    if isinstance(timeout, (int, float)):
        timeout = datetime.timedelta(seconds=timeout)
    env = discover_env()
    use_cuda = torch.cuda.is_available() and backend in (None, "nccl")
    backend = backend or ("nccl" if use_cuda else "gloo")
    kwargs = {} if timeout is None else {"timeout": timeout}
    if env is None:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, **kwargs)
        return
    if use_cuda:
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    if env.master_addr is None or env.master_port is None:
        raise ValueError(f"{env!r}: MASTER_ADDR and MASTER_PORT must be set for rendezvous")
    os.environ.setdefault("MASTER_ADDR", env.master_addr)
    os.environ.setdefault("MASTER_PORT", str(env.master_port))
    dist.init_process_group(backend, init_method="env://", rank=env.rank, world_size=env.world_size, **kwargs)


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
    return init_device_mesh(device_type, (dp, cp), mesh_dim_names=("dp", "cp"))


def resolve_group(group) -> dist.ProcessGroup | None:
    """``group`` argument -> a ProcessGroup, or ``None`` for a single process.

    Accepts a ProcessGroup, a 1-D DeviceMesh (e.g. ``mesh["cp"]``), a DeviceMesh with a "cp" dim,
    or ``None`` (the default world when torch.distributed is initialised, else a single process).
    """
    if group is None:
        return dist.group.WORLD if dist.is_initialized() else None
    if isinstance(group, DeviceMesh):
        if group.ndim == 1:
            return group.get_group()
        names = group.mesh_dim_names or ()
        if "cp" in names:
            return group["cp"].get_group()
        raise ValueError(
            f"group: a {group.ndim}-D DeviceMesh with dims {names} has no 'cp' dim; pass mesh['<dim>'] "
            f"for the dim the sequence is sharded over"
        )
    if isinstance(group, dist.ProcessGroup):
        return group
    raise TypeError(f"group must be a ProcessGroup, a DeviceMesh or None, got {type(group).__name__}")


def group_rank_size(group: dist.ProcessGroup | None) -> tuple[int, int]:
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)
