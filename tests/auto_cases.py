"""Cases for tests/test_auto.py (method="auto"), run on every rank of a spawned gloo world. Each returns
plain values; the pytest side asserts. The reference is fp64 SDPA on the whole sequence."""

from __future__ import annotations

import torch
import torch.distributed as dist

import seqpar
from seqpar.state import group_state
import seqpar.plan as plan_mod
from seqpar.testing import numerics


def _inputs(size, *, Hq, Hkv, D=16, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    S = 8 * size
    return [torch.randn(B, h, S, D, generator=g, dtype=torch.float64) for h in (Hq, Hkv, Hkv, Hq)]


def forget(rank, size):
    """Drop this world's auto state (machine and choices), so the next auto call probes again."""
    seqpar.set_machine(None)
    return True


def equivalence(rank, size, *, Hq, Hkv, layout, causal, seed=0):
    """attention(method="auto") forward + backward vs fp64 SDPA: {"method": what auto resolved to, "errors",
    "calls": attention calls numbered on the group by the auto call (1: the probe numbers none), "machine"}."""
    q, k, v, do = _inputs(size, Hq=Hq, Hkv=Hkv, seed=seed)
    sh = lambda t: seqpar.shard(t, dim=2, layout=layout)  # noqa: E731
    ql, kl, vl = (sh(t.float()).detach().requires_grad_() for t in (q, k, v))
    g = dist.group.WORLD
    before = group_state(g).calls
    opts = dict(is_causal=causal, enable_gqa=Hq != Hkv, layout=layout)
    out = seqpar.attention(ql, kl, vl, method="auto", **opts)
    calls = group_state(g).calls - before
    out.backward(sh(do.float()))
    method = seqpar.auto_method(ql, kl, vl, **opts)  # cached: no collective
    truth = numerics.sdpa_grads(q, k, v, do, causal=causal)
    low = numerics.sdpa_grads(*(t.float() for t in (q, k, v, do)), causal=causal)
    mine = [seqpar.unshard(t.detach(), dim=2, layout=layout) for t in (out, ql.grad, kl.grad, vl.grad)]
    return dict(method=method, errors=numerics.errors(mine, truth, low), calls=calls,
                machine=group_state(g).machine.__dict__)


def user_machine(rank, size, *, machine, Hq, Hkv, layout="zigzag", causal=True):
    """With seqpar.set_machine(machine): (what plan(method="auto") says, what attention(method="auto")
    ran, whether a probe ran)."""
    probes = []
    real = plan_mod.probe_machine
    plan_mod.probe_machine = lambda *a, **kw: probes.append(1) or real(*a, **kw)
    try:
        seqpar.set_machine(machine)
        q, k, v, _ = _inputs(size, Hq=Hq, Hkv=Hkv, D=16)
        sh = lambda t: seqpar.shard(t, dim=2, layout=layout)  # noqa: E731
        opts = dict(is_causal=causal, enable_gqa=Hq != Hkv, layout=layout)
        out = seqpar.attention(*(sh(t.float()) for t in (q, k, v)), method="auto", **opts)
        ran = seqpar.auto_method(*(sh(t.float()) for t in (q, k, v)), **opts)
        want = plan_mod.plan(plan_mod.ModelShape(heads=Hq, kv_heads=Hkv, head_dim=16), q.shape[2], size, machine,
                             batch=2, dtype_bytes=4, causal=causal, layout=layout, checkpoint="none", method="auto")
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=Hq != Hkv)
        err = (seqpar.unshard(out, dim=2, layout=layout).double() - ref).abs().max().item()
        return dict(want=want.method, ran=ran, probes=len(probes), err=err, table=want.explain())
    finally:
        plan_mod.probe_machine = real
        seqpar.set_machine(None)


def bad_method(rank, size, *, method):
    """An unknown method name: (exception type, message, method / probe transfers attempted: all-to-alls and
    ring exchanges; the one small agreement all-gather that makes every rank raise is not counted)."""
    calls = []
    real = dist.all_to_all_single, dist.batch_isend_irecv

    def counting(fn):
        return lambda *a, **kw: calls.append(1) or fn(*a, **kw)

    dist.all_to_all_single, dist.batch_isend_irecv = (counting(fn) for fn in real)
    try:
        q = torch.randn(1, 4, 8, 8)
        seqpar.attention(q, q, q, is_causal=True, method=method)
    except (TypeError, ValueError) as e:
        return type(e).__name__, str(e), len(calls)
    finally:
        dist.all_to_all_single, dist.batch_isend_irecv = real
    return None, None, len(calls)


