"""Reference block attention in plain torch math: the spec the other backends are tested against.

Computes in fp32 (fp64 for fp64 inputs). It forms the score matrix of the tile in chunks of query rows
(at most ``CHUNK_BYTES`` of scores per chunk; one chunk for the tiles of tests), which is fine for a
tile and for tests; it is not meant for speed. GQA by reshaping the query heads into (Hkv, group) so
K/V are never repeated. Every :class:`TileMask` natively: the kind, the band and the documents become a
boolean visibility of the rows of a chunk (:func:`seqpar.kernels.backend.visible_rows`); the soft-cap
``s -> softcap * tanh(s / softcap)`` is applied to the scores before the mask and the softmax, and the
backward multiplies ``dS`` by ``1 - tanh^2``. This is also where other backends send soft-capped tiles
they cannot run (``aten``).
"""

from __future__ import annotations

import torch

from seqpar.kernels.backend import KernelBackend, TileMask, acc_dtype, check_tile, visible_rows

__all__ = ["forward", "backward", "BACKEND", "CHUNK_BYTES"]

CHUNK_BYTES = 64 << 20  # scores of one chunk of query rows: (B, Hq, rows, Sk) in the accumulation dtype


def _rows_per_chunk(B: int, Hq: int, Sq: int, Sk: int, dtype: torch.dtype) -> int:
    per_row = max(1, B * Hq * Sk * torch.finfo(dtype).bits // 8)
    return max(1, min(Sq, CHUNK_BYTES // per_row))


def _scores(q: torch.Tensor, k: torch.Tensor, mask: TileMask, scale: float, r0: int,
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """q (B, Hkv, G, rows, D) = rows r0.. of the tile, k (B, Hkv, Sk, D) -> (s (B, Hkv, G, rows, Sk) masked
    with -inf, tanh(s_raw / softcap) or None)."""
    s = torch.einsum("bhgqd,bhkd->bhgqk", q, k) * scale
    t = None
    if mask.softcap:
        t = torch.tanh(s / mask.softcap)
        s = t * mask.softcap
    rows, Sk = s.shape[-2], s.shape[-1]
    if mask.plain:
        if mask.kind != "full":
            i = torch.arange(r0, r0 + rows, device=s.device)[:, None]
            j = torch.arange(Sk, device=s.device)[None, :]
            s = s.masked_fill(j > i if mask.kind == "causal" else j >= i, float("-inf"))
    else:
        vis = visible_rows(mask, r0, r0 + rows, Sk, s.device)
        if vis is not None:
            s = s.masked_fill(~vis, float("-inf"))
    return s, t


def _split_heads(q: torch.Tensor, hkv: int) -> torch.Tensor:
    B, Hq, S, D = q.shape
    return q.reshape(B, hkv, Hq // hkv, S, D)


def forward(q, k, v, *, mask: TileMask, scale: float):
    """-> out (B, Hq, Sq, Dv) in fp32/fp64, lse (B, Hq, Sq); rows with no key: out 0, lse -inf."""
    check_tile(mask, q.shape[2], k.shape[2])
    acc = acc_dtype(q.dtype)
    B, Hq, Sq, _ = q.shape
    hkv, Sk = k.shape[1], k.shape[2]
    qa, ka, va = _split_heads(q.to(acc), hkv), k.to(acc), v.to(acc)
    outs, lses = [], []
    step = _rows_per_chunk(B, Hq, Sq, Sk, acc)
    for r0 in range(0, max(Sq, 1), step):
        s, _ = _scores(qa[:, :, :, r0:r0 + step], ka, mask, scale, r0)
        lse = torch.logsumexp(s, dim=-1)  # (B, Hkv, G, rows)
        p = torch.exp(s - lse.masked_fill(torch.isinf(lse), 0.0)[..., None])
        outs.append(torch.einsum("bhgqk,bhkd->bhgqd", p, va))
        lses.append(lse)
    out, lse = (outs[0], lses[0]) if len(outs) == 1 else (torch.cat(outs, 3), torch.cat(lses, 3))
    return out.reshape(B, Hq, Sq, v.shape[-1]), lse.reshape(B, Hq, Sq)


def backward(dout, q, k, v, out, lse, *, mask: TileMask, scale: float):
    """Gradients of one tile against the global out/lse, returned in the input dtypes."""
    check_tile(mask, q.shape[2], k.shape[2])
    acc = acc_dtype(q.dtype)
    B, Hq, Sq, _ = q.shape
    hkv, Sk = k.shape[1], k.shape[2]
    qa, ka, va = _split_heads(q.to(acc), hkv), k.to(acc), v.to(acc)
    do = _split_heads(dout.to(acc), hkv)
    o = _split_heads(out.to(acc), hkv)
    l = lse.to(acc).reshape(do.shape[:-1])
    dqs = []
    dk = torch.zeros(ka.shape, dtype=acc, device=q.device)
    dv = torch.zeros(va.shape, dtype=acc, device=q.device)
    step = _rows_per_chunk(B, Hq, Sq, Sk, acc)
    for r0 in range(0, max(Sq, 1), step):
        r1 = min(Sq, r0 + step)
        qc, doc_ = qa[:, :, :, r0:r1], do[:, :, :, r0:r1]
        s, t = _scores(qc, ka, mask, scale, r0)
        lc = l[..., r0:r1]
        p = torch.exp(s - lc.masked_fill(torch.isinf(lc), 0.0)[..., None])  # (B, Hkv, G, rows, Sk)
        dv += torch.einsum("bhgqk,bhgqd->bhkd", p, doc_)
        dp = torch.einsum("bhgqd,bhkd->bhgqk", doc_, va)
        delta = (doc_ * o[:, :, :, r0:r1]).sum(-1, keepdim=True)
        ds = p * (dp - delta) * scale
        if t is not None:
            ds = ds * (1 - t * t)
        dqs.append(torch.einsum("bhgqk,bhkd->bhgqd", ds, ka))
        dk += torch.einsum("bhgqk,bhgqd->bhkd", ds, qc)
    dq = (dqs[0] if len(dqs) == 1 else torch.cat(dqs, 3)).reshape(q.shape)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


BACKEND = KernelBackend(
    name="reference", forward=forward, backward=backward, native_masks=frozenset({"full", "causal", "strict"}),
    dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64}),
    native_features=frozenset({"band", "docs", "softcap"}),
)
