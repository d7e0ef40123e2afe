"""Bad input: a clear ValueError/TypeError naming the argument, on every rank, no hang."""

import pytest

import dist_cases

CASES = {
    "dtype_mismatch": ("TypeError", "dtype"),
    "gqa_without_flag": ("ValueError", "enable_gqa=True"),
    "heads_not_multiple": ("ValueError", "multiple"),
    "two_dims": ("ValueError", "at least 3 dims"),
    "odd_zigzag": ("ValueError", "pad the global sequence by"),
    "unknown_layout": ("ValueError", "layout must be one of"),
    "unknown_method": ("ValueError", "method must be one of"),
    "unknown_backend": ("ValueError", "backend must be one of"),
    "int_dtype": ("TypeError", "fp16, bf16, fp32 or fp64"),
    "not_tensor": ("TypeError", "q must be a torch.Tensor"),
    "kv_shape_mismatch": ("ValueError", "k and v must have the same leading dims"),
    "local_len_disagrees": ("ValueError", "disagree"),
    "one_rank_bad_dtype": ("TypeError", "dtype"),
    # the masks: window_size, cu_seqlens (global offsets, S = 16 here), softcap
    "cu_not_increasing": ("ValueError", "cu_seqlens must be strictly increasing"),
    "cu_decreasing": ("ValueError", "cu_seqlens must be strictly increasing"),
    "cu_not_from_zero": ("ValueError", "cu_seqlens must start at 0"),
    "cu_not_to_S": ("ValueError", "end at the global sequence length S=16"),
    "cu_float": ("TypeError", "cu_seqlens must be a 1-D integer tensor"),
    "cu_2d": ("TypeError", "cu_seqlens must be a 1-D integer tensor"),
    "cu_differs": ("ValueError", "disagree"),
    "window_differs": ("ValueError", "disagree"),
    "window_below_minus_one": ("ValueError", "window_size entries must be >= -1"),
    "window_not_int": ("TypeError", "window_size must be a pair of ints"),
    "softcap_negative": ("ValueError", "softcap must be >= 0"),
    "softcap_nan": ("TypeError", "softcap must be a finite float"),
    "one_rank_bad_cu": ("ValueError", "cu_seqlens must be strictly increasing"),
    "one_rank_bad_window": ("ValueError", "window_size entries must be >= -1"),
    "one_rank_bad_softcap": ("ValueError", "softcap must be >= 0"),
}
ONE_RANK = ("one_rank_bad_dtype", "one_rank_bad_cu", "one_rank_bad_window", "one_rank_bad_softcap")  # the last rank
# ranks that pass different valid masks: the disagreement names the mask arguments
MASK_DISAGREEMENT = ("cu_differs", "window_differs")


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_raises_on_every_rank(worlds, case):
    world = worlds(2)
    kind, text = CASES[case]
    res = world.run(dist_cases.bad_input, case=case, timeout=30)
    for rank, (etype, msg) in enumerate(res):
        assert etype is not None, f"rank {rank} did not raise for {case}"
        if case in ONE_RANK and rank == 0:
            assert etype == "ValueError" and "rank(s) [1] rejected" in msg, msg
            continue
        assert etype == kind and text in msg, f"rank {rank}: {etype}: {msg}"
        if case in MASK_DISAGREEMENT:
            assert all(name in msg for name in ("window", "softcap", "cu_seqlens")), msg
    assert max(world.run(dist_cases.healthy)) < 1e-6  # nobody is left waiting: the world still works


def test_layout_divisibility_message():
    import torch

    import seqpar.layout as L

    with pytest.raises(ValueError, match=r"pad the sequence by 3 tokens to 16"):
        L.shard_tensor(torch.zeros(13), 0, 0, 4, "contiguous")
    with pytest.raises(ValueError, match=r"multiple of 8.*pad the sequence by 6 tokens to 16"):
        L.shard_tensor(torch.zeros(1, 10), 1, 0, 4, "zigzag")
