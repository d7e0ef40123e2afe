"""Launcher smoke test: start it under torchrun, srun or mpirun; it checks seqpar end to end.

    torchrun --nproc-per-node 2 launch/check.py
    srun -n 2 python launch/check.py
    mpirun -n 4 --oversubscribe python launch/check.py --transport gloo,mpi

Every rank initialises from its launcher's environment (``seqpar.init_distributed``), then runs an
equivalence subset: ``seqpar.attention`` forward and backward on the sharded sequence against torch
SDPA on the whole sequence in fp64, for each layout, causal or not, MHA and GQA, fp32 (plus fp64
and bf16 cases), over each requested transport ("gloo": torch.distributed, "mpi": seqpar.MPIGroup).
An error above the project's bound (2x single-device SDPA's error in the same dtype + a floor)
fails the rank. Rank 0 prints one line per transport and a final ``SEQPAR-CHECK OK ...`` line;
``--json PATH`` also writes the results. Exit status 0 only when every case on every rank passed.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import seqpar  # noqa: E402
from seqpar import methods  # noqa: E402
from seqpar.comm import make_ring  # noqa: E402
from seqpar.mesh import group_rank_size, resolve_group  # noqa: E402
from seqpar.testing import numerics  # noqa: E402
from seqpar.vocab import CP_DIM, LAYOUTS  # noqa: E402


def equivalence(group, *, seed, B, Hq, Hkv, S, D, layout, causal, dtype, method="ring") -> float:
    """max over out/dq/dk/dv of err(seqpar) / bound; <= 1 passes."""
    g = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(B, h, S, D, generator=g, dtype=torch.float64) for h in (Hq, Hkv, Hkv, Hq))
    gqa = Hq != Hkv
    ref = numerics.sdpa_grads(q, k, v, do, causal=causal)
    low = numerics.sdpa_grads(*(t.to(dtype) for t in (q, k, v, do)), causal=causal)
    sh = lambda t: seqpar.shard(t, dim=2, group=group, layout=layout)  # noqa: E731
    ql, kl, vl = (sh(t.to(dtype)).detach().requires_grad_() for t in (q, k, v))
    out = seqpar.attention(ql, kl, vl, group=group, is_causal=causal, enable_gqa=gqa, layout=layout, method=method)
    out.backward(sh(do.to(dtype)))
    res = numerics.errors([out.detach(), ql.grad, kl.grad, vl.grad], [sh(r) for r in ref], [sh(lo) for lo in low])
    worst = max(e["seqpar"] / numerics.bound(e["sdpa"], e["scale"], dtype) for e in res.values())
    # unshard round trip over the same group
    full = seqpar.unshard(out.detach(), dim=2, group=group, layout=layout)
    if not torch.equal(seqpar.shard(full, dim=2, group=group, layout=layout), out.detach()):
        worst = float("inf")
    return worst


def cases(P: int):
    for layout in LAYOUTS:
        for causal in (False, True):
            for Hq, Hkv in ((4, 4), (4, 2)):
                yield dict(B=2, Hq=Hq, Hkv=Hkv, S=8 * P, D=32, layout=layout, causal=causal, dtype=torch.float32)
    yield dict(B=1, Hq=4, Hkv=1, S=16 * P, D=24, layout="zigzag", causal=True, dtype=torch.float64)
    yield dict(B=1, Hq=4, Hkv=1, S=32 * P, D=64, layout="striped", causal=True, dtype=torch.bfloat16)


def make_group(transport: str, world: int):
    if transport == "gloo":
        return None  # the default world of torch.distributed
    if transport == "mpi":
        return seqpar.MPIGroup()
    if transport == "mpi-cp":  # the MPI twin of the "cp" dim of a (dp, cp=2) mesh
        return seqpar.mpi_group(seqpar.init_mesh(cp=2 if world % 2 == 0 else 1)[CP_DIM])
    raise SystemExit(f"--transport: unknown transport {transport!r} (gloo, mpi, mpi-cp)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--transport", default="gloo",
                    help="comma-separated: gloo, mpi (COMM_WORLD), mpi-cp (mpi_group of a cp=2 mesh dim); default gloo")
    ap.add_argument("--backend", default=None, help="torch.distributed backend (default: nccl on CUDA, else gloo)")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds for rendezvous and each collective")
    ap.add_argument("--json", default=None, help="rank 0 writes the results here")
    ap.add_argument("--methods", default="ring", help="comma-separated methods to check (default ring); e.g. "
                                                      "ring,ulysses,allgather")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    env = seqpar.init_distributed(args.backend, timeout=args.timeout)
    rank, world = dist.get_rank(), dist.get_world_size()
    source = env.source if env is not None else "none"
    t_init = time.perf_counter() - t0
    results, rings, counts = {}, {}, {}
    for transport in args.transport.split(","):
        group = make_group(transport, world)
        size = group_rank_size(resolve_group(group))[1]
        worst, n_cases = 0.0, 0
        for method in args.methods.split(","):
            for i, c in enumerate(cases(size)):
                try:  # the shapes a method cannot take (e.g. Ulysses heads) are not its cases
                    methods.check(method, hq=c["Hq"], hkv=c["Hkv"], s_local=c["S"] // size, world=size,
                                  layout=c["layout"])
                except ValueError:
                    continue
                worst = max(worst, equivalence(group, seed=100 + i, method=method, **c))
                n_cases += 1
        results[transport] = worst
        counts[transport] = n_cases
        rings[transport] = f"{type(make_ring(resolve_group(group))).__name__}/{size}"
    # every rank's verdict reaches rank 0 over torch.distributed
    verdicts = [None] * world
    dist.all_gather_object(verdicts, dict(rank=rank, host=socket.gethostname(), worst=results))
    ok = all(w <= 1.0 for v in verdicts for w in v["worst"].values())
    if rank == 0:
        for transport in results:
            worst = max(v["worst"][transport] for v in verdicts)
            print(f"seqpar-check transport={transport} world={world} cases={counts[transport]} "
                  f"ring={rings[transport]} worst_err_over_bound={worst:.3f}", flush=True)
        hosts = sorted({v["host"] for v in verdicts})
        print(f"SEQPAR-CHECK {'OK' if ok else 'FAIL'} source={source} world={world} hosts={','.join(hosts)} "
              f"init_s={t_init:.2f} total_s={time.perf_counter() - t0:.2f}", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(ok=ok, source=source, world=world, ranks=verdicts), f, indent=1)
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
