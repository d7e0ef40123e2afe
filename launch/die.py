"""Rank-death payload: one rank SIGKILLs itself in the middle of a ring; what do the launcher and
the other ranks do? Start it under any launcher (tests/test_rank_death.py does, for each):

    torchrun --standalone --nproc-per-node 2 launch/die.py --stamp /tmp/die.jsonl
    mpirun -n 2 --oversubscribe python launch/die.py --stamp /tmp/die.jsonl [--transport mpi]
    srun -n 2 --kill-on-bad-exit=1 python launch/die.py --stamp /tmp/die.jsonl

Every rank initialises with ``seqpar.init_distributed(timeout=--timeout)`` and runs causal zigzag
ring attention, forward + backward, ``--iters`` times (1 x --heads x --seq x --dim, sharded over the
world), over torch.distributed (gloo) or, with ``--transport mpi`` under mpirun, seqpar.MPIGroup().
In call ``--at-call`` (numbered from 0, as seqpar's errors number calls: "call #2"), rank ``--victim``
kills its own process (SIGKILL: no exception, no exit handler; the kernel closes its sockets) from
the ring's per-step ``record`` hook, right after the kernels of ring step ``--step`` (from 0) of the
``--phase`` pass, i.e. while blocks are in flight: the dK/dV buffer of the step before (backward)
and, for P > 2, the next K/V block.

``--stamp FILE`` collects one JSON line per event, appended by every rank (O_APPEND, one write):

    {"event": "start", "rank": r, "pid": p, "start_ticks": t, "time": ...}   at start, before rendezvous
    {"event": "kill", "rank": victim, "call": c, "phase": ..., "step": s, "time": ...}   just before SIGKILL
    {"event": "error", "rank": r, "type": ..., "message": ..., "cause": ..., "time": ...}  a survivor's exception

``start_ticks`` is field 22 of /proc/<pid>/stat (start time since boot), so a checker can tell the
rank from a later process that reuses its PID. A survivor that sees an exception also prints it
(``die.py rank r: <type>: <message>``) and re-raises, so its exit status is the interpreter's for an
uncaught exception (1). A survivor that the launcher terminates leaves no "error" line; with
``faulthandler`` registered for SIGTERM it dumps where it was blocked to stderr, then dies of it.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import signal
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import seqpar  # noqa: E402
from seqpar.api import AttentionCall, attend  # noqa: E402
from seqpar.launcher import discover_env  # noqa: E402
from seqpar.methods import StepRecord  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stamp", required=True, help="JSON-lines event file, appended by every rank")
    p.add_argument("--timeout", type=float, default=20.0, help="init_distributed timeout (s): rendezvous "
                   "and every collective / ring wait")
    p.add_argument("--victim", type=int, default=1, help="the rank that dies (-1: none)")
    p.add_argument("--at-call", type=int, default=2, help="the call in which the victim dies, numbered from 0 "
                   "like seqpar's CommError ('call #2')")
    p.add_argument("--phase", choices=("forward", "backward"), default="backward")
    p.add_argument("--step", type=int, default=1, help="ring step after whose kernels the victim dies")
    p.add_argument("--transport", choices=("gloo", "mpi"), default="gloo", help="gloo: the torch.distributed "
                   "group; mpi: seqpar.MPIGroup() (mpirun only)")
    p.add_argument("--iters", type=int, default=200, help="calls (forward + backward) to run")
    p.add_argument("--seq", type=int, default=4096, help="global sequence length")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dim", type=int, default=64)
    return p.parse_args(argv)


def append(path: str, **event) -> None:
    line = (json.dumps({**event, "time": time.time()}) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)  # one write of < PIPE_BUF bytes with O_APPEND: lines do not interleave
    finally:
        os.close(fd)


def start_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[19])  # field 22 (starttime), after "pid (comm)"


def main(argv=None) -> int:
    a = parse_args(argv)
    found = discover_env()
    rank = found.rank if found is not None else 0
    append(a.stamp, event="start", rank=rank, pid=os.getpid(), start_ticks=start_ticks(os.getpid()))
    faulthandler.register(signal.SIGTERM, all_threads=False, chain=True)  # C-level: works while blocked in gloo

    seqpar.init_distributed(timeout=a.timeout)
    rank, world = dist.get_rank(), dist.get_world_size()
    if a.seq % (2 * world):
        raise SystemExit(f"--seq {a.seq} must be a multiple of 2 x world ({2 * world}) for zigzag")
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(1, a.heads, a.seq, a.dim, generator=g) for _ in range(4))
    group = seqpar.MPIGroup(timeout=a.timeout) if a.transport == "mpi" else None  # None: the default group
    shard = lambda t: seqpar.shard(t, dim=2, group=group, layout="zigzag")  # noqa: E731
    q, k, v, do = (shard(t) for t in (q, k, v, do))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    call_opts = AttentionCall(group=group, is_causal=True, layout="zigzag")
    victim = rank == a.victim
    call = -1

    def hook(r: StepRecord) -> None:
        if victim and call == a.at_call and r.phase == a.phase and r.step == a.step:
            append(a.stamp, event="kill", rank=rank, call=call, phase=r.phase, step=r.step)
            os.kill(os.getpid(), signal.SIGKILL)

    t0 = time.perf_counter()
    try:
        for call in range(a.iters):
            t = time.perf_counter()
            out = attend(q, k, v, call_opts, record=hook)
            out.backward(do)
            print(f"die.py rank {rank}/{world}: call #{call} done in {time.perf_counter() - t:.3f} s", flush=True)
    except Exception as e:
        cause = e.__cause__ or e.__context__
        append(a.stamp, event="error", rank=rank, type=type(e).__name__, message=str(e)[:1000],
               cause=None if cause is None else f"{type(cause).__name__}: {cause}"[:1000])
        print(f"die.py rank {rank}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        raise
    print(f"die.py rank {rank}/{world}: {a.iters} calls in {time.perf_counter() - t0:.1f} s, nobody died",
          flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
