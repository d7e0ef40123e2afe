"""Block-attention kernels: TFLOP/s of forward, backward and both, against torch SDPA.

    python benchmarks/kernels.py                         # CPU: aten vs reference vs SDPA, small sizes, fp32
    python benchmarks/kernels.py --device cuda           # GPU: triton vs SDPA-flash, S 4k..128k, D 64/128, bf16
    python benchmarks/kernels.py --device cuda --quick   # GPU subset: D=128, S 4k/16k/64k (gpu_check.sh)
    python benchmarks/kernels.py --device cuda --million # 1M-token causal fwd+bwd, 8 q heads / 1 kv head, D=128
    python benchmarks/kernels.py --masked                # CPU masked tiles: aten band / documents vs dense causal

Every row runs in the same invocation (these machines are shared; compare ratios side by side).
FLOPs: forward 4 * B * H * Sq * Sk * D (halved when causal), backward 2.5x forward, both 3.5x.
Also: the accumulating forward (merge inside the kernel) vs forward + a separate merge pass.
Writes a table to stdout, JSON and a PNG to benchmarks/results/kernels_<device>.{json,png}.

``--masked`` ("CPU masked tiles"): GFLOP/s on the *visible* area (4 B H D x visible pairs forward, 2.5x
backward) of aten tiles with a TileMask (a causal sliding window of S/8, causal packed documents, packed
documents without causality) next to a dense causal tile of the same size, in one run; the target is
>= 0.8x the dense causal tile. Writes benchmarks/results/kernels_masked.{json,md,png}.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Callable, Literal

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import RESULTS, inputs, pyplot, save_figure, time_median, write_json  # noqa: E402

from seqpar.kernels import (  # noqa: E402
    TileMask,
    block_attention,
    block_attention_accumulate,
    block_attention_backward,
    merge_partial,
)

Mode = Literal["fwd", "bwd", "both"]
MODES: tuple[Mode, ...] = ("fwd", "bwd", "both")


def flops(B: int, H: int, Sq: int, Sk: int, D: int, causal: bool, mode: Mode) -> float:
    f = 4.0 * B * H * Sq * Sk * D * (0.5 if causal else 1.0)
    return f * {"fwd": 1.0, "bwd": 2.5, "both": 3.5}[mode]


def _timer(device: str) -> Callable[[Callable[[], object]], float]:
    """-> a function timing a callable, in seconds (median)."""
    if device == "cuda":
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100) * 1e-3

    return lambda fn: time_median(fn, 3)


def bench_kernel_backend(backend, q, k, v, do, causal, timer) -> dict[str, float]:
    """seqpar's block_attention (+ backward against its own out/lse): seconds per mode. ``causal``: a bool
    (causal or full) or a TileMask."""
    mask = causal if isinstance(causal, TileMask) else "causal" if causal else "full"
    scale = q.shape[-1] ** -0.5
    fwd = lambda: block_attention(q, k, v, mask=mask, scale=scale, backend=backend)  # noqa: E731
    out, lse = fwd()
    out = out.to(q.dtype)
    bwd = lambda: block_attention_backward(do, q, k, v, out, lse, mask=mask, scale=scale, backend=backend)  # noqa: E731
    t_f, t_b = timer(fwd), timer(bwd)
    return {"fwd": t_f, "bwd": t_b, "both": t_f + t_b}


def bench_sdpa(q, k, v, do, causal, timer, flash: bool) -> dict[str, float]:
    """torch SDPA (the flash kernel on CUDA when ``flash``); backward through autograd."""
    from contextlib import nullcontext

    from torch.nn.attention import SDPBackend, sdpa_kernel

    ctx = (lambda: sdpa_kernel(SDPBackend.FLASH_ATTENTION)) if flash else nullcontext
    qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
    gqa = q.shape[1] != k.shape[1]

    def fwd():
        with ctx():
            return F.scaled_dot_product_attention(qq, kk, vv, is_causal=causal, enable_gqa=gqa)

    out = fwd()

    def bwd():
        qq.grad = kk.grad = vv.grad = None
        out.backward(do, retain_graph=True)

    def both():
        qq.grad = kk.grad = vv.grad = None
        fwd().backward(do)

    with torch.no_grad():
        t_f = timer(fwd)
    return {"fwd": t_f, "bwd": timer(bwd), "both": timer(both)}


def bench_accumulate(backend, B, H, S, D, dtype, device, timer) -> dict[str, float]:
    """One ring step's tile merged into a running fp32 state: in-kernel vs forward + separate merge."""
    q, k, v, _ = inputs(B, H, H, S, D, dtype=dtype, device=device, seed=1)
    scale = D ** -0.5
    out0, lse0 = block_attention(q, k, v, mask="causal", scale=scale, backend=backend)
    out0, lse0 = out0.float(), lse0.float()
    o, l = out0.clone(), lse0.clone()

    def fused():
        block_attention_accumulate(q, k, v, o, l, mask="full", scale=scale, backend=backend)

    def separate():
        bo, bl = block_attention(q, k, v, mask="full", scale=scale, backend=backend)
        merge_partial(o, l, bo, bl)

    def merge_only():
        merge_partial(o, l, out0, lse0)

    return {"accumulate": timer(fused), "separate": timer(separate), "merge_only": timer(merge_only)}


