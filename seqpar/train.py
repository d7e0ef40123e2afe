"""The training job: a small Llama learns long-context key->value recall, sequence-parallel.

Run under torchrun (CPU, gloo)::

    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 4 -m seqpar.train           # cp=4, S=8192
    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 4 -m seqpar.train --dp 2    # dp=2 x cp=2
    ... -m seqpar.train --steps 100 --save ckpt && ... -m seqpar.train --save ckpt --resume

The task (generated in code, nothing downloaded). The first 7/8 of each sequence (the body) is
random filler tokens holding ``--pairs`` records ``k v v ... v``: a key, then its value written
``--value-run`` times, at random places. The last 1/8 are queries: the records' keys in random
order, and the target at each query is its key's value; nothing else is labelled (-100)::

    f f f f ... f k7 v3 v3 v3 ... v3 f f f ... f f f | k7 k7 k7 k7 ... k7
                  <-- one record, somewhere -->        <-- queries: each -> v3 -->
    zigzag, cp=4: the queries are the last chunk (rank 0); the record is on another rank 6 times in 7

A model that cannot attend across the sequence (hence across shards) can do no better than
``ln(values)``, the no-context baseline (the value is uniform and independent of the key); the
loss falls below it only by finding the key's record, mostly on another rank, and copying its value.
Defaults (1 record, 8 values, a 1-layer Llama of width 32, 200 steps at S=8192) take ~2.5 minutes on
2 CPU cores with 4 ranks; ``--pairs 2`` or more makes it associative (the key must be matched).

Checkpoints (``--save DIR``) survive a kill at any point. A save of step N writes
``DIR/.step{N}.partial/`` (every rank's shards, then rank 0 writes ``history.json``, the losses so
far), a barrier, then rank 0 writes the marker ``COMPLETE`` and renames the directory to
``DIR/step{N}`` (one atomic rename). ``--resume`` loads the highest ``step{N}`` holding the marker
and ignores everything else (``*.partial`` leftovers, a step directory without the marker); with
none it starts from step 0. ``latest.json`` (step + losses, replaced atomically after the rename) is
for people and tools; resume does not read it. A run that saves step N replaces the checkpoints of
steps >= N in DIR (they are from an earlier run).

Test hook: the environment variable ``SEQPAR_TEST_SAVE_DELAY`` (read at each save; unset: no
effect) makes every rank sleep that many seconds in the middle of a save, after the shards and
``history.json`` are written and before the marker and the rename; ``SECONDS@STEP`` delays only the
save of that step. Tests kill the job in that window.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from seqpar.vocab import DP_DIM, LAYOUTS

__all__ = ["main", "run", "make_parser", "recall_batch", "build_model", "task_spec", "TaskSpec", "complete_steps",
           "param_digest"]

COMPLETE = "COMPLETE"  # the marker file of a checkpoint directory that is whole
SAVE_DELAY_ENV = "SEQPAR_TEST_SAVE_DELAY"  # test hook, see the module docstring
_STEP_DIR = re.compile(r"step(\d+)")
_SCRATCH_DIR = re.compile(r"\.step(\d+)\.(partial|old)")  # a save in progress / a checkpoint being replaced


class TaskSpec:
    """Token ids: fillers [0, F), keys [F, F+K), values [F+K, F+K+V)."""

    def __init__(self, fillers: int = 16, keys: int = 16, values: int = 8, pairs: int = 1, run: int = 1024):
        if pairs > keys:
            raise ValueError(f"--pairs ({pairs}) must be at most the number of keys ({keys})")
        self.fillers, self.keys, self.values, self.pairs, self.run = fillers, keys, values, pairs, run

    @property
    def vocab(self) -> int:
        return self.fillers + self.keys + self.values

    @property
    def baseline(self) -> float:
        """Loss of the best predictor that cannot see the pairs: uniform over the values."""
        return math.log(self.values)


def recall_batch(spec: TaskSpec, batch: int, seq_len: int, seed: int) -> dict[str, torch.Tensor]:
    """Full-sequence batch (the same on every cp rank of a replica): input_ids, labels (B, S).

    The first 7/8 (the body): fillers with ``pairs`` key->value records ``k v v ... v`` (the value
    written ``run`` times) at random places, each once. The last 1/8: queries, a random sequence
    of the pairs' keys; the target at a query is the value of its key (``labels[t + 1]``, the HF
    convention: position t predicts labels[t + 1]).
    """
    g = torch.Generator().manual_seed(seed)
    tail = seq_len // 8
    body = seq_len - tail
    width = 1 + spec.run  # one record
    seg = body // spec.pairs
    if seg < 2 * width:
        raise ValueError(f"--seq-len {seq_len} is too short for {spec.pairs} records of {width} tokens")
    ids = torch.randint(0, spec.fillers, (batch, seq_len), generator=g)
    labels = torch.full((batch, seq_len), -100)
    for b in range(batch):
        keys = spec.fillers + torch.randperm(spec.keys, generator=g)[: spec.pairs]
        vals = spec.fillers + spec.keys + torch.randint(0, spec.values, (spec.pairs,), generator=g)
        order = torch.randperm(spec.pairs, generator=g)  # record i goes to segment order[i]
        for i in range(spec.pairs):
            at = int(order[i]) * seg + int(torch.randint(0, seg - width, (1,), generator=g))
            ids[b, at] = keys[i]
            ids[b, at + 1: at + width] = vals[i]
        q = torch.randint(0, spec.pairs, (tail,), generator=g)
        ids[b, body:] = keys[q]
        labels[b, body + 1:] = vals[q[:-1]]  # target at query t = value of key t (the last one has none)
    return {"input_ids": ids, "labels": labels}


def task_spec(args) -> TaskSpec:
    run = args.value_run if args.value_run is not None else max(1, args.seq_len // 8 // args.pairs)
    return TaskSpec(keys=args.keys, values=args.values, pairs=args.pairs, run=run)


def build_model(spec: TaskSpec, args) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=spec.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.seq_len, rope_theta=float(10 * args.seq_len), tie_word_embeddings=args.tie,
        initializer_range=args.init_std, attn_implementation="sdpa",
    )
    torch.manual_seed(args.seed)
    return LlamaForCausalLM(cfg).float()


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="seqpar-train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dp", type=int, default=None, help="data-parallel replicas (default: world // cp)")
    p.add_argument("--cp", type=int, default=None, help="sequence-parallel ranks (default: world // dp, all ranks)")
    p.add_argument("--layout", default="zigzag", choices=LAYOUTS)
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--batch", type=int, default=1, help="sequences per dp replica per step")
    p.add_argument("--steps", type=int, default=200, help="train until this global step")
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--checkpoint", action="store_true", help="activation checkpointing (no ring recompute)")
    p.add_argument("--no-fsdp", dest="fsdp", action="store_false", help="full params + all-reduce instead of FSDP2")
    p.add_argument("--pairs", type=int, default=1, help="key->value records per sequence (1: needle retrieval)")
    p.add_argument("--value-run", type=int, default=None,
                   help="each value is written this many times after its key (default: seq_len / 8 / pairs)")
    p.add_argument("--keys", type=int, default=16)
    p.add_argument("--values", type=int, default=8)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--kv-heads", type=int, default=1)
    p.add_argument("--init-std", type=float, default=0.02, help="initializer_range of the LlamaConfig")
    p.add_argument("--untied", dest="tie", action="store_false", help="separate input and output embeddings")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", type=Path, default=None,
                   help="directory for torch.distributed.checkpoint saves (DIR/step{N}, each committed atomically)")
    p.add_argument("--save-every", type=int, default=0, help="also save every N steps (0: only at the end)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the last complete checkpoint in --save (none: start from step 0)")
    p.add_argument("--plot", default="train_loss.png", help="loss plot (PNG); '' for none")
    p.add_argument("--metrics", type=Path, default=None, help="write the run's numbers as JSON")
    p.add_argument("--eval", type=int, default=2, help="fresh sequences to evaluate at the end (0: none)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _evaluate(model, mesh, spec: TaskSpec, args, replica: int, *, hide_records: bool) -> float:
    """Mean loss over ``--eval`` fresh sequences (mean over dp replicas); ``hide_records``: the
    records are overwritten with fillers, so the answer is nowhere in the context (the measured
    no-context loss of the trained model)."""
    import seqpar

    total = torch.zeros(())
    with torch.no_grad():
        for i in range(args.eval):
            full = recall_batch(spec, args.batch, args.seq_len, seed=10**9 + 1000 * i + replica)
            if hide_records:
                ids, body = full["input_ids"], args.seq_len - args.seq_len // 8
                hidden = ids[:, :body] >= spec.fillers
                g = torch.Generator().manual_seed(i)  # the same on every cp rank
                ids[:, :body][hidden] = torch.randint(0, spec.fillers, (int(hidden.sum()),), generator=g)
            total += model(**seqpar.shard_batch(full, mesh, layout=args.layout)).loss.float()
    dist.all_reduce(total)
    return total.item() / max(1, args.eval) / dist.get_world_size()


def _lr(step: int, args) -> float:
    """Linear warmup, then constant: a function of the step only, so a resumed run (or one given
    more --steps) follows the same curve."""
    return args.lr * min(1.0, (step + 1) / max(1, args.warmup))


def complete_steps(root: Path) -> list[int]:
    """The steps of the whole checkpoints in ``root`` (``step{N}`` directories with the marker), ascending."""
    if not root.is_dir():
        return []
    steps = []
    for d in root.iterdir():
        m = _STEP_DIR.fullmatch(d.name)
        if m and (d / COMPLETE).is_file():
            steps.append(int(m.group(1)))
    return sorted(steps)


def _save_delay(step: int) -> float:
    """Seconds the test hook ``SEQPAR_TEST_SAVE_DELAY`` (``SECONDS`` or ``SECONDS@STEP``) asks for at this save."""
    value = os.environ.get(SAVE_DELAY_ENV, "")
    if not value:
        return 0.0
    seconds, _, only = value.partition("@")
    try:
        return float(seconds) if not only or int(only) == step else 0.0
    except ValueError:
        raise ValueError(f"{SAVE_DELAY_ENV}={value!r}: expected SECONDS or SECONDS@STEP") from None


def _write_json(path: Path, obj) -> None:
    """Write ``path`` so that it is either the old file or the whole new one (tmp + fsync + os.replace)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _clear_scratch(root: Path) -> None:
    """Remove what killed saves left behind (``.step{N}.partial``, ``.step{N}.old``); rank 0, no save running."""
    for d in root.iterdir():
        if _SCRATCH_DIR.fullmatch(d.name):
            shutil.rmtree(d, ignore_errors=True)


