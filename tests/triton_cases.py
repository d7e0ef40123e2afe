"""Cases for the Triton kernels: computed here, asserted in tests/test_triton_kernels.py.

Each case returns plain numbers: max-abs errors against an fp64 truth (the ``reference`` backend on
the fp64 inputs) of the Triton kernel and of torch in the same dtype (the error budget of seqpar.testing.numerics).
Device-agnostic: on CUDA the tests call these in-process (compiled kernels); on CPU they run in a
fresh interpreter with ``TRITON_INTERPRET=1`` (the variable must be set before triton is imported)::

    TRITON_INTERPRET=1 python tests/triton_cases.py OUT.json      # every case below, as JSON

"""

from __future__ import annotations

import functools

import json
import os
import sys
import time
from typing import Literal

import torch

from seqpar.kernels import TileMask
from seqpar.testing.numerics import sdpa_grads
from seqpar.vocab import MASK_KINDS

__all__ = ["KERNEL_CASES", "TILED_CASES", "ACCUMULATE_CASES", "RING_CASES", "MASKS", "MASKED_CASES",
           "MASKED_TILED_CASES", "MASKED_ACCUMULATE_CASES", "kernel_case", "accumulate_case", "masked_case",
           "masked_accumulate_case", "dense_visible", "masked_attention", "run_all", "case_id"]

Strides = Literal["contiguous", "transposed", "strided"]

# (B, Hq, Hkv, Sq, Sk, D, mask, dtype, strides): every mask kind x GQA / MQA x odd head dims x Sq != Sk x
# non-contiguous inputs x fp32 / bf16. Interpreter-sized (a few programs of 16 x 16 each).
KERNEL_CASES = [
    *[(1, 4, 4, 24, 24, 32, m, "float32", "contiguous") for m in MASK_KINDS],
    *[(1, 4, 2, 21, 21, 40, m, "float32", "transposed") for m in MASK_KINDS],
    *[(2, 3, 1, 19, 19, 80, m, "float32", "strided") for m in MASK_KINDS],
    *[(1, 4, 1, 33, 33, 64, m, "bfloat16", "transposed") for m in MASK_KINDS],
    (1, 2, 1, 13, 37, 40, "full", "float32", "strided"),  # Sq < Sk (zigzag: half q x all kv)
    (1, 2, 2, 37, 13, 24, "full", "bfloat16", "contiguous"),  # Sq > Sk (zigzag: all q x half kv)
    (1, 2, 1, 29, 18, 16, "causal", "float32", "contiguous"),  # top-left causal, Sq > Sk
    (1, 2, 1, 18, 29, 16, "strict", "float32", "transposed"),  # top-left strict, Sq < Sk
    (1, 2, 1, 17, 17, 130, "causal", "float32", "contiguous"),  # D just past a power of two
]

# kernel cases re-run with non-square tiles (the interpreter's default is 16 x 16): forward / dQ with
# BLOCK_M = 2 x BLOCK_N (the diagonal spans two key blocks), dK/dV with BLOCK_N = 2 x BLOCK_M
TILED_CASES = [
    (1, 2, 1, 70, 70, 40, "causal", "float32", "transposed"),
    (1, 2, 2, 45, 83, 16, "strict", "float32", "contiguous"),
    (1, 2, 2, 83, 45, 24, "causal", "bfloat16", "strided"),
]
TILES = dict(fwd=(32, 16), dkdv=(16, 32), dq=(32, 16))

# (B, Hq, Hkv, Sq, Sk, D, mask of the new block, dtype, state in strided views): the accumulating forward
ACCUMULATE_CASES = [
    (1, 4, 2, 24, 24, 32, "full", "float32", False),
    (1, 4, 2, 24, 24, 40, "causal", "float32", True),
    (1, 4, 1, 24, 24, 40, "strict", "float32", True),
    (1, 2, 1, 12, 24, 48, "full", "float32", True),  # zigzag j > i: half the rows, all keys
    (1, 2, 2, 24, 12, 48, "full", "bfloat16", True),  # zigzag j < i: all rows, half the keys
    (1, 4, 1, 32, 32, 64, "strict", "bfloat16", False),
]

