"""Launcher environments and process-group start-up: ``init_distributed`` from torchrun, SLURM or mpirun.

Start-up only: the attention path never imports this module (it holds the subprocess and socket
machinery of the SLURM node-list lookup and the MPI rendezvous). Meshes and group lookup live in
:mod:`seqpar.mesh`. Nothing is stored in module state: the process group lives in torch.distributed.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Mapping
from typing import Literal

import torch
import torch.distributed as dist

__all__ = [
    "init_distributed",
    "LaunchEnv",
    "LaunchError",
    "LaunchSource",
    "discover_env",
    "expand_nodelist",
    "first_host",
]


LaunchSource = Literal["torchrun", "slurm", "mpi"]

# Default rendezvous port for SLURM jobs: MASTER_PORT, else this base + SLURM_JOB_ID % span (below
# Linux's ephemeral range 32768-60999, so it does not collide with outgoing connections).
_SLURM_PORT_BASE, _SLURM_PORT_SPAN = 15000, 15000


class LaunchError(ValueError):
    """The launcher environment is incomplete or inconsistent (raised before any rendezvous)."""


@dataclasses.dataclass(frozen=True)
class LaunchEnv:
    """Rank, world size, local rank and rendezvous address as a launcher set them.

    ``master_addr``/``master_port`` are ``None`` where the launcher does not provide them (MPI
    without MASTER_ADDR/MASTER_PORT): ``init_distributed`` then agrees on them through mpi4py.
    """

    rank: int
    world_size: int
    local_rank: int
    master_addr: str | None
    master_port: int | None
    source: LaunchSource


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise LaunchError(f"{name}={env[name]!r} is not an integer") from None


def _check(e: LaunchEnv, names: str) -> LaunchEnv:
    if e.world_size < 1 or not 0 <= e.rank < e.world_size or e.local_rank < 0:
        raise LaunchError(f"{names}: inconsistent rank {e.rank} / world size {e.world_size} / local rank "
                          f"{e.local_rank} ({e.source})")
    return e


def _master(env: Mapping[str, str]) -> tuple[str | None, int | None]:
    port = _int(env, "MASTER_PORT") if env.get("MASTER_PORT") else None
    return env.get("MASTER_ADDR") or None, port


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list -> host names, in order, without calling ``scontrol``.

    ``"node[01-04,07],gpu-a[1-2]-ib,login"`` -> node01 .. node04, node07, gpu-a1-ib, gpu-a2-ib, login.
    Ranges keep their zero padding; several bracket groups in one name multiply out (left to right).
    """
    hosts: list[str] = []
    for item in _split_top(nodelist.strip(), ","):
        if item:
            hosts.extend(_expand_one(item))
    return hosts


def _split_top(s: str, sep: str) -> list[str]:
    """Split on ``sep`` outside brackets."""
    parts, depth, cur = [], 0, []
    for ch in s:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise LaunchError(f"unbalanced ']' in SLURM node list {s!r}")
        if ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth:
        raise LaunchError(f"unbalanced '[' in SLURM node list {s!r}")
    parts.append("".join(cur))
    return parts


def _expand_one(name: str) -> list[str]:
    m = re.search(r"\[([^\[\]]*)\]", name)
    if m is None:
        return [name]
    head, tail = name[: m.start()], name[m.end():]
    values: list[str] = []
    for part in m.group(1).split(","):
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise LaunchError(f"bad range {part!r} in SLURM node list entry {name!r}")
        if not sep:
            values.append(lo)
            continue
        if int(hi) < int(lo):
            raise LaunchError(f"descending range {part!r} in SLURM node list entry {name!r}")
        width = len(lo) if lo.startswith("0") else 0
        values.extend(str(i).zfill(width) for i in range(int(lo), int(hi) + 1))
    return [h for v in values for h in _expand_one(head + v + tail)]


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``scontrol show hostnames`` where it is installed, else
    :func:`expand_nodelist` (the same answer for every list SLURM writes)."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                                 timeout=10, check=True).stdout.split()
            if out:
                return out[0]
        except (subprocess.SubprocessError, OSError):
            pass
    hosts = expand_nodelist(nodelist)
    if not hosts:
        raise LaunchError(f"SLURM_JOB_NODELIST={nodelist!r} names no host")
    return hosts[0]


