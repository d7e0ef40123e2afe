"""A million-token training step on CPU ranks: forward, backward and AdamW step of a Mistral-shaped model.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 4 benchmarks/million.py           # S = 1,048,576
    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 4 benchmarks/million.py --seq 65536 --compare
    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 4 benchmarks/million.py --seq 16384 --compare --reference both
    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 4 benchmarks/million.py --seq 8192 16384 --features off
    python benchmarks/million.py --report          # table and plot again from results/million.json

The model: transformers' ``MistralForCausalLM`` built from a ``MistralConfig`` (random init, nothing
downloaded; vocab 32000, hidden 256, 2 layers, 4 query heads of 64, 1 kv head, MLP 1024, a causal
sliding window of 512 tokens, untied head) under ``seqpar.parallelize`` on cp = world ranks (zigzag
ring, FSDP2; ``--precision bf16``, the default: FSDP2 mixed precision, fp32 parameters and gradient
reduction, bf16 compute and activations; ``fp32``: nothing cast). One batch of ``S`` random tokens
(labels = inputs), the same on every rank, cut by ``seqpar.shard_batch``; AdamW (``--optimizer sgd``
for plain SGD).

``--features on`` (default): the chunked LM head + loss (``loss="chunked"``), the tiled MLP
(``mlp="tiled"``) and activation checkpointing (``checkpoint=True``; ``--offload cpu`` adds checkpoint
offload, which on CPU ranks only copies within the same memory). ``--features off``: none of them
(``loss="full"``, ``mlp="full"``, ``checkpoint=False``, no offload): the rank's whole logits exist, in
fp32 for the loss, with their gradient. Each run checks that the features took effect (no logits
returned, MLPs that ran tiled) or not. ``--compare``: features on and a reference, in fp32, on the same
seed and batch; the loss and every gradient (``full_tensor()``, before the optimizer step) compared: loss
rel < 1e-5, each parameter's ``|g - g_ref| / |g_ref|`` < 1e-4, else the job exits 1.

The reference (``--reference turns``, the default): the model's own loss on the whole logits, one rank at
a time. The step of "off" (no chunked loss, no tiling, no checkpoint), the model called without labels;
the input ``h`` of ``lm_head`` goes to transformers' own ``model.loss_function`` (ForCausalLMLoss: the sum
over the rank's ``shift_labels`` / the batch's ``num_items_in_batch``, as under seqpar) on the rank's whole
logits ``F.linear(h, lm_head.weight)``, none of seqpar's chunked code; the ranks take turns, and the
backward recomputes the logits in the same turns::

    forward (no graph)   rank 0: logits, loss | barrier | rank 1: ... | barrier | ... rank P-1 | barrier
    backward             rank 0: logits, loss, grad (h, W) | barrier | ... | rank P-1 ... | barrier

so one rank's logits (S/P x V fp32, their log-softmax and gradients: ~6-8 GB at S = 65,536, cp = 4) exist
at a time, not all P ranks' (~27 GB: more than this machine's 24 GB). Its value is the all-reduced sum of
the ranks' parts, the gradient local (as seqpar's loss pass). Its row is labelled "reference": its memory
is not the plain step's and is not modelled. ``--reference off``: the features-off step itself (the
model's own path, the P ranks' logits at once); ``both``: both references, each compared with the
features and with each other.

Per rank, as benchmarks/memory.py does: a warm-up step on 128 cp tokens first (one-time
allocations; AdamW's states, created with lr = 0 so the parameters do not move), gradients dropped,
``malloc_trim``; then before each phase (forward, backward, optimizer step) ``/proc/self/clear_refs``
gets 5, which resets ``VmHWM`` (the peak resident size) to the current resident size, and after it
``VmHWM`` is read. The step's absolute peak is the largest phase's ``VmHWM``; the step's rise is that
minus the resident size at the first reset (the baseline: interpreter, torch, the sharded parameters,
AdamW's states, the batch). ``mallopt(M_MMAP_THRESHOLD, 128 KiB)``: every tensor above 128 KiB is its
own mmap, returned to the system when freed, so the resident size follows the live tensors. The
prediction beside it is ``seqpar.plan_memory.memory_plan`` with the same options, minus its
parameters and optimizer state (in the baseline): the same quantity (``--report`` recomputes it for
every row with the current model). Without the features the 1M step does not fit (the logits alone:
S/cp x 32000 x 4 bytes = 33.6 GB per rank at 1M on 4 ranks); it is measured at lengths that fit, and at 1M given by
the memory model and by a linear fit of those measurements.

Rank 0 shows a tqdm bar per run (stages: setup, each block's forward, the norm + LM head + loss, its
backward, each block's backward, the optimizer; each stage's seconds are in the JSON), logs one line
at the start and one at the end, and writes the rows into ``--json`` (default ``benchmarks/results/million.json``; rows of other runs with other keys are kept)
and ``million.png`` next to it. ``--timeout`` bounds the whole job: every collective waits at most that
long, and a watchdog on every rank dumps the stacks and exits past it (torchrun then stops the rest).
"""

