"""seqpar.plan_memory: the memory model's arithmetic, its monotonicity, the CLI, and auto's memory rule
(no processes except the CLI's)."""

import re
import subprocess
import sys

import pytest

from seqpar.plan import Machine, ModelShape, compare, plan
from seqpar.plan_memory import (MODELS, block_saved_bytes, from_hf_config, max_seq_len, memory_plan,
                                model_shape)

TINY = ModelShape(heads=4, kv_heads=2, head_dim=16, layers=2, hidden=64, intermediate=128, vocab=256)


def test_tiny_shape_by_hand():
    # one block, per token, fp32 (written out here, independently of the module):
    #   residual x, x + attn: 2*4*64 = 512;  two norms: 2*(normed 4*64 + output 4*64 + rsqrt 4) = 1032
    #   rotated q (64) + rotated k (32) + v (32), fp32: 512;  out 4*64 + lse 4*4 = 272;  MLP 4*4*128 = 2048
    assert block_saved_bytes(TINY, 4, mlp_tiled=False) == 512 + 1032 + 512 + 272 + 2048 == 4376
    assert block_saved_bytes(TINY, 4, mlp_tiled=True) == 4376 - 2048
    # bf16: the norms also keep their fp32 upcast: 2*(4*64 + 2*64 + 2*64 + 4) = 1032
    assert block_saved_bytes(TINY, 2, mlp_tiled=False) == 256 + 1032 + 256 + (128 + 16) + 1024
    # parameters: q/k/v 64*(64+32+32), o 64*64, gate/up/down 3*64*128, norms 2*64; embedding + head 2*256*64
    assert TINY.block_param_count() == 8192 + 4096 + 24576 + 128
    assert TINY.param_count() == 2 * 36992 + 2 * 256 * 64 + 64 == 106816
    S = 1024
    p = memory_plan(TINY, S, checkpoint="none", loss="full", mlp="full", precision="fp32", fsdp=False)
    assert p.items["params"] == 4 * 106816 and p.items["optimizer"] == 8 * 106816
    # saved: 2 blocks + ids/labels/positions (3 int64) + cos/sin (2*4*16) + the final norm's input and set
    assert p.items["activations (saved)"] == S * (2 * 4376 + 24 + 128 + (256 + 512 + 4))
    # full loss: the backward holds log_softmax's output, the nll gradient and its own (fp32), + d(hidden)
    # (no FSDP: nothing unsharded; gradients exist only at the optimizer step)
    acts = S * (2 * 4376 + 24 + 128 + (256 + 512 + 4))
    assert p.phases["loss"] == 12 * 106816 + acts + S * 256 * 12 + S * 4 * 64
    assert p.phases["optimizer step"] == 16 * 106816 + 4 * 106816  # + AdamW's foreach temporaries
    assert p.total == max(p.phases.values()) == pytest.approx(sum(p.items.values()))
    # FSDP over 4 ranks: the shards are a quarter; cp=4 also quarters the tokens
    q = memory_plan(TINY, S, cp=4, checkpoint="none", loss="full", mlp="full", precision="fp32")
    assert q.items["params"] == 106816 and q.tokens == S // 4


def test_presets_and_hf_config():
    assert set(MODELS or {}) <= {"llama-3.1-8b", "llama-3-8b", "qwen3-8b", "llama-3-70b", "tiny"}
    llama = model_shape("llama-3.1-8b")
    assert llama.param_count() == pytest.approx(8.03e9, rel=0.01)
    assert model_shape("llama-3-70b").param_count() == pytest.approx(70.6e9, rel=0.01)
    assert model_shape("qwen3-8b").param_count() == pytest.approx(8.19e9, rel=0.01)
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=256, tie_word_embeddings=False)
    assert from_hf_config(cfg) == TINY


def test_monotonic_in_cp_loss_mlp_checkpoint_offload():
    m = model_shape("llama-3.1-8b")
    S = 1 << 18
    acts = [memory_plan(m, S, cp=cp, checkpoint="none").items["activations (saved)"] for cp in (1, 2, 4, 8)]
    assert acts == sorted(acts, reverse=True) and acts[0] / acts[-1] == pytest.approx(8, rel=0.01)
    full = memory_plan(m, S, cp=8, loss="full", mlp="full", checkpoint="none")
    assert memory_plan(m, S, cp=8, loss="chunked", mlp="full", checkpoint="none").total < full.total
    assert memory_plan(m, S, cp=8, loss="full", mlp="tiled", checkpoint="none").total < full.total
    ck = memory_plan(m, S, cp=8, checkpoint="full")
    assert ck.total < memory_plan(m, S, cp=8, checkpoint="none").total
    off = memory_plan(m, S, cp=8, checkpoint="full", offload="cpu")
    assert off.items["activations (saved)"] < ck.items["activations (saved)"] and off.host_total > 0
    host = memory_plan(m, S, cp=8, fsdp_offload="cpu")
    assert host.items["params"] == 0 and host.host["optimizer"] == pytest.approx(8 * m.param_count() / 8)
    assert memory_plan(m, S, cp=8, reshard="keep").items["unsharded params (FSDP)"] > ck.items["unsharded params (FSDP)"]
    # the longest sequence that fits grows with the GPUs and with the features
    fit = [max_seq_len(m, 80e9, cp=P) for P in (8, 32, 128)]
    assert fit == sorted(fit) and fit[0] > 0
    assert max_seq_len(m, 80e9, cp=8, loss="full", mlp="full") < fit[0]
    assert memory_plan(m, fit[0], cp=8).total <= 80e9 < memory_plan(m, fit[0] + 16, cp=8).total


