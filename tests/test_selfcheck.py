"""The kernel self-check (seqpar.kernels.selfcheck): a backend proves itself per (device, dtype) first.

- the real Triton kernels pass it under TRITON_INTERPRET=1 (a subprocess: tests/selfcheck_cases.py);
- an injected wrong kernel (a reference-math stand-in named "triton", one entry point perturbed) fails
  the check that exercises it; backend="auto" then runs aten with exactly one SelfCheckWarning and its
  results equal fp64 SDPA / fp64 masked math; backend="triton" raises a RuntimeError naming device,
  dtype, check and max error; the verdict is cached (bounded) and never measured while compiling.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import warnings

import pytest
import torch
import torch.nn.functional as F

import seqpar
import seqpar.kernels as K
from seqpar.kernels import KernelBackend, TileMask, block_attention, block_attention_backward, merge_partial, selfcheck
from seqpar.kernels import reference as R
from seqpar.testing.numerics import sdpa_grads

os.environ.setdefault("OMP_NUM_THREADS", "1")
HERE = os.path.dirname(os.path.abspath(__file__))
CPU, FP32 = torch.device("cpu"), torch.float32


class FakeCompilationError(Exception):
    """What a Triton compile failure looks like to the dispatcher: an exception from the entry point."""


def stand_in(wrong: str | None = None, calls: list | None = None) -> KernelBackend:
    """A backend named "triton" with triton's capabilities, computing reference math in fp32, wrong in one
    way: ``wrong`` in (None, "out", "lse", "dk", "accumulate", "band", "docs", "nan", "raises")."""
    calls = [] if calls is None else calls

    def forward(q, k, v, *, mask, scale):
        calls.append("forward")
        if wrong == "raises":
            raise FakeCompilationError("at 12:4: unsupported layout for tl.dot on this architecture")
        out, lse = R.forward(q, k, v, mask=mask, scale=scale)
        if wrong == "out" or (wrong == "band" and mask.lo is not None):
            out = out + 1e-2
        if wrong == "lse":
            lse = lse + 1e-3
        if wrong == "nan":
            out = out.clone()
            out[0, 0, 3, 0] = math.nan
        return out, lse

    def backward(dout, q, k, v, out, lse, *, mask, scale):
        calls.append("backward")
        dq, dk, dv = (g.float() for g in R.backward(dout, q, k, v, out, lse, mask=mask, scale=scale))
        if wrong == "dk":
            dk = dk * 1.01
        if wrong == "docs" and mask.docs is not None:
            dv = torch.zeros_like(dv)
        return dq, dk, dv

    def forward_accumulate(q, k, v, out, lse, *, mask, scale):
        calls.append("accumulate")
        o, l = R.forward(q, k, v, mask=mask, scale=scale)
        merge_partial(out, lse, o + (1e-2 if wrong == "accumulate" else 0.0), l)

    return KernelBackend(name="triton", forward=forward, backward=backward, forward_accumulate=forward_accumulate,
                         native_masks=frozenset({"full", "causal", "strict"}),
                         dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
                         native_features=frozenset({"band", "docs", "softcap"}))


@pytest.fixture
def inject(monkeypatch):
    """``inject(impl)``: ``auto`` prefers "triton" on this CPU, and "triton" is ``impl``."""
    real = K.get_backend

    def use(impl: KernelBackend) -> None:
        monkeypatch.setattr(K, "_auto_name", lambda device: "triton")
        monkeypatch.setattr(K, "get_backend", lambda name: impl if name == "triton" else real(name))

    return use


def self_check_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, selfcheck.SelfCheckWarning)]


def qkv(B=1, Hq=4, Hkv=2, S=32, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, S, D, generator=g, dtype=torch.float64) for h in (Hq, Hkv, Hkv, Hq)]


# ---------------------------------------------------------------------------------------------- the check itself

def test_a_correct_stand_in_passes():
    for dtype in (torch.float32, torch.bfloat16):
        v = selfcheck.measure(stand_in(), CPU, dtype)
        assert v.ok, v
        checks = {row[0] for row in v.errors}
        assert checks == {f"{e}/{m}" for e in ("forward", "backward") for m in ("causal", "band", "docs")} | {
            "accumulate/causal"}
        assert all(err <= tol for _, _, err, tol in v.errors)


@pytest.mark.parametrize("wrong,check,tensor", [
    ("out", "forward/causal", "out"), ("lse", "forward/causal", "lse"), ("nan", "forward/causal", "out"),
    ("dk", "backward/causal", "dk"), ("accumulate", "accumulate/causal", "out"), ("band", "forward/band", "out"),
    ("docs", "backward/docs", "dv")])
def test_a_wrong_entry_point_fails_its_check(wrong, check, tensor):
    v = selfcheck.measure(stand_in(wrong), CPU, FP32)
    assert not v.ok and (v.check, v.tensor) == (check, tensor), v
    assert not v.error <= v.tolerance and v.tolerance == selfcheck.FLOOR[FP32]
    assert f"{check}: {tensor} max error" in v.describe()


def test_an_exception_fails_the_check():
    v = selfcheck.measure(stand_in("raises"), CPU, FP32)
    assert not v.ok and v.check == "forward/causal" and v.error == math.inf
    assert "FakeCompilationError: at 12:4" in v.describe()


def test_masks_the_backend_lacks_are_not_checked():
    plain = stand_in()
    plain = KernelBackend(name="triton", forward=plain.forward, backward=plain.backward,
                          native_masks=plain.native_masks, dtypes=plain.dtypes)
    v = selfcheck.measure(plain, CPU, FP32)
    assert v.ok and {row[0] for row in v.errors} == {"forward/causal", "backward/causal"}


# ---------------------------------------------------------------------------------------------- dispatch

def test_auto_falls_back_to_aten_with_one_warning(inject):
    calls: list = []
    inject(stand_in("dk", calls))
    q, k, v, do = qkv()
    truth = sdpa_grads(q, k, v, do, causal=True)
    leaves = [t.float().requires_grad_() for t in (q, k, v)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            for t in leaves:
                t.grad = None
            out = seqpar.attention(*leaves, is_causal=True, enable_gqa=True, backend="auto")
            out.backward(do.float())
    (msg,) = self_check_warnings(caught)
    assert "cpu torch.float32" in msg and "backward/causal: dk max error" in msg and "'aten'" in msg
    assert calls == ["forward", "backward"]  # measured once: forward/causal passed, backward/causal failed
    for got, want in zip([out] + [t.grad for t in leaves], truth):
        assert (got.double() - want).abs().max().item() < 1e-5


def test_auto_fallback_runs_masked_tiles_exactly(inject):
    inject(stand_in("band"))
    q, k, v, do = qkv(S=40)
    mask = TileMask("causal", lo=-6)
    i = torch.arange(40)
    visible = (i[None, :] <= i[:, None]) & (i[None, :] >= i[:, None] - 6)
    truth = sdpa_grads(q, k, v, do, causal=False, attn_mask=visible)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, lse = block_attention(q.float(), k.float(), v.float(), mask=mask, scale=16 ** -0.5, backend="auto")
        grads = block_attention_backward(do.float(), q.float(), k.float(), v.float(), out, lse, mask=mask,
                                         scale=16 ** -0.5, backend="auto")
    assert len(self_check_warnings(caught)) == 1
    for got, want in zip([out, *grads], truth):
        assert (got.double() - want).abs().max().item() < 1e-5


def test_explicit_triton_raises(inject):
    calls: list = []
    inject(stand_in("dk", calls))
    q, k, v, _ = (t.float() for t in qkv())
    for _ in range(2):  # the cached verdict raises again, without measuring again
        with pytest.raises(RuntimeError, match=r"backend='triton' failed its self-check on cpu torch\.float32: "
                                               r"backward/causal: dk max error [0-9.e-]+ > tolerance"):
            block_attention(q, k, v, mask="causal", scale=0.25, backend="triton")
    assert calls == ["forward", "backward"]


def test_explicit_triton_raises_on_a_compile_error(inject):
    inject(stand_in("raises"))
    q, k, v, _ = (t.float() for t in qkv())
    with pytest.raises(RuntimeError, match=r"on cpu torch\.float32: forward/causal raised FakeCompilationError"):
        block_attention(q, k, v, mask="causal", scale=0.25, backend="triton")


def test_a_passing_backend_runs_and_other_dtypes_are_separate(inject):
    calls: list = []
    impl = stand_in(None, calls)
    inject(impl)
    q, k, v, _ = qkv()
    block_attention(q.float(), k.float(), v.float(), mask="causal", scale=0.25, backend="auto")
    n = len(calls)
    block_attention(q.float(), k.float(), v.float(), mask="causal", scale=0.25, backend="auto")
    assert len(calls) == n + 1  # the backend itself ran; no second measurement
    block_attention(q.half(), k.half(), v.half(), mask="causal", scale=0.25, backend="auto")
    assert len(calls) > n + 2  # fp16: measured on its own
    block_attention(q, k, v, mask="causal", scale=0.25, backend="auto")  # fp64: not the backend's, reference
    assert selfcheck.verdict(impl, CPU, FP32).ok and selfcheck.verdict(impl, CPU, torch.float16).ok


def test_resolution_defers_auto_only_where_a_checked_backend_is_preferred(inject):
    assert K.resolve_backend("auto", CPU) == "aten"
    inject(stand_in())
    assert K.resolve_backend("auto", CPU) == "auto"


def test_no_measurement_while_compiling(monkeypatch):
    impl = stand_in()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    aten = K.get_backend("aten")
    assert selfcheck.trusted(impl, CPU, FP32, fallback=aten) is aten
    with pytest.raises(RuntimeError, match="cannot run while torch.compile traces"):
        selfcheck.trusted(impl, CPU, FP32, fallback=None)
    monkeypatch.undo()
    assert selfcheck.trusted(impl, CPU, FP32, fallback=aten) is impl  # measured at the first eager call


def test_the_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(selfcheck, "CACHE_SIZE", 3)
    monkeypatch.setattr(selfcheck, "_VERDICTS", {})
    impls = [stand_in() for _ in range(5)]
    for impl in impls:
        assert selfcheck.verdict(impl, CPU, FP32).ok
    assert [key[0] for key in selfcheck._VERDICTS] == impls[2:]


def test_compiled_attention_falls_back_at_run_time(inject):
    """Under torch.compile the check runs inside seqpar's custom op, eagerly, not while tracing."""
    inject(stand_in("out"))
    q, k, v, do = qkv(S=16)
    truth = sdpa_grads(q, k, v, do, causal=True)
    leaves = [t.float().requires_grad_() for t in (q, k, v)]
    fn = torch.compile(lambda a, b, c: seqpar.attention(a, b, c, is_causal=True, enable_gqa=True, backend="auto"),
                       backend="aot_eager", fullgraph=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn(*leaves)
        out.backward(do.float())
    assert len(self_check_warnings(caught)) == 1
    for got, want in zip([out] + [t.grad for t in leaves], truth):
        assert (got.double() - want).abs().max().item() < 1e-5


# ---------------------------------------------------------------------------------------------- the real kernels

@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_kernels_pass_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    with tempfile.TemporaryDirectory(prefix="seqpar-selfcheck-") as d:
        path = os.path.join(d, "results.json")
        proc = subprocess.run([sys.executable, os.path.join(HERE, "selfcheck_cases.py"), path], env=env,
                              capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr[-4000:]
        with open(path) as f:
            res = json.load(f)
    assert res["interpret"] == "1"
    every = {f"{e}/{m}" for e in ("forward", "backward") for m in ("causal", "band", "docs")} | {"accumulate/causal"}
    for dtype in ("torch.float32", "torch.bfloat16"):
        assert res[dtype]["ok"] and res[dtype]["within"] and set(res[dtype]["checks"]) == every, res[dtype]
    explicit = res["explicit_float32"]
    assert explicit["warnings"] == [] and explicit["cached"]
    assert explicit["out_err"] < 1e-5 and explicit["dq_err"] < 1e-5, explicit
    bad = res["perturbed_backward"]
    assert not bad["ok"] and (bad["check"], bad["tensor"]) == ("backward/causal", "dq"), bad


@pytest.mark.skipif(not (torch.cuda.is_available() and importlib.util.find_spec("triton") is not None),
                    reason="compiled Triton kernels need CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_kernels_pass_on_cuda(dtype):
    """The check the dispatcher runs on first use, compiled: auto then runs triton, without a warning."""
    device = torch.device("cuda", torch.cuda.current_device())
    v = selfcheck.verdict(K.get_backend("triton"), device, dtype)
    assert v.ok, v.describe()
    assert K._for("auto", torch.empty(0, device=device, dtype=dtype), 0.125).name == "triton"
