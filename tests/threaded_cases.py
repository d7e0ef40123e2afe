"""Ring attention on P thread-ranks (seqpar.comm.threads) vs torch SDPA on the whole sequence.

``ring_equivalence`` runs the ring method (``RingMethod`` under ``MethodFunction``) on P threads with this rank's shards,
unshards the outputs and gradients, and returns max-abs errors against an fp64 SDPA reference of:
the ring in ``dtype`` and single-device SDPA in ``dtype`` (the error budget of seqpar.testing.numerics). The
pytest side asserts; this module only computes. Device-agnostic: CPU tests and the GPU check share it.
"""

from __future__ import annotations

from typing import Literal

import torch

from seqpar.comm.threads import run_threads
from seqpar.layout import shard_tensor, unshard_tensor
from seqpar.masks import MaskSpec
from seqpar.methods import MethodFunction, RingMethod
from seqpar.testing import numerics

__all__ = ["full_inputs", "ring_equivalence"]


def full_inputs(seed: int, B: int, Hq: int, Hkv: int, S: int, D: int, *, transposed: bool, device: str):
    """fp64 q (B, Hq, S, D), k, v (B, Hkv, S, D), grad-out (B, Hq, S, D); ``transposed``: stored
    (B, S, H, D) and viewed as (B, H, S, D), as Hugging Face passes them."""
    g = torch.Generator().manual_seed(seed)

    def rnd(h):
        if transposed:
            return torch.randn(B, S, h, D, generator=g, dtype=torch.float64).transpose(1, 2)
        return torch.randn(B, h, S, D, generator=g, dtype=torch.float64)

    return tuple(t.to(device) for t in (rnd(Hq), rnd(Hkv), rnd(Hkv), rnd(Hq)))


def _rank(ring, q, k, v, do, *, layout, causal, scale, backend, mode):
    """One thread-rank: shard, ring forward + backward, return local (out, dq, dk, dv)."""
    sh = lambda t: shard_tensor(t, 2, ring.rank, ring.size, layout)  # noqa: E731
    ql, kl, vl, dol = (sh(t) for t in (q, k, v, do))
    method = RingMethod(ring, layout=layout, mask=MaskSpec(causal=causal), scale=scale, backend=backend)
    if mode == "autograd":
        ql, kl, vl = (t.detach().requires_grad_() for t in (ql, kl, vl))
        out, _ = MethodFunction.apply(ql, kl, vl, method)
        out.backward(dol)
        return [out.detach(), ql.grad, kl.grad, vl.grad]
    # "direct": the method's forward/backward without the autograd engine (CUDA, see seqpar.comm.threads)
    out, lse = method.forward(ql, kl, vl)
    out = out.to(ql.dtype)
    dq, dk, dv = method.backward(dol.contiguous(), ql, kl, vl, out, lse)
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
    ref = numerics.sdpa_grads(q, k, v, do, causal=causal)  # fp64, one device
    low = numerics.sdpa_grads(*(t.to(dtype) for t in (q, k, v, do)), causal=causal)  # same dtype, one device
    per_rank = run_threads(_rank, P, *(t.to(dtype) for t in (q, k, v, do)), layout=layout, causal=causal,
                           scale=D ** -0.5, backend=backend, mode=mode, timeout=timeout)
    got = [unshard_tensor([r[i] for r in per_rank], 2, layout) for i in range(4)]
    assert [g.shape for g in got] == [r.shape for r in ref], ([g.shape for g in got], [r.shape for r in ref])
    return numerics.errors(got, ref, low)
