"""Linear-recurrence adapters (seqpar.mixing.rglru, seqpar.mixing.lightning) against the modules and an fp64 truth.

Single process: each transformers module built tiny; the adapter on a LocalContext cut into runs equals the
module's own forward on the whole sequence (output and the gradients of the input and every parameter),
and both stay within reach of an fp64 token-by-token reference written here from the recurrence's formula.
Packed documents (position_ids restarting at 0) inside runs and at run starts; refusals by name.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from adapter_checks import Fp64Context, compare, first_output, randomize  # noqa: E402
from seqpar.mixing import rglru  # noqa: E402
from seqpar.mixing.base import LocalContext  # noqa: E402
from seqpar.testing.zoo import tiny_config  # noqa: E402

T = 13
CUTS = [(), (1, 2, 5, 11), (3, 4, 6, 7, 12)]  # runs of 1-2 tokens (< the conv width 4); 5 is a document start
PACKED = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 0, 1], list(range(T))])  # (2, T): 3 documents + 1


# -- RecurrentGemma's recurrent block

def _rg_block(dtype):
    import transformers.models.recurrent_gemma.modeling_recurrent_gemma as m
    cfg = tiny_config("recurrent_gemma")
    idx = list(cfg.layers_block_type).index("linear_attention")
    return randomize(m.RecurrentGemmaRecurrentBlock(cfg, idx)).to(dtype)


def rglru_reference(block, h: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """The recurrent block in fp64, token by token, from Griffin's formulas (not from the module's code)."""
    p = {n: t.detach().double() for n, t in block.named_parameters()}
    h = h.detach().double()
    bsz, seq, _ = h.shape
    heads, bw = block.rg_lru.num_attention_heads, block.rg_lru.block_width
    y = block.act_fn(h @ p["linear_y.weight"].T + p["linear_y.bias"])
    u = h @ p["linear_x.weight"].T + p["linear_x.bias"]  # (B, S, W)
    k = block.conv_1d.kernel_size[0]
    wconv = p["conv_1d.weight"][:, 0, :]  # (W, k): tap j reads token t - (k - 1) + j
    out = torch.zeros_like(u)
    for b in range(bsz):
        state = torch.zeros(u.shape[-1], dtype=torch.float64)
        for t in range(seq):
            c = p["conv_1d.bias"].clone()
            for j in range(k):
                if t - (k - 1) + j >= 0:
                    c = c + wconv[:, j] * u[b, t - (k - 1) + j]
            ch = c.view(heads, bw)
            i_gate = torch.sigmoid(torch.einsum("hi,hij->hj", ch, p["rg_lru.input_gate_weight"])
                                   + p["rg_lru.input_gate_bias"]).reshape(-1)
            r_gate = torch.sigmoid(torch.einsum("hi,hij->hj", ch, p["rg_lru.recurrent_gate_weight"])
                                   + p["rg_lru.recurrent_gate_bias"]).reshape(-1)
            a = torch.exp(-8.0 * r_gate * F.softplus(p["rg_lru.recurrent_param"]))
            if pos[min(b, pos.shape[0] - 1), t] == 0:  # a document starts: no memory, no normalisation
                state = i_gate * c
            else:
                state = a * state + torch.sqrt(1 - a * a) * (i_gate * c)
            out[b, t] = state
    return (out * y) @ p["linear_out.weight"].T + p["linear_out.bias"]


def _rg_inputs(dtype, pos):
    g = torch.Generator().manual_seed(3)
    return {"input_states": torch.randn(2, T, 32, generator=g, dtype=torch.float64).to(dtype),
            "position_ids": pos, "attention_mask": None, "use_cache": False}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rglru_equals_module_and_reference(dtype):
    block = _rg_block(dtype)
    adapter = rglru.RGLRU_ADAPTERS[0]
    assert adapter.matches(block)
    for pos in (torch.arange(T)[None], PACKED):
        inputs = _rg_inputs(dtype, pos)
        truth = rglru_reference(block, inputs["input_states"], pos)
        own = first_output(block(**inputs)).double()
        scale = truth.abs().max()
        own_err = ((own - truth).abs().max() / scale).item()
        for cuts in CUTS:
            # the module accumulates its recurrence in fp32 whatever the dtype: fp64 is fp32-tight
            errs = compare(adapter, block, inputs, T, cuts)
            assert max(errs.values()) <= 1e-5, (pos.shape, cuts, errs)
            mine = first_output(adapter.forward(block, LocalContext(T, cuts), (), inputs)).double()
            mine_err = ((mine - truth).abs().max() / scale).item()
            assert mine_err <= 2 * own_err + 1e-6, (cuts, mine_err, own_err)
        assert own_err <= 1e-5  # the reference is the module's math


def test_rglru_reset_cuts_the_entry_state():
    """A document starting a run (and one inside it) must not see the previous run's state: changing the tokens
    before the start leaves the document's outputs unchanged, with and without cuts."""
    block = _rg_block(torch.float64)
    inputs = _rg_inputs(torch.float64, PACKED)
    other = dict(inputs, input_states=inputs["input_states"].clone())
    other["input_states"][0, :2] += 1.0  # tokens 0-1 of document 0 (row 0) change; the conv (width 4) at 5 reads 2-5
    for cuts in CUTS:
        a = first_output(rglru.RGLRU_ADAPTERS[0].forward(block, LocalContext(T, cuts), (), inputs))
        b = first_output(rglru.RGLRU_ADAPTERS[0].forward(block, LocalContext(T, cuts), (), other))
        assert torch.equal(a[0, 5:], b[0, 5:]) and not torch.equal(a[0, 2:5], b[0, 2:5]), cuts
        assert torch.equal(a[1], b[1])


