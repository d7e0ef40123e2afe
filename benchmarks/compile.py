"""Training step time, eager vs ``parallelize(..., compile=True)``, on 4 CPU ranks.

    python benchmarks/compile.py                  # the training job's model at S=8192, and a 4-layer model
    python benchmarks/compile.py --seq 2048 --steps 2

Both variants run in the same invocation on the same spawned ranks (gloo, 1 thread each), with the
same model, batches and FSDP2, their timed steps interleaved (eager, compiled, eager, ...) after the
warm-up steps (compilation excluded, reported separately). Models: ``train`` = the training job's (a 1-layer Llama,
``seqpar.train`` defaults), ``4-layer`` = the same with 4 layers. Writes a table, JSON and a PNG to
benchmarks/results/compile.*.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

from common import RESULTS, on_ranks, pyplot, save_figure, write_json  # noqa: E402


def _rank_main(rank, size, *, seq, layers, steps, warmup):
    import torch
    import torch.distributed as dist

    import seqpar
    from seqpar.train import make_parser, recall_batch, build_model, task_spec

    torch.set_num_threads(1)
    args = make_parser().parse_args(["--seq-len", str(seq), "--layers", str(layers), "--quiet"])
    spec = task_spec(args)
    mesh = seqpar.init_mesh(cp=size)
    variants = {}
    for name, compiled in (("eager", False), ("compiled", True)):
        model = seqpar.parallelize(build_model(spec, args), mesh, layout="zigzag", fsdp=True, compile=compiled)
        variants[name] = (model, torch.optim.AdamW(model.parameters(), lr=1e-3))

    def step(name, i):
        model, opt = variants[name]
        batch = seqpar.shard_batch(recall_batch(spec, 1, seq, seed=i), mesh, layout="zigzag")
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()

    out = {}
    for name in variants:  # warm-up: allocations, optimizer state, and the compilation
        t0 = time.perf_counter()
        for i in range(warmup):
            step(name, i)
        out[name] = dict(warmup_s=time.perf_counter() - t0)
    times = {name: [] for name in variants}
    for i in range(steps):  # interleaved, so a change of load on the shared machine hits both alike
        for name in variants:
            dist.barrier()
            t0 = time.perf_counter()
            step(name, warmup + i)
            times[name].append(time.perf_counter() - t0)
    for name in variants:
        t = torch.tensor([statistics.median(times[name]), out[name]["warmup_s"]])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        out[name] = dict(step_s=t[0].item(), warmup_s=t[1].item())
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per variant (median)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (the compiled run compiles here)")
    ap.add_argument("--out", default=str(RESULTS / "compile.json"))
    args = ap.parse_args()
    rows = []
    for name, layers in (("train", 1), ("4-layer", 4)):
        res = on_ranks(args.ranks, _rank_main, seq=args.seq, layers=layers, steps=args.steps, warmup=args.warmup,
                       timeout=3000)[0]
        rows.append(dict(model=name, layers=layers, seq=args.seq, ranks=args.ranks, eager_step_s=res["eager"]["step_s"],
                         compiled_step_s=res["compiled"]["step_s"],
                         speedup=res["eager"]["step_s"] / res["compiled"]["step_s"],
                         compiled_warmup_s=res["compiled"]["warmup_s"], eager_warmup_s=res["eager"]["warmup_s"]))
    print(f"\nTraining step (fwd+bwd+AdamW, FSDP2, zigzag), {args.ranks} gloo ranks x 1 thread, S={args.seq}")
    hdr = f"{'model':<8} {'eager s':>8} {'compiled s':>11} {'eager/compiled':>15} {'compile warm-up s':>18}"
    print(hdr + "\n" + "-" * len(hdr))
    for r in rows:
        print(f"{r['model']:<8} {r['eager_step_s']:>8.2f} {r['compiled_step_s']:>11.2f} {r['speedup']:>14.2f}x "
              f"{r['compiled_warmup_s']:>18.1f}")
    import torch

    write_json(args.out, dict(meta=dict(torch=torch.__version__, backend="inductor", dtype="float32"), rows=rows))
    plt = pyplot()
    if plt is not None:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        xs = range(len(rows))
        ax.bar([x - 0.2 for x in xs], [r["eager_step_s"] for r in rows], 0.4, label="eager")
        ax.bar([x + 0.2 for x in xs], [r["compiled_step_s"] for r in rows], 0.4, label="compile=True")
        ax.set_xticks(list(xs), [r["model"] for r in rows])
        ax.set_ylabel(f"step time, s (S={args.seq}, {args.ranks} ranks)")
        ax.legend()
        fig.tight_layout()
        save_figure(fig, RESULTS / "compile.png" if args.out.endswith("compile.json") else args.out + ".png")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
