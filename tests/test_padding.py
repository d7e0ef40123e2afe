"""An ``attention_mask`` passed to a parallelized Hugging Face model beside a sharded batch (passes/padding.py).

On 4 gloo ranks, for an attention model (Llama), a gated-DeltaNet hybrid (Qwen3-Next, state path) and an
attention-free Mamba2: a whole-sequence (B, S) or local (B, S_local) mask of ones gives the single-process loss;
a mask with zeros -- the whole sequence's, or one rank's local mask only -- and a mask of another length raise
ValueError on every rank (the rank that saw the zeros names them, the others name that rank), never a hang or a
different loss. Ranks that pass different kinds of input -- a mask on rank 0 (or 1) and none on the others, masks of
two dtypes, labels on rank 0 only, position_ids missing on rank 1 -- all raise within seconds (passes/agreement.py). shard_batch turns padding into an ignored end document and returns no attention_mask.
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
            # ranks that passed different kinds of input: the same ValueError on every rank, at once (no collective
            # left waiting: before, a gloo abort of the masked rank, or a hang until the process-group timeout)
            for variant in ("rank0_only", "rank1_only", "dtype_rank0"):
                assert res[variant] == per_rank[0][variant], (what, variant, res)
                assert "attention_mask differs between the ranks" in res[variant], (what, variant, res)
                assert "the same kind of attention_mask on every rank" in res[variant], (what, variant, res)
                assert "seqpar.shard_batch" in res[variant], (what, variant, res)
            assert "rank 0: a 2-D int64 mask of length 40, rank 1: none" in res["rank0_only"], (what, res)
            assert "rank 0: none, rank 1: a 2-D int64 mask of length 10" in res["rank1_only"], (what, res)
            assert "rank 0: a 2-D bool mask of length 10, rank 1: a 2-D int64" in res["dtype_rank0"], (what, res)
            assert res["labels_rank0_only"] == per_rank[0]["labels_rank0_only"], (what, res)
            assert "labels given on rank(s) [0] only" in res["labels_rank0_only"], (what, res)
            for variant in ("no_position_ids_rank1", "none_position_ids_rank1"):
                if rank == 1:
                    assert "no position_ids" in res[variant], (what, res)
                else:
                    assert "rank(s) [1] rejected" in res[variant], (what, res)
                    assert "['position_ids']" in res[variant], (what, res)
            assert res["none_after"] == res["none"], (what, res)  # the world still runs, the same loss
            # well under the 60 s process-group timeout a hang would take (loose: a loaded machine is slow)
            assert max(res["seconds"][v] for v in pc.ASYMMETRIC[:-1]) < 30.0, (what, res["seconds"])


def test_shard_batch_padding_is_documents(worlds):
    """(LFM2: its short convs and attention read the mask; a gated DeltaNet on the gather path would hand the
    documents to transformers' torch fallback, which refuses packed sequences without flash-linear-attention.)"""
    for model_type, class_name in [("llama", "LlamaForCausalLM"), ("lfm2", "Lfm2ForCausalLM")]:
        for rank, res in enumerate(worlds(4).run(pc.shard_batch_padding, model_type=model_type, class_name=class_name)):
            assert "attention_mask" not in res["keys"] and "cu_seq_lens_q" in res["keys"], (model_type, rank, res)
            assert res["loss"] <= 1e-5, (model_type, rank, res)
