"""Fused Triton block attention: online-softmax forward (plain and accumulating) and backward.

The ``triton`` backend of :mod:`seqpar.kernels`: same contract as ``reference`` and ``aten`` (see the
package docstring), plus :func:`forward_accumulate`, which merges a tile into the ring's running
fp32 ``(out, lse)`` inside the kernel.

Shapes::

    q          (B, Hq,  Sq, D)    fp16 / bf16 / fp32, any strides
    k, v       (B, Hkv, Sk, D), (B, Hkv, Sk, Dv)   Hq % Hkv == 0; q head h reads kv head h // (Hq // Hkv)
    out        (B, Hq,  Sq, Dv)   fp32
    lse        (B, Hq,  Sq)       fp32, natural log, -inf for a row that sees no key
    dq, dk, dv like q, k, v       fp32 (the ring accumulates gradients in fp32)

D is 1..256, any value: tiles are padded to BLOCK_D = max(16, next_pow2(D)) with masked loads. A v with its
own head dim Dv != D (MLA: DeepSeek-V2/V3's 192 / 128) is not a kernel parameter: the entry points zero-pad
q, k, v (and dout, out) to max(D, Dv) and cut the results back (exact; the padded columns cost flops).
fp64 inputs (no fast Triton path) go to the ``reference`` backend: ``BACKEND.dtypes`` leaves fp64 out,
and the dispatcher in :mod:`seqpar.kernels` routes by it.

Note
----
Tiles of one program. Forward and dQ: a program owns BLOCK_M query rows and walks the key blocks;
dK/dV: a program owns BLOCK_N keys of one kv head and walks the query rows of every q head of its
GQA group, summing their dK/dV in fp32 registers. A mask kind (top-left aligned) splits the walk
into blocks that need no mask and the few on the diagonal (or past Sk) that do::

    forward / dQ, one row block [m0, m0+BM)       dK/dV, one key block [n0, n0+BN)

    keys ->  0        m0      m0+BM   Sk           rows v   keys n0 .. n0+BN
    full     [ no mask .................][edge]      0..n0      (causal/strict: skipped)
    causal   [ no mask ....][ diagonal ]  (rest       n0..       [ diagonal: masked   ]
    strict   [ no mask ....][ diagonal ]   skipped)   n0+BN..Sq  [ no mask            ]

Inside a program everything is in the exp2 domain: ``s2 = (q . k) * scale * log2(e)``; the running
max ``m``, sum ``l`` and accumulator ``acc`` give ``out = acc / l``, ``lse = (m + log2 l) * ln 2``.
The accumulating forward instead merges ``(acc, m, l)`` into the stored ``(out_acc, lse_acc)``::

    b2   = m + log2(l)                         the tile's lse (base 2); -inf if no key is visible
    new2 = logaddexp2(lse_acc * log2(e), b2)
    out  = out_acc * 2^(lse_acc*log2(e) - new2) + acc * 2^(m - new2)
    rows with no visible key are not written at all.

Backward recomputes ``p = 2^(s2 - lse * log2(e))`` against the *global* lse and uses
``delta = rowsum(dO * O)`` (a preprocess kernel, against the global O).
"""

from __future__ import annotations

import os
import threading
from typing import Literal

import torch
import triton
import triton.language as tl

from seqpar.kernels.backend import (UNBOUNDED, KernelBackend, TileMask, backward_padded, check_tile, doc_ids,
                                    forward_padded, pad_head_dim)

__all__ = [
    "forward",
    "forward_accumulate",
    "backward",
    "BACKEND",
    "INTERPRET",
    "MAX_HEAD_DIM",
    "TUNE",
]

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
MAX_HEAD_DIM = 256

# Launches are serialised. The state this guards is Triton's, not seqpar's: the autotuner keeps per-call
# state on the shared kernel object (the arguments of the call it is tuning) and the interpreter keeps
# global grid state, so *any* two threads launching these kernels race: seqpar's thread-ranks
# (seqpar.comm.threads) as much as a user's threads or an inference server's. It cannot move next to
# the thread-ranks: the lock must be around the launch, which only this module sees. A launch is
# asynchronous on CUDA, so the lock is held for microseconds (or for the one autotuning run of a new
# shape, which then also does not compete with another thread's benchmark).
_LAUNCH = threading.RLock()

_MASK_CODE = {"full": 0, "causal": 1, "strict": 2}
_LOG2E = 1.4426950408889634
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------------------------------------------
# autotune configs
# ----------------------------------------------------------------------------------------------------------------

