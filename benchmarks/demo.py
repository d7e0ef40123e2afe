"""The demo job of the core: exact ring attention on CPU ranks, checked against SDPA and timed.

    torchrun --nproc-per-node 4 benchmarks/demo.py                # S=8192, zigzag, causal
    torchrun --nproc-per-node 4 benchmarks/demo.py --seq 16384 --layout striped

Every rank builds the same full q, k, v (B=1, H=8, D=64, fp32), keeps its shard, runs seqpar's
causal forward+backward, and rank 0 prints the max error of output and gradients vs torch SDPA
on the whole sequence in fp64, and the speedup over SDPA in one process on one thread. (With 4
ranks on a 2-core machine the ideal speedup is 2x, not 4x.)
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from common import inputs, time_median  # noqa: E402

import seqpar  # noqa: E402
from seqpar.testing.numerics import errors, sdpa_grads  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--layout", default="zigzag", choices=seqpar.LAYOUTS)
    args = ap.parse_args()

    seqpar.init_distributed("gloo", timeout=300)
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    B, S, D = 1, args.seq, args.dim
    q, k, v, do = inputs(B, args.heads, args.kv_heads, S, D)
    gqa = args.heads != args.kv_heads

    def sdpa_fwd_bwd(dtype):
        return sdpa_grads(*(t.to(dtype) for t in (q, k, v, do)), causal=True)

    sdpa_s = 0.0
    if rank == 0:  # the baseline runs alone; the other ranks wait at the barrier
        print(f"seqpar demo: S={S}, B={B}, H={args.heads}/{args.kv_heads}, D={D}, causal, fp32, "
              f"{world} ranks x 1 thread, layout={args.layout}", flush=True)
        sdpa_s = time_median(lambda: sdpa_fwd_bwd(torch.float32), 1)
    dist.barrier()

    sh = lambda t: seqpar.shard(t, dim=2, layout=args.layout).contiguous()  # noqa: E731

    def ring_fwd_bwd():
        ql, kl, vl = (sh(t).detach().requires_grad_() for t in (q, k, v))
        out = seqpar.attention(ql, kl, vl, is_causal=True, enable_gqa=gqa, layout=args.layout)
        out.backward(sh(do))
        return out.detach(), ql.grad, kl.grad, vl.grad

    local = ring_fwd_bwd()  # also the warm-up
    t = torch.tensor([time_median(ring_fwd_bwd, 1, before=dist.barrier, warmup=False)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    full = [seqpar.unshard(x, dim=2, layout=args.layout) for x in local]

    if rank == 0:
        ref = sdpa_fwd_bwd(torch.float64)
        low = sdpa_fwd_bwd(torch.float32)
        print(f"{'':4} {'seqpar err':>12} {'SDPA fp32 err':>14}   (max abs vs fp64 SDPA on the whole sequence)")
        for name, e in errors(full, ref, low).items():
            print(f"{name:4} {e['seqpar']:>12.3e} {e['sdpa']:>14.3e}")
        print(f"SDPA 1 process: {sdpa_s:.2f} s   seqpar {world} ranks: {t.item():.2f} s   "
              f"speedup {sdpa_s / t.item():.2f}x")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
