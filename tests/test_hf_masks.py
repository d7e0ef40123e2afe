"""transformers' mask functions read by seqpar: exact under parallelize, or refused by name.

Unit tests of :mod:`seqpar.passes.hf_masks` on transformers' own mask factories (no processes), and on
4 spawned gloo ranks the models whose window / chunk reach attention only through the mask function
(Qwen2-MoE and PhiMoE sliding windows, Llama 4 chunked attention) against the single-process model.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from transformers import masking_utils as mu  # noqa: E402

import hf_mask_cases as hc  # noqa: E402
from seqpar.masks import MaskSpec, visible_pairs  # noqa: E402
from seqpar.passes.hf_masks import MaskPlan, chunk_offsets, read_mask_function  # noqa: E402
from seqpar.vocab import LAYOUTS  # noqa: E402

ZERO = torch.zeros(1, dtype=torch.long)
POS = torch.arange(16)[None]


@pytest.mark.parametrize("fn, want", [
    (mu.causal_mask_function, MaskPlan(True)),
    (mu.bidirectional_mask_function, MaskPlan(False)),
    (mu.sliding_window_causal_mask_function(7), MaskPlan(True, (6, -1))),
    (mu.and_masks(mu.causal_mask_function, mu.sliding_window_overlay(3), mu.sliding_window_overlay(5)),
     MaskPlan(True, (2, -1))),
    (mu.sliding_window_bidirectional_mask_function(4), MaskPlan(False, (4, 4))),
    (mu.chunked_causal_mask_function(5, ZERO), MaskPlan(True, chunk=5)),
    # what transformers builds for packed position_ids (and for zigzag's local jumps): remap + packed ids
    (mu.and_masks(mu.remap_positions_for_packed_sequence(mu.sliding_window_causal_mask_function(3), POS),
                  mu.packed_sequence_mask_function(torch.zeros(1, 16, dtype=torch.long))), MaskPlan(True, (2, -1))),
    (mu.add_offsets_to_mask_function(mu.chunked_causal_mask_function(4, ZERO), 0, 0), MaskPlan(True, chunk=4)),
    (mu.and_masks(mu.causal_mask_function, mu.padding_mask_function(torch.ones(1, 16, dtype=torch.bool))),
     MaskPlan(True)),
])
def test_reads_transformers_masks(fn, want):
    got = read_mask_function(fn)
    assert (got.causal, got.window_size, got.chunk) == (want.causal, want.window_size, want.chunk)


def _check_plan_is_the_mask(fn, n=20):
    """What seqpar runs for the plan (its MaskSpec, chunks as documents) sees exactly the key/query pairs the
    mask function allows, on every index pair (the function is the independent truth)."""
    plan = read_mask_function(fn)
    q, k = torch.arange(n)[:, None], torch.arange(n)[None, :]
    want = fn(torch.tensor(0), torch.tensor(0), q, k).expand(n, n)
    cu = None if plan.chunk is None else tuple(chunk_offsets(plan.chunk, n, None).tolist())
    got = visible_pairs(MaskSpec(causal=plan.causal, window=plan.window_size, cu_seqlens=cu), range(n), range(n))
    assert torch.equal(got, want)


@pytest.mark.parametrize("w", [1, 2, 7, 40])
def test_plans_equal_the_functions(w):
    for fn in (mu.sliding_window_causal_mask_function(w), mu.chunked_causal_mask_function(w, ZERO),
               mu.sliding_window_bidirectional_mask_function(w), mu.causal_mask_function):
        _check_plan_is_the_mask(fn)


@pytest.mark.parametrize("fn, words", [
    (mu.or_masks(mu.causal_mask_function, mu.sliding_window_overlay(3)), "overlay"),
    (mu.and_masks(mu.causal_mask_function, lambda b, h, q, k: q % 2 == 0), "unrecognised mask function"),
    (mu.chunked_causal_mask_function(4, torch.tensor([2])), "left padding"),
    (mu.and_masks(mu.causal_mask_function, mu.padding_mask_function(torch.tensor([[True, False] * 8]))), "padding"),
    (mu.add_offsets_to_mask_function(mu.causal_mask_function, 3, 0), "KV cache"),
])
def test_refuses_what_it_cannot_read(fn, words):
    class FakeConfig:
        pass

    with pytest.raises(ValueError, match=words) as e:
        read_mask_function(fn, config=FakeConfig())
    assert "FakeConfig" in str(e.value)


def test_chunk_offsets():
    assert chunk_offsets(5, 12, None).tolist() == [0, 5, 10, 12]
    cu = torch.tensor([0, 7, 9, 20], dtype=torch.int32)
    assert chunk_offsets(3, 20, cu).tolist() == [0, 3, 6, 7, 9, 12, 15, 18, 20]


def test_mask_function_models(worlds):
    """Qwen2-MoE / PhiMoE sliding windows and Llama 4 chunked attention (window and chunk 5-7, shorter than
    the sequence and not multiples of the shard's chunk) equal the single-process model on 4 ranks, every
    layout, with and without packed documents: loss rel <= 1e-5, every gradient rel <= 1e-4."""
    w = worlds(4)
    cases = [(n, layout, packed) for n in ("qwen2_moe", "phimoe", "llama4") for layout in LAYOUTS
             for packed in (False, True)]
    for name, layout, packed in cases:
        for loss, grad in w.run(hc.equal_to_single_process, name=name, layout=layout, packed=packed):
            assert loss <= 1e-5 and grad <= 1e-4, (name, layout, packed, loss, grad)


def test_refusals(worlds):
    """Llama 4 temperature tuning (positions from the local length) and chunked attention under the packed
    layout are refused on every rank, naming the model and the way out."""
    w = worlds(4)
    for res in w.run(hc.refusal, name="llama4_tuned", layout="zigzag"):
        assert res is not None and res[0] == "ValueError" and "Llama4ForCausalLM" in res[1], res
        assert "attn_temperature_tuning=False" in res[1]
    for res in w.run(hc.refusal, name="llama4", layout="packed", packed=True):
        assert res is not None and "layout='packed'" in res[1] and "attention_chunk_size=5" in res[1], res
