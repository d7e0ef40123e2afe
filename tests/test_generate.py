"""Generate on a sharded sequence (seqpar.inference, seqpar/passes/generate.py): issue 20.

One spawned world of 4 gloo ranks runs every multi-rank case (tests/generate_cases.py). References:
the unmodified HF model's own ``generate`` in one process, fp64 attention math, and plain arithmetic
for placement; never seqpar code.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import generate_cases as gc  # noqa: E402
from seqpar.inference import merge_partials, place  # noqa: E402

P = 4


@pytest.fixture
def world(worlds):
    """The session's 4-rank world (tests/conftest.py: shared with the other test files, restarted if a case broke it)."""
    return worlds(P)


def test_place_is_least_loaded():
    counts = [7, 10, 10, 10]
    assert place(counts, 6) == [0, 0, 0, 0, 1, 2] and counts == [11, 11, 11, 10]


def test_merge_partials_fp64():
    g = torch.Generator().manual_seed(3)
    outs = torch.randn(3, 2, 4, 5, generator=g, dtype=torch.float64)
    lses = torch.randn(3, 2, 4, generator=g, dtype=torch.float64) * 100
    lses[2, 0] = float("-inf")
    out, lse = merge_partials(outs, lses)
    w = torch.softmax(lses, dim=0)  # each part's share of the softmax mass
    assert torch.allclose(out, (w.unsqueeze(-1) * outs).sum(0), rtol=1e-12, atol=1e-12)
    assert torch.allclose(lse, torch.logsumexp(lses, dim=0), rtol=1e-12, atol=1e-9)


# (model, layout, prompt length, new tokens, options); prompt lengths not a multiple of the layout's unit
GENERATE = [
    ("llama", "zigzag", 150, 12, {}),
    ("llama", "striped", 150, 6, {}),
    ("llama", "contiguous", 147, 6, {"B": 2}),
    ("llama", "zigzag", 61, 8, {"do_sample": True}),
    ("llama", "zigzag", 61, 6, {"num_beams": 2}),
    ("qwen2_window", "zigzag", 150, 12, {}),  # window 24 < prompt: prefill and decode windows, eviction
    ("gemma2", "zigzag", 150, 12, {}),  # window + attention / final soft-cap
    ("gpt_oss", "zigzag", 150, 12, {}),  # sinks + window + MoE
    ("gemma2", "zigzag", 61, 6, {"merge": "tree"}),  # the partials merged by recursive doubling
]


@pytest.mark.parametrize("name, layout, S, n, opts", GENERATE, ids=[f"{g[0]}-{g[1]}-{g[2]}-{g[4]}" for g in GENERATE])
def test_generate_equals_single_process(world, name, layout, S, n, opts):
    for same_as_reference, same_on_every_rank, logits_rel in world.run(gc.generate_equal, name=name, layout=layout,
                                                                       S=S, n=n, timeout=600, **opts):
        assert same_as_reference and same_on_every_rank
        assert logits_rel < 2e-5


# rows of different lengths, left-padded (HF's attention_mask with zeros): (model, layout, lengths, options)
PADDED = [
    ("llama", "zigzag", (37, 60, 81), {}),
    ("llama", "contiguous", (5, 81, 23), {}),  # a row shorter than the ranks' shards
    ("llama", "striped", (37, 60), {"num_beams": 2}),  # rows reordered by the beams
    ("llama", "zigzag", (37, 60), {"do_sample": True}),
    ("qwen2_window", "zigzag", (37, 60, 81), {}),  # window 24 < the padding of the short rows
    ("gemma2", "zigzag", (37, 60, 81), {}),  # window + soft-caps
    ("gpt_oss", "zigzag", (37, 60, 81), {}),  # sinks + window + MoE
]


@pytest.mark.parametrize("name, layout, lengths, opts", PADDED,
                         ids=[f"{p[0]}-{p[1]}-{'-'.join(map(str, p[2]))}-{p[3]}" for p in PADDED])
def test_generate_left_padded_rows_equal_single_process(world, name, layout, lengths, opts):
    for same_as_reference, same_on_every_rank, logits_rel in world.run(gc.padded_equal, name=name, layout=layout,
                                                                       lengths=lengths, timeout=600, **opts):
        assert same_as_reference and same_on_every_rank
        assert logits_rel < 2e-5  # measured 2.4-4.1e-7


@pytest.mark.parametrize("opts", [{}, {"window": 5}, {"window": 20, "softcap": 5.0}, {"T": 3, "window": 7},
                                  {"layout": "contiguous", "T": 2}])
def test_rows_of_different_lengths_hand_written_fp64(world, opts):
    for err, _ in world.run(gc.kv_shard_rows_fp64, **opts):
        assert err < 1e-12


# (model, prompt S1, chunk T, layout, batch): a chunk of T tokens on the warm cache by pass-Q and by pass-KV
CHUNKS = [
    ("llama", 70, 40, "zigzag", 2),
    ("llama", 70, 3, "striped", 1),  # a chunk shorter than the ranks: most ranks hold none of it (pass-KV padding)
    ("qwen2_window", 70, 57, "zigzag", 1),  # window 24 < chunk: the chunk's own ring windowed, the cache evicted
    ("gemma2", 70, 40, "zigzag", 1),  # window + soft-caps
    ("gpt_oss", 70, 33, "contiguous", 1),  # sinks + window + MoE
]


