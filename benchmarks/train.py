"""Training-job throughput and per-rank memory vs sequence length, for cp = 1, 2, 4 (CPU, gloo).

    python benchmarks/train.py                       # driver: one torchrun per cp, then table/JSON/PNG
    python benchmarks/train.py --seq 2048 4096 8192 --cps 1 2 4 --budget-mb 256

Each cp runs as its own torchrun job (world = cp, dp = 1, zigzag, FSDP2) of the model and task of
``seqpar.train`` (with ``--layers`` decoder layers, 4 by default, so checkpointing has blocks to save); for every sequence length, with and without ``checkpoint=True``: one warm-up step,
then ``--steps`` timed steps. Per-rank memory is the peak resident set size during the timed steps
minus the resident size just before them (after ``malloc_trim``), sampled every 2 ms by a thread
(CPU tensors have no allocator statistics); the table shows the max over ranks.

The longest sequence fitting ``--budget-mb`` per rank is extrapolated from a linear fit of memory
vs length (attention is blockwise, so memory is linear in S/cp) and marked as such.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import RESULTS, pyplot, save_figure, write_json


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Peak RSS above the level at ``__enter__``, sampled by a thread."""

    def __init__(self, every: float = 0.002):
        self.every, self.peak, self._stop = every, 0, threading.Event()

    def __enter__(self):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        self.base = _rss_bytes()
        self.peak = self.base
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.every)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())

    @property
    def mb(self) -> float:
        return (self.peak - self.base) / 2**20


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    import seqpar
    from seqpar.train import build_model, make_parser, recall_batch, task_spec

    torch.set_num_threads(1)
    seqpar.init_distributed()
    cp = dist.get_world_size()
    mesh = seqpar.init_mesh(cp=cp)
    rows = []
    for S in args.seq:
        for ckpt in (False, True):
            targs = make_parser().parse_args(["--seq-len", str(S), "--layers", str(args.layers)])
            spec = task_spec(targs)
            model = seqpar.parallelize(build_model(spec, targs), mesh, layout="zigzag", fsdp=True, checkpoint=ckpt)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

            def step(i):
                batch = seqpar.shard_batch(recall_batch(spec, 1, S, seed=i), mesh, layout="zigzag")
                loss = model(**batch).loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            step(0)  # warm-up (allocations, optimizer state)
            dist.barrier()
            with PeakRSS() as mem:
                t0 = time.perf_counter()
                for i in range(args.steps):
                    step(i + 1)
                dt = (time.perf_counter() - t0) / args.steps
            stats = torch.tensor([mem.mb, dt], dtype=torch.float64)
            dist.all_reduce(stats, op=dist.ReduceOp.MAX)
            rows.append(dict(cp=cp, seq_len=S, checkpoint=ckpt, step_s=stats[1].item(),
                             tokens_per_s=S / stats[1].item(), peak_mb_per_rank=stats[0].item()))
            if dist.get_rank() == 0:
                print(json.dumps(rows[-1]), flush=True)
            del model, opt
    if dist.get_rank() == 0:
        write_json(args.out, rows, indent=None)
    dist.destroy_process_group()