def run_sweep(device: str, quick: bool) -> dict:
    timer = _timer(device)
    rows = []
    if device == "cuda":
        dtype, providers = torch.bfloat16, ("triton", "sdpa-flash")
        seqs = (4096, 16384, 65536) if quick else (4096, 8192, 16384, 32768, 65536, 131072)
        dims = (128,) if quick else (64, 128)
        shape = lambda S, D: (max(1, 32768 // S), 2048 // D)  # noqa: E731  (B, H): 32k tokens x 2048 model dim
    else:
        dtype, providers = torch.float32, ("aten", "reference", "sdpa")
        seqs = (256, 512, 1024) if quick else (256, 512, 1024, 2048)
        dims = (64,)
        shape = lambda S, D: (1, 4)  # noqa: E731
    for D in dims:
        for causal in (False, True):
            for S in seqs:
                B, H = shape(S, D)
                q, k, v, do = inputs(B, H, H, S, D, dtype=dtype, device=device)
                for prov in providers:
                    if prov == "reference" and S > 2048:
                        continue
                    if prov.startswith("sdpa"):
                        t = bench_sdpa(q, k, v, do, causal, timer, flash=prov == "sdpa-flash")
                    else:
                        t = bench_kernel_backend(prov, q, k, v, do, causal, timer)
                    for mode in MODES:
                        rows.append(dict(provider=prov, B=B, H=H, S=S, D=D, causal=causal, mode=mode,
                                         seconds=t[mode], tflops=flops(B, H, S, S, D, causal, mode) / t[mode] / 1e12))
                    print(_fmt_row(rows[-3:]), flush=True)
                del q, k, v, do
                if device == "cuda":
                    torch.cuda.empty_cache()
    acc = []
    acc_backends = ("triton",) if device == "cuda" else ("aten",)
    acc_sizes = ((1, 16, 4096, 128), (1, 16, 16384, 128)) if device == "cuda" else ((1, 4, 512, 64), (1, 4, 1024, 64))
    for backend in acc_backends:
        for B, H, S, D in acc_sizes:
            t = bench_accumulate(backend, B, H, S, D, dtype, device, timer)
            acc.append(dict(backend=backend, B=B, H=H, S=S, D=D, **t))
            print(_fmt_acc(acc[-1]), flush=True)
    return dict(kind=device, device=_device_name(device), dtype=str(dtype), rows=rows, accumulate=acc)


def run_million(S: int = 1 << 20, Hq: int = 8, Hkv: int = 1, D: int = 128) -> dict:
    """Causal fwd+bwd of one layer's attention at S tokens on one GPU with the triton backend; peak
    memory at S and at S/4 (bytes per token equal -> memory O(S), no S x S matrix)."""
    timer = _timer("cuda")
    res = {}
    # tune on a 32k problem first: the autotune key caps sequence length at 32k, so the big runs reuse it
    q, k, v, do = inputs(1, Hq, Hkv, 32768, D, dtype=torch.bfloat16, device="cuda")
    bench_kernel_backend("triton", q, k, v, do, True, timer)
    del q, k, v, do
    for s in (S // 4, S):
        torch.cuda.empty_cache()
        q, k, v, do = inputs(1, Hq, Hkv, s, D, dtype=torch.bfloat16, device="cuda")
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out, lse = block_attention(q, k, v, mask="causal", scale=D ** -0.5, backend="triton")
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        dq, dk, dv = block_attention_backward(do, q, k, v, out.to(q.dtype), lse, mask="causal", scale=D ** -0.5,
                                              backend="triton")
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        peak = torch.cuda.max_memory_allocated() - base
        ok = bool(torch.isfinite(out).all() and torch.isfinite(dq).all() and torch.isfinite(dk).all())
        res[s] = dict(S=s, Hq=Hq, Hkv=Hkv, D=D, fwd_s=t1 - t0, bwd_s=t2 - t1,
                      fwd_tflops=flops(1, Hq, s, s, D, True, "fwd") / (t1 - t0) / 1e12,
                      bwd_tflops=flops(1, Hq, s, s, D, True, "bwd") / (t2 - t1) / 1e12,
                      peak_extra_gib=peak / 2**30, bytes_per_token=peak / s, finite=ok,
                      scores_matrix_gib=Hq * s * s * 2 / 2**30)
        print(f"S={s}: fwd {t1 - t0:.2f}s ({res[s]['fwd_tflops']:.0f} TFLOP/s), bwd {t2 - t1:.2f}s "
              f"({res[s]['bwd_tflops']:.0f} TFLOP/s), peak above inputs {peak / 2**30:.2f} GiB = "
              f"{peak / s:.0f} B/token (an S x S bf16 score matrix would be {res[s]['scores_matrix_gib']:.0f} GiB), "
              f"finite={ok}", flush=True)
        del q, k, v, do, out, lse, dq, dk, dv
    small, big = res[S // 4], res[S]
    ratio = big["bytes_per_token"] / small["bytes_per_token"]
    print(f"bytes/token at S={S} vs S={S // 4}: ratio {ratio:.3f} (1.0 = linear memory)")
    return dict(runs=list(res.values()), bytes_per_token_ratio=ratio)


def masked_tiles(S: int) -> dict[str, TileMask]:
    """The masked tiles of the CPU benchmark at size S x S (documents: 4 of lengths 4:3:2:1)."""
    cuts = [0, 4 * S // 10, 7 * S // 10, 9 * S // 10, S]
    segs = tuple((a, b, d) for d, (a, b) in enumerate(zip(cuts, cuts[1:])))
    return {"dense causal": TileMask("causal"),
            "band causal (window S/8)": TileMask("causal", lo=-(S // 8 - 1)),
            "docs causal (4 docs)": TileMask("causal", docs=(segs, segs)),
            "docs full (4 docs)": TileMask("full", docs=(segs, segs))}


def run_masked(seqs=(2048, 4096), B: int = 1, H: int = 4, D: int = 64, reps: int = 5) -> dict:
    """aten on masked tiles vs the dense causal tile, GFLOP/s on the visible pairs (fp32, CPU). The tiles
    of one S are timed interleaved (rep 1 of every tile, then rep 2, ...) and the minimum is kept: the
    machine is shared, and interleaving spreads its load over every tile alike."""
    from seqpar.kernels.backend import split_mask, visible_rows

    rows = []
    for S in seqs:
        q, k, v, do = inputs(B, H, H, S, D)
        scale = D ** -0.5
        tiles = masked_tiles(S)
        calls, seconds = {}, {}
        for name, mask in tiles.items():
            out, lse = block_attention(q, k, v, mask=mask, scale=scale, backend="aten")
            out = out.to(q.dtype)
            args = (q, k, v)
            calls[name] = {
                "fwd": lambda m=mask, a=args: block_attention(*a, mask=m, scale=scale, backend="aten"),
                "bwd": lambda m=mask, a=args, g=do, o=out, l=lse: block_attention_backward(g, *a, o, l, mask=m,
                                                                                         scale=scale, backend="aten")}
            seconds[name] = {"fwd": [], "bwd": []}
        for _ in range(reps):
            for name in tiles:
                for m in ("fwd", "bwd"):
                    t0 = time.perf_counter()
                    calls[name][m]()
                    seconds[name][m].append(time.perf_counter() - t0)
        base = None
        for name, mask in tiles.items():
            vis = visible_rows(mask, 0, S, S, "cpu")
            visible = S * S if vis is None else int(vis.sum())
            t = {m: min(seconds[name][m]) for m in ("fwd", "bwd")}
            t["both"] = t["fwd"] + t["bwd"]
            pieces = 1 if mask.plain else len(split_mask(mask, S, S, *_aten_split(mask)))
            row = dict(tile=name, S=S, B=B, H=H, D=D, visible=visible, pieces=pieces,
                       **{f"{m}_s": t[m] for m in MODES},
                       **{f"{m}_gflops": 4.0 * B * H * D * visible * {"fwd": 1.0, "bwd": 2.5, "both": 3.5}[m]
                          / t[m] / 1e9 for m in MODES})
            if base is None:
                base = row
            for m in MODES:
                row[f"{m}_vs_dense"] = row[f"{m}_gflops"] / base[f"{m}_gflops"]
            rows.append(row)
            print(_fmt_masked(row), flush=True)
        del q, k, v, do
    return dict(kind="cpu", device=_device_name("cpu"), dtype="torch.float32", backend="aten", reps=reps, rows=rows)


def _aten_split(mask):
    from seqpar.kernels.aten import split_params

    return split_params(mask, torch.device("cpu"))


def _fmt_masked(r: dict) -> str:
    return (f"{r['tile']:>26} S={r['S']:<5} visible={r['visible']:>9} pieces={r['pieces']:<4} "
            + "  ".join(f"{m} {r[m + '_s'] * 1e3:8.1f} ms {r[m + '_gflops']:6.1f} GF/s ({r[m + '_vs_dense']:.2f}x)"
                        for m in MODES))


def masked_table(res: dict) -> str:
    head = ("| tile | S | visible pairs | pieces | " + " | ".join(f"{m} GFLOP/s" for m in MODES) + " | "
            + " | ".join(f"{m} vs dense causal" for m in MODES) + " |")
    lines = [head, "|" + "---|" * (4 + 2 * len(MODES))]
    for r in res["rows"]:
        lines.append(f"| {r['tile']} | {r['S']} | {r['visible']} | {r['pieces']} | "
                     + " | ".join(f"{r[m + '_gflops']:.1f}" for m in MODES) + " | "
                     + " | ".join(f"{r[m + '_vs_dense']:.2f}x" for m in MODES) + " |")
    lines.append(f"\nGFLOP/s on the visible pairs; aten backend, B=1, H=4, D=64, {res['device']}, {res['dtype']}.")
    return "\n".join(lines)


def plot_masked(res: dict, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    rows = res["rows"]
    fig, axes = plt.subplots(1, len(MODES), figsize=(4.5 * len(MODES), 3.2), squeeze=False)
    for i, m in enumerate(MODES):
        ax = axes[0][i]
        for tile in dict.fromkeys(r["tile"] for r in rows):
            pts = [(r["S"], r[f"{m}_gflops"]) for r in rows if r["tile"] == tile]
            ax.plot(*zip(*pts), marker="o", label=tile)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{m}: GFLOP/s on visible pairs", fontsize=9)
        ax.set_xlabel("S")
        ax.legend(fontsize=7)
    fig.suptitle(f"aten masked tiles, {res['device']}, {res['dtype']}", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    import platform

    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def _fmt_row(rows: list[dict]) -> str:
    r = rows[0]
    t = {x["mode"]: x for x in rows}
    return (f"{r['provider']:>11} D={r['D']:<3} causal={int(r['causal'])} S={r['S']:<6} B={r['B']:<2} H={r['H']:<2} "
            + "  ".join(f"{m} {t[m]['seconds'] * 1e3:9.2f} ms {t[m]['tflops']:8.3f} TF/s" for m in MODES))


def table(res: dict) -> str:
    """Markdown: one line per (D, causal, S), TFLOP/s of each provider per mode."""
    rows = res["rows"]
    provs = list(dict.fromkeys(r["provider"] for r in rows))
    ours, theirs = provs[0], provs[-1]  # triton / aten vs torch SDPA
    head = ("| D | causal | S | " + " | ".join(f"{p} {m}" for m in MODES for p in provs) + " | "
            + " | ".join(f"{ours}/{theirs} {m}" for m in MODES) + " |")
    lines = [head, "|" + "---|" * (3 + len(MODES) * (len(provs) + 1))]
    keys = list(dict.fromkeys((r["D"], r["causal"], r["S"]) for r in rows))
    gpu = res["kind"] == "cuda"
    for D, causal, S in keys:
        cells = []
        for m in MODES:
            for p in provs:
                hit = [r for r in rows if (r["D"], r["causal"], r["S"], r["provider"], r["mode"]) == (D, causal, S, p, m)]
                cells.append(f"{hit[0]['tflops'] * (1 if gpu else 1e3):.1f}" if hit else "-")
        for m in MODES:
            a, b = (next((r["tflops"] for r in rows if (r["D"], r["causal"], r["S"], r["provider"], r["mode"]) ==
                          (D, causal, S, p, m)), None) for p in (ours, theirs))
            cells.append(f"{a / b:.2f}x" if a and b else "-")
        lines.append(f"| {D} | {int(causal)} | {S} | " + " | ".join(cells) + " |")
    what = "TFLOP/s" if gpu else "GFLOP/s"
    lines.append(f"\n{what}; {res['device']}, {res['dtype']}.")
    lines += [_fmt_acc(a) for a in res.get("accumulate", [])]
    return "\n".join(lines)


def _fmt_acc(a: dict) -> str:
    how = "in-kernel merge" if a["backend"] == "triton" else "fallback: forward + merge"
    return (f"accumulate ({a['backend']}, B={a['B']} H={a['H']} S={a['S']} D={a['D']}): block_attention_accumulate "
            f"({how}) {a['accumulate'] * 1e3:.3f} ms vs block_attention + merge_partial {a['separate'] * 1e3:.3f} ms "
            f"(the merge pass alone {a['merge_only'] * 1e3:.3f} ms)")


def plot(res: dict, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    rows = res["rows"]
    groups = list(dict.fromkeys((r["D"], r["causal"]) for r in rows))
    fig, axes = plt.subplots(len(MODES), len(groups), figsize=(4 * len(groups), 3 * len(MODES)), squeeze=False)
    for j, (D, causal) in enumerate(groups):
        for i, m in enumerate(MODES):
            ax = axes[i][j]
            for p in dict.fromkeys(r["provider"] for r in rows):
                pts = [(r["S"], r["tflops"] * (1 if res["kind"] == "cuda" else 1e3)) for r in rows if (r["D"], r["causal"], r["mode"], r["provider"]) ==
                       (D, causal, m, p)]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=p)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{m}, D={D}, {'causal' if causal else 'full'}", fontsize=9)
            ax.set_xlabel("S")
            ax.set_ylabel("TFLOP/s" if res["kind"] == "cuda" else "GFLOP/s")
            ax.legend(fontsize=7)
    fig.suptitle(f"block attention, {res['device']}, {res['dtype']}", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="fewer sequence lengths")
    ap.add_argument("--million", action="store_true", help="only the 1M-token causal fwd+bwd memory check (CUDA)")
    ap.add_argument("--masked", action="store_true", help="only the CPU masked tiles (aten) vs dense causal")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    args.out.mkdir(parents=True, exist_ok=True)
    if args.masked:
        res = run_masked()
        print()
        print(masked_table(res))
        write_json(args.out / "kernels_masked.json", res)
        (args.out / "kernels_masked.md").write_text(masked_table(res) + "\n")
        plot_masked(res, args.out / "kernels_masked.png")
        print(f"\nwrote {args.out / 'kernels_masked.json'}, .md and .png")
        return
    if args.million:
        if args.device != "cuda":
            raise SystemExit("--million needs --device cuda")
        res = run_million()
        write_json(args.out / "kernels_million.json", res)
        return
    res = run_sweep(args.device, args.quick)
    print()
    print(table(res))
    write_json(args.out / f"kernels_{args.device}.json", res)
    plot(res, args.out / f"kernels_{args.device}.png")
    print(f"\nwrote {args.out / f'kernels_{args.device}.json'} and .png")


if __name__ == "__main__":
    main()
