"""Mamba2 / Mamba state passing (seqpar.mixing.ssd, seqpar.mixing.selective_scan), single process.

References, never seqpar code: an fp64 token-by-token recurrence written here for the scans; for the
adapters the unmodified transformers mixer on the whole sequence (fp32), and in fp64 the same mixer with
its fp32-internal scan function replaced by this file's fp64 token recurrence (so the whole mixer is fp64).
The adapter runs on a LocalContext that cuts the sequence into runs (shorter than the conv kernel and than
the chunk, and longer), exactly as a rank's runs are fed halos and entry states.
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

import transformers  # noqa: E402

from adapter_checks import Fp64Context  # noqa: E402
from seqpar.testing.memory import saved_bytes
from seqpar.mixing.base import LocalContext, apply_map  # noqa: E402
from seqpar.mixing.selective_scan import MAMBA, MAMBA_CLASSES, selective_scan  # noqa: E402
from seqpar.mixing.ssd import MAMBA2, MAMBA2_CLASSES, ssd, ssd_scan  # noqa: E402
from seqpar.testing.zoo import tiny_config  # noqa: E402

F64 = torch.float64


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# -- the fp64 token recurrence (the spec of the SSD scan)


def token_ssd(x, dt, A, B, C, h0=None):
    """h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T, y_t = h_t C_t; x (b,T,H,P), dt (b,T,H), B/C (b,T,G,N)."""
    x, dt, A, B, C = (v.to(F64) for v in (x, dt, A, B, C))
    b, t, h, p = x.shape
    r = h // B.shape[2]
    Bh, Ch = B.repeat_interleave(r, 2), C.repeat_interleave(r, 2)  # (b, T, H, N)
    s = torch.zeros(b, h, p, B.shape[-1], dtype=F64) if h0 is None else h0.to(F64)
    ys = []
    for i in range(t):
        s = torch.exp(dt[:, i] * A)[..., None, None] * s + (dt[:, i, :, None] * x[:, i])[..., None] * Bh[:, i, :, None]
        ys.append((s * Ch[:, i, :, None]).sum(-1))
    return torch.stack(ys, 1), s


def ssd_inputs(t, *, b=2, h=4, p=3, g=2, n=5, dtype=F64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=F64)  # noqa: E731
    x, dt = r(b, t, h, p), torch.rand(b, t, h, generator=gen, dtype=F64) * 2
    A, B, C, h0 = -torch.rand(h, generator=gen, dtype=F64) * 3, r(b, t, g, n), r(b, t, g, n), r(b, h, p, n)
    return tuple(v.to(dtype) for v in (x, dt, A, B, C, h0))


@pytest.mark.parametrize("t, q", [(13, 4), (8, 8), (5, 16), (1, 4), (33, 8)])
def test_ssd_matches_token_recurrence_fp64(t, q):
    x, dt, A, B, C, h0 = ssd_inputs(t)
    y, h = ssd(x, dt, A, B, C, chunk_size=q, initial_state=h0)
    y_ref, h_ref = token_ssd(x, dt, A, B, C, h0)
    assert rel(y, y_ref) < 1e-13 and rel(h, h_ref) < 1e-13
    y0, b, log_decay = ssd_scan(x, dt, A, B, C, chunk_size=q)  # the run summary: h_out = M * h_in + b
    y0_ref, b_ref = token_ssd(x, dt, A, B, C)
    assert rel(y0, y0_ref) < 1e-13 and rel(b, b_ref) < 1e-13
    m = torch.exp(log_decay[:, -1])[..., None, None]
    assert rel(apply_map(m, b, h0, "scale"), h_ref) < 1e-13


def test_ssd_fp32_within_bound_of_fp64():
    x, dt, A, B, C, h0 = ssd_inputs(37, dtype=torch.float32, seed=3)
    y, h = ssd(x, dt, A, B, C, chunk_size=8, initial_state=h0)
    assert y.dtype == torch.float32
    y_ref, h_ref = token_ssd(x, dt, A, B, C, h0)
    assert rel(y.double(), y_ref) < 1e-5 and rel(h.double(), h_ref) < 1e-5


def test_ssd_two_runs_compose_to_one():
    x, dt, A, B, C, h0 = ssd_inputs(19, seed=5)
    cut = 7
    part = lambda v, a, e: v[:, a:e]  # noqa: E731
    y1, h1 = ssd(*(part(v, 0, cut) for v in (x, dt)), A, *(part(v, 0, cut) for v in (B, C)), chunk_size=4,
                 initial_state=h0)
    y2, h2 = ssd(*(part(v, cut, 19) for v in (x, dt)), A, *(part(v, cut, 19) for v in (B, C)), chunk_size=4,
                 initial_state=h1)
    y_ref, h_ref = token_ssd(x, dt, A, B, C, h0)
    assert rel(torch.cat([y1, y2], 1), y_ref) < 1e-13 and rel(h2, h_ref) < 1e-13


def test_ssd_gradients_fp64():
    x, dt, A, B, C, h0 = (v.requires_grad_() for v in ssd_inputs(11, b=1, h=2, p=2, g=1, n=3, seed=7))
    w = torch.randn(1, 11, 2, 2, dtype=F64)
    y, h = ssd(x, dt, A, B, C, chunk_size=4, initial_state=h0)
    got = torch.autograd.grad((y * w).sum() + h.sum(), (x, dt, A, B, C, h0))
    y_ref, h_ref = token_ssd(x, dt, A, B, C, h0)
    want = torch.autograd.grad((y_ref * w).sum() + h_ref.sum(), (x, dt, A, B, C, h0))
    assert max(rel(a, b) for a, b in zip(got, want)) < 1e-12


# -- the transformers mixers


MAMBA2_MODELS = {  # model_type -> (causal LM class, config overrides)
    "mamba2": ("Mamba2ForCausalLM", dict(n_groups=2, chunk_size=4)),
    "bamba": ("BambaForCausalLM", dict(mamba_n_groups=2, mamba_chunk_size=4)),
    "nemotron_h": ("NemotronHForCausalLM", dict(n_groups=2, chunk_size=4)),
    "granitemoehybrid": ("GraniteMoeHybridForCausalLM", dict(mamba_n_groups=2, mamba_chunk_size=4)),
    "zamba2": ("Zamba2ForCausalLM", dict(mamba_ngroups=2, chunk_size=4)),
    "falcon_h1": ("FalconH1ForCausalLM", dict(mamba_n_groups=2, mamba_chunk_size=4, mamba_rms_norm=True,
                                              ssm_multipliers=[0.5, 1.5, 0.7, 1.3, 0.9], ssm_in_multiplier=1.7)),
    "falcon_h1_nonorm": ("FalconH1ForCausalLM", dict(mamba_n_groups=2, mamba_chunk_size=4, mamba_rms_norm=False,
                                                     ssm_multipliers=[0.5, 1.5, 0.7, 1.3, 0.9])),
}
CUTS = ((), (1, 2, 3, 9), (6,))  # S = 13, conv kernel 4, chunk 4: runs of 1 < kernel - 1, of 6 > chunk
S = 13


def mixer(model_type: str, table: dict, classes):
    """The first mixer of the tiny model (fp32, train mode: no cache), its parameters moved off their init."""
    cls_name, over = table[model_type]
    cls = getattr(transformers, cls_name)
    cfg = tiny_config(model_type.removesuffix("_nonorm"), cls)
    for k, v in over.items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    model = cls(cfg)
    m = next(mod for mod in model.modules() if type(mod).__name__ in classes)
    with torch.no_grad():
        for name, prm in m.named_parameters():
            prm.add_(0.3 * torch.randn_like(prm))
    return m


def run_both(m, adapter, dtype, cuts, ctx_len=S):
    m = m.to(dtype)
    gen = torch.Generator().manual_seed(1)
    hs = torch.randn(2, ctx_len, m.hidden_size, generator=gen, dtype=F64).to(dtype)
    w = torch.randn(2, ctx_len, m.hidden_size, generator=gen, dtype=F64).to(dtype)
    params = [p for p in m.parameters()]
    ctx = (Fp64Context if dtype == F64 else LocalContext)(ctx_len, cuts)  # the interface's scan is fp32
    out = {}
    for key, fn in (("module", lambda x: m(x)), ("adapter", lambda x: adapter.forward(m, ctx, (x,), {}))):
        x = hs.clone().requires_grad_()
        y = fn(x)
        out[key] = (y.detach(), *torch.autograd.grad((y * w).sum(), [x, *params]))
    return out["module"], out["adapter"]


def fp64_scan(hidden_states, dt, A, B, C, chunk_size, D=None, dt_bias=None, initial_states=None,
              dt_softplus=False, dt_limit=(0.0, float("inf")), return_final_states=False, **kwargs):
    """transformers' ``mamba2_chunk_scan`` signature, computed by the fp64 token recurrence above."""
    assert initial_states is None and not return_final_states
    dt = dt + dt_bias.to(dt.dtype) if dt_bias is not None else dt
    dt = torch.clamp(F.softplus(dt) if dt_softplus else dt, min=dt_limit[0], max=dt_limit[1])
    y, _ = token_ssd(hidden_states, dt, A, B, C)
    return y + D.to(F64)[:, None] * hidden_states.to(F64)


