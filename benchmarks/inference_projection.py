"""The inference projection of docs/scaling.md: prefill and decode on a sharded cache, Llama-3-8B / -70B at
128K-1M tokens on 8-128 H100s, and Llama-3-405B beside Meta's published context-parallel figures.

    python benchmarks/inference_projection.py     # prints the markdown tables, writes results/inference_projection.json

Model only (seqpar.plan_inference with seqpar.plan.H100, bf16, batch 1); nothing is run. Llama-3-8B runs pure
CP (the whole model on every GPU); -70B and -405B run CP over nodes x TP8 inside a node (Meta's setup; TP is
not seqpar's: the model counts its all-reduces), as their bf16 weights (140 GB / 810 GB) do not fit one GPU.
"""

from __future__ import annotations

import json
from pathlib import Path

from seqpar.plan import H100
from seqpar.plan_inference import LLAMA3_70B, LLAMA3_405B, decode_plan, prefill_plan
from seqpar.plan_memory import model_shape

RESULTS = Path(__file__).resolve().parent / "results"
CONTEXTS = [131072, 262144, 524288, 1048576]
GPUS = [8, 16, 32, 64, 128]


def kv_bytes_per_token(m, e=2) -> int:
    return m.layers * 2 * m.kv_heads * m.head_dim * e


def rows():
    out = []
    for name, model, tp in (("Llama-3-8B", model_shape("llama-3-8b"), 1), ("Llama-3-70B", LLAMA3_70B, 8)):
        weights = model.param_count() * 2 / tp
        for S in CONTEXTS:
            base = None
            for g in GPUS:
                P = g // tp
                pre = prefill_plan(model, S, P, H100, tp=tp)
                dec = decode_plan(model, S, P, H100, tp=tp)
                base = base or (g, pre.time)
                cache = kv_bytes_per_token(model) * S / P / tp
                out.append(dict(model=name, context=S, gpus=g, cp=P, tp=tp, prefill_s=pre.time,
                                efficiency=base[1] * base[0] / (pre.time * g), decode_ms=dec.time * 1e3,
                                merge=dec.merge, weights_gb=weights / 1e9, cache_gb=cache / 1e9,
                                fits=(weights + cache) < 80e9))
    return out


def meta_rows():
    """Llama-3-405B (126 layers, 128 / 8 heads), CP x TP8 on H100 nodes of 8 (Meta: FP8 row-wise FFN weights,
    400 Gb/s RDMA per GPU), beside Yang et al., "Context Parallelism for Scalable Million-Token Inference"
    (arXiv 2411.01783): their published measurements."""
    m = LLAMA3_405B
    r = []

    def pre(S, nodes, **kw):
        return prefill_plan(m, S, nodes, H100, tp=8, **kw).time

    r.append(("full prefill 1M, 16 nodes (CP16 x TP8)", "77 s", f"{pre(1 << 20, 16):.1f} s"))
    r.append(("full prefill 1M, 1 node (TP8)", "~1200 s (their introduction)", f"{pre(1 << 20, 1):.0f} s"))
    eff = pre(1 << 20, 1) / (16 * pre(1 << 20, 16))
    r.append(("parallel efficiency 1M, 16 nodes vs 1", "93%", f"{100 * eff:.0f}%"))
    r.append(("full prefill 128K, 16 nodes", "3.8 s", f"{pre(128000, 16):.2f} s"))
    r.append(("full prefill 128K, 8 nodes", "5.85 s", f"{pre(128000, 8):.2f} s"))
    for T, kv, q in ((3200, 1110, 1046), (6400, 1305, 1302), (12800, 2081, 2205)):
        ours_kv = pre(T, 4, cached=128000 - T, mode="pass_kv") * 1e3
        ours_q = pre(T, 4, cached=128000 - T, mode="pass_q") * 1e3
        r.append((f"128K, {T} new tokens ({100 * T / 128000:.1f}% miss), 4 nodes: pass-KV / pass-Q",
                  f"{kv} / {q} ms", f"{ours_kv:.0f} / {ours_q:.0f} ms"))
    for nodes, ttit in ((1, 46.26), (2, 60.23), (4, 71.31)):
        d = decode_plan(m, 128000, nodes, H100, tp=8, weight_bytes=1).time * 1e3
        r.append((f"decode per token, 128K, {nodes} node(s)", f"{ttit} ms", f"{d:.1f} ms"))
    return r


def main() -> None:
    table = rows()
    print("| model | context | H100s | CP x TP | prefill (s) | efficiency | decode (ms/token) | merge | weights + "
          "cache per GPU (GB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in table:
        fit = "" if r["fits"] else " ✗"
        print(f"| {r['model']} | {r['context'] // 1024}K | {r['gpus']} | {r['cp']} x {r['tp']} | {r['prefill_s']:.2f} | "
              f"{100 * r['efficiency']:.0f}% | {r['decode_ms']:.2f} | {r['merge']} | "
              f"{r['weights_gb']:.1f} + {r['cache_gb']:.1f}{fit} |")
    print()
    print("| Llama-3-405B | Meta (measured) | seqpar.plan_inference |")
    print("|---|---|---|")
    meta = meta_rows()
    for what, theirs, ours in meta:
        print(f"| {what} | {theirs} | {ours} |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "inference_projection.json").write_text(json.dumps(
        {"machine": "seqpar.plan.H100", "rows": table,
         "meta": [dict(what=w, meta=t, model=o) for w, t, o in meta]}, indent=1))


if __name__ == "__main__":
    main()
