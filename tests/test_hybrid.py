"""method="hybrid" (Ulysses on the "cp_ulysses" sub-dim x a ring on "cp_ring") on 4 gloo ranks: U x R = 2 x 2,
and the degenerate 4 x 1 (Ulysses only, rank-major order) and 1 x 4 (the plain ring), against fp64 SDPA on
the whole sequence; message counts; bad input refused on every rank; the mesh paths of init_mesh(ulysses=)."""

import itertools

import pytest
import torch

import hybrid_cases as hc
from seqpar.layout import tile
from seqpar.masks import MaskSpec
from seqpar.methods import tiles
from seqpar.methods.hybrid import HybridMethod
from seqpar.testing import numerics
from seqpar.vocab import LAYOUTS

P = 4
UR = [2, 4, 1]  # ulysses degree U (R = P / U): 2 x 2, 4 x 1, 1 x 4
HEADS = {"mha": (8, 8), "gqa": (8, 2), "mqa": (8, 1)}


def _bound(res, dtype):
    for rank, per_rank in enumerate(res):
        bad = numerics.violations(per_rank, dtype)
        assert not bad, f"rank {rank}: {bad}"


@pytest.mark.parametrize("U", UR)
@pytest.mark.parametrize("layout,causal", list(itertools.product(LAYOUTS, [True, False])))
@pytest.mark.parametrize("heads", list(HEADS))
def test_equivalence_fp32(worlds, U, layout, causal, heads):
    Hq, Hkv = HEADS[heads]  # MQA: each kv head sent U times
    res = worlds(P).run(hc.equivalence, U=U, seed=U * 10 + len(layout), B=2, Hq=Hq, Hkv=Hkv, S=16 * P, D=16,
                        layout=layout, causal=causal, dtype=torch.float32, transposed=heads == "gqa")
    _bound(res, torch.float32)


@pytest.mark.parametrize("U,layout", [(2, "zigzag"), (4, "striped"), (1, "contiguous"), (2, "contiguous")])
@pytest.mark.parametrize("backend", ["aten", "reference"])
def test_fp64_exact(worlds, U, layout, backend):
    res = worlds(P).run(hc.equivalence, U=U, seed=7, B=1, Hq=4, Hkv=2, S=8 * P, D=8, layout=layout, causal=True,
                        dtype=torch.float64, backend=backend)
    for per_rank in res:
        for name, e in per_rank.items():
            assert e["seqpar"] < 1e-12 * max(1.0, e["scale"]), (name, e)


@pytest.mark.parametrize("U,layout", [(2, "zigzag"), (2, "striped")])
def test_bf16(worlds, U, layout):
    res = worlds(P).run(hc.equivalence, U=U, seed=11, B=1, Hq=4, Hkv=1, S=32 * P, D=32, layout=layout, causal=True,
                        dtype=torch.bfloat16, transposed=True)
    _bound(res, torch.bfloat16)


def test_group_is_the_cp_part_of_the_mesh(worlds):
    """group=mesh["cp"] resolves to the same sub-groups as the mesh itself."""
    res = worlds(P).run(hc.equivalence, U=2, seed=3, B=1, Hq=4, Hkv=2, S=8 * P, D=8, layout="zigzag", causal=True,
                        dtype=torch.float32, cp_part=True)
    _bound(res, torch.float32)


@pytest.mark.parametrize("U", UR)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_return_lse(worlds, U, layout):
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        for r in worlds(P).run(hc.lse_error, U=U, seed=U, Hq=4, Hkv=2, S=8 * P, D=16, layout=layout, causal=True,
                               dtype=dtype):
            assert r["err"] < tol and r["shape"] == r["want_shape"], r
            assert r["dtype"] == str(torch.float64 if dtype == torch.float64 else torch.float32), r


