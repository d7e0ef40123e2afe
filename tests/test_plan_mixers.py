"""seqpar.plan_mixers: the sequence mixers' cost and memory model by hand arithmetic on a toy shape, its scaling
in S and P, mixers="auto"'s choice on shapes (no timings), the shapes read from transformers' mixer modules,
the pass's per-call choice, and the CLI rows."""

from __future__ import annotations

import types

import pytest
import torch

from seqpar.plan import H100, Machine
from seqpar.plan_mixers import (BWD_FLOPS, HYBRIDS, MixerShape, choose_mixer, compare_mixers, mixer_cost,
                                mixer_shape)

# 2 value heads / 1 key head of dk = dv = 4, hidden 8, conv kernel 4, chunks of 4
GDN = MixerShape("gated_delta", 8, heads=2, head_k_dim=4, head_v_dim=4, k_heads=1, conv_kernel=4, chunk=4)
BOX = Machine(attn_flops=1e9, link_bw=1e6, latency=1e-3, overlap="none")  # F = attn_flops (no linear / mixer rate)


def test_gated_delta_flops_by_hand():
    # conv over 2 * 4 (q, k) + 8 (v) = 16 channels; projections 16 + z 8 + b, a 2 x 2 = 28 out, 8 back
    assert (GDN.conv_dim, GDN.proj_in, GDN.inner) == (16, 28, 8)
    assert GDN.proj_flops() == 2 * 8 * (28 + 8) and GDN.conv_flops() == 2 * 4 * 16
    per_head = 4 * 4 * 4 + 4 * 8 + 2 * 4 * 4 + 6 * 16  # K K^T + Q K^T, two solves, A D, W S / Q S / K^T D = 224
    assert GDN.core_flops() == 2 * per_head
    assert GDN.core_flops("state") == 2 * (per_head + 6 * 16 + 2 * 4 * 4 + 2 * 16)  # + M's rows, the entry term
    assert GDN.summary_floats() == 2 * 4 * 8 and GDN.apply_flops() == 2 * 2 * 4 * 4 * 4


def test_gather_and_state_times_by_hand():
    S, P = 64, 4  # s = 16 tokens per rank, fp32
    g = mixer_cost(GDN, S, P, BOX, method="gather", dtype_bytes=4)
    block = 16 * 8 * 4  # this rank's layer input: 512 bytes
    gather = 1e-3 + 3 * block / 1e6  # one launch, 3 blocks through each rank
    assert g.fwd.time == pytest.approx(64 * GDN.flops() / 1e9 + gather, rel=1e-12)
    assert g.bwd.time == pytest.approx(BWD_FLOPS * 64 * GDN.flops() / 1e9 + gather, rel=1e-12)
    s = mixer_cost(GDN, S, P, BOX, method="state", dtype_bytes=4, layout="zigzag")
    halo = 2 * 3 * 16 * 4  # 2 runs x (kernel - 1) rows x 16 channels, fp32: 384 bytes
    summ = 2 * 64 * 4  # 2 runs x (M, b) = 2 x 4 x (4 + 4) floats: 512 bytes
    scan = 7 * GDN.apply_flops()  # 2P - 1 = 7 runs applied in order
    comm = 2 * 1e-3 + 3 * (halo + summ) / 1e6
    assert s.fwd.time == pytest.approx((16 * GDN.flops("state") + scan) / 1e9 + comm, rel=1e-12)
    assert s.bwd.time == pytest.approx(BWD_FLOPS * (16 * GDN.flops("state") + scan) / 1e9 + comm, rel=1e-12)
    c = mixer_cost(GDN, S, P, BOX, method="state", dtype_bytes=4, layout="contiguous")  # 1 run each, 4 in all
    assert c.fwd.comm == pytest.approx(2 * 1e-3 + 3 * (halo + summ) / 2 / 1e6, rel=1e-12)
    one = mixer_cost(GDN, 16, 1, BOX, method="state", dtype_bytes=4)
    assert one.fwd.comm == one.bwd.comm == 0.0