def _cfg(bm: int, bn: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


Tune = Literal["full", "off"]
# "full": autotune over the pruned configs below; "off": the first config that surely fits (no
# benchmarking: quick compiles for tests). Read once at import, like TRITON_INTERPRET.
TUNE: Tune = "off" if os.environ.get("SEQPAR_TRITON_TUNE", "full") == "off" else "full"

if INTERPRET:  # the interpreter runs one small fixed tile (it is numpy, per program, slow)
    _FWD_CONFIGS = [_cfg(16, 16, 1, 1)]
    _DKDV_CONFIGS = [_cfg(16, 16, 1, 1)]
    _DQ_CONFIGS = [_cfg(16, 16, 1, 1)]
else:  # (BLOCK_M, BLOCK_N, warps, stages); the first is the untuned default, the last the smallest
    _FWD_CONFIGS = [_cfg(*c) for c in ((64, 64, 4, 2), (128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 2),
                                       (128, 32, 4, 4), (64, 64, 4, 4), (64, 32, 4, 3), (32, 32, 4, 1))]
    _DKDV_CONFIGS = [_cfg(*c) for c in ((32, 64, 4, 2), (64, 64, 4, 2), (32, 128, 8, 2), (64, 128, 8, 2),
                                        (32, 64, 4, 3), (16, 32, 4, 1))]
    _DQ_CONFIGS = [_cfg(*c) for c in ((64, 32, 4, 2), (64, 64, 4, 2), (128, 64, 8, 2), (128, 32, 8, 3),
                                      (64, 32, 4, 3), (32, 32, 4, 1))]


def _smem(kind: str, bm: int, bn: int, stages: int, bd: int, elem: int) -> int:
    """A rough (upper) estimate of the shared memory of a config, bytes: resident tiles + pipelined tiles."""
    if kind == "rows":  # forward / dQ: q (and dO) resident, k and v pipelined
        return (2 * bm * bd + stages * 2 * bn * bd) * elem
    return (2 * bn * bd + stages * 2 * bm * bd) * elem  # dK/dV: k, v resident, q and dO pipelined


def _prune(kind: str, configs, named_args: dict, kwargs: dict):
    a = {**named_args, **kwargs}
    bd, elem = a["BLOCK_D"], a["Q"].element_size()
    limit = 200 * 1024 if TUNE == "full" else 150 * 1024  # configs over the real limit fail and are skipped
    keep = []
    for c in configs:
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        if kind == "rows" and bm % bn:  # the diagonal must start on a key-block boundary
            continue
        if bd >= 256 and bm * bn > 64 * 64:  # registers
            continue
        if _smem(kind, bm, bn, c.num_stages, bd, elem) > limit:
            continue
        keep.append(c)
    if not keep:
        keep = [configs[-1]]
    return keep[:1] if TUNE == "off" else keep


def _prune_rows(configs, named_args, **kwargs):
    """Forward / dQ configs for this call's head dim and dtype."""
    return _prune("rows", configs, named_args, kwargs)


def _prune_cols(configs, named_args, **kwargs):
    """dK/dV configs for this call's head dim and dtype."""
    return _prune("cols", configs, named_args, kwargs)


_KEY = ["SQ_KEY", "SK_KEY", "HEAD_D", "MASK", "GENERIC", "BAND", "DOCS", "SOFTCAP"]


def _bucket(n: int) -> int:
    """Autotune key for a sequence length: the next power of two, capped (a 1M-token call reuses the
    config tuned at 32k rather than benchmarking every config at full size)."""
    return min(triton.next_power_of_2(max(n, 1)), 32768)


# The interpreter's tl.dot mishandles bf16 operands (numpy has no bf16): there, operands are widened to
# fp32 first, after any rounding to the input dtype, so the interpreter computes what the GPU computes.
_DOT_UPCAST = tl.constexpr(INTERPRET)


@triton.jit
def _tanh(x):
    """tanh(x) = 1 - 2 / (e^{2x} + 1): exact limits +-1 for large |x| (e^{2x} = inf or 0)."""
    return 1.0 - 2.0 / (tl.exp2(x * 2.8853900817779268) + 1.0)


@triton.jit
def _scores2(q, kt, qk_scale, cap_a, cap_b, PREC: tl.constexpr, SOFTCAP: tl.constexpr):
    """(BM, BN) scores in the log2 domain; soft-capped: cap_b * tanh(q.k * cap_a) with cap_a = scale / softcap,
    cap_b = softcap * log2(e). Also returns the tanh (for the backward; the scores when not soft-capped)."""
    s = _dot(q, kt, None, PREC)
    if SOFTCAP:
        t = _tanh(s * cap_a)
        s = t * cap_b
    else:
        s = s * qk_scale
        t = s
    return s, t


@triton.jit
def _dot(a, b, acc, PREC: tl.constexpr):
    if _DOT_UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PREC)


# ----------------------------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------------------------

