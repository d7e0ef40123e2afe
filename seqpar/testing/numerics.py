"""The numerics contract, written once: an fp64 single-device reference and the error bound.

Against an fp64 single-device reference, seqpar's error must be at most 2x the error of
single-device torch SDPA in the same dtype, plus a small absolute floor scaled by the reference's
magnitude. Every test, benchmark and launcher check that judges accuracy uses :func:`bound` /
:func:`violations` from here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["FLOORS", "sdpa_grads", "bound", "errors", "violations", "assert_within_bound", "tile_visible"]

FLOORS: dict[torch.dtype, float] = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2e-2,
                                    torch.float16: 4e-3}
NAMES = ("out", "dq", "dk", "dv")


def sdpa_grads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor, *, causal: bool,
               attn_mask: torch.Tensor | None = None) -> list[torch.Tensor]:
    """``[out, dq, dk, dv]`` of torch SDPA on the whole sequence, in the inputs' dtype (fp64 for the
    truth); GQA when k/v have fewer heads than q. ``attn_mask``: a boolean (Sq, Sk) visibility mask."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal,
                                         enable_gqa=q.shape[-3] != k.shape[-3])
    out.backward(dout)
    return [out.detach(), q.grad, k.grad, v.grad]


def bound(sdpa_err: float, scale: float, dtype: torch.dtype) -> float:
    """The largest error allowed: ``2 * sdpa_err + floor(dtype) * max(1, scale)``."""
    return 2 * sdpa_err + FLOORS[dtype] * max(1.0, scale)


def errors(mine, truth, low) -> dict[str, dict[str, float]]:
    """Max-abs errors per tensor: ``{"out": {"seqpar": |mine - truth|, "sdpa": |low - truth|, "scale":
    max|truth|}, "dq": ..., ...}``; ``mine``/``truth``/``low`` are matching lists (out, dq, dk, dv)."""
    res = {}
    for name, m, t, lo in zip(NAMES, mine, truth, low):
        t = t.double()
        res[name] = dict(seqpar=(m.double() - t).abs().max().item(), sdpa=(lo.double() - t).abs().max().item(),
                         scale=t.abs().max().item())
    return res


def violations(res: dict[str, dict[str, float]], dtype: torch.dtype, key: str = "seqpar") -> list[str]:
    """The entries of an :func:`errors` result whose ``key`` error exceeds the bound (empty = pass)."""
    bad = []
    for name, e in res.items():
        if not (isinstance(e, dict) and key in e):
            continue
        b = bound(e["sdpa"], e["scale"], dtype)
        if not e[key] <= b:
            bad.append(f"{name}: err {e[key]:.3g} > bound {b:.3g} ({e})")
    return bad


def assert_within_bound(res: dict[str, dict[str, float]], dtype: torch.dtype, key: str = "seqpar") -> None:
    bad = violations(res, dtype, key)
    assert not bad, bad


def tile_visible(mask, nq: int, nk: int) -> torch.Tensor:
    """(nq, nk) bool: which (tile-local row i, column j) a ``seqpar.kernels.TileMask`` lets attend, written from
    its definition (kind, band ``lo <= j - i <= hi``, document segments that must cover the tile)."""
    i = torch.arange(nq)[:, None]
    j = torch.arange(nk)[None, :]
    vis = torch.ones(nq, nk, dtype=torch.bool)
    if mask.kind == "causal":
        vis &= j <= i
    elif mask.kind == "strict":
        vis &= j < i
    if mask.lo is not None:
        vis &= j - i >= mask.lo
    if mask.hi is not None:
        vis &= j - i <= mask.hi
    if mask.docs is not None:
        qd = torch.full((nq,), -1)
        kd = torch.full((nk,), -2)
        for a, b, d in mask.docs[0]:
            qd[a:b] = d
        for a, b, d in mask.docs[1]:
            kd[a:b] = d
        assert (qd >= 0).all() and (kd >= 0).all(), "segments must cover the piece"
        vis &= qd[:, None] == kd[None, :]
    return vis
