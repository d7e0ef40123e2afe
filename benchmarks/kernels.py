"""Block-attention kernels: TFLOP/s of forward, backward and both, against torch SDPA.

    python benchmarks/kernels.py                         # CPU: aten vs reference vs SDPA, small sizes, fp32
    python benchmarks/kernels.py --device cuda           # GPU: triton vs SDPA-flash, S 4k..128k, D 64/128, bf16
    python benchmarks/kernels.py --device cuda --quick   # GPU subset: D=128, S 4k/16k/64k (gpu_check.sh)
    python benchmarks/kernels.py --device cuda --million # 1M-token causal fwd+bwd, 8 q heads / 1 kv head, D=128

Every row runs in the same invocation (these machines are shared; compare ratios side by side).
FLOPs: forward 4 * B * H * Sq * Sk * D (halved when causal), backward 2.5x forward, both 3.5x.
Also: the accumulating forward (merge inside the kernel) vs forward + a separate merge pass.
Writes a table to stdout, JSON and a PNG to benchmarks/results/kernels_<device>.{json,png}.
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
    """seqpar's block_attention (+ backward against its own out/lse): seconds per mode."""
    mask = "causal" if causal else "full"
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
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    args.out.mkdir(parents=True, exist_ok=True)
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