@triton.jit
def _fwd_step(acc, m_i, l_i, q, k_base, v_base, start_n, offs_m, offs_n, offs_d, Sk, skn, skd, svn, svd, qk_scale,
              MASKED: tl.constexpr, MASK: tl.constexpr, PREC: tl.constexpr, HEAD_D: tl.constexpr,
              BLOCK_D: tl.constexpr, qd, kd, lo, hi, cap_a, cap_b, BAND: tl.constexpr, DOCS: tl.constexpr,
              SOFTCAP: tl.constexpr):
    """One key block into the running (acc (BM, BD), m_i (BM,), l_i (BM,)); exp2 domain. Masked blocks apply
    the kind (plain masks) or the band ``lo <= j - i <= hi`` and the documents ``qd (BM,) == kd (BN,)``."""
    cols = start_n + offs_n  # (BN,)
    kt_ptrs = k_base + cols[None, :] * skn + offs_d[:, None] * skd  # (BD, BN)
    v_ptrs = v_base + cols[:, None] * svn + offs_d[None, :] * svd  # (BN, BD)
    if MASKED:
        kt = tl.load(kt_ptrs, mask=(cols[None, :] < Sk) & (offs_d[:, None] < HEAD_D), other=0.0)
        v = tl.load(v_ptrs, mask=(cols[:, None] < Sk) & (offs_d[None, :] < HEAD_D), other=0.0)
    elif HEAD_D < BLOCK_D:
        kt = tl.load(kt_ptrs, mask=offs_d[:, None] < HEAD_D, other=0.0)
        v = tl.load(v_ptrs, mask=offs_d[None, :] < HEAD_D, other=0.0)
    else:
        kt = tl.load(kt_ptrs)
        v = tl.load(v_ptrs)
    s, _ = _scores2(q, kt, qk_scale, cap_a, cap_b, PREC, SOFTCAP)  # (BM, BN), log2 domain
    if MASKED:
        visible = cols[None, :] < Sk
        if MASK == 1:
            visible = visible & (cols[None, :] <= offs_m[:, None])
        if MASK == 2:
            visible = visible & (cols[None, :] < offs_m[:, None])
        if BAND:
            dd = cols[None, :] - offs_m[:, None]
            visible = visible & (dd >= lo) & (dd <= hi)
        if DOCS:
            visible = visible & (qd[:, None] == kd[None, :])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that see nothing yet: p = 0, alpha = 0
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = m_new
    p = tl.exp2(s - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = _dot(p.to(v.dtype), v, acc, PREC)
    return acc, m_new, l_i


@triton.jit
def _row_docs(QDOC, rows, row_ok, DOCS: tl.constexpr):
    """Document ids of a block of query rows (-1 past Sq) and their min / max (0, 0 without documents)."""
    qd = rows
    qmin = 0
    qmax = 0
    if DOCS:
        qd = tl.load(QDOC + rows, mask=row_ok, other=-1)
        qmin = tl.min(tl.where(row_ok, qd, 2147483647), 0)
        qmax = tl.max(qd, 0)
    return qd, qmin, qmax


@triton.jit
def _key_block(KDOC, start_n, offs_n, m0, r_last, Sk, lo, hi, qmin, qmax, DOCS: tl.constexpr,
               BLOCK_N: tl.constexpr):
    """Key block [start_n, start_n + BLOCK_N) against query rows [m0, r_last] of a band / document mask:
    (its document ids, whether any pair can be visible, whether every pair is: no mask needed)."""
    cols = start_n + offs_n
    kd = cols
    full = (start_n + BLOCK_N <= Sk) & (start_n - r_last >= lo) & (start_n + BLOCK_N - 1 - m0 <= hi)
    some = start_n < Sk
    if DOCS:
        kd = tl.load(KDOC + cols, mask=cols < Sk, other=-2)
        kmin = tl.min(tl.where(cols < Sk, kd, 2147483647), 0)
        kmax = tl.max(kd, 0)
        some = some & (kmin <= qmax) & (kmax >= qmin)  # else: no shared document (skipped)
        full = full & (qmin == qmax) & (kmin == kmax) & (kmin == qmin)
    return kd, some, full


# Sizes and head counts are not specialised on (divisibility by 16, == 1): fewer compiled variants;
# strides still are (alignment of the loads).
_SIZES = ["H", "HKV", "GROUP", "Sq", "Sk", "SQ_KEY", "SK_KEY", "lo", "hi"]


@triton.jit(do_not_specialize=[a for a in _SIZES if a != "HKV"])
def _fwd_kernel(
    Q, K, V, Out, Lse,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sob, soh, som, sod,
    slb, slh, slm,
    H, GROUP, Sq, Sk, qk_scale,
    SQ_KEY, SK_KEY,
    QDOC, KDOC, lo, hi, cap_a, cap_b,
    MASK: tl.constexpr, ACCUMULATE: tl.constexpr, PREC: tl.constexpr, HEAD_D: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    GENERIC: tl.constexpr, BAND: tl.constexpr, DOCS: tl.constexpr, SOFTCAP: tl.constexpr,
):
    # grid: (cdiv(Sq, BLOCK_M), B * H)
    pid_m = tl.program_id(0)
    if MASK != 0:  # causal / strict: the last row blocks have the most keys; schedule them first
        pid_m = tl.num_programs(0) - 1 - pid_m
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    hk = h // GROUP  # GQA: the kv head of this q head, by index
    q_base = Q + b * sqb + h * sqh
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh

    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < Sq
    d_ok = offs_d < HEAD_D
    q = tl.load(q_base + offs_m[:, None] * sqm + offs_d[None, :] * sqd, mask=row_ok[:, None] & d_ok[None, :],
                other=0.0)  # (BM, BD)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    if GENERIC:  # band / documents / soft-cap: walk the key blocks the band reaches, classify each one
        qd, qmin, qmax = _row_docs(QDOC, offs_m, row_ok, DOCS)
        r_last = tl.minimum(m0 + BLOCK_M, Sq) - 1
        n_start = (tl.maximum(m0 + lo, 0) // BLOCK_N) * BLOCK_N
        n_stop = tl.minimum(Sk, r_last + hi + 1)
        for start_n in range(n_start, n_stop, BLOCK_N):
            kd, some, full = _key_block(KDOC, start_n, offs_n, m0, r_last, Sk, lo, hi, qmin, qmax, DOCS, BLOCK_N)
            if some:
                if full:
                    acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, k_base, v_base, start_n, offs_m, offs_n, offs_d, Sk,
                                              skn, skd, svn, svd, qk_scale, False, 0, PREC, HEAD_D, BLOCK_D,
                                              qd, kd, lo, hi, cap_a, cap_b, BAND, DOCS, SOFTCAP)
                else:
                    acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, k_base, v_base, start_n, offs_m, offs_n, offs_d, Sk,
                                              skn, skd, svn, svd, qk_scale, True, 0, PREC, HEAD_D, BLOCK_D,
                                              qd, kd, lo, hi, cap_a, cap_b, BAND, DOCS, SOFTCAP)
    else:
        # keys [0, clean) need no mask at all; [clean, hi) are the diagonal / the ragged end
        if MASK == 0:
            k_stop = Sk
            clean = (Sk // BLOCK_N) * BLOCK_N
        else:
            k_stop = tl.minimum(Sk, m0 + BLOCK_M)
            clean = tl.minimum(m0, (Sk // BLOCK_N) * BLOCK_N)  # m0 is a multiple of BLOCK_N (pruned configs)
        for start_n in range(0, clean, BLOCK_N):
            acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, k_base, v_base, start_n, offs_m, offs_n, offs_d, Sk,
                                      skn, skd, svn, svd, qk_scale, False, MASK, PREC, HEAD_D, BLOCK_D,
                                      offs_m, offs_n, lo, hi, cap_a, cap_b, False, False, False)
        for start_n in range(clean, k_stop, BLOCK_N):
            acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, k_base, v_base, start_n, offs_m, offs_n, offs_d, Sk,
                                      skn, skd, svn, svd, qk_scale, True, MASK, PREC, HEAD_D, BLOCK_D,
                                      offs_m, offs_n, lo, hi, cap_a, cap_b, False, False, False)

    o_ptrs = Out + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod
    l_ptrs = Lse + b * slb + h * slh + offs_m * slm
    seen = l_i > 0.0
    if ACCUMULATE:
        a2 = tl.load(l_ptrs, mask=row_ok & seen, other=float("-inf")) * 1.4426950408889634
        b2 = m_i + tl.log2(tl.where(seen, l_i, 1.0))
        b2 = tl.where(seen, b2, float("-inf"))
        mx = tl.maximum(a2, b2)
        mx = tl.where(mx == float("-inf"), 0.0, mx)
        new2 = mx + tl.log2(tl.exp2(a2 - mx) + tl.exp2(b2 - mx))
        keep = row_ok & seen
        o_old = tl.load(o_ptrs, mask=keep[:, None] & d_ok[None, :], other=0.0)
        o_new = o_old * tl.exp2(a2 - new2)[:, None] + acc * tl.exp2(m_i - new2)[:, None]
        tl.store(o_ptrs, o_new, mask=keep[:, None] & d_ok[None, :])
        tl.store(l_ptrs, new2 * 0.6931471805599453, mask=keep)
    else:
        o = acc / tl.where(seen, l_i, 1.0)[:, None]
        lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
        tl.store(o_ptrs, o, mask=row_ok[:, None] & d_ok[None, :])
        tl.store(l_ptrs, lse, mask=row_ok)


_fwd = triton.autotune(_FWD_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _prune_rows})(_fwd_kernel)
_fwd_acc = triton.autotune(_FWD_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _prune_rows},
                           restore_value=["Out", "Lse"])(_fwd_kernel)


