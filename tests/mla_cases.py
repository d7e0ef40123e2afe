"""Cases for tests/test_mla.py: v with its own head dim (MLA: DeepSeek-V2/V3, MiniCPM3), run on every rank
of a spawned gloo world. The truth is plain attention math in fp64 on the whole sequence (:func:`attend`),
written here from the definitions, never seqpar code; the error budget is seqpar.testing.numerics'
(2x the same math in the test dtype + a floor). Each case returns plain numbers; the pytest side asserts.
"""

from __future__ import annotations

import copy
import math
import traceback

import torch
import torch.distributed as dist

import seqpar
from compile_cases import check_ops
from seqpar.testing.numerics import tile_visible

# the masks of the grid: is_causal, window_size, cu_seqlens (global offsets of S = 16), softcap, sinks
MASKS: dict[str, dict] = {
    "full": dict(causal=False),
    "causal": dict(causal=True),
    "window": dict(causal=True, window=(5, -1)),  # shorter than the ranks' distance: skipped tiles, early stop
    "band": dict(causal=False, window=(3, 2)),  # two-sided, not causal
    "docs": dict(causal=True, cu=(0, 5, 6, 13, 16)),
    "softcap": dict(causal=True, softcap=1.5),
    "sinks": dict(causal=True, sinks=True),
}
S_GLOBAL = 16


def visibility(S: int, causal: bool, window=(-1, -1), cu=None) -> torch.Tensor:
    """(S, S) bool: query i sees key j (causal j <= i; window i - left <= j <= i + right; same document)."""
    i = torch.arange(S)[:, None]
    j = torch.arange(S)[None, :]
    vis = torch.ones(S, S, dtype=torch.bool)
    if causal:
        vis &= j <= i
    left, right = window
    if left >= 0:
        vis &= j >= i - left
    if right >= 0:
        vis &= j <= i + right
    if cu is not None:
        doc = torch.zeros(S, dtype=torch.long)
        for d, (a, b) in enumerate(zip(cu, cu[1:])):
            doc[a:b] = d
        vis &= doc[:, None] == doc[None, :]
    return vis


def attend(q, k, v, *, vis, scale, softcap=0.0, sinks=None):
    """Plain softmax attention: q (B, Hq, S, D), k (B, Hkv, S, D), v (B, Hkv, S, Dv) -> (B, Hq, S, Dv).
    GQA: q head h reads kv head h // (Hq / Hkv); scores soft-capped ``softcap * tanh(s / softcap)``;
    ``sinks`` (Hq,): one extra logit per head with value 0 in every row's softmax."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = q @ k.transpose(-1, -2) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~vis, float("-inf"))
    if sinks is not None:
        s = torch.cat([s, sinks[None, :, None, None].expand(*s.shape[:-1], 1)], dim=-1)
    empty = torch.isneginf(s).all(-1, keepdim=True)  # a row that sees no key (and no sink): output 0
    p = torch.softmax(s.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    if sinks is not None:
        p = p[..., :-1]
    return p @ v


def _grads(q, k, v, do, sinks, **kw):
    """[out, dq, dk, dv(, dsinks)] of :func:`attend` in the inputs' dtype."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    s = None if sinks is None else sinks.detach().clone().requires_grad_()
    out = attend(*leaves, sinks=s, **kw)
    out.backward(do)
    return [out.detach(), *(t.grad for t in leaves), *([] if s is None else [s.grad])]


_MESHES: dict = {}


def _group(method: str, size: int):
    """The group argument: the default group, or method="hybrid"'s mesh init_mesh(cp=P, ulysses=2)."""
    if method != "hybrid":
        return None
    if "hybrid" not in _MESHES:
        _MESHES["hybrid"] = seqpar.init_mesh(cp=size, ulysses=2 if size % 2 == 0 else 1)
    return _MESHES["hybrid"]