@pytest.mark.parametrize("model_type", sorted(MAMBA2_MODELS))
def test_mamba2_adapter_fp32_equals_module(model_type):
    m = mixer(model_type, MAMBA2_MODELS, MAMBA2_CLASSES)
    assert MAMBA2.matches(m)
    for cuts in CUTS:
        want, got = run_both(m, MAMBA2, torch.float32, cuts)
        errs = [rel(a, b) for a, b in zip(got, want)]
        assert max(errs) <= 1e-5, (cuts, errs)


@pytest.mark.parametrize("model_type", sorted(MAMBA2_MODELS))
def test_mamba2_adapter_fp64_equals_module_fp64(model_type, monkeypatch):
    m = mixer(model_type, MAMBA2_MODELS, MAMBA2_CLASSES)
    monkeypatch.setattr(sys.modules[type(m).__module__], "mamba2_chunk_scan", fp64_scan)
    names = ["output", "input", *(n for n, _ in m.named_parameters())]
    for cuts in CUTS:
        want, got = run_both(m, MAMBA2, F64, cuts)
        errs = {n: rel(a, b) for n, a, b in zip(names, got, want)}
        # A = -exp(A_log.float()): the module rounds A to fp32, so A's gradient is summed in fp32 (both ways)
        assert errs.pop("A_log") <= 1e-6 and max(errs.values()) <= 1e-12, (cuts, errs)


