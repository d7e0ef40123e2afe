"""Gradient reduction over dp x cp under parallelize: gradient accumulation, and ranks whose autograd graphs
differ (MoE experts that got no token on some rank), with and without FSDP2, against one process."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

import grad_reduction_cases as gc  # noqa: E402


def test_gradient_accumulation(worlds):
    w = worlds(4)
    for fsdp, dp, cp in [(False, 1, 4), (False, 2, 2), (True, 2, 2)]:
        for err in w.run(gc.accumulation, fsdp=fsdp, dp=dp, cp=cp):
            assert err <= 1e-4, (fsdp, dp, cp, err)


def test_experts_unused_on_some_ranks(worlds):
    w = worlds(4)
    for fsdp in (False, True):
        for err, none_ref, none_got in w.run(gc.unused_experts, fsdp=fsdp):
            assert err <= 1e-4, (fsdp, err)
            if not fsdp:  # FSDP2 gives every sharded parameter a gradient (zeros), as in any FSDP2 run
                assert none_got == none_ref, (none_ref, none_got)
