"""Cases for tests/test_compile.py, run on every rank of a spawned gloo world. Each returns plain
numbers; the pytest side asserts. The references are eager seqpar (bitwise for aot_eager) and fp64
SDPA on the whole sequence (the numerics bound, for inductor)."""

from __future__ import annotations

import torch
import torch.distributed as dist

import seqpar
from seqpar.testing import numerics


def _fresh():
    import torch._dynamo

    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    return counters


def check_ops(ql, kl, vl, call: tuple, g: torch.Generator) -> list[str]:
    """torch.library.opcheck of seqpar's forward, replay and backward ops on these shards and op arguments;
    -> the names of the ops checked."""
    from seqpar.methods import ops

    out, lse = (t.detach() for t in ops.attention_fwd(ql, kl, vl, *call))
    dout = torch.randn(out.shape, generator=g)
    checked = []
    for op, args in ((torch.ops.seqpar.attention_fwd.default, (ql, kl, vl, *call)),
                     (torch.ops.seqpar.attention_replay.default, (ql, kl, vl, out, lse, *call)),
                     (torch.ops.seqpar.attention_bwd.default, (dout, ql.detach(), kl.detach(), vl.detach(),
                                                                out, lse, *call))):
        torch.library.opcheck(op, args)
        checked.append(str(op))
    return checked


def opcheck(rank, size, *, method="ring", hkv=2, window=(-1, -1), softcap=0.0):
    """torch.library.opcheck (schema, fake, autograd registration, AOT dispatch) of every seqpar op
    with ``method`` (and a window / soft-cap mask) on this group; -> the names of the ops checked."""
    from seqpar.methods import ops

    g = torch.Generator().manual_seed(0)
    B, H, S, D = 1, 4, 8 * size, 16
    q, k, v = (torch.randn(B, h, S, D, generator=g) for h in (H, hkv, hkv))
    ql, kl, vl = (seqpar.shard(t, dim=2, layout="zigzag").contiguous().requires_grad_() for t in (q, k, v))
    call = (method, ops.group_name(dist.group.WORLD), "zigzag", True, list(window), softcap, D ** -0.5, "aten")
    return check_ops(ql, kl, vl, call, g)


def compiled_function(rank, size, *, backend, layout, causal, hkv, dtype=torch.float32, method="ring"):
    """``torch.compile(f, fullgraph=True)`` of a function calling seqpar.attention vs the same function
    eagerly and vs fp64 SDPA on the whole sequence: {"eager_diff": max |compiled - eager| over out, dq,
    dk, dv, "errors": numerics.errors of the compiled result, "breaks": graph breaks}."""
    counters = _fresh()
    g = torch.Generator().manual_seed(7)
    B, H, S, D = 2, 4, 8 * size, 16
    q, k, v, do = (torch.randn(B, h, S, D, generator=g, dtype=torch.float64) for h in (H, hkv, hkv, H))
    sh = lambda t: seqpar.shard(t, dim=2, layout=layout)  # noqa: E731

    def f(q, k, v):
        return seqpar.attention(q, k, v, is_causal=causal, enable_gqa=hkv != H, layout=layout, method=method)

    res = []
    for fn in (torch.compile(f, fullgraph=True, backend=backend), f):
        ql, kl, vl = (sh(t.to(dtype)).detach().requires_grad_() for t in (q, k, v))
        out = fn(ql, kl, vl)
        out.backward(sh(do.to(dtype)))
        res.append([out.detach(), ql.grad, kl.grad, vl.grad])
    truth = numerics.sdpa_grads(q, k, v, do, causal=causal)
    low = numerics.sdpa_grads(*(t.to(dtype) for t in (q, k, v, do)), causal=causal)
    return dict(eager_diff=max((a - b).abs().max().item() for a, b in zip(*res)),
                errors=numerics.errors(res[0], [sh(t) for t in truth], [sh(t) for t in low]),
                breaks=sum(counters["graph_break"].values()))


def compiled_model(rank, size, *, kind, checkpoint, backend="aot_eager", steps=3, S=64):
    """parallelize(compile=True) vs parallelize eagerly, same model and batches: max relative loss and
    gradient differences, graph breaks, and the number of graphs after step 1 and after the last step."""
    import parallel_cases as pc

    mesh = pc.mesh_for(1, size)
    runs = {}
    for comp in (False, True):
        counters = _fresh()
        model = seqpar.parallelize(pc.make_model(kind), mesh, layout="zigzag", fsdp=False, checkpoint=checkpoint,
                                   compile=comp)
        if comp and backend != "inductor":  # the backend under test (parallelize compiles with inductor)
            from seqpar.passes.check import find_blocks

            for block in find_blocks(model):
                block.forward = torch.compile(block.forward._torchdynamo_orig_callable, backend=backend)
        losses, graphs = [], []
        for step in range(steps):
            model.zero_grad()
            loss = model(**seqpar.shard_batch(pc.make_batch(0, 1, S, step), mesh, layout="zigzag")).loss
            loss.backward()
            losses.append(loss.detach())
            graphs.append(counters["stats"]["unique_graphs"])
        runs[comp] = dict(losses=losses, grads=[p.grad.clone() for p in model.parameters()], graphs=graphs,
                          breaks=sum(counters["graph_break"].values()))
    rel = lambda a, b: ((a - b).norm() / b.norm().clamp_min(1e-30)).item()  # noqa: E731
    return dict(loss=max(rel(a, b) for a, b in zip(runs[True]["losses"], runs[False]["losses"])),
                grad=max(rel(a, b) for a, b in zip(runs[True]["grads"], runs[False]["grads"])),
                breaks=runs[True]["breaks"], graphs=runs[True]["graphs"])


def refused(rank, size):
    """What compile cannot carry is refused by name: (exception type, message) per case."""
    import parallel_cases as pc

    from seqpar.api import AttentionCall, attend

    out = {}
    try:  # plain model + compiled checkpoint: the SDPA override would not apply (a wrong answer)
        seqpar.parallelize(pc.make_model("gpt"), pc.mesh_for(1, size), fsdp=False, checkpoint=True, compile=True)
    except (TypeError, ValueError) as e:
        out["plain_ckpt"] = (type(e).__name__, str(e))
    x = torch.randn(1, 2, 8, 8)
    try:  # the per-step timing hook cannot live in a graph
        torch.compile(lambda t: attend(t, t, t, AttentionCall(layout="contiguous"), record=print),
                      fullgraph=True, backend="aot_eager")(x)
    except Exception as e:  # noqa: BLE001 - dynamo wraps the ValueError raised while tracing
        out["record"] = (type(e).__name__, str(e))
    return out