# TileMasks with a band, documents and / or a soft-cap, by name (the cases below name them; sizes in the name's
# comment are the tile the documents cover)
_D40 = ((0, 1, 0), (1, 13, 1), (13, 14, 2), (14, 40, 3))  # 40 positions: length-1 segments, uneven lengths
_D48 = ((0, 5, 0), (5, 6, 1), (6, 30, 3), (30, 48, 4))  # 48 kv positions: doc 2 has no kv, doc 4 no q
_D40K = ((0, 3, 0), (3, 20, 1), (20, 21, 2), (21, 40, 3))  # 40 kv positions, other cuts than _D40
MASKS: dict[str, TileMask] = {
    "lo": TileMask("full", lo=-5),  # lower edge only: j >= i - 5
    "hi": TileMask("full", hi=7),  # upper edge only, past the diagonal
    "window": TileMask("causal", lo=-9),  # a causal sliding window of 10
    "lohi": TileMask("full", lo=-20, hi=3),
    "hi_neg": TileMask("full", hi=-6),  # rows 0..5 see no key
    "lo_pos": TileMask("full", lo=5),  # the last rows see no key
    "empty": TileMask("full", lo=3, hi=1),  # nothing visible at all
    "wide": TileMask("strict", lo=-1000, hi=1000),  # a band wider than the tile (= strict)
    "diag": TileMask("full", lo=2, hi=2),  # one pair per row
    "docs": TileMask("full", docs=(_D40, _D48)),  # 40 x 48
    "docs_causal_band": TileMask("causal", lo=-6, docs=(_D40, _D40K)),  # 40 x 40
    "softcap": TileMask("full", softcap=1.5),
    "softcap_window": TileMask("causal", lo=-8, softcap=1.5),
    "softcap_docs_strict": TileMask("strict", softcap=2.0, docs=(_D40, _D40K)),  # 40 x 40
    # GPU sizes (any tile size unless said)
    "window_200": TileMask("causal", lo=-199),
    "band_300": TileMask("full", lo=-150, hi=149),
    "docs_1000": TileMask("causal", docs=(((0, 300, 0), (300, 301, 1), (301, 700, 2), (700, 1000, 3)),
                                          ((0, 250, 0), (250, 301, 1), (301, 650, 2), (650, 1000, 3)))),  # 1000 x 1000
    "softcap_window_200": TileMask("causal", lo=-199, softcap=30.0),
}

# (B, Hq, Hkv, Sq, Sk, D, mask name, dtype, strides): every mask above through the kernels, GQA / MQA, Sq != Sk
MASKED_CASES = [
    (1, 4, 2, 40, 40, 16, "lo", "float32", "contiguous"),
    (1, 2, 1, 40, 40, 24, "hi", "float32", "transposed"),
    (1, 4, 1, 40, 40, 32, "window", "float32", "strided"),
    (1, 2, 2, 37, 45, 16, "lohi", "float32", "contiguous"),
    (1, 2, 1, 40, 40, 16, "hi_neg", "float32", "contiguous"),
    (1, 2, 1, 40, 33, 16, "lo_pos", "float32", "transposed"),
    (1, 2, 1, 24, 24, 16, "empty", "float32", "contiguous"),
    (1, 2, 1, 24, 30, 16, "wide", "float32", "contiguous"),
    (1, 2, 1, 24, 30, 16, "diag", "float32", "contiguous"),
    (1, 4, 2, 40, 48, 16, "docs", "float32", "strided"),
    (1, 3, 1, 40, 40, 24, "docs_causal_band", "float32", "contiguous"),
    (1, 2, 1, 40, 40, 16, "softcap", "float32", "contiguous"),
    (1, 4, 2, 40, 40, 32, "softcap_window", "bfloat16", "transposed"),
    (1, 2, 1, 40, 40, 16, "softcap_docs_strict", "float32", "contiguous"),
    (1, 4, 1, 40, 48, 32, "docs", "bfloat16", "contiguous"),
]
# some of them with BLOCK_M != BLOCK_N (see TILES)
MASKED_TILED_CASES = [
    (1, 2, 1, 70, 70, 16, "window", "float32", "contiguous"),
    (1, 2, 1, 40, 40, 16, "docs_causal_band", "float32", "transposed"),
]
# (B, Hq, Hkv, Sq, Sk, D, mask of the running state's block, mask of the new block, dtype, views): the state
# starts at -inf in the rows its block does not see
MASKED_ACCUMULATE_CASES = [
    (1, 4, 2, 40, 40, 16, "hi_neg", "window", "float32", True),
    (1, 2, 1, 40, 40, 16, "lo_pos", "docs_causal_band", "float32", False),
    (1, 2, 1, 40, 40, 16, "hi_neg", "softcap_docs_strict", "float32", True),
    (1, 4, 1, 40, 40, 16, "empty", "hi_neg", "bfloat16", False),
]

