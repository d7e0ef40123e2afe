"""seqpar.plan_inference: the inference cost model's formulas on known shapes, by hand-done arithmetic
(a toy shape with round machine numbers), and the numbers docs/scaling.md quotes. No timings."""

from __future__ import annotations

import pytest

from seqpar.plan import H100, Machine, ModelShape
from seqpar.plan_inference import LLAMA3_405B, choose_chunk, decode_plan, merge_choice, prefill_plan

# 4 query / 2 kv heads of 8, 2 layers of 1000 parameters each (no hidden: no TP all-reduce, no LM head)
TOY = ModelShape(heads=4, kv_heads=2, head_dim=8, layers=2, params=2000)
BOX = Machine(attn_flops=1e9, diag_flops=5e8, link_bw=1e6, latency=1e-3, overlap="full", linear_flops=1e9,
              memory_bw=1e8)


def test_prompt_pass_kv_is_the_ring_forward():
    p = prefill_plan(TOY, 64, 4, BOX)  # s = 16 tokens per rank, e = 2
    tile = 2 * 4 * 16 * 16 * 16 / 2  # 16384 flops: a balanced causal half tile, D + Dv = 16
    hop = 1e-3 + (2 * 16 * 16 * 2) / 1e6  # 1024 bytes of K/V: 2.024 ms > 16 us compute, so exposed
    layer = 3 * hop + tile / 5e8 + 2 * 1000 * 16 / 1e9  # 3 overlapped steps + the diagonal + the linear layers
    assert p.time == pytest.approx(2 * layer, rel=1e-12)
    assert p.bytes_sent == 2 * 3 * 1024 and p.merge_time == 0.0


def test_chunk_pass_q_merge_picks_the_tree_when_cheaper():
    p = prefill_plan(TOY, 8, 4, BOX, cached=56, mode="pass_q")  # c = 14 cached, s = 2 chunk tokens per rank
    attention = 2 * 4 * 8 * (14 + 1) * 16 / 1e9
    nbytes = 4 * 8 * (8 + 1) * 4  # 1152 bytes of fp32 (out | lse) per rank
    gather, tree = 1e-3 + 3 * nbytes / 1e6, 2 * (1e-3 + nbytes / 1e6)
    assert tree < gather and p.merge == "tree"
    assert p.time == pytest.approx(2 * (attention + tree + 2 * 1000 * 8 / 1e9), rel=1e-12)
    forced = prefill_plan(TOY, 8, 4, BOX, cached=56, mode="pass_q", merge="all_gather")
    assert forced.merge_time == pytest.approx(2 * gather, rel=1e-12)


def test_chunk_pass_kv_adds_the_cache_ring():
    p = prefill_plan(TOY, 8, 4, BOX, cached=56)
    own = 3 * (1e-3 + 2 * 2 * 16 * 2 / 1e6) + (2 * 4 * 2 * 2 * 16 / 2) / 5e8
    cache = 3 * (1e-3 + 2 * 14 * 16 * 2 / 1e6) + 2 * 4 * 2 * 14 * 16 / 1e9
    assert p.time == pytest.approx(2 * (own + cache + 2 * 1000 * 2 / 1e9), rel=1e-12)


def test_decode_is_memory_bound():
    d = decode_plan(TOY, 400, 4, BOX)  # 100 cached tokens per rank
    read = 2 * 100 * 16 * 2 / 1e8  # 64 us of cache reads > 12.8 us of flops
    weights = 1000 * 2 / 1e8  # 20 us of weight reads > 2 us of flops
    nbytes = 4 * 9 * 4
    gather = 1e-3 + 3 * nbytes / 1e6
    assert d.merge == "all_gather" and gather < 2 * (1e-3 + nbytes / 1e6)
    assert d.time == pytest.approx(2 * (read + gather + weights), rel=1e-12)


def test_choose_chunk_short_chunk_pass_q_long_chunk_pass_kv():
    assert choose_chunk(TOY, 8, 56, 4, BOX) == "pass_q"
    assert choose_chunk(TOY, 4096, 64, 4, BOX) == "pass_kv"


def test_merge_choice():
    assert merge_choice(BOX, 1152, 4) == "tree"  # 2 (1 ms + 1.152 ms) < 1 ms + 3 x 1.152 ms
    assert merge_choice(BOX, 144, 4) == "all_gather"  # 1.432 ms < 2.288 ms
    assert merge_choice(BOX, 1e9, 1) == "all_gather"
    # H100, batch-1 decode of Llama-3-8B (32 heads x 129 fp32) on 128 ranks: the gather; batch 256: the tree
    assert merge_choice(H100, 32 * 129 * 4, 128) == "all_gather"
    assert merge_choice(H100, 256 * 32 * 129 * 4, 128) == "tree"


def test_one_rank_has_no_communication():
    assert prefill_plan(TOY, 64, 1, BOX).bytes_sent == 0
    assert decode_plan(TOY, 64, 1, BOX).merge_time == 0


def test_the_numbers_docs_scaling_quotes():
    # Llama-3-405B, CP16 x TP8 (Meta's setup): 1M-token prefill predicted 94.1 s (Meta measured 77 s), 128K 3.04 s
    assert prefill_plan(LLAMA3_405B, 1 << 20, 16, H100, tp=8).time == pytest.approx(94.08, rel=1e-3)
    assert prefill_plan(LLAMA3_405B, 128000, 16, H100, tp=8).time == pytest.approx(3.043, rel=1e-3)


def test_bad_input():
    with pytest.raises(ValueError, match="tp=3"):
        prefill_plan(TOY, 8, 2, BOX, tp=3)
    with pytest.raises(ValueError, match="mode="):
        prefill_plan(TOY, 8, 2, BOX, mode="ring")
    with pytest.raises(ValueError, match="new_tokens"):
        prefill_plan(TOY, 0, 2, BOX)
