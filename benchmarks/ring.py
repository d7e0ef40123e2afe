"""Ring attention on CPU ranks vs one process running torch SDPA, vs ring-attention-pytorch.

    python benchmarks/ring.py                       # 2 ranks x 1 thread, S = 8192 and 16384
    python benchmarks/ring.py --seq 4096 --reps 2   # quicker

Causal forward+backward, fp32, B=1, H=8, D=64. Every configuration runs in the same invocation, so
the table compares ratios measured side by side (these machines are shared and noisy):

- ``sdpa-1proc``: torch SDPA (the CPU flash kernel) on the whole sequence in one process, 1 thread;
- ``seqpar-<layout>``: seqpar.attention on P ranks (gloo), 1 thread each, max wall time over ranks;
- ``ring-attention-pytorch``: the peer's striped ring (``ring_flash_attn``) on the same ranks;
- per-rank compute time of each seqpar layout (CPU time inside the block kernels, as the ring reports it
  per step to the ``record`` hook of ``seqpar.api.attend``), max/mean = balance: measured in the run
  (``max/mean``), and replayed rank after rank on one core (``same core``: the work itself, free of
  which core each rank got on a shared machine).

Writes a table to stdout, JSON and a PNG to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common import RESULTS, inputs, on_ranks, pyplot, save_figure, time_median, write_json  # noqa: E402

from seqpar.methods import StepRecord  # noqa: E402

from seqpar.vocab import LAYOUTS  # noqa: E402


def bench_sdpa(S, H, D, reps):
    q, k, v, do = inputs(1, H, H, S, D)

    def run():
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        F.scaled_dot_product_attention(qq, kk, vv, is_causal=True).backward(do)

    return time_median(run, reps)


def replay_rank_compute(S, H, D, P, layout, reps):
    """Each rank's kernel work, replayed rank after rank in this one process (same core, same
    conditions): the tiles ``seqpar.layout.tile`` gives rank r at every ring step, forward and
    backward. -> median CPU seconds per rank. Immune to which core a rank landed on."""
    from seqpar import layout as L
    from seqpar.kernels import block_attention, block_attention_backward

    n = S // P
    q, k, v, do = inputs(1, H, H, n, D, seed=1)
    times = [[] for _ in range(P)]
    for _ in range(reps):
        for r in range(P):
            t0 = time.thread_time()
            for step in range(P):
                t = L.tile(layout, True, r, (r - step) % P, P, n)
                if t is None:
                    continue
                args = (q[:, :, t.q], k[:, :, t.kv], v[:, :, t.kv])
                o, lse = block_attention(*args, mask=t.mask, scale=D ** -0.5, backend="aten")
                block_attention_backward(do[:, :, t.q], *args, o, lse, mask=t.mask, scale=D ** -0.5, backend="aten")
            times[r].append(time.thread_time() - t0)
    return [statistics.median(ts) for ts in times]


class KernelTime:
    """A ``record`` hook for ``seqpar.api.attend``: sums the CPU time of the ring's step kernels.

    Thread CPU time, not wall time: the kernels run on the calling thread (1 intra-op thread), the
    transfers on gloo's own threads, and other load on a shared machine does not inflate it."""

    def __init__(self):
        self.total = 0.0

    def __call__(self, rec: StepRecord) -> None:
        self.total += rec.seconds


