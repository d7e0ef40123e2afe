"""The whole ring on P thread-ranks in one process (seqpar.comm.threads) vs torch SDPA on the whole sequence.

Process-free, so the grid is wide and fast: every P in 1..4, every layout, causal or not, MHA / GQA /
MQA, fp32 / fp64 / bf16, aten and reference backends; the Triton backend under the interpreter (CPU,
tiny shapes, via tests/triton_interpret.py) and compiled with P = 4 and 8 in bf16 (CUDA only).
"""

from __future__ import annotations

import importlib.util
import itertools
import threading
import time

import pytest
import torch

import threaded_cases
from seqpar.comm import TAG_DKV, TAG_KV
from seqpar.comm.threads import RingAborted, ThreadWorld, run_threads
from seqpar.masks import MaskSpec
from seqpar.testing.numerics import assert_within_bound as assert_ok
from seqpar.vocab import LAYOUTS

HEADS = {"mha": (4, 4), "gqa": (4, 2), "mqa": (4, 1)}
HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None


# ---------------------------------------------------------------------------------------------- the transport

def test_exchange_rotates_and_keeps_tags_apart():
    """Every rank receives rank-1's block; tags are separate streams; handles may be waited out of
    order; recv=None allocates; a given recv buffer is filled in place."""

    def main(ring):
        me = torch.full((3,), float(ring.rank))
        h1 = ring.exchange(me, tag=TAG_KV)
        h2 = ring.exchange(me * 10, torch.empty(3), tag=TAG_DKV)
        h3 = ring.exchange(me + 100, tag=TAG_KV)  # a second message of the same tag
        me.fill_(-1)  # the send buffer may change after posting: messages are snapshots
        return h3.wait()[0].item(), h2.wait()[0].item(), h1.wait()[0].item()

    for P in (1, 2, 5):
        got = run_threads(main, P, timeout=30)
        for r, (a, b, c) in enumerate(got):
            prev = (r - 1) % P
            assert (a, b, c) == (prev + 100, prev * 10, prev)


def test_first_error_is_raised_and_others_abort():
    def main(ring):
        if ring.rank == 1:
            raise ValueError("boom on rank 1")
        ring.exchange(torch.zeros(2)).wait()  # rank 2 waits for rank 1, which never sends
        return ring.rank

    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="rank 1 failed: ValueError: boom on rank 1"):
        run_threads(main, 3, timeout=60)
    assert time.monotonic() - t0 < 10  # aborted, not timed out


def test_hang_times_out():
    def main(ring):
        if ring.rank == 0:
            return 0
        return ring.exchange(torch.zeros(1), tag=99).wait()  # rank 1 waits on rank 0, which never posts

    world = ThreadWorld(2, timeout=0.5)
    with pytest.raises(RingAborted, match="no message"):
        world.rings()[1].exchange(torch.zeros(1), tag=5).wait()
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="no message for tag 99"):
        run_threads(main, 2, timeout=1.0)
    assert time.monotonic() - t0 < 10
    assert not [t for t in threading.enumerate() if t.name.startswith("seqpar-rank")]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("P", [1, 2, 4])
def test_exchange_count(P, layout):
    """Forward: P-1 K/V exchanges. Backward: P-1 K/V and P-1 dK/dV exchanges (as on gloo); one rank: none."""
    from seqpar.layout import shard_tensor
    from seqpar.methods import MethodFunction, RingMethod

    def main(ring):
        calls = []
        real = ring.exchange

        def counting(send, recv=None, *, tag=TAG_KV, hops=1):
            calls.append(tag)
            return real(send, recv, tag=tag, hops=hops)

        ring.exchange = counting
        x = torch.randn(1, 2, 8 * P, 8, generator=torch.Generator().manual_seed(0))
        q, k, v = (shard_tensor(x, 2, ring.rank, P, layout).clone().requires_grad_() for _ in range(3))
        out, _ = MethodFunction.apply(q, k, v, RingMethod(ring, layout=layout, mask=MaskSpec(causal=True), scale=0.3,
                                                          backend="aten"))
        fwd = list(calls)
        calls.clear()
        out.sum().backward()
        return fwd, list(calls)

    for fwd, bwd in run_threads(main, P, timeout=60):
        assert fwd == [TAG_KV] * (P - 1)
        assert sorted(bwd) == sorted([TAG_KV] * (P - 1) + [TAG_DKV] * (P - 1))


