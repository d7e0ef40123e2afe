"""Cases for tests/test_masks.py, run on every rank of a spawned gloo world.

Hugging Face models under ``seqpar.parallelize`` with masked batches (packed documents, padding, sliding
windows, soft-capping, lengths that do not divide) against independent single-process references:
the unmodified model with transformers' own masks (sdpa, or eager where sdpa refuses soft-capping),
and for packed documents the per-document truth: each document run alone, logits concatenated, the
loss on the packed labels. Each case returns plain numbers; the pytest side asserts.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

import seqpar
from dist_cases import counted_exchanges
from parallel_cases import mesh_for

_COMMON = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256)


def make_model(kind: str, seed: int = 0, attn: str = "sdpa"):
    import transformers

    torch.manual_seed(seed)
    if kind == "llama":
        cfg = transformers.LlamaConfig(**_COMMON, rope_theta=1000.0, attn_implementation=attn)
        return transformers.LlamaForCausalLM(cfg).float()
    if kind == "mistral":  # every layer a sliding window shorter than the sequence
        cfg = transformers.MistralConfig(**_COMMON, sliding_window=7, attn_implementation=attn)
        return transformers.MistralForCausalLM(cfg).float()
    if kind == "gptoss":  # attention sinks (s_aux) and sliding layers
        cfg = transformers.GptOssConfig(**_COMMON, head_dim=8, num_local_experts=2, num_experts_per_tok=1,
                                        sliding_window=6, attn_implementation="eager" if attn == "sdpa" else attn)
        return transformers.GptOssForCausalLM(cfg).float()
    if kind == "gemma2":  # sliding and full layers alternate (layer_types), logits soft-capped
        cfg = transformers.Gemma2Config(**_COMMON, head_dim=8, sliding_window=6, attn_logit_softcapping=2.0,
                                        final_logit_softcapping=None, query_pre_attn_scalar=8,
                                        attn_implementation="eager" if attn == "sdpa" else attn)
        return transformers.Gemma2ForCausalLM(cfg).float()
    raise ValueError(kind)


def _docs(S: int, seed: int) -> list[int]:
    """Document lengths summing to S: one long, length-1 ones, uneven ones."""
    g = torch.Generator().manual_seed(seed)
    lens = [1, S // 3, 1, 3]
    while sum(lens) < S:
        lens.append(min(int(torch.randint(1, 12, (1,), generator=g)), S - sum(lens)))
    return lens


def _packed_truth(model, ids: torch.Tensor, labels: torch.Tensor, lens: list[int]) -> torch.Tensor:
    """Per-document truth: each document alone (positions from 0), logits concatenated, the loss on the
    packed labels (target of token i = label i+1 of the packed row)."""
    logits, start = [], 0
    for n in lens:
        logits.append(model(input_ids=ids[:, start:start + n]).logits)
        start += n
    logits = torch.cat(logits, dim=1)  # (1, S, V)
    return F.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100)


def _batch(case: str, S: int, seed: int):
    """(full batch for shard_batch, reference loss function(model))."""
    g = torch.Generator().manual_seed(seed)
    if case in ("packed_positions", "flattening"):
        lens = _docs(S, seed)
        docs = [torch.randint(0, 64, (n,), generator=g) for n in lens]
        if case == "flattening":
            from transformers import DataCollatorWithFlattening

            collate = DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_position_ids=True)
            batch = {k: v for k, v in collate([{"input_ids": d.tolist()} for d in docs]).items()
                     if k in ("input_ids", "labels", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k",
                              "max_length_q", "max_length_k")}
            batch = {k: torch.as_tensor(v) if not isinstance(v, int) else v for k, v in batch.items()}
        else:
            ids = torch.cat(docs)[None]
            labels = ids.clone()
            starts = torch.tensor([0, *torch.tensor(lens).cumsum(0)[:-1].tolist()])
            labels[0, starts] = -100  # a document's first token is no target (as the flattening collator does)
            batch = {"input_ids": ids, "labels": labels,
                     "position_ids": torch.cat([torch.arange(n) for n in lens])[None]}
        return batch, lambda m: _packed_truth(m, batch["input_ids"], batch["labels"], lens)
    B = 2
    ids = torch.randint(0, 64, (B, S), generator=g)
    labels = ids.clone()
    labels[torch.rand(B, S, generator=g) < 0.2] = -100
    batch = {"input_ids": ids, "labels": labels}
    if case in ("right_pad", "left_pad"):
        mask = torch.ones(B, S, dtype=torch.long)
        cut = [S // 3, 5]  # row 0 keeps S - S//3 tokens, row 1 keeps S - 5
        for b, n in enumerate(cut):
            if case == "right_pad":
                mask[b, S - n:] = 0
            else:
                mask[b, :n] = 0
                # the first real token has no real token before it: only a pad position would predict it
                # (transformers' loss would count that target, shard_batch never lets a pad predict)
                labels[b, n] = -100
        labels[mask == 0] = -100
        batch["attention_mask"] = mask
    return batch, lambda m: m(**{k: v for k, v in batch.items()}).loss


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def hf_equivalence(rank, size, *, kind: str, case: str, S: int, layout: str = "zigzag", method: str = "ring",
                   checkpoint: bool = False):
    """Loss and every gradient of a parallelized model on a masked batch vs the single-process reference."""
    mesh = mesh_for(1, size)
    ref = make_model(kind)
    model = seqpar.parallelize(copy.deepcopy(ref), mesh, layout=layout, method=method, fsdp=False,
                               checkpoint=checkpoint)
    batch, ref_loss_fn = _batch(case, S, seed=7)
    want = ref_loss_fn(ref)
    want.backward()
    sharded = seqpar.shard_batch(batch, mesh, layout=layout)
    loss = model(**sharded).loss
    loss.backward()
    grads = dict(model.named_parameters())
    grad = max(_rel(grads[n].grad, p.grad) for n, p in ref.named_parameters() if p.grad is not None)
    return dict(loss=_rel(loss.detach(), want.detach()), grad=grad, loss_value=float(loss),
                want_value=float(want), packed="cu_seq_lens_q" in sharded)


# ----------------------------------------------------------------------------- seqpar.attention with masks

# (name, causal, window_size, documents, softcap); documents: None, "random" (lengths incl. 1), "span" (one
# document longer than a shard, crossing every rank), "ones" (several length-1 documents)
MASKS = [
    ("window_left", True, (5, -1), None, 0.0),
    ("window_both", False, (3, 2), None, 0.0),
    ("window_0", True, (0, -1), None, 0.0),
    ("window_1_both", False, (1, 1), None, 0.0),
    ("window_gt_S", True, (10_000, -1), None, 0.0),
    ("right_only", False, (-1, 4), None, 0.0),
    ("docs", True, (-1, -1), "random", 0.0),
    ("docs_full", False, (-1, -1), "random", 0.0),
    ("docs_span", True, (-1, -1), "span", 0.0),
    ("docs_ones", True, (-1, -1), "ones", 0.0),
    ("softcap", True, (-1, -1), None, 1.5),
    ("softcap_full", False, (-1, -1), None, 0.7),
    ("combined", True, (6, -1), "random", 2.0),
    ("combined_full", False, (4, 3), "span", 3.0),
]


def documents(kind: str | None, S: int, seed: int) -> list[int] | None:
    if kind is None:
        return None
    g = torch.Generator().manual_seed(seed)
    if kind == "span":
        return [0, 1, S - 2, S]  # a length-1 document, one across every rank, a short tail
    if kind == "ones":
        return [0, 1, 2, 3, S // 2, S // 2 + 1, S]
    cuts = sorted(set(torch.randint(1, S, (max(2, S // 6),), generator=g).tolist()))
    return [0, *cuts, S]


def truth_mask(S: int, causal: bool, window, cu) -> torch.Tensor:
    """(S, S) bool: query i sees key j; written from the definitions, not from seqpar."""
    i, j = torch.arange(S)[:, None], torch.arange(S)[None, :]
    vis = torch.ones(S, S, dtype=torch.bool)
    if causal:
        vis &= j <= i
    if window[0] >= 0:
        vis &= j >= i - window[0]
    if window[1] >= 0:
        vis &= j <= i + window[1]
    if cu is not None:
        doc = torch.zeros(S, dtype=torch.long)
        for n, (a, b) in enumerate(zip(cu, cu[1:])):
            doc[a:b] = n
        vis &= doc[:, None] == doc[None, :]
    return vis


def masked_grads(q, k, v, do, vis: torch.Tensor, softcap: float) -> list[torch.Tensor]:
    """[out, dq, dk, dv] of plain softmax attention (scale 1/sqrt(D)) with a visibility mask and a soft-cap,
    in the inputs' dtype, by autograd of the textbook formula (GQA by repeating K/V heads)."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    rep = q.shape[1] // k.shape[1]
    kr, vr = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = q @ kr.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    out = torch.softmax(s.masked_fill(~vis, float("-inf")), dim=-1) @ vr
    out.backward(do)
    return [out.detach(), q.grad, k.grad, v.grad]


