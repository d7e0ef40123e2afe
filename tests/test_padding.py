"""An ``attention_mask`` passed to a parallelized Hugging Face model beside a sharded batch (passes/padding.py).

On 4 gloo ranks, for an attention model (Llama), a gated-DeltaNet hybrid (Qwen3-Next, state path) and an
attention-free Mamba2: a whole-sequence (B, S) or local (B, S_local) mask of ones gives the single-process loss;
a mask with zeros -- the whole sequence's, or one rank's local mask only -- and a mask of another length raise
ValueError on every rank (the rank that saw the zeros names them, the others name that rank), never a hang or a
different loss. shard_batch turns padding into an ignored end document and returns no attention_mask.
"""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

import padding_cases as pc  # noqa: E402

MODELS = [("llama", "LlamaForCausalLM"), ("qwen3_next", "Qwen3NextForCausalLM"), ("mamba2", "Mamba2ForCausalLM")]


def test_attention_mask_beside_a_sharded_batch(worlds):
    for model_type, class_name in MODELS:
        per_rank = worlds(4).run(pc.mask_variants, model_type=model_type, class_name=class_name, timeout=120)
        for rank, res in enumerate(per_rank):
            what = (model_type, rank)
            for variant in ("none", "global_ones", "local_ones"):
                assert res[variant].startswith("loss rel") and float(res[variant].split()[-1]) <= 1e-5, (what, res)
            assert "has zeros (padding)" in res["global_zeros"] and "shard_batch" in res["global_zeros"], (what, res)
            if rank == 1:
                assert "of this rank's tokens" in res["local_zeros_rank1"], (what, res)
            else:
                assert "rank(s) [1] rejected" in res["local_zeros_rank1"], (what, res)
            assert "must be (B, S_local)" in res["bad_length"], (what, res)


def test_shard_batch_padding_is_documents(worlds):
    """(LFM2: its short convs and attention read the mask; a gated DeltaNet on the gather path would hand the
    documents to transformers' torch fallback, which refuses packed sequences without flash-linear-attention.)"""
    for model_type, class_name in [("llama", "LlamaForCausalLM"), ("lfm2", "Lfm2ForCausalLM")]:
        for rank, res in enumerate(worlds(4).run(pc.shard_batch_padding, model_type=model_type, class_name=class_name)):
            assert "attention_mask" not in res["keys"] and "cu_seq_lens_q" in res["keys"], (model_type, rank, res)
            assert res["loss"] <= 1e-5, (model_type, rank, res)
