"""Cases for tests/test_generate.py, run on every rank of a spawned gloo world.

The reference is the unmodified Hugging Face model's own ``generate`` in one process (torch SDPA,
transformers' DynamicCache), never seqpar code; merge numerics are checked against fp64 math.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.distributed as dist
import transformers

import seqpar
from seqpar.inference import KVShard, decode_attention, merge_across
from parallel_cases import mesh_for

VOCAB = 64
_BASE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=1024)
# name -> (config class, model class, config overrides)
MODELS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2_window": ("Qwen2Config", "Qwen2ForCausalLM",
                     dict(use_sliding_window=True, sliding_window=24, max_window_layers=0)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               dict(sliding_window=24, head_dim=8, query_pre_attn_scalar=8, attn_logit_softcapping=20.0,
                    final_logit_softcapping=15.0)),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM",
                dict(head_dim=8, sliding_window=24, num_local_experts=4, num_experts_per_tok=2)),
}


def build(name: str, dtype=torch.float32):
    cfg_cls, model_cls, over = MODELS[name]
    torch.manual_seed(0)
    cfg = getattr(transformers, cfg_cls)(**{**_BASE, **over})
    cfg._attn_implementation = "eager" if name in ("gemma2", "gpt_oss") else "sdpa"  # no SDPA path in these
    model = getattr(transformers, model_cls)(cfg).to(dtype).eval()
    with torch.no_grad():  # weights scaled up: the logits spread out (no near-ties), a wrong key shows
        for n, p in model.named_parameters():
            if p.ndim > 1 or "sinks" in n:
                p.mul_(3.0)
    return model


def prompt(S: int, B: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + S)
    return torch.randint(1, VOCAB, (B, S), generator=g)  # no 0: the pad token id


def _run(model, ids, n, **kw):
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=n, min_new_tokens=n, return_dict_in_generate=True,
                             output_logits=True, pad_token_id=0, **kw)
    return out.sequences, torch.stack(out.logits, dim=1)  # (B, S + n), (B, n, V)


def generate_equal(rank, size, *, name, layout="zigzag", S=150, n=12, B=1, do_sample=False, method="ring",
                   num_beams=1, merge=None):
    """(ids equal the single-process ids, ids equal on every rank, worst per-step logits rel error, balance)."""
    ref = build(name)
    model = seqpar.parallelize(copy.deepcopy(ref), mesh_for(1, size), layout=layout, method=method, fsdp=False)
    ids = prompt(S, B)
    kw = dict(do_sample=True, top_k=0, temperature=1.0) if do_sample else dict(do_sample=False)
    kw["num_beams"] = num_beams
    if merge is not None:
        from seqpar.inference import SeqparCache

        kw["cache"] = SeqparCache(mesh_for(1, size)["cp"], layout, merge=merge)
    torch.manual_seed(7)
    want_ids, want_logits = _run(ref, ids, n, **{k: v for k, v in kw.items() if k != "cache"})
    torch.manual_seed(7)
    got_ids, got_logits = _run(model, ids, n, **kw)
    rows = [torch.empty_like(got_ids) for _ in range(size)]
    dist.all_gather(rows, got_ids)
    rel = ((got_logits.double() - want_logits.double()).abs().amax() /
           want_logits.double().abs().amax()).item()
    return bool(torch.equal(got_ids, want_ids)), all(torch.equal(r, got_ids) for r in rows), rel


def balance(rank, size, *, S=37, n=23, layout="zigzag"):
    """Per-rank entries held by a full-attention layer after a prompt of S and n new tokens, and the window
    layer's (Qwen2, window 24: at most 24 entries in all ranks together, the last 24 positions)."""
    out = {}
    for name in ("llama", "qwen2_window"):
        model = seqpar.parallelize(build(name), mesh_for(1, size), layout=layout, fsdp=False)
        cache = seqpar.inference.SeqparCache(mesh_for(1, size)["cp"], layout)
        with torch.no_grad():
            model.generate(input_ids=prompt(S), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           cache=cache, pad_token_id=0)
        pos = cache.layers[0].shard.positions.tolist()
        out[name] = (cache.length, cache.held(), sorted(pos))
    return out