# ---------------------------------------------------------------------------------------------- ring vs SDPA (CPU)

GRID = list(itertools.product([1, 2, 3, 4], LAYOUTS, [False, True], HEADS))


@pytest.mark.parametrize("P,layout,causal,heads", GRID)
def test_ring_fp32(P, layout, causal, heads):
    Hq, Hkv = HEADS[heads]
    res = threaded_cases.ring_equivalence(P, seed=P * 10 + len(layout), B=2, Hq=Hq, Hkv=Hkv, S=8 * P, D=32, layout=layout,
                             causal=causal, dtype=torch.float32, backend="aten", transposed=heads == "gqa")
    assert_ok(res, torch.float32)


@pytest.mark.parametrize("backend", ["aten", "reference"])
@pytest.mark.parametrize("P,layout", [(2, "zigzag"), (3, "contiguous"), (4, "striped"), (4, "zigzag")])
def test_ring_fp64_exact(P, layout, backend):
    res = threaded_cases.ring_equivalence(P, seed=7, B=1, Hq=4, Hkv=2, S=12 * P, D=24, layout=layout, causal=True,
                             dtype=torch.float64, backend=backend)
    for name, e in res.items():
        assert e["seqpar"] < 1e-12 * max(1.0, e["scale"]), (name, e)


@pytest.mark.parametrize("P,layout,D", [(2, "zigzag", 40), (3, "striped", 80), (4, "contiguous", 40)])
def test_ring_odd_head_dims(P, layout, D):
    res = threaded_cases.ring_equivalence(P, seed=D, B=1, Hq=6, Hkv=2, S=12 * P, D=D, layout=layout, causal=True,
                             dtype=torch.float32, backend="aten", transposed=True)
    assert_ok(res, torch.float32)


@pytest.mark.parametrize("P,layout", [(2, "zigzag"), (4, "striped"), (3, "contiguous"), (4, "zigzag")])
def test_ring_bf16(P, layout):
    res = threaded_cases.ring_equivalence(P, seed=11, B=1, Hq=4, Hkv=1, S=32 * P, D=64, layout=layout, causal=True,
                             dtype=torch.bfloat16, backend="aten", transposed=True)
    assert_ok(res, torch.bfloat16)


# ---------------------------------------------------------------------------------------------- triton backend

@pytest.fixture(scope="module")
def interp():
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    from triton_interpret import interpret_results

    return interpret_results()


def _ring_cases():
    import triton_cases

    return triton_cases.RING_CASES, triton_cases.case_id


@pytest.mark.parametrize("case", _ring_cases()[0], ids=_ring_cases()[1])
def test_ring_triton_interpret(interp, case):
    """The ring with backend="triton" (kernels under TRITON_INTERPRET=1, in a subprocess)."""
    res = interp["ring"][_ring_cases()[1](case)]
    assert "error" not in res, res["error"]
    assert_ok(res, getattr(torch, case[7]))


@pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs CUDA and triton")
@pytest.mark.parametrize("P", [4, 8])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_ring_triton_cuda_bf16(P, layout):
    res = threaded_cases.ring_equivalence(P, seed=P, B=1, Hq=8, Hkv=2, S=256 * P, D=128, layout=layout, causal=True,
                             dtype=torch.bfloat16, backend="triton", device="cuda", mode="direct")
    assert_ok(res, torch.bfloat16)


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("layout", LAYOUTS)
def test_ring_aten_cuda_bf16(layout):
    res = threaded_cases.ring_equivalence(4, seed=3, B=1, Hq=8, Hkv=1, S=1024, D=64, layout=layout, causal=True,
                             dtype=torch.bfloat16, backend="aten", device="cuda", mode="direct")
    assert_ok(res, torch.bfloat16)