from __future__ import annotations

import argparse
import ctypes
import faulthandler
import functools
import logging
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from common import RESULTS, load_json, pyplot, save_figure, write_json

import seqpar.testing.memory as _mem

log = logging.getLogger("million")
LOSS_REL, GRAD_REL = 1e-5, 1e-4  # --compare's bounds (fp32)
GiB = float(1 << 30)
PHASES = ("forward", "backward", "optimizer")
Features = Literal["on", "off", "reference"]  # a run: --features on / off, or --compare's reference
REFERENCE_RUNS: dict[str, tuple[str, ...]] = {"turns": ("reference",), "off": ("off",), "both": ("reference", "off")}


# ------------------------------------------------------------------------------------------ memory


def _mmap_threshold(nbytes: int = 128 << 10) -> None:
    """Allocations above ``nbytes`` as their own mmaps (freed to the system at once); glibc otherwise
    raises the threshold to 32 MiB after the first free and freed heap memory stays resident."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, nbytes)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


# ------------------------------------------------------------------------------------------ the model


def model_config(args):
    from transformers import MistralConfig

    return MistralConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=max(args.seq),
                         sliding_window=args.window, tie_word_embeddings=False, attention_dropout=0.0)


def options(features: str, offload: str) -> dict:
    """parallelize's memory options for ``--features on`` / ``off`` (and ``--compare``'s "reference" run:
    those of "off", its LM head + loss by :class:`ReferenceHead`)."""
    if features == "on":
        return dict(loss="chunked", mlp="tiled", checkpoint=True, offload=offload)
    return dict(loss="full", mlp="full", checkpoint=False, offload="none")


def predict(args, features: str, S: int, cp: int, precision: str | None = None):
    """``seqpar.plan_memory``'s plan of the run (per rank)."""
    from seqpar.plan_memory import from_hf_config, memory_plan

    o = options(features, args.offload)
    return memory_plan(from_hf_config(model_config(args)), S, cp=cp, dp=1, method="ring",
                       checkpoint="full" if o["checkpoint"] else "none", loss=o["loss"], mlp=o["mlp"],
                       offload=o["offload"], precision=precision or args.precision, fsdp=True, device="cpu")


def predicted_rise(mp) -> float:
    """The plan's bytes above the measurement's baseline: its total less the sharded parameters and the
    optimizer state, which the baseline (after the warm-up step) already holds."""
    return mp.total - mp.items["params"] - mp.items["optimizer"]


class Progress:
    """One run's stages, timed on every rank, and rank 0's tqdm bar over them: setup, each block's
    forward (a forward hook), the final norm + LM head + loss, the loss's backward, each block's
    backward (a hook on the gradient of the block's output), the optimizer step."""

    def __init__(self, lead: bool, name: str, layers: int):
        self.bar = None
        if lead:
            from tqdm import tqdm

            self.bar = tqdm(total=2 * layers + 6, desc=name, unit="stage", dynamic_ncols=True, file=sys.stdout,
                            bar_format="{desc}: {n_fmt}/{total_fmt} stages [{elapsed}]{postfix}")
        self.layers, self.counting, self.backward_hooks = layers, False, 0
        self.seconds: dict[str, float] = {}  # step stage -> seconds
        self.t = time.perf_counter()

    def next(self, what: str) -> None:
        """Say what runs now (no stage done)."""
        if self.bar is not None:
            self.bar.set_postfix_str(what)

    def done(self, stage: str | None, then: str) -> None:
        """``stage`` ended now (timed from the previous mark when named); ``then`` runs next."""
        now = time.perf_counter()
        if stage is not None:
            self.seconds[stage] = now - self.t
        self.t = now
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(then)

    def hook_blocks(self, blocks) -> list:
        L = self.layers

        def on_forward(module, args, out, i):
            if not self.counting:  # the checkpoint's recomputation in backward runs the block again
                return
            self.done(f"block {i} forward", f"block {i + 1} forward" if i + 1 < L else "norm + LM head + loss")
            t = out[0] if isinstance(out, tuple) else out
            if getattr(t, "requires_grad", False):
                t.register_hook(lambda g: self._backward(i))

        return [b.register_forward_hook(lambda m, a, o, i=i: on_forward(m, a, o, i)) for i, b in enumerate(blocks)]

    def _backward(self, i: int) -> None:  # the gradient of block i's output exists: block i + 1 is done
        self.done("LM head + loss backward" if i == self.layers - 1 else f"block {i + 1} backward",
                  f"block {i} backward")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ------------------------------------------------------------------------------------------ the reference