def _reference_row(q, k, v, p, *, window=-1, softcap=0.0, sinks=None):
    """fp64 reference: query p of q (B, Hq, S, D) over keys/values (B, Hkv, S, D) at the causal / window past
    ``max(0, p - window) .. p``, GQA heads repeated, soft-capped, a sink (one logit per head, value 0) joined
    -> (B, Hq, 1, D)."""
    Hq, Hkv, D = q.shape[1], k.shape[1], q.shape[-1]
    lo = 0 if window < 0 else max(0, p - window)
    kk = k[:, :, lo:p + 1].repeat_interleave(Hq // Hkv, 1)
    vv = v[:, :, lo:p + 1].repeat_interleave(Hq // Hkv, 1)
    sc = (q[:, :, p:p + 1] @ kk.transpose(-1, -2)) / math.sqrt(D)
    if softcap:
        sc = softcap * torch.tanh(sc / softcap)
    if sinks is not None:
        sc = torch.cat([sc, sinks[None, :, None, None].expand(q.shape[0], Hq, 1, 1)], dim=-1)
        vv = torch.cat([vv, torch.zeros_like(vv[:, :, :1])], dim=2)
    return torch.softmax(sc, dim=-1) @ vv


def kv_shard_decode(rank, size, *, S=40, n=9, window=-1, softcap=0.0, sinks=False, dtype=torch.float64,
                    via_attention=False):
    """Hand-written decode loop (KVShard + decode_attention) vs fp64 attention over the whole sequence: the
    worst error over the n steps (each new query at its position, its keys the whole causal / window past)."""
    g = torch.Generator().manual_seed(5)
    B, Hq, Hkv, D = 2, 4, 2, 8
    total = S + n
    q = torch.randn(B, Hq, total, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, total, D, generator=g, dtype=torch.float64) * 3
    v = torch.randn(B, Hkv, total, D, generator=g, dtype=torch.float64)
    s = torch.randn(Hq, generator=g, dtype=torch.float64) if sinks else None
    group = mesh_for(1, size)["cp"]
    shard = KVShard(group, "zigzag")
    pad = (-S) % (2 * size)
    kp = torch.cat([k[:, :, :S], torch.zeros(B, Hkv, pad, D, dtype=torch.float64)], dim=2)
    vp = torch.cat([v[:, :, :S], torch.zeros(B, Hkv, pad, D, dtype=torch.float64)], dim=2)
    local = lambda t: seqpar.shard(t.to(dtype), 2, group, "zigzag")  # noqa: E731
    opts = dict(window_size=(window, -1), softcap=softcap, enable_gqa=True, sinks=None if s is None else s.to(dtype))
    if via_attention:  # seqpar.attention(cache=): the prompt (S divides: no padding) runs the ring and fills
        assert pad == 0
        seqpar.attention(local(q[:, :, :S]), local(kp), local(vp), group=group, is_causal=True, cache=shard, **opts)
    else:
        shard.fill(local(kp), local(vp), S)
    worst = 0.0
    for p in range(S, total):
        new = [t[:, :, p:p + 1].to(dtype) for t in (q, k, v)]
        got = seqpar.attention(*new, group=group, is_causal=True, cache=shard, **opts) if via_attention else \
            decode_attention(*new, shard, **opts)
        want = _reference_row(q, k, v, p, window=window, softcap=softcap, sinks=s)
        worst = max(worst, ((got.double() - want).abs().max() / want.abs().max()).item())
    return worst, shard.held


def merge_numerics(rank, size, merge="all_gather"):
    """merge_across on partials of very different magnitudes (lse spread over ~200) and empty shards
    (lse = -inf, garbage out) vs the fp64 merge; -> worst rel error of out, worst abs error of lse."""
    g = torch.Generator().manual_seed(11)
    outs = torch.randn(size, 2, 3, 5, 7, generator=g, dtype=torch.float64)
    lses = torch.randn(size, 2, 3, 5, generator=g, dtype=torch.float64) * 60
    lses[1] = float("-inf")  # rank 1: nothing visible anywhere
    outs[1] = float("nan")  # never read
    lses[0, 0, 0, 0] = 300.0  # one rank dominates a row by e^hundreds
    lses[:, 1, 2, 3] = float("-inf")  # a row no rank saw
    from seqpar.inference import merge_tree

    fn = merge_tree if merge == "tree" else merge_across
    out, lse = fn(outs[rank].float(), lses[rank].float(), mesh_for(1, size)["cp"].get_group())
    w = torch.exp(lses - lses.max(0).values.nan_to_num(neginf=0.0))
    w = torch.where(torch.isneginf(lses), torch.zeros_like(w), w)
    den = w.sum(0)
    want = (w.unsqueeze(-1) * outs.nan_to_num(0.0)).sum(0) / den.clamp_min(1e-300).unsqueeze(-1)
    want_lse = torch.where(den > 0, lses.max(0).values + den.log(), torch.full_like(den, float("-inf")))
    seen = den > 0
    err = ((out.double() - want).abs()[seen].max() / want.abs().max()).item()
    lse_err = (lse.double() - want_lse)[seen].abs().max().item()
    empty_ok = bool(torch.isneginf(lse[~seen]).all() and (out[~seen] == 0).all())
    rows = [torch.empty_like(out) for _ in range(size)]
    dist.all_gather(rows, out.contiguous())
    return err, lse_err, empty_ok and all(torch.equal(r, out) for r in rows)  # bit-identical on every rank


def refusals(rank, size):
    """(case, exception type, message) of every bad input: each must raise on every rank, by name."""
    from transformers import DynamicCache

    from seqpar.inference import SeqparCache

    got = []
    mesh = mesh_for(1, size)
    model = seqpar.parallelize(build("llama"), mesh, layout="zigzag", fsdp=False)
    ids = prompt(20)

    def attempt(case, fn):
        try:
            fn()
        except (ValueError, TypeError) as e:
            got.append((case, type(e).__name__, str(e)))
        else:
            got.append((case, None, ""))

    with torch.no_grad():
        attempt("layout", lambda: model.generate(input_ids=ids, max_new_tokens=2,
                                                  cache=SeqparCache(mesh["cp"], "striped")))
        other = mesh_for(2, size // 2)["cp"]  # another mesh: cp = 2 (this rank's pair), not the model's 4
        attempt("group", lambda: model.generate(input_ids=ids, max_new_tokens=2, cache=SeqparCache(other, "zigzag")))
        user = DynamicCache()
        attempt("dynamic", lambda: model.generate(input_ids=ids, max_new_tokens=2, cache=user))
        attempt("padding", lambda: model.generate(input_ids=prompt(20, 2), attention_mask=torch.tensor(
            [[1] * 20, [1] * 17 + [0] * 3]), max_new_tokens=2))  # right padding
        attempt("empty_row", lambda: model.generate(input_ids=prompt(20, 2), attention_mask=torch.tensor(
            [[1] * 20, [0] * 20]), max_new_tokens=2))
        left = torch.tensor([[1] * 20, [0] * 3 + [1] * 17])
        rows = SeqparCache(mesh["cp"], "zigzag", chunk="pass_kv")
        model(input_ids=prompt(20, 2), attention_mask=left, cache=rows)  # a left-padded prompt: fine
        attempt("padding_warm", lambda: model(input_ids=prompt(1, 2), cache=rows, attention_mask=torch.ones(2, 21)))
        attempt("rows_pass_kv", lambda: model(input_ids=prompt(3, 2), cache=rows,
                                              attention_mask=torch.cat([left, torch.ones(2, 3, dtype=torch.long)], 1)))
        attempt("packed", lambda: SeqparCache(mesh["cp"], "packed"))
        cache = SeqparCache(mesh["cp"], "zigzag")
        model(input_ids=ids, cache=cache)
        attempt("labels", lambda: model(input_ids=ids[:, :1], cache=cache, labels=ids[:, :1]))
        attempt("crop", lambda: cache.crop(-21))  # more than the cache holds
        attempt("chunk", lambda: SeqparCache(mesh["cp"], "zigzag", chunk="ring"))
        attempt("merge", lambda: SeqparCache(mesh["cp"], "zigzag", merge="ring"))
        limit = model.config.max_position_embeddings
        attempt("positions", lambda: model.generate(input_ids=prompt(limit + 1), max_new_tokens=2))
        attempt("positions_warm", lambda: model(input_ids=prompt(limit - 19), cache=cache))
    return got


def chunk_fp64(rank, size, *, mode, S=40, T=13, n=3, window=-1, softcap=0.0, sinks=False, layout="zigzag",
               via_attention=False):
    """A prompt of S tokens prefilled, a chunk of T tokens on the warm cache (``mode``: "pass_q", the chunk
    replicated through decode_attention; "pass_kv", sharded through extend_sharded), then n single-token
    decode steps; -> the worst error of every chunk and decode query's output vs fp64 attention over the
    whole causal / window past (the shards' positions checked to cover every live token once)."""
    from seqpar.inference import extend_sharded
    from seqpar.layout import padding_needed

    g = torch.Generator().manual_seed(9)
    B, Hq, Hkv, D = 2, 4, 2, 8
    total = S + T + n
    q = torch.randn(B, Hq, total, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, total, D, generator=g, dtype=torch.float64) * 3
    v = torch.randn(B, Hkv, total, D, generator=g, dtype=torch.float64)
    s = torch.randn(Hq, generator=g, dtype=torch.float64) if sinks else None
    group = mesh_for(1, size)["cp"]
    shard = KVShard(group, layout)
    opts = dict(window_size=(window, -1), softcap=softcap, enable_gqa=True, sinks=s)

    def padded(t, lo, hi):  # tokens lo..hi-1, padded at the end to the layout's multiple, this rank's shard
        pad = padding_needed(hi - lo, layout, size)
        t = torch.cat([t[:, :, lo:hi], torch.zeros(*t.shape[:2], pad, D, dtype=t.dtype)], dim=2)
        return seqpar.shard(t, 2, group, layout)

    shard.fill(padded(k, 0, S), padded(v, 0, S), S)
    if mode == "pass_q":
        new = (q[:, :, S:S + T], k[:, :, S:S + T], v[:, :, S:S + T])
        got = seqpar.attention(*new, group=group, layout=layout, is_causal=True, cache=shard, **opts) \
            if via_attention else decode_attention(*new, shard, **opts)
        rows = list(range(S, S + T))
    else:
        local = extend_sharded(padded(q, S, S + T), padded(k, S, S + T), padded(v, S, S + T), shard, length=T,
                               **opts)
        full = seqpar.unshard(local.contiguous(), 2, group, layout)
        got, rows = full[:, :, :T], list(range(S, S + T))
    outs = [(got, rows)]
    for p in range(S + T, total):
        outs.append((decode_attention(q[:, :, p:p + 1], k[:, :, p:p + 1], v[:, :, p:p + 1], shard, **opts), [p]))
    worst = 0.0
    for out, ps in outs:
        for i, p in enumerate(ps):
            want = _reference_row(q, k, v, p, window=window, softcap=softcap, sinks=s)
            worst = max(worst, ((out[:, :, i:i + 1] - want).abs().max() / want.abs().max()).item())
    held = [torch.empty(0, dtype=torch.long)] * size
    sizes = [r[0] for r in seqpar.comm.gather_ints([shard.held], group.get_group())]
    pos = torch.full((max(sizes),), -1, dtype=torch.long)
    pos[:shard.held] = shard.positions
    rows_ = [torch.empty_like(pos) for _ in range(size)]
    dist.all_gather(rows_, pos, group=group.get_group())
    held = sorted(int(x) for r in rows_ for x in r if x >= 0)
    live = list(range(0 if window < 0 else total - 1 - window, total))
    return worst, held == live, shard.length


def _chunked(model, ids, S1, n, cache):
    """A prompt of S1 tokens, then the rest of ``ids`` as one chunk on the warm cache, then n greedy tokens:
    -> (the chunk's last-token logits, then each decode step's) (B, 1 + n, V) and the n tokens (B, n)."""
    with torch.no_grad():
        model(input_ids=ids[:, :S1], cache=cache, use_cache=True)
        logits = [model(input_ids=ids[:, S1:], cache=cache, use_cache=True).logits[:, -1:]]
        tokens = []
        for _ in range(n):
            nxt = logits[-1][:, -1].argmax(-1, keepdim=True)
            tokens.append(nxt)
            logits.append(model(input_ids=nxt, cache=cache, use_cache=True).logits[:, -1:])
    return torch.cat(logits, dim=1), torch.cat(tokens, dim=1)


def chunk_equal(rank, size, *, name, S1=70, T=40, n=4, layout="zigzag", B=1):
    """A chunk of T tokens after a prompt of S1 on a parallelized model, by pass-Q and by pass-KV, vs the
    unmodified model with its own DynamicCache in one process: -> (worst logits rel error pass-Q, pass-KV,
    pass-Q vs pass-KV, tokens equal the reference's for both, ``auto``'s choice ran)."""
    from transformers import DynamicCache

    from seqpar.inference import SeqparCache

    ref = build(name)
    mesh = mesh_for(1, size)
    model = seqpar.parallelize(copy.deepcopy(ref), mesh, layout=layout, fsdp=False)
    ids = prompt(S1 + T, B)
    want, want_tok = _chunked(ref, ids, S1, n, DynamicCache())
    got = {}
    for mode in ("pass_q", "pass_kv", "auto"):
        got[mode] = _chunked(model, ids, S1, n, SeqparCache(mesh["cp"], layout, chunk=mode))

    def rel(a, b):
        return ((a.double() - b.double()).abs().amax() / b.double().abs().amax()).item()

    return (rel(got["pass_q"][0], want), rel(got["pass_kv"][0], want), rel(got["pass_q"][0], got["pass_kv"][0]),
            all(torch.equal(got[m][1], want_tok) for m in got))


def generate_warm(rank, size, *, name="llama", S1=40, more=25, n=6, lengths=None):
    """generate on a cache warm from an earlier generate call (the whole sequence passed again, HF slices the
    uncached tail: a chunk on the warm cache) vs single-process generate continuing its DynamicCache;
    ``lengths``: a first prompt of left-padded rows of those lengths (the chunk then runs replicated, pass-Q)."""
    from transformers import DynamicCache

    from seqpar.inference import SeqparCache

    ref = build(name)
    mesh = mesh_for(1, size)
    model = seqpar.parallelize(copy.deepcopy(ref), mesh, layout="zigzag", fsdp=False)
    ids, mask = (prompt(S1), None) if lengths is None else left_padded(lengths)
    extra = prompt(more + 1000, ids.shape[0])[:, :more]
    outs = []
    for m, cache in ((ref, DynamicCache()), (model, SeqparCache(mesh["cp"], "zigzag"))):
        with torch.no_grad():
            first = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, cache=cache, pad_token_id=0)
            both = torch.cat([first, extra], dim=1)
            second = m.generate(input_ids=both, max_new_tokens=n, min_new_tokens=n, do_sample=False, cache=cache,
                                pad_token_id=0, attention_mask=None if mask is None else torch.cat(
                                    [mask, torch.ones(mask.shape[0], both.shape[1] - mask.shape[1], dtype=mask.dtype)],
                                    dim=1))
        outs.append(second)
    return bool(torch.equal(outs[0], outs[1]))


def assisted_equal(rank, size, *, name="llama", S=45, n=10):
    """Assisted decoding (a small assistant drafts tokens; the parallelized model verifies a draft as a chunk on
    its warm cache, pass-Q, and crops what it rejects) vs single-process assisted and plain greedy generate:
    -> (ids equal single-process assisted, ids equal plain greedy, (every rank's held positions, cache length))."""
    from seqpar.inference import SeqparCache

    ref = build(name)
    mesh = mesh_for(1, size)
    model = seqpar.parallelize(copy.deepcopy(ref), mesh, layout="zigzag", fsdp=False)
    torch.manual_seed(3)
    asst = build(name)
    with torch.no_grad():  # a different assistant: some drafts are rejected, so the cache is cropped
        for p in asst.parameters():
            p.add_(0.3 * torch.randn_like(p))
    ids = prompt(S)
    kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    cache = SeqparCache(mesh["cp"], "zigzag")
    with torch.no_grad():
        want = ref.generate(input_ids=ids, assistant_model=asst, **kw)
        plain = ref.generate(input_ids=ids, **kw)
        got = model.generate(input_ids=ids, assistant_model=asst, cache=cache, **kw)
    shard = cache.layers[0].shard
    rows = [torch.empty(0)] * size
    dist.all_gather_object(rows, shard.positions.tolist(), group=mesh["cp"].get_group())
    held = sorted(p for r in rows for p in r)
    return bool(torch.equal(got, want)), bool(torch.equal(got, plain)), (held, cache.length)


def left_padded(lengths) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``lengths`` tokens, left-padded with the pad id 0 to the longest: (ids (B, S), mask (B, S))."""
    S = max(lengths)
    ids = torch.zeros(len(lengths), S, dtype=torch.long)
    mask = torch.zeros(len(lengths), S, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, S - n:] = prompt(n)[0]
        mask[b, S - n:] = 1
    return ids, mask


def padded_equal(rank, size, *, name, lengths=(37, 60, 81), n=8, layout="zigzag", num_beams=1, do_sample=False):
    """generate on a left-padded batch of rows of different lengths (HF's attention_mask with zeros) on a
    parallelized model vs the unmodified model's own generate on the same padded batch in one process:
    -> (ids equal, ids equal on every rank, worst per-step logits rel error)."""
    ref = build(name)
    model = seqpar.parallelize(copy.deepcopy(ref), mesh_for(1, size), layout=layout, fsdp=False)
    ids, mask = left_padded(lengths)
    kw = dict(attention_mask=mask, num_beams=num_beams, do_sample=do_sample)
    if do_sample:
        kw.update(top_k=0, temperature=1.0)
    torch.manual_seed(7)
    want_ids, want_logits = _run(ref, ids, n, **kw)
    torch.manual_seed(7)
    got_ids, got_logits = _run(model, ids, n, **kw)
    rows = [torch.empty_like(got_ids) for _ in range(size)]
    dist.all_gather(rows, got_ids)
    rel = ((got_logits.double() - want_logits.double()).abs().amax() / want_logits.double().abs().amax()).item()
    return bool(torch.equal(got_ids, want_ids)), all(torch.equal(r, got_ids) for r in rows), rel


def kv_shard_rows_fp64(rank, size, *, lengths=(13, 29, 40), n=6, T=1, window=-1, softcap=0.0, layout="zigzag"):
    """A hand-written loop on rows of different lengths: KVShard.fill(lengths=) of the rows left-justified (the
    padding after each row filled with large random keys), then steps of T new tokens per row (decode_attention,
    the same slots for every row) -> the worst error vs fp64 attention of each row over its own sequence alone
    (its position p sees its positions max(0, p - window) .. p)."""
    from seqpar.layout import padding_needed

    g = torch.Generator().manual_seed(13)
    B, Hq, Hkv, D, W = len(lengths), 4, 2, 8, max(lengths)
    steps = n * T
    seqs = []  # each row's own sequence: q, k, v (Hq / Hkv, L_b + steps, D)
    for L in lengths:
        seqs.append((torch.randn(Hq, L + steps, D, generator=g, dtype=torch.float64),
                     torch.randn(Hkv, L + steps, D, generator=g, dtype=torch.float64) * 3,
                     torch.randn(Hkv, L + steps, D, generator=g, dtype=torch.float64)))
    pad = padding_needed(W, layout, size)
    k = torch.randn(B, Hkv, W + pad, D, generator=g, dtype=torch.float64) * 30  # the padding: large, must not count
    v = torch.randn(B, Hkv, W + pad, D, generator=g, dtype=torch.float64) * 30
    for b, L in enumerate(lengths):
        k[b, :, :L], v[b, :, :L] = seqs[b][1][:, :L], seqs[b][2][:, :L]
    group = mesh_for(1, size)["cp"]
    shard = KVShard(group, layout)
    shard.fill(seqpar.shard(k, 2, group, layout), seqpar.shard(v, 2, group, layout), W,
               lengths=torch.tensor(lengths))
    opts = dict(window_size=(window, -1), softcap=softcap, enable_gqa=True)
    worst = 0.0
    for t in range(0, steps, T):
        new = [torch.stack([s[i][:, L + t:L + t + T] for s, L in zip(seqs, lengths)]) for i in range(3)]
        got = decode_attention(*new, shard, **opts)  # (B, Hq, T, D)
        for b, L in enumerate(lengths):
            q_, k_, v_ = seqs[b]
            for i in range(T):
                p = L + t + i
                want = _reference_row(q_[None], k_[None], v_[None], p, window=window, softcap=softcap)[0]
                worst = max(worst, ((got[b, :, i:i + 1] - want).abs().max() / want.abs().max()).item())
    return worst, shard.held