@pytest.mark.parametrize("U", UR)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_message_count(worlds, U, layout):
    """Forward: 2 all-to-alls over the U sub-group + R-1 K/V exchanges over the R sub-group; backward: 2
    all-to-alls (the forward's gathered tensors kept) + R-1 K/V and R-1 dK/dV exchanges. U = 1: no all-to-all;
    R = 1: no exchange."""
    R = P // U
    for c in worlds(P).run(hc.count_messages, U=U, layout=layout, Hkv=1 if U == 2 else 2):
        a2a = (2, 2) if U > 1 else (0, 0)
        assert c["fwd"]["a2a"] == [U] * a2a[0] and c["bwd"]["a2a"] == [U] * a2a[1], c
        assert [n for n, _, _ in c["fwd"]["p2p"]] == [2] * (R - 1), c
        assert [n for n, _, _ in c["bwd"]["p2p"]] == [2] * (2 * (R - 1)), c
        assert {size for _, size, _ in c["fwd"]["p2p"] + c["bwd"]["p2p"]} <= {R}, c  # the ring sub-group


@pytest.mark.parametrize("case,where", [("ulysses_not_dividing", "ulysses must be a positive int dividing cp=4 "
                                                                 "(one of [1, 2, 4]), got 3"),
                                        ("ulysses_not_int", "ulysses must be a positive int"),
                                        ("heads", "query heads (Hq) divisible by the ulysses degree U: Hq=6, U=4; "
                                                  "use ulysses=1 or 2"),
                                        ("kv_heads", "Hkv=3, U=4; use ulysses=1"),
                                        ("plain_group", "method='hybrid' needs the mesh of seqpar.init_mesh(cp=..., "
                                                        "ulysses=U)"),
                                        ("plain_mesh", "got a DeviceMesh with dims ('dp', 'cp')"),
                                        ("default", "got None (the default world)")])
def test_bad_input_refused_on_every_rank(worlds, case, where):
    """ValueError on every rank before any all-to-all or ring exchange; then the world still works."""
    w = worlds(P)
    for kind, msg, msgs in w.run(hc.bad_input, case=case):
        assert kind == "ValueError" and msgs == 0, (kind, msg, msgs)
        assert where in msg, msg
    assert max(w.run(hc.healthy)) < 1e-5


def test_check_heads_messages():
    with pytest.raises(ValueError, match=r"Hq=6, U=4; use ulysses=1 or 2 in seqpar.init_mesh\(cp=8, ulysses=...\), "
                                         r"or method='ring'"):
        HybridMethod.check_heads(hq=6, hkv=6, ulysses=4, cp=8)
    with pytest.raises(ValueError, match=r"Hkv=2, U=3"):
        HybridMethod.check_heads(hq=6, hkv=2, ulysses=3, cp=6)
    for hq, hkv, U in ((8, 1, 2), (8, 2, 4), (8, 8, 2), (6, 3, 3), (5, 5, 1)):
        HybridMethod.check_heads(hq=hq, hkv=hkv, ulysses=U, cp=12)


@pytest.mark.parametrize("U,layout", [(2, "zigzag"), (4, "striped")])
def test_checkpoint_replay(worlds, U, layout):
    for r in worlds(P).run(hc.checkpoint_replay, U=U, layout=layout):
        assert r["diff"] == 0.0 and r["fwd_msgs"] == 0, r


@pytest.mark.parametrize("dp,U", [(1, 2), (1, 4), (2, 2)])
def test_mesh_paths(worlds, dp, U):
    """init_mesh(cp, dp, ulysses=U): 3-D, every existing mesh path sees the whole cp group (cp rank = ring
    index * U + ulysses index); the ulysses sub-group is U adjacent ranks, the ring every U-th."""
    cp = P // dp
    for rank, r in enumerate(worlds(P).run(hc.mesh_paths, U=U, dp=dp)):
        first = rank // cp * cp
        assert r["names"] == ("dp", "cp_ring", "cp_ulysses") and r["check"] == (dp, cp), r
        assert r["cp"] == r["resolved"] == list(range(first, first + cp)) and r["cp_rank"] == rank % cp, r
        assert r["flat"] == list(range(P)), r
        u0 = rank // U * U
        assert r["ulysses"] == list(range(u0, u0 + U)), r
        assert r["ring"] == list(range(first + rank % U, first + cp, U)), r
        assert r["from_cp"] == [r["ulysses"], r["ring"]], r


