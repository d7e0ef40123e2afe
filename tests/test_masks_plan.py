"""The ring's tile planner (seqpar.masks): the pieces of every (query rank, kv rank) tile cover exactly
the visible pairs of the global mask, once each, for every layout, window and document split."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from seqpar.kernels import TileMask
from seqpar.layout import global_indices
from seqpar.masks import MaskSpec, last_step, plan_tile, sequence_tile, visible_pairs
from seqpar.testing.numerics import tile_visible
from seqpar.vocab import LAYOUTS


def _covered(pieces, s_local: int) -> torch.Tensor:
    cover = torch.zeros(s_local, s_local, dtype=torch.int64)
    for p in pieces:
        q, kv = range(s_local)[p.q], range(s_local)[p.kv]
        cover[q.start:q.stop, kv.start:kv.stop] += tile_visible(p.mask, len(q), len(kv)).long()
    return cover


def _random_cu(rng: random.Random, S: int) -> tuple[int, ...]:
    cuts = sorted(rng.sample(range(1, S), rng.randint(0, min(6, S - 1))))
    return (0, *cuts, S)


def _specs(S: int, rng: random.Random):
    windows = [(-1, -1), (0, 0), (1, -1), (3, -1), (S // 4, -1), (2, 2), (-1, 3), (S * 2, -1), (5, 1)]
    for causal, window in itertools.product((False, True), windows):
        for cu in (None, _random_cu(rng, S), (0, 1, 2, S), (0, S - 1, S)):
            yield MaskSpec(causal=causal, window=window, cu_seqlens=cu)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_pieces_cover_the_visible_pairs_exactly(layout, world):
    rng = random.Random(world * 7 + LAYOUTS.index(layout))
    S = 2 * world * 6
    s_local = S // world
    for spec in _specs(S, rng):
        last = 0
        for qr, kr in itertools.product(range(world), repeat=2):
            truth = visible_pairs(spec, global_indices(S, qr, world, layout), global_indices(S, kr, world, layout))
            pieces = plan_tile(spec, layout, qr, kr, world, s_local)
            cover = _covered(pieces, s_local)
            assert cover.max() <= 1, (spec, qr, kr, pieces)
            assert torch.equal(cover.bool(), truth), (spec, layout, qr, kr, pieces)
            for p in pieces if spec.structured else ():  # trimmed: work in its first/last row and column
                q, kv = range(s_local)[p.q], range(s_local)[p.kv]
                d = tile_visible(p.mask, len(q), len(kv))
                assert d[0].any() and d[-1].any() and d[:, 0].any() and d[:, -1].any(), (spec, p)
            if truth.any():
                last = max(last, (qr - kr) % world)
        assert last_step(spec, layout, world, s_local) == last


def test_plain_masks_keep_the_layout_tiles():
    """No window, no documents: the layouts' own tiles (zigzag's half tile stays one piece)."""
    spec = MaskSpec(causal=True)
    (t,) = plan_tile(spec, "zigzag", 2, 0, 4, 8)
    assert t.mask == TileMask("full") and t.kv == slice(0, 4)
    assert plan_tile(spec, "contiguous", 0, 1, 2, 8) == ()
    (t,) = plan_tile(MaskSpec(causal=True, softcap=2.0), "striped", 0, 1, 2, 8)
    assert t.mask.kind == "strict" and t.mask.softcap == 2.0


def test_window_on_contiguous_stops_the_ring_early():
    # S=64 over 4 ranks (16 each); a causal window of 8 reaches only the previous rank's block
    assert last_step(MaskSpec(causal=True, window=(8, -1)), "contiguous", 4, 16) == 1
    assert last_step(MaskSpec(causal=True, window=(16, -1)), "contiguous", 4, 16) == 1
    assert last_step(MaskSpec(causal=True, window=(17, -1)), "contiguous", 4, 16) == 2
    assert last_step(MaskSpec(causal=True), "contiguous", 4, 16) == 3
    # documents that never cross a rank boundary: nothing beyond the diagonal
    assert last_step(MaskSpec(causal=True, cu_seqlens=(0, 16, 32, 48, 64)), "contiguous", 4, 16) == 0


def test_sequence_tile_is_the_global_mask():
    rng = random.Random(0)
    S = 24
    for spec in _specs(S, rng):
        truth = visible_pairs(spec, torch.arange(S), torch.arange(S))
        assert torch.equal(_covered(sequence_tile(spec, S), S).bool(), truth), spec


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_packed_layout_pieces_and_balance(world):
    """The packed layout: exact token counts, a permutation, pieces that cover the visible pairs, and causal
    work balanced within 5% on a long-tailed packed batch (lognormal lengths, mean S/8, one of ~S/2)."""
    rng = random.Random(world)
    S = 64 * world * 4
    cu = [0, S // 2]
    while cu[-1] < S:
        cu.append(min(S, cu[-1] + max(1, int(rng.lognormvariate(0, 1) * S / 16))))
    cu = tuple(cu)
    idx = [global_indices(S, r, world, "packed", cu) for r in range(world)]
    assert all(len(i) == S // world for i in idx)
    assert sorted(torch.cat(idx).tolist()) == list(range(S))
    spec = MaskSpec(causal=True, cu_seqlens=cu)
    work = []
    for qr in range(world):
        w = 0
        for kr in range(world):
            truth = visible_pairs(spec, idx[qr], idx[kr])
            cover = _covered(plan_tile(spec, "packed", qr, kr, world, S // world), S // world)
            assert cover.max() <= 1 and torch.equal(cover.bool(), truth)
            w += int(truth.sum())
        work.append(w)
    assert max(work) / (sum(work) / world) <= 1.05, work


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("U,R", [(1, 4), (2, 2), (2, 3), (4, 1)])
def test_last_step_with_a_grid_is_the_last_step_with_tiles(layout, U, R):
    """last_step(grid=U) (where the hybrid's ring stops) = the last step of block_order with any tile."""
    from seqpar.methods.tiles import block_order

    rng = random.Random(U * 10 + R)
    S = 2 * U * R * 4
    for spec in _specs(S, rng):
        want = max((step for u in range(R) for step, _, tiles in block_order(spec, layout, u, R, S // R, grid=U)
                    if tiles), default=0)
        assert last_step(spec, layout, R, S // R, U) == want, spec
