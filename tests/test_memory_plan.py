"""seqpar.plan_memory: the memory model's arithmetic, its monotonicity, the CLI, and auto's memory rule
(no processes except the CLI's)."""

import re
import subprocess
import sys

import pytest

from seqpar.fsdp_options import FSDPOptions
from seqpar.plan import Machine, ModelShape, compare, plan
from seqpar.plan_memory import (MODELS, block_saved_bytes, from_hf_config, main, max_seq_len, memory_plan,
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


def test_layer_backward_phases_by_hand():
    # one block's backward in two halves (measured per op on CPU ranks, benchmarks/memory.py): the MLP's
    # gradients on the whole saved set, then the attention's buffers once the MLP half freed its part
    S, n = 1024, 106816
    acts = S * (2 * 4376 + 24 + 128)  # every block's saved set + ids/labels/positions + cos/sin
    p = memory_plan(TINY, S, checkpoint="none", loss="full", mlp="full", precision="fp32", fsdp=False)
    # d(out), d(norm out): 2*4*64; d(act*up), d(act), d(up) less the freed act*up: 2*4*128 (the final
    # norm's saved set is gone by then)
    assert p.phases["MLP backward"] == 12 * n + acts + S * (512 + 1024)
    # the attention half: MLP (2048), second norm (516) and x + attn (256) freed; stream 512, dout 256,
    # fp32 dq/dk/dv 512 and their casts 512, + the method's working set (the only method-dependent term)
    att = p.phases["attention backward"] - (12 * n + acts - S * (2048 + 516 + 256) + S * 1792)
    assert att > 0
    for cp in (4, 8):  # all-gather's O(S) K/V + dK/dV over the ring's two blocks (equal at cp=2)
        r, a = (memory_plan(TINY, S, cp=cp, method=m, checkpoint="none", loss="full", mlp="full") for m in
                ("ring", "allgather"))
        assert r.phases["MLP backward"] == a.phases["MLP backward"]
        assert a.phases["attention backward"] > r.phases["attention backward"]
    # checkpointed: the recomputed block re-creates its set except its input (256) and the replayed
    # (out, lse) (272), which the checkpoint holds for every block
    c = memory_plan(TINY, S, checkpoint="full", loss="full", mlp="full", precision="fp32", fsdp=False)
    kept = S * (2 * (256 + 272) + 24 + 128)
    assert c.phases["MLP backward"] == 12 * n + kept + S * (4376 - 528) + S * (512 + 1024)
    assert c.phases["attention backward"] - p.phases["attention backward"] == kept - acts + S * (4376 - 528)


def test_precision_is_fsdp_mixed_precision():
    m = model_shape("llama-3.1-8b")
    S, P = 1 << 18, 8
    n, nb = int(m.param_count()), int(m.block_param_count())
    root = n - m.layers * nb
    f32, b16, f16 = (memory_plan(m, S, cp=P, precision=x) for x in ("fp32", "bf16", "fp16"))
    for x, p in (("fp32", f32), ("bf16", b16), ("fp16", f16)):
        st = FSDPOptions(precision=x).state_bytes(params=n, ranks=P, largest_block=nb, root=root)
        # fp32 shards, gradients and AdamW state whatever the compute dtype: the state_bytes of parallelize's option
        assert p.items["params"] == st["params"] == 4 * -(-n // P)
        assert p.items["optimizer"] == st["optimizer"] == 8 * -(-n // P)
        assert p.items["unsharded params (FSDP)"] == st["gathered"] + st["staging"]
        assert p.phases["optimizer step"] == 16 * -(-n // P) + 4 * n / P
    assert b16.phases == f16.phases  # both 2-byte compute
    assert b16.items["unsharded params (FSDP)"] == f32.items["unsharded params (FSDP)"] / 2
    assert b16.total < f32.total
    # a model cast to bf16 (parallelize's precision="fp32": nothing to cast): bf16 parameters, gradients
    # and AdamW state, the same activations as mixed precision
    cast = memory_plan(m, S, cp=P, precision="fp32", param_dtype="bf16")
    assert cast.items["params"] == b16.items["params"] / 2 and cast.items["optimizer"] == b16.items["optimizer"] / 2
    assert cast.items["activations (saved)"] == b16.items["activations (saved)"]
    assert cast.total < b16.total
    nof = memory_plan(m, S, cp=P, fsdp=False, precision="fp32", param_dtype="bf16")
    assert nof.items["params"] == 2 * n and nof.items["optimizer"] == 4 * n  # replicated, nothing gathered
    assert nof.peak_phase == "optimizer step" and nof.total == (2 + 2 + 4) * n + 2 * n
    # what parallelize refuses is refused here, naming the fix
    with pytest.raises(ValueError, match="param_dtype='bf16'"):
        memory_plan(m, S, cp=P, precision="bf16", param_dtype="bf16")
    with pytest.raises(ValueError, match="fsdp=True"):
        memory_plan(m, S, cp=P, precision="bf16", fsdp=False)
    with pytest.raises(TypeError, match="precision='bf16'"):
        memory_plan(m, S, cp=P, precision=True)
    with pytest.raises(ValueError, match="param_dtype"):
        memory_plan(m, S, cp=P, precision="fp32", param_dtype="fp8")
    # seqpar.plan's 2-byte memory is the mixed-precision plan (fp32 state), or a cast model without FSDP
    shape = plan(m, S, P, Machine(attn_flops=1e12), method="ring", dtype_bytes=2).memory
    assert shape["total"] == b16.total
    shape = plan(m, S, P, Machine(attn_flops=1e12), method="ring", dtype_bytes=2, memory=dict(fsdp=False)).memory
    assert shape["total"] == memory_plan(m, S, cp=P, fsdp=False, precision="fp32", param_dtype="bf16").total


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
    # (the full loss peaks every time: the item then holds the same things, every block's saved set)
    acts = [memory_plan(m, S, cp=cp, checkpoint="none", loss="full") for cp in (1, 2, 4, 8)]
    assert {a.peak_phase for a in acts} == {"loss"}
    acts = [a.items["activations (saved)"] for a in acts]
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


def test_cli_precision_and_param_dtype(capsys):
    def total(*argv):
        main(["--model", "llama-3.1-8b", "--seq", "262144", "--gpus", "8", *argv])
        return float(re.search(r"total: ([\d.]+) GB", capsys.readouterr().out).group(1))

    m = model_shape("llama-3.1-8b")
    assert total() == pytest.approx(memory_plan(m, 1 << 18, cp=8, precision="bf16").total / 1e9, abs=0.006)
    cast = memory_plan(m, 1 << 18, cp=8, precision="fp32", param_dtype="bf16").total / 1e9
    assert total("--param-dtype", "bf16") == pytest.approx(cast, abs=0.006)  # precision defaults to fp32 then
    with pytest.raises(SystemExit):
        main(["--param-dtype", "bf16", "--precision", "bf16"])
    assert "param_dtype='bf16'" in capsys.readouterr().err


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
    # P=4: allgather's O(S) K/V is more than the ring's blocks (and Ulysses' gathered heads); when allgather is
    # predicted fastest by under 5% a method with less memory wins; by more, allgather (the rule never trades
    # more than the model's resolution)
    wins = []
    for latency in [1e-4 * 1.25 ** k for k in range(48)]:
        c = compare(SHAPE, 1 << 14, 4, _cpu(latency=latency), dtype_bytes=4, checkpoint="none")
        r, a = c.plans["ring"].attn_time, c.plans["allgather"].attn_time
        if a < r <= a * 1.05:
            assert c.best in ("ring", "ulysses"), (latency, r, a)
            assert c.plans[c.best].memory["total"] < c.plans["allgather"].memory["total"]
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
