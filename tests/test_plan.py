"""seqpar.plan: the cost model's arithmetic (no processes)."""

import pytest

from seqpar.plan import H100, LLAMA3_8B, Machine, ModelShape, plan

SHAPE = ModelShape(heads=8, kv_heads=2, head_dim=64, layers=1)


def test_step_costs_follow_the_formulas():
    m = Machine(attn_flops=1e12, link_bw=1e9)
    p = plan(SHAPE, 4096, 4, m, dtype_bytes=2, causal=True)
    s = 1024
    assert p.fwd.flops == 4 * 8 * s * s * 64 * 0.5 and p.bwd.flops == 2.5 * p.fwd.flops
    assert p.fwd.bytes == 2 * 2 * s * 64 * 2 and p.bwd.bytes == 2 * 2 * s * 64 * (2 + 4)
    assert p.fwd.compute == pytest.approx(p.fwd.flops / 1e12) and p.fwd.comm == pytest.approx(p.fwd.bytes / 1e9)
    assert p.attn_fwd == pytest.approx(3 * max(p.fwd.compute, p.fwd.comm) + p.fwd.compute)


def test_compute_falls_as_p_squared_bytes_as_p_and_the_crossover():
    m = Machine(attn_flops=1e12, link_bw=1e9)
    a, b = plan(SHAPE, 1 << 16, 4, m), plan(SHAPE, 1 << 16, 8, m)
    assert a.fwd.compute / b.fwd.compute == pytest.approx(4) and a.fwd.bytes / b.fwd.bytes == pytest.approx(2)
    hidden = [plan(SHAPE, 1 << 16, P, m).comm_hidden for P in (2, 4, 8, 16, 32, 64, 128, 256)]
    assert hidden[0] and not hidden[-1] and hidden == sorted(hidden, reverse=True)  # one crossover


def test_one_rank_has_no_communication_and_cpu_overlap_adds():
    m = Machine(attn_flops=1e12, link_bw=1e9)
    assert plan(SHAPE, 4096, 1, m).fwd.comm == 0
    cpu = plan(SHAPE, 4096, 4, Machine(attn_flops=1e12, link_bw=1e9, overlap="none"))
    assert cpu.fwd.time == pytest.approx(cpu.fwd.compute + cpu.fwd.comm) and not cpu.comm_hidden


def test_inter_node_links_slow_the_ring():
    inside, across = plan(LLAMA3_8B, 1 << 20, 8, H100), plan(LLAMA3_8B, 1 << 20, 16, H100)
    assert inside.fwd.comm == pytest.approx(H100.latency + inside.fwd.bytes / 450e9)
    assert across.fwd.comm == pytest.approx(H100.latency + across.fwd.bytes / 50e9)


def test_llama_1m_tokens_projection_is_sane():
    rows = [plan(LLAMA3_8B, 1 << 20, P, H100) for P in (8, 64, 1024)]
    assert rows[0].memory["total"] < 80e9 and rows[0].comm_hidden and not rows[2].comm_hidden
    assert rows[0].step_time / rows[1].step_time == pytest.approx(8, rel=0.05)  # linear while hidden


def test_bad_arguments():
    m = Machine(attn_flops=1e12)
    with pytest.raises(ValueError, match="multiple of ranks"):
        plan(SHAPE, 1000, 3, m)
    with pytest.raises(ValueError, match="method"):
        plan(SHAPE, 1024, 2, m, method="tree")
    for method in ("ulysses", "allgather"):  # seqpar's methods whose cost is not modelled yet: refused
        with pytest.raises(ValueError, match="models method='ring' only"):
            plan(SHAPE, 1024, 2, m, method=method)