def test_rglru_matches_and_refusals():
    import transformers.models as m
    block = _rg_block(torch.float32)
    adapter = rglru.RGLRU_ADAPTERS[0]
    others = [block.rg_lru, block.conv_1d, m.mamba.modeling_mamba.MambaMixer(tiny_config("mamba"), 0),
              m.lfm2.modeling_lfm2.Lfm2ShortConv(tiny_config("lfm2"), 0)]
    assert not any(adapter.matches(o) for o in others)
    ctx = LocalContext(T, (5,))
    inputs = _rg_inputs(torch.float32, torch.arange(T)[None])
    with pytest.raises(NotImplementedError, match="use_cache"):
        adapter.forward(block, ctx, (), dict(inputs, use_cache=True))
    with pytest.raises(NotImplementedError, match="cache"):
        adapter.forward(block, ctx, (), dict(inputs, cache=object()))
    with pytest.raises(ValueError, match="position_ids"):
        adapter.forward(block, ctx, (), dict(inputs, position_ids=torch.arange(T - 1)[None]))
    assert math.isfinite(first_output(adapter.forward(block, ctx, (), inputs)).sum().item())


# -- MiniMax's lightning attention

def _lightning(dtype, block_size: int = 4):
    import transformers.models.minimax.modeling_minimax as m
    cfg = tiny_config("minimax")
    cfg.block_size = block_size  # several of the module's blocks per run
    idx = list(cfg.layer_types).index("linear_attention")
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # the decay buffers computed in the test's dtype (fp64: not fp32 ones cast)
    try:
        module = m.MiniMaxLightningAttention(cfg, idx)
    finally:
        torch.set_default_dtype(default)
    return randomize(module, std=0.3).to(dtype), cfg.hidden_size


