"""Fault-injection payload: one rank skips one attention call (a data-dependent branch gone wrong).

    torchrun --nproc-per-node 2 launch/skip_call.py --skipper 1 --timeout 5
    torchrun --nproc-per-node 2 launch/skip_call.py --skipper 1 --timeout 5 --fault bad-layout

Every rank makes ``--calls`` attention calls (forward + backward) on the world group, except that
rank ``--skipper`` skips call ``--skip``; then every rank meets in a barrier. The ranks fall out of
step: the last call of the others finds no partner, and seqpar's bounded wait raises its
``CommError`` naming the call, the step and the peer ranks; the launcher then ends the job.
``--fault bad-layout``: instead of skipping, that rank passes an unknown layout to a call whose shapes
the group already agreed on (the others go straight into the ring): after the timeout it raises its
own ``ValueError`` naming ``layout``, the others ``CommError``.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import seqpar  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--skipper", type=int, default=1)
    ap.add_argument("--skip", type=int, default=1, help="the call (0-based) the skipper leaves out")
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds: init_distributed(timeout=...)")
    ap.add_argument("--fault", choices=("skip", "bad-layout"), default="skip")
    args = ap.parse_args()
    torch.set_num_threads(1)
    seqpar.init_distributed(timeout=args.timeout)
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 16 * world, 16, generator=g)
    for i in range(args.calls):
        bad = rank == args.skipper and i == args.skip
        if bad and args.fault == "skip":
            continue
        q = seqpar.shard(x, dim=2).clone().requires_grad_()
        seqpar.attention(q, q, q, is_causal=True, layout="spiral" if bad else "zigzag").sum().backward()
    print(f"rank {rank}: made its calls at {time.time():.3f}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
