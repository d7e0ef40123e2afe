"""Prefill time and per-token decode latency of generate on a sharded sequence, on 1, 2 and 4 CPU ranks.

    OMP_NUM_THREADS=1 python benchmarks/generate.py                       # S = 2048 and 4096, 16 new tokens
    OMP_NUM_THREADS=1 python benchmarks/generate.py --seq 1024 --new 8    # quicker
    python benchmarks/generate.py --report                                # table and plot from the JSON
    OMP_NUM_THREADS=1 python benchmarks/generate.py --check               # issue 20's exactness run (below)

``--chunks``: a chunk of 4..1024 tokens on a warm cache of 2048 on 4 ranks by pass-Q and by pass-KV (median
of 3), beside ``chunk="auto"``'s choice with ``seqpar.plan_inference.CPU``; results/generate_chunks.json.

``--check``: greedy ``generate`` of 64 new tokens after a prompt of 2,000-4,000 tokens on 4 gloo ranks vs
single-process ``generate`` (fp32) for tiny random-init Llama, Qwen2 (sliding window 64), Gemma 2 (window +
soft-caps) and gpt-oss (sinks + window + MoE): the token ids (equal or not) and the worst per-step logits
error; results/generate_check.json.

The model: transformers' ``LlamaForCausalLM`` from a config (random init; vocab 32000, hidden 256,
2 layers, 8 query heads of 32, 2 kv heads, MLP 1024, fp32) under ``seqpar.parallelize`` (zigzag ring,
``fsdp=False``) on P spawned gloo ranks (``seqpar.testing.worlds.World``). Per (P, S): one prompt of S
random tokens, the same on every rank; the prefill is ``model(input_ids=prompt, cache=SeqparCache)``
(the prompt sharded, the ring, the cache filled), then ``--new`` greedy decode forwards of one token
each on the cache; a first warm-up run of 64 tokens is not timed. Times are rank 0's wall clock
(every rank waits in the same collectives), the decode latency the median over the new tokens. The
ids of the P-rank run are checked equal to the 1-rank run's (the same greedy tokens).

Results: benchmarks/results/generate.json and .png, and the table printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _model():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1 << 16)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg).eval()


def run(rank, size, *, seqs, new):
    """On every rank: [(S, prefill s, decode s per token (median), the generated ids)] (rank 0's clock)."""
    import torch

    import seqpar
    from seqpar.inference import SeqparCache

    mesh = seqpar.init_mesh(cp=size)
    model = seqpar.parallelize(_model(), mesh, layout="zigzag", fsdp=False)
    out = []
    for S in [64, *seqs]:
        ids = torch.randint(1, 32000, (1, S), generator=torch.Generator().manual_seed(S))
        cache = SeqparCache(mesh["cp"], "zigzag")
        with torch.no_grad():
            t0 = time.perf_counter()
            logits = model(input_ids=ids, cache=cache).logits
            prefill = time.perf_counter() - t0
            tokens, times = [], []
            for _ in range(new):
                nxt = logits[:, -1].argmax(-1, keepdim=True)
                tokens.append(int(nxt))
                t0 = time.perf_counter()
                logits = model(input_ids=nxt, cache=cache).logits
                times.append(time.perf_counter() - t0)
        if S != 64:
            out.append((S, prefill, statistics.median(times), tokens))
    return out


# the --check models: tiny random-init configs (fp32), positions long enough for the prompt + 64 tokens
CHECK = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2_window": ("Qwen2Config", "Qwen2ForCausalLM", dict(use_sliding_window=True, sliding_window=64,
                                                            max_window_layers=0)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(sliding_window=64, head_dim=8, query_pre_attn_scalar=8,
                                                         attn_logit_softcapping=20.0, final_logit_softcapping=15.0)),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", dict(head_dim=8, sliding_window=64, num_local_experts=4,
                                                          num_experts_per_tok=2)),
}
CHECK_PROMPTS = {"llama": 4000, "qwen2_window": 3001, "gemma2": 2500, "gpt_oss": 2047}


def _check_model(name: str):
    import torch
    import transformers

    cfg_cls, model_cls, over = CHECK[name]
    torch.manual_seed(0)
    cfg = getattr(transformers, cfg_cls)(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                                         **over)
    cfg._attn_implementation = "eager" if name in ("gemma2", "gpt_oss") else "sdpa"
    model = getattr(transformers, model_cls)(cfg).eval()
    with torch.no_grad():  # spread the logits out (no near-ties between tokens)
        for n, p in model.named_parameters():
            if p.ndim > 1 or "sinks" in n:
                p.mul_(3.0)
    return model


def check(rank, size, *, new=64):
    """On every rank, per family: (name, prompt length, ids equal single-process, ids equal on every rank,
    worst per-step logits max-abs error relative to the largest logit, seconds)."""
    import copy

    import torch
    import torch.distributed as dist

    import seqpar

    mesh = seqpar.init_mesh(cp=size)
    out = []
    for name, S in CHECK_PROMPTS.items():
        ref = _check_model(name)
        model = seqpar.parallelize(copy.deepcopy(ref), mesh, layout="zigzag", fsdp=False)
        ids = torch.randint(1, 256, (1, S), generator=torch.Generator().manual_seed(S))
        kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, return_dict_in_generate=True,
                  output_logits=True, pad_token_id=0)
        with torch.no_grad():
            want = ref.generate(input_ids=ids, **kw) if rank == 0 else None
            t0 = time.perf_counter()
            got = model.generate(input_ids=ids, **kw)
            took = time.perf_counter() - t0
        if rank == 0:
            ref_ids = want.sequences
            rel = max(((g.double() - w.double()).abs().max() / w.double().abs().max()).item()
                      for g, w in zip(got.logits, want.logits))
        else:
            ref_ids, rel = torch.zeros_like(got.sequences), 0.0
        dist.broadcast(ref_ids, group=mesh["cp"].get_group(), group_src=0)
        rows = [torch.empty_like(got.sequences) for _ in range(size)]
        dist.all_gather(rows, got.sequences, group=mesh["cp"].get_group())
        out.append((name, S, bool(torch.equal(got.sequences, ref_ids)), all(torch.equal(r, rows[0]) for r in rows),
                    rel, took))
    return out