@pytest.mark.parametrize("name, S1, T, layout, B", CHUNKS, ids=[f"{c[0]}-{c[2]}-{c[3]}-B{c[4]}" for c in CHUNKS])
def test_chunk_on_warm_cache_pass_q_equals_pass_kv_equals_single_process(world, name, S1, T, layout, B):
    for q_rel, kv_rel, q_vs_kv, same_tokens in world.run(gc.chunk_equal, name=name, S1=S1, T=T, layout=layout, B=B,
                                                          timeout=600):
        assert q_rel < 2e-5 and kv_rel < 2e-5 and q_vs_kv < 2e-5  # measured 1.4-4.7e-7
        assert same_tokens  # pass-Q, pass-KV and auto: the reference's greedy tokens after the chunk


@pytest.mark.parametrize("mode", ["pass_q", "pass_kv"])
@pytest.mark.parametrize("opts", [{}, {"window": 5}, {"softcap": 5.0, "sinks": True, "window": 7}, {"T": 2},
                                  {"T": 30, "layout": "striped"}, {"window": 5, "via_attention": True}])
def test_chunk_hand_written_fp64(world, mode, opts):
    for err, live_once, length in world.run(gc.chunk_fp64, mode=mode, **opts):
        assert err < 1e-12 and live_once  # every live token held by exactly one rank
        assert length == 40 + opts.get("T", 13) + 3


@pytest.mark.parametrize("lengths", [None, (23, 40, 31)], ids=["one-row", "left-padded-rows"])
def test_generate_continues_a_warm_cache(world, lengths):
    assert all(world.run(gc.generate_warm, lengths=lengths, timeout=600))


@pytest.mark.parametrize("name", ["llama", "qwen2_window"])
def test_assisted_decoding(world, name):
    for same_as_assisted, same_as_greedy, (held, length) in world.run(gc.assisted_equal, name=name, timeout=600):
        assert same_as_assisted and same_as_greedy
        live = range(length - 24, length) if name == "qwen2_window" else range(length)  # window 24: the rest evicted
        assert len(set(held)) == len(held) and set(live) <= set(held) and max(held) < length  # rejected drafts gone


def test_cache_balance_and_window_eviction(world):
    res = world.run(gc.balance, S=37, n=23)
    length = 37 + 22  # the last new token is returned, not yet run through the model
    full = [r["llama"] for r in res]
    assert all(f[0] == length for f in full)
    held = [f[1][0] for f in full]
    assert sum(held) == length and max(held) - min(held) <= 1  # balanced within one token
    positions = sorted(p for f in full for p in f[2])
    assert positions == list(range(length))  # every token exactly once
    window = [r["qwen2_window"] for r in res]
    kept = sorted(p for f in window for p in f[2])
    assert kept == list(range(length - 24, length))  # the last query (length - 1) sees the 24 latest


@pytest.mark.parametrize("opts", [{}, {"window": 5}, {"softcap": 5.0, "sinks": True},
                                  {"window": 5, "sinks": True, "via_attention": True}])
def test_hand_written_decode_loop_fp64(world, opts):
    res = world.run(gc.kv_shard_decode, **opts)
    assert all(err < 1e-12 for err, _ in res)
    if "window" in opts:  # 6 keys visible to the last query, spread over the ranks
        assert sum(held for _, held in res) == opts["window"] + 1


def test_hand_written_decode_loop_fp32(world):
    assert all(err < 2e-6 for err, _ in world.run(gc.kv_shard_decode, dtype=torch.float32, window=3, sinks=True))


@pytest.mark.parametrize("merge", ["all_gather", "tree"])
def test_merge_across_ranks_vs_fp64(world, merge):
    for err, lse_err, empty_ok in world.run(gc.merge_numerics, merge=merge):
        assert err < 1e-6 and lse_err < 1e-4 and empty_ok  # lse ~300 in fp32: ulp 3e-5


def test_refusals_on_every_rank(world):
    res = world.run(gc.refusals)
    assert all(r == res[0] for r in res)  # the same error on every rank
    got = {case: (kind, msg) for case, kind, msg in res[0]}
    expect = {"layout": "another group", "group": "another group", "dynamic": "SeqparCache",
              "padding": "row(s) [1] of the attention_mask are not left padding",
              "empty_row": "row(s) [1] of the attention_mask are not left padding",
              "padding_warm": "pads the rows differently from the cache's first prompt",
              "rows_pass_kv": "chunk='pass_kv' on a cache of rows of different lengths", "packed": "packed", "labels": "labels",
              "crop": "remembers the owners of its latest 20", "chunk": "chunk='ring'", "merge": "merge='ring'", "positions": "max_position_embeddings=1024",
              "positions_warm": "20 cached + 1005 new"}
    for case, words in expect.items():
        kind, msg = got[case]
        assert kind == "ValueError" and words in msg, (case, kind, msg)