# (P, layout, causal, Hq, Hkv, S, D, dtype): the whole ring on thread-ranks with backend="triton"
RING_CASES = [
    (2, "zigzag", True, 2, 1, 32, 16, "float32"),
    (3, "striped", True, 2, 2, 24, 24, "float32"),  # strict tiles
    (2, "contiguous", False, 2, 1, 32, 16, "bfloat16"),
    (2, "striped", True, 2, 1, 32, 40, "bfloat16"),
]


def case_id(case) -> str:
    return "-".join(str(x) for x in case)


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def _visible(Sq: int, Sk: int, mask: str, device) -> torch.Tensor:
    """(Sq, Sk) bool: key j visible to query i (top-left aligned)."""
    i = torch.arange(Sq, device=device)[:, None]
    j = torch.arange(Sk, device=device)[None, :]
    if mask == "full":
        return torch.ones(Sq, Sk, dtype=torch.bool, device=device)
    return j <= i if mask == "causal" else j < i


def _as(x: torch.Tensor, dtype: torch.dtype, strides: Strides) -> torch.Tensor:
    """``x`` (B, H, S, D) in ``dtype`` with the given memory layout (same values)."""
    if strides == "contiguous":
        return x.to(dtype).contiguous()
    if strides == "transposed":  # (B, S, H, D) storage
        return x.to(dtype).transpose(1, 2).contiguous().transpose(1, 2)
    B, H, S, D = x.shape  # "strided": every other element of a wider buffer along D and S
    buf = torch.zeros(B, H, 2 * S, 2 * D, dtype=dtype, device=x.device)
    buf[:, :, ::2, ::2] = x.to(dtype)
    return buf[:, :, ::2, ::2]


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    fin = torch.isfinite(b)
    if not torch.equal(torch.isfinite(a), fin):
        return float("inf")
    return (a.double()[fin] - b.double()[fin]).abs().max().item() if fin.any() else 0.0


def kernel_case(B, Hq, Hkv, Sq, Sk, D, mask, dtype, strides, *, device="cpu", seed=0) -> dict:
    """Forward and backward of one tile: {name: {"triton": err, "sdpa": err, "scale": max|truth|}}."""
    from seqpar.kernels import block_attention, block_attention_backward, reference

    dt = _dtype(dtype)
    g = torch.Generator().manual_seed(seed + Sq * 7 + Sk + D)
    q, do = (torch.randn(B, Hq, Sq, D, generator=g, dtype=torch.float64).to(device) for _ in range(2))
    k, v = (torch.randn(B, Hkv, Sk, D, generator=g, dtype=torch.float64).to(device) for _ in range(2))
    scale = D ** -0.5
    # truth: the reference backend in fp64 on the fp64 inputs
    t_out, t_lse = reference.forward(q, k, v, mask=TileMask(mask), scale=scale)
    t_grads = reference.backward(do, q, k, v, t_out, t_lse, mask=TileMask(mask), scale=scale)
    # triton in dt, any strides; the backward gets the global (out, lse) as the ring passes them
    ql, kl, vl, dol = (_as(x, dt, strides) for x in (q, k, v, do))
    out, lse = block_attention(ql, kl, vl, mask=mask, scale=scale, backend="triton")
    grads = block_attention_backward(dol, ql, kl, vl, t_out.to(dt), t_lse.float(), mask=mask, scale=scale,
                                     backend="triton")
    # torch in dt: SDPA with an explicit mask (rows that would see nothing see key 0, for the baseline only)
    vis = _visible(Sq, Sk, mask, device)
    vis[:, 0] |= ~vis.any(1)
    base64 = sdpa_grads(q, k, v, do, causal=False, attn_mask=vis)
    base = sdpa_grads(*(x.to(dt) for x in (q, k, v, do)), causal=False, attn_mask=vis)
    # lse baseline: exact math on the inputs rounded to dt (the part of the error that is the dtype's)
    _, lse_low = reference.forward(*(x.to(dt) for x in (q, k, v)), mask=TileMask(mask), scale=scale)
    res = {"out": dict(triton=_err(out, t_out), sdpa=_err(base[0], base64[0]), scale=t_out.abs().max().item()),
           "lse": dict(triton=_err(lse, t_lse), sdpa=_err(lse_low, t_lse),
                       scale=t_lse[torch.isfinite(t_lse)].abs().max().item())}
    for i, name in enumerate(["dq", "dk", "dv"]):
        res[name] = dict(triton=_err(grads[i], t_grads[i]), sdpa=_err(base[i + 1], base64[i + 1]),
                         scale=t_grads[i].abs().max().item())
    res["dtypes"] = dict(out=str(out.dtype), lse=str(lse.dtype), dq=str(grads[0].dtype), dk=str(grads[1].dtype))
    return res


