"""method="ulysses" (all-to-all over heads) on P gloo ranks vs torch SDPA on the whole sequence in fp64."""

import pytest
import torch

import parallel_cases as pc
import ulysses_cases as uc
from seqpar.methods.ulysses import UlyssesMethod
from seqpar.testing import numerics
from seqpar.vocab import LAYOUTS

# (Hq, Hkv): MHA, GQA with Hkv >= P (kv heads scattered), MQA (Hkv = 1 < P: kv heads copied P/Hkv times)
HEADS = {"mha": (4, 4), "gqa": (4, 2), "mqa": (4, 1), "gqa8": (8, 4)}


@pytest.mark.parametrize("P", [1, 2, 4])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("heads", ["gqa", "mqa"])
def test_return_lse(worlds, P, layout, heads):
    Hq, Hkv = HEADS[heads]
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        for r in worlds(P).run(uc.lse_error, seed=P, Hq=Hq, Hkv=Hkv, S=8 * P, D=16, layout=layout, causal=True,
                               dtype=dtype):
            assert r["err"] < tol and r["shape"] == r["want_shape"], r
            assert r["dtype"] == str(torch.float64 if dtype == torch.float64 else torch.float32), r


@pytest.mark.parametrize("P", [1, 2, 4])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("heads", ["mha", "mqa"])
def test_all_to_all_count(worlds, P, layout, heads):
    """Forward: 2 all-to-alls (q/k/v fused; out+lse fused back). Backward: 2 (dout; dq/dk/dv fused back:
    the forward's gathered q, k, v, out, lse are kept). One process: none. Never a ring exchange."""
    Hq, Hkv = HEADS[heads]
    for counts in worlds(P).run(uc.count_all_to_all, layout=layout, Hq=Hq, Hkv=Hkv):
        want = dict(fwd=2, bwd=2, p2p=0) if P > 1 else dict(fwd=0, bwd=0, p2p=0)
        assert counts == want, counts


def test_uneven_heads_refused_on_every_rank(worlds):
    """Hq=6 over P=4: ValueError on every rank before any all-to-all, naming Hq, P and the group sizes
    that work; then the world still works."""
    w = worlds(4)
    for kind, msg, calls in w.run(uc.uneven_heads, Hq=6, Hkv=6):
        assert kind == "ValueError" and calls == 0, (kind, msg, calls)
        assert "Hq=6, P=4" in msg and "1, 2, 3 or 6" in msg and "method='ring'" in msg, msg
    for kind, msg, calls in w.run(uc.uneven_heads, Hq=12, Hkv=3):  # Hkv=3 neither divides nor is divided by 4
        assert kind == "ValueError" and calls == 0 and "Hkv=3, P=4" in msg, (kind, msg, calls)
    assert max(w.run(uc.healthy)) < 1e-5


def test_check_messages():
    with pytest.raises(ValueError, match=r"query heads \(Hq\) divisible by the group size P: Hq=6, P=4; use a group "
                                         r"of size 1, 2, 3 or 6, or method='ring'"):
        UlyssesMethod.check(hq=6, hkv=6, s_local=4, world=4, layout="zigzag")
    with pytest.raises(ValueError, match=r"Hkv=2, P=3"):
        UlyssesMethod.check(hq=6, hkv=2, s_local=4, world=3, layout="zigzag")
    for hq, hkv, world in ((4, 1, 4), (4, 2, 4), (8, 4, 2), (6, 3, 3), (5, 5, 1)):
        UlyssesMethod.check(hq=hq, hkv=hkv, s_local=4, world=world, layout="striped")


def test_transport_group_refused():
    msg = uc.transport_refused(0, 1)
    assert msg is not None and "method='ulysses' needs a torch.distributed group" in msg, msg


@pytest.mark.parametrize("P", [1, 2])
def test_record_hook(worlds, P):
    for recs in worlds(P).run(uc.records):
        assert recs == [("forward", 0, True), ("backward", 0, True)], recs


@pytest.mark.parametrize("P,layout", [(2, "zigzag"), (4, "striped")])
def test_checkpoint_replay(worlds, P, layout):
    for r in worlds(P).run(uc.checkpoint_replay, layout=layout):
        assert r["diff"] == 0.0 and r["fwd_calls"] == 0, r


@pytest.mark.parametrize("layout,causal,hkv", [("zigzag", True, 2), ("striped", False, 4), ("contiguous", True, 1)])
def test_compiled_aot_eager_is_bitwise_eager(worlds, layout, causal, hkv):
    for r in worlds(2).run(uc.compiled_function, layout=layout, causal=causal, hkv=hkv, timeout=300):
        assert r["breaks"] == 0 and r["eager_diff"] == 0.0, r
        assert not numerics.violations(r["errors"], torch.float32), r


@pytest.mark.parametrize("kind", ["llama", "gpt"])
@pytest.mark.parametrize("layout,ckpt", [("zigzag", False), ("striped", True)])
def test_parallelize(worlds, kind, layout, ckpt):
    """parallelize(model, cp=4, method="ulysses", fsdp=False): the single-process loss, gradients and
    parameters (4 q heads, 2 kv heads: each kv head sent twice over 4 ranks)."""
    for res in worlds(4).run(pc.equivalence, kind=kind, dp=1, cp=4, layout=layout, fsdp=False,
                             checkpoint=ckpt, method="ulysses"):
        assert res["loss"] <= 1e-5 and res["grad"] <= 1e-4 and res["param"] <= 1e-4, res
