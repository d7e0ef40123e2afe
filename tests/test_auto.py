"""method="auto": one method per shape and group, the same on every rank, never one that cannot run the
shapes; equal to fp64 SDPA; a user-given machine picks what seqpar.plan says; parallelize and
torch.compile pass it through; unknown method names still fail on every rank before communication."""

import pytest
import torch

import auto_cases as ac
import parallel_cases as pc
from seqpar import methods
from seqpar.plan import Machine
from seqpar.testing import numerics
from seqpar.vocab import METHODS


@pytest.mark.parametrize("P", [2, 4])
@pytest.mark.parametrize("Hq,Hkv,layout,causal", [(4, 2, "zigzag", True), (6, 6, "striped", False),
                                                  (4, 1, "contiguous", True)])
def test_same_method_on_every_rank_applicable_and_exact(worlds, P, Hq, Hkv, layout, causal):
    w = worlds(P)
    w.run(ac.forget)
    res = w.run(ac.equivalence, Hq=Hq, Hkv=Hkv, layout=layout, causal=causal)
    chosen = {r["method"] for r in res}
    assert len(chosen) == 1, res  # every rank resolved the same method
    method = chosen.pop()
    assert method in METHODS and method != "hybrid"  # no hybrid mesh here
    methods.check(method, hq=Hq, hkv=Hkv, s_local=8, world=P, layout=layout)  # never an inapplicable one
    if Hq % P:
        assert method != "ulysses"  # e.g. Hq=6 on 4 ranks
    assert all(r["machine"] == res[0]["machine"] for r in res)  # the probe's numbers: one machine everywhere
    for r in res:
        assert r["calls"] == 1, r  # the probe numbers no attention call
        numerics.assert_within_bound(r["errors"], torch.float32)


# machines that make one method clearly the fastest in the cost model (and the CPU world runs it)
MACHINES = {
    "fast_all_to_all": Machine(attn_flops=1e10, link_bw=1e6, all_to_all_bw=1e12, overlap="none"),
    "fast_ring": Machine(attn_flops=1e10, link_bw=1e12, all_to_all_bw=1e3, latency=1e-6),
    "high_latency": Machine(attn_flops=1e10, link_bw=1e12, latency=1.0, overlap="none"),
}


@pytest.mark.parametrize("P", [2, 4])
@pytest.mark.parametrize("machine", sorted(MACHINES))
def test_user_machine_picks_what_plan_says(worlds, P, machine):
    res = worlds(P).run(ac.user_machine, machine=MACHINES[machine], Hq=4, Hkv=2)
    for r in res:
        assert r["ran"] == r["want"] == res[0]["ran"] and r["probes"] == 0, r
        assert r["err"] < 1e-5, r
    # high latency: the ring pays P-1 + P latencies, allgather 3, ulysses 5 (at P=2 ring and allgather tie)
    want = {"fast_all_to_all": {"ulysses"}, "fast_ring": {"ring"},
            "high_latency": {"allgather"} if P == 4 else {"ring", "allgather"}}
    assert res[0]["ran"] in want[machine], res[0]["table"]


def test_inapplicable_heads_are_never_chosen_even_when_fastest(worlds):
    """Hq=6 on 4 ranks with a machine on which ulysses would win: not ulysses."""
    res = worlds(4).run(ac.user_machine, machine=MACHINES["fast_all_to_all"], Hq=6, Hkv=6)
    assert {r["ran"] for r in res} == {res[0]["ran"]} and res[0]["ran"] != "ulysses", res[0]
    assert "Hq=6, P=4" in res[0]["table"] and "not applicable" in res[0]["table"]


@pytest.mark.parametrize("name", ["Auto", "fastest", ""])
def test_unknown_method_names_raise_on_every_rank_before_communication(worlds, name):
    for kind, msg, calls in worlds(2).run(ac.bad_method, method=name):
        assert kind == "ValueError" and "method must be one of" in msg and "'auto'" in msg and calls == 0, msg


@pytest.mark.parametrize("kind,ckpt", [("gpt", True), ("llama", False)])
def test_parallelize_passes_auto_through(worlds, kind, ckpt):
    w = worlds(4)
    w.run(ac.forget)
    for res in w.run(pc.equivalence, kind=kind, dp=1, cp=4, layout="zigzag", fsdp=False, checkpoint=ckpt,
                     method="auto"):
        assert res["loss"] <= 1e-5 and res["grad"] <= 1e-4 and res["param"] <= 1e-4, res


def test_parallelize_checks_method_names(worlds):
    w = worlds(2)
    assert w.run(ac.parallelize_method, method="auto") == [None, None]
    for kind, msg in w.run(ac.parallelize_method, method="fastest"):
        assert kind == "ValueError" and "method must be one of" in msg and "'auto'" in msg, msg


def test_compiled_auto(worlds):
    for r in worlds(2).run(ac.compiled, timeout=300):
        assert r["refused"] is not None and "seqpar.set_machine" in r["refused"][1], r
        assert r["breaks"] == 0 and r["eager_diff"] == 0.0 and r["method"] == "ulysses", r


def test_hybrid_only_on_a_mesh_with_a_ulysses_degree(worlds):
    """Slow links across 'nodes' of 2 ranks: on init_mesh(cp=4, ulysses=2) auto picks hybrid (what plan
    says with U=2); with the same machine on a plain cp mesh it cannot, and picks another method."""
    slow = Machine(attn_flops=1e8, link_bw=1e12, inter_node_bw=1e5, ranks_per_node=2, latency=1e-3)
    res = worlds(4).run(ac.hybrid_mesh, machine=slow, Hq=8, Hkv=2)  # Hq=8: ulysses moves more across nodes
    for r in res:
        assert r == res[0], res
        assert r["want"] == r["hybrid_mesh"] == "hybrid" and r["plain_mesh"] != "hybrid", r
        assert r["hybrid_mesh_err"] < 1e-5 and r["plain_mesh_err"] < 1e-5, r
