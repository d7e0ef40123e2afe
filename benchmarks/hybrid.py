"""A training step of a Qwen3.5-shaped tiny hybrid (gated DeltaNet + attention) at long S on 1, 2 and 4 CPU
ranks: the gated DeltaNets on the gather path vs by state passing, against seqpar.plan_mixers' prediction.

    OMP_NUM_THREADS=1 python benchmarks/hybrid.py                  # S = 8192, 5 timed rounds (~12 min)
    OMP_NUM_THREADS=1 python benchmarks/hybrid.py --seq 4096 --reps 1   # quicker
    python benchmarks/hybrid.py --report                           # table and plot from the JSON

The model: transformers' ``Qwen3_5ForCausalLM`` from a ``Qwen3_5TextConfig`` (random init, fp32): hidden 256,
4 layers (3 gated DeltaNet + 1 full attention, Qwen3.5's 3-of-4 pattern), gated DeltaNet with 2 key / 4 value
heads of dk = dv = 64 and a conv of 4, attention 4 query / 2 kv heads of 64, MLP 512, vocab 2048. On CPU
the gated DeltaNet runs transformers' reference chunked PyTorch path (no flash-linear-attention).

One spawned gloo world per P (``seqpar.testing.worlds.World``), all three alive at once; in each, the model is
parallelized twice (``mixers="gather"`` and ``mixers="state"``, zigzag, ``fsdp=False``, no checkpointing).
A warm-up step per config, then ``--reps`` rounds, each timing one step (``loss.backward()`` included) of
every (P, mixers) in turn -- interleaved, so the load of the shared machine falls on every config alike.
Time: rank 0's wall clock of the step after a barrier; the fastest round (the least disturbed by other load on
a shared machine; the median is kept too). Memory: each rank's
peak resident size during the step above its resident size before it (``seqpar.testing.memory``; the
activations and the step's buffers), the largest rank's. The loss and the gradient norm of every config
are checked against P = 1 gather (the unmodified model on one process).

The prediction (``seqpar.plan_mixers.mixer_cost`` for the 3 gated DeltaNet layers): the gated DeltaNet's
throughput F is measured on one process (the module alone, fwd + bwd on S tokens: F = 3 x its forward
FLOPs / seconds); with more ranks than the machine's cores (``--cores``, default os.cpu_count()) each rank
gets cores / P of it. The gather - state step-time difference and the activation-memory difference per
rank are what the model predicts (the attention, MLP and head are the same work under both).

Results: benchmarks/results/hybrid.json and .png, and the table printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, load_json, pyplot, save_figure, write_json  # noqa: E402

HIDDEN, VOCAB, LAYERS = 256, 2048, ("linear_attention",) * 3 + ("full_attention",)
GDN = dict(linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=64, linear_value_head_dim=64,
           linear_conv_kernel_dim=4)
MIXERS = ("gather", "state")
_HELD: dict = {}  # per worker process: the parallelized models and the batch (kept between World.run calls)


def _config():
    from transformers import Qwen3_5TextConfig

    cfg = Qwen3_5TextConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=512, num_hidden_layers=len(LAYERS),
                            layer_types=list(LAYERS), num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                            max_position_embeddings=1 << 17, **GDN)
    cfg._attn_implementation = "sdpa"
    return cfg


def _model():
    import torch
    from transformers import Qwen3_5ForCausalLM

    torch.manual_seed(0)
    return Qwen3_5ForCausalLM(_config())


def mixer_shape():
    """The gated DeltaNet layers as seqpar.plan_mixers sees them (read from the module, as the pass does)."""
    import dataclasses

    from seqpar.plan_mixers import mixer_shape as read

    m = _model()
    shape = read(m.model.layers[0].linear_attn)
    return dataclasses.replace(shape, layers=LAYERS.count("linear_attention"))


def setup(rank, size, *, seq):
    """Build the model, parallelize it both ways, hold them with the batch; a warm-up step of each."""
    import copy

    import torch

    import seqpar

    mesh = seqpar.init_mesh(cp=size)
    base = _model()
    ids = torch.randint(0, VOCAB, (1, seq), generator=torch.Generator().manual_seed(seq))
    _HELD.clear()
    _HELD["batch"] = seqpar.shard_batch({"input_ids": ids, "labels": ids}, mesh, layout="zigzag")
    _HELD["group"] = mesh["cp"].get_group()
    for mixers in MIXERS:
        _HELD[mixers] = seqpar.parallelize(copy.deepcopy(base), mesh, layout="zigzag", fsdp=False, mixers=mixers)
    return [step(rank, size, mixers=m) for m in MIXERS]


def step(rank, size, *, mixers):
    """One training step of the held model: (seconds on this rank after a barrier, peak resident bytes of the
    step above the resident size before it, loss, gradient norm, paths the mixers took)."""
    import torch
    import torch.distributed as dist

    from seqpar.passes.sequence_mixers import mixer_plans
    from seqpar.testing.memory import reset_peak, status, trim

    model = _HELD[mixers]
    model.zero_grad(set_to_none=True)
    trim()
    dist.barrier(group=_HELD["group"])
    base = reset_peak()
    t0 = time.perf_counter()
    loss = model(**_HELD["batch"]).loss
    loss.backward()
    took = time.perf_counter() - t0
    peak = status("VmHWM") - base
    norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters() if p.grad is not None)).item()
    paths = sorted({p.how for p in mixer_plans(model)})
    return took, peak, loss.item(), norm, paths


def mixer_rate(rank, size, *, seq):
    """FLOP/s of one gated DeltaNet layer alone (the module's fwd + bwd on ``seq`` tokens, one process)."""
    import torch

    shape = mixer_shape()
    layer = _model().model.layers[0].linear_attn
    x = torch.randn(1, seq, HIDDEN, requires_grad=True)
    best = None
    for _ in range(2):
        t0 = time.perf_counter()
        layer(x).sum().backward()
        dt = time.perf_counter() - t0
        best = dt if best is None else min(best, dt)
    return 3 * seq * shape.flops("gather") / best, best


def predict(seq: int, ranks: int, flops: float, cores: int) -> dict:
    """seqpar.plan_mixers' gather and state cost of the model's gated DeltaNet layers on ``ranks`` CPU ranks."""
    import dataclasses

    from seqpar.plan_mixers import CPU, mixer_cost

    shape = mixer_shape()
    machine = dataclasses.replace(CPU, mixer_flops=flops * min(1.0, cores / ranks))
    out = {}
    for m in MIXERS:
        c = mixer_cost(shape, seq, ranks, machine, method=m, dtype_bytes=4, layout="zigzag")
        out[m] = dict(time_s=shape.layers * c.time, activations=shape.layers * c.memory["activations"],
                      total=shape.layers * c.memory["total"])
    return out


def report(data: dict) -> None:
    rows = data["rows"]
    print(f"{data['model']}; S = {data['seq']}, {data['reps']} timed rounds, {data['cores']} cores")
    print(f"{'ranks':>5} {'mixers':>7} {'step s':>8} {'median s':>8} {'gather/state':>12} {'peak MB/rank':>13} "
          f"{'pred diff s':>11} {'meas diff s':>11} {'pred dMB':>9} {'meas dMB':>9} {'loss rel':>9} {'gnorm rel':>9}")
    for r in rows:
        other = next(o for o in rows if o["ranks"] == r["ranks"] and o["mixers"] != r["mixers"])
        g, s = (r, other) if r["mixers"] == "gather" else (other, r)
        ratio = g["step_s"] / s["step_s"]
        diff = f"{r['pred_diff_s']:>11.2f} {g['step_s'] - s['step_s']:>11.2f} {r['pred_diff_mb']:>9.0f} " \
               f"{(g['peak_bytes'] - s['peak_bytes']) / 1e6:>9.0f}" if r["mixers"] == "gather" else " " * 44
        med = r.get("median_s", r["step_s"])
        print(f"{r['ranks']:>5} {r['mixers']:>7} {r['step_s']:>8.2f} {med:>8.2f} "
              f"{ratio if r['mixers'] == 'gather' else 1.0:>12.2f} {r['peak_bytes'] / 1e6:>13.0f} {diff} "
              f"{r['loss_rel']:>9.1e} {r['gnorm_rel']:>9.1e}")
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for m, color in zip(MIXERS, ("tab:red", "tab:blue")):
        sel = sorted((r for r in rows if r["mixers"] == m), key=lambda r: r["ranks"])
        P = [r["ranks"] for r in sel]
        axes[0].plot(P, [r["step_s"] for r in sel], "o-", color=color, label=f"{m} (measured)")
        axes[1].plot(P, [r["peak_bytes"] / 1e6 for r in sel], "o-", color=color, label=f"{m} (measured)")
        axes[1].plot(P, [r["pred_activations"] / 1e6 for r in sel], "x--", color=color,
                     label=f"{m}: predicted gated-DeltaNet activations")
    axes[0].set(xlabel="CPU ranks", ylabel="training step (s)",
                title=f"Qwen3.5-shaped hybrid, S = {data['seq']}: step time")
    axes[1].set(xlabel="CPU ranks", ylabel="MB per rank", title="peak memory of the step per rank")
    for ax in axes:
        ax.set_xticks([1, 2, 4])
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, RESULTS / "hybrid.png")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--cores", type=int, default=os.cpu_count())
    ap.add_argument("--report", action="store_true")
    a = ap.parse_args()
    path = RESULTS / "hybrid.json"
    if a.report:
        report(load_json(path))
        return
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from seqpar.testing.worlds import World

    worlds = {P: World(P) for P in a.ranks}
    try:
        flops, layer_s = worlds[a.ranks[0]].run(mixer_rate, seq=a.seq, timeout=3600)[0]
        print(f"one gated DeltaNet layer alone, fwd + bwd on {a.seq} tokens: {layer_s:.2f} s "
              f"({flops / 1e9:.2f} GFLOP/s)", flush=True)
        first = {}
        for P, w in worlds.items():
            first[P] = w.run(setup, seq=a.seq, timeout=3600)
            print(f"P={P} set up, warm-up steps: {[round(r[0], 2) for r in first[P][0]]} s", flush=True)
        meas = {(P, m): [] for P in a.ranks for m in MIXERS}
        for rnd in range(a.reps):
            for P, w in worlds.items():
                for m in MIXERS:
                    res = w.run(step, mixers=m, timeout=3600)
                    meas[(P, m)].append(res)
                    print(f"round {rnd}: P={P} {m}: {res[0][0]:.2f} s, peak {max(r[1] for r in res) / 1e6:.0f} MB, "
                          f"loss {res[0][2]:.6f}, paths {res[0][4]}", flush=True)
    finally:
        for w in worlds.values():
            w.close()
    ref = meas[(a.ranks[0], "gather")][0][0]
    ref_loss, ref_norm = ref[2], ref[3]
    rows = []
    for (P, m), runs in meas.items():
        pred = predict(a.seq, P, flops, a.cores)
        rows.append(dict(ranks=P, mixers=m, seq=a.seq, step_s=min(r[0][0] for r in runs),
                         median_s=statistics.median(r[0][0] for r in runs), steps_s=[r[0][0] for r in runs],
                         peak_bytes=max(max(x[1] for x in r) for r in runs),
                         peak_per_rank=[max(r[i][1] for r in runs) for i in range(P)],
                         loss=runs[0][0][2], loss_rel=abs(runs[0][0][2] - ref_loss) / abs(ref_loss),
                         gnorm_rel=abs(runs[0][0][3] - ref_norm) / ref_norm, paths=runs[0][0][4],
                         pred_time_s=pred[m]["time_s"], pred_activations=pred[m]["activations"],
                         pred_diff_s=pred["gather"]["time_s"] - pred["state"]["time_s"],
                         pred_diff_mb=(pred["gather"]["total"] - pred["state"]["total"]) / 1e6))
        print(rows[-1], flush=True)
    data = dict(model=f"Qwen3.5-shaped hybrid: hidden {HIDDEN}, 3 gated DeltaNet (2 k / 4 v heads, dk = dv = 64) + "
                      f"1 attention layer (4 / 2 heads of 64), MLP 512, vocab {VOCAB}, fp32",
                seq=a.seq, reps=a.reps, cores=a.cores, mixer_flops=flops, layer_s=layer_s, rows=rows)
    write_json(path, data)
    report(data)


if __name__ == "__main__":
    main()