def _torchrun(env: Mapping[str, str]) -> LaunchEnv | None:
    has_rank, has_world = "RANK" in env, "WORLD_SIZE" in env
    if not (has_rank or has_world):
        return None
    if not (has_rank and has_world):
        missing = "RANK" if has_world else "WORLD_SIZE"
        raise LaunchError(f"torchrun-style environment without {missing}: set RANK, WORLD_SIZE, MASTER_ADDR and "
                          f"MASTER_PORT together (or start the job with torchrun)")
    addr, port = _master(env)
    local = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0
    return _check(LaunchEnv(_int(env, "RANK"), _int(env, "WORLD_SIZE"), local, addr, port, "torchrun"),
                  "RANK/WORLD_SIZE")


def _slurm(env: Mapping[str, str]) -> LaunchEnv | None:
    if "SLURM_PROCID" not in env or "SLURM_NTASKS" not in env:
        return None
    if "OMPI_COMM_WORLD_SIZE" in env:
        return None  # mpirun inside an allocation: its ranks inherit the batch step's SLURM_PROCID=0
    world = _int(env, "SLURM_NTASKS")
    if "SLURM_STEP_ID" not in env and "SLURM_STEPID" not in env:
        if world > 1:  # the batch script itself: one process, although the job has several tasks
            raise LaunchError(
                f"SLURM batch step of a job with SLURM_NTASKS={world}: this process is not one of its tasks. "
                f"Start the ranks with `srun python ...` (one task per rank) or `srun torchrun ...`")
        return None
    addr, port = _master(env)
    if addr is None:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if not nodelist:
            raise LaunchError("SLURM environment without SLURM_JOB_NODELIST: set MASTER_ADDR")
        addr = first_host(nodelist)
    if port is None:
        if "SLURM_JOB_ID" not in env:
            raise LaunchError("SLURM environment without SLURM_JOB_ID: set MASTER_PORT")
        port = _SLURM_PORT_BASE + _int(env, "SLURM_JOB_ID") % _SLURM_PORT_SPAN
    local = _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
    return _check(LaunchEnv(_int(env, "SLURM_PROCID"), world, local, addr, port, "slurm"),
                  "SLURM_PROCID/SLURM_NTASKS")


def _mpi(env: Mapping[str, str]) -> LaunchEnv | None:
    if "OMPI_COMM_WORLD_SIZE" in env or "OMPI_COMM_WORLD_RANK" in env:
        names = ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK")
    elif "PMI_SIZE" in env or "PMI_RANK" in env:
        names = ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID")  # MPICH hydra / Intel MPI
    else:
        return None
    rank_var, size_var, local_var = names
    for n in (rank_var, size_var):
        if n not in env:
            raise LaunchError(f"MPI launcher environment without {n}")
    local = _int(env, local_var) if local_var in env else (_int(env, "PMI_LOCAL_RANK") if "PMI_LOCAL_RANK" in env
                                                           else 0)
    addr, port = _master(env)
    return _check(LaunchEnv(_int(env, rank_var), _int(env, size_var), local, addr, port, "mpi"),
                  f"{rank_var}/{size_var}")


def discover_env(environ: Mapping[str, str] | None = None) -> LaunchEnv | None:
    """The launcher's environment, or ``None`` when no launcher started this process.

    Precedence: torchrun (``RANK``/``WORLD_SIZE``, also set by ``srun torchrun``), then SLURM
    (``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID`` of an ``srun`` step; address = first host of
    the node list, port = ``MASTER_PORT`` or derived from ``SLURM_JOB_ID``), then MPI (OpenMPI
    ``OMPI_COMM_WORLD_*``; MPICH/PMI ``PMI_RANK``/``PMI_SIZE``). ``MASTER_ADDR``/``MASTER_PORT`` override
    the derived address everywhere. Two refinements: under ``mpirun`` inside a SLURM allocation the
    MPI variables win (the inherited ``SLURM_PROCID`` is the batch step's), and the batch step of a
    multi-task job raises :class:`LaunchError` (it is not a rank). Incomplete variables raise too.
    """
    env = os.environ if environ is None else environ
    for probe in (_torchrun, _slurm, _mpi):
        found = probe(env)
        if found is not None:
            return found
    return None


