"""Triton block-attention kernels vs an fp64 truth (the reference backend / plain fp64 math).

CPU: the kernels run under ``TRITON_INTERPRET=1`` in one fresh subprocess (tests/triton_interpret.py);
the tests here assert on its numbers. GPU (skipped without CUDA): the same cases compiled, in-process,
plus larger shapes. Error bound (seqpar.testing.numerics): <= 2x torch's error in the same dtype + a small floor.
"""

from __future__ import annotations

import importlib.util
import math
import os

import pytest
import torch

import triton_cases
from seqpar.testing import numerics

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="compiled Triton kernels need CUDA")


def assert_bound(res: dict, dtype: torch.dtype, key: str = "triton") -> None:
    assert "error" not in res, res["error"]
    assert sum(isinstance(e, dict) and key in e for e in res.values()) >= 2, res
    numerics.assert_within_bound(res, dtype, key)


@pytest.fixture(scope="module")
def interp():
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    from triton_interpret import interpret_results

    return interpret_results()


# ---------------------------------------------------------------------------------------------- interpreter (CPU)

@pytest.mark.parametrize("case", triton_cases.KERNEL_CASES, ids=triton_cases.case_id)
def test_kernel_interpret(interp, case):
    res = interp["kernel"][triton_cases.case_id(case)]
    assert_bound(res, getattr(torch, case[7]))
    assert res["dtypes"] == dict(out="torch.float32", lse="torch.float32", dq="torch.float32", dk="torch.float32")


@pytest.mark.parametrize("case", triton_cases.TILED_CASES, ids=triton_cases.case_id)
def test_kernel_interpret_nonsquare_tiles(interp, case):
    """The mask-phase split with BLOCK_M != BLOCK_N (the GPU configs): diagonals spanning several blocks."""
    assert_bound(interp["tiled"][triton_cases.case_id(case)], getattr(torch, case[7]))


@pytest.mark.parametrize("case", triton_cases.ACCUMULATE_CASES, ids=triton_cases.case_id)
def test_accumulate_interpret(interp, case):
    """In-kernel merge == attention over both blocks; rows without a visible key and memory around
    the strided views are untouched, bit for bit."""
    res = interp["accumulate"][triton_cases.case_id(case)]
    assert_bound(res, getattr(torch, case[7]))
    assert res["unseen_rows"] == (1 if case[6] == "strict" else 0)
    assert res["unseen_untouched"]
    if case[8]:
        assert res["outside_untouched"]


@pytest.mark.parametrize("case", triton_cases.MASKED_CASES, ids=triton_cases.case_id)
def test_masked_interpret(interp, case):
    """Band / documents / soft-cap tiles, forward and backward, vs fp64 dense masked math; rows with no
    visible key: out 0, lse -inf, dq 0."""
    res = interp["masked"][triton_cases.case_id(case)]
    assert_bound(res, getattr(torch, case[7]))
    assert res["unseen_exact"] and res["shapes_ok"], res


@pytest.mark.parametrize("case", triton_cases.MASKED_TILED_CASES, ids=triton_cases.case_id)
def test_masked_interpret_nonsquare_tiles(interp, case):
    res = interp["masked_tiled"][triton_cases.case_id(case)]
    assert_bound(res, getattr(torch, case[7]))
    assert res["unseen_exact"], res


@pytest.mark.parametrize("case", triton_cases.MASKED_ACCUMULATE_CASES, ids=triton_cases.case_id)
def test_masked_accumulate_interpret(interp, case):
    """In-kernel merge of a masked tile into a state that is -inf in some rows; unseen rows untouched."""
    res = interp["masked_accumulate"][triton_cases.case_id(case)]
    assert_bound(res, getattr(torch, case[8]))
    assert res["unseen_untouched"] and res.get("outside_untouched", True), res


def test_backend_wiring_interpret(interp):
    b = interp["backend"]
    assert interp["interpret"] == "1"
    assert b["triton_on_cpu"] == "triton" and b["auto_on_cpu"] == "aten"
    assert b["fp64_fallback_err"] < 1e-12
    assert b["big_head_dim"] and "head dim 264" in b["big_head_dim"]


# ---------------------------------------------------------------------------------------------- no interpreter

@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="the interpreter is on in this process")
def test_triton_on_cpu_needs_interpreter():
    import seqpar
    from seqpar.kernels import resolve_backend

    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        resolve_backend("triton", torch.device("cpu"))
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        seqpar.attention(q, q, q, backend="triton")
    assert resolve_backend("auto", torch.device("cpu")) == "aten"


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_auto_is_triton_on_cuda():
    """With triton, "auto" stays "auto" on CUDA: the kernel layer picks triton per (device, dtype) once
    its self-check passed there (tests/test_selfcheck.py)."""
    from seqpar.kernels import resolve_backend

    assert resolve_backend("auto", torch.device("cuda")) == ("auto" if HAS_TRITON else "aten")


