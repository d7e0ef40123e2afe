"""Masked ring attention on CPU ranks: sliding windows and packed documents, per layout.

    python benchmarks/masks.py                              # both parts, S = 16384, 2 ranks x 1 thread
    python benchmarks/masks.py --seq 2048 --iters 3         # quick
    python benchmarks/masks.py --part packed --seeds 20     # one part (the other part of the JSON is kept)

Forward+backward, fp32, B=1, H=8 (--heads), D=64, seqpar.attention's ring on P=2 gloo ranks (1 thread
each). The variants of a part run interleaved in one spawned world (iteration i runs every variant once,
in alternating order), each timed run after a barrier, the max over ranks per run, the median over
--iters runs; the ratios are medians of the per-iteration ratios (a noisy shared machine moves both
variants of one iteration together). The first, untimed run of every variant is the warm-up and the
instrumented run: the ``record`` hook of ``seqpar.api.attend`` (thread CPU time of each ring step's
kernels, per rank) and a wrapper of ``torch.distributed.batch_isend_irecv`` (the ring's exchanges).

1. ``window``: causal with ``window_size=(S/8, -1)`` vs full causal, each layout. Reported: wall time,
   full/window, the exchanges, and the ring plan (``seqpar.masks.last_step`` / ``plan_tile`` per rank and
   step: steps with no tiles, steps cut off) at P=2 (measured) and P=4, 8 (planned only).
2. ``packed``: a packed batch of documents (lognormal lengths with mean S/8, plus one of S/2, shuffled;
   seeded). Per-rank work = visible (query, key) pairs of the rank's queries (causal, inside documents),
   counted from ``seqpar.layout.global_indices`` and the document offsets in O(S/P) per rank; max/mean
   over P=4 ranks (--work-ranks) per layout, over --seeds seeds (median and worst). Then wall time of
   causal packed-document attention (``cu_seqlens``, seed 0) vs unpacked causal on the ranks.

Writes tables to stdout, benchmarks/results/masks.json and masks.png.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from common import RESULTS, inputs, load_json, on_ranks, pyplot, save_figure, write_json  # noqa: E402

from seqpar import masks as M  # noqa: E402
from seqpar.layout import global_indices  # noqa: E402
from seqpar.vocab import LAYOUT_CHOICES  # noqa: E402

LAYOUTS = tuple(LAYOUT_CHOICES)  # contiguous, striped, zigzag, packed


# ----------------------------------------------------------------------------- documents and work (arithmetic)

def documents(S: int, seed: int, *, mean: float | None = None, sigma: float = 1.0, long: int | None = None) -> list[int]:
    """cu_seqlens [0, ..., S] of a packed batch: one document of ``long`` (default S/2) tokens and documents
    with lognormal lengths of mean ``mean`` (default S/8; the last one cut to fit), in a seeded random order."""
    mean = S / 8 if mean is None else mean
    long = S // 2 if long is None else long
    g = torch.Generator().manual_seed(seed)
    mu = math.log(mean) - sigma ** 2 / 2  # E[lognormal(mu, sigma)] = exp(mu + sigma^2 / 2)
    lens, room = [], S - long
    while room > 0:
        n = max(1, round(float(torch.empty(1).log_normal_(mu, sigma, generator=g))))
        n = min(n, room)
        lens.append(n)
        room -= n
    lens.insert(int(torch.randint(0, len(lens) + 1, (1,), generator=g)), long)
    perm = torch.randperm(len(lens), generator=g).tolist()
    lens = [lens[i] for i in perm]
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    return cu


def rank_work(S: int, world: int, layout: str, cu: list[int]) -> list[int]:
    """Visible (query, key) pairs of each rank's queries under causal attention inside documents: a query at
    global position i of the document starting at a sees i - a + 1 keys. O(S/P) per rank."""
    cut = torch.tensor(cu)
    out = []
    for r in range(world):
        g = global_indices(S, r, world, layout, cu_seqlens=cu)
        start = cut[torch.bucketize(g, cut, right=True) - 1]
        out.append(int((g - start + 1).sum()))
    return out


def _check_work(S: int = 512, world: int = 4) -> None:
    """The arithmetic count against the dense truth of seqpar.masks.visible_pairs (small S)."""
    cu = documents(S, 123)
    spec = M.MaskSpec(causal=True, cu_seqlens=tuple(cu))
    for layout in LAYOUTS:
        got = rank_work(S, world, layout, cu)
        want = [int(M.visible_pairs(spec, global_indices(S, r, world, layout, cu_seqlens=cu), torch.arange(S)).sum())
                for r in range(world)]
        assert got == want, (layout, got, want)


def imbalance(xs) -> float:
    return max(xs) / statistics.mean(xs)


# ----------------------------------------------------------------------------- the ring plan (arithmetic)

def plan(S: int, world: int, layout: str, *, window=(-1, -1), cu=None) -> dict:
    """The ring plan of one call: per rank and step the number of pieces (0 = no kernel call), the last step
    with work anywhere (the ring stops after it) and the exchanges that implies (K/V posts forward; K/V and
    dK/dV posts backward, the dK/dV home hop included)."""
    spec = M.mask_spec(is_causal=True, window_size=window, cu_seqlens=cu, softcap=0.0, seq_len=S)
    n = S // world
    pieces = [[len(M.plan_tile(spec, layout, r, (r - s) % world, world, n)) for s in range(world)]
              for r in range(world)]
    last = M.last_step(spec, layout, world, n) if spec.structured else world - 1
    return dict(world=world, pieces=pieces, last_step=last,
                empty=[[r, s] for r in range(world) for s in range(last + 1) if not pieces[r][s]],
                cut_steps=list(range(last + 1, world)),
                exchanges=dict(fwd=last, bwd=2 * last + (1 if last > 0 else 0)))


# ----------------------------------------------------------------------------- the spawned ranks

class StepLog:
    """``record`` hook: thread CPU seconds and piece count per (phase, step)."""

    def __init__(self):
        self.seconds: dict[str, dict[int, float]] = {"forward": {}, "backward": {}}
        self.pieces: dict[str, dict[int, int]] = {"forward": {}, "backward": {}}

    def __call__(self, rec) -> None:
        self.seconds[rec.phase][rec.step] = self.seconds[rec.phase].get(rec.step, 0.0) + rec.seconds
        self.pieces[rec.phase][rec.step] = self.pieces[rec.phase].get(rec.step, 0) + 1

    def table(self, world: int) -> dict:
        return {ph: dict(seconds=[self.seconds[ph].get(s, 0.0) for s in range(world)],
                         pieces=[self.pieces[ph].get(s, 0) for s in range(world)]) for ph in self.seconds}


def _rank_main(rank, world, S, H, D, iters, cases):
    """``cases``: [(name, layout, window, cu or None)]. Every case once instrumented (the warm-up), then
    ``iters`` interleaved timed runs -> per case the per-run wall times (max over ranks), the per-rank step
    log and the exchange counts."""
    import torch.distributed as dist

    import seqpar
    from seqpar.api import AttentionCall, attend

    q, k, v, do = inputs(1, H, H, S, D)
    log0 = rank == 0

    def make(layout, window, cu):
        sh = lambda t: seqpar.shard(t, dim=2, layout=layout, cu_seqlens=cu).contiguous()  # noqa: E731
        ql, kl, vl, dol = (sh(t) for t in (q, k, v, do))
        call = AttentionCall(is_causal=True, layout=layout, window_size=window, cu_seqlens=cu)

        def run(record=None, mark=None):
            qq, kk, vv = (t.clone().requires_grad_() for t in (ql, kl, vl))
            out = attend(qq, kk, vv, call, record=record)
            if mark:
                mark()
            out.backward(dol)

        return run

    runs = [make(layout, window, cu) for _, layout, window, cu in cases]
    bar = None
    if log0:
        from tqdm import tqdm
        bar = tqdm(total=len(cases) * (1 + iters), desc=f"ranks S={S}", file=sys.stdout, mininterval=2.0)

    info = []
    real = dist.batch_isend_irecv
    for run in runs:  # warm-up + instrumented
        calls = []

        def counting(ops, calls=calls):
            calls.append(len(ops))
            return real(ops)

        steps = StepLog()
        fwd = []
        dist.batch_isend_irecv = counting
        try:
            dist.barrier()
            run(steps, mark=lambda: fwd.append(len(calls)))
        finally:
            dist.batch_isend_irecv = real
        info.append(dict(steps=steps.table(world), exchanges=dict(fwd=fwd[0], bwd=len(calls) - fwd[0])))
        if bar:
            bar.update()

    times = torch.zeros(iters, len(runs), dtype=torch.float64)
    for it in range(iters):
        order = range(len(runs)) if it % 2 == 0 else reversed(range(len(runs)))
        for c in order:
            dist.barrier()
            t0 = time.perf_counter()
            runs[c]()
            times[it, c] = time.perf_counter() - t0
            if bar:
                bar.update()
    if bar:
        bar.close()
    dist.all_reduce(times, op=dist.ReduceOp.MAX)
    gathered = [None] * world
    dist.all_gather_object(gathered, info)
    return [dict(name=name, layout=layout, times=times[:, c].tolist(),
                 steps=[g[c]["steps"] for g in gathered], exchanges=[g[c]["exchanges"] for g in gathered])
            for c, (name, layout, _, _) in enumerate(cases)]


def run_cases(args, S, cases):
    timeout = args.timeout or max(600.0, 30.0 * len(cases) * (args.iters + 1) * (S / 8192) ** 2)
    return on_ranks(args.ranks, _rank_main, S, args.heads, args.dim, args.iters, cases, timeout=timeout)[0]


def _paired(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b))


def _kernel(res: dict) -> list[float]:
    """Per-rank kernel CPU seconds (forward + backward) of the instrumented run."""
    return [sum(st["forward"]["seconds"]) + sum(st["backward"]["seconds"]) for st in res["steps"]]


def _fmt_steps(res: dict, phase: str) -> str:
    """Per rank: the step kernel seconds, '-' for a step with no kernel call: 'r0 1.20/-  r1 0.9/0.8'."""
    return "  ".join(f"r{r} " + "/".join(f"{t:.2f}" if n else "-" for t, n in zip(st[phase]["seconds"],
                                                                                  st[phase]["pieces"]))
                     for r, st in enumerate(res["steps"]))


# ----------------------------------------------------------------------------- the parts

def part_window(args) -> dict:
    S, P = args.seq, args.ranks
    window = (S // 8, -1)
    cases = [c for layout in LAYOUTS for c in ((f"{layout}/full", layout, (-1, -1), None),
                                                (f"{layout}/window", layout, window, None))]
    res = {r["name"]: r for r in run_cases(args, S, cases)}
    rows = []
    for layout in LAYOUTS:
        full, win = res[f"{layout}/full"], res[f"{layout}/window"]
        rows.append(dict(
            layout=layout, full_s=statistics.median(full["times"]), window_s=statistics.median(win["times"]),
            full_times=full["times"], window_times=win["times"], ratio=_paired(full["times"], win["times"]),
            exchanges=dict(full=full["exchanges"][0], window=win["exchanges"][0]),
            kernel_s=dict(full=_kernel(full), window=_kernel(win)),
            steps=dict(full=full["steps"], window=win["steps"]),
            plan={str(w): plan(S, w, layout, window=window) for w in sorted({P, 4, 8})},
            plan_full=plan(S, P, layout)))

    print(f"\n1. Sliding window (S/8, -1) = {window} vs full causal: S={S}, B=1, H={args.heads}, D={args.dim}, fp32, "
          f"fwd+bwd, {P} gloo ranks x 1 thread, median of {args.iters} interleaved runs (max over ranks)")
    hdr = (f"{'layout':<11} {'full s':>7} {'window s':>8} {'full/win':>8} {'kernel s full':>14} {'kernel s win':>13} "
           f"{'exch f+b full':>13} {'exch f+b win':>12}  {'no-tile (rank,step) P=' + str(P):<24} "
           f"{'last step / steps cut, P=4 | P=8':<30}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        ef, ew = r["exchanges"]["full"], r["exchanges"]["window"]
        pl = r["plan"]
        empty = " ".join(f"({a},{b})" for a, b in pl[str(P)]["empty"]) or "none"
        cut = " | ".join(f"{pl[str(w)]['last_step']} / {len(pl[str(w)]['cut_steps'])}" for w in (4, 8))
        print(f"{r['layout']:<11} {r['full_s']:>7.2f} {r['window_s']:>8.2f} {r['ratio']:>7.2f}x "
              f"{' '.join(f'{x:.2f}' for x in r['kernel_s']['full']):>14} "
              f"{' '.join(f'{x:.2f}' for x in r['kernel_s']['window']):>13} "
              f"{ef['fwd']:>6}+{ef['bwd']:<6} {ew['fwd']:>5}+{ew['bwd']:<6}  {empty:<24} {cut:<30}")
    print("\nper-step kernel CPU s (forward), window | full; '-' = no kernel call at that step:")
    for r in rows:
        print(f"  {r['layout']:<11} {_fmt_steps(res[r['layout'] + '/window'], 'forward'):<34} | "
              f"{_fmt_steps(res[r['layout'] + '/full'], 'forward')}")
    print("per-step kernel CPU s (backward), window | full:")
    for r in rows:
        print(f"  {r['layout']:<11} {_fmt_steps(res[r['layout'] + '/window'], 'backward'):<34} | "
              f"{_fmt_steps(res[r['layout'] + '/full'], 'backward')}")
    best = max(rows, key=lambda r: r["ratio"])
    print(f"best layout: {best['layout']} {best['ratio']:.2f}x (visible area {area_ratio(S, window[0]):.2f}x smaller)")
    return dict(seq=S, window=list(window), visible_area_ratio=area_ratio(S, window[0]), rows=rows,
                best=dict(layout=best["layout"], ratio=best["ratio"]))


def area_ratio(S: int, left: int) -> float:
    """Visible pairs of full causal / of causal with a window of ``left`` keys back."""
    full = S * (S + 1) // 2
    win = sum(min(i, left) + 1 for i in range(S)) if S <= 1 << 16 else S * (left + 1)
    return full / win


def part_packed(args) -> dict:
    S, P = args.seq, args.ranks
    _check_work()
    # work balance over seeds (pure arithmetic, --work-ranks ranks, --work-seq)
    Sw, Pw = args.work_seq, args.work_ranks
    seeds = list(range(args.seeds))
    work = {layout: [] for layout in LAYOUTS}
    docs_per_seed = []
    for seed in seeds:
        cu = documents(Sw, seed, sigma=args.sigma)
        docs_per_seed.append(len(cu) - 1)
        for layout in LAYOUTS:
            w = rank_work(Sw, Pw, layout, cu)
            work[layout].append(dict(seed=seed, work=w, imbalance=imbalance(w)))
    work_rows = [dict(layout=layout, median=statistics.median(x["imbalance"] for x in work[layout]),
                      worst=max(x["imbalance"] for x in work[layout]),
                      worst_seed=max(work[layout], key=lambda x: x["imbalance"])["seed"], seeds=work[layout])
                 for layout in LAYOUTS]
    print(f"\n2a. Packed documents, per-rank work (visible causal in-document pairs) max/mean over P={Pw} ranks, "
          f"S={Sw}, {len(seeds)} seeds (lognormal lengths mean S/8 sigma={args.sigma} + one of S/2; "
          f"{min(docs_per_seed)}-{max(docs_per_seed)} documents)")
    hdr = f"{'layout':<11} {'median':>8} {'worst':>8} {'worst seed':>10}  per seed"
    print(hdr)
    print("-" * (len(hdr) + 40))
    for r in work_rows:
        print(f"{r['layout']:<11} {r['median']:>8.3f} {r['worst']:>8.3f} {r['worst_seed']:>10}  "
              + " ".join(f"{x['imbalance']:.2f}" for x in r["seeds"]))

    # wall time on the ranks: documents of seed 0 vs unpacked causal
    cu = documents(S, 0, sigma=args.sigma)
    cases = [c for layout in LAYOUTS for c in ((f"{layout}/docs", layout, (-1, -1), cu),
                                                (f"{layout}/causal", layout, (-1, -1), None))]
    res = {r["name"]: r for r in run_cases(args, S, cases)}
    full_area = S * (S + 1) / 2
    doc_area = sum((b - a) * (b - a + 1) / 2 for a, b in zip(cu, cu[1:]))
    rows = []
    for layout in LAYOUTS:
        d, c = res[f"{layout}/docs"], res[f"{layout}/causal"]
        rows.append(dict(layout=layout, docs_s=statistics.median(d["times"]), causal_s=statistics.median(c["times"]),
                         docs_times=d["times"], causal_times=c["times"], ratio=_paired(c["times"], d["times"]),
                         work=rank_work(S, P, layout, cu), work_imbalance=imbalance(rank_work(S, P, layout, cu)),
                         kernel_s=dict(docs=_kernel(d), causal=_kernel(c)),
                         kernel_imbalance=imbalance(_kernel(d)),
                         exchanges=dict(docs=d["exchanges"][0], causal=c["exchanges"][0]),
                         steps=dict(docs=d["steps"], causal=c["steps"]),
                         plan=plan(S, P, layout, cu=cu)))
    print(f"\n2b. Packed-document causal attention (cu_seqlens, seed 0: {len(cu) - 1} documents, lengths "
          f"{[b - a for a, b in zip(cu, cu[1:])]}) vs unpacked causal, S={S}, H={args.heads}, D={args.dim}, fp32, "
          f"fwd+bwd, {P} gloo ranks x 1 thread, median of {args.iters} interleaved runs; visible area "
          f"{full_area / doc_area:.2f}x smaller")
    hdr = (f"{'layout':<11} {'docs s':>7} {'causal s':>8} {'causal/docs':>11} {'work max/mean':>13} "
           f"{'kernel s docs':>14} {'kernel max/mean':>15} {'no-tile (rank,step)':<20}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        empty = " ".join(f"({a},{b})" for a, b in r["plan"]["empty"]) or "none"
        print(f"{r['layout']:<11} {r['docs_s']:>7.2f} {r['causal_s']:>8.2f} {r['ratio']:>10.2f}x "
              f"{r['work_imbalance']:>13.3f} {' '.join(f'{x:.2f}' for x in r['kernel_s']['docs']):>14} "
              f"{r['kernel_imbalance']:>15.3f} {empty:<20}")
    print("\nper-step kernel CPU s (forward / backward), documents; '-' = no kernel call at that step:")
    for r in rows:
        d = res[r["layout"] + "/docs"]
        print(f"  {r['layout']:<11} fwd {_fmt_steps(d, 'forward'):<34} bwd {_fmt_steps(d, 'backward')}")
    return dict(work=dict(seq=Sw, ranks=Pw, sigma=args.sigma, seeds=seeds, documents=docs_per_seed, rows=work_rows),
                wall=dict(seq=S, cu_seqlens=cu, visible_area_ratio=full_area / doc_area, rows=rows))


# ----------------------------------------------------------------------------- figure and main

def figure(data: dict, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    x = range(len(LAYOUTS))
    a = axes[0]
    if "window" in data:
        rows = data["window"]["rows"]
        a.bar([i - 0.2 for i in x], [r["full_s"] for r in rows], 0.4, label="full causal")
        a.bar([i + 0.2 for i in x], [r["window_s"] for r in rows], 0.4, label=f"window {data['window']['window']}")
        for i, r in enumerate(rows):
            a.text(i, r["full_s"], f"{r['ratio']:.2f}x", ha="center", va="bottom", fontsize=8)
        a.set_title(f"1. sliding window, S={data['window']['seq']}", fontsize=10)
        a.legend(fontsize=8)
    a.set_xticks(list(x), LAYOUTS)
    a.set_ylabel("fwd+bwd wall s (2 ranks)")
    a = axes[1]
    if "packed" in data:
        rows = data["packed"]["work"]["rows"]
        a.bar([i - 0.2 for i in x], [r["median"] for r in rows], 0.4, label="median")
        a.bar([i + 0.2 for i in x], [r["worst"] for r in rows], 0.4, label="worst")
        a.axhline(1.05, ls="--", c="gray", lw=1)
        a.set_title(f"2a. packed docs: work max/mean, P={data['packed']['work']['ranks']}, "
                    f"{len(data['packed']['work']['seeds'])} seeds", fontsize=10)
        a.set_ylim(0.9, None)
        a.legend(fontsize=8)
        a = axes[2]
        rows = data["packed"]["wall"]["rows"]
        a.bar([i - 0.2 for i in x], [r["causal_s"] for r in rows], 0.4, label="unpacked causal")
        a.bar([i + 0.2 for i in x], [r["docs_s"] for r in rows], 0.4, label="packed documents")
        for i, r in enumerate(rows):
            a.text(i, r["causal_s"], f"{r['ratio']:.2f}x", ha="center", va="bottom", fontsize=8)
        a.set_title(f"2b. documents vs causal, S={data['packed']['wall']['seq']}", fontsize=10)
        a.set_ylabel("fwd+bwd wall s (2 ranks)")
        a.legend(fontsize=8)
    for a in axes[1:]:
        a.set_xticks(list(x), LAYOUTS)
    fig.tight_layout()
    save_figure(fig, path)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, default=16384)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--part", choices=["window", "packed", "all"], default="all")
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--sigma", type=float, default=1.0, help="lognormal sigma of the document lengths")
    ap.add_argument("--work-seq", type=int, default=16384)
    ap.add_argument("--work-ranks", type=int, default=4)
    ap.add_argument("--timeout", type=float, default=None, help="seconds per spawned world (default: from S)")
    ap.add_argument("--out", type=Path, default=RESULTS / "masks.json")
    args = ap.parse_args()
    if args.iters < 3:
        print(f"note: --iters {args.iters} < 3: medians of fewer than 3 runs")
    torch.set_num_threads(1)
    print(f"masks benchmark: part={args.part} S={args.seq} H={args.heads} D={args.dim} ranks={args.ranks} "
          f"iters={args.iters} torch={torch.__version__}")

    data = load_json(args.out) if args.part != "all" else {}
    data["meta"] = dict(ranks=args.ranks, heads=args.heads, dim=args.dim, batch=1, dtype="float32", causal=True,
                        threads_per_rank=1, iters=args.iters, torch=torch.__version__,
                        command="python benchmarks/masks.py " + " ".join(sys.argv[1:]))
    if args.part in ("window", "all"):
        data["window"] = part_window(args)
    if args.part in ("packed", "all"):
        data["packed"] = part_packed(args)
    write_json(args.out, data, indent=1)
    figure(data, args.out.with_suffix(".png"))
    print(f"\nwrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