def lightning_reference(module, h: torch.Tensor, mask) -> tuple[torch.Tensor, torch.Tensor]:
    """fp64, token by token: S_t = exp(-slope) S_{t-1} + k_t^T v_t, o_t = q_t S_t; the per-token projections
    of an fp64 copy of the module. Returns (output, final state)."""
    import copy
    mod = copy.deepcopy(module).double()
    h = h.detach().double()
    bsz, seq, _ = h.shape
    heads, d = mod.num_attention_heads, mod.head_dim
    qkv = mod.act_fn(mod.qkv_proj(h))
    if mask is not None:
        qkv = qkv * mask[:, :, None]
    q, k, v = qkv.reshape(bsz, seq, heads, 3 * d).split(d, dim=3)  # (B, S, H, D)
    lam = torch.exp(-mod.slope_rate.reshape(heads)).double()  # (H,)
    state = torch.zeros(bsz, heads, d, d, dtype=torch.float64)
    outs = []
    for t in range(seq):
        state = lam[None, :, None, None] * state + k[:, t, :, :, None] * v[:, t, :, None, :]
        outs.append(torch.einsum("bhd,bhde->bhe", q[:, t], state))
    o = torch.stack(outs, dim=1).reshape(bsz, seq, heads * d)
    o = torch.sigmoid(mod.output_gate(h)) * mod.norm(o)
    return mod.out_proj(o), state


def _lightning_inputs(dtype, c, masked):
    g = torch.Generator().manual_seed(4)
    mask = None
    if masked:
        mask = torch.ones(2, T, dtype=torch.long)
        mask[0, :3] = 0
    return {"hidden_states": torch.randn(2, T, c, generator=g, dtype=torch.float64).to(dtype),
            "position_embeddings": None, "attention_mask": mask}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lightning_equals_module_and_reference(dtype):
    from seqpar.mixing import lightning
    module, c = _lightning(dtype)
    adapter = lightning.LIGHTNING_ADAPTERS[0]
    assert adapter.matches(module)
    tol = {torch.float32: 1e-5, torch.float64: 1e-12}[dtype]
    ctx_type = Fp64Context if dtype == torch.float64 else LocalContext  # the interface's scan is fp32
    for masked in (False, True):
        inputs = _lightning_inputs(dtype, c, masked)
        truth, truth_state = lightning_reference(module, inputs["hidden_states"], inputs["attention_mask"])
        own, own_state = module(**inputs)
        for cuts in CUTS:
            errs = compare(adapter, module, inputs, T, cuts, ctx_type=ctx_type)  # output + grads vs the module
            assert max(errs.values()) <= tol, (masked, cuts, errs)
            out, state = adapter.forward(module, ctx_type(T, cuts), (), inputs)
            for mine, want, ref in ((out, own, truth), (state, own_state, truth_state)):
                scale = ref.abs().max()
                assert ((mine.double() - want.double()).abs().max() / scale).item() <= tol
                assert ((mine.double() - ref).abs().max() / scale).item() <= \
                    2 * ((want.double() - ref).abs().max() / scale).item() + tol


def test_lightning_matches_and_refusals():
    from seqpar.mixing import lightning
    module, c = _lightning(torch.float32)
    adapter = lightning.LIGHTNING_ADAPTERS[0]
    import transformers.models.minimax.modeling_minimax as m
    cfg = tiny_config("minimax")
    full = m.MiniMaxAttention(cfg, list(cfg.layer_types).index("full_attention"))
    assert not any(adapter.matches(o) for o in (full, _rg_block(torch.float32), module.qkv_proj))
    assert not any(a.matches(module) for a in rglru.RGLRU_ADAPTERS)
    ctx = LocalContext(T, (5,))
    inputs = _lightning_inputs(torch.float32, c, False)
    with pytest.raises(NotImplementedError, match="cache"):
        adapter.forward(module, ctx, (), dict(inputs, cache=object()))
    with pytest.raises(ValueError, match="attention_mask"):
        adapter.forward(module, ctx, (), dict(inputs, attention_mask=torch.ones(2, 1, T, T)))


# -- every adapter of this family on 4 thread-ranks (the distributed context: halo + entry states over a group)

