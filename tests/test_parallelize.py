"""seqpar.parallelize + seqpar.shard_batch on 4 spawned gloo ranks (CPU) against single-process runs.

Cases live in parallel_cases.py; every world call runs one case on all 4 ranks.
"""

from __future__ import annotations

import pytest
import torch

import parallel_cases as pc
from seqpar.vocab import LAYOUTS, METHODS

pytest.importorskip("transformers")

P = 4
# (dp, cp, fsdp): the two required configurations, and the other two gradient paths for one layout
CONFIGS = [(1, 4, False), (2, 2, True)]
EXTRA = [(2, 2, False), (1, 4, True)]


def _check(res: dict, what: str) -> None:
    assert res["ngrads"] > 0, what
    assert res["loss"] <= 1e-5, (what, res)
    assert res["grad"] <= 1e-4, (what, res)
    assert res["param"] <= 1e-4, (what, res)


@pytest.mark.parametrize("kind", ["llama", "gpt"])
def test_equivalence(worlds, kind):
    """Loss (every step, every rank), every gradient and the parameters after 3 optimizer steps equal
    the single-process run: every layout, cp=4 without FSDP and dp=2 x cp=2 with FSDP2, with and
    without checkpoint=True; ignored labels spread unevenly (a prefix, a padded tail, holes)."""
    w = worlds(P)
    cases = [(dp, cp, fsdp, layout, ckpt) for (dp, cp, fsdp) in CONFIGS for layout in LAYOUTS for ckpt in (False, True)]
    cases += [(dp, cp, fsdp, "zigzag", False) for (dp, cp, fsdp) in EXTRA]
    cases = [(kind, *c) for c in cases]
    if kind == "gpt":  # the model's own torch.utils.checkpoint: SDPA is swapped in its recomputation too
        cases += [("gpt_user_ckpt", 1, 4, False, "zigzag", False), ("gpt_user_ckpt", 2, 2, True, "striped", False)]
    for model, dp, cp, fsdp, layout, ckpt in cases:
        what = f"{model} dp={dp} cp={cp} fsdp={fsdp} layout={layout} checkpoint={ckpt}"
        for res in w.run(pc.equivalence, kind=model, dp=dp, cp=cp, layout=layout, fsdp=fsdp, checkpoint=ckpt):
            _check(res, what)


# the ring: test_equivalence above; hybrid (and auto) on the mesh of init_mesh(cp, ulysses=2)
@pytest.mark.parametrize("method", [m for m in METHODS if m != "ring"] + ["auto"])
@pytest.mark.parametrize("kind", ["llama", "gpt"])
def test_every_method(worlds, kind, method):
    """Each method of seqpar.vocab.METHODS under parallelize, equal to the single process: cp=4 without
    FSDP and dp=2 x cp=2 with FSDP2 (and checkpointing)."""
    w = worlds(P)
    U = 2 if method in ("hybrid", "auto") else 1
    for dp, cp, fsdp, layout, ckpt in [(1, 4, False, "zigzag", False), (2, 2, True, "striped", True)]:
        for res in w.run(pc.equivalence, kind=kind, dp=dp, cp=cp, layout=layout, fsdp=fsdp, checkpoint=ckpt,
                         method=method, ulysses=U):
            _check(res, f"{kind} {method} dp={dp} cp={cp} fsdp={fsdp} layout={layout} checkpoint={ckpt}")


@pytest.mark.parametrize("kind", ["qwen2", "mistral"])
def test_other_hf_models(worlds, kind):
    """Other HF families on the attention interface: the two required configurations, one layout."""
    w = worlds(P)
    for dp, cp, fsdp, layout, ckpt in [(1, 4, False, "zigzag", False), (2, 2, True, "striped", True)]:
        for res in w.run(pc.equivalence, kind=kind, dp=dp, cp=cp, layout=layout, fsdp=fsdp, checkpoint=ckpt):
            _check(res, f"{kind} dp={dp} cp={cp} fsdp={fsdp} layout={layout} checkpoint={ckpt}")