def _retire_from(root: Path, step: int) -> None:
    """Remove the checkpoints of steps >= ``step`` (an earlier run's): renamed out of the way first, so a
    kill during the removal leaves scratch, never a ``step{N}`` directory with some of its files."""
    for d in root.iterdir():
        m = _STEP_DIR.fullmatch(d.name)
        if m and d.is_dir() and int(m.group(1)) >= step:
            old = root / f".{d.name}.old"
            os.rename(d, old)
            shutil.rmtree(old, ignore_errors=True)


def _save(args, model, opt, step: int, history: list[float]) -> None:
    """Save atomically: shards into ``.step{N}.partial``, barrier, marker, rename to ``step{N}`` (rank 0)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    root, lead = args.save, dist.get_rank() == 0
    partial, final = root / f".step{step}.partial", root / f"step{step}"
    if lead:
        root.mkdir(parents=True, exist_ok=True)
        _clear_scratch(root)
    dist.barrier()  # the scratch is gone before any rank writes
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(partial))
    if lead:
        _write_json(partial / "history.json", {"step": step, "losses": history})
    delay = _save_delay(step)
    if delay:
        time.sleep(delay)
    dist.barrier()  # every rank's shards are written
    if lead:
        _write_json(partial / COMPLETE, {"step": step, "world": dist.get_world_size()})
        _fsync_dir(partial)
        _retire_from(root, step)
        os.rename(partial, final)  # the commit
        _fsync_dir(root)
        _write_json(root / "latest.json", {"step": step, "losses": history})
    dist.barrier()


def _load(args, model, opt) -> tuple[int, list[float]]:
    """Load the highest whole checkpoint in ``--save`` (rank 0 finds it, every rank loads it);
    ``(0, [])`` if there is none."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    found: list = [None, []]
    if dist.get_rank() == 0:
        steps = complete_steps(args.save)
        if steps:
            found = [steps[-1], json.loads((args.save / f"step{steps[-1]}" / "history.json").read_text())["losses"]]
        else:
            print(f"seqpar-train: no complete checkpoint in {args.save}: starting from step 0", file=sys.stderr,
                  flush=True)
    dist.broadcast_object_list(found, src=0)
    step, history = found
    if step is None:
        return 0, []
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=str(args.save / f"step{step}"))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return step, list(history)