S_DIST = 24  # zigzag over 4 ranks: chunks of 3 tokens (< a kernel-4 halo under packed documents of 1-2 tokens)
DOCS = (0, 2, 3, 13, 14, 24)


def _dist_mixers():
    """(name, module, adapter, its inputs over the whole sequence): packed documents, padding masks, seq_idx."""
    from seqpar.mixing import lightning, short_conv
    from test_short_conv import _inkling, _lfm

    g = torch.Generator().manual_seed(7)
    pos = torch.cat([torch.arange(b - a) for a, b in zip(DOCS, DOCS[1:])])[None]  # documents restart at 0
    mask = torch.ones(2, S_DIST, dtype=torch.long)
    mask[0, :4] = 0
    seq_idx = torch.cat([torch.full((b - a,), i) for i, (a, b) in enumerate(zip(DOCS, DOCS[1:]))])[None].expand(2, -1)
    lfm, c = _lfm("lfm2", torch.float32)
    dyn, cd = _inkling("inkling2_dynamic", torch.float32)
    light, cl = _lightning(torch.float32)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return [
        ("lfm2", lfm, short_conv.SHORT_CONV_ADAPTERS[0], {"hidden_states": rnd(2, S_DIST, c), "attention_mask": mask}),
        ("inkling2_dynamic", dyn, short_conv.SHORT_CONV_ADAPTERS[3],
         {"hidden_states": rnd(2, S_DIST, cd), "dynamic_input": rnd(2, S_DIST, 12), "conv_mask": mask,
          "seq_idx": seq_idx.contiguous()}),
        ("recurrent_gemma", _rg_block(torch.float32), rglru.RGLRU_ADAPTERS[0],
         {"input_states": rnd(2, S_DIST, 32), "position_ids": pos, "use_cache": False, "attention_mask": None}),
        ("lightning", light, lightning.LIGHTNING_ADAPTERS[0],
         {"hidden_states": rnd(2, S_DIST, cl), "position_embeddings": None, "attention_mask": mask}),
    ]


def _threaded_rank(ring, mixers, layouts):
    from seqpar.comm.threads import ThreadGroup
    from seqpar.layout import shard_tensor
    from seqpar.mixing.context import make_context

    group = ThreadGroup(ring)
    out = []
    for name, module, adapter, inputs, w in mixers:
        for layout in layouts:
            docs = DOCS if layout == "packed" else None
            local = {k: (shard_tensor(v, 1, group.rank, group.size, layout, docs) if torch.is_tensor(v) else v)
                     for k, v in inputs.items()}
            leaves = [k for k, v in local.items() if torch.is_tensor(v) and v.is_floating_point()]
            local.update({k: local[k].clone().requires_grad_() for k in leaves})
            y = first_output(adapter.forward(module, make_context(group, layout, S_DIST, docs), (), local))
            wl = shard_tensor(w, 1, group.rank, group.size, layout, docs)
            params = list(module.parameters())
            grads = torch.autograd.grad((y * wl).sum(), [local[k] for k in leaves] + params, allow_unused=True)
            out.append((name, layout, y.detach(), grads[:len(leaves)], grads[len(leaves):]))
    return out