@pytest.mark.parametrize("kind", ["llama", "gpt"])
def test_checkpoint_does_not_rerun_the_ring(worlds, kind):
    """checkpoint=True: the backward does exactly the exchanges of the non-checkpointed backward
    (K/V and dK/dV of the ring backward), no forward K/V exchange; each block's attention is
    replayed from the kept (out, lse). Control: transformers' own checkpointing re-runs the ring."""
    for layout in ("zigzag", "striped"):
        res = worlds(P).run(pc.count_checkpoint_exchanges, kind=kind, layout=layout)
        for r in res:
            none, ours = r["none"], r["seqpar"]
            layers = 2
            assert none["fwd"] == ours["fwd"] == layers * (P - 1)
            assert none["bwd"] == ours["bwd"] == layers * 2 * (P - 1)  # (P-1) K/V + (P-1) dK/dV hops per layer
            assert none["replays"] == 0 and ours["replays"] == layers
            assert ours["loss"] == pytest.approx(none["loss"], rel=1e-6)
            assert ours["grad"] == pytest.approx(none["grad"], rel=1e-5)
            if kind == "llama":
                assert r["hf"]["bwd"] == none["bwd"] + none["fwd"]  # what seqpar's checkpoint avoids


BAD = {
    "no_attention": ("TypeError", "no supported attention"),
    "mha": ("TypeError", "MultiheadAttention"),
    "no_cp_mesh": ("ValueError", "no 'cp' dim"),
    "no_cp_mesh_batch": ("ValueError", "no 'cp' dim"),
    "not_a_mesh": ("TypeError", "DeviceMesh"),
    "bad_layout": ("ValueError", "layout must be one of"),
    "unsharded_hf_batch": ("ValueError", "shard_batch"),
}

# Refused before the masks, valid now: a length that does not divide (padded with one extra document),
# padding (dropped: one packed row), packed position_ids (documents), Gemma 2's logit soft-capping and
# gpt-oss's attention sinks (s_aux -> seqpar's sinks). Each is checked positively below;
# tests/test_masks.py checks their training equivalence against single-process references in depth
# (test_hf_masked_batches, test_hf_gptoss_sinks_and_windows).
NO_LONGER_BAD = ("indivisible", "indivisible_striped", "padding_mask", "packed_position_ids", "gemma2_softcap",
                 "gptoss_sinks")
MODELS = ("gemma2_softcap", "gptoss_sinks")


def test_sync_params_buckets(worlds):
    """Every rank ends with rank 0's parameters and buffers, whatever the bucket size (one tensor per bucket,
    several, all in one), across dtypes and a non-contiguous parameter (left non-contiguous)."""
    for bucket_bytes in (1, 64, 1 << 20):
        for rank, r in enumerate(worlds(2).run(pc.synced, bucket_bytes=bucket_bytes)):
            assert torch.equal(r["got"], r["want"]), (bucket_bytes, rank)
            assert rank == 0 or not torch.equal(r["mine"], r["want"])  # they did differ
            assert not r["contiguous_c"]


def test_bad_input(worlds):
    """Clear ValueError / TypeError before any communication. The *_rank0 style cases fail on rank 0
    only while the others do nothing: had rank 0 communicated first, the case would hang."""
    w = worlds(P)
    for case, (etype, words) in BAD.items():
        res = w.run(pc.bad_input, case=case, timeout=60)
        got = res[0]
        assert got[0] == etype and words in got[1], (case, got)


def test_formerly_bad_input_is_accepted(worlds):
    """The batches shard_batch used to refuse now shard as its contract says, on every rank: padded to the
    layout's unit with an extra document (cu_seq_lens_q ends at the padded length), padding dropped, packed
    documents found in position_ids; the soft-capped Gemma 2 and the gpt-oss model with attention sinks
    run and equal the eager model (loss, every gradient)."""
    w = worlds(P)
    for case in NO_LONGER_BAD:
        res = w.run(pc.bad_input, case=case, timeout=120)
        for rank, (etype, checks) in enumerate(res):
            assert etype is None, (case, rank, etype, checks)
            if case in MODELS:
                assert checks["loss"] <= 1e-5 and checks["grad"] <= 1e-4, (case, rank, checks)
                continue
            assert checks["got"]["cu_seq_lens_q"] is not None, (case, rank, checks)
            assert checks["got"] == checks["want"], (case, rank, checks)