# ----------------------------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------------------------

@triton.jit(do_not_specialize=["H", "Sq"])
def _bwd_delta_kernel(O, DO, Delta, sob, soh, som, sod, sdb, sdh, sdm, sdd, H, Sq,
                      HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    # grid: (cdiv(Sq, BLOCK_M), B * H); Delta (B * H, Sq) fp32 contiguous
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    msk = (offs_m[:, None] < Sq) & (offs_d[None, :] < HEAD_D)
    o = tl.load(O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod, mask=msk, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdm + offs_d[None, :] * sdd, mask=msk, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + pid_bh.to(tl.int64) * Sq + offs_m, delta, mask=offs_m < Sq)


@triton.jit
def _load_lse2(lse_ptrs, rows, Sq):
    """The global lse of ``rows`` in base 2; +inf for rows past Sq or with no key anywhere (-> p = 0)."""
    lse = tl.load(lse_ptrs, mask=rows < Sq, other=float("inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)


@triton.jit
def _dkdv_step(dk, dv, k, v, q_base, do_base, l_base, dl_base, start_m, offs_m, offs_d, cols, Sq,
               sqm, sqd, sdm, sdd, slm, qk_scale,
               MASKED: tl.constexpr, MASK: tl.constexpr, PREC: tl.constexpr, HEAD_D: tl.constexpr,
               qd, kd, lo, hi, cap_a, cap_b, BAND: tl.constexpr, DOCS: tl.constexpr, SOFTCAP: tl.constexpr):
    """One row block of one q head into dk, dv (BN, BD) fp32; computed transposed (keys x rows)."""
    rows = start_m + offs_m  # (BM,)
    row_ok = rows < Sq
    d_ok = offs_d < HEAD_D
    qt = tl.load(q_base + rows[None, :] * sqm + offs_d[:, None] * sqd, mask=d_ok[:, None] & row_ok[None, :],
                 other=0.0)  # (BD, BM)
    do = tl.load(do_base + rows[:, None] * sdm + offs_d[None, :] * sdd, mask=row_ok[:, None] & d_ok[None, :],
                 other=0.0)  # (BM, BD)
    lse2 = _load_lse2(l_base + rows * slm, rows, Sq)  # (BM,)
    delta = tl.load(dl_base + rows, mask=row_ok, other=0.0)  # (BM,)
    st, tt = _scores2(k, qt, qk_scale, cap_a, cap_b, PREC, SOFTCAP)  # (BN, BM)
    pt = tl.exp2(st - lse2[None, :])
    if MASKED:
        if MASK == 1:
            pt = tl.where(cols[:, None] <= rows[None, :], pt, 0.0)
        if MASK == 2:
            pt = tl.where(cols[:, None] < rows[None, :], pt, 0.0)
        if BAND:
            dd = cols[:, None] - rows[None, :]
            pt = tl.where((dd >= lo) & (dd <= hi), pt, 0.0)
        if DOCS:
            pt = tl.where(kd[:, None] == qd[None, :], pt, 0.0)
    dv = _dot(pt.to(do.dtype), do, dv, PREC)
    dpt = _dot(v, tl.trans(do), None, PREC)  # (BN, BM)
    dst = pt * (dpt - delta[None, :])
    if SOFTCAP:
        dst = dst * (1.0 - tt * tt)
    dk = _dot(dst.to(qt.dtype), tl.trans(qt), dk, PREC)
    return dk, dv


@triton.jit(do_not_specialize=[a for a in _SIZES if a != "H"])
def _bwd_dkdv_kernel(
    Q, K, V, DO, Lse, Delta, DK, DV,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sdb, sdh, sdm, sdd,
    slb, slh, slm,
    HKV, GROUP, Sq, Sk, sm_scale, qk_scale,
    SQ_KEY, SK_KEY,
    QDOC, KDOC, lo, hi, cap_a, cap_b,
    MASK: tl.constexpr, PREC: tl.constexpr, HEAD_D: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    GENERIC: tl.constexpr, BAND: tl.constexpr, DOCS: tl.constexpr, SOFTCAP: tl.constexpr,
):
    # grid: (cdiv(Sk, BLOCK_N), B * HKV); DK, DV (B, HKV, Sk, HEAD_D) fp32 contiguous
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HKV).to(tl.int64)
    hk = (pid_bh % HKV).to(tl.int64)
    n0 = pid_n * BLOCK_N
    cols = n0 + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    kv_msk = (cols[:, None] < Sk) & (offs_d[None, :] < HEAD_D)
    k = tl.load(K + b * skb + hk * skh + cols[:, None] * skn + offs_d[None, :] * skd, mask=kv_msk, other=0.0)
    v = tl.load(V + b * svb + hk * svh + cols[:, None] * svn + offs_d[None, :] * svd, mask=kv_msk, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    # rows [n0, diag_end) hold the diagonal of this key block (causal / strict); rows below see every key,
    # rows above see none of them (skipped)
    diag_end = n0 + ((BLOCK_N + BLOCK_M - 1) // BLOCK_M) * BLOCK_M
    if GENERIC:  # the row blocks the band reaches from these keys; documents: per-block min / max ids
        kd = cols
        kmin = 0
        kmax = 0
        if DOCS:
            kd = tl.load(KDOC + cols, mask=cols < Sk, other=-2)
            kmin = tl.min(tl.where(cols < Sk, kd, 2147483647), 0)
            kmax = tl.max(kd, 0)
        c_last = tl.minimum(n0 + BLOCK_N, Sk) - 1
        m_start = (tl.maximum(n0 - hi, 0) // BLOCK_M) * BLOCK_M
        m_stop = tl.minimum(Sq, c_last - lo + 1)
    for g in range(GROUP):  # every q head of this kv head's group, summed in fp32 here
        h = hk * GROUP + g
        q_base = Q + b * sqb + h * sqh
        do_base = DO + b * sdb + h * sdh
        l_base = Lse + b * slb + h * slh
        dl_base = Delta + (b * HKV * GROUP + h) * Sq
        if GENERIC:
            for start_m in range(m_start, m_stop, BLOCK_M):
                rows = start_m + offs_m
                qd = rows
                r_last = tl.minimum(start_m + BLOCK_M, Sq) - 1
                full = (n0 - r_last >= lo) & (c_last - start_m <= hi)
                some = start_m < Sq
                if DOCS:
                    qd = tl.load(QDOC + rows, mask=rows < Sq, other=-1)
                    qmin = tl.min(tl.where(rows < Sq, qd, 2147483647), 0)
                    qmax = tl.max(qd, 0)
                    some = some & (kmin <= qmax) & (kmax >= qmin)
                    full = full & (qmin == qmax) & (kmin == kmax) & (kmin == qmin)
                if some:
                    if full:
                        dk, dv = _dkdv_step(dk, dv, k, v, q_base, do_base, l_base, dl_base, start_m, offs_m, offs_d,
                                            cols, Sq, sqm, sqd, sdm, sdd, slm, qk_scale, False, 0, PREC, HEAD_D,
                                            qd, kd, lo, hi, cap_a, cap_b, BAND, DOCS, SOFTCAP)
                    else:
                        dk, dv = _dkdv_step(dk, dv, k, v, q_base, do_base, l_base, dl_base, start_m, offs_m, offs_d,
                                            cols, Sq, sqm, sqd, sdm, sdd, slm, qk_scale, True, 0, PREC, HEAD_D,
                                            qd, kd, lo, hi, cap_a, cap_b, BAND, DOCS, SOFTCAP)
        elif MASK == 0:
            for start_m in range(0, Sq, BLOCK_M):
                dk, dv = _dkdv_step(dk, dv, k, v, q_base, do_base, l_base, dl_base, start_m, offs_m, offs_d, cols,
                                    Sq, sqm, sqd, sdm, sdd, slm, qk_scale, False, MASK, PREC, HEAD_D,
                                    offs_m, cols, lo, hi, cap_a, cap_b, False, False, False)
        else:
            for start_m in range(n0, tl.minimum(diag_end, Sq), BLOCK_M):
                dk, dv = _dkdv_step(dk, dv, k, v, q_base, do_base, l_base, dl_base, start_m, offs_m, offs_d, cols,
                                    Sq, sqm, sqd, sdm, sdd, slm, qk_scale, True, MASK, PREC, HEAD_D,
                                    offs_m, cols, lo, hi, cap_a, cap_b, False, False, False)
            for start_m in range(diag_end, Sq, BLOCK_M):
                dk, dv = _dkdv_step(dk, dv, k, v, q_base, do_base, l_base, dl_base, start_m, offs_m, offs_d, cols,
                                    Sq, sqm, sqd, sdm, sdd, slm, qk_scale, False, MASK, PREC, HEAD_D,
                                    offs_m, cols, lo, hi, cap_a, cap_b, False, False, False)
    out_off = (b * HKV + hk) * Sk * HEAD_D + cols[:, None] * HEAD_D + offs_d[None, :]
    tl.store(DK + out_off, dk * sm_scale, mask=kv_msk)
    tl.store(DV + out_off, dv, mask=kv_msk)


@triton.jit
def _dq_step(dq, q, do, lse2, delta, k_base, v_base, start_n, rows, offs_n, offs_d, Sk, skn, skd, svn, svd, qk_scale,
             MASKED: tl.constexpr, MASK: tl.constexpr, PREC: tl.constexpr, HEAD_D: tl.constexpr,
             BLOCK_D: tl.constexpr, qd, kd, lo, hi, cap_a, cap_b, BAND: tl.constexpr, DOCS: tl.constexpr,
             SOFTCAP: tl.constexpr):
    """One key block into dq (BM, BD) fp32."""
    cols = start_n + offs_n  # (BN,)
    kt_ptrs = k_base + cols[None, :] * skn + offs_d[:, None] * skd  # (BD, BN)
    vt_ptrs = v_base + cols[None, :] * svn + offs_d[:, None] * svd  # (BD, BN)
    if MASKED:
        msk = (cols[None, :] < Sk) & (offs_d[:, None] < HEAD_D)
        kt = tl.load(kt_ptrs, mask=msk, other=0.0)
        vt = tl.load(vt_ptrs, mask=msk, other=0.0)
    elif HEAD_D < BLOCK_D:
        kt = tl.load(kt_ptrs, mask=offs_d[:, None] < HEAD_D, other=0.0)
        vt = tl.load(vt_ptrs, mask=offs_d[:, None] < HEAD_D, other=0.0)
    else:
        kt = tl.load(kt_ptrs)
        vt = tl.load(vt_ptrs)
    s, t = _scores2(q, kt, qk_scale, cap_a, cap_b, PREC, SOFTCAP)  # (BM, BN)
    p = tl.exp2(s - lse2[:, None])
    if MASKED:
        visible = cols[None, :] < Sk
        if MASK == 1:
            visible = visible & (cols[None, :] <= rows[:, None])
        if MASK == 2:
            visible = visible & (cols[None, :] < rows[:, None])
        if BAND:
            dd = cols[None, :] - rows[:, None]
            visible = visible & (dd >= lo) & (dd <= hi)
        if DOCS:
            visible = visible & (qd[:, None] == kd[None, :])
        p = tl.where(visible, p, 0.0)
    dp = _dot(do, vt, None, PREC)  # (BM, BN)
    ds = p * (dp - delta[:, None])
    if SOFTCAP:
        ds = ds * (1.0 - t * t)
    dq = _dot(ds.to(kt.dtype), tl.trans(kt), dq, PREC)
    return dq


@triton.jit(do_not_specialize=[a for a in _SIZES if a != "HKV"])
def _bwd_dq_kernel(
    Q, K, V, DO, Lse, Delta, DQ,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sdb, sdh, sdm, sdd,
    slb, slh, slm,
    H, GROUP, Sq, Sk, sm_scale, qk_scale,
    SQ_KEY, SK_KEY,
    QDOC, KDOC, lo, hi, cap_a, cap_b,
    MASK: tl.constexpr, PREC: tl.constexpr, HEAD_D: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    GENERIC: tl.constexpr, BAND: tl.constexpr, DOCS: tl.constexpr, SOFTCAP: tl.constexpr,
):
    # grid: (cdiv(Sq, BLOCK_M), B * H); DQ (B, H, Sq, HEAD_D) fp32 contiguous
    pid_m = tl.program_id(0)
    if MASK != 0:  # heaviest row blocks first
        pid_m = tl.num_programs(0) - 1 - pid_m
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    hk = h // GROUP
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    m0 = pid_m * BLOCK_M
    rows = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < Sq
    msk = row_ok[:, None] & (offs_d[None, :] < HEAD_D)
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqm + offs_d[None, :] * sqd, mask=msk, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + rows[:, None] * sdm + offs_d[None, :] * sdd, mask=msk, other=0.0)
    lse2 = _load_lse2(Lse + b * slb + h * slh + rows * slm, rows, Sq)
    delta = tl.load(Delta + pid_bh.to(tl.int64) * Sq + rows, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if GENERIC:  # as in the forward: the key blocks the band reaches, classified per block
        qd, qmin, qmax = _row_docs(QDOC, rows, row_ok, DOCS)
        r_last = tl.minimum(m0 + BLOCK_M, Sq) - 1
        n_start = (tl.maximum(m0 + lo, 0) // BLOCK_N) * BLOCK_N
        n_stop = tl.minimum(Sk, r_last + hi + 1)
        for start_n in range(n_start, n_stop, BLOCK_N):
            kd, some, full = _key_block(KDOC, start_n, offs_n, m0, r_last, Sk, lo, hi, qmin, qmax, DOCS, BLOCK_N)
            if some:
                if full:
                    dq = _dq_step(dq, q, do, lse2, delta, k_base, v_base, start_n, rows, offs_n, offs_d, Sk, skn, skd,
                                  svn, svd, qk_scale, False, 0, PREC, HEAD_D, BLOCK_D,
                                  qd, kd, lo, hi, cap_a, cap_b, BAND, DOCS, SOFTCAP)
                else:
                    dq = _dq_step(dq, q, do, lse2, delta, k_base, v_base, start_n, rows, offs_n, offs_d, Sk, skn, skd,
                                  svn, svd, qk_scale, True, 0, PREC, HEAD_D, BLOCK_D,
                                  qd, kd, lo, hi, cap_a, cap_b, BAND, DOCS, SOFTCAP)
    else:
        if MASK == 0:
            k_stop = Sk
            clean = (Sk // BLOCK_N) * BLOCK_N
        else:
            k_stop = tl.minimum(Sk, m0 + BLOCK_M)
            clean = tl.minimum(m0, (Sk // BLOCK_N) * BLOCK_N)
        for start_n in range(0, clean, BLOCK_N):
            dq = _dq_step(dq, q, do, lse2, delta, k_base, v_base, start_n, rows, offs_n, offs_d, Sk, skn, skd, svn,
                          svd, qk_scale, False, MASK, PREC, HEAD_D, BLOCK_D,
                          rows, offs_n, lo, hi, cap_a, cap_b, False, False, False)
        for start_n in range(clean, k_stop, BLOCK_N):
            dq = _dq_step(dq, q, do, lse2, delta, k_base, v_base, start_n, rows, offs_n, offs_d, Sk, skn, skd, svn,
                          svd, qk_scale, True, MASK, PREC, HEAD_D, BLOCK_D,
                          rows, offs_n, lo, hi, cap_a, cap_b, False, False, False)
    out_off = (b * H + h) * Sq * HEAD_D + rows[:, None] * HEAD_D + offs_d[None, :]
    tl.store(DQ + out_off, dq * sm_scale, mask=msk)


_bwd_dkdv = triton.autotune(_DKDV_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _prune_cols})(
    _bwd_dkdv_kernel)
_bwd_dq = triton.autotune(_DQ_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _prune_rows})(_bwd_dq_kernel)


# ----------------------------------------------------------------------------------------------------------------
# python entry points
# ----------------------------------------------------------------------------------------------------------------

def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: TileMask) -> None:
    if mask.kind not in _MASK_CODE:
        raise ValueError(f"triton backend: mask must be one of {tuple(_MASK_CODE)}, got {mask.kind!r}")
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"triton backend: q, k, v must be 4-D (B, H, S, D); got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"triton backend: need q (B, Hq, Sq, D), k (B, Hkv, Sk, D) and v (B, Hkv, Sk, Dv); got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"triton backend: Hq={q.shape[1]} must be a multiple of Hkv={k.shape[1]}")
    check_tile(mask, q.shape[2], k.shape[2])
    if max(q.shape[3], v.shape[3]) > MAX_HEAD_DIM:
        raise ValueError(f"triton backend: head dim {max(q.shape[3], v.shape[3])} > {MAX_HEAD_DIM}; use "
                         f"backend='aten'")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _FLOATS:
        raise TypeError(f"triton backend: q, k, v must share one of {_FLOATS}, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.device.type != "cuda" and not INTERPRET:
        raise ValueError(f"triton backend needs CUDA tensors or TRITON_INTERPRET=1 (set before triton is imported); "
                         f"got tensors on {q.device}")


def _prec(dtype: torch.dtype) -> Literal["ieee", "tf32"]:
    # fp32 inputs: true fp32 products (SDPA's fp32 kernels do not use tf32 either); fp16/bf16: ignored
    return "ieee" if dtype == torch.float32 else "tf32"


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _mask_args(mask: TileMask, scale: float, dummy: torch.Tensor) -> tuple[tuple, dict]:
    """-> (QDOC, KDOC, lo, hi, cap_a, cap_b), the constexprs. A plain mask: the kind's code path of old
    (GENERIC off; the extra arguments unused). Otherwise the kind is folded into the band (MASK 0) and the
    kernels walk only the blocks the band and the documents reach."""
    if mask.plain:
        return (dummy, dummy, 0, 0, 1.0, 1.0), dict(MASK=_MASK_CODE[mask.kind], GENERIC=False, BAND=False,
                                                    DOCS=False, SOFTCAP=False)
    lo, hi = mask.band()
    band = lo is not None or hi is not None
    lo = -UNBOUNDED if lo is None else max(-UNBOUNDED, min(UNBOUNDED, lo))
    hi = UNBOUNDED if hi is None else max(-UNBOUNDED, min(UNBOUNDED, hi))
    qd, kd = doc_ids(mask, dummy.device) if mask.docs is not None else (dummy, dummy)
    cap = float(mask.softcap)
    cap_a, cap_b = (float(scale) / cap, cap * _LOG2E) if cap else (1.0, 1.0)
    return (qd, kd, lo, hi, cap_a, cap_b), dict(MASK=0, GENERIC=True, BAND=band, DOCS=mask.docs is not None,
                                                SOFTCAP=bool(cap))


def _launch_forward(q, k, v, out, lse, mask: TileMask, scale: float, accumulate: bool) -> None:
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    kernel = _fwd_acc if accumulate else _fwd
    grid = lambda meta: (triton.cdiv(Sq, meta["BLOCK_M"]), B * Hq)  # noqa: E731
    margs, consts = _mask_args(mask, scale, lse)
    with _LAUNCH:
        kernel[grid](
            q, k, v, out, lse,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), *lse.stride(),
            Hq, Hq // Hkv, Sq, Sk, float(scale) * _LOG2E,
            _bucket(Sq), _bucket(Sk), *margs,
            ACCUMULATE=accumulate, PREC=_prec(q.dtype), HEAD_D=D, BLOCK_D=_block_d(D), **consts,
        )


def forward(
    q: torch.Tensor,  # (B, Hq, Sq, D)
    k: torch.Tensor,  # (B, Hkv, Sk, D)
    v: torch.Tensor,  # (B, Hkv, Sk, Dv)
    *,
    mask: TileMask,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> out (B, Hq, Sq, Dv) fp32, lse (B, Hq, Sq) fp32; rows with no visible key: out 0, lse -inf.
    A v with its own head dim (Dv != D, MLA) runs zero-padded to max(D, Dv) (:func:`forward_padded`)."""
    _check(q, k, v, mask)
    return forward_padded(_forward, q, k, v, mask=mask, scale=scale)


def _forward(q, k, v, *, mask: TileMask, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    B, Hq, Sq, D = q.shape
    out = torch.zeros(B, Hq, Sq, D, dtype=torch.float32, device=q.device)
    lse = torch.full((B, Hq, Sq), float("-inf"), dtype=torch.float32, device=q.device)
    if Sq and k.shape[2] and B * Hq:
        _launch_forward(q, k, v, out, lse, mask, scale, accumulate=False)
    return out, lse


def forward_accumulate(
    q: torch.Tensor,  # (B, Hq, Sq, D)
    k: torch.Tensor,  # (B, Hkv, Sk, D)
    v: torch.Tensor,  # (B, Hkv, Sk, Dv)
    out_acc: torch.Tensor,  # (B, Hq, Sq, Dv) fp32, any strides (a view of the ring's running output)
    lse_acc: torch.Tensor,  # (B, Hq, Sq)    fp32, any strides
    *,
    mask: TileMask,
    scale: float,
) -> None:
    """In place: merge this tile's attention into the running ``(out_acc, lse_acc)``.

    Rows that see no key of this tile are left untouched (bit for bit). A v with its own head dim (Dv != D,
    MLA): q, k, v zero-padded to max(D, Dv); when Dv < D the running output is merged in a padded copy and
    its first Dv columns copied back."""
    _check(q, k, v, mask)
    B, Hq, Sq, D = q.shape
    Dv = v.shape[3]
    if out_acc.shape != (B, Hq, Sq, Dv) or lse_acc.shape != (B, Hq, Sq):
        raise ValueError(f"forward_accumulate: out_acc must be {(B, Hq, Sq, Dv)} and lse_acc {(B, Hq, Sq)}; got "
                         f"{tuple(out_acc.shape)}, {tuple(lse_acc.shape)}")
    if out_acc.dtype != torch.float32 or lse_acc.dtype != torch.float32:
        raise TypeError(f"forward_accumulate: out_acc and lse_acc must be fp32, got {out_acc.dtype}, {lse_acc.dtype}")
    if not (Sq and k.shape[2] and B * Hq):
        return
    if D == Dv:
        _launch_forward(q, k, v, out_acc, lse_acc, mask, scale, accumulate=True)
        return
    m = max(D, Dv)
    o = pad_head_dim(out_acc, m)  # out_acc itself when Dv > D
    _launch_forward(pad_head_dim(q, m), pad_head_dim(k, m), pad_head_dim(v, m), o, lse_acc, mask, scale,
                    accumulate=True)
    if o is not out_acc:
        out_acc.copy_(o[..., :Dv])


def backward(
    dout: torch.Tensor,  # (B, Hq, Sq, Dv)
    q: torch.Tensor,  # (B, Hq, Sq, D)
    k: torch.Tensor,  # (B, Hkv, Sk, D)
    v: torch.Tensor,  # (B, Hkv, Sk, Dv)
    out: torch.Tensor,  # (B, Hq, Sq, Dv) the global output of these rows
    lse: torch.Tensor,  # (B, Hq, Sq)    the global lse of these rows (natural log)
    *,
    mask: TileMask,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> dq (B, Hq, Sq, D), dk (B, Hkv, Sk, D), dv (B, Hkv, Sk, Dv), all fp32 (Dv != D: zero-padded as in
    :func:`forward`)."""
    _check(q, k, v, mask)
    return backward_padded(_backward, dout, q, k, v, out, lse, mask=mask, scale=scale)


def _backward(dout, q, k, v, out, lse, *, mask: TileMask, scale: float):
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    dq = torch.zeros(B, Hq, Sq, D, dtype=torch.float32, device=q.device)
    dk = torch.zeros(B, Hkv, Sk, D, dtype=torch.float32, device=q.device)
    dv = torch.zeros(B, Hkv, Sk, D, dtype=torch.float32, device=q.device)
    if not (Sq and Sk and B * Hq):
        return dq, dk, dv
    if lse.dtype != torch.float32:
        lse = lse.float()
    bd = _block_d(D)
    delta = torch.empty(B * Hq, Sq, dtype=torch.float32, device=q.device)  # rowsum(dO * O)
    bm_delta = 16 if INTERPRET else 64
    with _LAUNCH:
        _bwd_delta_kernel[(triton.cdiv(Sq, bm_delta), B * Hq)](
            out, dout, delta, *out.stride(), *dout.stride(), Hq, Sq, HEAD_D=D, BLOCK_D=bd, BLOCK_M=bm_delta)
        common = (*q.stride(), *k.stride(), *v.stride(), *dout.stride(), *lse.stride())
        margs, mconsts = _mask_args(mask, scale, delta)
        consts = dict(PREC=_prec(q.dtype), HEAD_D=D, BLOCK_D=bd, **mconsts)
        _bwd_dkdv[lambda meta: (triton.cdiv(Sk, meta["BLOCK_N"]), B * Hkv)](
            q, k, v, dout, lse, delta, dk, dv, *common,
            Hkv, Hq // Hkv, Sq, Sk, float(scale), float(scale) * _LOG2E, _bucket(Sq), _bucket(Sk), *margs, **consts)
        _bwd_dq[lambda meta: (triton.cdiv(Sq, meta["BLOCK_M"]), B * Hq)](
            q, k, v, dout, lse, delta, dq, *common,
            Hq, Hq // Hkv, Sq, Sk, float(scale), float(scale) * _LOG2E, _bucket(Sq), _bucket(Sk), *margs, **consts)
    return dq, dk, dv


BACKEND = KernelBackend(
    name="triton", forward=forward, backward=backward, forward_accumulate=forward_accumulate,
    native_masks=frozenset(_MASK_CODE), dtypes=frozenset(_FLOATS),
    native_features=frozenset({"band", "docs", "softcap"}),
)