def _rank_main(rank, world, seqs, H, D, reps, peer):
    """One gloo rank (of ``on_ranks``): every seqpar layout, then the peer -> {(S, method): result}."""
    import torch.distributed as dist

    import seqpar
    from seqpar.api import AttentionCall, attend

    def timed_max(fn):
        t = torch.tensor([time_median(fn, reps, before=dist.barrier)])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.item()

    out = {}
    for S in seqs:
        q, k, v, do = inputs(1, H, H, S, D)
        for layout in LAYOUTS:
            sh = lambda t: seqpar.shard(t, dim=2, layout=layout)  # noqa: E731
            ql, kl, vl, dol = (sh(t).contiguous() for t in (q, k, v, do))

            call = AttentionCall(is_causal=True, layout=layout)

            def run(record=None):
                qq, kk, vv = (t.clone().requires_grad_() for t in (ql, kl, vl))
                attend(qq, kk, vv, call, record=record).backward(dol)

            wall = timed_max(run)
            kernels = KernelTime()
            dist.barrier()
            run(kernels)
            comp = [torch.zeros(1) for _ in range(world)]
            dist.all_gather(comp, torch.tensor([kernels.total]))
            out[(S, f"seqpar-{layout}")] = dict(wall=wall, compute=[c.item() for c in comp])
        try:
            from ring_attention_pytorch import ring_flash_attn
        except ImportError:
            ring_flash_attn = None
        if peer == "skip":
            ring_flash_attn = None
        if ring_flash_attn is not None:
            # the peer wants (B, S_local, H, D), tokens already in striped order
            ql, kl, vl, dol = (seqpar.shard(t, dim=2, layout="striped").transpose(1, 2).contiguous()
                               for t in (q, k, v, do))

            def run_peer():
                qq, kk, vv = (t.clone().requires_grad_() for t in (ql, kl, vl))
                o = ring_flash_attn(qq, kk, vv, causal=True, ring_reduce_col=True, striped_ring_attn=True)
                o.backward(dol)
                return o

            o = run_peer().detach().transpose(1, 2)
            ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            err = (o - seqpar.shard(ref, dim=2, layout="striped")).abs().max()
            dist.all_reduce(err, op=dist.ReduceOp.MAX)
            out[(S, "ring-attention-pytorch")] = dict(wall=timed_max(run_peer), max_err=err.item())
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, nargs="+", default=[8192, 16384])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--peer", choices=["run", "skip"], default="run",
                    help="run the peer ring-attention-pytorch too (slow: ~4x SDPA)")
    ap.add_argument("--out", type=Path, default=RESULTS / "ring.json")
    args = ap.parse_args()
    torch.set_num_threads(1)

    base = {S: bench_sdpa(S, args.heads, args.dim, args.reps) for S in args.seq}
    replay = {(S, layout): replay_rank_compute(S, args.heads, args.dim, args.ranks, layout, args.reps)
              for S in args.seq for layout in LAYOUTS}

    ring = on_ranks(args.ranks, _rank_main, args.seq, args.heads, args.dim, args.reps, args.peer,
                    timeout=24 * 3600)[0]

    rows = []
    for S in args.seq:
        rows.append(dict(seq=S, method="sdpa-1proc", wall_s=base[S], speedup_vs_sdpa=1.0))
        peer = ring.get((S, "ring-attention-pytorch"))
        for (s, method), r in sorted(ring.items()):
            if s != S:
                continue
            row = dict(seq=S, method=method, wall_s=r["wall"], speedup_vs_sdpa=base[S] / r["wall"])
            if "compute" in r:
                c = r["compute"]
                rep = replay[(S, method.removeprefix("seqpar-"))]
                row.update(compute_s=c, imbalance_in_run=max(c) / statistics.mean(c), compute_same_core_s=rep,
                           imbalance=max(rep) / statistics.mean(rep))
                if peer:
                    row["speedup_vs_peer"] = peer["wall"] / r["wall"]
            if "max_err" in r:
                row["max_err"] = r["max_err"]
            rows.append(row)

    print(f"\nCausal fwd+bwd, fp32, B=1, H={args.heads}, D={args.dim}, {args.ranks} ranks x 1 thread (gloo)")
    hdr = (f"{'S':>6} {'method':<24} {'wall s':>8} {'vs SDPA':>8} {'vs peer':>8} {'rank compute s':>18} "
           f"{'max/mean':>8} {'same core':>8}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        comp = " ".join(f"{c:.2f}" for c in r.get("compute_s", [])) or "-"
        peer = f"{r['speedup_vs_peer']:.1f}x" if "speedup_vs_peer" in r else "-"
        imb = f"{r['imbalance_in_run']:.3f}" if "imbalance" in r else "-"
        imb2 = f"{r['imbalance']:.3f}" if "imbalance" in r else "-"
        print(f"{r['seq']:>6} {r['method']:<24} {r['wall_s']:>8.2f} {r['speedup_vs_sdpa']:>7.2f}x {peer:>8} "
              f"{comp:>18} {imb:>8} {imb2:>9}")

    meta = dict(ranks=args.ranks, heads=args.heads, dim=args.dim, dtype="float32", causal=True, threads_per_rank=1,
                torch=torch.__version__)
    write_json(args.out, dict(meta=meta, rows=rows), indent=2)
    plt = pyplot()
    if plt is not None:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
        methods = [m for m in dict.fromkeys(r["method"] for r in rows)]
        width = 0.8 / len(methods)
        for i, m in enumerate(methods):
            xs = [j + i * width for j, S in enumerate(args.seq)]
            ys = [next((r["speedup_vs_sdpa"] for r in rows if r["seq"] == S and r["method"] == m), 0)
                  for S in args.seq]
            a1.bar(xs, ys, width, label=m)
        a1.axhline(args.ranks, ls="--", c="gray", lw=1)
        a1.set_xticks([j + 0.4 - width / 2 for j in range(len(args.seq))], [str(S) for S in args.seq])
        a1.set_xlabel("sequence length")
        a1.set_ylabel("speedup vs 1-process SDPA (higher is better)")
        a1.legend(fontsize=8)
        S = args.seq[-1]
        for i, layout in enumerate(LAYOUTS):
            r = next(r for r in rows if r["seq"] == S and r["method"] == f"seqpar-{layout}")
            a2.bar([i * (args.ranks + 1) + j for j in range(args.ranks)], r["compute_same_core_s"], label=layout)
        a2.set_xticks([i * (args.ranks + 1) + (args.ranks - 1) / 2 for i in range(len(LAYOUTS))], LAYOUTS)
        a2.set_ylabel(f"per-rank kernel CPU time, s (S={S}, same core)")
        a2.set_title("causal balance")
        fig.tight_layout()
        save_figure(fig, args.out.with_suffix(".png"))
    print(f"\nwrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