def test_mamba2_refuses_by_name():
    m = mixer("bamba", MAMBA2_MODELS, MAMBA2_CLASSES)
    ctx, hs = LocalContext(S, (5,)), torch.randn(1, S, m.hidden_size)
    ones = torch.ones(1, S, dtype=torch.long)
    assert MAMBA2.forward(m, ctx, (hs,), {"attention_mask": ones}).shape == hs.shape  # an all-ones mask is none
    pad = ones.clone()
    pad[0, :3] = 0
    for kwargs, word in (({"attention_mask": pad}, "attention_mask"), ({"cache": object()}, "cache"),
                         ({"cache_params": object()}, "cache"), ({"seq_idx": torch.zeros(1, S)}, "seq_idx")):
        with pytest.raises(NotImplementedError, match=word):
            MAMBA2.forward(m, ctx, (hs,), kwargs)
    with pytest.raises(ValueError, match="12 tokens"):
        MAMBA2.forward(m, ctx, (hs[:, :12],), {})


def test_mamba2_matches_only_what_it_implements():
    m = mixer("falcon_h1", MAMBA2_MODELS, MAMBA2_CLASSES)
    assert MAMBA2.matches(m)
    m.norm = torch.nn.LayerNorm(m.intermediate_size)  # a norm the adapter does not know
    assert not MAMBA2.matches(m)
    m = mixer("mamba2", MAMBA2_MODELS, MAMBA2_CLASSES)
    m.time_step_limit = None  # the module itself could not run this
    assert not MAMBA2.matches(m)
    sub = type("MyMamba2Mixer", (type(m),), {})  # a subclass may have another forward
    m2 = mixer("mamba2", MAMBA2_MODELS, MAMBA2_CLASSES)
    m2.__class__ = sub
    assert not MAMBA2.matches(m2)
    assert not MAMBA2.matches(torch.nn.Linear(4, 4))


# -- Mamba (v1): the selective scan