def chunks(rank, size, *, cached, lengths, reps=3):
    """On every rank: [(T, pass-Q s, pass-KV s, auto's choice)]: a chunk of T tokens on a cache of ``cached``
    (the median of ``reps`` runs, each on a fresh copy of the same warm cache: one prefill, then the chunk)."""
    import torch

    import seqpar
    from seqpar.inference import SeqparCache
    from seqpar.plan_inference import CPU, choose_chunk, shape_of

    mesh = seqpar.init_mesh(cp=size)
    model = seqpar.parallelize(_model(), mesh, layout="zigzag", fsdp=False)
    ids = torch.randint(1, 32000, (1, cached + max(lengths)), generator=torch.Generator().manual_seed(1))
    out = []
    for T in lengths:
        times = {}
        for mode in ("pass_q", "pass_kv"):
            runs = []
            for _ in range(reps):
                cache = SeqparCache(mesh["cp"], "zigzag", chunk=mode)
                with torch.no_grad():
                    model(input_ids=ids[:, :cached], cache=cache)
                    t0 = time.perf_counter()
                    model(input_ids=ids[:, cached:cached + T], cache=cache)
                    runs.append(time.perf_counter() - t0)
            times[mode] = statistics.median(runs)
        out.append((T, times["pass_q"], times["pass_kv"], choose_chunk(shape_of(model), T, cached, size, CPU)))
    return out


def report(rows: list[dict]) -> None:
    print(f"{'ranks':>5} {'S':>6} {'prefill s':>10} {'decode ms/token':>16} {'same ids as 1 rank':>19}")
    for r in rows:
        print(f"{r['ranks']:>5} {r['seq']:>6} {r['prefill_s']:>10.3f} {1e3 * r['decode_s']:>16.2f} "
              f"{str(r['same_ids']):>19}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for S in sorted({r["seq"] for r in rows}):
        sel = sorted((r for r in rows if r["seq"] == S), key=lambda r: r["ranks"])
        axes[0].plot([r["ranks"] for r in sel], [r["prefill_s"] for r in sel], "o-", label=f"S={S}")
        axes[1].plot([r["ranks"] for r in sel], [1e3 * r["decode_s"] for r in sel], "o-", label=f"S={S}")
    axes[0].set(xlabel="CPU ranks", ylabel="prefill (s)", title="prefill (ring)")
    axes[1].set(xlabel="CPU ranks", ylabel="decode (ms / token)", title="decode on the sharded cache")
    for ax in axes:
        ax.legend()
        ax.set_xticks([1, 2, 4])
    fig.tight_layout()
    fig.savefig(RESULTS / "generate.png", dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--check", action="store_true", help="issue 20's exactness run on 4 ranks (see the docstring)")
    ap.add_argument("--chunks", action="store_true", help="pass-Q vs pass-KV for chunks on a warm cache, 4 ranks")
    a = ap.parse_args()
    path = RESULTS / "generate.json"
    if a.report:
        report(json.loads(path.read_text())["rows"])
        return
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from seqpar.testing.worlds import World

    if a.chunks:
        w = World(4)
        try:
            res = w.run(chunks, cached=2048, lengths=[4, 16, 64, 256, 1024], timeout=3600)[0]
        finally:
            w.close()
        rows = [dict(ranks=4, cached=2048, new=T, pass_q_s=q, pass_kv_s=kv, faster="pass_q" if q < kv else "pass_kv",
                     auto=auto) for T, q, kv, auto in res]
        for r in rows:
            print(r, flush=True)
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "generate_chunks.json").write_text(json.dumps({"rows": rows}, indent=1))
        return
    if a.check:
        w = World(4)
        try:
            res = w.run(check, timeout=3600)
        finally:
            w.close()
        rows = [dict(model=n, prompt=S, new=64, ranks=4, same_ids_as_single_process=same, same_on_every_rank=every,
                     worst_step_logits_rel=rel, seconds=took) for n, S, same, every, rel, took in res[0]]
        for r in rows:
            print(r, flush=True)
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "generate_check.json").write_text(json.dumps({"rows": rows}, indent=1))
        return

    rows, first = [], {}
    for P in a.ranks:
        w = World(P)
        try:
            res = w.run(run, seqs=a.seq, new=a.new, timeout=3600)[0]
        finally:
            w.close()
        for S, prefill, decode, tokens in res:
            first.setdefault(S, tokens)
            rows.append(dict(ranks=P, seq=S, prefill_s=prefill, decode_s=decode, new=a.new,
                             same_ids=tokens == first[S]))
            print(rows[-1], flush=True)
    RESULTS.mkdir(exist_ok=True)
    path.write_text(json.dumps({"model": "Llama hidden 256, 2 layers, 8 heads / 2 kv, vocab 32000, fp32",
                                "rows": rows}, indent=1))
    report(rows)


if __name__ == "__main__":
    main()