class _TurnsLoss(torch.autograd.Function):
    """``loss_fn(h @ W^T)`` with the rank's whole logits, the ranks of ``group`` one at a time.

    Forward (no graph): for r = 0..P-1, rank r computes its logits and loss, then every rank enters a
    barrier; only ``h`` (B, S/P, H) and ``W`` (V, H) are kept. Backward: the same turns, rank r recomputing
    its logits with a graph and taking the gradient of its loss w.r.t. (h, W). The P ranks' logits
    (B, S/P, V, fp32, with their log-softmax and gradients) never exist at the same time."""

    @staticmethod
    def forward(ctx, h, weight, loss_fn, group):
        ctx.loss_fn, ctx.group = loss_fn, group
        ctx.save_for_backward(h, weight)
        loss = None
        for r in range(dist.get_world_size(group)):
            if r == dist.get_rank(group):
                loss = loss_fn(F.linear(h, weight))
            dist.barrier(group=group)
        return loss

    @staticmethod
    def backward(ctx, grad):
        h, weight = ctx.saved_tensors
        dh = dw = None
        for r in range(dist.get_world_size(ctx.group)):
            if r == dist.get_rank(ctx.group):
                with torch.enable_grad():
                    h_, w_ = h.detach().requires_grad_(), weight.detach().requires_grad_()
                    dh, dw = torch.autograd.grad(ctx.loss_fn(F.linear(h_, w_)), (h_, w_), grad)
                del h_, w_
            dist.barrier(group=ctx.group)
        return dh, dw, None, None


class ReferenceHead:
    """--compare's reference LM head + loss on a model parallelized with ``loss="full"`` and called
    WITHOUT labels: a pre-hook on ``lm_head`` takes its input ``h`` (B, S/P, H) and the head's weight
    (the root FSDP2 unit's, unsharded during the forward and the backward), computes
    ``model.loss_function`` (transformers' ForCausalLMLoss: the sum over the rank's ``shift_labels`` /
    the batch's ``num_items_in_batch``, as the model's own loss under seqpar) on the whole logits by
    :class:`_TurnsLoss`, and hands ``lm_head`` an empty slice of ``h``. ``loss``: the rank's part, its
    gradient local (the cp ranks' gradients sum to the whole sequence's, as in seqpar's loss pass);
    :meth:`value` is the all-reduced sum."""

    def __init__(self, model, group):
        head = model.get_output_embeddings()
        if getattr(head, "bias", None) is not None:
            raise ValueError(f"--compare's reference: {type(model).__name__}.lm_head has a bias; the reference "
                             f"computes F.linear(h, lm_head.weight) only")
        self.model, self.group, self.loss = model, group, None
        self.targets = self.count = None
        self.handle = head.register_forward_pre_hook(self._pre)

    def inputs(self, batch: dict) -> dict:
        """``batch`` (of ``seqpar.shard_batch``) without its labels; the targets kept for the head."""
        self.targets, self.count = batch["shift_labels"], batch["num_items_in_batch"]
        return {k: v for k, v in batch.items() if k not in ("labels", "shift_labels", "num_items_in_batch")}

    def _pre(self, module, args):
        (h,) = args  # (B, S/P, H)
        if self.loss is not None:
            raise RuntimeError("--compare's reference: lm_head called twice in one forward")
        cfg = self.model.config
        fn = functools.partial(self.model.loss_function, labels=None, vocab_size=cfg.vocab_size,
                               num_items_in_batch=self.count, shift_labels=self.targets)
        self.loss = _TurnsLoss.apply(h, module.weight, fn, self.group)
        return (h[:, :0],)

    def take(self):
        """The rank's loss of the last forward (0-d, with its graph), and the hook ready for the next."""
        loss, self.loss = self.loss, None
        if loss is None:
            raise RuntimeError("--compare's reference: lm_head did not run")
        return loss

    def value(self, loss) -> float:
        """The loss over the whole sequence: the ranks' parts summed."""
        total = loss.detach().clone()
        dist.all_reduce(total, group=self.group)
        return total.item()

    def remove(self) -> None:
        self.handle.remove()