def _fit_max_len(rows, budget_mb):
    """Linear fit mem = a + b*S over the measured lengths -> the S at the budget (a multiple of 1024)."""
    xs = [r["seq_len"] for r in rows]
    ys = [r["peak_mb_per_rank"] for r in rows]
    if len(xs) < 2:
        return None
    n, mx, my = len(xs), sum(xs) / len(xs), sum(ys) / len(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / max(1e-9, sum((x - mx) ** 2 for x in xs))
    a = my - b * mx
    if b <= 0:
        return None
    return int((budget_mb - a) / b) // 1024 * 1024


def report(rows, budget_mb: float, png: Path) -> str:
    lines = ["| cp | checkpoint | seq len | step (s) | tokens/s | peak MB / rank |", "|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["cp"], r["checkpoint"], r["seq_len"])):
        lines.append(f"| {r['cp']} | {'yes' if r['checkpoint'] else 'no'} | {r['seq_len']} | {r['step_s']:.2f} | "
                     f"{r['tokens_per_s']:,.0f} | {r['peak_mb_per_rank']:.1f} |")
    lines += ["", f"Longest sequence within {budget_mb:.0f} MB per rank (linear fit of the rows above, extrapolated):",
              "", "| cp | checkpoint | max seq len |", "|---|---|---|"]
    fits = {}
    for cp in sorted({r["cp"] for r in rows}):
        for ck in (False, True):
            sel = [r for r in rows if r["cp"] == cp and r["checkpoint"] == ck]
            fits[(cp, ck)] = m = _fit_max_len(sel, budget_mb)
            lines.append(f"| {cp} | {'yes' if ck else 'no'} | {m if m is not None else 'n/a'} |")
    plt = pyplot()
    if plt is not None:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        for cp in sorted({r["cp"] for r in rows}):
            for ck, ls in ((False, "-"), (True, "--")):
                sel = sorted((r for r in rows if r["cp"] == cp and r["checkpoint"] == ck), key=lambda r: r["seq_len"])
                lab = f"cp={cp}{' ckpt' if ck else ''}"
                axes[0].plot([r["seq_len"] for r in sel], [r["peak_mb_per_rank"] for r in sel], ls, marker="o", label=lab)
                axes[1].plot([r["seq_len"] for r in sel], [r["tokens_per_s"] for r in sel], ls, marker="o", label=lab)
        axes[0].axhline(budget_mb, color="gray", lw=0.8)
        axes[0].set(ylabel="peak training MB per rank", yscale="log")
        axes[1].set(ylabel="tokens/s (whole job)")
        ticks = sorted({r["seq_len"] for r in rows})
        for ax in axes:
            ax.set_xscale("log", base=2)
            ax.set_xticks(ticks, [f"{t // 1024}k" for t in ticks])
            ax.minorticks_off()
            ax.set_xlabel("sequence length")
            ax.legend(fontsize=7)
        fig.suptitle("seqpar training job on CPU (gloo, 2 cores shared by all ranks)", fontsize=9)
        fig.tight_layout()
        save_figure(fig, png, dpi=100)
    return "\n".join(lines)


def driver(args) -> None:
    rows = []
    env = dict(os.environ, OMP_NUM_THREADS="1")
    t0 = time.perf_counter()
    for cp in args.cps:
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            out = f.name
        seqs = [s for s in args.seq if s // cp <= args.max_local] or args.seq[:1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(cp), __file__,
               "--worker", "--out", out, "--steps", str(args.steps), "--layers", str(args.layers),
               "--seq", *map(str, seqs)]
        print(f"cp={cp}: {' '.join(cmd[2:])}", flush=True)
        subprocess.run(cmd, env=env, check=True)
        rows += json.loads(Path(out).read_text())
        os.unlink(out)
    table = report(rows, args.budget_mb, args.results / "train.png")
    meta = dict(budget_mb=args.budget_mb, layers=args.layers, timed_steps=args.steps, cpus=os.cpu_count(),
                wall_s=time.perf_counter() - t0)
    write_json(args.results / "train.json", dict(meta, rows=rows))
    (args.results / "train.md").write_text(table + "\n")
    print(table)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768])
    p.add_argument("--cps", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--steps", type=int, default=1, help="timed steps per point (after one warm-up step)")
    p.add_argument("--layers", type=int, default=4, help="decoder layers (the job's model otherwise)")
    p.add_argument("--max-local", type=int, default=8192, help="skip lengths with more tokens per rank")
    p.add_argument("--budget-mb", type=float, default=256.0)
    p.add_argument("--worker", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--results", type=Path, default=RESULTS, help="folder for train.json, train.md and train.png")
    p.add_argument("--replot", action="store_true", help="only redo table and PNG from <results>/train.json")
    args = p.parse_args()
    if args.replot:
        data = json.loads((args.results / "train.json").read_text())
        print(report(data["rows"], data["budget_mb"], args.results / "train.png"))
        return
    worker(args) if args.worker else driver(args)


if __name__ == "__main__":
    main()
