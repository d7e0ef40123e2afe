"""The memory model (seqpar.plan_memory) against measured per-rank peaks of one training step, CPU ranks.

    python benchmarks/memory.py                 # every configuration -> table, results/memory.json, memory.png
    python benchmarks/memory.py --only A-cp2    # configurations whose name starts with that

Each configuration trains a Llama-shaped Hugging Face model (transformers' LlamaForCausalLM, fp32,
vocab 32000) under ``seqpar.parallelize`` (FSDP2 over dp x cp, zigzag ring) on spawned gloo ranks
(1 thread each; at most 4). Per rank, one step is measured in three phases (forward, backward,
AdamW step): before each phase ``/proc/self/clear_refs`` is written with 5, which resets the
process's high-water mark ``VmHWM`` to the current resident size; after it ``VmHWM`` is read. The
step's peak is the largest phase's; the number reported is that peak minus the **baseline**: the
resident size just before the step, after a warm-up step on a short sequence (so the one-time
allocations of the first step, gloo's buffers, autograd's threads and seqpar's agreement caches, are
not counted; AdamW's states, whose size does not depend on the sequence, are created there as in any
training run after its first step), ``zero_grad(set_to_none=True)`` (no gradient left) and glibc's
``malloc_trim``. The baseline therefore holds the interpreter, torch, the model's sharded parameters,
AdamW's sharded states and the batch; the prediction compared with the measurement is the same thing:
the model's per-rank total minus its sharded parameters and optimizer state. The ranks run with
``MALLOC_MMAP_THRESHOLD_=131072``: every tensor above 128 KiB is its own mmap, freed to the system
at once, so the resident size follows torch's live CPU allocations (glibc's default raises the
threshold to 32 MiB after the first free, and freed heap memory then stays resident).
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import time

from common import RESULTS, pyplot, save_figure, write_json

import seqpar.testing.memory as _mem

TOLERANCE = 0.15
VOCAB = 32000
SHAPES = {
    # name: (hidden, layers, heads, kv heads, intermediate)
    "A": (256, 4, 4, 2, 1024),
    "B": (512, 2, 8, 8, 1376),
}
# name, shape, cp, dp, S (global per dp replica), checkpoint, loss, mlp
CONFIGS = [
    ("A-cp1-none", "A", 1, 1, 4096, "none", "full", "full"),
    ("A-cp2-none", "A", 2, 1, 8192, "none", "full", "full"),
    ("A-cp4-none", "A", 4, 1, 16384, "none", "full", "full"),
    ("A-cp4-full", "A", 4, 1, 16384, "full", "full", "full"),
    ("A-dp2cp2-none", "A", 2, 2, 8192, "none", "full", "full"),
    ("A-cp2-none-chunked-tiled", "A", 2, 1, 16384, "none", "chunked", "tiled"),
    ("A-cp2-full-chunked-tiled", "A", 2, 1, 16384, "full", "chunked", "tiled"),
    ("A-cp2-none-tiled", "A", 2, 1, 8192, "none", "full", "tiled"),
    ("B-cp2-none", "B", 2, 1, 8192, "none", "full", "full"),
    ("B-cp4-none-chunked", "B", 4, 1, 32768, "none", "chunked", "full"),
    ("B-cp2-full-tiled", "B", 2, 1, 8192, "full", "full", "tiled"),
]


def shape_of(name: str):
    from seqpar.plan import ModelShape

    h, L, H, Hkv, I = SHAPES[name]
    return ModelShape(heads=H, kv_heads=Hkv, head_dim=h // H, layers=L, hidden=h, intermediate=I, vocab=VOCAB)





def run_config(rank: int, size: int, cfg: tuple, seed: int = 0) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import seqpar

    name, shape, cp, dp, S, ckpt, loss, mlp = cfg
    h, L, H, Hkv, I = SHAPES[shape]
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=h, intermediate_size=I, num_hidden_layers=L,
                         num_attention_heads=H, num_key_value_heads=Hkv, max_position_embeddings=1 << 17,
                         tie_word_embeddings=False, attention_dropout=0.0)
    model = LlamaForCausalLM(config)
    mesh = seqpar.init_mesh(cp=cp, dp=dp)
    known = inspect.signature(seqpar.parallelize).parameters
    opts = dict(layout="zigzag", method="ring", fsdp=True, checkpoint=ckpt == "full")
    missing = []
    for k, v, off in (("loss", loss, "full"), ("mlp", mlp, "full")):
        if k in known:
            opts[k] = v
        elif v != off:
            missing.append(f"{k}={v}")
    if missing:
        return dict(skipped=f"parallelize has no {', '.join(missing)} yet")
    seqpar.parallelize(model, mesh, **opts)
    dp_rank = mesh["dp"].get_local_rank() if dp > 1 else 0

    def batch(n: int):
        g = torch.Generator().manual_seed(1000 + dp_rank)
        ids = torch.randint(0, VOCAB, (1, n), generator=g)
        return seqpar.shard_batch({"input_ids": ids, "labels": ids.clone()}, mesh, layout="zigzag")

    def step(b, opt):
        loss_ = model(**b).loss
        loss_.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    step(batch(256 * cp), opt)  # one-time allocations of a first step (and AdamW's states), short sequence
    model.zero_grad(set_to_none=True)
    b = batch(S)
    _mem.trim()
    base = _mem.reset_peak()
    t0 = time.perf_counter()
    out = model(**b)
    loss_ = out.loss
    del out  # the usual `loss = model(**batch).loss`: the logits are not held through the backward
    fwd = _mem.status("VmHWM") - base
    _mem.reset_peak()
    loss_.backward()
    bwd = _mem.status("VmHWM") - base
    del loss_
    _mem.reset_peak()
    opt.step()
    opt_peak = _mem.status("VmHWM") - base
    seconds = time.perf_counter() - t0
    params = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters()) * 4
    return dict(forward=fwd, backward=bwd, optimizer=opt_peak, peak=max(fwd, bwd, opt_peak), baseline=base,
                param_bytes_local=params, seconds=seconds)


def predict(cfg: tuple):
    from seqpar.plan_memory import memory_plan

    name, shape, cp, dp, S, ckpt, loss, mlp = cfg
    return memory_plan(shape_of(shape), S, cp=cp, dp=dp, method="ring", checkpoint=ckpt, loss=loss, mlp=mlp,
                       precision="fp32", fsdp=True, device="cpu")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="*", default=None, help="run the configurations whose name starts with these")
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--json", default=str(RESULTS / "memory.json"))
    args = ap.parse_args()
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"  # inherited by the spawned ranks (module docstring)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from common import on_ranks  # noqa: F401  (the World below is the same machinery, kept for many configs)
    from seqpar.testing.worlds import World

    configs = [c for c in CONFIGS if not args.only or any(c[0].startswith(o) for o in args.only)]
    rows = []
    by_size: dict[int, list] = {}
    for c in configs:
        by_size.setdefault(c[2] * c[3], []).append(c)
    for size, cfgs in sorted(by_size.items()):
        world = World(size)
        try:
            for c in cfgs:
                res = world.run(run_config, c, timeout=args.timeout)
                mp = predict(c)
                if "skipped" in res[0]:
                    rows.append(dict(name=c[0], skipped=res[0]["skipped"]))
                    print(f"{c[0]:<28} skipped: {res[0]['skipped']}", flush=True)
                    continue
                meas = max(r["peak"] for r in res)
                pred = mp.total - mp.items["params"] - mp.items["optimizer"]
                row = dict(name=c[0], shape=c[1], cp=c[2], dp=c[3], seq_len=c[4], tokens_per_rank=mp.tokens,
                           checkpoint=c[5], loss=c[6], mlp=c[7], predicted_bytes=pred,
                           predicted_total_bytes=mp.total, predicted_phase=mp.peak_phase,
                           predicted_items=mp.items, predicted_phases=mp.phases, measured_bytes=meas,
                           measured_phase=max(("forward", "backward", "optimizer"), key=lambda k: max(r[k] for r in res)),
                           per_rank=res, error=pred / meas - 1)
                rows.append(row)
                print(f"{c[0]:<28} tokens/rank {mp.tokens:>6}  predicted {pred / 2**20:>8.1f} MiB ({mp.peak_phase})  "
                      f"measured {meas / 2**20:>8.1f} MiB ({row['measured_phase']})  error {row['error']:+.1%}  "
                      f"[{max(r['seconds'] for r in res):.0f} s]", flush=True)
        finally:
            world.close()
    done = [r for r in rows if "error" in r]
    worst = max((abs(r["error"]) for r in done), default=float("nan"))
    print(f"\n{'config':<28} {'S':>6} {'S/rank':>6} {'pred MiB':>9} {'meas MiB':>9} {'err':>7}")
    for r in done:
        print(f"{r['name']:<28} {r['seq_len']:>6} {r['tokens_per_rank']:>6} {r['predicted_bytes'] / 2**20:>9.1f} "
              f"{r['measured_bytes'] / 2**20:>9.1f} {r['error']:>+7.1%}")
    print(f"worst |error| {worst:.1%} (target {TOLERANCE:.0%}) over {len(done)} configurations")
    out = dict(tolerance=TOLERANCE, worst_abs_error=worst, rows=rows,
               meta=dict(vocab=VOCAB, shapes=SHAPES, dtype="fp32", threads_per_rank=1,
                         load_avg_1min=os.getloadavg()[0], python=sys.version.split()[0]))
    path = write_json(args.json, out)
    plot(done, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}")


def plot(rows: list, path) -> None:
    plt = pyplot()
    if plt is None or not rows:
        return
    fig, ax = plt.subplots(figsize=(6.2, 5.4))
    x = [r["measured_bytes"] / 2**30 for r in rows]
    y = [r["predicted_bytes"] / 2**30 for r in rows]
    ax.scatter(x, y)
    for r, a, b in zip(rows, x, y):
        ax.annotate(r["name"], (a, b), fontsize=6, xytext=(3, 3), textcoords="offset points")
    top = max(x + y) * 1.1
    ax.plot([0, top], [0, top], color="grey", lw=0.8)
    ax.fill_between([0, top], [0, top * (1 - TOLERANCE)], [0, top * (1 + TOLERANCE)], color="grey", alpha=0.15,
                    label=f"±{TOLERANCE:.0%}")
    ax.set_xlabel("measured peak per rank above baseline (GiB)")
    ax.set_ylabel("seqpar.plan_memory prediction (GiB)")
    ax.set_title("one training step, CPU ranks (fp32, FSDP2, ring)")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


if __name__ == "__main__":
    main()
