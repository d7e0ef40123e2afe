"""``seqpar.attention``: SDPA on sequence-sharded tensors. Validation, cross-rank agreement, dispatch to a method.

``attention`` is the public function. The other layers make the same call through :func:`attend`
with the options as one :class:`AttentionCall` and two internal extras: ``kept`` (replay a kept
forward, for checkpointing, see :class:`seqpar.methods.MethodFunction`) and ``record`` (per-step
kernel timing, for benchmarks).

Each call gets a number: how many attention calls this rank made on the group before. Ranks that
make the same calls agree on it, and the method tags its messages with it, so a rank that skipped a
call can never pair its blocks with another call's: the ranks' waits time out with a
:class:`seqpar.comm.CommError` naming the call number, the step and the peers.

``method="auto"`` resolves to a method of :data:`seqpar.vocab.METHODS` once per shape signature and
group, the same on every rank: :func:`seqpar.plan.compare` on the agreed shapes and the group's
:class:`seqpar.plan.Machine` (given with :func:`set_machine`, or measured once per group by
:func:`seqpar.plan.probe_machine`, a collective at the first auto call), then one small agreement on
the choice. The probe neither numbers calls nor uses their message tags.

``SEQPAR_CHECK_FINITE=1`` (read at each call; off by default, then it costs one dict lookup) checks
q, k, v and the output for NaN / Inf on every rank and raises on every rank, naming the call, the
tensor and the ranks that hold it (one small all-gather per check).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields, replace
from typing import Any

import torch

import seqpar.plan as _plan
from seqpar import masks as _masks
from seqpar import methods as _methods
from seqpar.comm import TransportGroup, agree, agreement_failed, gather_ints, gather_rows, judge
from seqpar.kernels import resolve_backend
from seqpar.layout import check_offsets, offsets_digest
from seqpar.mesh import group_rank_size, hybrid_groups, resolve_group
from seqpar.methods import ops as _ops
from seqpar.state import find_state, group_key, group_state
from seqpar.vocab import AUTO, BACKENDS, LAYOUT_CHOICES, METHOD_CHOICES, METHODS, check_choice

__all__ = ["attention", "attend", "AttentionCall", "set_machine", "auto_method"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_DTYPE_CODE = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float64: 4}
# What seqpar remembers between calls (call numbers, agreed signatures and documents, auto's machine
# and choices) is per group, owned by the group and bounded: seqpar.state.GroupState, not module state.


def _finite_check_on() -> bool:
    return os.environ.get("SEQPAR_CHECK_FINITE", "0") not in ("", "0")


def _check_compilable(group, record, method: str = "ring") -> None:
    """What a compiled graph cannot carry, refused by name (raised while tracing)."""
    if method == "hybrid":
        raise ValueError("method='hybrid' runs eagerly only, not under torch.compile (its ops would need the mesh's "
                         "two sub-groups); use method='ring' or 'ulysses' in the compiled region, or run it eagerly")
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
    if k.shape[:-1] != v.shape[:-1]:  # v may have its own head dim Dv (MLA: DeepSeek-V2/V3, MiniCPM3)
        raise ValueError(f"k and v must have the same leading dims (B, Hkv, S_local): k (..., Hkv, S_local, D), "
                         f"v (..., Hkv, S_local, Dv), got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[:-3] != k.shape[:-3]:
        raise ValueError(f"q and k must have the same batch dims, got {tuple(q.shape[:-3])} and {tuple(k.shape[:-3])}")
    hq, sq, d = q.shape[-3:]
    hkv, sk, dk = k.shape[-3:]
    if hq < 1 or hkv < 1:
        raise ValueError(f"q and k need at least one head (dim -3), got q: {hq}, k/v: {hkv}")
    if d < 1 or v.shape[-1] < 1:
        raise ValueError(f"q, k, v need head dims >= 1 (dim -1), got D={d} (q) and Dv={v.shape[-1]} (v)")
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
    check_choice("layout", layout, LAYOUT_CHOICES)
    check_choice("method", method, METHOD_CHOICES)
    check_choice("backend", backend, BACKENDS)
    if method != AUTO:  # auto only ever resolves to a method that takes the shapes
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


def _signature(q, k, v, is_causal, layout, method) -> tuple:
    """10 ints every rank must agree on: (B, Hq, S_local, D, Hkv, Dv, dtype, causal, layout, method)."""
    return (int(math.prod(q.shape[:-3])), *(int(x) for x in q.shape[-3:]), int(k.shape[-3]), int(v.shape[-1]),
            _DTYPE_CODE[q.dtype], int(is_causal), LAYOUT_CHOICES.index(layout), METHOD_CHOICES.index(method))


_SIGNATURE = "(B, Hq, S_local, D, Hkv, Dv, dtype, causal, layout, method)"
_MASK_SIGNATURE = "(window left, window right, softcap)"
_DOCS_SIGNATURE = "(len(cu_seqlens), checksum(cu_seqlens), cu_seqlens valid)"
_WIDTH = _SIGNATURE.count(",") + _MASK_SIGNATURE.count(",") + 2  # ints of a signature (without the documents)


class _Unread:
    """The offsets of a cu_seqlens tensor not read yet: the agreement reads them (with its own result)."""


_UNREAD = _Unread()


def _offsets(g, cu_seqlens, seq_len: int, world: int):
    """A call's ``cu_seqlens`` -> host offsets (a tuple; checked), read at most once per tensor and group:
    a tensor the ranks already agreed on is found by identity (no read); in a multi-rank group a new
    tensor is :data:`_UNREAD` (its type checked here, its values read by :func:`_agree`, in the same host
    read as the agreement's result); with one rank it is read here, once."""
    if cu_seqlens is None:
        return None
    if not isinstance(cu_seqlens, torch.Tensor):
        return check_offsets(cu_seqlens, seq_len)  # host values: no read
    st = group_state(g)
    known = st.offsets(cu_seqlens, seq_len)
    if known is not None:
        return known
    if cu_seqlens.ndim != 1 or cu_seqlens.is_floating_point() or cu_seqlens.is_complex() \
            or cu_seqlens.dtype == torch.bool:
        check_offsets(cu_seqlens, seq_len)  # raises the TypeError (dims / dtype: no read)
    if world > 1:
        return _UNREAD
    offsets = check_offsets(cu_seqlens, seq_len)  # one process: the one read of this tensor
    st.remember(cu_seqlens, seq_len, offsets)
    return offsets


def _agree(g, signature: tuple | None, error: Exception | None, cu=None, offsets=None, seq_len: int = 0):
    """Once per new signature and once per new ``cu_seqlens`` (per group): all ranks compare them in one
    small all-gather, and any rank's error fails them all. ``signature``: :func:`_signature`'s ints and the
    mask's (seqpar.masks.mask_signature), None on a rank with an ``error``; ``offsets``: :func:`_offsets`'s.
    The documents travel as :func:`seqpar.layout.offsets_digest` (count, checksum, valid), computed where
    the tensor lives, and an unread tensor's values come back in the same host read as the gathered rows:
    at most one host sync per new ``cu_seqlens``, none for a repeated one. Returns the host offsets."""
    st = group_state(g)
    unread = error is None and offsets is _UNREAD
    if error is None and not unread and st.agreed.get(signature) and (cu is None or st.offsets(cu, seq_len)):
        return offsets
    keep = None
    if error is not None:
        row = torch.zeros(1 + _WIDTH + 3, dtype=torch.int64)
        row[0] = 1
    elif unread:
        keep = cu
        row = torch.cat([torch.tensor([0, *signature], dtype=torch.int64, device=cu.device),
                         offsets_digest(cu, seq_len)])
    else:
        docs = torch.tensor([0, 0, 1]) if offsets is None else offsets_digest(torch.tensor(offsets), seq_len)
        row = torch.cat([torch.tensor([0, *signature], dtype=torch.int64), docs])
    st.agreements += 1
    try:
        rows, values = gather_rows(row, g, keep)
    except RuntimeError as e:
        agreement_failed("seqpar.attention", error, e)
    if unread:
        offsets = tuple(values)
        if not rows[group_rank_size(g)[0]][-1]:  # the digest found them invalid: the host check says why
            try:
                check_offsets(list(values), seq_len)
                error = ValueError(f"cu_seqlens: invalid offsets {list(values)}")  # not reached: the checks agree
            except (TypeError, ValueError) as e:
                error = e
    for row_ in rows:  # a rank whose offsets are invalid rejected its input
        if not row_[0] and not row_[-1]:
            row_[0] = 1
    names = f"{_SIGNATURE} + {_MASK_SIGNATURE} + {_DOCS_SIGNATURE}"
    judge(rows, error, what="seqpar.attention", disagreement=lambda rows: (
        f"ranks disagree on {names}: {dict(enumerate(rows))}. Every rank of the group must pass tensors of the "
        f"same shape (the sequence split evenly) and the same mask arguments (cu_seqlens: the global offsets)"))
    st.agreed.put(signature, True)
    if cu is not None:
        st.remember(cu, seq_len, offsets)
    return offsets


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
    window_size: tuple[int, int] = (-1, -1)
    cu_seqlens: Any = None  # 1-D int tensor or list of global document offsets
    softcap: float = 0.0
    sinks: Any = None  # (Hq,) attention sinks (gpt-oss), or None


_MASK_FIELDS = ("window_size", "cu_seqlens", "softcap", "sinks")  # checked by masks.mask_spec / _check_sinks


def _check_sinks(sinks, q: torch.Tensor) -> None:
    if sinks is None:
        return
    if not isinstance(sinks, torch.Tensor) or not sinks.is_floating_point():
        raise TypeError(f"sinks must be a floating-point tensor (Hq,) of per-head sink logits, got "
                        f"{type(sinks).__name__ if not isinstance(sinks, torch.Tensor) else sinks.dtype}")
    if sinks.shape != (q.shape[-3],):
        raise ValueError(f"sinks must have shape (Hq,) = ({q.shape[-3]},), one logit per query head, got "
                         f"{tuple(sinks.shape)}")
    if sinks.device != q.device:
        raise ValueError(f"sinks must be on q's device {q.device}, got {sinks.device}")


def _options(call: AttentionCall) -> dict[str, Any]:
    """The options _validate checks: every field but the group and the mask (shallow: not the group)."""
    return {f.name: getattr(call, f.name) for f in fields(call) if f.name not in ("group", *_MASK_FIELDS)}


def attention(
    q: torch.Tensor,  # (B, Hq, S_local, D)
    k: torch.Tensor,  # (B, Hkv, S_local, D)
    v: torch.Tensor,  # (B, Hkv, S_local, Dv)
    *,
    group=None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    layout: str = "zigzag",
    method: str = "ring",
    backend: str = "auto",
    window_size: tuple[int, int] = (-1, -1),
    cu_seqlens: torch.Tensor | None = None,
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
    return_lse: bool = False,
    cache=None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact softmax attention over a sequence sharded across ``group``; drop-in for SDPA.

    q, k, v are this rank's shards (``seqpar.shard`` with ``layout``), any leading batch dims,
    heads, local sequence, head dim; any strides. v may have its own head dim Dv (MLA: DeepSeek-V2/V3,
    MiniCPM3); the default scale is 1/sqrt(D) of q. Returns this rank's shard of the output,
    (B, Hq, S_local, Dv) in q's dtype. ``is_causal`` masks by *global* position. GQA/MQA K/V travel
    the ring un-repeated. ``backend``: "auto" (Triton on CUDA when available and its self-check on this device and dtype passed, else aten), "aten",
    "reference", "triton". Bad input raises before any communication. ``return_lse=True`` also
    returns the log-sum-exp of each query row, (B, Hq, S_local) fp32, not differentiable (what
    ``seqpar.parallelize`` keeps so activation checkpointing need not re-run the ring).

    Masks, in *global* positions, combining with each other, ``is_causal``, every layout and GQA:
    ``window_size=(left, right)``: query i sees key j iff ``i - left <= j <= i + right`` (-1 =
    unbounded; flash-attn's convention); ``cu_seqlens``: packed documents, 1-D int offsets
    ``[0, s1, s1+s2, ..., S]`` (the same on every rank; attention stays inside a document);
    ``softcap``: logits -> ``softcap * tanh(logits / softcap)`` (0 = off). Tiles with nothing
    visible are skipped, and the ring stops early when no rank has work left. ``sinks`` (Hq,):
    attention sinks (gpt-oss's ``s_aux``): one extra logit per head, with value 0, in every row's
    softmax; differentiable.

    ``cache``: a :class:`seqpar.inference.KVShard` of this layer (made with this ``group`` and ``layout``),
    for hand-written decode loops. Empty: the call is the prompt's (prefill, as above) and the shard keeps
    this rank's k, v. Filled: q, k, v are the new tokens' (B, H, T, D), the same on every rank (one token, or
    a chunk: pass-Q); their K/V go to the least loaded ranks and the output, (B, Hq, T, Dv) the same on every
    rank, is the attention over the whole cache (:func:`seqpar.inference.decode_attention`; ``return_lse`` is
    not available there; a chunk sharded under the layout: :func:`seqpar.inference.extend_sharded`).
    """
    if cache is not None:
        return _cached(q, k, v, cache, group=group, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa,
                       layout=layout, method=method, backend=backend, window_size=window_size,
                       cu_seqlens=cu_seqlens, softcap=softcap, sinks=sinks, return_lse=return_lse)
    call = AttentionCall(group, is_causal, scale, enable_gqa, layout, method, backend, window_size, cu_seqlens,
                         softcap, sinks)
    return attend(q, k, v, call, return_lse=return_lse)


def _cached(q, k, v, cache, *, group, layout, method, return_lse, **options):
    """``attention(..., cache=)``: prefill into an empty :class:`seqpar.inference.KVShard`, else decode on it."""
    from seqpar.inference import KVShard, decode_attention  # the layer above: imported on use

    if not isinstance(cache, KVShard):
        raise TypeError(f"cache must be a seqpar.inference.KVShard (one per layer), got {type(cache).__name__}")
    if resolve_group(group) is not cache.group or layout != cache.layout:
        raise ValueError(f"cache: this KVShard was made for another group or layout ({cache.layout!r}) than the "
                         f"call's (layout {layout!r}); make one KVShard(group, layout) per layer for this sequence")
    if cache.length == 0:  # prefill: the prompt's shards, then the shard keeps this rank's k, v
        out = attention(q, k, v, group=group, layout=layout, method=method, return_lse=return_lse, **options)
        cache.fill(k, v)
        return out
    if return_lse:
        raise ValueError("return_lse=True with a filled cache (decode): not available; call without it")
    return decode_attention(q, k, v, cache, **options)


def attend(
    q: torch.Tensor,  # (..., Hq, S_local, D)
    k: torch.Tensor,  # (..., Hkv, S_local, D)
    v: torch.Tensor,  # (..., Hkv, S_local, Dv)
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
    opts = _options(call)
    compiling = torch.compiler.is_compiling()
    error = sub = offsets = None  # sub: method="hybrid"'s (ulysses, ring) sub-groups of the mesh passed as group
    seq_len = q.shape[-2] * world if isinstance(q, torch.Tensor) and q.ndim >= 3 else 0
    mask = lambda cu: _masks.mask_spec(is_causal=call.is_causal, window_size=call.window_size,  # noqa: E731
                                       cu_seqlens=cu, softcap=call.softcap, seq_len=seq_len)
    try:
        backend = _validate(q, k, v, world=world, **opts)
        if compiling and call.cu_seqlens is not None:
            raise ValueError("cu_seqlens under torch.compile: the document offsets are data the compiled graph "
                             "cannot plan tiles from; run the packed-document attention eagerly")
        offsets = _offsets(g, call.cu_seqlens, seq_len, world)  # a repeated tensor: no read
        spec = mask(None if offsets is _UNREAD else offsets)
        _check_sinks(call.sinks, q)
        if compiling and call.sinks is not None:
            raise ValueError("sinks under torch.compile: not an op argument yet; run attention sinks eagerly")
        if call.method == "hybrid":  # checked here: before any communication
            sub = _methods.HybridMethod.groups(call.group, hq=q.shape[-3], hkv=k.shape[-3])
        if kept is not None and (kept[0].shape != (*q.shape[:-1], v.shape[-1]) or kept[1].shape != q.shape[:-1]):
            raise ValueError(f"kept (out, lse) of shapes {tuple(kept[0].shape)}, {tuple(kept[1].shape)} does not "
                             f"match q {tuple(q.shape)} and v {tuple(v.shape)}: replay only the forward call that "
                             f"produced it")
        if compiling:
            _check_compilable(g, record, call.method)
    except (TypeError, ValueError) as e:
        if world == 1 or compiling:
            raise
        error = e
    if world > 1 and not compiling:
        sig = (_signature(q, k, v, call.is_causal, call.layout, call.method) + _masks.mask_signature(spec)
               if error is None else None)
        read = _agree(g, sig, error, call.cu_seqlens, offsets, seq_len)
        if offsets is _UNREAD:
            spec = mask(read)
    if call.method == AUTO:
        call = replace(call, method=_resolve_auto(call.group, g, world, q, k, v, call, backend, compiling))
        if call.method == "hybrid":  # chosen only for a mesh with a ulysses degree that splits the heads
            sub = _methods.HybridMethod.groups(call.group, hq=q.shape[-3], hkv=k.shape[-3])
    lead = q.shape[:-3]
    q4, k4, v4 = (t.reshape(-1, *t.shape[-3:]) for t in (q, k, v))
    if kept is not None:
        kept = (kept[0].reshape(*q4.shape[:-1], v.shape[-1]), kept[1].reshape(q4.shape[:-1]))
    scale = 1.0 / math.sqrt(q.shape[-1]) if call.scale is None else float(call.scale)
    if compiling:  # registered ops: no host-side bookkeeping in the graph (see seqpar.methods.ops)
        args = (call.method, _ops.group_name(g), call.layout, spec.causal, list(spec.window), spec.softcap, scale,
                backend)
        if kept is None:
            out, lse = _ops.attention_fwd(q4, k4, v4, *args)
        else:
            out, lse = _ops.attention_replay(q4, k4, v4, *kept, *args), kept[1]
    else:
        number = group_state(g).next_call()
        check_finite = _finite_check_on()
        if check_finite:
            _check_finite([("q", q), ("k", k), ("v", v)], g, world, number, ValueError)
        impl = _methods.build(call.method, g if sub is None else sub, layout=call.layout, mask=spec,
                              scale=scale, backend=backend, record=record, call=number)
        out, lse = _methods.MethodFunction.apply(q4, k4, v4, impl, kept, call.sinks)
        if check_finite:
            _check_finite([("the output", out)], g, world, number, FloatingPointError)
    out = out.reshape(*lead, *out.shape[-3:])
    if return_lse:
        return out, lse.reshape(*lead, *lse.shape[-2:])
    return out


# ---------------------------------------------------------------------------------------------- method="auto"

_DTYPE_BYTES = {1: 2, 2: 2, 3: 4, 4: 8}  # _DTYPE_CODE -> bytes per element


def set_machine(machine: "_plan.Machine | None", group=None) -> None:
    """The :class:`seqpar.plan.Machine` that ``method="auto"`` plans with on ``group`` (any ``group=``
    argument of :func:`attention`), instead of probing it; ``None``: probe again at the next auto call.
    Call it on every rank of the group with the same machine (the choice is then agreed once per shape);
    it forgets the group's earlier auto choices. With a machine given, auto also resolves under torch.compile."""
    if machine is not None and not isinstance(machine, _plan.Machine):
        raise TypeError(f"machine must be a seqpar.plan.Machine or None, got {type(machine).__name__}")
    st = group_state(resolve_group(group))
    st.machine = machine
    st.auto.clear()


def _hybrid_sub_group(group_arg, g):
    """(U, the ulysses sub-group) when ``group_arg`` is a mesh of ``init_mesh(cp, ulysses=U)``, else (None, None)."""
    if g is None or isinstance(g, TransportGroup):
        return None, None
    try:
        ug, _ = hybrid_groups(group_arg)
    except (TypeError, ValueError):
        return None, None
    return (None, None) if ug is None else (torch.distributed.get_world_size(ug), ug)


def _choose(sig: tuple, world: int, machine: "_plan.Machine", ulysses: int | None, transport: bool) -> str:
    """The fastest applicable method for the agreed signature on ``world`` ranks (deterministic)."""
    B, Hq, s, D, Hkv, Dv, dtype_code, causal, layout, _ = sig
    names = tuple(m for m in _plan.MODELLED if m in METHODS and not (transport and m in ("ulysses", "hybrid")))
    c = _plan.compare(_plan.ModelShape(heads=Hq, kv_heads=Hkv, head_dim=D, v_head_dim=Dv), s * world, world, machine,
                      methods=names,
                      batch=B, dtype_bytes=_DTYPE_BYTES[dtype_code], causal=bool(causal), layout=LAYOUT_CHOICES[layout],
                      ulysses=ulysses, checkpoint="none")
    return c.best


@torch.compiler.assume_constant_result
def _compiled_choice(key: tuple, world: int) -> str:
    """Under torch.compile: the eager choice of this signature, or one from a machine given with
    :func:`set_machine` (no collective; never hybrid, which runs eagerly only), or "" (refused). Run once
    while tracing, a constant in the graph."""
    st = find_state(key[0])  # the live group of this name (the trace has the name, not the object)
    if st is None:
        return ""
    if st.auto.get(key[1], "hybrid") != "hybrid":
        return st.auto.get(key[1])
    return "" if st.machine is None else _choose(key[1], world, st.machine, None, False)


def _resolve_auto(group_arg, g, world: int, q, k, v, call: AttentionCall, backend: str, compiling: bool) -> str:
    """method="auto" -> a method of METHODS, the same on every rank (a collective the first time per signature)."""
    if world == 1:
        return "ring"  # one process: no communication, every method is the same single-device attention
    sig = _signature(q, k, v, call.is_causal, call.layout, AUTO)
    if compiling:
        choice = _compiled_choice((group_key(g), sig), world)
        if not choice:
            raise ValueError("method='auto' under torch.compile: the choice needs a probe of the group (a collective), "
                             "which cannot run while tracing. Give the machine with seqpar.set_machine(machine, group) "
                             "on every rank, or make one eager call with these shapes first (or seqpar.auto_method), "
                             "or pass a concrete method")
        return choice
    st = group_state(g)
    if st.auto.get(sig) is not None:
        return st.auto.get(sig)
    ulysses, ulysses_group = _hybrid_sub_group(group_arg, g)
    machine = st.machine
    if machine is None:
        machine = st.machine = _plan.probe_machine(g, device=q.device, dtype=q.dtype, head_dim=q.shape[-1],
                                                   backend=backend, ulysses_group=ulysses_group)
    choice = _choose(sig, world, machine, ulysses, isinstance(g, TransportGroup))
    agree(g, [METHODS.index(choice)], None, what="seqpar.attention(method='auto')", disagreement=lambda rows: (
        f"ranks resolved method='auto' to different methods {[METHODS[r[0]] for r in rows]}: give every rank the "
        f"same machine (seqpar.set_machine), or pass a concrete method"))
    st.auto.put(sig, choice)
    return choice


def auto_method(
    q: torch.Tensor,  # (B, Hq, S_local, D)
    k: torch.Tensor,  # (B, Hkv, S_local, D)
    v: torch.Tensor,  # (B, Hkv, S_local, Dv)
    *,
    group=None,
    is_causal: bool = False,
    enable_gqa: bool = False,
    layout: str = "zigzag",
    backend: str = "auto",
) -> str:
    """The method ``attention(q, k, v, method="auto", ...)`` runs with these shapes on ``group`` (a
    collective the first time per shape and group: validation, agreement, probe). Computes no attention;
    an eager call here lets a later compiled call with the same shapes use the choice."""
    call = AttentionCall(group, is_causal, None, enable_gqa, layout, AUTO, backend)
    g = resolve_group(group)
    _, world = group_rank_size(g)
    opts = _options(call)
    error = None
    try:
        resolved_backend = _validate(q, k, v, world=world, **opts)
    except (TypeError, ValueError) as e:
        if world == 1:
            raise
        error, resolved_backend = e, backend
    if world > 1:
        _agree(g, _signature(q, k, v, is_causal, layout, AUTO) + _masks.mask_signature(_masks.MaskSpec())
               if error is None else None, error)
    return _resolve_auto(group, g, world, q, k, v, call, resolved_backend, False)