@pytest.mark.parametrize("dp,U,fsdp,ckpt", [(1, 2, False, False), (2, 2, True, True)])
def test_parallelize_on_the_hybrid_mesh(worlds, dp, U, fsdp, ckpt):
    """parallelize(model, init_mesh(cp, dp, ulysses=U)) (method="ring"; FSDP2 over dp x cp) equals the single
    process."""
    for res in worlds(P).run(hc.parallelize_on_hybrid_mesh, dp=dp, U=U, layout="zigzag", fsdp=fsdp, checkpoint=ckpt):
        assert res["loss"] <= 1e-5 and res["grad"] <= 1e-4 and res["param"] <= 1e-4, res


def test_single_process():
    """No torch.distributed: group=None is the 1 x 1 hybrid (one local tile)."""
    import seqpar

    g = torch.Generator().manual_seed(1)
    q, k, v, do = (torch.randn(2, h, 16, 8, generator=g, dtype=torch.float64) for h in (4, 2, 2, 4))
    ql, kl, vl = (t.clone().requires_grad_() for t in (q, k, v))
    out = seqpar.attention(ql, kl, vl, is_causal=True, enable_gqa=True, method="hybrid")
    out.backward(do)
    ref = numerics.sdpa_grads(q, k, v, do, causal=True)
    for a, b in zip([out, ql.grad, kl.grad, vl.grad], ref):
        assert (a - b).abs().max().item() < 1e-12


def test_compile_refused():
    from seqpar.api import _check_compilable

    with pytest.raises(ValueError, match="method='hybrid' runs eagerly only, not under torch.compile"):
        _check_compilable(None, None, "hybrid")


@pytest.mark.parametrize("layout,causal", list(itertools.product(LAYOUTS, [True, False])))
@pytest.mark.parametrize("U,R", [(2, 2), (2, 3), (3, 2), (4, 1)])
def test_block_order_covers_the_layout(layout, causal, U, R):
    """Over all ring ranks and steps, the sub-tiles of block_order(grid=U) are exactly the layout's tiles of
    P = U R ranks, each offset into its super-block rows / columns; every row meets a tile at step 0."""
    s = 4
    Pw = U * R
    for u in range(R):
        plan = tiles.block_order(MaskSpec(causal=causal), layout, u, R, U * s, grid=U)
        assert [step for step, _, _ in plan] == list(range(R))
        seen = {}
        for step, j, ts in plan:
            assert j == (u - step) % R
            for t in ts:
                a, b = t.q.start // s, t.kv.start // s
                seen[(a, j * U + b)] = t
        for a in range(U):
            for kv in range(Pw):
                want = tile(layout, causal, u * U + a, kv, Pw, s)
                got = seen.get((a, kv))
                assert (want is None) == (got is None), (a, kv, want, got)
                if want is not None:
                    b = kv % U
                    wq, wk = want.q.indices(s), want.kv.indices(s)
                    assert got.mask == want.mask
                    assert (got.q.start, got.q.stop) == (a * s + wq[0], a * s + wq[1])
                    assert (got.kv.start, got.kv.stop) == (b * s + wk[0], b * s + wk[1])
        rows = set()
        for t in plan[0][2]:
            rows |= set(range(t.q.start, t.q.stop))
        assert rows == set(range(U * s))
    assert tiles.block_order(MaskSpec(causal=causal), layout, 1, 3, 8) == [
        (st, (1 - st) % 3, [] if t is None else [t]) for st in range(3)
        for t in [tile(layout, causal, 1, (1 - st) % 3, 3, 8)]]