def test_cli_prints_the_python_api_numbers():
    out = subprocess.run([sys.executable, "-m", "seqpar.plan", "--model", "llama-3.1-8b", "--seq", "1048576",
                          "--gpus", "8", "--checkpoint", "full", "--loss", "chunked", "--mlp", "tiled",
                          "--offload", "cpu", "--precision", "bf16", "--gpu-mem", "80"],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    kw = dict(cp=8, dp=1, checkpoint="full", loss="chunked", mlp="tiled", offload="cpu", precision="bf16")
    p = memory_plan(model_shape("llama-3.1-8b"), 1 << 20, **kw)
    total = float(re.search(r"total: ([\d.]+) GB", out).group(1))
    longest = int(re.search(r"fits 80 GB per GPU: (\d+) tokens", out).group(1))
    assert total == pytest.approx(p.total / 1e9, abs=0.006)
    assert longest == max_seq_len(model_shape("llama-3.1-8b"), 80e9, **kw)
    assert "activations (saved)" in out and "host: checkpointed block inputs" in out


# ---------------------------------------------------------------------------------------------- auto

SHAPE = ModelShape(heads=8, kv_heads=8, head_dim=64)


def _cpu(memory=0.0, latency=300e-6):
    return Machine(attn_flops=20e9, attn_bwd_flops=15e9, link_bw=1e9, latency=latency, overlap="none", memory=memory)


def test_auto_never_picks_a_method_that_does_not_fit():
    S, P = 1 << 15, 4
    c = compare(SHAPE, S, P, _cpu(), dtype_bytes=4, checkpoint="none")
    ag, ring = c.plans["allgather"].memory["total"], c.plans["ring"].memory["total"]
    assert ag > ring
    tight = compare(SHAPE, S, P, _cpu(memory=(ag + ring) / 2), dtype_bytes=4, checkpoint="none")
    assert "allgather" not in tight.plans and "GB per rank" in tight.not_applicable["allgather"]
    assert tight.best != "allgather"


def test_auto_takes_the_least_memory_among_times_within_resolution():
    # the shape: 2 CPU ranks, S=8192, H=8, D=64, causal fp32; a latency large enough that
    # allgather's single collective is predicted (slightly) faster than the ring's steps
    S, P = 8192, 2
    for latency in (1e-4, 1e-3, 5e-3, 2e-2):
        c = compare(SHAPE, S, P, _cpu(latency=latency), dtype_bytes=4, checkpoint="none")
        fastest = min(c.plans, key=lambda m: c.plans[m].attn_time)
        t0 = c.plans[fastest].attn_time
        close = {m for m, p in c.plans.items() if p.attn_time <= t0 * 1.05}
        assert c.best in close
        assert c.plans[c.best].memory["total"] == min(c.plans[m].memory["total"] for m in close)
    # P=4: allgather's O(S) K/V is more than the ring's two blocks; when allgather is predicted fastest by
    # under 5% the ring wins; by more, allgather (the rule never trades more than the model's resolution)
    wins = []
    for latency in [1e-4 * 1.25 ** k for k in range(48)]:
        c = compare(SHAPE, 1 << 14, 4, _cpu(latency=latency), dtype_bytes=4, checkpoint="none")
        r, a = c.plans["ring"].attn_time, c.plans["allgather"].attn_time
        if a < r <= a * 1.05:
            assert c.best == "ring", (latency, r, a)
            wins.append("tie")
        elif r > a * 1.05:
            assert c.best in ("allgather", "ulysses")
            wins.append("time")
    assert "tie" in wins and "time" in wins


def test_api_choice_uses_the_rule():
    from seqpar import api
    from seqpar.vocab import LAYOUT_CHOICES

    sig = (1, 8, 4096, 64, 8, 64, 3, 1, LAYOUT_CHOICES.index("zigzag"), 0)  # B Hq s D Hkv Dv fp32 causal layout
    c = compare(SHAPE, 8192, 2, _cpu(latency=5e-3), dtype_bytes=4, checkpoint="none",
                methods=tuple(m for m in ("ring", "ulysses", "allgather")))
    assert api._choose(sig, 2, _cpu(latency=5e-3), None, False) == c.best
    ring = c.plans["ring"].memory["total"]
    assert api._choose(sig, 2, _cpu(latency=5e-3, memory=ring * 1.01), None, False) in ("ring", "allgather")
    assert plan(SHAPE, 8192, 2, _cpu(latency=5e-3), method="auto", dtype_bytes=4).method == \
        compare(SHAPE, 8192, 2, _cpu(latency=5e-3), dtype_bytes=4).best