def _attend64(q, blocks, scale):
    """Independent fp64 math: attention of q over the concatenation of ``blocks`` [(k, v, visible (Sq, Sk))]."""
    g = q.shape[1] // blocks[0][0].shape[1]
    s = torch.cat([(q @ k.repeat_interleave(g, 1).transpose(-1, -2) * scale).masked_fill(~vis, float("-inf"))
                   for k, _, vis in blocks], -1)
    v = torch.cat([v.repeat_interleave(g, 1) for _, v, _ in blocks], 2)
    return torch.softmax(s, -1).nan_to_num(0.0) @ v, torch.logsumexp(s, -1)


def _running_state(s_out, s_lse, views: bool):
    """A running (out, lse) holding (s_out, s_lse): fresh fp32 tensors, or (``views``) strided views into
    sentinel-filled buffers (-> out, lse, out buffer, lse buffer) so writes outside the views show."""
    if not views:
        return s_out.float().clone(), s_lse.float().clone(), None, None
    B, Hq, Sq, D = s_out.shape
    obuf = torch.full((B, 2 * Sq, Hq, D), 7.0, dtype=torch.float32, device=s_out.device)  # sentinel
    lbuf = torch.full((B, Hq, 2 * Sq), 7.0, dtype=torch.float32, device=s_out.device)
    o = obuf[:, Sq:].transpose(1, 2)  # (B, Hq, Sq, D), strided
    lv = lbuf[:, :, 1::2]  # (B, Hq, Sq), stride 2
    o.copy_(s_out)
    lv.copy_(s_lse)
    return o, lv, obuf, lbuf


def accumulate_case(B, Hq, Hkv, Sq, Sk, D, mask, dtype, views, *, device="cpu", seed=1) -> dict:
    """The accumulating forward (triton) and the generic fallback (aten + merge) on a running state,
    vs fp64 attention over both blocks at once; bit-exactness of memory that must stay untouched."""
    from seqpar.kernels import block_attention_accumulate, reference

    dt = _dtype(dtype)
    g = torch.Generator().manual_seed(seed + Sq + Sk + D)
    q = torch.randn(B, Hq, Sq, D, generator=g, dtype=torch.float64).to(device)
    k0, v0 = (torch.randn(B, Hkv, Sq, D, generator=g, dtype=torch.float64).to(device) for _ in range(2))
    k1, v1 = (torch.randn(B, Hkv, Sk, D, generator=g, dtype=torch.float64).to(device) for _ in range(2))
    scale = D ** -0.5
    # the running state: the diagonal block (causal), as the ring's step 0 leaves it
    s_out, s_lse = reference.forward(q, k0, v0, mask=TileMask("causal"), scale=scale)
    # truth: fp64 attention over both blocks at once (not a merge)
    t_out, t_lse = _attend64(q, [(k0, v0, _visible(Sq, Sq, "causal", device)), (k1, v1, _visible(Sq, Sk, mask, device))],
                             scale)

    state = functools.partial(_running_state, s_out, s_lse, views)

    args = [x.to(dt) for x in (q, k1, v1)]
    o_tr, l_tr, obuf, lbuf = state()
    before_o, before_l = o_tr.clone(), l_tr.clone()
    block_attention_accumulate(*args, o_tr, l_tr, mask=mask, scale=scale, backend="triton")
    o_at, l_at, _, _ = state()
    block_attention_accumulate(*args, o_at, l_at, mask=mask, scale=scale, backend="aten")  # generic fallback
    unseen = ~_visible(Sq, Sk, mask, device).any(1)  # (Sq,) rows with no key in the new block
    res = {"out": dict(triton=_err(o_tr, t_out), sdpa=_err(o_at, t_out), scale=t_out.abs().max().item()),
           "lse": dict(triton=_err(l_tr, t_lse), sdpa=_err(l_at, t_lse), scale=t_lse.abs().max().item()),
           "unseen_rows": int(unseen.sum()),
           "unseen_untouched": bool(torch.equal(o_tr[:, :, unseen], before_o[:, :, unseen])
                                    and torch.equal(l_tr[:, :, unseen], before_l[:, :, unseen]))}
    if views:
        res["outside_untouched"] = bool((obuf[:, :Sq] == 7.0).all() and (lbuf[:, :, 0::2] == 7.0).all())
    return res