# ------------------------------------------------------------------------------------------ one run


def run(args, mesh, features: Features, S: int, lead: bool, *, grads: bool = False) -> dict:
    """One training step of a fresh model on ``S`` tokens -> per-phase seconds, this rank's memory, loss
    (and the full gradients when ``grads``). ``features="reference"``: the step of "off" with the LM head +
    loss of :class:`ReferenceHead` (the model called without labels)."""
    from transformers import MistralForCausalLM

    import seqpar
    from seqpar.passes.tiled_mlp import tiled_modules

    cp = mesh["cp"].size()
    name = f"S={S:,} {RUN_NAMES[features]}"
    prog = Progress(lead, name, args.layers)
    sec: dict[str, float] = {}
    t = time.perf_counter()
    torch.manual_seed(args.seed)
    model = MistralForCausalLM(model_config(args))
    sec["build"] = time.perf_counter() - t
    prog.next("parallelize")
    t = time.perf_counter()
    seqpar.parallelize(model, mesh, layout=args.layout, method="ring", fsdp=True, precision=args.precision,
                       **options(features, args.offload))
    sec["parallelize"] = time.perf_counter() - t
    ref = ReferenceHead(model, mesh["cp"].get_group()) if features == "reference" else None

    def forward(batch: dict):
        """-> (the loss to differentiate, the logits the model returned)."""
        if ref is None:
            out = model(**batch)
            return out.loss, out.logits
        out = model(**ref.inputs(batch))
        return ref.take(), out.logits

    prog.done(None, "batch")
    t = time.perf_counter()

    def batch(n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, args.vocab, (1, n), generator=g)
        return seqpar.shard_batch({"input_ids": ids, "labels": ids.clone()}, mesh, layout=args.layout)

    b = batch(S, 1000 + args.seed)
    sec["batch"] = time.perf_counter() - t
    if args.optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    prog.done(None, f"warm-up ({128 * cp} tokens)")
    t = time.perf_counter()
    for g in opt.param_groups:  # the warm-up creates the optimizer's states; with lr = 0 nothing moves
        g["lr"] = 0.0
    forward(batch(128 * cp, 7))[0].backward()
    opt.step()
    for g in opt.param_groups:
        g["lr"] = args.lr
    opt.zero_grad(set_to_none=True)
    sec["warm-up"] = time.perf_counter() - t
    hooks = prog.hook_blocks(model.model.layers)
    prog.done(None, "block 0 forward")
    dist.barrier()
    _mem.trim()
    hwm = {}
    base = _mem.reset_peak()
    prog.counting = True
    t = prog.t = time.perf_counter()
    loss, logits = forward(b)  # logits (None when chunked, empty for the reference) not held through the backward
    chunked = logits is None
    del logits
    sec["forward"] = time.perf_counter() - t
    hwm["forward"] = _mem.status("VmHWM")
    prog.counting = False
    prog.done("norm + LM head + loss forward", "LM head + loss backward")
    _mem.reset_peak()
    t = prog.t = time.perf_counter()
    loss.backward()
    sec["backward"] = time.perf_counter() - t
    hwm["backward"] = _mem.status("VmHWM")
    prog.done("block 0 backward (+ embedding)", "optimizer")
    value = loss.item() if ref is None else ref.value(loss)
    del loss
    full = None
    if grads:  # outside the measured phases (a collective per parameter)
        full = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().clone()
                for n, p in model.named_parameters()}
    _mem.reset_peak()
    t = time.perf_counter()
    opt.step()
    sec["optimizer"] = time.perf_counter() - t
    hwm["optimizer"] = _mem.status("VmHWM")
    prog.done(None, "done")
    prog.close()
    for h in hooks:
        h.remove()
    if ref is not None:
        ref.remove()
    sec["step"] = sec["forward"] + sec["backward"] + sec["optimizer"]
    tiled = sum(1 for t in tiled_modules(model) if getattr(t, "calls", 1))  # MLPs that ran tiled
    want = options(features, args.offload)
    if chunked != (want["loss"] == "chunked") or (tiled > 0) != (want["mlp"] == "tiled"):
        raise RuntimeError(f"{name}: features not as asked: logits chunked {chunked}, tiled MLPs {tiled}, "
                           f"asked {want}")
    peak_phase = max(PHASES, key=hwm.get)
    res = dict(seconds=sec, baseline=base, hwm=hwm, peak=hwm[peak_phase], rise=hwm[peak_phase] - base,
               peak_phase=peak_phase, loss=value, chunked_loss=chunked, tiled_mlps=tiled, stages=prog.seconds)
    del model, opt, b
    _mem.trim()
    return res if full is None else dict(res, grads=full)


