"""``seqpar.attention``: SDPA on sequence-sharded tensors. Validation, cross-rank agreement, dispatch to a method.

``attention`` is the public function. The other layers make the same call through :func:`attend`
with the options as one :class:`AttentionCall` and two internal extras: ``kept`` (replay a kept
forward, for checkpointing, see :class:`seqpar.methods.MethodFunction`) and ``record`` (per-step
kernel timing, for benchmarks).

Each call gets a number: how many attention calls this rank made on the group before. Ranks that
make the same calls agree on it, and the method tags its messages with it, so a rank that skipped a
call can never pair its blocks with another call's: the ranks' waits time out with a
:class:`seqpar.comm.CommError` naming the call number, the step and the peers.

``SEQPAR_CHECK_FINITE=1`` (read at each call; off by default, then it costs one dict lookup) checks
q, k, v and the output for NaN / Inf on every rank and raises on every rank, naming the call, the
tensor and the ranks that hold it (one small all-gather per check).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields
from typing import Any

import torch

from seqpar import methods as _methods
from seqpar.comm import agree, gather_ints
from seqpar.kernels import resolve_backend
from seqpar.mesh import group_rank_size, resolve_group
from seqpar.methods import ops as _ops
from seqpar.vocab import BACKENDS, LAYOUTS, METHODS, check_choice

__all__ = ["attention", "attend", "AttentionCall"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_DTYPE_CODE = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float64: 4}
# Shape signatures every rank of a group has already agreed on: (id(group), signature). A cache,
# not configuration: it only saves the agreement collective on repeated calls with the same shapes.
_AGREED: set[tuple] = set()
# Attention calls made so far on each group by this rank: id(group) -> count. Bookkeeping, not
# configuration: it numbers the calls (and their message tags) identically on ranks that make the same calls.
_CALLS: dict[int, int] = {}


def _finite_check_on() -> bool:
    return os.environ.get("SEQPAR_CHECK_FINITE", "0") not in ("", "0")


def _next_call(group) -> int:
    n = _CALLS.get(id(group), 0)
    _CALLS[id(group)] = n + 1
    return n


def _check_compilable(group, record) -> None:
    """What a compiled graph cannot carry, refused by name (raised while tracing)."""
    if group is not None and not isinstance(group, torch.distributed.ProcessGroup):
        raise TypeError(f"group: {type(group).__name__} is not a torch.distributed group, so it cannot run under "
                        f"torch.compile; run this transport eagerly (outside the compiled region)")
    if record is not None:
        raise ValueError("record: the per-step timing hook works eagerly only, not under torch.compile")
    if _finite_check_on():
        raise ValueError("SEQPAR_CHECK_FINITE=1 checks eagerly only (it all-gathers flags); unset it under "
                         "torch.compile, or run the model eagerly to find the non-finite values")


def _check_finite(named: list[tuple[str, torch.Tensor]], group, world: int, call: int, error: type) -> None:
    """Raise ``error`` on every rank if any rank holds a non-finite value in one of ``named``."""
    local = [int(not bool(torch.isfinite(t).all())) for _, t in named]
    rows = gather_ints(local, group) if world > 1 else [local]
    bad = {name: [r for r, row in enumerate(rows) if row[i]] for i, (name, _) in enumerate(named)}
    bad = {name: ranks for name, ranks in bad.items() if ranks}
    if bad:
        where = "; ".join(f"{name} on rank(s) {ranks}" for name, ranks in bad.items())
        raise error(f"seqpar.attention call #{call} on this group: non-finite values (NaN or Inf) in {where} "
                    f"(checked because SEQPAR_CHECK_FINITE=1)")


def _validate(q, k, v, *, is_causal, scale, enable_gqa, layout, method, backend, world) -> str:
    """Local checks (the same on every rank for the same inputs); returns the resolved backend."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.ndim < 3:
            raise ValueError(f"{name} must have at least 3 dims (..., H, S_local, D); got shape {tuple(t.shape)}")
        if t.dtype not in _FLOATS:
            raise TypeError(f"{name} must be fp16, bf16, fp32 or fp64, got {t.dtype}")
        if t.device.type == "meta":
            raise ValueError(f"{name} is on the meta device (shapes without data): attention needs real tensors; "
                             f"materialise the model (e.g. to_empty + init) before running it")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got q={q.dtype}, k={k.dtype}, v={v.dtype}; cast them first")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got q={q.device}, k={k.device}, v={v.device}")
    if not (q.ndim == k.ndim == v.ndim):
        raise ValueError(f"q, k, v must have the same number of dims, got {q.ndim}, {k.ndim}, {v.ndim}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape (B, Hkv, S_local, D), got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    if q.shape[:-3] != k.shape[:-3]:
        raise ValueError(f"q and k must have the same batch dims, got {tuple(q.shape[:-3])} and {tuple(k.shape[:-3])}")
    hq, sq, d = q.shape[-3:]
    hkv, sk, dk = k.shape[-3:]
    if hq < 1 or hkv < 1:
        raise ValueError(f"q and k need at least one head (dim -3), got q: {hq}, k/v: {hkv}")
    if d < 1:
        raise ValueError(f"q, k, v need a head dim D >= 1 (dim -1), got {d}")
    if d != dk:
        raise ValueError(f"q and k must have the same head dim, got {d} and {dk}")
    if sq != sk:
        raise ValueError(f"q and k must have the same local sequence length (both sharded with the same layout), "
                         f"got {sq} and {sk}")
    if hq % hkv:
        raise ValueError(f"the number of query heads of q ({hq}) must be a multiple of the number of kv heads of "
                         f"k and v ({hkv})")
    if hq != hkv and not enable_gqa:
        raise ValueError(f"q has {hq} heads and k/v have {hkv}: pass enable_gqa=True for grouped-query attention")
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")
    if not isinstance(enable_gqa, bool):
        raise TypeError(f"enable_gqa must be a bool, got {type(enable_gqa).__name__}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale)):
        raise TypeError(f"scale must be a finite float or None, got {scale!r}")
    check_choice("layout", layout, LAYOUTS)
    check_choice("method", method, METHODS)
    check_choice("backend", backend, BACKENDS)
    _methods.check(method, hq=hq, hkv=hkv, s_local=sq, world=world, layout=layout)
    if sq < 1:
        raise ValueError(f"q, k, v have local sequence length S_local={sq} (dim -2): pass at least one token per rank")
    if layout == "zigzag" and sq % 2:
        raise ValueError(
            f"layout='zigzag' needs an even local length (the global length a multiple of 2P={2 * world}); got "
            f"S_local={sq}: pad the global sequence by {(-sq * world) % (2 * world)} tokens to "
            f"{sq * world + (-sq * world) % (2 * world)}, or use layout='striped'"
        )
    return resolve_backend(backend, q.device)


def _signature(q, k, is_causal, layout, method) -> tuple:
    """9 ints every rank must agree on: (B, Hq, S_local, D, Hkv, dtype, causal, layout, method)."""
    return (int(math.prod(q.shape[:-3])), *(int(x) for x in q.shape[-3:]), int(k.shape[-3]),
            _DTYPE_CODE[q.dtype], int(is_causal), LAYOUTS.index(layout), METHODS.index(method))


def _agree(group, signature: tuple, error: Exception | None) -> None:
    """Once per new shape signature: all ranks compare signatures; any rank's error fails them all."""
    key = (id(group), signature)
    if error is None and key in _AGREED:
        return
    agree(group, list(signature), error, what="seqpar.attention", disagreement=lambda rows: (
        f"ranks disagree on (B, Hq, S_local, D, Hkv, dtype, causal, layout, method): {dict(enumerate(rows))}. "
        f"Every rank of the group must pass tensors of the same shape (the sequence split evenly)"))
    _AGREED.add(key)


@dataclass(frozen=True)
class AttentionCall:
    """The options of one attention call, as :func:`attention` takes them (``group`` unresolved)."""

    group: Any = None
    is_causal: bool = False
    scale: float | None = None
    enable_gqa: bool = False
    layout: str = "zigzag"
    method: str = "ring"
    backend: str = "auto"


def attention(
    q: torch.Tensor,  # (B, Hq, S_local, D)
    k: torch.Tensor,  # (B, Hkv, S_local, D)
    v: torch.Tensor,  # (B, Hkv, S_local, D)
    *,
    group=None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    layout: str = "zigzag",
    method: str = "ring",
    backend: str = "auto",
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact softmax attention over a sequence sharded across ``group``; drop-in for SDPA.

    q, k, v are this rank's shards (``seqpar.shard`` with ``layout``), any leading batch dims,
    heads, local sequence, head dim; any strides. Returns this rank's shard of the output,
    (B, Hq, S_local, D) in q's dtype. ``is_causal`` masks by *global* position. GQA/MQA K/V travel
    the ring un-repeated. ``backend``: "auto" (Triton on CUDA when available, else aten), "aten",
    "reference", "triton". Bad input raises before any communication. ``return_lse=True`` also
    returns the log-sum-exp of each query row, (B, Hq, S_local) fp32, not differentiable (what
    ``seqpar.parallelize`` keeps so activation checkpointing need not re-run the ring).
    """
    call = AttentionCall(group, is_causal, scale, enable_gqa, layout, method, backend)
    return attend(q, k, v, call, return_lse=return_lse)


def attend(
    q: torch.Tensor,  # (..., Hq, S_local, D)
    k: torch.Tensor,  # (..., Hkv, S_local, D)
    v: torch.Tensor,  # (..., Hkv, S_local, D)
    call: AttentionCall,
    *,
    return_lse: bool = False,
    kept: tuple[torch.Tensor, torch.Tensor] | None = None,
    record: _methods.Recorder | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """:func:`attention` with its options as ``call``, plus ``kept`` = the ``(out, lse)`` an earlier
    call with these inputs returned (``return_lse=True``): replayed, no forward communication, the
    backward as usual; and ``record``: a per-step kernel-time hook (:class:`seqpar.methods.StepRecord`)."""
    g = resolve_group(call.group)
    _, world = group_rank_size(g)
    opts = {f.name: getattr(call, f.name) for f in fields(call) if f.name != "group"}  # shallow: not the group
    compiling = torch.compiler.is_compiling()
    error = None
    try:
        backend = _validate(q, k, v, world=world, **opts)
        if kept is not None and (kept[0].shape != q.shape or kept[1].shape != q.shape[:-1]):
            raise ValueError(f"kept (out, lse) of shapes {tuple(kept[0].shape)}, {tuple(kept[1].shape)} does not "
                             f"match q {tuple(q.shape)}: replay only the forward call that produced it")
        if compiling:
            _check_compilable(g, record)
    except (TypeError, ValueError) as e:
        if world == 1 or compiling:
            raise
        error = e
    if world > 1 and not compiling:
        sig = _signature(q, k, call.is_causal, call.layout, call.method) if error is None else (0,) * 9
        _agree(g, sig, error)
    lead = q.shape[:-3]
    q4, k4, v4 = (t.reshape(-1, *t.shape[-3:]) for t in (q, k, v))
    if kept is not None:
        kept = (kept[0].reshape(q4.shape), kept[1].reshape(q4.shape[:-1]))
    scale = 1.0 / math.sqrt(q.shape[-1]) if call.scale is None else float(call.scale)
    if compiling:  # registered ops: no host-side bookkeeping in the graph (see seqpar.methods.ops)
        args = (call.method, _ops.group_name(g), call.layout, call.is_causal, scale, backend)
        if kept is None:
            out, lse = _ops.attention_fwd(q4, k4, v4, *args)
        else:
            out, lse = _ops.attention_replay(q4, k4, v4, *kept, *args), kept[1]
    else:
        number = _next_call(g)
        check_finite = _finite_check_on()
        if check_finite:
            _check_finite([("q", q), ("k", k), ("v", v)], g, world, number, ValueError)
        impl = _methods.build(call.method, g, layout=call.layout, causal=call.is_causal, scale=scale,
                              backend=backend, record=record, call=number)
        out, lse = _methods.MethodFunction.apply(q4, k4, v4, impl, kept)
        if check_finite:
            _check_finite([("the output", out)], g, world, number, FloatingPointError)
    out = out.reshape(*lead, *out.shape[-3:])
    if return_lse:
        return out, lse.reshape(*lead, *lse.shape[-2:])
    return out