def dense_visible(mask: TileMask, Sq: int, Sk: int, device="cpu") -> torch.Tensor:
    """(Sq, Sk) bool: the TileMask's semantics written out here, independently of the kernels."""
    i = torch.arange(Sq, device=device)[:, None]
    j = torch.arange(Sk, device=device)[None, :]
    vis = _visible(Sq, Sk, mask.kind, device)
    if mask.lo is not None:
        vis = vis & (j - i >= mask.lo)
    if mask.hi is not None:
        vis = vis & (j - i <= mask.hi)
    if mask.docs is not None:
        qd = torch.tensor([d for a, b, d in mask.docs[0] for _ in range(a, b)], dtype=torch.long, device=device)
        kd = torch.tensor([d for a, b, d in mask.docs[1] for _ in range(a, b)], dtype=torch.long, device=device)
        vis = vis & (qd[:, None] == kd[None, :])
    return vis


def masked_attention(q, k, v, vis, scale: float, softcap: float = 0.0):
    """Dense masked attention in the inputs' dtype, differentiable: (out (B,Hq,Sq,D), lse (B,Hq,Sq)).
    ``vis`` (Sq, Sk) bool; rows that see nothing: out 0, lse -inf, zero gradients."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = (q @ k.transpose(-1, -2)) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    seen = vis.any(-1)  # (Sq,)
    s = s.masked_fill(~vis, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.softmax(s.masked_fill(~seen[:, None], 0.0), -1) * seen[:, None]
    return p @ v, lse


def masked_case(B, Hq, Hkv, Sq, Sk, D, mask, dtype, strides, *, device="cpu", seed=0, backend="triton") -> dict:
    """One masked tile (``mask``: a name of :data:`MASKS`) on ``backend``, forward and backward, vs fp64
    dense masked math: {name: {backend: err, "sdpa": err of the same math in ``dtype``, "scale": ...}}."""
    from seqpar.kernels import block_attention, block_attention_backward

    tm, dt = MASKS[mask] if isinstance(mask, str) else mask, _dtype(dtype)
    g = torch.Generator().manual_seed(seed + Sq * 7 + Sk + D)
    q, do = (torch.randn(B, Hq, Sq, D, generator=g, dtype=torch.float64).to(device) for _ in range(2))
    k, v = (torch.randn(B, Hkv, Sk, D, generator=g, dtype=torch.float64).to(device) for _ in range(2))
    q = q * 2.0  # larger scores, so that a soft-cap bites
    scale = D ** -0.5
    vis = dense_visible(tm, Sq, Sk, device)

    def run(*xs):
        xs = [x.detach().clone().requires_grad_() for x in xs]
        o, l = masked_attention(*xs, vis, scale, tm.softcap)
        o.backward(do.to(o.dtype))
        return [o.detach(), l.detach()] + [x.grad for x in xs]

    truth = run(q, k, v)
    low = run(*(x.to(dt) for x in (q, k, v)))
    _, lse_low = masked_attention(*(x.to(dt).double() for x in (q, k, v)), vis, scale, tm.softcap)
    low[1] = lse_low
    ql, kl, vl, dol = (_as(x, dt, strides) for x in (q, k, v, do))
    out, lse = block_attention(ql, kl, vl, mask=tm, scale=scale, backend=backend)
    lse_in = truth[1] if dt == torch.float64 else truth[1].float()  # the ring's lse: fp32 (fp64 for fp64)
    grads = block_attention_backward(dol, ql, kl, vl, truth[0].to(dt), lse_in, mask=tm, scale=scale,
                                     backend=backend)
    mine = [out, lse, *grads]
    res = {}
    for i, name in enumerate(["out", "lse", "dq", "dk", "dv"]):
        fin = torch.isfinite(truth[i])
        res[name] = {backend: _err(mine[i], truth[i]), "sdpa": _err(low[i], truth[i]),
                     "scale": truth[i][fin].abs().max().item() if fin.any() else 0.0}
    unseen = ~vis.any(1)
    res["unseen_rows"] = int(unseen.sum())
    res["unseen_exact"] = bool((out[:, :, unseen] == 0).all() and torch.isneginf(lse[:, :, unseen]).all()
                               and (grads[0][:, :, unseen] == 0).all())
    res["shapes_ok"] = bool(out.shape == q.shape and lse.shape == q.shape[:3] and grads[0].shape == q.shape
                            and grads[1].shape == k.shape and grads[2].shape == v.shape)
    return res


def masked_accumulate_case(B, Hq, Hkv, Sq, Sk, D, mask0, mask1, dtype, views, *, device="cpu", seed=2,
                           backend="triton") -> dict:
    """block_attention_accumulate of a masked tile into a running (out, lse) that is -inf in the rows its
    own block does not see, vs fp64 dense attention over both blocks at once."""
    from seqpar.kernels import block_attention_accumulate

    m0, m1, dt = MASKS[mask0], MASKS[mask1], _dtype(dtype)
    g = torch.Generator().manual_seed(seed + Sq + Sk + D)
    q = torch.randn(B, Hq, Sq, D, generator=g, dtype=torch.float64).to(device) * 2.0
    k0, v0 = (torch.randn(B, Hkv, Sq, D, generator=g, dtype=torch.float64).to(device) for _ in range(2))
    k1, v1 = (torch.randn(B, Hkv, Sk, D, generator=g, dtype=torch.float64).to(device) for _ in range(2))
    scale = D ** -0.5
    vis0, vis1 = dense_visible(m0, Sq, Sq, device), dense_visible(m1, Sq, Sk, device)
    s_out, s_lse = masked_attention(q, k0, v0, vis0, scale, m0.softcap)
    # truth: both blocks at once (each with its own soft-cap: concatenated scores)
    gq = Hq // Hkv
    scores = []
    for kk, vis, tm in ((k0, vis0, m0), (k1, vis1, m1)):
        s = q @ kk.repeat_interleave(gq, 1).transpose(-1, -2) * scale
        if tm.softcap:
            s = tm.softcap * torch.tanh(s / tm.softcap)
        scores.append(s.masked_fill(~vis, float("-inf")))
    s = torch.cat(scores, -1)
    t_lse = torch.logsumexp(s, -1)
    seen = torch.isfinite(t_lse)[..., None]
    t_out = (torch.softmax(s.masked_fill(~seen, 0.0), -1) * seen) @ torch.cat(
        [v0.repeat_interleave(gq, 1), v1.repeat_interleave(gq, 1)], 2)

    state = functools.partial(_running_state, s_out, s_lse, views)

    args = [x.to(dt) for x in (q, k1, v1)]
    o, l, obuf, lbuf = state()
    before_o, before_l = o.clone(), l.clone()
    block_attention_accumulate(*args, o, l, mask=m1, scale=scale, backend=backend)
    lo_o, lo_l, _, _ = state()  # baseline: the same in dtype through reference math + merge
    from seqpar.kernels import merge_partial
    bo, bl = masked_attention(*(x.to(dt) for x in (q, k1, v1)), vis1, scale, m1.softcap)
    merge_partial(lo_o, lo_l, bo.float(), bl.float())
    unseen = ~vis1.any(1)
    fin = torch.isfinite(t_lse)
    res = {"out": {backend: _err(o, t_out), "sdpa": _err(lo_o, t_out), "scale": t_out.abs().max().item()},
           "lse": {backend: _err(l, t_lse), "sdpa": _err(lo_l, t_lse),
                   "scale": t_lse[fin].abs().max().item() if fin.any() else 0.0},
           "unseen_rows": int(unseen.sum()),
           "unseen_untouched": bool(torch.equal(o[:, :, unseen], before_o[:, :, unseen])
                                    and torch.equal(l[:, :, unseen], before_l[:, :, unseen])),
           "state_inf_rows": int((~torch.isfinite(s_lse[0, 0])).sum())}
    if views:
        res["outside_untouched"] = bool((obuf[:, :Sq] == 7.0).all() and (lbuf[:, :, 0::2] == 7.0).all())
    return res


def ring_case(P, layout, causal, Hq, Hkv, S, D, dtype, *, device="cpu", mode="autograd") -> dict:
    from threaded_cases import ring_equivalence

    return ring_equivalence(P, seed=P + S + D, B=1, Hq=Hq, Hkv=Hkv, S=S, D=D, layout=layout, causal=causal,
                            dtype=_dtype(dtype), backend="triton", device=device, mode=mode)


def tiled_case(*case, device="cpu", fn=None) -> dict:
    """:func:`kernel_case` (or ``fn``) with the autotuners' configs swapped for :data:`TILES` (then restored)."""
    import triton

    from seqpar.kernels import triton_attention as T

    tuners = dict(fwd=(T._fwd, T._fwd_acc), dkdv=(T._bwd_dkdv,), dq=(T._bwd_dq,))
    saved = {t: t.configs for ts in tuners.values() for t in ts}
    try:
        for name, ts in tuners.items():
            for t in ts:
                t.configs = [triton.Config({"BLOCK_M": TILES[name][0], "BLOCK_N": TILES[name][1]}, num_warps=1,
                                           num_stages=1)]
        return (fn or kernel_case)(*case, device=device)
    finally:
        for t, c in saved.items():
            t.configs = c