def attention_case(rank, size, *, method, layout, backend, mask, D, Dv, B=1, Hq=4, Hkv=2, dtype=torch.float32,
                   seed=0) -> dict:
    """seqpar.attention with v of head dim Dv vs the fp64 truth on the whole sequence: per-tensor errors on
    this rank's shard (out, dq, dk, dv, and dsinks summed over every rank)."""
    m = MASKS[mask]
    S = S_GLOBAL
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(B, Hq, S, D, generator=g, dtype=torch.float64), torch.randn(B, Hkv, S, D, generator=g,
                                                                                   dtype=torch.float64)
    v, do = torch.randn(B, Hkv, S, Dv, generator=g, dtype=torch.float64), torch.randn(B, Hq, S, Dv, generator=g,
                                                                                     dtype=torch.float64)
    sinks = torch.randn(Hq, generator=g, dtype=torch.float64) if m.get("sinks") else None
    scale = 1.0 / math.sqrt(D)
    kw = dict(vis=visibility(S, m["causal"], m.get("window", (-1, -1)), m.get("cu")), scale=scale,
              softcap=m.get("softcap", 0.0))
    truth = _grads(q, k, v, do, sinks, **kw)
    low = _grads(*(t.to(dtype) for t in (q, k, v, do)), None if sinks is None else sinks.to(dtype), **kw)

    cu = m.get("cu")
    sh = lambda t: seqpar.shard(t, dim=2, layout=layout, cu_seqlens=cu)  # noqa: E731
    ql, kl, vl = (sh(t.to(dtype)).detach().requires_grad_() for t in (q, k, v))
    sl = None if sinks is None else sinks.to(dtype).detach().requires_grad_()
    out = seqpar.attention(ql, kl, vl, group=_group(method, size), is_causal=m["causal"], enable_gqa=Hq != Hkv,
                           layout=layout, method=method, backend=backend, window_size=m.get("window", (-1, -1)),
                           cu_seqlens=None if cu is None else torch.tensor(cu), softcap=m.get("softcap", 0.0),
                           sinks=sl)
    assert out.shape == (B, Hq, S // size, Dv) and out.dtype == dtype, (out.shape, out.dtype)
    out.backward(sh(do.to(dtype)))
    mine = [out.detach(), ql.grad, kl.grad, vl.grad]
    assert [t.shape for t in mine[1:]] == [ql.shape, kl.shape, vl.shape]
    if sl is not None:
        dsinks = sl.grad.clone()
        dist.all_reduce(dsinks)  # each rank's rows; the parameter's gradient sums the ranks
        mine.append(dsinks)
    names = ("out", "dq", "dk", "dv", "dsinks")
    res = {}
    for i, (name, m_, t, lo) in enumerate(zip(names, mine, truth, low)):
        if name != "dsinks":
            t, lo = sh(t), sh(lo)
        res[name] = dict(seqpar=(m_.double() - t).abs().max().item(), sdpa=(lo.double() - t).abs().max().item(),
                         scale=t.abs().max().item())
    return res


def grid(rank, size, *, cases: list[dict]) -> list:
    """Many :func:`attention_case` calls in one round trip: per case its result, or ``{"error": traceback}``."""
    out = []
    for c in cases:
        try:
            out.append(attention_case(rank, size, **c))
        except Exception:  # noqa: BLE001 - reported per case; valid inputs fail on every rank alike
            out.append({"error": traceback.format_exc()})
    return out


def disagree_dv(rank, size) -> tuple:
    """Ranks whose v head dims differ: every rank must raise (the agreement compares Dv)."""
    q = torch.randn(1, 2, 4, 8)
    v = torch.randn(1, 2, 4, 8 if rank == 0 else 6)
    try:
        seqpar.attention(q, q.clone(), v, is_causal=True, layout="zigzag", group=dist.new_group(list(range(size))))
    except (ValueError, TypeError) as e:
        return type(e).__name__, str(e)
    return None, ""


def replay(rank, size, *, method) -> float:
    """A kept (out, lse) with Dv columns replays (no forward communication) and gives the same gradients."""
    from seqpar.api import AttentionCall, attend

    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(1, 4, 4, 12, generator=g), torch.randn(1, 2, 4, 12, generator=g)
    v = torch.randn(1, 2, 4, 8, generator=g)
    call = AttentionCall(is_causal=True, enable_gqa=True, layout="zigzag", method=method)
    grads = []
    kept = None
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        res = attend(*leaves, call, return_lse=True, kept=kept)
        out, lse = res
        kept = (out.detach(), lse.detach())
        out.square().sum().backward()
        grads.append([t.grad for t in leaves])
    return max((a - b).abs().max().item() for a, b in zip(*grads))


# ---------------------------------------------------------------------------------------------- kernels alone

def tile_masks() -> dict:
    from seqpar.kernels import TileMask

    return {"full": TileMask("full"), "causal": TileMask("causal"), "strict": TileMask("strict"),
            "band": TileMask("causal", lo=-3), "window": TileMask("full", lo=-2, hi=3),
            "docs": TileMask("causal", docs=(((0, 4, 7), (4, 10, 9)), ((0, 6, 7), (6, 10, 9)))),
            "softcap": TileMask("causal", softcap=1.5)}


def _lse(q, k, *, vis, scale, softcap=0.0):
    rep = q.shape[1] // k.shape[1]
    s = q @ k.repeat_interleave(rep, 1).transpose(-1, -2) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    return torch.logsumexp(s.masked_fill(~vis, float("-inf")), dim=-1)


def kernel_case(backend: str, mask_name: str, D: int, Dv: int, dtype=torch.float32, Sq: int = 10, Sk: int = 10,
                seed: int = 0) -> dict:
    """One tile on ``backend`` with v of head dim Dv: block_attention, its backward and
    block_attention_accumulate (into a strided running state) vs the fp64 truth; per-tensor errors."""
    from seqpar.kernels import block_attention, block_attention_accumulate, block_attention_backward

    mask = tile_masks()[mask_name]
    g = torch.Generator().manual_seed(seed)
    B, Hq, Hkv = 1, 4, 2
    q, k = torch.randn(B, Hq, Sq, D, generator=g, dtype=torch.float64), torch.randn(B, Hkv, Sk, D, generator=g,
                                                                                    dtype=torch.float64)
    v, do = torch.randn(B, Hkv, Sk, Dv, generator=g, dtype=torch.float64), torch.randn(B, Hq, Sq, Dv, generator=g,
                                                                                      dtype=torch.float64)
    ka, va = torch.randn(B, Hkv, 7, D, generator=g, dtype=torch.float64), torch.randn(B, Hkv, 7, Dv, generator=g,
                                                                                      dtype=torch.float64)
    scale = D ** -0.5
    vis = tile_visible(mask, Sq, Sk)
    kw = dict(vis=vis, scale=scale, softcap=mask.softcap)
    truth, low = _grads(q, k, v, do, None, **kw), _grads(*(t.to(dtype) for t in (q, k, v, do)), None, **kw)
    lse_truth = _lse(q, k, **kw)
    x = [t.to(dtype) for t in (q, k, v, do)]
    out, lse = block_attention(*x[:3], mask=mask, scale=scale, backend=backend)
    grads = block_attention_backward(x[3], *x[:3], out.to(dtype), lse, mask=mask, scale=scale, backend=backend)
    assert out.shape == (B, Hq, Sq, Dv) and [t.shape for t in grads] == [q.shape, k.shape, v.shape]
    # accumulate: a running state of a first block (ka, va; every key visible) then this tile merged in place
    full = torch.ones(Sq, 7, dtype=torch.bool)
    acc = torch.float64 if dtype == torch.float64 else torch.float32  # the running state's dtype
    acc_out = torch.zeros(B, Hq, Sq + 2, Dv + 3, dtype=acc)  # strided views, as the ring's half tiles
    o_view, l_view = acc_out[:, :, 1:-1, 2:-1], torch.zeros(B, Hq, Sq + 1, dtype=acc)[:, :, 1:]
    o_view.copy_(attend(q, ka, va, vis=full, scale=scale, softcap=mask.softcap))
    l_view.copy_(_lse(q, ka, vis=full, scale=scale, softcap=mask.softcap))
    block_attention_accumulate(*x[:3], o_view, l_view, mask=mask, scale=scale, backend=backend)
    both = dict(vis=torch.cat([full, vis], 1), scale=scale, softcap=mask.softcap)
    acc_truth = attend(q, torch.cat([ka, k], 2), torch.cat([va, v], 2), **both)
    acc_low = attend(*(t.to(dtype) for t in (q, torch.cat([ka, k], 2), torch.cat([va, v], 2))), **both)
    seen = vis.any(1)
    res = {}
    for name, m_, t, lo in (("out", out, truth[0], low[0]), ("dq", grads[0], truth[1], low[1]),
                            ("dk", grads[1], truth[2], low[2]), ("dv", grads[2], truth[3], low[3]),
                            ("acc_out", o_view, acc_truth, acc_low)):
        res[name] = dict(seqpar=(m_.double() - t).abs().max().item(), sdpa=(lo.double() - t).abs().max().item(),
                         scale=t.abs().max().item())
    res["lse"] = dict(seqpar=(lse.double() - lse_truth)[..., seen].abs().max().item(), sdpa=0.0,
                      scale=lse_truth[..., seen].abs().max().item())
    res["untouched"] = float(acc_out[:, :, [0, -1]].abs().max() + acc_out[..., [0, 1, -1]].abs().max())
    return res


def kernel_grid(rank, size, *, cases: list[dict]) -> list:
    """Rank 0 runs every :func:`kernel_case` (the others return []): the Triton interpreter in this world."""
    if rank != 0:
        return []
    out = []
    for c in cases:
        try:
            out.append(kernel_case(**c))
        except Exception:  # noqa: BLE001
            out.append({"error": traceback.format_exc()})
    return out


# ---------------------------------------------------------------------------------------------- torch.compile

def opcheck(rank, size, *, method: str) -> list[str]:
    """torch.library.opcheck of every seqpar op with v of its own head dim (fake shapes, autograd, dispatch)."""
    from seqpar.methods import ops

    g = torch.Generator().manual_seed(0)
    S = 4 * size
    q, k, v = (torch.randn(1, h, S, d, generator=g) for h, d in ((4, 12), (2, 12), (2, 8)))
    ql, kl, vl = (seqpar.shard(t, dim=2, layout="zigzag").contiguous().requires_grad_() for t in (q, k, v))
    call = (method, ops.group_name(dist.group.WORLD), "zigzag", True, [-1, -1], 0.0, 12 ** -0.5, "aten")
    out = ops.attention_fwd(ql, kl, vl, *call)[0]
    assert out.shape[-1] == 8, out.shape
    return check_ops(ql, kl, vl, call, g)


def compiled(rank, size, *, method: str) -> dict:
    """torch.compile(fullgraph, aot_eager) of a function calling seqpar.attention with Dv != D vs eager:
    {"diff": max |compiled - eager| over out, dq, dk, dv, "shape": the output's shape}."""
    import torch._dynamo

    torch._dynamo.reset()
    g = torch.Generator().manual_seed(1)
    S = 4 * size
    q, k, v, do = (torch.randn(1, h, S, d, generator=g) for h, d in ((4, 12), (2, 12), (2, 8), (4, 8)))
    sh = lambda t: seqpar.shard(t, dim=2, layout="zigzag")  # noqa: E731

    def f(q, k, v):
        return seqpar.attention(q, k, v, is_causal=True, enable_gqa=True, layout="zigzag", method=method)

    res = []
    for fn in (torch.compile(f, fullgraph=True, backend="aot_eager"), f):
        ql, kl, vl = (sh(t).detach().requires_grad_() for t in (q, k, v))
        out = fn(ql, kl, vl)
        out.backward(sh(do))
        res.append([out.detach(), ql.grad, kl.grad, vl.grad])
    return dict(diff=max((a - b).abs().max().item() for a, b in zip(*res)), shape=list(res[0][0].shape))


# ---------------------------------------------------------------------------------------------- DeepSeek-V3

def deepseek_model(seed: int = 0):
    """A tiny DeepseekV3ForCausalLM: q/k head dim 8 + 4 = 12, v head dim 8 (MLA), MoE from layer 1."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    cfg = DeepseekV3Config(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=None,
                           kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                           n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1, n_shared_experts=1,
                           first_k_dense_replace=1, max_position_embeddings=128, attn_implementation="sdpa")
    return DeepseekV3ForCausalLM(cfg).float()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def deepseek(rank, size, *, layout: str, method: str, checkpoint: bool = False, S: int = 32) -> dict:
    """Loss and every gradient of a parallelized tiny DeepSeek-V3 (cp = every rank; ``checkpoint``: the
    blocks' recomputation replays the kept attention forward) vs the single-process model."""
    ref = deepseek_model()
    mesh = seqpar.init_mesh(cp=size)
    model = seqpar.parallelize(copy.deepcopy(ref), mesh, layout=layout, method=method, fsdp=False,
                               checkpoint=checkpoint)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 64, (2, S), generator=g)
    labels = ids.clone()
    labels[:, : S // 4] = -100
    ref_loss = ref(input_ids=ids, labels=labels).loss
    ref_loss.backward()
    loss = model(**seqpar.shard_batch({"input_ids": ids, "labels": labels}, mesh, layout=layout)).loss
    loss.backward()
    got = dict(model.named_parameters())
    grad = max(_rel(got[n].grad, p.grad) for n, p in ref.named_parameters() if p.grad is not None)
    return dict(loss=_rel(loss.detach(), ref_loss.detach()), grad=grad)
