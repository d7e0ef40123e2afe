"""Ring attention on P thread-ranks (seqpar.threaded) vs torch SDPA on the whole sequence.

``ring_equivalence`` runs the ring layer (``RingAttention``) on P threads with this rank's shards,
unshards the outputs and gradients, and returns max-abs errors against an fp64 SDPA reference of:
the ring in ``dtype`` and single-device SDPA in ``dtype`` (the error budget of DESIGN.md). The
pytest side asserts; this module only computes. Device-agnostic: CPU tests and the GPU check share it.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from seqpar.attention.ring import RingAttention, ring_backward, ring_forward
from seqpar.layout import shard_tensor, unshard_tensor
from seqpar.threaded import run_threads

__all__ = ["FLOORS", "full_inputs", "ring_equivalence", "within_bound"]

FLOORS = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def full_inputs(seed: int, B: int, Hq: int, Hkv: int, S: int, D: int, *, transposed: bool, device: str):
    """fp64 q (B, Hq, S, D), k, v (B, Hkv, S, D), grad-out (B, Hq, S, D); ``transposed``: stored
    (B, S, H, D) and viewed as (B, H, S, D), as Hugging Face passes them."""
    g = torch.Generator().manual_seed(seed)

    def rnd(h):
        if transposed:
            return torch.randn(B, S, h, D, generator=g, dtype=torch.float64).transpose(1, 2)
        return torch.randn(B, h, S, D, generator=g, dtype=torch.float64)

    return tuple(t.to(device) for t in (rnd(Hq), rnd(Hkv), rnd(Hkv), rnd(Hq)))


def _sdpa(q, k, v, do, causal):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])
    out.backward(do)
    return [out.detach(), q.grad, k.grad, v.grad]


def _rank(ring, q, k, v, do, *, layout, causal, scale, backend, mode):
    """One thread-rank: shard, ring forward + backward, return local (out, dq, dk, dv)."""
    sh = lambda t: shard_tensor(t, 2, ring.rank, ring.size, layout)  # noqa: E731
    ql, kl, vl, dol = (sh(t) for t in (q, k, v, do))
    if mode == "autograd":
        ql, kl, vl = (t.detach().requires_grad_() for t in (ql, kl, vl))
        out, _ = RingAttention.apply(ql, kl, vl, ring, layout, causal, scale, backend)
        out.backward(dol)
        return [out.detach(), ql.grad, kl.grad, vl.grad]
    # "direct": the bodies of RingAttention.forward/backward without the autograd engine (CUDA, see
    # seqpar.threaded)
    opts = dict(ring=ring, layout=layout, causal=causal, scale=scale, backend=backend)
    out, lse = ring_forward(ql, kl, vl, **opts)
    out = out.to(ql.dtype)
    dq, dk, dv = ring_backward(dol.contiguous(), ql, kl, vl, out, lse, **opts)
    return [out, dq, dk, dv]


def ring_equivalence(
    P: int,
    *,
    seed: int,
    B: int,
    Hq: int,
    Hkv: int,
    S: int,
    D: int,
    layout: str,
    causal: bool,
    dtype: torch.dtype,
    backend: str,
    device: str = "cpu",
    mode: Literal["autograd", "direct"] = "autograd",
    transposed: bool = False,
    timeout: float = 300.0,
) -> dict[str, dict[str, float]]:
    """{"out"|"dq"|"dk"|"dv": {"seqpar": err, "sdpa": err, "scale": max|ref|}} over the whole sequence."""
    q, k, v, do = full_inputs(seed, B, Hq, Hkv, S, D, transposed=transposed, device=device)
    ref = _sdpa(q, k, v, do, causal)  # fp64, one device
    low = _sdpa(*(t.to(dtype) for t in (q, k, v, do)), causal)  # same dtype, one device
    per_rank = run_threads(_rank, P, *(t.to(dtype) for t in (q, k, v, do)), layout=layout, causal=causal,
                           scale=D ** -0.5, backend=backend, mode=mode, timeout=timeout)
    res = {}
    for i, name in enumerate(["out", "dq", "dk", "dv"]):
        got = unshard_tensor([r[i] for r in per_rank], 2, layout)
        assert got.shape == ref[i].shape, (name, got.shape, ref[i].shape)
        res[name] = dict(seqpar=(got.double() - ref[i]).abs().max().item(),
                         sdpa=(low[i].double() - ref[i]).abs().max().item(),
                         scale=ref[i].abs().max().item())
    return res


def within_bound(res: dict[str, dict[str, float]], dtype: torch.dtype) -> list[str]:
    """DESIGN.md: error vs fp64 <= 2x single-device SDPA's error in the same dtype + a floor.
    Returns the violations (empty = pass)."""
    bad = []
    for name, e in res.items():
        bound = 2 * e["sdpa"] + FLOORS[dtype] * max(1.0, e["scale"])
        if not e["seqpar"] <= bound:
            bad.append(f"{name}: err {e['seqpar']:.3g} > bound {bound:.3g} ({e})")
    return bad
