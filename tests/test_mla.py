"""MLA: v with its own head dim Dv != D (DeepSeek-V2/V3, MiniCPM3: q/k 192, v 128), at tiny shapes.

One spawned world of 4 gloo ranks (started with TRITON_INTERPRET=1, so the Triton kernels run there on
the CPU) runs every method x layout x kernel backend with masks, forward and gradients, against plain
attention math in fp64 on the whole sequence (tests/mla_cases.py); the kernels alone are checked too
(reference / aten here, Triton on rank 0 of the world). Plus: validation and the cross-rank agreement on
Dv, checkpoint replay, torch.compile's ops, the cost model, and a tiny DeepSeek-V3 under parallelize.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

import mla_cases
import seqpar
from seqpar import plan
from seqpar.testing import numerics
from seqpar.testing.worlds import World
from seqpar.vocab import LAYOUT_CHOICES, METHODS

P = 4
HAS_TRITON = importlib.util.find_spec("triton") is not None
MASK_NAMES = ("window", "band", "docs", "softcap", "sinks")


def _case(method, layout, backend, mask, D=12, Dv=8):
    return dict(method=method, layout=layout, backend=backend, mask=mask, D=D, Dv=Dv)


def _id(c: dict) -> str:
    return f"{c['method']}-{c['layout']}-{c['backend']}-{c['mask']}-D{c['D']}-Dv{c['Dv']}"


CASES = [
    *(_case(m, lay, b, "causal") for m in METHODS for lay in LAYOUT_CHOICES for b in ("reference", "aten")),
    *(_case(m, lay, "aten", "full") for m in METHODS for lay in LAYOUT_CHOICES),
    *(_case("auto", lay, "aten", "causal") for lay in LAYOUT_CHOICES),
    *(_case(m, "zigzag", "aten", mk) for m in METHODS for mk in MASK_NAMES),
    *(_case(m, "packed", "aten", "docs") for m in METHODS),
    *(_case("ring", "striped", "reference", mk) for mk in MASK_NAMES),
    *(_case(m, "zigzag", "aten", "causal", D=8, Dv=12) for m in METHODS),  # Dv > D
]
TRITON_CASES = [
    *(_case(m, lay, "triton", "causal") for m, lay in zip(METHODS, ("zigzag", "striped", "contiguous", "packed"))),
    *(_case("ring", "zigzag", "triton", mk) for mk in ("full", *MASK_NAMES)),
    _case("allgather", "packed", "triton", "docs"),
    *(_case(m, "zigzag", "triton", "causal", D=8, Dv=12) for m in ("ring", "ulysses")),
]
KERNEL_MASKS = tuple(mla_cases.tile_masks())
KERNEL_CASES = [dict(mask_name=m, D=d, Dv=dv) for m in KERNEL_MASKS for d, dv in ((12, 8), (8, 20))]
TRITON_KERNEL_CASES = [dict(backend="triton", **c) for c in KERNEL_CASES] + [
    dict(backend="triton", mask_name=m, D=12, Dv=8, dtype=torch.bfloat16) for m in ("causal", "docs")]


@pytest.fixture(scope="module")
def world():
    """4 gloo ranks, spawned with TRITON_INTERPRET=1 (read by triton at import, in the ranks only)."""
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        w = World(P)
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old
    yield w
    w.close()


def _results(world, cases) -> dict:
    per_rank = world.run(mla_cases.grid, cases=cases, timeout=900)
    return {_id(c): [r[i] for r in per_rank] for i, c in enumerate(cases)}


@pytest.fixture(scope="module")
def grid(world):
    return _results(world, CASES)


@pytest.fixture(scope="module")
def triton_grid(world):
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    return _results(world, TRITON_CASES)


def _assert_ranks(res: list, dtype=torch.float32) -> None:
    for rank, r in enumerate(res):
        assert "error" not in r, f"rank {rank}:\n{r['error']}"
        bad = numerics.violations(r, dtype)
        assert not bad, f"rank {rank}: {bad}"


# ---------------------------------------------------------------------------------------------- every method

@pytest.mark.parametrize("case", CASES, ids=_id)
def test_attention_with_own_v_head_dim(grid, case):
    """Forward and dq, dk, dv (and d sinks) within the numerics bound of the fp64 truth, on every rank."""
    _assert_ranks(grid[_id(case)])


@pytest.mark.parametrize("case", TRITON_CASES, ids=_id)
def test_attention_with_own_v_head_dim_triton(triton_grid, case):
    _assert_ranks(triton_grid[_id(case)])


# ---------------------------------------------------------------------------------------------- kernels alone

def _assert_kernel(res: dict, dtype) -> None:
    assert "error" not in res, res["error"]
    assert res.pop("untouched") == 0.0, "the accumulate wrote outside its strided views"
    numerics.assert_within_bound(res, dtype)


@pytest.mark.parametrize("backend", ["reference", "aten"])
@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: f"{c['mask_name']}-D{c['D']}-Dv{c['Dv']}")
def test_kernel_with_own_v_head_dim(backend, case):
    _assert_kernel(mla_cases.kernel_case(backend, **case), torch.float32)


def test_kernel_with_own_v_head_dim_fp64_exact():
    for backend in ("reference", "aten"):
        for mask in ("causal", "docs"):
            res = mla_cases.kernel_case(backend, mask, 12, 8, dtype=torch.float64)
            res.pop("untouched")
            for name, e in res.items():
                assert e["seqpar"] < 1e-12 * max(1.0, e["scale"]), (backend, mask, name, e)


def test_triton_kernels_with_own_v_head_dim(world):
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    results = world.run(mla_cases.kernel_grid, cases=TRITON_KERNEL_CASES, timeout=600)[0]
    for case, res in zip(TRITON_KERNEL_CASES, results):
        _assert_kernel(res, case.get("dtype", torch.float32))


# ---------------------------------------------------------------------------------------------- the api

def test_validation_keeps_every_other_check():
    q, k = torch.randn(1, 4, 6, 12), torch.randn(1, 2, 6, 12)
    out = seqpar.attention(q, k, torch.randn(1, 2, 6, 8), is_causal=True, enable_gqa=True, layout="striped")
    assert out.shape == (1, 4, 6, 8)
    for v, text in ((torch.randn(1, 4, 6, 8), "same leading dims"), (torch.randn(1, 2, 5, 8), "same leading dims"),
                    (torch.randn(2, 2, 6, 8), "same leading dims"), (torch.randn(1, 2, 6, 0), "head dims >= 1"),
                    (torch.randn(1, 2, 6, 8).double(), "share one dtype")):
        with pytest.raises((ValueError, TypeError), match=text):
            seqpar.attention(q, k, v, is_causal=True, enable_gqa=True, layout="striped")
    with pytest.raises(ValueError, match="kept"):
        from seqpar.api import AttentionCall, attend

        attend(q, k, torch.randn(1, 2, 6, 8), AttentionCall(enable_gqa=True, layout="striped"),
               kept=(torch.zeros(1, 4, 6, 12), torch.zeros(1, 4, 6)))


def test_ranks_with_different_v_head_dims_all_raise(world):
    for etype, msg in world.run(mla_cases.disagree_dv, timeout=120):
        assert etype == "ValueError" and "disagree" in msg and "Dv" in msg, (etype, msg)


@pytest.mark.parametrize("method", ["ring", "ulysses", "allgather"])
def test_replay_of_a_kept_forward(world, method):
    assert max(world.run(mla_cases.replay, method=method, timeout=120)) == 0.0


@pytest.mark.parametrize("method", ["ring", "ulysses", "allgather"])
def test_compile_ops(world, method):
    for checked in world.run(mla_cases.opcheck, method=method, timeout=300):
        assert len(checked) == 3, checked
    for r in world.run(mla_cases.compiled, method=method, timeout=300):
        assert r["diff"] == 0.0 and r["shape"][-1] == 8, r


def test_plan_counts_v_bytes_with_its_own_head_dim():
    m = plan.Machine(attn_flops=1e12, link_bw=1e10)
    same = plan.ModelShape(heads=8, kv_heads=8, head_dim=128)
    mla = plan.ModelShape(heads=8, kv_heads=8, head_dim=192, v_head_dim=128)
    wide = plan.ModelShape(heads=8, kv_heads=8, head_dim=192)
    for method in ("ring", "ulysses", "allgather"):
        a, b = (plan.plan(x, 4096, 4, m, method=method) for x in (same, plan.ModelShape(8, 8, 128, v_head_dim=128)))
        assert a == b  # v_head_dim == head_dim is the model without it
        lo, mid, hi = (plan.plan(x, 4096, 4, m, method=method) for x in (same, mla, wide))
        assert lo.fwd.bytes < mid.fwd.bytes < hi.fwd.bytes and lo.fwd.flops < mid.fwd.flops < hi.fwd.flops, method


# ---------------------------------------------------------------------------------------------- DeepSeek-V3

@pytest.mark.parametrize("layout,method,checkpoint", [("zigzag", "ring", False), ("zigzag", "ring", True),
                                                       ("packed", "ulysses", False), ("striped", "allgather", True)])
def test_deepseek_v3_under_parallelize(world, layout, method, checkpoint):
    pytest.importorskip("transformers")
    for r in world.run(mla_cases.deepseek, layout=layout, method=method, checkpoint=checkpoint, timeout=600):
        assert r["loss"] < 1e-5 and r["grad"] < 1e-4, r