def _mpi_rendezvous(env: LaunchEnv, timeout: datetime.timedelta | None) -> dist.Store:
    """MPI ranks without MASTER_ADDR/PORT: rank 0 opens a TCPStore on a free port; address and port
    reach the others through an mpi4py broadcast (loopback when every rank is on rank 0's host)."""
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise LaunchError("started by an MPI launcher without MASTER_ADDR/MASTER_PORT: install mpi4py "
                          "(pip install mpi4py) so the ranks can agree on them, or export both") from e
    comm = MPI.COMM_WORLD
    if (comm.Get_rank(), comm.Get_size()) != (env.rank, env.world_size):
        raise LaunchError(f"mpi4py's COMM_WORLD is rank {comm.Get_rank()} of {comm.Get_size()}, the environment "
                          f"says {env.rank} of {env.world_size}")
    hosts = comm.allgather(socket.gethostname())
    addr = env.master_addr or ("127.0.0.1" if len(set(hosts)) == 1 else hosts[0])
    kwargs = {} if timeout is None else {"timeout": timeout}
    store, port = None, None
    if env.rank == 0:  # port 0: the OS picks a free one, no race with other jobs
        store = dist.TCPStore(addr, env.master_port or 0, env.world_size, is_master=True, wait_for_workers=False,
                              **kwargs)
        port = store.port
    port = comm.bcast(port, root=0)
    if store is None:
        store = dist.TCPStore(addr, port, env.world_size, is_master=False, **kwargs)
    return store


def init_distributed(
    backend: str | None = None,
    *,
    timeout: float | datetime.timedelta | None = None,
    environ: Mapping[str, str] | None = None,
) -> LaunchEnv | None:
    """Initialise torch.distributed from the launcher's environment; idempotent.

    Reads torchrun, SLURM (srun) or MPI (mpirun) variables (see :func:`discover_env`).
    ``backend=None`` picks ``nccl`` when CUDA is available, else ``gloo``; an explicit backend is
    used as given. ``timeout`` (seconds or a timedelta) bounds the rendezvous and every collective.
    On CUDA (backend nccl) the device is set from the local rank. Without any launcher
    environment a 1-rank world is created in-process, so single-process scripts run unchanged;
    a partial or inconsistent environment raises :class:`LaunchError`. Returns what it found
    (``None`` for the 1-rank world or when already initialised).
    """
    if dist.is_initialized():
        return None
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend must be a str such as 'gloo' or 'nccl', got {type(backend).__name__}")
    if isinstance(timeout, (int, float)):
        timeout = datetime.timedelta(seconds=timeout)
    if timeout is not None and not isinstance(timeout, datetime.timedelta):
        raise TypeError(f"timeout must be seconds or a datetime.timedelta, got {type(timeout).__name__}")
    env = discover_env(environ)
    use_cuda = torch.cuda.is_available() and backend in (None, "nccl")
    backend = backend or ("nccl" if use_cuda else "gloo")
    kwargs = {} if timeout is None else {"timeout": timeout}
    if env is None or env.world_size == 1:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, **kwargs)
        return env
    if use_cuda:
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    if env.source == "mpi" and (env.master_addr is None or env.master_port is None):
        store = _mpi_rendezvous(env, timeout)
        dist.init_process_group(backend, store=store, rank=env.rank, world_size=env.world_size, **kwargs)
        return env
    if env.master_addr is None or env.master_port is None:
        raise LaunchError(f"{env!r}: MASTER_ADDR and MASTER_PORT must be set for rendezvous")
    if env.source == "torchrun" and environ is None:
        # env:// so that torchrun's agent store is reused (TORCHELASTIC_USE_AGENT_STORE)
        dist.init_process_group(backend, init_method="env://", rank=env.rank, world_size=env.world_size, **kwargs)
        return env
    host = f"[{env.master_addr}]" if ":" in env.master_addr else env.master_addr
    dist.init_process_group(backend, init_method=f"tcp://{host}:{env.master_port}", rank=env.rank,
                            world_size=env.world_size, **kwargs)
    return env