def token_selective(x, dt, A, B, C, h0=None):
    """h_t = exp(dt_t A) * h_{t-1} + dt_t x_t B_t, y_t = h_t . C_t; x / dt (b,T,D), A (D,N), B / C (b,T,G,N)."""
    x, dt, A, B, C = (v.to(F64) for v in (x, dt, A, B, C))
    b, t, d = x.shape
    r = d // B.shape[2]
    Bd, Cd = B.repeat_interleave(r, 2), C.repeat_interleave(r, 2)  # (b, T, D, N)
    s = torch.zeros(b, d, A.shape[1], dtype=F64) if h0 is None else h0.to(F64)
    ys = []
    for i in range(t):
        s = torch.exp(dt[:, i, :, None] * A) * s + (dt[:, i] * x[:, i])[..., None] * Bd[:, i]
        ys.append((s * Cd[:, i]).sum(-1))
    return torch.stack(ys, 1), s


def selective_inputs(t, *, b=2, d=6, g=2, n=4, dtype=F64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=F64)  # noqa: E731
    x, dt = r(b, t, d), torch.rand(b, t, d, generator=gen, dtype=F64) * 2
    A, B, C, h0 = -torch.rand(d, n, generator=gen, dtype=F64) * 3, r(b, t, g, n), r(b, t, g, n), r(b, d, n)
    return tuple(v.to(dtype) for v in (x, dt, A, B, C, h0))


def selective(x, dt, A, B, C, h0, chunk_size=None):
    """The scan from ``h0``: outputs and final state of the run scanned from zeros, given its entry state."""
    r = selective_scan(x, dt, A, B, C, chunk_size=chunk_size)
    return r.out(h0), r.final(h0)


@pytest.mark.parametrize("t, q", [(13, 4), (13, None), (1, None), (30, 7), (16, 16)])
def test_selective_scan_matches_token_recurrence_fp64(t, q):
    x, dt, A, B, C, h0 = selective_inputs(t)
    r = selective_scan(x, dt, A, B, C, chunk_size=q)
    y0_ref, b_ref = token_selective(x, dt, A, B, C)
    assert rel(r.out(), y0_ref) < 1e-13 and rel(r.b, b_ref) < 1e-13
    assert rel(r.m, torch.exp(A * dt.sum(1)[..., None])) < 1e-13  # the run's map: h_out = m * h_in + b
    y, h = selective(x, dt, A, B, C, h0, q)
    y_ref, h_ref = token_selective(x, dt, A, B, C, h0)
    assert rel(y, y_ref) < 1e-13 and rel(h, h_ref) < 1e-13


def test_selective_scan_fp32_composition_and_gradients():
    x, dt, A, B, C, h0 = selective_inputs(23, dtype=torch.float32, seed=2)
    y, h = selective(x, dt, A, B, C, h0)
    y_ref, h_ref = token_selective(x, dt, A, B, C, h0)
    assert y.dtype == torch.float32 and rel(y.double(), y_ref) < 1e-5 and rel(h.double(), h_ref) < 1e-5
    x, dt, A, B, C, h0 = (v.requires_grad_() for v in selective_inputs(17, seed=4))
    cut = 6
    y1, h1 = selective(x[:, :cut], dt[:, :cut], A, B[:, :cut], C[:, :cut], h0)  # two runs = one run
    y2, h2 = selective(x[:, cut:], dt[:, cut:], A, B[:, cut:], C[:, cut:], h1)
    y_ref, h_ref = token_selective(x, dt, A, B, C, h0)
    assert rel(torch.cat([y1, y2], 1), y_ref) < 1e-13 and rel(h2, h_ref) < 1e-13
    w = torch.randn(y_ref.shape, dtype=F64)
    got = torch.autograd.grad((torch.cat([y1, y2], 1) * w).sum() + h2.sum(), (x, dt, A, B, C, h0))
    want = torch.autograd.grad((y_ref * w).sum() + h_ref.sum(), (x, dt, A, B, C, h0))
    assert max(rel(a, b) for a, b in zip(got, want)) < 1e-12


MAMBA_MODELS = {
    "mamba": ("MambaForCausalLM", {}),
    "falcon_mamba": ("FalconMambaForCausalLM", {}),
    "jamba": ("JambaForCausalLM", {}),
    "zamba": ("ZambaForCausalLM", {}),
}


