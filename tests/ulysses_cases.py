"""Cases for tests/test_ulysses.py (method="ulysses"), run on every rank of a spawned gloo world. Each
returns plain numbers; the pytest side asserts. References are fp64 SDPA / plain math on the full sequence."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

import seqpar
from seqpar.masks import MaskSpec
from seqpar.testing import numerics


def lse_error(rank, size, *, seed, Hq, Hkv, S, D, layout, causal, dtype):
    """``return_lse=True``: max |lse - fp64 logsumexp of the scaled scores| on this rank's rows, and the
    lse's dtype and shape."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, h, S, D, generator=g, dtype=torch.float64) for h in (Hq, Hkv, Hkv))
    kk = k.repeat_interleave(Hq // Hkv, dim=1)
    s = (q @ kk.transpose(-1, -2)) / math.sqrt(D)
    if causal:
        s = s.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), -math.inf)
    ref = torch.logsumexp(s, dim=-1)  # (B, Hq, S)
    sh = lambda t: seqpar.shard(t, dim=2, layout=layout)  # noqa: E731
    out, lse = seqpar.attention(*(sh(t.to(dtype)) for t in (q, k, v)), is_causal=causal, enable_gqa=Hq != Hkv,
                                layout=layout, method="ulysses", return_lse=True)
    want = sh(ref)
    return dict(err=(lse.double() - want).abs().max().item(), dtype=str(lse.dtype), shape=tuple(lse.shape),
                want_shape=tuple(want.shape))


def count_all_to_all(rank, size, *, layout, Hq, Hkv, causal=True):
    """all_to_all_single calls (and ring exchanges) in one forward and one backward of method="ulysses"."""
    calls, p2p = [], []
    real, real_p2p = dist.all_to_all_single, dist.batch_isend_irecv

    def counting(out, inp, *a, **kw):
        calls.append(tuple(inp.shape))
        return real(out, inp, *a, **kw)

    def counting_p2p(ops):
        p2p.append(len(ops))
        return real_p2p(ops)

    dist.all_to_all_single, dist.batch_isend_irecv = counting, counting_p2p
    try:
        S_local = 4
        q = torch.randn(1, Hq, S_local, 8, requires_grad=True)
        k = torch.randn(1, Hkv, S_local, 8, requires_grad=True)
        v = torch.randn(1, Hkv, S_local, 8, requires_grad=True)
        out = seqpar.attention(q, k, v, is_causal=causal, layout=layout, method="ulysses", enable_gqa=Hq != Hkv)
        fwd = len(calls)
        calls.clear()
        out.sum().backward()
        bwd = len(calls)
    finally:
        dist.all_to_all_single, dist.batch_isend_irecv = real, real_p2p
    return dict(fwd=fwd, bwd=bwd, p2p=len(p2p))