def masked_tiled_case(*case, device="cpu") -> dict:
    """:func:`masked_case` with the :data:`TILES` configs (BLOCK_M != BLOCK_N)."""
    return tiled_case(*case, device=device, fn=masked_case)


def run_all(device: str = "cpu", kinds: tuple[str, ...] | None = None) -> dict:
    """Every case (of ``kinds``, default all), keyed by kind and :func:`case_id`; a case that raises records
    its error."""
    out: dict = {"kernel": {}, "tiled": {}, "accumulate": {}, "ring": {}, "masked": {}, "masked_tiled": {},
                 "masked_accumulate": {}, "seconds": {}}
    for kind, cases, fn in (("kernel", KERNEL_CASES, kernel_case), ("tiled", TILED_CASES, tiled_case),
                            ("accumulate", ACCUMULATE_CASES, accumulate_case), ("ring", RING_CASES, ring_case),
                            ("masked", MASKED_CASES, masked_case), ("masked_tiled", MASKED_TILED_CASES,
                                                                    masked_tiled_case),
                            ("masked_accumulate", MASKED_ACCUMULATE_CASES, masked_accumulate_case)):
        if kinds is not None and kind not in kinds:
            continue
        t0 = time.perf_counter()
        for c in cases:
            try:
                out[kind][case_id(c)] = fn(*c, device=device)
            except Exception as e:  # noqa: BLE001 - reported, asserted on the pytest side
                out[kind][case_id(c)] = {"error": f"{type(e).__name__}: {e}"}
        out["seconds"][kind] = time.perf_counter() - t0
    return out