def test_adapters_on_thread_ranks():
    """On 4 thread-ranks (ThreadGroup), contiguous / zigzag / packed: each adapter's output and input gradients on
    every rank equal the module's on the whole sequence at that rank's tokens, and the parameter gradients summed
    over ranks equal the module's (fp32, relative <= 1e-5)."""
    from seqpar.comm.threads import run_threads
    from seqpar.layout import shard_tensor

    layouts = ("contiguous", "zigzag", "packed")
    mixers = []
    for name, module, adapter, inputs in _dist_mixers():
        leaves = {k: v.clone().requires_grad_() for k, v in inputs.items() if torch.is_tensor(v) and
                  v.is_floating_point()}
        y = first_output(module(**{**inputs, **leaves}))
        w = torch.randn(y.shape, generator=torch.Generator().manual_seed(8))
        params = list(module.parameters())
        grads = torch.autograd.grad((y * w).sum(), list(leaves.values()) + params, allow_unused=True)
        mixers.append((name, module, adapter, inputs, w, y.detach(), grads[:len(leaves)], grads[len(leaves):]))

    def rel(a, b):
        return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()

    ranks = run_threads(_threaded_rank, 4, [m[:5] for m in mixers], layouts)
    for i, (name, module, _, _, _, y, xg, pg) in enumerate(mixers):
        for j, layout in enumerate(layouts):
            docs = DOCS if layout == "packed" else None
            sh = lambda t, r: shard_tensor(t, 1, r, 4, layout, docs)  # noqa: E731
            k = i * len(layouts) + j
            for r, res in enumerate(ranks):
                assert res[k][:2] == (name, layout)
                assert rel(res[k][2], sh(y, r)) <= 1e-5, (name, layout, r)
                for got, want in zip(res[k][3], xg):
                    assert rel(got, sh(want, r)) <= 1e-5, (name, layout, r)
            for pi, want in enumerate(pg):
                if want is None:
                    continue
                got = sum(torch.zeros_like(want) if res[k][4][pi] is None else res[k][4][pi] for res in ranks)
                assert rel(got, want) <= 1e-5, (name, layout, pi)


def test_probe_inputs():
    """Every adapter of this family gives its module's input width and a plain call on a probe's x (1, 32, width)
    that the module accepts and the adapter equals on 32 tokens cut at 5, 14, 23 (as parallelize's probe)."""
    from seqpar.mixing import lightning, short_conv
    from test_short_conv import ADAPTER, KINDS, _pick

    cases = [(short_conv.SHORT_CONV_ADAPTERS[ADAPTER[k]], _pick(k)(k, torch.float32)[0]) for k in KINDS]
    cases += [(rglru.RGLRU_ADAPTERS[0], _rg_block(torch.float32)),
              (lightning.LIGHTNING_ADAPTERS[0], _lightning(torch.float32)[0])]
    for adapter, module in cases:
        x = torch.randn(1, 32, adapter.input_width(module), generator=torch.Generator().manual_seed(9))
        args, kwargs = adapter.probe_inputs(module, x)
        xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
        want = first_output(module(xs[0], *args[1:], **kwargs))
        got = first_output(adapter.forward(module, LocalContext(32, (5, 14, 23)), (xs[1], *args[1:]), kwargs))
        w = torch.randn(want.shape, generator=torch.Generator().manual_seed(10))
        (want * w).sum().backward()
        (got * w).sum().backward()
        for a, b in ((got, want), (xs[1].grad, xs[0].grad)):
            assert ((a - b).abs().max() / b.abs().max()).item() <= 1e-5, adapter.name


def test_adapters_read_the_class_signature():
    """parallelize replaces a taken mixer's forward by an instance attribute (*args, **kwargs): the adapters bind
    a call against the class's forward, so a positional call still reads its arguments by name."""
    block = _rg_block(torch.float32)
    inputs = _rg_inputs(torch.float32, PACKED)
    want = first_output(block(**inputs))
    inner = block.forward
    block.forward = lambda *a, _inner=inner, **k: _inner(*a, **k)
    adapter = rglru.RGLRU_ADAPTERS[0]
    assert adapter.matches(block)
    got = first_output(adapter.forward(block, LocalContext(T, (5,)), (inputs["input_states"], inputs["position_ids"]),
                                       {"attention_mask": None, "use_cache": False}))
    assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-5
    with pytest.raises(TypeError, match="RecurrentGemmaRecurrentBlock"):
        adapter.forward(block, LocalContext(T, (5,)), (inputs["input_states"],), {"bogus": 1, "position_ids": 1,
                                                                                  "attention_mask": None, "x": 2,
                                                                                  "input_states": 3})
