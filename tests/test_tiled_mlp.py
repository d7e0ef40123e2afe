"""Tiled MLP (parallelize(mlp=...), seqpar/passes/tiled_mlp.py) and checkpoint offload (parallelize(offload=...),
seqpar/passes/offload.py): the tiled module against the untiled one in process; both under parallelize on 4
spawned gloo ranks against the single-process model (cases: tiled_mlp_cases.py); the memory a tiled MLP holds."""

from __future__ import annotations

import copy

import pytest
import torch

import tiled_mlp_cases as tc
from seqpar.passes.check import find_blocks
from seqpar.passes.tiled_mlp import AUTO_BYTES, TiledMLP, check_mlp, probe, tiled_mlp_pass

pytest.importorskip("transformers")

P = 4


def _rel(a, b) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma2", "mixtral", "qwen2_moe"])
def test_tiled_equals_untiled(kind):
    """A block's MLP tiled in chunks of 7 tokens (S=30, B=2: 3 tokens per row, not dividing 30) gives the untiled
    module's output and gradients (input and every parameter: rel < 1e-6). MoE: the router stays whole (its logits
    are recorded for the load-balancing loss), the experts (and Qwen2-MoE's shared expert) are tiled, and the
    routing weights get their gradient back through the tiled function."""
    ref = tc.build(kind)
    model = copy.deepcopy(ref)
    tilers = tiled_mlp_pass(model, find_blocks(model), "tiled", 7)
    paths = [t.path for t in tilers]
    if kind in ("mixtral", "qwen2_moe"):
        assert "model.layers.0.mlp.experts" in paths and "model.layers.0.mlp.gate" not in paths, paths
    else:
        assert paths == ["model.layers.0.mlp", "model.layers.1.mlp"], paths
    mlp, mlp_ref = model.model.layers[0].mlp, ref.model.layers[0].mlp
    x = torch.randn(2, 30, 32, generator=torch.Generator().manual_seed(0), requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    out, out_ref = mlp(x), mlp_ref(x_ref)
    dy = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out * dy).sum().backward()
    (out_ref * dy).sum().backward()
    assert sum(t.calls for t in tilers) >= 1
    assert _rel(out.detach(), out_ref.detach()) < 1e-6
    assert _rel(x.grad, x_ref.grad) < 1e-6
    got = dict(mlp.named_parameters())
    n = 0
    for name, p in mlp_ref.named_parameters():
        if p.grad is not None:
            assert _rel(got[name].grad, p.grad) < 1e-6, name
            n += 1
    assert n >= 2