def gather(res: dict) -> list[dict]:
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, {k: v for k, v in res.items() if k != "grads"})
    return out


def row(args, features: str, S: int, cp: int, ranks: list[dict]) -> dict:
    """The JSON row of one run: the slowest rank's phase times, the largest rank's memory, the plan (none
    for the reference: its logits exist one rank at a time, which the plan does not model)."""
    mp = None if features == "reference" else predict(args, features, S, cp)
    pred = None if mp is None else predicted_rise(mp)
    sec = {k: max(r["seconds"][k] for r in ranks) for k in ranks[0]["seconds"]}
    stages = {k: max(r["stages"].get(k, 0.0) for r in ranks) for k in ranks[0]["stages"]}
    rise = max(r["rise"] for r in ranks)
    return dict(key=f"{features}-{S}-{args.precision}-{args.offload if features == 'on' else 'none'}",
                features=features, precision=args.precision,
                seq_len=S, cp=cp, tokens_per_rank=S // cp, options=options(features, args.offload),
                optimizer=args.optimizer, loss=ranks[0]["loss"], seconds=sec, stages=stages,
                chunked_loss=ranks[0]["chunked_loss"], tiled_mlps=ranks[0]["tiled_mlps"],
                rise_bytes=rise, peak_bytes=max(r["peak"] for r in ranks),
                baseline_bytes=max(r["baseline"] for r in ranks),
                per_rank=[dict(rise=r["rise"], peak=r["peak"], baseline=r["baseline"], phase=r["peak_phase"],
                               hwm=r["hwm"]) for r in ranks],
                measured_phase=max(ranks, key=lambda r: r["rise"])["peak_phase"],
                predicted_rise_bytes=pred, predicted_total_bytes=None if mp is None else mp.total,
                predicted_phase=None if mp is None else mp.peak_phase, predicted_items=None if mp is None else mp.items,
                error=None if mp is None else pred / rise - 1, measured=True)


