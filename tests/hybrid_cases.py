"""Cases for tests/test_hybrid.py (method="hybrid": Ulysses on the "cp_ulysses" sub-dim x a ring on "cp_ring"),
run on every rank of a spawned gloo world. Each returns plain numbers; the pytest side asserts. References
are fp64 SDPA on the full sequence (seqpar.testing.numerics)."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

import dist_cases
import seqpar
from seqpar.mesh import _hybrid_mesh
from seqpar.testing import numerics

_MESHES: dict = {}  # (dp, ulysses) -> the hybrid DeviceMesh, built once per spawned world (new_group is slow)


def mesh_for(U: int, dp: int = 1):
    """The 3-D ("dp", "cp_ring", "cp_ulysses") mesh of the world with ulysses degree U (U = 1 too: the
    degenerate plain ring, which init_mesh would build 2-D)."""
    key = (dp, U)
    if key not in _MESHES:
        world = dist.get_world_size()
        _MESHES[key] = _hybrid_mesh("cpu", dp, world // dp // U, U)
    return _MESHES[key]


def equivalence(rank, size, *, U, seed, B, Hq, Hkv, S, D, layout, causal, dtype, backend="aten", cp_part=False,
                transposed=False):
    """numerics.errors of out, dq, dk, dv on this rank's shard vs fp64 SDPA (and SDPA in ``dtype``).
    ``cp_part``: pass mesh["cp"] as group instead of the mesh."""
    mesh = mesh_for(U)
    group = mesh["cp"] if cp_part else mesh
    q, k, v, do, dtype = dist_cases.make_inputs(seed, B, Hq, Hkv, S, D, dtype, transposed)
    ref = numerics.sdpa_grads(q, k, v, do, causal=causal)
    low = numerics.sdpa_grads(*(t.to(dtype) for t in (q, k, v, do)), causal=causal)
    sh = lambda t: seqpar.shard(t, dim=2, group=mesh, layout=layout)  # noqa: E731
    ql, kl, vl = (sh(t.to(dtype)).detach().requires_grad_() for t in (q, k, v))
    out = seqpar.attention(ql, kl, vl, group=group, is_causal=causal, enable_gqa=Hq != Hkv, layout=layout,
                           method="hybrid", backend=backend)
    out.backward(sh(do.to(dtype)))
    mine = [out.detach(), ql.grad, kl.grad, vl.grad]
    assert all(m.dtype == dtype for m in mine), [m.dtype for m in mine]
    return numerics.errors(mine, [sh(r) for r in ref], [sh(lo) for lo in low])


def lse_error(rank, size, *, U, seed, Hq, Hkv, S, D, layout, causal, dtype):
    """``return_lse=True``: max |lse - fp64 logsumexp of the scaled scores| on this rank's rows, lse dtype/shape."""
    mesh = mesh_for(U)
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, h, S, D, generator=g, dtype=torch.float64) for h in (Hq, Hkv, Hkv))
    s = (q @ k.repeat_interleave(Hq // Hkv, dim=1).transpose(-1, -2)) / math.sqrt(D)
    if causal:
        s = s.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), -math.inf)
    sh = lambda t: seqpar.shard(t, dim=2, group=mesh, layout=layout)  # noqa: E731
    out, lse = seqpar.attention(*(sh(t.to(dtype)) for t in (q, k, v)), group=mesh, is_causal=causal,
                                enable_gqa=Hq != Hkv, layout=layout, method="hybrid", return_lse=True)
    want = sh(torch.logsumexp(s, dim=-1))
    return dict(err=(lse.double() - want).abs().max().item(), dtype=str(lse.dtype), shape=tuple(lse.shape),
                want_shape=tuple(want.shape))


class _Counting:
    """Counts dist.all_to_all_single calls and ring exchanges (batch_isend_irecv, with the group's size)."""

    def __enter__(self):
        self.a2a, self.p2p = [], []
        self.real = dist.all_to_all_single, dist.batch_isend_irecv

        def a2a(out, inp, *a, group=None, **kw):
            self.a2a.append(dist.get_world_size(group))
            return self.real[0](out, inp, *a, group=group, **kw)

        def p2p(ops):
            self.p2p.append((len(ops), dist.get_world_size(ops[0].group), ops[0].tag))
            return self.real[1](ops)

        dist.all_to_all_single, dist.batch_isend_irecv = a2a, p2p
        return self

    def take(self) -> dict:
        res = dict(a2a=list(self.a2a), p2p=list(self.p2p))
        self.a2a.clear()
        self.p2p.clear()
        return res

    def __exit__(self, *exc):
        dist.all_to_all_single, dist.batch_isend_irecv = self.real


def count_messages(rank, size, *, U, layout, Hq=4, Hkv=2, causal=True):
    """All-to-alls (the size of their group) and ring exchanges (ops, group size, tag) of one forward and
    one backward of method="hybrid"."""
    mesh = mesh_for(U)
    with _Counting() as c:
        q = torch.randn(1, Hq, 4, 8, requires_grad=True)
        k = torch.randn(1, Hkv, 4, 8, requires_grad=True)
        v = torch.randn(1, Hkv, 4, 8, requires_grad=True)
        out = seqpar.attention(q, k, v, group=mesh, is_causal=causal, layout=layout, method="hybrid",
                               enable_gqa=Hq != Hkv)
        fwd = c.take()
        out.sum().backward()
        bwd = c.take()
    return dict(fwd=fwd, bwd=bwd)


