"""Pure layout logic, no processes: permutations and the causal structure of every ring tile."""

import itertools

import pytest
import torch

import seqpar.layout as L


@pytest.mark.parametrize("layout", L.LAYOUTS)
@pytest.mark.parametrize("P", [1, 2, 3, 4, 5])
def test_indices_are_a_permutation(layout, P):
    S = 2 * P * 3
    idx = torch.cat([L.global_indices(S, r, P, layout) for r in range(P)])
    assert sorted(idx.tolist()) == list(range(S))


def test_layouts_as_documented():
    assert L.global_indices(8, 1, 2, "contiguous").tolist() == [4, 5, 6, 7]
    assert L.global_indices(8, 1, 2, "striped").tolist() == [1, 3, 5, 7]
    assert L.global_indices(8, 0, 2, "zigzag").tolist() == [0, 1, 6, 7]
    assert L.global_indices(8, 1, 2, "zigzag").tolist() == [2, 3, 4, 5]
    assert L.global_indices(12, 2, 3, "striped").tolist() == [2, 5, 8, 11]


@pytest.mark.parametrize("layout", L.LAYOUTS)
@pytest.mark.parametrize("dim", [0, 1, -1])
def test_shard_matches_indices_and_unshard_inverts(layout, dim):
    P, S = 3, 12
    shape = [S if d == dim % 3 else 2 for d in range(3)]
    x = torch.randn(*shape)
    shards = [L.shard_tensor(x, dim, r, P, layout) for r in range(P)]
    for r, s in enumerate(shards):
        assert torch.equal(s, x.index_select(dim, L.global_indices(S, r, P, layout)))
    assert torch.equal(L.unshard_tensor(shards, dim, layout), x)


def _true_mask(layout, P, S, qr, kr):
    """Brute force: visible[i, j] for query i of rank qr and key j of rank kr (global causality)."""
    qi = L.global_indices(S, qr, P, layout)
    ki = L.global_indices(S, kr, P, layout)
    return ki[None, :] <= qi[:, None]


def _tile_mask(t, n):
    m = torch.zeros(n, n, dtype=torch.bool)
    if t is None:
        return m
    rows = torch.arange(n)[t.q]
    cols = torch.arange(n)[t.kv]
    r, c = torch.meshgrid(torch.arange(len(rows)), torch.arange(len(cols)), indexing="ij")
    sub = {"full": torch.ones_like(r, dtype=torch.bool), "causal": c <= r, "strict": c < r}[t.mask.kind]
    m[rows[:, None], cols[None, :]] = sub
    return m


@pytest.mark.parametrize("layout", L.LAYOUTS)
@pytest.mark.parametrize("P", [1, 2, 3, 4])
def test_tiles_equal_global_causal_mask(layout, P):
    S = 4 * P
    n = S // P
    for qr, kr in itertools.product(range(P), repeat=2):
        t = L.tile(layout, True, qr, kr, P, n)
        assert torch.equal(_tile_mask(t, n), _true_mask(layout, P, S, qr, kr)), (qr, kr, t)
        assert L.tile(layout, False, qr, kr, P, n) == L.Tile("full")


@pytest.mark.parametrize("layout", ["striped", "zigzag"])
def test_balanced_layouts_give_equal_work_per_rank(layout):
    P, S = 4, 64
    n = S // P
    work = [sum(int(_tile_mask(L.tile(layout, True, r, k, P, n), n).sum()) for k in range(P)) for r in range(P)]
    assert max(work) / min(work) <= 1.1, work
    contig = [sum(int(_tile_mask(L.tile("contiguous", True, r, k, P, n), n).sum()) for k in range(P))
              for r in range(P)]
    assert max(contig) / min(contig) > 4


def test_bad_layout_arguments():
    with pytest.raises(ValueError, match="layout must be one of"):
        L.global_indices(8, 0, 2, "diagonal")
    with pytest.raises(ValueError, match="rank must be in"):
        L.global_indices(8, 2, 2, "striped")
    assert L.padding_needed(13, "zigzag", 4) == 3
    assert L.padding_needed(16, "striped", 4) == 0