def compiled(rank, size, *, layout="zigzag", causal=True, hkv=2):
    """torch.compile(fullgraph, aot_eager) of attention(method="auto"): without a machine or an eager
    choice it is refused while tracing; with seqpar.set_machine it compiles with no graph break and equals
    the eager call. -> {"refused": (type, message), "breaks", "eager_diff", "method"}."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    seqpar.set_machine(None)
    torch._dynamo.reset()
    counters.clear()
    q, k, v, do = _inputs(size, Hq=4, Hkv=hkv, D=16, seed=5)
    sh = lambda t: seqpar.shard(t, dim=2, layout=layout)  # noqa: E731

    def f(q, k, v):
        return seqpar.attention(q, k, v, is_causal=causal, enable_gqa=hkv != 4, layout=layout, method="auto")

    res = dict(refused=None)
    try:
        torch.compile(f, fullgraph=True, backend="aot_eager")(*(sh(t.float()) for t in (q, k, v)))
    except Exception as e:  # noqa: BLE001 - dynamo may wrap the ValueError raised while tracing
        res["refused"] = (type(e).__name__, str(e))
    torch._dynamo.reset()
    counters.clear()
    machine = plan_mod.Machine(attn_flops=1e10, link_bw=1e6, all_to_all_bw=1e12, overlap="none")
    seqpar.set_machine(machine)
    try:
        outs = []
        for fn in (torch.compile(f, fullgraph=True, backend="aot_eager"), f):
            ql, kl, vl = (sh(t.float()).detach().requires_grad_() for t in (q, k, v))
            out = fn(ql, kl, vl)
            out.backward(sh(do.float()))
            outs.append([out.detach(), ql.grad, kl.grad, vl.grad])
        res["eager_diff"] = max((a - b).abs().max().item() for a, b in zip(*outs))
        res["breaks"] = sum(counters["graph_break"].values())
        res["method"] = seqpar.auto_method(*(sh(t.float()) for t in (q, k, v)), is_causal=causal,
                                           enable_gqa=hkv != 4, layout=layout)
    finally:
        seqpar.set_machine(None)
    return res


def parallelize_method(rank, size, *, method):
    """seqpar.parallelize(gpt, init_mesh(cp=size), method=method): None if accepted, else (type, message)."""
    import parallel_cases as pc

    try:
        seqpar.parallelize(pc.make_model("gpt"), pc.mesh_for(1, size), method=method, fsdp=False)
    except (TypeError, ValueError) as e:
        return type(e).__name__, str(e)
    return None


_HYBRID_MESHES: dict = {}


def hybrid_mesh(rank, size, *, machine, ulysses=2, Hq=4, Hkv=2, layout="zigzag", causal=True):
    """attention(method="auto") with a user machine on the mesh of init_mesh(cp=size, ulysses=U) and on a
    plain cp mesh: {"hybrid_mesh": method, "plain_mesh": method, "want": plan's choice with U, "err"}."""
    if ulysses not in _HYBRID_MESHES:
        _HYBRID_MESHES[ulysses] = seqpar.init_mesh(cp=size, ulysses=ulysses)
    import parallel_cases as pc

    meshes = dict(hybrid_mesh=_HYBRID_MESHES[ulysses], plain_mesh=pc.mesh_for(1, size))
    q, k, v, _ = _inputs(size, Hq=Hq, Hkv=Hkv, D=16, seed=2)
    sh = lambda t: seqpar.shard(t, dim=2, layout=layout)  # noqa: E731
    opts = dict(is_causal=causal, enable_gqa=Hq != Hkv, layout=layout)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=Hq != Hkv)
    res = {}
    try:
        for name, mesh in meshes.items():
            seqpar.set_machine(machine, mesh)
            out = seqpar.attention(*(sh(t.float()) for t in (q, k, v)), group=mesh, method="auto", **opts)
            res[name] = seqpar.auto_method(*(sh(t.float()) for t in (q, k, v)), group=mesh, **opts)
            res[name + "_err"] = (seqpar.unshard(out, dim=2, layout=layout).double() - ref).abs().max().item()
    finally:
        for mesh in meshes.values():
            seqpar.set_machine(None, mesh)
    res["want"] = plan_mod.plan(plan_mod.ModelShape(heads=Hq, kv_heads=Hkv, head_dim=16), q.shape[2], size, machine,
                                batch=2, dtype_bytes=4, causal=causal, layout=layout, checkpoint="none",
                                method="auto", ulysses=ulysses).method
    return res
