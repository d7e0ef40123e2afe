"""Whole models with short convolutions, RG-LRU or lightning attention under ``parallelize(mixers="state")``.

On 4 gloo ranks (one spawned world for all cases), zigzag and contiguous, with and without packed documents
(position_ids restarting at 0): ``seqpar.testing.zoo.exact_or_refused`` builds each model tiny, runs it under
parallelize + shard_batch and compares the loss (rel <= 1e-5) and every gradient (rel <= 1e-4, floored)
against the single-process model; every sequence mixer must have taken the state path (halo / entry states,
not the gathered sequence).
"""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

import plain_mixer_cases as pmc  # noqa: E402
from seqpar.testing import zoo  # noqa: E402

MODELS = [("lfm2", "Lfm2ForCausalLM"), ("lfm2_moe", "Lfm2MoeForCausalLM"), ("lfm3", "Lfm3ForCausalLM"),
          ("recurrent_gemma", "RecurrentGemmaForCausalLM"), ("minimax", "MiniMaxForCausalLM")]


def test_state_path_is_exact(worlds):
    bad = {}
    for model_type, class_name in MODELS:
        for layout, packed in (("zigzag", False), ("zigzag", True), ("contiguous", True)):
            per_rank = worlds(4).run(zoo.exact_or_refused, model_type=model_type, class_name=class_name,
                                     layout=layout, mixers="state", packed=packed, timeout=240)
            for rank, r in enumerate(per_rank):
                if r["status"] != "exact" or r["paths"] != ["state"]:
                    bad[(model_type, layout, packed, rank)] = {k: str(v)[:300] for k, v in r.items() if k != "where"}
    assert not bad, bad


# (mixers, layout, fsdp, checkpoint): the plain model's convolutions have no state-passing adapter, so "auto" gathers
PLAIN_VARIANTS = [("gather", "zigzag", False, False), ("auto", "contiguous", True, False),
                  ("gather", "striped", False, True), ("auto", "zigzag", False, False)]


def test_plain_pytorch_model_with_a_mixer(worlds):
    """A plain-PyTorch model (tests/plain_mixer_cases.ConvGPT: nanoGPT + a causal depthwise nn.Conv1d token mixer
    per block, attention by F.scaled_dot_product_attention) under parallelize(mixers="gather" / "auto") on 4 ranks
    equals the single-process model (loss rel <= 1e-5, every gradient rel <= 1e-4 floored), with FSDP2 and with
    checkpointing; mixers="refuse" names the convolutions on every rank."""
    for mixers, layout, fsdp, checkpoint in PLAIN_VARIANTS:
        for rank, r in enumerate(worlds(4).run(pmc.plain_mixer_exact, mixers=mixers, layout=layout, fsdp=fsdp,
                                               checkpoint=checkpoint)):
            what = (mixers, layout, fsdp, checkpoint, rank, r)
            assert r["loss"] <= 1e-5 and r["grad"] <= 1e-4, what
            assert r["paths"] == ["gather"] and r["mixers"] == ["h.0.mixer", "h.1.mixer"] and r["calls"] >= 2, what
    for msg in worlds(4).run(pmc.plain_mixer_refused):
        assert "h.0.mixer" in msg and "mixers='auto'" in msg, msg