def test_auto_rule():
    """mlp="auto" tiles a call only when its intermediates (measured bytes per token x tokens) exceed 64 MiB, in
    chunks that stay under it; mlp="tiled" always; chunks cover dim -2 exactly, the last one shorter."""
    t = TiledMLP("m", torch.nn.Identity(), "auto", None, bytes_per_token=4096.0, probe_itemsize=4)
    per_chunk = AUTO_BYTES // 4096  # 16384 tokens
    assert t.plan(torch.empty(1, per_chunk, 8)) is None
    bounds = t.plan(torch.empty(2, per_chunk, 8))  # 2 rows x 16384 tokens: 128 MiB of intermediates
    assert bounds == [(0, per_chunk // 2), (per_chunk // 2, per_chunk // 2)]
    assert t.plan(torch.empty(2, per_chunk, 8, dtype=torch.bfloat16)) is None  # half the bytes per token
    t.mode, t.chunk = "tiled", 5
    assert t.plan(torch.empty(1, 12, 8)) == [(0, 5), (5, 5), (10, 2)]
    assert t.plan(torch.empty(2, 12, 8)) == [(0, 2), (2, 2), (4, 2), (6, 2), (8, 2), (10, 2)]


def test_probe_refuses_token_mixing():
    """The per-token probe: an MLP passes; a causal conv and a token-mixing linear do not, each named."""
    x = torch.randn(2, 9, 8)
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))
    assert probe(mlp, (x,), {}) > 0

    class Conv(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv1d(8, 8, 3, padding=2)

        def forward(self, x):
            return self.conv(x.transpose(1, 2))[..., : x.shape[1]].transpose(1, 2)

    class Mix(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(9, 9)

        def forward(self, x):
            return self.lin(x.transpose(1, 2)).transpose(1, 2)

    for m in (Conv(), Mix()):
        with pytest.raises(ValueError, match="the module mixes tokens"):
            probe(m, (x,), {})
    class Norm(torch.nn.Module):  # batch statistics over rows and tokens (training mode)
        def __init__(self):
            super().__init__()
            self.bn = torch.nn.BatchNorm1d(8)

        def forward(self, x):
            return self.bn(x.transpose(1, 2)).transpose(1, 2)

    norm = Norm()
    before = norm.bn.running_mean.clone()
    with pytest.raises(ValueError, match="mixes tokens"):
        probe(norm, (x,), {})
    assert torch.equal(norm.bn.running_mean, before)  # the probe leaves the module's buffers as they were


def test_options_refused():
    """mlp / mlp_chunk / offload validated with the argument named (check() calls these before communication)."""
    from seqpar.passes.offload import check_offload

    with pytest.raises(ValueError, match="mlp must be one of"):
        check_mlp("chunked", None, False)
    with pytest.raises(TypeError, match="mlp_chunk must be None or an int"):
        check_mlp("tiled", True, False)
    with pytest.raises(TypeError, match="mlp_chunk"):
        check_mlp("tiled", "512", False)
    with pytest.raises(ValueError, match="mlp_chunk must be >= 1"):
        check_mlp("auto", 0, False)
    with pytest.raises(ValueError, match="mlp='full' never tiles"):
        check_mlp("full", 64, False)
    with pytest.raises(ValueError, match="compile=True"):
        check_mlp("tiled", None, True)
    check_mlp("auto", None, True)  # under compile "auto" runs whole
    with pytest.raises(ValueError, match="offload must be one of"):
        check_offload("gpu", True, False)
    with pytest.raises(ValueError, match="needs checkpoint=True"):
        check_offload("cpu", False, False)
    with pytest.raises(ValueError, match="compile=True"):
        check_offload("cpu", True, True)


def test_tiling_bounds_mlp_memory():
    """One Llama MLP forward + backward, S=8192, intermediate 4096, fp32 (128 MiB per projection), in a process of
    its own: the measured peak (VmHWM rise) with mlp="auto" (which tiles it: ~500 MiB of intermediates, in chunks
    under 64 MiB) is at most half the untiled one, with the same gradients."""
    import json
    import os
    import subprocess
    import sys

    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("/proc/self/clear_refs is not writable here (VmHWM cannot be reset)")
    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536",
           "PYTHONPATH": os.pathsep.join([here, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", "import json, tiled_mlp_cases as c; print(json.dumps(c.mlp_memory()))"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    print(res)
    assert res["calls"] == 1 and res["chunks"] >= 8 and res["grad"] < 1e-5, res
    assert res["whole_mib"] > 3 * res["per_projection_mib"], res  # the untiled peak holds the intermediates
    assert res["whole_mib"] >= 2 * res["tiled_mib"], res


# ----------------------------------------------------------------------------- under parallelize, 4 gloo ranks


def _assert_equal(res: dict, what: str) -> None:
    assert res["ngrads"] > 0 and res["tiled"] > 0, (what, res)
    assert res["loss"] < 1e-5 and res["grad"] < 1e-4, (what, res)


def test_parallelize_tiled(worlds):
    """mlp="tiled" (mlp_chunk=6: 3 tokens per row per chunk, 16 local tokens per row) under parallelize equals the
    single-process model: cp=4 with checkpoint=True for Llama, Qwen2, Gemma 2, Mixtral (router loss on) and the
    plain GPT; FSDP2 dp=2 x cp=2 with and without checkpointing (the tiled backward re-runs chunks inside the
    block's backward, parameters unsharded by FSDP2). Loss rel < 1e-5, every gradient rel < 1e-4, two steps."""
    w = worlds(P)
    cases = [dict(kind=k, dp=1, cp=4, fsdp=False, checkpoint=True) for k in ("llama", "qwen2", "gemma2", "mixtral",
                                                                           "gpt")]
    cases += [dict(kind=k, dp=2, cp=2, fsdp=True, checkpoint=c) for k in ("llama", "mixtral") for c in (False, True)]
    for case in cases:
        for rank, res in enumerate(w.run(tc.equivalence, **case)):
            _assert_equal(res, f"{case} rank {rank}")


def test_offload(worlds):
    """offload="cpu" with checkpoint=True: every checkpointed block input goes through the offload hooks (one pack
    and one unpack per block and step, B x S/cp x hidden x 4 bytes each, all released after backward), and the loss
    and gradients equal the single-process model's (with the tiled MLP too: FSDP2 dp=2 x cp=2) and, bitwise, those of
    checkpoint=True without offload."""
    w = worlds(P)
    steps, blocks, hidden = 2, 2, 32
    for case in (dict(kind="llama", dp=1, cp=4, fsdp=False), dict(kind="gpt", dp=1, cp=4, fsdp=False),
                 dict(kind="llama", dp=2, cp=2, fsdp=True)):
        for rank, res in enumerate(w.run(tc.equivalence, **case, checkpoint=True, offload="cpu", steps=steps)):
            what = f"{case} rank {rank}"
            _assert_equal(res, what)
            per_block = tc.B * (tc.S // case["cp"]) * hidden * 4
            assert res["packs"] == res["unpacks"] == steps * blocks, (what, res)
            assert res["bytes"] == steps * blocks * per_block, (what, res)
            assert res["peak_host_bytes"] == blocks * per_block and res["host_bytes"] == 0, (what, res)
    for kind in ("llama", "gpt"):
        for res in w.run(tc.offload_vs_plain, kind=kind):
            assert res["loss"] == 0.0 and res["grad"] == 0.0, (kind, res)


def test_tiled_refuses_non_per_token(worlds):
    """mlp="tiled" on a model whose block MLP mixes tokens raises a ValueError on every rank naming the module and
    what the probe saw; mlp="auto" leaves it whole."""
    for res in worlds(P).run(tc.refused):
        msg = res["msg"]
        assert msg is not None and "h.0.mlp (Mixing) is not per-token" in msg and "mixes tokens" in msg, msg
        assert res["auto_tiled"] == 0, res