def _backend_checks() -> dict:
    """Under TRITON_INTERPRET=1: resolve_backend wiring, fp64 fallback, too-large head dim."""
    from seqpar.kernels import block_attention, reference, resolve_backend

    cpu = torch.device("cpu")
    res = {"triton_on_cpu": resolve_backend("triton", cpu), "auto_on_cpu": resolve_backend("auto", cpu)}
    q = torch.randn(1, 2, 8, 16, dtype=torch.float64)
    o, l = block_attention(q, q, q, mask="causal", scale=0.25, backend="triton")
    ro, rl = reference.forward(q, q, q, mask=TileMask("causal"), scale=0.25)
    res["fp64_fallback_err"] = max((o - ro).abs().max().item(), (l - rl).abs().max().item())
    try:
        big = torch.randn(1, 1, 4, 264)
        block_attention(big, big, big, mask="full", scale=0.1, backend="triton")
        res["big_head_dim"] = None
    except ValueError as e:
        res["big_head_dim"] = str(e)
    return res


if __name__ == "__main__":
    torch.set_num_threads(1)
    # argv: OUT.json [kind ...] (default: every kind)
    results = run_all("cpu", tuple(sys.argv[2:]) or None)
    results["backend"] = _backend_checks()
    results["interpret"] = os.environ.get("TRITON_INTERPRET")
    with open(sys.argv[1], "w") as f:
        json.dump(results, f, indent=1)
