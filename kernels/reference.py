"""Reference block attention in plain torch math: the spec the other backends are tested against.

Computes in fp32 (fp64 for fp64 inputs). It forms the (Sq, Sk) score matrix of one tile, which is
fine for a tile and for tests; it is not meant for speed. GQA by reshaping the query heads into
(Hkv, group) so K/V are never repeated.
"""

from __future__ import annotations

import torch

from seqpar.kernels.backend import KernelBackend, TileMask, acc_dtype

__all__ = ["forward", "backward", "BACKEND"]


def _scores(q: torch.Tensor, k: torch.Tensor, mask: TileMask, scale: float) -> torch.Tensor:
    # q (B, Hkv, G, Sq, D), k (B, Hkv, Sk, D) -> s (B, Hkv, G, Sq, Sk)
    s = torch.einsum("bhgqd,bhkd->bhgqk", q, k) * scale
    if mask.kind != "full":
        Sq, Sk = s.shape[-2], s.shape[-1]
        rows = torch.arange(Sq, device=s.device)[:, None]
        cols = torch.arange(Sk, device=s.device)[None, :]
        hidden = cols > rows if mask.kind == "causal" else cols >= rows
        s = s.masked_fill(hidden, float("-inf"))
    return s


def _split_heads(q: torch.Tensor, hkv: int) -> torch.Tensor:
    B, Hq, S, D = q.shape
    return q.reshape(B, hkv, Hq // hkv, S, D)


def forward(q, k, v, *, mask: TileMask, scale: float):
    """-> out (B, Hq, Sq, Dv) in fp32/fp64, lse (B, Hq, Sq); rows with no key: out 0, lse -inf."""
    acc = acc_dtype(q.dtype)
    B, Hq, Sq, _ = q.shape
    hkv = k.shape[1]
    s = _scores(_split_heads(q.to(acc), hkv), k.to(acc), mask, scale)
    lse = torch.logsumexp(s, dim=-1)  # (B, Hkv, G, Sq)
    p = torch.exp(s - lse.masked_fill(torch.isinf(lse), 0.0)[..., None])
    out = torch.einsum("bhgqk,bhkd->bhgqd", p, v.to(acc))
    return out.reshape(B, Hq, Sq, v.shape[-1]), lse.reshape(B, Hq, Sq)


def backward(dout, q, k, v, out, lse, *, mask: TileMask, scale: float):
    """Gradients of one tile against the global out/lse, returned in the input dtypes."""
    acc = acc_dtype(q.dtype)
    hkv = k.shape[1]
    qa, ka, va = _split_heads(q.to(acc), hkv), k.to(acc), v.to(acc)
    do = _split_heads(dout.to(acc), hkv)
    o = _split_heads(out.to(acc), hkv)
    l = lse.to(acc).reshape(do.shape[:-1])
    s = _scores(qa, ka, mask, scale)
    p = torch.exp(s - l.masked_fill(torch.isinf(l), 0.0)[..., None])  # (B, Hkv, G, Sq, Sk)
    dv = torch.einsum("bhgqk,bhgqd->bhkd", p, do)
    dp = torch.einsum("bhgqd,bhkd->bhgqk", do, va)
    delta = (do * o).sum(-1, keepdim=True)
    ds = p * (dp - delta) * scale
    dq = torch.einsum("bhgqk,bhkd->bhgqd", ds, ka).reshape(q.shape)
    dk = torch.einsum("bhgqk,bhgqd->bhkd", ds, qa)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


BACKEND = KernelBackend(
    name="reference", forward=forward, backward=backward, native_masks=frozenset({"full", "causal", "strict"}),
    dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64}),
)
