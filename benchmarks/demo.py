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
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import seqpar  # noqa: E402


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
    g = torch.Generator().manual_seed(0)
    B, S, D = 1, args.seq, args.dim
    q = torch.randn(B, args.heads, S, D, generator=g)
    k = torch.randn(B, args.kv_heads, S, D, generator=g)
    v = torch.randn(B, args.kv_heads, S, D, generator=g)
    do = torch.randn(B, args.heads, S, D, generator=g)
    gqa = args.heads != args.kv_heads

    def sdpa_fwd_bwd(dtype):
        qq, kk, vv = (t.detach().to(dtype).clone().requires_grad_() for t in (q, k, v))
        out = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, enable_gqa=gqa)
        out.backward(do.to(dtype))
        return out.detach(), qq.grad, kk.grad, vv.grad

    sdpa_s = 0.0
    if rank == 0:  # the baseline runs alone; the other ranks wait at the barrier
        print(f"seqpar demo: S={S}, B={B}, H={args.heads}/{args.kv_heads}, D={D}, causal, fp32, "
              f"{world} ranks x 1 thread, layout={args.layout}", flush=True)
        sdpa_fwd_bwd(torch.float32)  # warm-up
        t0 = time.perf_counter()
        sdpa_fwd_bwd(torch.float32)
        sdpa_s = time.perf_counter() - t0
    dist.barrier()

    sh = lambda t: seqpar.shard(t, dim=2, layout=args.layout).contiguous()  # noqa: E731

    def ring_fwd_bwd():
        ql, kl, vl = (sh(t).detach().requires_grad_() for t in (q, k, v))
        out = seqpar.attention(ql, kl, vl, is_causal=True, enable_gqa=gqa, layout=args.layout)
        out.backward(sh(do))
        return out.detach(), ql.grad, kl.grad, vl.grad

    ring_fwd_bwd()  # warm-up
    dist.barrier()
    t0 = time.perf_counter()
    local = ring_fwd_bwd()
    t = torch.tensor([time.perf_counter() - t0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    full = [seqpar.unshard(x, dim=2, layout=args.layout) for x in local]

    if rank == 0:
        ref = sdpa_fwd_bwd(torch.float64)
        low = sdpa_fwd_bwd(torch.float32)
        print(f"{'':4} {'seqpar err':>12} {'SDPA fp32 err':>14}   (max abs vs fp64 SDPA on the whole sequence)")
        for name, mine, r, lo in zip(("out", "dq", "dk", "dv"), full, ref, low):
            print(f"{name:4} {(mine.double() - r).abs().max().item():>12.3e} {(lo.double() - r).abs().max().item():>14.3e}")
        print(f"SDPA 1 process: {sdpa_s:.2f} s   seqpar {world} ranks: {t.item():.2f} s   "
              f"speedup {sdpa_s / t.item():.2f}x")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
