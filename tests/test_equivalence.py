"""seqpar.attention on P gloo ranks vs torch SDPA on the whole sequence in fp64: every method of
seqpar.vocab.METHODS x every layout, where the method takes the shapes (``seqpar.methods.check``).
Ring-specific tests (exchange counts) are here too; each method's own tests are in test_<method>.py."""

import itertools

import pytest
import torch

import dist_cases
from seqpar import methods
from seqpar.testing import numerics
from seqpar.vocab import LAYOUTS, METHODS

HEADS = {"mha": (4, 4), "gqa": (4, 2), "mqa": (4, 1)}


def applies(method, P, layout, Hq, Hkv, S_local=8) -> bool:
    """Whether ``method`` takes these shapes on P ranks (e.g. Ulysses needs the heads to split)."""
    try:
        methods.check(method, hq=Hq, hkv=Hkv, s_local=S_local, world=P, layout=layout)
    except ValueError:
        return False
    return True


# method="hybrid" needs a mesh with the ulysses / ring sub-dims (seqpar.init_mesh(cp, ulysses=U)), not the
# plain group these cases pass: its own grid (layouts x U x R, heads) is tests/test_hybrid.py
GROUP_METHODS = tuple(m for m in METHODS if m != "hybrid")


def cases(grid, shape_of):
    """``grid`` rows x the methods of a plain group, keeping the combinations the method takes;
    ``shape_of(row)`` -> (P, layout, Hq, Hkv) of a row."""
    return [pytest.param(method, *row, id=f"{method}-" + "-".join(map(str, row)))
            for method in GROUP_METHODS for row in grid if applies(method, *shape_of(row))]


def assert_within_bound(res, dtype):
    """The numerics bound (seqpar.testing.numerics) on every rank's shard."""
    for rank, per_rank in enumerate(res):
        bad = numerics.violations(per_rank, dtype)
        assert not bad, f"rank {rank}: {bad}"


GRID = list(itertools.product([1, 2, 3, 4], LAYOUTS, [False, True], HEADS))


@pytest.mark.parametrize("method,P,layout,causal,heads", cases(GRID, lambda r: (r[0], r[1], *HEADS[r[3]])))
def test_equivalence_fp32(worlds, method, P, layout, causal, heads):
    Hq, Hkv = HEADS[heads]
    res = worlds(P).run(dist_cases.equivalence, method=method, seed=P * 100 + len(layout), B=2, Hq=Hq, Hkv=Hkv, S=8 * P, D=32,
                        layout=layout, causal=causal, dtype=torch.float32, transposed=(heads == "gqa"))
    assert_within_bound(res, torch.float32)


@pytest.mark.parametrize("method,P,D,layout", cases([(2, 40, "zigzag"), (3, 80, "striped"), (4, 96, "zigzag"),
                                                   (4, 40, "contiguous"), (2, 96, "striped")], lambda r: (r[0], r[2], 6, 2)))
def test_head_dims_not_power_of_two(worlds, method, P, D, layout):
    res = worlds(P).run(dist_cases.equivalence, method=method, seed=D, B=1, Hq=6, Hkv=2, S=12 * P, D=D, layout=layout, causal=True,
                        dtype=torch.float32, transposed=True)
    assert_within_bound(res, torch.float32)


@pytest.mark.parametrize("method,P,layout", cases([(2, "zigzag"), (4, "striped"), (3, "contiguous")],
                                                  lambda r: (*r, 4, 2)))
@pytest.mark.parametrize("backend", ["aten", "reference"])
def test_fp64_exact(worlds, method, P, layout, backend):
    res = worlds(P).run(dist_cases.equivalence, method=method, seed=7, B=2, Hq=4, Hkv=2, S=16 * P, D=24, layout=layout, causal=True,
                        dtype=torch.float64, backend=backend)
    for per_rank in res:
        for name, e in per_rank.items():
            assert e["seqpar"] < 1e-12 * max(1.0, e["scale"]), (name, e)


@pytest.mark.parametrize("method,P,layout", cases([(2, "zigzag"), (4, "zigzag"), (4, "striped"), (3, "contiguous")],
                                                  lambda r: (*r, 4, 1)))
def test_bf16(worlds, method, P, layout):
    res = worlds(P).run(dist_cases.equivalence, method=method, seed=11, B=1, Hq=4, Hkv=1, S=32 * P, D=64, layout=layout, causal=True,
                        dtype=torch.bfloat16, transposed=True)
    assert_within_bound(res, torch.bfloat16)


@pytest.mark.parametrize("P", [1, 2, 3, 4])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_exchange_count(worlds, P, layout):
    """Forward: exactly P-1 K/V exchanges (one fused buffer each: 1 send + 1 recv). Backward: P-1 K/V
    exchanges and P-1 dK/dV exchanges (each rank's own contribution stays home). Masked tiles skip
    compute, never the exchange."""
    for counts in worlds(P).run(dist_cases.count_exchanges, layout=layout, causal=True):
        assert counts["fwd"] == [2] * (P - 1), counts
        assert len(counts["bwd"]) == 2 * (P - 1) and set(counts["bwd"]) <= {2}, counts


def test_last_hop_carries_only_the_rows_read(worlds):
    """Causal zigzag on 2 ranks: at step 1 rank 1 reads only the first half of rank 0's block (chunk 0; chunk 3
    is in its future), so rank 0 sends that half (forward and backward K/V) and rank 1 sends home only those
    rows' dK/dV; rank 1's block is read whole by rank 0. Non-causal: whole blocks both ways."""
    causal, full = (worlds(2).run(dist_cases.sent_elements, layout="zigzag", causal=c) for c in (True, False))
    n = causal[0]["block"]
    assert causal[0]["fwd"] == [n // 2] and causal[1]["fwd"] == [n], causal
    assert causal[0]["bwd"] == [n // 2, n] and causal[1]["bwd"] == [n, n // 2], causal
    assert all(r["fwd"] == [n] and r["bwd"] == [n, n] for r in full), full


@pytest.mark.parametrize("layout", LAYOUTS)
def test_shard_unshard_positions(worlds, layout):
    for P in (2, 3):
        assert max(worlds(P).run(dist_cases.shard_roundtrip, layout=layout)) == 0
