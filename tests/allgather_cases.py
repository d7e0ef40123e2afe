"""Cases for tests/test_allgather.py (method="allgather"), run on every rank of a spawned gloo world.
Each returns plain numbers; the pytest side asserts. References: fp64 SDPA / logsumexp on the whole
sequence, eager seqpar (compile), the single-process model (parallelize)."""

from __future__ import annotations

import torch
import torch.distributed as dist

import seqpar
from seqpar.testing import numerics


def lse_error(rank, size, *, layout, causal, Hq=4, Hkv=2, S_local=6, D=16, dtype=torch.float32):
    """return_lse=True: max |lse - fp64 logsumexp of the scaled scores| on this rank's rows (and the
    output's error, for the same call), plus the lse dtype/shape."""
    g = torch.Generator().manual_seed(3)
    B, S = 2, S_local * size
    q, k, v = (torch.randn(B, h, S, D, generator=g, dtype=torch.float64) for h in (Hq, Hkv, Hkv))
    sh = lambda t: seqpar.shard(t, dim=2, layout=layout)  # noqa: E731
    out, lse = seqpar.attention(*(sh(t.to(dtype)) for t in (q, k, v)), is_causal=causal, enable_gqa=Hq != Hkv,
                                layout=layout, method="allgather", return_lse=True)
    kr = k.repeat_interleave(Hq // Hkv, dim=1)
    scores = q @ kr.transpose(-1, -2) / D ** 0.5
    if causal:
        scores = scores.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf"))
    ref_lse = torch.logsumexp(scores, dim=-1)
    ref_out = torch.softmax(scores, dim=-1) @ v.repeat_interleave(Hq // Hkv, dim=1)
    return dict(lse=(lse.double() - sh(ref_lse)).abs().max().item(),
                out=(out.double() - sh(ref_out)).abs().max().item(), dtype=str(lse.dtype), shape=tuple(lse.shape))


def count_collectives(rank, size, *, layout, causal):
    """Collective calls of one forward and one backward of method="allgather": all-gathers,
    reduce-scatters and ring exchanges (batch_isend_irecv), counted by wrapping torch.distributed."""
    names = ("all_gather", "reduce_scatter_single", "reduce_scatter_tensor", "reduce_scatter", "batch_isend_irecv",
             "all_reduce", "all_to_all_single")
    real = {n: getattr(dist, n) for n in names if hasattr(dist, n)}
    calls: list[str] = []

    def wrap(n):
        def counting(*a, **kw):
            calls.append(n)
            return real[n](*a, **kw)
        return counting

    S = 8 * size
    q = torch.randn(1, 4, S // size, 8, requires_grad=True)
    k = torch.randn(1, 2, S // size, 8, requires_grad=True)
    v = torch.randn(1, 2, S // size, 8, requires_grad=True)
    # agree on the shapes first (the first call of a signature all-gathers 10 ints), outside the count
    seqpar.attention(q.detach(), k.detach(), v.detach(), is_causal=causal, enable_gqa=True, layout=layout,
                     method="allgather")
    for n in real:
        setattr(dist, n, wrap(n))
    try:
        out = seqpar.attention(q, k, v, is_causal=causal, enable_gqa=True, layout=layout, method="allgather")
        fwd = list(calls)
        calls.clear()
        out.sum().backward()
        bwd = list(calls)
    finally:
        for n, f in real.items():
            setattr(dist, n, f)
    return dict(fwd=fwd, bwd=bwd)


def matches_ring(rank, size, *, layout, causal, dtype=torch.float32):
    """method="allgather" vs method="ring" on the same shards: max |difference| of out, dq (the same
    tiles merged in the same order: bitwise) and of dk, dv (summed in another order: rounding)."""
    g = torch.Generator().manual_seed(5)
    B, Hq, Hkv, S, D = 2, 4, 2, 8 * size, 16
    full = [torch.randn(B, h, S, D, generator=g, dtype=dtype) for h in (Hq, Hkv, Hkv, Hq)]
    res = {}
    for method in ("ring", "allgather"):
        q, k, v = (seqpar.shard(t, dim=2, layout=layout).detach().requires_grad_() for t in full[:3])
        out = seqpar.attention(q, k, v, is_causal=causal, enable_gqa=True, layout=layout, method=method)
        out.backward(seqpar.shard(full[3], dim=2, layout=layout))
        res[method] = [out.detach(), q.grad, k.grad, v.grad]
    return [(a - b).abs().max().item() for a, b in zip(res["ring"], res["allgather"])]


def recorded_steps(rank, size, *, layout):
    """The record hook: (phase, step) of every StepRecord of one forward + backward, causal."""
    from seqpar.api import AttentionCall, attend

    recs = []
    S = 8 * size
    q, k, v = (torch.randn(1, 2, S // size, 8, requires_grad=True) for _ in range(3))
    out = attend(q, k, v, AttentionCall(is_causal=True, layout=layout, method="allgather"), record=recs.append)
    out.sum().backward()
    return [(r.phase, r.step) for r in recs]


def checkpoint_replay(rank, size, *, layout):
    """attend(kept=...) replays the kept (out, lse): no forward all-gather; the backward equals the
    non-replayed one bitwise. -> (all-gathers in the replayed forward, max |grad difference|)."""
    from seqpar.api import AttentionCall, attend

    call = AttentionCall(is_causal=True, layout=layout, method="allgather", enable_gqa=True)
    g = torch.Generator().manual_seed(9)
    S = 8 * size
    base = [torch.randn(1, h, S // size, 8, generator=g) for h in (4, 2, 2)]
    ins = [t.clone().requires_grad_() for t in base]
    out, lse = attend(*ins, call, return_lse=True)
    out.sum().backward()
    real, n = dist.all_gather, []
    dist.all_gather = lambda *a, **kw: (n.append(1), real(*a, **kw))[1]
    try:
        ins2 = [t.clone().requires_grad_() for t in base]
        out2 = attend(*ins2, call, kept=(out.detach(), lse))
        fwd_gathers = len(n)
    finally:
        dist.all_gather = real
    out2.sum().backward()
    diff = max((a.grad - b.grad).abs().max().item() for a, b in zip(ins, ins2))
    return fwd_gathers, diff, (out2 - out).abs().max().item()


def mpi_main() -> None:
    """Under mpirun: method="allgather" over ``seqpar.MPIGroup`` (mpi4py all-gather and Reduce_scatter_block),
    every layout, causal, GQA, fp32, within the numerics bound; prints "OK <rank>"."""
    g = seqpar.MPIGroup()
    for layout in ("contiguous", "striped", "zigzag"):
        gen = torch.Generator().manual_seed(0)
        B, Hq, Hkv, S, D = 1, 4, 2, 8 * g.size, 8
        q, k, v, do = (torch.randn(B, h, S, D, generator=gen, dtype=torch.float64) for h in (Hq, Hkv, Hkv, Hq))
        ref = numerics.sdpa_grads(q, k, v, do, causal=True)
        low = numerics.sdpa_grads(*(t.float() for t in (q, k, v, do)), causal=True)
        sh = lambda t: seqpar.shard(t, dim=2, layout=layout, group=g)  # noqa: E731
        ql, kl, vl = (sh(t).float().requires_grad_() for t in (q, k, v))
        out = seqpar.attention(ql, kl, vl, group=g, is_causal=True, enable_gqa=True, layout=layout,
                               method="allgather")
        out.backward(sh(do).float())
        res = numerics.errors([out.detach(), ql.grad, kl.grad, vl.grad], [sh(t) for t in ref], [sh(t) for t in low])
        numerics.assert_within_bound(res, torch.float32)
    print(f"OK {g.rank}", flush=True)


