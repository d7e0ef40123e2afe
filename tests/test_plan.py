"""seqpar.plan: the cost model's arithmetic (no processes)."""

import pytest

from seqpar.plan import H100, LLAMA3_8B, Machine, ModelShape, compare, plan

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
    with pytest.raises(ValueError, match="cannot run this shape.*Hq=8, P=3"):
        plan(SHAPE, 1026, 3, m, method="ulysses")
    with pytest.raises(ValueError, match="hybrid needs a mesh with a Ulysses degree"):
        plan(SHAPE, 1024, 4, m, method="hybrid")


# ------------------------------------------------------------------ every method (ulysses, allgather, hybrid)

B_, E = 1, 2


def test_ulysses_moves_the_heads_once_and_computes_the_whole_sequence():
    m = Machine(attn_flops=1e12, link_bw=1e9)
    S, P = 4096, 4
    s, (Hq, Hkv, D) = S // P, (8, 2, 64)
    u, r = plan(SHAPE, S, P, m, method="ulysses"), plan(SHAPE, S, P, m)
    # forward: q/k/v in (Hkv=2 < P=4: each kv head sent P/Hkv times -> P kv heads), out+lse back in fp32
    assert (SHAPE.heads, SHAPE.kv_heads, SHAPE.head_dim) == (Hq, Hkv, D) and Hkv * (P // Hkv) == P
    assert u.fwd.bytes == B_ * (Hq + 2 * P) * s * D * E + B_ * Hq * s * (D + 1) * 4
    assert u.fwd.flops == 4 * (Hq // P) * S * S * D * 0.5 == P * r.fwd.flops  # the ring's P tiles, on H/P heads
    assert not u.fwd.hidden and u.attn_fwd == pytest.approx(u.fwd.compute + u.fwd.comm)  # nothing overlaps
    # (P-1)/P of the bytes leave a rank: two all-to-alls, however many ranks
    assert u.fwd.comm == pytest.approx((B_ * (Hq + 2 * P) * s * D * E + B_ * Hq * s * (D + 1) * 4) * 3 / 4 / 1e9)
    # per-rank bytes fall with P (no P steps), where the ring's bytes per layer, (P-1) blocks of S/P, do not
    u8, r8 = plan(SHAPE, S, 8, m, method="ulysses"), plan(SHAPE, S, 8, m)
    assert u8.fwd.bytes < 0.8 * u.fwd.bytes and 7 * r8.fwd.bytes > 3 * r.fwd.bytes


def test_allgather_memory_is_o_s_and_its_collectives_do_not_overlap():
    m = Machine(attn_flops=1e12, link_bw=1e9)
    S = 1 << 14
    ag = {P: plan(SHAPE, S, P, m, method="allgather") for P in (2, 4, 8)}
    ring = {P: plan(SHAPE, S, P, m) for P in (2, 4, 8)}
    gathered = 2 * 2 * S * 64 * (E + 4)  # the whole sequence's K/V and its fp32 dK/dV, whatever P
    for P in (2, 4, 8):
        assert ag[P].memory["attention_working"] > gathered  # O(S)
        assert ag[P].fwd.flops == P * ring[P].fwd.flops and not ag[P].comm_hidden
        assert ag[P].attn_fwd == pytest.approx(ag[P].fwd.compute + ag[P].fwd.comm)
    assert ring[8].memory["attention_working"] < ring[2].memory["attention_working"] / 3  # O(S/P)
    ratio = [ag[P].memory["attention_working"] / ring[P].memory["attention_working"] for P in (2, 4, 8)]
    # (a ring of > 2 ranks holds a spare K/V block and two dK/dV buffers in flight: the ratio grows from P = 4)
    assert ratio == sorted(ratio) and ratio[-1] > 1.5 * ratio[0]


def test_hybrid_super_steps_and_where_it_beats_the_ring():
    m = Machine(attn_flops=1e12, link_bw=100e9, inter_node_bw=1e9, ranks_per_node=4)
    S, P, U = 1 << 15, 16, 4
    sh4 = ModelShape(heads=8, kv_heads=4, head_dim=64)
    h, r = plan(sh4, S, P, m, method="hybrid", ulysses=U), plan(sh4, S, P, m)
    assert h.fwd.flops == U * r.fwd.flops and h.fwd.bytes == r.fwd.bytes  # U x the compute, the same K/V bytes
    # Hkv=2 < U=4: each kv head travels U/Hkv = 2 times (one head of U s tokens per super-block)
    assert plan(SHAPE, S, P, m, method="hybrid", ulysses=U).fwd.bytes == 2 * plan(SHAPE, S, P, m).fwd.bytes
    assert h.ulysses == U and (P // U - 1) * h.fwd.flops + h.fwd.flops == P * r.fwd.flops  # R steps, same FLOPs
    # the doc's claim: at large P on slow inter-node links the ring's steps are exposed, hybrid's are not
    big = [(plan(LLAMA3_8B, 1 << 20, P, H100), plan(LLAMA3_8B, 1 << 20, P, H100, method="hybrid", ulysses=8))
           for P in (16, 64, 256, 1024)]
    for ring, hyb in big[:2]:  # ring hidden: hybrid pays only its all-to-alls (< 1%)
        assert ring.comm_hidden and hyb.attn_time == pytest.approx(ring.attn_time, rel=0.01)
    for ring, hyb in big[2:]:
        assert not ring.comm_hidden and hyb.comm_hidden and hyb.attn_time < ring.attn_time
    assert big[-1][0].attn_time / big[-1][1].attn_time > 3
    # without overlap (CPU ranks), hybrid lies between the ring (P exposed steps on the slow link) and
    # ulysses (no ring at all): R exposed super-steps plus the intra-node all-to-alls
    sh16 = ModelShape(heads=16, kv_heads=16, head_dim=64)
    m_cpu = Machine(attn_flops=1e12, link_bw=100e9, inter_node_bw=1e9, ranks_per_node=4, overlap="none")
    rc, hc, uc = (plan(sh16, S, P, m_cpu, method=x, ulysses=U).attn_time for x in ("ring", "hybrid", "ulysses"))
    assert uc < hc < rc, (rc, hc, uc)


def test_auto_explains_the_choice_and_what_cannot_run():
    m = Machine(attn_flops=1e12, link_bw=1e9)
    shape = ModelShape(heads=6, kv_heads=6, head_dim=64)
    p = plan(shape, 4096, 4, m, method="auto")
    c = p.choice
    assert p.method == c.best and set(c.plans) == {"ring", "allgather"} and p.method in c.plans
    assert "Hq=6, P=4" in c.not_applicable["ulysses"] and "init_mesh(cp, ulysses=U)" in c.not_applicable["hybrid"]
    text = p.explain()
    assert "<- chosen" in text and "not applicable" in text and p.method in text
    assert p.attn_time <= min(x.attn_time for x in c.plans.values()) * 1.05  # within the model's resolution
    # with a Ulysses degree hybrid is ranked too; with too little memory a method is listed, not chosen
    c2 = compare(SHAPE, 1 << 14, 8, Machine(attn_flops=1e12, link_bw=1e9, memory=7.5e7), ulysses=2)
    assert "hybrid" in c2.plans and "GB per rank" in c2.not_applicable["allgather"]


def test_auto_on_an_inter_node_slow_machine_picks_hybrid_at_large_p():
    picks = {P: plan(LLAMA3_8B, 1 << 20, P, H100, method="auto", ulysses=8).method for P in (16, 256, 1024)}
    assert picks[256] == picks[1024] == "hybrid" and picks[16] == "ring"