def compare(full: dict, ref: dict, loss: float, loss_ref: float) -> dict:
    """Loss and per-parameter gradient relative differences of the gradients ``full`` against ``ref``."""
    rels = {}
    for n, g in ref.items():
        d = (full[n].double() - g.double()).norm().item()
        rels[n] = d / max(g.double().norm().item(), 1e-30)
    worst = max(rels, key=rels.get)
    lrel = abs(loss - loss_ref) / abs(loss_ref)
    return dict(loss_rel=lrel, grad_rel_max=rels[worst], grad_rel_worst_param=worst, params=len(rels),
                ok=lrel < LOSS_REL and rels[worst] < GRAD_REL)


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    import seqpar

    faulthandler.dump_traceback_later(args.timeout, exit=True)  # the whole job, whatever it waits on
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecation notes, per rank
    _mmap_threshold()
    torch.set_num_threads(1)
    seqpar.init_distributed(timeout=args.timeout)
    world, rank = dist.get_world_size(), dist.get_rank()
    lead = rank == 0
    if lead:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stdout)
    mesh = seqpar.init_mesh(cp=world)
    cfg = model_config(args)
    log.info("start: %d ranks (cp=%d, zigzag ring, FSDP2), S=%s, features %s%s, %s, Mistral vocab %d hidden %d "
             "layers %d heads %d/%d window %d", world, world, args.seq, f"on compared with {args.reference}"
             if args.compare else args.features, f" offload={args.offload}" if args.offload != "none" else "", args.optimizer,
             cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads,
             cfg.num_key_value_heads, cfg.sliding_window)
    t0 = time.perf_counter()
    rows, checks = [], []
    for S in args.seq:
        feats = ("on", *REFERENCE_RUNS[args.reference]) if args.compare else (args.features,)
        got = {}
        for f in feats:
            res = run(args, mesh, f, S, lead, grads=args.compare)
            if not math.isfinite(res["loss"]):
                raise FloatingPointError(f"S={S} features {f}: loss {res['loss']}")
            got[f] = res
            ranks = gather(res)
            if lead:
                rows.append(row(args, f, S, world, ranks))
                print(line(rows[-1]), flush=True)
        pairs = [("on", f) for f in feats[1:]] + ([("reference", "off")] if len(feats) == 3 else [])
        for which, against in pairs:
            c = dict(seq_len=S, run=which, against=against, **compare(got[which]["grads"], got[against]["grads"],
                                                                     got[which]["loss"], got[against]["loss"]))
            checks.append(c)
            if lead:
                print(f"{compared(c)}: loss rel {c['loss_rel']:.2e} (< {LOSS_REL:g}), worst gradient rel "
                      f"{c['grad_rel_max']:.2e} (< {GRAD_REL:g}, {c['grad_rel_worst_param']}) over {c['params']} "
                      f"parameters: {'OK' if c['ok'] else 'FAILED'}", flush=True)
        got.clear()
    if lead and args.json:
        path = Path(args.json)
        data = load_json(path, default={"rows": [], "compare": []})
        keys = {r["key"] for r in rows}
        data["rows"] = [r for r in data.get("rows", []) if r.get("key") not in keys] + rows
        done = {pair(c) for c in checks}
        data["compare"] = [c for c in data.get("compare", []) if pair(c) not in done] + checks
        data["meta"] = dict(model=dict(type="MistralForCausalLM", vocab=cfg.vocab_size, hidden=cfg.hidden_size,
                                       layers=cfg.num_hidden_layers, heads=cfg.num_attention_heads,
                                       kv_heads=cfg.num_key_value_heads, intermediate=cfg.intermediate_size,
                                       sliding_window=cfg.sliding_window, dtype="fp32", tied=False),
                            layout=args.layout, method="ring", fsdp=True, optimizer=args.optimizer,
                            cpus=os.cpu_count(), threads_per_rank=1, world=world,
                            load_avg_1min=os.getloadavg()[0], torch=torch.__version__)
        write_json(path, data)
        print(report(data, args, path.with_suffix(".png")), flush=True)
    bad = [c for c in checks if not c["ok"]]
    log.info("end: %d run(s) in %.0f s%s", len(rows) if lead else 0, time.perf_counter() - t0,
             "; compare FAILED" if bad else ("; compare OK" if checks else ""))
    dist.destroy_process_group()
    faulthandler.cancel_dump_traceback_later()
    if bad:
        sys.exit(1)


# ------------------------------------------------------------------------------------------ output


RUN_NAMES = {"on": "features on", "off": "features off", "reference": "the reference"}


def pair(c: dict) -> tuple:
    """A comparison's (S, run, against); rows written before the reference existed compared on with off."""
    return c["seq_len"], c.get("run", "on"), c.get("against", "off")


def compared(c: dict) -> str:
    S, which, against = pair(c)
    return f"compare S={S:,} ({RUN_NAMES[which]} vs {RUN_NAMES[against]}, fp32)"


def modelled(r: dict) -> str:
    """The plan beside a row's measurement; the reference (one rank's logits at a time) has none."""
    if r.get("predicted_rise_bytes") is None:
        return "model n/a (reference: logits one rank at a time)"
    return f"model {r['predicted_rise_bytes'] / GiB:.2f} GiB ({r['predicted_phase']})  error {r['error']:+.0%}"


