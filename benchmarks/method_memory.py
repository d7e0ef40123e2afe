"""Each attention method's measured working set per rank beside ``seqpar.plan``'s, the numbers ``auto`` weighs.

    OMP_NUM_THREADS=1 python benchmarks/method_memory.py        # ~3 min -> results/method_memory.json

One ``seqpar.attention`` call per method (causal forward + backward, fp32, B=1, D=64; ring and allgather
zigzag, Ulysses contiguous) on ``P`` spawned gloo ranks, for the shapes of ``--shapes`` (default: issue 18's
2 ranks, S=8192, H=Hkv=8, and 4 ranks at the same local length). Per rank, as benchmarks/million.py measures:
``mallopt(M_MMAP_THRESHOLD, 128 KiB)`` (every tensor above it its own mmap, returned when freed, so the
resident size follows the live tensors), the inputs and the output gradient made, ``malloc_trim``, then
``/proc/self/clear_refs`` reset and ``VmHWM`` read after the call: the rise, the largest rank's, the
smaller of two calls. The prediction is the plan's ``method_working`` (the method's own buffers, the
backward's peak) plus the fp32 output (which the plan counts with q, k, v in ``qkvo``). ``auto`` takes the
least-memory method among those whose predicted times are within ``seqpar.plan.TIME_RESOLUTION``: the
column ``order`` says whether the plan ranks the methods as measured.
"""

from __future__ import annotations

import argparse
import ctypes

from common import RESULTS, on_ranks, write_json

LAYOUTS = {"ring": "zigzag", "ulysses": "contiguous", "allgather": "zigzag"}
MiB = float(1 << 20)


def working_sets(rank, size, *, S: int, H: int, Hkv: int, D: int = 64) -> dict:
    """method -> (this rank's measured rise in bytes, the plan's prediction in bytes)."""
    import torch

    import seqpar
    from seqpar.plan import Machine, ModelShape, plan
    from seqpar.testing.memory import reset_peak, status, trim

    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 128 << 10)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass
    s, out = S // size, {}
    for method, layout in LAYOUTS.items():
        rises = []
        for seed in range(2):
            g = torch.Generator().manual_seed(seed)
            q, k, v = (torch.randn(1, h, s, D, generator=g).requires_grad_() for h in (H, Hkv, Hkv))
            dout = torch.randn(1, H, s, D, generator=g)
            trim()
            base = reset_peak()
            o = seqpar.attention(q, k, v, is_causal=True, method=method, layout=layout, enable_gqa=H != Hkv)
            o.backward(dout)
            rises.append(status("VmHWM") - base)
            del q, k, v, o, dout
        p = plan(ModelShape(heads=H, kv_heads=Hkv, head_dim=D), S, size, Machine(attn_flops=1e10, link_bw=1e9),
                 method=method, dtype_bytes=4)
        out[method] = (min(rises), p.memory["method_working"] + H * s * D * 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="*", default=["2:8192:8:8", "4:16384:8:8"], help="P:S:H:Hkv each")
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--json", default=str(RESULTS / "method_memory.json"))
    args = ap.parse_args()
    rows = []
    for spec in args.shapes:
        P, S, H, Hkv = (int(x) for x in spec.split(":"))
        res = on_ranks(P, working_sets, S=S, H=H, Hkv=Hkv, timeout=args.timeout)
        got = {m: (max(r[m][0] for r in res), res[0][m][1]) for m in LAYOUTS}
        measured = sorted(LAYOUTS, key=lambda m: got[m][0])
        predicted = sorted(LAYOUTS, key=lambda m: got[m][1])
        for m in LAYOUTS:
            rows.append(dict(P=P, S=S, H=H, Hkv=Hkv, method=m, measured_bytes=got[m][0], predicted_bytes=got[m][1],
                             error=got[m][1] / got[m][0] - 1, least_measured=measured[0], least_predicted=predicted[0]))
    print(f"{'P':>2} {'S':>6} {'H/Hkv':>6} {'method':>10} {'measured MiB':>13} {'plan MiB':>9} {'error':>7}  least "
          "(measured / plan)")
    for r in rows:
        print(f"{r['P']:>2} {r['S']:>6} {r['H']:>3}/{r['Hkv']:<2} {r['method']:>10} {r['measured_bytes'] / MiB:>13.1f} "
              f"{r['predicted_bytes'] / MiB:>9.1f} {r['error']:>+7.1%}  {r['least_measured']} / {r['least_predicted']}")
    write_json(args.json, dict(rows=rows, meta=dict(dtype="fp32", D=64, causal=True, threads_per_rank=1)))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
