"""seqpar.attention on P gloo ranks vs torch SDPA on the whole sequence in fp64."""

import itertools

import pytest
import torch

import dist_cases
from seqpar.testing import numerics
from seqpar.vocab import LAYOUTS

HEADS = {"mha": (4, 4), "gqa": (4, 2), "mqa": (4, 1)}


def assert_within_bound(res, dtype):
    """The numerics bound (seqpar.testing.numerics) on every rank's shard."""
    for rank, per_rank in enumerate(res):
        bad = numerics.violations(per_rank, dtype)
        assert not bad, f"rank {rank}: {bad}"


GRID = [
    (P, layout, causal, heads)
    for P, layout, causal, heads in itertools.product([1, 2, 3, 4], LAYOUTS, [False, True], HEADS)
]


@pytest.mark.parametrize("P,layout,causal,heads", GRID)
def test_equivalence_fp32(worlds, P, layout, causal, heads):
    Hq, Hkv = HEADS[heads]
    res = worlds(P).run(dist_cases.equivalence, seed=P * 100 + len(layout), B=2, Hq=Hq, Hkv=Hkv, S=8 * P, D=32,
                        layout=layout, causal=causal, dtype=torch.float32, transposed=(heads == "gqa"))
    assert_within_bound(res, torch.float32)


@pytest.mark.parametrize("P,D,layout", [(2, 40, "zigzag"), (3, 80, "striped"), (4, 96, "zigzag"),
                                        (4, 40, "contiguous"), (2, 96, "striped")])
def test_head_dims_not_power_of_two(worlds, P, D, layout):
    res = worlds(P).run(dist_cases.equivalence, seed=D, B=1, Hq=6, Hkv=2, S=12 * P, D=D, layout=layout, causal=True,
                        dtype=torch.float32, transposed=True)
    assert_within_bound(res, torch.float32)


@pytest.mark.parametrize("P,layout", [(2, "zigzag"), (4, "striped"), (3, "contiguous")])
@pytest.mark.parametrize("backend", ["aten", "reference"])
def test_fp64_exact(worlds, P, layout, backend):
    res = worlds(P).run(dist_cases.equivalence, seed=7, B=2, Hq=4, Hkv=2, S=16 * P, D=24, layout=layout, causal=True,
                        dtype=torch.float64, backend=backend)
    for per_rank in res:
        for name, e in per_rank.items():
            assert e["seqpar"] < 1e-12 * max(1.0, e["scale"]), (name, e)


@pytest.mark.parametrize("P,layout", [(2, "zigzag"), (4, "zigzag"), (4, "striped"), (3, "contiguous")])
def test_bf16(worlds, P, layout):
    res = worlds(P).run(dist_cases.equivalence, seed=11, B=1, Hq=4, Hkv=1, S=32 * P, D=64, layout=layout, causal=True,
                        dtype=torch.bfloat16, transposed=True)
    assert_within_bound(res, torch.bfloat16)


@pytest.mark.parametrize("P", [1, 2, 3, 4])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_exchange_count(worlds, P, layout):
    """Forward: exactly P-1 K/V exchanges (one fused buffer each: 1 send + 1 recv). Backward: P-1 K/V
    exchanges and P dK/dV exchanges. Masked tiles skip compute, never the exchange."""
    for counts in worlds(P).run(dist_cases.count_exchanges, layout=layout, causal=True):
        assert counts["fwd"] == [2] * (P - 1), counts
        assert len(counts["bwd"]) == (2 * P - 1 if P > 1 else 0) and set(counts["bwd"]) <= {2}, counts


@pytest.mark.parametrize("layout", LAYOUTS)
def test_shard_unshard_positions(worlds, layout):
    for P in (2, 3):
        assert max(worlds(P).run(dist_cases.shard_roundtrip, layout=layout)) == 0