def param_digest(model: torch.nn.Module) -> str:
    """sha256 over the model's state dict (name, dtype, shape, bytes) in name order; DTensors (FSDP)
    are gathered to full tensors, so every rank returns the same digest. A collective: call on all ranks."""
    from torch.distributed.tensor import DTensor

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if isinstance(t, DTensor):
            t = t.full_tensor()
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _plot(path: Path, history: list[float], baseline: float, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = range(1, len(history) + 1)
    ax.plot(steps, history, lw=0.7, alpha=0.5, label="train loss (answers only)")
    k = 10
    if len(history) >= k:
        avg = [sum(history[i - k:i]) / k for i in range(k, len(history) + 1)]
        ax.plot(range(k, len(history) + 1), avg, lw=2, label=f"mean of the last {k} steps")
    ax.axhline(baseline, color="gray", ls="--", label=f"no-context baseline ln(values) = {baseline:.2f}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(args) -> dict:
    """The job on an initialised (or initialisable) process group; returns its numbers (all ranks)."""
    import seqpar

    seqpar.init_distributed()
    world, rank = dist.get_world_size(), dist.get_rank()
    dp = args.dp or (world // args.cp if args.cp else 1)
    cp = args.cp or world // dp
    if dp * cp != world:
        raise ValueError(f"--dp {dp} x --cp {cp} must equal the world size {world}")
    args.dp = dp
    mesh = seqpar.init_mesh(cp=cp, dp=dp)
    replica = mesh.get_local_rank(DP_DIM)
    spec = task_spec(args)
    lead = rank == 0

    model = seqpar.parallelize(build_model(spec, args), mesh, layout=args.layout, fsdp=args.fsdp,
                               checkpoint=args.checkpoint)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    start, history, load_seconds = 0, [], 0.0
    if args.resume:
        if args.save is None:
            raise ValueError("--resume needs --save DIR")
        t_load = time.perf_counter()
        start, history = _load(args, model, opt)
        load_seconds = time.perf_counter() - t_load
    if lead and not args.quiet:
        print(f"seqpar-train: world={world} dp={args.dp} cp={cp} layout={args.layout} seq_len={args.seq_len} "
              f"batch={args.batch} fsdp={args.fsdp} checkpoint={args.checkpoint} steps {start}->{args.steps} "
              f"baseline={spec.baseline:.3f}", flush=True)

    bar = None
    if lead and not args.quiet:
        from tqdm import tqdm

        bar = tqdm(total=args.steps, initial=start, unit="step", dynamic_ncols=True)
    tokens = args.dp * args.batch * args.seq_len  # per step, all replicas
    t_start, t_steps = time.perf_counter(), 0.0
    for step in range(start, args.steps):
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = _lr(step, args)
        full = recall_batch(spec, args.batch, args.seq_len, seed=args.seed * 1_000_003 + step * 131 + replica)
        batch = seqpar.shard_batch(full, mesh, layout=args.layout)
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        value = loss.detach().clone()
        dist.all_reduce(value)  # each replica's loss, on all its cp ranks: mean over replicas
        value = value.item() / world
        history.append(value)
        dt = time.perf_counter() - t0
        t_steps += dt
        if bar is not None:
            bar.set_postfix(loss=f"{value:.3f}", tok_s=f"{tokens / dt:,.0f}")
            bar.update(1)
        if args.save is not None and args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.steps:
            _save(args, model, opt, step + 1, history)
    if bar is not None:
        bar.close()
    if args.save is not None and args.steps > start:
        _save(args, model, opt, args.steps, history)
    done = args.steps - start
    seconds = time.perf_counter() - t_start
    tail = history[-min(10, len(history)):] if history else [float("nan")]
    digest = param_digest(model)
    evals = {}
    if args.eval:
        evals = dict(eval_loss=_evaluate(model, mesh, spec, args, replica, hide_records=False),
                     eval_loss_records_hidden=_evaluate(model, mesh, spec, args, replica, hide_records=True))
    res = dict(world=world, dp=args.dp, cp=cp, layout=args.layout, seq_len=args.seq_len, batch=args.batch,
               steps=args.steps, resumed_from=start, losses=history, final_loss=sum(tail) / len(tail),
               baseline=spec.baseline, seconds=seconds, tokens_per_s=done * tokens / t_steps if t_steps else 0.0,
               load_seconds=load_seconds, param_digest=digest, **evals)
    if lead:
        if args.plot:
            _plot(Path(args.plot), history, spec.baseline, f"seqpar-train: Llama, S={args.seq_len}, dp={args.dp} x "
                                                     f"cp={cp}, {args.layout}")
        if args.metrics:
            args.metrics.parent.mkdir(parents=True, exist_ok=True)
            args.metrics.write_text(json.dumps(res, indent=1))
        if not args.quiet:
            ev = (f"; eval loss {evals['eval_loss']:.3f}, with the records hidden "
                  f"{evals['eval_loss_records_hidden']:.3f}" if evals else "")
            print(f"seqpar-train: final loss {res['final_loss']:.3f} (mean of last {len(tail)} steps) vs no-context "
                  f"baseline {spec.baseline:.3f}{ev}; {res['tokens_per_s']:,.0f} tokens/s; {res['seconds']:.1f}s "
                  f"training" + (f"; plot {args.plot}" if args.plot else ""), flush=True)
    return res


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    args = make_parser().parse_args(argv)
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    try:
        run(args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