def test_state_bytes_do_not_grow_with_s_gather_activations_do():
    rows = {S: {m: mixer_cost(GDN, S, 2, H100, method=m, dtype_bytes=2) for m in ("state", "gather", "ulysses")}
            for S in (4096, 65536)}
    small, big = rows[4096], rows[65536]
    assert small["state"].bytes == big["state"].bytes  # halos + summaries: independent of S
    assert big["gather"].bytes == pytest.approx(16 * small["gather"].bytes)
    assert big["ulysses"].bytes == pytest.approx(16 * small["ulysses"].bytes)
    # activations per rank: gather holds the whole sequence's, state and ulysses this rank's tokens'
    for S, r in rows.items():
        assert r["gather"].memory["activations"] == pytest.approx(S * GDN.saved_bytes(2))
        assert r["state"].memory["activations"] == pytest.approx(S // 2 * GDN.saved_bytes(2, "state"))
        assert r["ulysses"].memory["activations"] == pytest.approx(S // 2 * GDN.saved_bytes(2))
    assert GDN.saved_bytes(2, "state") > GDN.saved_bytes(2)  # q^T P and the per-chunk M


def test_ulysses_and_state_applicability():
    c = compare_mixers(GDN, 64, 4, BOX)  # 2 heads on 4 ranks: no Ulysses
    assert "ulysses" in c.not_applicable and "divisible" in c.not_applicable["ulysses"]
    c = compare_mixers(GDN, 64, 2, BOX)
    assert not c.costs["ulysses"].implemented and c.best in ("state", "gather")
    with pytest.raises(ValueError, match="own run"):
        mixer_cost(GDN, 64, 4, BOX, method="state", layout="striped")
    with pytest.raises(ValueError, match="multiple"):
        mixer_cost(GDN, 66, 4, BOX, method="gather")


def test_auto_choice_on_shapes():
    big = HYBRIDS["qwen3.5"].mixers[0]
    for machine, device in ((None, "cuda"), (None, "cpu")):
        choice = {s: choose_mixer(big, s, 8, layout="zigzag", machine=machine, device=device, dtype_bytes=2)
                  for s in (1, 2, 4, 64, 1024, 16384)}
        assert choice[16384] == choice[1024] == "state", choice
    # H100: the 8 MB of summaries per rank cost more than a few gathered tokens' compute
    assert choose_mixer(big, 4, 8, layout="zigzag", device="cuda", dtype_bytes=2) == "gather"
    # one threshold: gather below, state above (the model is monotone in s)
    seq = [choose_mixer(GDN, s, 4, layout="zigzag", device="cpu") for s in (1, 2, 4, 8, 16, 32, 64, 128, 1024)]
    assert seq[0] == "gather" and seq[-1] == "state" and seq == sorted(seq), seq  # "gather" < "state"
    assert choose_mixer(big, 16384, 8, layout="striped") == "gather"
    assert choose_mixer(big, 16384, 1, layout="zigzag") == "gather"  # one rank: the module itself
    # a short conv has no summary: state (halo only) wins at every length on 4 CPU ranks
    conv = HYBRIDS["lfm2-1.2b"].mixers[0]
    assert all(choose_mixer(conv, s, 4, layout="zigzag") == "state" for s in (1, 16, 4096))


def test_cost_ranking_matches_the_rule():
    # 8 H100s, 16K tokens per rank: state ~8x faster than gather per gated DeltaNet layer and ~7x less memory
    mx = HYBRIDS["qwen3-next"].mixers[0]
    c = compare_mixers(mx, 131072, 8, H100)
    assert c.best == "state"
    assert 6 < c.costs["gather"].time / c.costs["state"].time < 9
    assert c.costs["gather"].memory["activations"] / c.costs["state"].memory["activations"] > 6


def _tiny(model_type: str, class_name: str):
    import transformers

    from seqpar.testing import zoo

    cfg = zoo.tiny_config(model_type, getattr(transformers, class_name))
    torch.manual_seed(0)
    return getattr(transformers, class_name)(cfg)


@pytest.mark.parametrize("model_type,class_name,kind", [("qwen3_5", "Qwen3_5ForCausalLM", "gated_delta"),
                                                         ("mamba2", "Mamba2ForCausalLM", "mamba2"),
                                                         ("lfm2", "Lfm2ForCausalLM", "short_conv")])
def test_mixer_shape_from_modules(model_type, class_name, kind):
    pytest.importorskip("transformers")
    model = _tiny(model_type, class_name)
    shapes = [(m, mixer_shape(m)) for m in model.modules()]
    found = [(m, s) for m, s in shapes if s is not None]
    assert found and all(s.kind == kind for _, s in found), [(type(m).__name__, s) for m, s in found]
    m, s = found[0]
    if kind == "gated_delta":
        assert (s.heads, s.k_heads, s.head_k_dim, s.head_v_dim) == (m.num_v_heads, m.num_k_heads, m.head_k_dim,
                                                                    m.head_v_dim)
        assert s.conv_dim == m.conv1d.in_channels
    elif kind == "mamba2":
        assert (s.heads, s.head_v_dim, s.head_k_dim, s.k_heads) == (m.num_heads, m.head_dim, m.ssm_state_size,
                                                                    m.n_groups)
        assert s.conv_dim == m.conv1d.in_channels and s.proj_in == m.in_proj.out_features
    else:
        assert s.conv_dim == m.conv.in_channels and s.proj_in == m.in_proj.out_features


def test_pass_chooses_per_call_shape():
    """The pass's auto path for a proven adapter: by the cost model at each call's (B, S_local), remembered."""
    from seqpar.passes.sequence_mixers import MixerPlan, _auto_path

    plan = MixerPlan("layers.0.linear_attn", torch.nn.Identity(), "state", shape=GDN)
    rt = types.SimpleNamespace(group=None, world=4, layout="zigzag")
    short, long = torch.zeros(1, 2, 8), torch.zeros(1, 4096, 8)
    want = {n: choose_mixer(GDN, n, 4, layout="zigzag", device="cpu", dtype_bytes=4) for n in (2, 4096)}
    assert want == {2: "gather", 4096: "state"}
    assert _auto_path(plan, rt, (short,), {}) == "gather"
    assert _auto_path(plan, rt, (), {"hidden_states": long}) == "state"
    assert len(plan.choices) == 2
    plan.shape = None  # a kind the model does not cover: the proven adapter
    assert _auto_path(plan, rt, (short,), {}) == "state"


def test_cli_prints_the_mixer_rows(capsys):
    from seqpar.plan_memory import main

    main(["--hybrid", "qwen3.5", "--seq", "131072", "--gpus", "8"])
    out = capsys.readouterr().out
    assert "24 x gated_delta" in out and "<- chosen" in out and "modelled, not implemented" in out
    assert "8 x attention" in out