def line(r: dict) -> str:
    s = r["seconds"]
    return (f"S={r['seq_len']:>9,} {RUN_NAMES[r['features']]:<13} loss {r['loss']:.4f}  forward {s['forward']:.1f} s  "
            f"backward {s['backward']:.1f} s  optimizer {s['optimizer']:.2f} s  | per-rank peak rise "
            f"{r['rise_bytes'] / GiB:.2f} GiB (absolute {r['peak_bytes'] / GiB:.2f}, {r['measured_phase']})  "
            f"{modelled(r)}\n"
            f"    stages (s): " + ", ".join(f"{k} {v:.1f}" for k, v in r.get("stages", {}).items()))


def _fit(rows: list[dict]):
    """Least-squares line rise = a + b S over measured rows -> (a, b), or None with fewer than 2."""
    xs, ys = [r["seq_len"] for r in rows], [r["rise_bytes"] for r in rows]
    if len(set(xs)) < 2:
        return None
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def refresh(data: dict, args) -> None:
    """Every row's prediction again from the current ``seqpar.plan_memory`` (the model may have changed
    since the row was measured)."""
    for r in data.get("rows", []):
        if r["features"] == "reference":  # not a configuration the plan models
            continue
        mp = predict(args, r["features"], r["seq_len"], r["cp"], r.get("precision", "fp32"))
        r.update(predicted_rise_bytes=predicted_rise(mp), predicted_total_bytes=mp.total,
                 predicted_phase=mp.peak_phase, predicted_items=mp.items,
                 error=predicted_rise(mp) / r["rise_bytes"] - 1)