def _group(method: str, size: int):
    if method == "hybrid":
        key = ("hybrid", size)
        if key not in _GROUPS:
            _GROUPS[key] = seqpar.init_mesh(cp=size, ulysses=2)
        return _GROUPS[key]
    return None


_GROUPS: dict = {}


def equivalence(rank, size, *, method: str, layout: str, Hq: int, Hkv: int, S: int, D: int = 16, B: int = 1,
                dtype=torch.float32, backend: str = "auto", masks=None):
    """Per mask of MASKS (or ``masks``): the numerics errors of seqpar vs the fp64 truth on this rank's shard."""
    from seqpar.testing import numerics

    group = _group(method, size)
    res = {}
    for name, causal, window, docs, softcap in (masks or MASKS):
        g = torch.Generator().manual_seed(len(name) * 31 + S)
        q = torch.randn(B, Hq, S, D, generator=g, dtype=torch.float64)
        k, v = (torch.randn(B, Hkv, S, D, generator=g, dtype=torch.float64) for _ in range(2))
        do = torch.randn(B, Hq, S, D, generator=g, dtype=torch.float64)
        cu = documents(docs, S, seed=S)
        vis = truth_mask(S, causal, window, cu)
        truth = masked_grads(q, k, v, do, vis, softcap)
        low = masked_grads(*(t.to(dtype) for t in (q, k, v, do)), vis, softcap)
        sh = lambda t: seqpar.shard(t, dim=2, layout=layout, group=group, cu_seqlens=cu)  # noqa: E731
        ql, kl, vl = (sh(t.to(dtype)).detach().requires_grad_() for t in (q, k, v))
        out = seqpar.attention(ql, kl, vl, group=group, is_causal=causal, enable_gqa=Hq != Hkv, layout=layout,
                               method=method, backend=backend, window_size=window,
                               cu_seqlens=None if cu is None else torch.tensor(cu), softcap=softcap)
        out.backward(sh(do.to(dtype)))
        res[name] = numerics.errors([out.detach(), ql.grad, kl.grad, vl.grad], [sh(t) for t in truth],
                                    [sh(t) for t in low])
    return res


