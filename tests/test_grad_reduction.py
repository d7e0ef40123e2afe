"""Gradient reduction over dp x cp under parallelize: gradient accumulation, and ranks whose autograd graphs
differ (MoE experts that got no token on some rank), with and without FSDP2, against one process."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import grad_reduction_cases as gc  # noqa: E402


def test_gradient_accumulation(worlds):
    w = worlds(4)
    # both models cast to bf16 after parallelize (fsdp=False groups the parameters by dtype once, at parallelize,
    # and regroups when their dtypes change): gradients still equal one process's; bound: bf16 rounding of two
    # runs summed in different orders (measured 1.8e-2)
    for fsdp, dp, cp, cast, bound in [(False, 1, 4, None, 1e-4), (False, 2, 2, None, 1e-4), (True, 2, 2, None, 1e-4),
                                      (False, 2, 2, torch.bfloat16, 5e-2)]:
        for err in w.run(gc.accumulation, fsdp=fsdp, dp=dp, cp=cp, cast=cast):
            assert err <= bound, (fsdp, dp, cp, cast, err)


def test_experts_unused_on_some_ranks(worlds):
    w = worlds(4)
    for fsdp in (False, True):
        for err, none_ref, none_got in w.run(gc.unused_experts, fsdp=fsdp):
            assert err <= 1e-4, (fsdp, err)
            if not fsdp:  # FSDP2 gives every sharded parameter a gradient (zeros), as in any FSDP2 run
                assert none_got == none_ref, (none_ref, none_got)