def bad_input(rank, size, *, case):
    """Bad input on every rank: (exception type, message, all-to-alls + ring exchanges attempted)."""
    with _Counting() as c:
        try:
            if case == "ulysses_not_dividing":
                seqpar.init_mesh(cp=size, ulysses=3)
            elif case == "ulysses_not_int":
                seqpar.init_mesh(cp=size, ulysses=0)
            else:
                group = {"heads": lambda: mesh_for(4), "kv_heads": lambda: mesh_for(4),
                         "plain_group": lambda: dist.group.WORLD, "plain_mesh": lambda: seqpar.init_mesh(cp=size),
                         "default": lambda: None}[case]()
                Hq, Hkv = {"heads": (6, 6), "kv_heads": (12, 3)}.get(case, (4, 4))
                q, k = torch.randn(1, Hq, 4, 8), torch.randn(1, Hkv, 4, 8)
                seqpar.attention(q, k, k, group=group, is_causal=True, layout="striped", method="hybrid",
                                 enable_gqa=Hq != Hkv)
        except (TypeError, ValueError) as e:
            got = c.take()
            return type(e).__name__, str(e), len(got["a2a"]) + len(got["p2p"])
    return None, None, 0


def healthy(rank, size, *, U=2):
    """A small hybrid call after failures: the world still works (max error vs SDPA on the whole sequence)."""
    mesh = mesh_for(U)
    x = torch.randn(1, 4, 8 * size, 8, generator=torch.Generator().manual_seed(0))
    sh = lambda t: seqpar.shard(t, dim=2, group=mesh, layout="zigzag")  # noqa: E731
    out = seqpar.attention(sh(x), sh(x), sh(x), group=mesh, is_causal=True, layout="zigzag", method="hybrid")
    ref = torch.nn.functional.scaled_dot_product_attention(x, x, x, is_causal=True)
    return (seqpar.unshard(out, dim=2, group=mesh, layout="zigzag") - ref).abs().max().item()


def checkpoint_replay(rank, size, *, U, layout):
    """A kept forward (``attend(..., kept=)``) gives the same out and gradients as a plain call, with no
    forward communication: {"diff", "fwd_msgs"}."""
    from seqpar.api import AttentionCall, attend

    mesh = mesh_for(U)
    g = torch.Generator().manual_seed(5)
    q, k, v, do = (torch.randn(1, h, 4 * 2 * size, 8, generator=g) for h in (4, 2, 2, 4))
    sh = lambda t: seqpar.shard(t, dim=2, group=mesh, layout=layout)  # noqa: E731
    call = AttentionCall(mesh, True, None, True, layout, "hybrid", "auto")
    ql, kl, vl = (sh(t).requires_grad_() for t in (q, k, v))
    out, lse = attend(ql, kl, vl, call, return_lse=True)
    out.backward(sh(do))
    plain = [out.detach(), ql.grad, kl.grad, vl.grad]
    with _Counting() as c:
        ql, kl, vl = (sh(t).requires_grad_() for t in (q, k, v))
        out2 = attend(ql, kl, vl, call, kept=(out.detach(), lse))
        fwd = c.take()
        out2.backward(sh(do))
    replay = [out2.detach(), ql.grad, kl.grad, vl.grad]
    return dict(diff=max((a - b).abs().max().item() for a, b in zip(plain, replay)),
                fwd_msgs=len(fwd["a2a"]) + len(fwd["p2p"]))


def mesh_paths(rank, size, *, U, dp=1):
    """What the existing mesh paths see of init_mesh(cp, dp, ulysses=U): check_mesh, cp_mesh, flat_mesh,
    resolve_group, and the sub-groups of hybrid_groups (global ranks)."""
    from seqpar.mesh import check_mesh, cp_mesh, flat_mesh, hybrid_groups, resolve_group

    mesh = seqpar.init_mesh(cp=size // dp, dp=dp, ulysses=U)
    ug, rg = hybrid_groups(mesh)
    ranks = dist.get_process_group_ranks
    return dict(names=tuple(mesh.mesh_dim_names), check=check_mesh(mesh), cp=ranks(cp_mesh(mesh).get_group()),
                resolved=ranks(resolve_group(mesh)), cp_rank=dist.get_rank(resolve_group(mesh)),
                flat=sorted(ranks(flat_mesh(mesh).get_group())), ulysses=ranks(ug), ring=ranks(rg),
                from_cp=[ranks(g) for g in hybrid_groups(mesh["cp"])])


def parallelize_on_hybrid_mesh(rank, size, *, dp, U, layout, fsdp, checkpoint):
    """parallel_cases.equivalence (seqpar.parallelize + shard_batch vs the single process) on the 3-D
    mesh of init_mesh(cp, dp, ulysses=U), method="ring": the mesh paths of parallelize accept it."""
    import parallel_cases as pc

    key = (dp, size // dp)
    pc._MESHES[key] = seqpar.init_mesh(cp=size // dp, dp=dp, ulysses=U)
    try:
        return pc.equivalence(rank, size, kind="gpt", dp=dp, cp=size // dp, layout=layout, fsdp=fsdp,
                              checkpoint=checkpoint)
    finally:
        del pc._MESHES[key]
