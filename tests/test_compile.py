"""torch.compile: seqpar attention as registered ops that compile fullgraph, forward and backward.

On 1 and 2 gloo ranks: opcheck of every op; a compiled function calling seqpar.attention (fullgraph,
aot_eager bitwise equal to eager, inductor within the numerics bound) over every layout, causal or
not, MHA and GQA; parallelize(compile=True) of a plain-SDPA model and a Hugging Face Llama equal to
eager parallelize, with no graph break and no recompile after the first step.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import compile_cases
from seqpar.testing import numerics
from seqpar.vocab import LAYOUTS, METHODS


# method="hybrid" is refused under torch.compile (api._check_compilable; its ops would need two sub-groups)
@pytest.mark.parametrize("method", [m for m in METHODS if m != "hybrid"])
@pytest.mark.parametrize("P", [1, 2])
def test_opcheck_every_op(worlds, P, method):
    for checked in worlds(P).run(compile_cases.opcheck, method=method, timeout=240):
        assert len(checked) == 3, checked


@pytest.mark.parametrize("method", [m for m in METHODS if m != "hybrid"])
def test_opcheck_with_a_window_and_softcap(worlds, method):
    for checked in worlds(2).run(compile_cases.opcheck, method=method, window=(3, -1), softcap=1.5, timeout=240):
        assert len(checked) == 3, checked


@pytest.mark.parametrize("layout,causal,hkv", list(itertools.product(LAYOUTS, [False, True], [4, 2])))
def test_compiled_function_aot_eager_is_bitwise_eager(worlds, layout, causal, hkv):
    for r in worlds(2).run(compile_cases.compiled_function, backend="aot_eager", layout=layout, causal=causal,
                           hkv=hkv, timeout=240):
        assert r["eager_diff"] == 0.0 and r["breaks"] == 0, r
        numerics.assert_within_bound(r["errors"], torch.float32)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_compiled_function_inductor_within_bound(worlds, layout):
    for r in worlds(2).run(compile_cases.compiled_function, backend="inductor", layout=layout, causal=True, hkv=2,
                           timeout=300):
        assert r["breaks"] == 0, r
        numerics.assert_within_bound(r["errors"], torch.float32)


@pytest.mark.parametrize("kind,checkpoint,backend", [("gpt", False, "aot_eager"), ("llama", False, "aot_eager"),
                                                     ("llama", True, "aot_eager"), ("llama", True, "inductor")])
def test_compiled_model_equals_eager(worlds, kind, checkpoint, backend):
    for r in worlds(2).run(compile_cases.compiled_model, kind=kind, checkpoint=checkpoint, backend=backend,
                           timeout=300):
        assert r["loss"] < 1e-6 and r["grad"] < 1e-5, r
        if kind == "gpt":
            assert r["breaks"] == 0, r
        # compiled once: no new graph after the first step (three steps, same shapes)
        assert r["graphs"][0] > 0 and r["graphs"][-1] == r["graphs"][0], r


def test_what_compile_cannot_carry_is_refused(worlds):
    for r in worlds(2).run(compile_cases.refused, timeout=120):
        assert r["plain_ckpt"][0] == "ValueError" and "compile=True with checkpoint=True" in r["plain_ckpt"][1], r
        assert "record" in r and "record: the per-step timing hook works eagerly only" in r["record"][1], r