def count_ring(rank, size, *, layout: str, S: int, window, cu=None, causal=True):
    """Ring exchanges (batch_isend_irecv calls) and kernel tiles (record hook) of one forward + backward."""
    from seqpar.api import AttentionCall, attend

    tiles = []
    with counted_exchanges() as calls:
        q = torch.randn(1, 2, S // size, 8, requires_grad=True)
        k = torch.randn(1, 2, S // size, 8, requires_grad=True)
        v = torch.randn(1, 2, S // size, 8, requires_grad=True)
        call = AttentionCall(is_causal=causal, layout=layout, window_size=window,
                             cu_seqlens=None if cu is None else torch.tensor(cu))
        out = attend(q, k, v, call, record=lambda r: tiles.append((r.phase, r.step)))
        fwd = len(calls)
        calls.clear()
        out.sum().backward()
        bwd = len(calls)
    return dict(fwd=fwd, bwd=bwd, fwd_tiles=sum(1 for p, _ in tiles if p == "forward"),
                bwd_tiles=sum(1 for p, _ in tiles if p == "backward"))


def sinks_equivalence(rank, size, *, layout: str, method: str = "ring", S: int = 32):
    """Attention sinks: out and dq/dk/dv/dsinks vs the textbook softmax with one extra zero-value logit."""
    from seqpar.testing import numerics

    g = torch.Generator().manual_seed(5)
    B, Hq, Hkv, D = 1, 4, 2, 16
    q = torch.randn(B, Hq, S, D, generator=g, dtype=torch.float64)
    k, v = (torch.randn(B, Hkv, S, D, generator=g, dtype=torch.float64) for _ in range(2))
    do = torch.randn(B, Hq, S, D, generator=g, dtype=torch.float64)
    sinks = torch.randn(Hq, generator=g, dtype=torch.float64)

    def ref(q, k, v, sinks):
        q, k, v, sinks = (t.detach().clone().requires_grad_() for t in (q, k, v, sinks))
        kr, vr = (t.repeat_interleave(Hq // Hkv, 1) for t in (k, v))
        s = (q @ kr.transpose(-1, -2) / math.sqrt(D)).masked_fill(~truth_mask(S, True, (-1, -1), None), float("-inf"))
        s = torch.cat([s, sinks[None, :, None, None].expand(B, Hq, S, 1)], dim=-1)
        out = torch.softmax(s, -1)[..., :-1] @ vr
        out.backward(do)
        return [out.detach(), q.grad, k.grad, v.grad, sinks.grad]

    truth, low = ref(q, k, v, sinks), ref(*(t.float() for t in (q, k, v, sinks)))
    group = _group(method, size)
    sh = lambda t: seqpar.shard(t, dim=2, layout=layout, group=group)  # noqa: E731
    ql, kl, vl = (sh(t.float()).detach().requires_grad_() for t in (q, k, v))
    sl = sinks.float().detach().requires_grad_()
    out = seqpar.attention(ql, kl, vl, group=group, is_causal=True, enable_gqa=True, layout=layout, method=method,
                           sinks=sl)
    out.backward(sh(do.float()))
    dsinks = sl.grad.clone()
    dist.all_reduce(dsinks)  # each rank holds its rows' part of the sink gradient
    res = numerics.errors([out.detach(), ql.grad, kl.grad, vl.grad], [sh(t) for t in truth[:4]],
                          [sh(t) for t in low[:4]])
    res["dsinks"] = dict(seqpar=(dsinks.double() - truth[4]).abs().max().item(),
                         sdpa=(low[4].double() - truth[4]).abs().max().item(), scale=truth[4].abs().max().item())
    return res
