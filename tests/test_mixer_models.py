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