@pytest.mark.parametrize("backend", ["aten", "reference"])
@pytest.mark.parametrize("mask,Sq,Sk", [("full", 12, 20), ("causal", 16, 16), ("strict", 16, 16), ("full", 20, 12)])
def test_accumulate_fallback(backend, mask, Sq, Sk):
    """Backends without an in-kernel merge: block_attention + merge_partial, into strided views,
    vs fp64 attention over both blocks; a fresh state (lse = -inf) takes the block, unseen rows stay."""
    from seqpar.kernels import block_attention, block_attention_accumulate

    g = torch.Generator().manual_seed(Sq * Sk)
    B, Hq, Hkv, D = 2, 4, 2, 24
    q = torch.randn(B, Hq, Sq, D, generator=g, dtype=torch.float64)
    k0, v0 = (torch.randn(B, Hkv, Sq, D, generator=g, dtype=torch.float64) for _ in range(2))
    k1, v1 = (torch.randn(B, Hkv, Sk, D, generator=g, dtype=torch.float64) for _ in range(2))
    scale = D ** -0.5
    o0, l0 = block_attention(q, k0, v0, mask="causal", scale=scale, backend="reference")
    obuf = torch.zeros(B, Sq, Hq, 2 * D, dtype=torch.float64)
    out = obuf[..., :D].transpose(1, 2)  # (B, Hq, Sq, D) strided view
    lse = torch.empty(B, Hq, Sq, dtype=torch.float64)
    out.copy_(o0)
    lse.copy_(l0)
    before_o, before_l = out.clone(), lse.clone()
    block_attention_accumulate(q, k1, v1, out, lse, mask=mask, scale=scale, backend=backend)
    want_o, want_l = triton_cases._attend64(q, [(k0, v0, triton_cases._visible(Sq, Sq, "causal", "cpu")),
                                     (k1, v1, triton_cases._visible(Sq, Sk, mask, "cpu"))], scale)
    assert (out - want_o).abs().max().item() < 1e-12
    assert (lse - want_l).abs().max().item() < 1e-12
    assert (obuf[..., D:] == 0).all()
    if mask == "strict":  # row 0 sees no key of the new block: untouched
        assert torch.equal(out[:, :, 0], before_o[:, :, 0]) and torch.equal(lse[:, :, 0], before_l[:, :, 0])
    # a fresh state: out 0, lse -inf everywhere -> the block itself (row 0 of strict stays -inf)
    out2 = torch.zeros(B, Hq, Sq, D, dtype=torch.float64)
    lse2 = torch.full((B, Hq, Sq), -math.inf, dtype=torch.float64)
    block_attention_accumulate(q, k1, v1, out2, lse2, mask=mask, scale=scale, backend=backend)
    o1, l1 = triton_cases._attend64(q, [(k1, v1, triton_cases._visible(Sq, Sk, mask, "cpu"))], scale)
    assert torch.equal(torch.isinf(lse2), torch.isinf(l1))
    assert (out2 - o1).abs().max().item() < 1e-12
    fin = torch.isfinite(l1)
    assert (lse2[fin] - l1[fin]).abs().max().item() < 1e-12


# ---------------------------------------------------------------------------------------------- GPU (compiled)

GPU_KERNEL_CASES = triton_cases.KERNEL_CASES + [
    (2, 8, 2, 512, 512, 128, "causal", "bfloat16", "transposed"),
    (1, 8, 1, 1000, 1000, 64, "strict", "float16", "contiguous"),
    (1, 4, 4, 300, 700, 256, "full", "bfloat16", "strided"),
    (1, 4, 2, 384, 384, 96, "causal", "float32", "contiguous"),
    (1, 8, 8, 640, 640, 128, "full", "bfloat16", "contiguous"),
]


@needs_cuda
@pytest.mark.parametrize("case", GPU_KERNEL_CASES, ids=triton_cases.case_id)
def test_kernel_cuda(case):
    assert_bound(triton_cases.kernel_case(*case, device="cuda"), getattr(torch, case[7]))


@needs_cuda
@pytest.mark.parametrize("case", triton_cases.ACCUMULATE_CASES + [(2, 8, 1, 512, 512, 128, "strict", "bfloat16", True),
                                                       (1, 8, 2, 256, 512, 64, "full", "bfloat16", True)],
                         ids=triton_cases.case_id)
def test_accumulate_cuda(case):
    res = triton_cases.accumulate_case(*case, device="cuda")
    assert_bound(res, getattr(torch, case[7]))
    assert res["unseen_untouched"] and res.get("outside_untouched", True)


GPU_MASKED_CASES = triton_cases.MASKED_CASES + [
    (2, 8, 2, 512, 512, 128, "window_200", "bfloat16", "transposed"),
    (1, 8, 1, 700, 900, 64, "band_300", "float16", "contiguous"),
    (1, 4, 4, 1000, 1000, 128, "docs_1000", "bfloat16", "strided"),
    (1, 8, 2, 640, 640, 96, "softcap_window_200", "float32", "contiguous"),
    (1, 8, 2, 1000, 1000, 64, "docs_1000", "float32", "contiguous"),
]


@needs_cuda
@pytest.mark.parametrize("case", GPU_MASKED_CASES, ids=triton_cases.case_id)
def test_masked_cuda(case):
    res = triton_cases.masked_case(*case, device="cuda")
    assert_bound(res, getattr(torch, case[7]))
    assert res["unseen_exact"] and res["shapes_ok"], res


@needs_cuda
@pytest.mark.parametrize("case", triton_cases.MASKED_TILED_CASES, ids=triton_cases.case_id)
def test_masked_cuda_nonsquare_tiles(case):
    res = triton_cases.masked_tiled_case(*case, device="cuda")
    assert_bound(res, getattr(torch, case[7]))


@needs_cuda
@pytest.mark.parametrize("case", triton_cases.MASKED_ACCUMULATE_CASES, ids=triton_cases.case_id)
def test_masked_accumulate_cuda(case):
    res = triton_cases.masked_accumulate_case(*case, device="cuda")
    assert_bound(res, getattr(torch, case[8]))
    assert res["unseen_untouched"] and res.get("outside_untouched", True), res
