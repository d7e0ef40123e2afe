"""Long runs keep their state flat: seqpar's per-group state (seqpar.state) is owned by the group and
bounded, and packed documents cost one agreement and one host read per batch, not per layer."""

import gc

import pytest
import torch

import dist_cases
import seqpar
import state_cases as sc
from seqpar.layout import check_offsets, offsets_digest
from seqpar.state import DOCUMENTS, SIGNATURES, GroupState, group_state
from seqpar.testing import numerics

BATCHES, LAYERS = 1000, 3


def test_long_run_of_packed_batches_stays_flat(worlds):
    """1,000 batches with new document boundaries, 3 layers each sharing one cu_seqlens tensor, on 2 gloo
    ranks: per batch one agreement all-gather and one host read (layers 2..L: none; before: one read per
    layer plus one per rank's gathered row), the group's state within its bounds, results within the
    numerics bound on every 250th batch (each layout in turn)."""
    res = worlds(2).run(sc.long_run, batches=BATCHES, layers=LAYERS, timeout=600)
    for rank, r in enumerate(res):
        assert len(r["per_batch"]) == BATCHES - BATCHES // 250
        assert all(n == {"gathers": 1, "reads": 1} for n in r["per_batch"]), \
            (rank, [n for n in r["per_batch"] if n != {"gathers": 1, "reads": 1}][:5])
        assert r["calls"] == LAYERS * len(r["per_batch"]) + BATCHES // 250
        assert r["agreed"] <= SIGNATURES and r["documents"] <= DOCUMENTS and r["auto"] <= SIGNATURES, r
        assert r["states"] <= 2, r  # the world group (and at most one other live group), not one per batch
        assert all(r["lru"])
        assert [layout for layout, _ in r["errors"]] == ["zigzag", "packed", "striped", "contiguous"]
        for layout, errs in r["errors"]:
            bad = numerics.violations(errs, torch.float32)
            assert not bad, (rank, layout, bad)


def test_destroyed_group_frees_its_state(worlds):
    res = worlds(2).run(sc.group_state_freed, groups=5)
    for r in res:
        assert r["calls"] == [2] * 5  # each group numbers its own calls from 0
        assert r["alive"] == 0 and r["grew"] == 0, r


def test_documents_changed_in_place_are_agreed_again(worlds):
    """The agreed tensor changed in place (its version moves): agreed again once, and the new documents
    are the ones used (no stale host copy)."""
    res = worlds(2).run(sc.documents_after_cache, case="inplace")
    for err, repeat, agreements, gathers in res:
        assert err < 1e-5 and repeat == 0, (err, repeat)
        assert agreements == 1 and gathers == 1, (agreements, gathers)


@pytest.mark.parametrize("case,text", [("differs", "disagree"), ("invalid", "strictly increasing")])
def test_documents_disagree_in_a_later_batch(worlds, case, text):
    """After agreed batches, rank 1 passes other (or invalid) offsets: every rank raises."""
    world = worlds(2)
    res = world.run(sc.documents_after_cache, case=case, timeout=30)
    for rank, (etype, msg) in enumerate(res):
        assert etype == "ValueError", (rank, etype, msg)
        if case == "invalid" and rank == 0:
            assert "rank(s) [1] rejected" in msg, msg
        else:
            assert text in msg, msg
    assert max(world.run(dist_cases.healthy)) < 1e-6  # nobody is left waiting: the world still works


def test_offsets_digest_matches_check_offsets():
    """The device-side check (no read) accepts exactly what check_offsets accepts, and the checksum
    tells apart offsets that differ in one entry or by a swap."""
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        n = int(torch.randint(0, 7, (1,), generator=g))
        cu = torch.randint(-1, 12, (n,), generator=g)
        if n and torch.rand(1, generator=g) < 0.5:
            cu = torch.sort(cu).values
        try:
            check_offsets(cu, 10)
            ok = 1
        except ValueError:
            ok = 0
        count, _, valid = offsets_digest(cu, 10).tolist()
        assert (count, valid) == (n, ok), cu
    base = offsets_digest(torch.tensor([0, 3, 9, 20]), 20)
    for other in ([0, 4, 9, 20], [0, 9, 3, 20], [0, 3, 9, 21]):
        assert offsets_digest(torch.tensor(other), 20)[1] != base[1]
    assert offsets_digest(torch.tensor([0, 3, 9, 20], dtype=torch.int32), 20).tolist() == base.tolist()


def test_group_state_is_bounded_and_never_stale():
    st = GroupState("x")
    for i in range(3 * SIGNATURES):
        st.agreed.put((i,), True)
    assert len(st.agreed) == SIGNATURES and (0,) not in st.agreed and (3 * SIGNATURES - 1,) in st.agreed
    keep = []
    for i in range(3 * DOCUMENTS):
        t = torch.tensor([0, 1 + i % 5, 8])
        st.remember(t, 8, (0, 1 + i % 5, 8))
        keep.append(t)
    assert len(st.documents) == DOCUMENTS
    t = keep[-1]
    assert st.offsets(t, 8) == (0, 1 + (3 * DOCUMENTS - 1) % 5, 8)
    assert st.offsets(t, 9) is None  # another sequence length
    assert st.offsets(torch.tensor(t.tolist()), 8) is None  # equal values, another tensor: not by value
    t.add_(0)  # an in-place change: a new version
    assert st.offsets(t, 8) is None
    dead = torch.tensor([0, 2, 8])
    st.remember(dead, 8, (0, 2, 8))
    ident = id(dead)
    del dead
    gc.collect()
    for _ in range(100):  # a new tensor at the dead one's address is not the dead one
        t2 = torch.tensor([0, 5, 8])
        if id(t2) == ident:
            break
    assert st.offsets(t2, 8) is None
    st.remember([0, 4, 8], 8, (0, 4, 8))  # lists: by value
    assert st.offsets([0, 4, 8], 8) == (0, 4, 8)


def test_single_process_reads_a_repeated_tensor_once(monkeypatch):
    """One process (no group): the offsets of a tensor are read once, however many layers use it."""
    reads = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self, *a: reads.append(1) or tolist(self, *a))
    x = torch.randn(1, 2, 16, 8)
    cu = torch.tensor([0, 5, 16])
    outs = [seqpar.attention(x, x, x, group=None, is_causal=True, layout="contiguous", cu_seqlens=cu)
            for _ in range(4)] if not torch.distributed.is_initialized() else pytest.skip("a process group is up")
    assert len(reads) == 1
    ref = torch.cat([torch.nn.functional.scaled_dot_product_attention(x[:, :, a:b], x[:, :, a:b], x[:, :, a:b],
                                                                      is_causal=True) for a, b in ((0, 5), (5, 16))], 2)
    assert all((o - ref).abs().max() < 1e-5 for o in outs)
    assert len(group_state(None).documents) <= DOCUMENTS