def report(data: dict, args, png: Path | None) -> str:
    """The table of every row, the step without the features at the longest S (modelled, and
    extrapolated from the measured rows), the comparisons; the plot to ``png``."""
    refresh(data, args)
    rows = sorted(data.get("rows", []), key=lambda r: (list(RUN_NAMES).index(r["features"]), r.get("precision", "fp32"),
                                                       r["seq_len"]))
    out = ["", "| features | dtype | S | tokens/rank | loss | forward s | backward s | optimizer s | step s | "
           "peak rise / rank GiB | absolute peak GiB | model GiB | model error |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r["seconds"]
        ref = r["features"] == "reference"
        out.append(f"| {r['features']} | {r.get('precision', 'fp32')} | {r['seq_len']:,} | {r['tokens_per_rank']:,} | "
                   f"{r['loss']:.4f} | {s['forward']:.1f} | {s['backward']:.1f} | {s['optimizer']:.2f} | "
                   f"{s['step']:.1f} | {r['rise_bytes'] / GiB:.2f} | {r['peak_bytes'] / GiB:.2f} | "
                   + ("n/a | n/a |" if ref else f"{r['predicted_rise_bytes'] / GiB:.2f} | {r['error']:+.0%} |"))
    top = max([r["seq_len"] for r in rows] + [1 << 20])
    cp = rows[0]["cp"] if rows else 4
    without = {}
    for prec in sorted({r.get("precision", "fp32") for r in rows}):
        off = [r for r in rows if r["features"] == "off" and r.get("precision", "fp32") == prec]
        fit = _fit(off)
        mp = predict(args, "off", top, cp, prec)
        w = without[prec] = dict(seq_len=top, cp=cp, modelled_rise_bytes=predicted_rise(mp),
                                 modelled_phase=mp.peak_phase, logits_fp32_bytes_per_rank=top // cp * args.vocab * 4,
                                 extrapolated_rise_bytes=(fit[0] + fit[1] * top) if fit else None,
                                 measured_lengths=sorted(r["seq_len"] for r in off))
        ex = w["extrapolated_rise_bytes"]
        out += ["", f"Without the features, {prec}, S={top:,} (cp={cp}), not run: the fp32 logits alone "
                f"{w['logits_fp32_bytes_per_rank'] / 1e9:.1f} GB per rank; seqpar.plan_memory: peak rise "
                f"{w['modelled_rise_bytes'] / GiB:.1f} GiB per rank ({w['modelled_phase']})"
                + (f"; linear fit of the measured S = {', '.join(f'{x:,}' for x in w['measured_lengths'])}: "
                   f"{ex / GiB:.1f} GiB" if ex else "")]
    data["without_features"] = without
    if any(r["features"] == "reference" for r in rows):
        out.append("reference: --compare's features-off step with the model's own loss on the whole logits, one "
                   "rank at a time (its memory is not the plain step's; not modelled)")
    for c in sorted(data.get("compare", []), key=pair):
        out.append(f"{compared(c)}: loss rel {c['loss_rel']:.1e}, worst gradient rel {c['grad_rel_max']:.1e} "
                   f"({c['grad_rel_worst_param']}) over {c['params']} parameters: {'OK' if c['ok'] else 'FAILED'}")
    if png is not None:
        plot(rows, args, png)
    return "\n".join(out)


def plot(rows: list[dict], args, png: Path) -> None:
    plt = pyplot()
    if plt is None or not rows:
        return
    cp = rows[0]["cp"]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    grid = [1 << k for k in range(13, 21)]
    precs = sorted({r.get("precision", "fp32") for r in rows})
    for f, color, label in (("on", "C0", "chunked loss + tiled MLP + checkpoint"), ("off", "C3", "none of them")):
        for prec, marker, ls in (("bf16", "o", "--"), ("fp32", "s", ":")):
            if prec not in precs:
                continue
            sel = [r for r in rows if r["features"] == f and r.get("precision", "fp32") == prec]
            if sel:
                ax.scatter([r["seq_len"] for r in sel], [r["rise_bytes"] / GiB for r in sel], color=color,
                           marker=marker, zorder=3, label=f"{label}, {prec}: measured")
            ax.plot(grid, [predicted_rise(predict(args, f, x, cp, prec)) / GiB for x in grid], color=color, lw=1,
                    ls=ls, label=f"{label}, {prec}: seqpar.plan_memory")
    ax.axhline(24 / cp * 1e9 / GiB, color="grey", lw=0.8)
    ax.text(grid[0], 24 / cp * 1e9 / GiB * 1.08, f"24 GB machine / {cp} ranks", fontsize=7, color="grey")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(grid, [f"{x >> 10}k" if x < 1 << 20 else "1M" for x in grid])
    ax.minorticks_off()
    ax.set_xlabel(f"sequence length (cp={cp} CPU ranks)")
    ax.set_ylabel("peak rise per rank, one training step (GiB)")
    ax.set_title(f"one training step: Mistral {args.layers} x {args.hidden}, vocab {args.vocab // 1000}k, "
                 f"window {args.window}, FSDP2, zigzag ring", fontsize=9)
    ax.legend(fontsize=6.5)
    fig.tight_layout()
    save_figure(fig, png)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq", type=int, nargs="+", default=[1 << 20], help="global sequence lengths, one run each")
    p.add_argument("--features", choices=("on", "off"), default="on",
                   help="on: loss='chunked', mlp='tiled', checkpoint=True; off: loss='full', mlp='full', none")
    p.add_argument("--compare", action="store_true",
                   help="run features on and a reference, and compare the loss and every gradient")
    p.add_argument("--reference", choices=tuple(REFERENCE_RUNS), default=None,
                   help="--compare's reference: turns = the features-off step with the model's own loss on the whole "
                        "logits, one rank at a time (fits at S = 65,536); off = the features-off step itself; both = "
                        "both, each compared (and with each other)")
    p.add_argument("--offload", choices=("none", "cpu"), default="none", help="checkpoint offload (features on)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="bf16",
                   help="parallelize(precision=): bf16 = FSDP2 mixed precision (fp32 parameters, gradients reduced "
                        "in fp32, activations bf16); --compare runs fp32")
    p.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--layout", choices=("zigzag", "striped"), default="zigzag")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=1)
    p.add_argument("--intermediate", type=int, default=1024)
    p.add_argument("--window", type=int, default=512, help="Mistral sliding_window (tokens)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds for the whole job (every rank)")
    p.add_argument("--json", default=str(RESULTS / "million.json"), help="results file ('' for none)")
    p.add_argument("--report", action="store_true", help="only print the table and redo the plot from --json")
    args = p.parse_args()
    if args.reference is not None and not args.compare:
        p.error("--reference chooses --compare's reference run; pass --compare too, or drop --reference")
    args.reference = args.reference or "turns"
    if args.compare:
        args.precision = "fp32"  # the equality bounds are fp32's
    if args.report:
        path = Path(args.json)
        data = load_json(path)
        print(report(data, args, path.with_suffix(".png")))
        write_json(path, data)
        return
    worker(args)


if __name__ == "__main__":
    main()