def uneven_heads(rank, size, *, Hq, Hkv):
    """method="ulysses" with heads that do not split over the group: (exception type, message), and
    whether any all-to-all was attempted."""
    calls = []
    real = dist.all_to_all_single

    def counting(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    dist.all_to_all_single = counting
    try:
        q = torch.randn(1, Hq, 4, 8)
        k = torch.randn(1, Hkv, 4, 8)
        seqpar.attention(q, k, k, is_causal=True, layout="striped", method="ulysses", enable_gqa=Hq != Hkv)
    except (TypeError, ValueError) as e:
        return type(e).__name__, str(e), len(calls)
    finally:
        dist.all_to_all_single = real
    return None, None, len(calls)


def healthy(rank, size):
    """A small ulysses call after failures: the world still works (error vs SDPA on the whole sequence)."""
    x = torch.randn(1, 4, 8 * size, 8, generator=torch.Generator().manual_seed(0))
    sh = lambda t: seqpar.shard(t, dim=2, layout="zigzag")  # noqa: E731
    out = seqpar.attention(sh(x), sh(x), sh(x), is_causal=True, layout="zigzag", method="ulysses")
    ref = torch.nn.functional.scaled_dot_product_attention(x, x, x, is_causal=True)
    return (seqpar.unshard(out, dim=2, layout="zigzag") - ref).abs().max().item()


def compiled_function(rank, size, *, layout, causal, hkv, backend="aot_eager"):
    """``torch.compile(f, fullgraph=True, backend=aot_eager)`` of seqpar.attention(method="ulysses") vs the
    same function eagerly: {"eager_diff": max |compiled - eager| over out, lse, dq, dk, dv, "breaks": graph
    breaks, "errors": numerics.errors of the compiled result vs fp64 SDPA}."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    g = torch.Generator().manual_seed(3)
    B, H, S, D = 2, 4, 8 * size, 16
    q, k, v, do = (torch.randn(B, h, S, D, generator=g, dtype=torch.float64) for h in (H, hkv, hkv, H))
    sh = lambda t: seqpar.shard(t, dim=2, layout=layout)  # noqa: E731

    def f(q, k, v):
        return seqpar.attention(q, k, v, is_causal=causal, enable_gqa=hkv != H, layout=layout, method="ulysses",
                                return_lse=True)

    res = []
    for fn in (torch.compile(f, fullgraph=True, backend=backend), f):
        ql, kl, vl = (sh(t.float()).detach().requires_grad_() for t in (q, k, v))
        out, lse = fn(ql, kl, vl)
        out.backward(sh(do.float()))
        res.append([out.detach(), lse.detach(), ql.grad, kl.grad, vl.grad])
    truth = numerics.sdpa_grads(q, k, v, do, causal=causal)
    low = numerics.sdpa_grads(*(t.float() for t in (q, k, v, do)), causal=causal)
    comp = [res[0][0], *res[0][2:]]
    return dict(eager_diff=max((a - b).abs().max().item() for a, b in zip(*res)),
                errors=numerics.errors(comp, [sh(t) for t in truth], [sh(t) for t in low]),
                breaks=sum(counters["graph_break"].values()))


def checkpoint_replay(rank, size, *, layout):
    """A kept forward (``attend(..., kept=)``, as activation checkpointing replays it) gives the same
    out and gradients as a plain call, with no forward all-to-all: {"diff", "fwd_calls"}."""
    from seqpar.api import AttentionCall, attend

    g = torch.Generator().manual_seed(5)
    q, k, v, do = (torch.randn(1, h, 4 * 2 * size, 8, generator=g) for h in (4, 2, 2, 4))
    sh = lambda t: seqpar.shard(t, dim=2, layout=layout)  # noqa: E731
    call = AttentionCall(None, True, None, True, layout, "ulysses", "auto")
    ql, kl, vl = (sh(t).requires_grad_() for t in (q, k, v))
    out, lse = attend(ql, kl, vl, call, return_lse=True)
    out.backward(sh(do))
    plain = [out.detach(), ql.grad, kl.grad, vl.grad]
    calls = []
    real = dist.all_to_all_single
    dist.all_to_all_single = lambda *a, **kw: (calls.append(1), real(*a, **kw))[1]
    try:
        ql, kl, vl = (sh(t).requires_grad_() for t in (q, k, v))
        out2 = attend(ql, kl, vl, call, kept=(out.detach(), lse))
        fwd_calls = len(calls)
        out2.backward(sh(do))
    finally:
        dist.all_to_all_single = real
    replay = [out2.detach(), ql.grad, kl.grad, vl.grad]
    return dict(diff=max((a - b).abs().max().item() for a, b in zip(plain, replay)), fwd_calls=fwd_calls)


def transport_refused(rank, size):
    """A transport group without all-to-all (a stand-in TransportGroup) is refused by name."""
    from seqpar.methods.ulysses import UlyssesMethod

    class Fake:
        rank, size = 0, 2

        def ring(self): ...

        def all_gather(self, x): ...

        def all_gather_ints(self, values): ...

    try:
        UlyssesMethod.from_group(Fake(), layout="zigzag", mask=MaskSpec(causal=True), scale=1.0, backend="aten")
    except TypeError as e:
        return str(e)
    return None


def records(rank, size):
    """The ``record`` hook: the (phase, step) of every StepRecord of one forward + backward."""
    from seqpar.api import AttentionCall, attend

    got = []
    q = torch.randn(1, 4, 4, 8, requires_grad=True)
    out = attend(q, q, q, AttentionCall(None, True, None, False, "zigzag", "ulysses", "auto"), record=got.append)
    out.sum().backward()
    return [(r.phase, r.step, r.seconds >= 0) for r in got]
