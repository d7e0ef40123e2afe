"""Masks (issue: windows, packed documents, soft-cap, padding, any length) on spawned gloo ranks.

seqpar.attention with ``window_size`` / ``cu_seqlens`` / ``softcap`` against the fp64 truth written from
the definitions (a dense boolean mask, the soft-capped scores, autograd), within the numerics bound, for
every method x layout x P; the ring's skipped tiles and early stop; Hugging Face models under
parallelize on packed, padded, windowed and soft-capped batches against single-process references."""

import itertools

import pytest
import torch

import mask_cases as mc
from seqpar import methods
from seqpar.testing import numerics
from seqpar.vocab import LAYOUT_CHOICES, LAYOUTS

HEADS = {"mha": (4, 4), "gqa": (4, 2), "mqa": (4, 1)}


def _applies(method, P, layout, Hq, Hkv) -> bool:
    if method == "hybrid":
        return P == 4 and Hq % 2 == 0 and (Hkv % 2 == 0 or 2 % Hkv == 0)
    try:
        methods.check(method, hq=Hq, hkv=Hkv, s_local=8, world=P, layout=layout)
    except ValueError:
        return False
    return True


def _assert(res, dtype):
    for rank, per_rank in enumerate(res):
        for name, errs in per_rank.items():
            bad = numerics.violations(errs, dtype)
            assert not bad, f"rank {rank}, mask {name}: {bad}"


GRID = [(m, P, layout, heads) for m, P, layout, heads in itertools.product(
    ("ring", "allgather", "ulysses", "hybrid"), (1, 2, 3, 4), LAYOUT_CHOICES, HEADS)
    if _applies(m, P, layout, *HEADS[heads]) and (m == "ring" or heads != "mha")]


@pytest.mark.parametrize("method,P,layout,heads", GRID)
def test_masks_equivalence(worlds, method, P, layout, heads):
    """Every mask of mask_cases.MASKS (windows, documents, soft-cap, combined), forward and backward."""
    Hq, Hkv = HEADS[heads]
    res = worlds(P).run(mc.equivalence, method=method, layout=layout, Hq=Hq, Hkv=Hkv, S=12 * P)
    _assert(res, torch.float32)


@pytest.mark.parametrize("layout", LAYOUT_CHOICES)
def test_masks_fp64_reference_backend(worlds, layout):
    res = worlds(2).run(mc.equivalence, method="ring", layout=layout, Hq=4, Hkv=2, S=24, dtype=torch.float64,
                        backend="reference")
    _assert(res, torch.float64)


def test_window_on_contiguous_stops_the_ring_early(worlds):
    """S=64 on 4 ranks (16 each), causal window 8 on the contiguous layout: only the diagonal and the
    previous rank's block have work, so the forward makes 1 K/V exchange (not 3) and the backward 1 K/V
    exchange and 1 dK/dV exchange (the other rank's contribution, one hop home), not 3 + 3."""
    res = worlds(4).run(mc.count_ring, layout="contiguous", S=64, window=(8, -1))
    full = worlds(4).run(mc.count_ring, layout="contiguous", S=64, window=(-1, -1))
    for r, f in zip(res, full):
        assert (r["fwd"], r["bwd"]) == (1, 1 + 1)
        assert (f["fwd"], f["bwd"]) == (3, 3 + 3)
    # tiles: rank 0 computes only its diagonal (the block before it is the last rank's, all in its future)
    assert [r["fwd_tiles"] for r in res] == [1, 2, 2, 2]
    assert [r["bwd_tiles"] for r in res] == [1, 2, 2, 2]


def test_documents_on_their_ranks_need_no_exchange(worlds):
    res = worlds(4).run(mc.count_ring, layout="contiguous", S=64, window=(-1, -1), cu=[0, 16, 20, 32, 48, 64])
    for r in res:
        assert (r["fwd"], r["bwd"], r["fwd_tiles"]) == (0, 0, 1)


def test_zigzag_skips_empty_tiles(worlds):
    """A short causal window on zigzag: every rank still exchanges (the second halves meet far blocks),
    but tiles with nothing visible are not computed."""
    res = worlds(4).run(mc.count_ring, layout="zigzag", S=64, window=(2, -1))
    full = worlds(4).run(mc.count_ring, layout="zigzag", S=64, window=(-1, -1))
    assert sum(r["fwd_tiles"] for r in res) < sum(f["fwd_tiles"] for f in full)


HF_CASES = [
    ("llama", "packed_positions", 64), ("llama", "flattening", 64),  # (a) packed documents
    ("llama", "right_pad", 64), ("llama", "left_pad", 64),  # (b) padding, B=2
    ("mistral", "plain", 64),  # (c) sliding_window < S on every layer
    ("gemma2", "plain", 64),  # (d) windows on alternate layers + attention soft-cap
    ("llama", "plain", 8 * 4 + 3),  # (e) S not divisible by 2P
]


@pytest.mark.parametrize("kind,case,S", HF_CASES)
def test_hf_masked_batches(worlds, kind, case, S):
    """Loss and every gradient of the parallelized model on 4 ranks equal the single-process reference."""
    pytest.importorskip("transformers")
    res = worlds(4).run(mc.hf_equivalence, kind=kind, case=case, S=S)
    for r in res:
        assert r["loss"] < 1e-5 and r["grad"] < 1e-4, r
    assert res[0]["packed"] == (case not in ("plain",) or S % 8 != 0)


@pytest.mark.parametrize("layout", LAYOUT_CHOICES)
def test_hf_packed_every_layout_with_checkpointing(worlds, layout):
    pytest.importorskip("transformers")
    res = worlds(4).run(mc.hf_equivalence, kind="llama", case="packed_positions", S=64, layout=layout,
                        checkpoint=True)
    for r in res:
        assert r["loss"] < 1e-5 and r["grad"] < 1e-4, r


@pytest.mark.parametrize("method,layout", [("ring", "zigzag"), ("ring", "striped"), ("ulysses", "zigzag"),
                                           ("allgather", "contiguous"), ("hybrid", "packed")])
def test_attention_sinks(worlds, method, layout):
    res = worlds(4).run(mc.sinks_equivalence, layout=layout, method=method)
    for rank, r in enumerate(res):
        bad = numerics.violations(r, torch.float32)
        assert not bad, f"rank {rank}: {bad}"


def test_hf_gptoss_sinks_and_windows(worlds):
    """gpt-oss: attention sinks (s_aux) + sliding layers, loss and gradients equal the single process."""
    pytest.importorskip("transformers")
    res = worlds(4).run(mc.hf_equivalence, kind="gptoss", case="plain", S=64)
    for r in res:
        assert r["loss"] < 1e-5 and r["grad"] < 1e-4, r