def fp64_selective_scan(hidden_states, dt, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                        return_last_state=False, **kwargs):
    """transformers' ``mamba_selective_scan`` signature ((b, D, T) / (b, N, T) layouts), by the fp64 recurrence."""
    assert not return_last_state
    dt = dt + delta_bias.to(dt.dtype)[..., None] if delta_bias is not None else dt
    dt = F.softplus(dt) if delta_softplus else dt
    y, _ = token_selective(hidden_states.transpose(1, 2), dt.transpose(1, 2), A, B.transpose(1, 2)[:, :, None],
                           C.transpose(1, 2)[:, :, None])
    return (y.transpose(1, 2) + hidden_states.to(F64) * D.to(F64)[None, :, None]) * F.silu(z.to(F64))


@pytest.mark.parametrize("model_type", sorted(MAMBA_MODELS))
def test_mamba_adapter_fp32_equals_module(model_type):
    m = mixer(model_type, MAMBA_MODELS, MAMBA_CLASSES)
    assert MAMBA.matches(m) and not MAMBA2.matches(m)
    for cuts in CUTS:
        want, got = run_both(m, MAMBA, torch.float32, cuts)
        errs = [rel(a, b) for a, b in zip(got, want)]
        assert max(errs) <= 1e-5, (cuts, errs)


@pytest.mark.parametrize("model_type", sorted(MAMBA_MODELS))
def test_mamba_adapter_fp64_equals_module_fp64(model_type, monkeypatch):
    m = mixer(model_type, MAMBA_MODELS, MAMBA_CLASSES)
    monkeypatch.setattr(sys.modules[type(m).__module__], "mamba_selective_scan", fp64_selective_scan)
    names = ["output", "input", *(n for n, _ in m.named_parameters())]
    for cuts in CUTS:
        want, got = run_both(m, MAMBA, F64, cuts)
        errs = {n: rel(a, b) for n, a, b in zip(names, got, want)}
        assert errs.pop("A_log") <= 1e-6 and max(errs.values()) <= 1e-12, (cuts, errs)  # A rounded to fp32


def test_mamba_refuses_by_name():
    m = mixer("jamba", MAMBA_MODELS, MAMBA_CLASSES)
    ctx, hs = LocalContext(S, (5,)), torch.randn(1, S, m.hidden_size)
    with pytest.raises(NotImplementedError, match="cache"):
        MAMBA.forward(m, ctx, (hs,), {"cache": object()})
    with pytest.raises(NotImplementedError, match="attention_mask"):
        MAMBA.forward(m, ctx, (hs,), {"attention_mask": torch.zeros(1, S)})
    m.b_layernorm = torch.nn.LayerNorm(m.ssm_state_size)
    assert not MAMBA.matches(m)


# -- memory: what a rank keeps for backward


@pytest.mark.parametrize("model_type, bound", [("bamba", 1.0), ("mamba", 1.5)])
def test_saved_activations_scale_with_local_tokens(model_type, bound):
    """A rank keeps O(its tokens) for backward: bytes per token flat in T (the runs' maps are O(runs)), and at most
    ``bound`` x the module's own forward on the same tokens (measured, 4 runs: Bamba 0.90-0.95x, Mamba 1.41x at
    T=256 falling to 1.34x at T=4096)."""
    table, classes, adapter = ((MAMBA2_MODELS, MAMBA2_CLASSES, MAMBA2) if model_type in MAMBA2_MODELS
                               else (MAMBA_MODELS, MAMBA_CLASSES, MAMBA))
    m = mixer(model_type, table, classes)
    if hasattr(m, "chunk_size"):
        m.chunk_size = 16  # runs (T / 4) longer than a chunk
    per_token = {}
    for t in (256, 1024):
        x = torch.randn(1, t, m.hidden_size, requires_grad=True)
        mine = saved_bytes(m, lambda: adapter.forward(m, LocalContext(t, (t // 4, t // 2, 3 * t // 4)), (x,), {}))
        own = saved_bytes(m, lambda: m(x))
        assert mine <= bound * own, (t, mine, own)
        per_token[t] = mine / t
    assert abs(per_token[1024] / per_token[256] - 1) < 0.1, per_token
