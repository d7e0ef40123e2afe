"""Masked tiles (TileMask band / documents / soft-cap) on the CPU backends, and the dispatcher's routing.

Every result is checked against fp64 dense masked attention written in the test (an explicit boolean
(Sq, Sk) visibility from ``triton_cases.dense_visible`` and autograd for the gradients, not the
``reference`` backend), within ``seqpar.testing.numerics``' bound. The Triton kernels run the same
cases in tests/test_triton_kernels.py (interpreter on CPU, compiled on CUDA).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import triton_cases
from seqpar.kernels import (
    KernelBackend,
    TileMask,
    block_attention,
    block_attention_accumulate,
    block_attention_backward,
    get_backend,
)
from seqpar.kernels import reference as reference_backend
from seqpar.kernels.backend import split_mask
from seqpar.testing import numerics

CPU_BACKENDS = ["aten", "reference"]


def _check(res: dict, dtype: torch.dtype, key: str) -> None:
    numerics.assert_within_bound({k: v for k, v in res.items() if isinstance(v, dict)}, dtype, key)


def _fuzz(n: int):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None, print_blob=True,
                    phases=[Phase.explicit, Phase.generate], suppress_health_check=[HealthCheck.too_slow])


@st.composite
def tile_masks(draw, max_len: int = 24):
    """(TileMask, Sq, Sk): any kind, an optional band (either edge, possibly empty or wider than the tile),
    optional documents (segments of any length, q and kv cut differently, ids shared or not)."""
    Sq, Sk = draw(st.integers(1, max_len)), draw(st.integers(1, max_len))
    kind = draw(st.sampled_from(["full", "causal", "strict"]))
    edge = st.one_of(st.none(), st.integers(-max_len - 4, max_len + 4))
    lo, hi = draw(edge), draw(edge)

    def segments(n):
        cuts = sorted(draw(st.sets(st.integers(1, n - 1), max_size=4))) if n > 1 else []
        bounds = [0, *cuts, n]
        return tuple((a, b, draw(st.integers(0, 2))) for a, b in zip(bounds, bounds[1:]))

    docs = (segments(Sq), segments(Sk)) if draw(st.booleans()) else None
    return TileMask(kind, lo=lo, hi=hi, docs=docs), Sq, Sk


def _paint(mask: TileMask, Sq: int, Sk: int) -> torch.Tensor:
    """(Sq, Sk) int: how many pieces of the aten split compute each pair."""
    count = torch.zeros(Sq, Sk, dtype=torch.int32)
    for p in split_mask(mask, Sq, Sk):
        n = p.q1 - p.q0
        assert 0 <= p.q0 < p.q1 <= Sq and 0 <= p.k0 < p.k1 <= Sk, p
        if p.shape == "full":
            count[p.q0:p.q1, p.k0:p.k1] += 1
        else:
            assert p.k1 - p.k0 == n, f"triangles are square: {p}"
            i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
            count[p.q0:p.q1, p.k0:p.k1] += ((j <= i) if p.shape == "causal" else (j >= i)).int()
    return count


# ---------------------------------------------------------------------------------------------- the aten split

@_fuzz(400)
@given(spec=tile_masks(40))
def test_split_covers_the_visible_pairs_once(spec):
    """Each visible pair is computed by exactly one piece, no invisible pair by any: the pieces' work is the
    visible area (plus the fused kernels' own diagonal blocks)."""
    mask, Sq, Sk = spec
    vis = triton_cases.dense_visible(mask, Sq, Sk)
    count = _paint(mask, Sq, Sk)
    assert torch.equal(count, vis.int()), (mask, Sq, Sk, split_mask(mask, Sq, Sk))
    assert sum(p.visible_pairs() for p in split_mask(mask, Sq, Sk)) == int(vis.sum())


@pytest.mark.parametrize("S,window", [(512, 64), (1000, 7), (256, 300)])
def test_split_band_pieces_are_about_the_band_wide(S, window):
    """A causal window: row chunks of about the window, two triangles each (the middle is empty), so the
    number of pieces is ~2 S / window and the pieces hold exactly the visible pairs."""
    mask = TileMask("causal", lo=-(window - 1))
    pieces = split_mask(mask, S, S)
    w = min(window, S)
    assert len(pieces) <= 2 * math.ceil(S / max(1, w - 1)) + 2
    assert sum(p.visible_pairs() for p in pieces) == int(triton_cases.dense_visible(mask, S, S).sum())


# ---------------------------------------------------------------------------------------------- numerics

def _dtypes(case) -> list[str]:
    return ["float64"] + ([case[7]] if case[7] != "float64" else [])


MASKED = [(c, dt) for c in triton_cases.MASKED_CASES for dt in _dtypes(c)]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case,dtype", MASKED, ids=[f"{triton_cases.case_id(c)}-{d}" for c, d in MASKED])
def test_masked_tile(backend, case, dtype):
    """out, lse, dq, dk, dv of a masked tile vs fp64 dense masked math; rows that see nothing: 0, -inf, 0."""
    c = list(case)
    c[7] = dtype
    res = triton_cases.masked_case(*c, backend=backend)
    _check(res, getattr(torch, dtype), backend)
    assert res["unseen_exact"] and res["shapes_ok"], res


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", triton_cases.MASKED_ACCUMULATE_CASES, ids=triton_cases.case_id)
def test_masked_accumulate(backend, case):
    """A masked tile merged into a running (out, lse) that starts at -inf in some rows == attention over
    both blocks; rows that see nothing of the new tile are untouched, bit for bit."""
    res = triton_cases.masked_accumulate_case(*case, backend=backend)
    _check(res, getattr(torch, case[8]), backend)
    assert res["unseen_untouched"] and res.get("outside_untouched", True), res


@_fuzz(60)
@given(spec=tile_masks(20), gqa=st.sampled_from([(2, 2), (4, 2), (3, 1)]), softcap=st.sampled_from([0.0, 0.0, 1.5]))
def test_random_masks_aten_and_reference(spec, gqa, softcap):
    """Random masks, fp64: aten (pieces) and reference (dense rows) both equal the dense masked math."""
    mask, Sq, Sk = spec
    mask = TileMask(mask.kind, lo=mask.lo, hi=mask.hi, docs=mask.docs, softcap=softcap)
    Hq, Hkv = gqa
    for backend in CPU_BACKENDS:
        res = triton_cases.masked_case(1, Hq, Hkv, Sq, Sk, 8, mask, "float64", "transposed", backend=backend)
        _check(res, torch.float64, backend)
        assert res["unseen_exact"], (backend, mask, res)


@pytest.mark.parametrize("name", ["window", "lohi", "docs", "docs_causal_band", "hi_neg", "lo_pos"])
def test_aten_small_leaves(monkeypatch, name):
    """The CPU split with tiny triangles (halved down to 4) and band chunks: same numbers."""
    from seqpar.kernels import aten

    monkeypatch.setattr(aten, "CPU_LEAF", 4)
    monkeypatch.setattr(aten, "CPU_MIN_CHUNK", 2)
    case = next(c for c in triton_cases.MASKED_CASES if c[6] == name)
    mask = triton_cases.MASKS[name]
    pieces = split_mask(mask, case[3], case[4], *aten.split_params(mask, torch.device("cpu")))
    assert all(p.q1 - p.q0 <= 4 for p in pieces if p.shape != "full")
    res = triton_cases.masked_case(*case[:7], "float64", case[8], backend="aten")
    _check(res, torch.float64, "aten")
    assert res["unseen_exact"], res


def test_reference_row_chunks(monkeypatch):
    """The reference backend bounds its score memory by computing query rows in chunks: same numbers."""
    mask = triton_cases.MASKS["softcap_docs_strict"]
    want = triton_cases.masked_case(1, 2, 1, 40, 40, 16, mask, "float64", "contiguous", backend="reference")
    monkeypatch.setattr(reference_backend, "CHUNK_BYTES", 2 * 40 * 8 * 3)  # 3 rows per chunk
    got = triton_cases.masked_case(1, 2, 1, 40, 40, 16, mask, "float64", "contiguous", backend="reference")
    _check(got, torch.float64, "reference")
    for name in ("out", "lse", "dq", "dk", "dv"):
        assert got[name]["reference"] <= want[name]["reference"] + 1e-13


# ---------------------------------------------------------------------------------------------- routing

def _spy(impl: KernelBackend, features: frozenset[str], calls: list) -> KernelBackend:
    """``impl`` with other native features, recording each call's mask."""
    def fwd(*a, mask, scale):
        calls.append(("fwd", mask))
        return impl.forward(*a, mask=mask, scale=scale)

    def bwd(*a, mask, scale):
        calls.append(("bwd", mask))
        return impl.backward(*a, mask=mask, scale=scale)

    return KernelBackend(name=impl.name, forward=fwd, backward=bwd, native_masks=impl.native_masks,
                         dtypes=impl.dtypes, native_features=features)


@pytest.fixture
def spy_aten(monkeypatch):
    """get_backend("aten") -> a recording aten whose native_features can be set: (calls, set_features)."""
    import seqpar.kernels as K

    calls: list = []
    real = K.get_backend
    state = {"features": get_backend("aten").native_features}

    def fake(name):
        impl = real(name)
        return _spy(impl, state["features"], calls) if name == "aten" else impl

    monkeypatch.setattr(K, "get_backend", fake)
    return calls, lambda f: state.update(features=frozenset(f))


def _qkv(Sq=24, Sk=24, D=8, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(1, 2, Sq, D, generator=g, dtype=dtype), torch.randn(1, 1, Sk, D, generator=g, dtype=dtype),
            torch.randn(1, 1, Sk, D, generator=g, dtype=dtype))


def test_plain_masks_reach_the_backend_unchanged(spy_aten):
    calls, _ = spy_aten
    q, k, v = _qkv()
    for kind in ("full", "causal"):
        block_attention(q, k, v, mask=kind, scale=0.3, backend="aten")
    assert calls == [("fwd", TileMask("full")), ("fwd", TileMask("causal"))]


def test_softcap_goes_to_reference(spy_aten):
    calls, _ = spy_aten
    q, k, v = _qkv()
    mask = TileMask("causal", lo=-4, softcap=2.0)
    out, lse = block_attention(q, k, v, mask=mask, scale=0.3, backend="aten")
    assert calls == []  # aten never saw it
    ro, rl = reference_backend.forward(q, k, v, mask=mask, scale=0.3)
    assert torch.equal(out, ro) and torch.equal(lse, rl)


def test_missing_band_is_split_not_dropped(spy_aten):
    """A backend without band / docs features gets full / causal pieces of the tile, never the masked tile."""
    calls, set_features = spy_aten
    set_features(())
    q, k, v = _qkv()
    mask = TileMask("strict", lo=-5, docs=(((0, 10, 0), (10, 24, 1)), ((0, 7, 0), (7, 24, 1))))
    out, lse = block_attention(q, k, v, mask=mask, scale=0.3, backend="aten")
    assert calls and all(m.plain and m.kind in ("full", "causal") for _, m in calls)
    ro, rl = reference_backend.forward(q, k, v, mask=mask, scale=0.3)
    assert (out - ro).abs().max() < 1e-12 and torch.equal(torch.isinf(lse), torch.isinf(rl))
    calls.clear()
    do = torch.randn_like(q)
    got = block_attention_backward(do, q, k, v, ro, rl, mask=mask, scale=0.3, backend="aten")
    want = reference_backend.backward(do, q, k, v, ro, rl, mask=mask, scale=0.3)
    assert calls and all(m.plain for _, m in calls)
    assert all((a - b).abs().max() < 1e-12 for a, b in zip(got, want))
    o2, l2 = torch.zeros_like(ro), torch.full_like(rl, -math.inf)
    block_attention_accumulate(q, k, v, o2, l2, mask=mask, scale=0.3, backend="aten")
    assert (o2 - ro).abs().max() < 1e-12


@pytest.mark.parametrize("docs,match", [
    ((((0, 10, 0),), ((0, 24, 0),)), "cover"),
    ((((0, 10, 0), (12, 24, 1)), ((0, 24, 0),)), "in order"),
    ((((0, 24, 0),),), "q_segments, kv_segments"),
    ((((0, 24, "a"),), ((0, 24, 0),)), "ints"),
    ((((0, 24, 0),), [(0, 24, 0)]), "tuple of"),
])
def test_bad_documents_raise(docs, match):
    q, k, v = _qkv()
    with pytest.raises((ValueError, TypeError), match=match):
        block_attention(q, k, v, mask=TileMask("full", docs=docs), scale=0.3, backend="aten")


def test_capabilities_are_declared():
    assert get_backend("reference").native_features == {"band", "docs", "softcap"}
    assert get_backend("aten").native_features == {"band", "docs"}
    with pytest.raises(ValueError, match="native_features"):
        KernelBackend(name="x", forward=None, backward=None, native_masks=frozenset({"full"}),
                      dtypes=frozenset({torch.float32}), native_features=frozenset({"alibi"}))


def test_triton_plain_masks_keep_their_code_path():
    """Plain masks launch the Triton kernels with the kind's constexpr path of old (GENERIC off); masked
    tiles fold the kind into the band."""
    pytest.importorskip("triton")
    from seqpar.kernels import triton_attention as T

    dummy = torch.zeros(1)
    for kind in ("full", "causal", "strict"):
        _, consts = T._mask_args(TileMask(kind), 0.1, dummy)
        assert consts == dict(MASK=T._MASK_CODE[kind], GENERIC=False, BAND=False, DOCS=False, SOFTCAP=False)
    args, consts = T._mask_args(TileMask("strict", lo=-3), 0.1, dummy)
    assert consts == dict(MASK=0, GENERIC=True, BAND=True, DOCS=False, SOFTCAP=False) and args[2:4] == (-3, -1)
    args, consts = T._mask_args(TileMask("full", softcap=2.0), 0.5, dummy)
    assert not consts["BAND"] and consts["SOFTCAP"] and args[2:4] == (-T.UNBOUNDED, T.UNBOUNDED)
