"""Generate on a sharded sequence: a parallelized HF model's forward with a KV cache (``generate``).

Root forward hooks, registered with the attention pass (HF models only). A forward with a cache (or
``use_cache=True``) runs on a :class:`seqpar.inference.SeqparCache`; every rank passes the whole
input (token ids are cheap), and the hooks shard it:

- **prefill** (the cache is empty): the prompt (B, S) is padded at the end to the layout's multiple
  (the padding comes after every real token, so causally no real token sees it, and the cache never
  keeps it), this rank's shard of it runs with global ``position_ids`` through the model's ring
  attention, and each layer's cache keeps this rank's K/V; only the last real token's logits are
  computed (``logits_to_keep``, on the rank that holds it) and broadcast: (B, 1, V) on every rank;
- **decode** (one new token, replicated): positions continue the global count, each layer's new K/V
  goes to one rank (least loaded), the attention merges every rank's partial result exactly
  (:mod:`seqpar.inference.decode`), and rank 0's logits are broadcast so every rank samples from the
  same numbers (with the same seed: the same tokens);
- **a chunk on a warm cache** (several new tokens: a later prompt turn, ``generate`` continuing a cache):
  ``"pass_q"`` runs it replicated like a decode step of T tokens; ``"pass_kv"`` shards it like a prompt
  (positions continue the cache) and each layer runs :func:`seqpar.inference.extend_sharded`; the
  cache's ``chunk`` option picks, ``"auto"`` by the cost model (:func:`seqpar.plan_inference.choose_chunk`
  with the model's shape). Either way the last token's logits come back, the same on every rank (the last
  k tokens' with ``logits_to_keep=k``, as assisted decoding asks: sharded, each rank's rows of them summed
  into place over the ranks; ``SeqparCache.crop`` rolls a rejected draft back).

Rows of different lengths (``generate(input_ids, attention_mask=...)`` with left padding): the prefill
runs each row left-justified (its real tokens first, numbered from 0 as ``generate`` numbers them from
the mask, its padding moved after them: causally unseen) through the same ring, each row's last-token
logits summed into place from the rank holding it; the cache keeps the rows' lengths, and every later
token (the same slot in every row) attends each row's own entries only, at its own positions
(:meth:`seqpar.inference.KVShard.row_positions`); a chunk on such a cache runs replicated (pass-Q)::

    HF's batch (left padding)      prefilled (left-justified)      row positions, then decode slots
      . . . a b c d                  a b c d . . .                   0 1 2 3 - - - | 4 5 ...
      x y z u v w s                  x y z u v w s                   0 1 2 3 4 5 6 | 7 8 ...

``generate``'s own default cache (an empty ``DynamicCache`` it made itself) is replaced by a
``SeqparCache`` in the first forward, and the model's output carries it back to ``generate``. A
cache the user made of another kind, a mask with zeros that is not left padding of the first prompt
(right padding, holes, empty rows, new padding on a warm cache: ``_left_padding``), a sequence longer
than the model's ``max_position_embeddings``, ``inputs_embeds`` and labels in a cached forward are
refused by name, on every rank before any communication.
"""

from __future__ import annotations

import inspect

import torch
import torch.distributed as dist
from torch import nn

from seqpar.layout import global_indices, padding_needed, shard_tensor
from seqpar.passes.runtime import Runtime

__all__ = ["generate_pass"]


def _cache_of(kwargs: dict, rt: Runtime):
    """The forward's cache as a SeqparCache (made here when generate's default or use_cache asks for one),
    or None for a forward without a cache. Refuses any other cache by name."""
    from transformers.cache_utils import Cache, DynamicCache

    from seqpar.inference.cache import SeqparCache

    legacy = kwargs.pop("past_key_values", None)
    cache = kwargs.get("cache", None)
    if legacy is not None:
        if cache is not None:
            raise ValueError("seqpar: both cache and past_key_values given; pass one")
        cache = legacy
    if cache is None:
        if not kwargs.get("use_cache"):
            return None
        return SeqparCache(rt.group, rt.layout)
    if isinstance(cache, SeqparCache):
        cache.check_for(rt.group, rt.layout)
        return cache
    if isinstance(cache, DynamicCache) and not getattr(cache, "_is_user_defined", False) and \
            cache.get_seq_length() == 0 and type(cache) is DynamicCache:
        return SeqparCache(rt.group, rt.layout)  # generate's default: the sharded one instead
    kind = type(cache).__name__ if isinstance(cache, Cache) else type(cache).__name__
    raise ValueError(f"seqpar: cache={kind} on a sequence-parallel model; its KV cache must be sharded like the "
                     f"sequence: pass seqpar.inference.SeqparCache(mesh['cp'], layout) or no cache (generate makes "
                     f"one)")


def _check_inputs(kwargs: dict) -> torch.Tensor:
    ids = kwargs.get("input_ids")
    if kwargs.get("inputs_embeds") is not None:
        raise ValueError("seqpar: inputs_embeds with a KV cache on a sequence-parallel model is not supported; pass "
                         "input_ids (every rank the whole prompt)")
    if not isinstance(ids, torch.Tensor) or ids.ndim != 2 or ids.shape[1] < 1:
        raise ValueError(f"seqpar: a cached forward needs input_ids (B, S) with S >= 1, got "
                         f"{tuple(ids.shape) if isinstance(ids, torch.Tensor) else ids!r}")
    if kwargs.get("labels") is not None:
        raise ValueError("seqpar: labels in a forward with a KV cache; compute the loss without a cache "
                         "(use_cache=False) on a batch from seqpar.shard_batch")
    return ids


def _left_padding(kwargs: dict, B: int, T: int, start: int, rows) -> torch.Tensor | None:
    """The forward's ``attention_mask`` (B, start + T) read as left padding (popped: the model never sees it) ->
    each row's padding (B,) long, or None for none. ``rows``: the cache's rows of different lengths ((lengths,
    width), or None). Zeros anywhere else (right padding, holes, padding of a later turn) are refused by name."""
    mask = kwargs.pop("attention_mask", None)
    if mask is None:
        return None if rows is None else rows[1] - rows[0]  # the cache knows its rows' padding
    mask = torch.as_tensor(mask)
    if rows is None and bool(mask.bool().all()):  # no padding (any shape the model takes)
        return None
    if mask.ndim != 2 or tuple(mask.shape) != (B, start + T):
        raise ValueError(f"seqpar: attention_mask of shape {tuple(mask.shape)} in a cached forward of {B} rows of "
                         f"{T} new tokens after {start} cached; pass a 2-D mask (B, cached + new) or none")
    mask = mask.bool().cpu()
    pads = (~mask).sum(dim=1)
    if bool(mask[:, 1:].ge(mask[:, :-1]).all()) and bool((pads < start + T).all()):
        expect = torch.zeros(B, dtype=torch.long) if rows is None else rows[1] - rows[0]
        if start == 0 or torch.equal(pads, expect):
            return pads if bool(pads.any()) else None
    bad = [b for b in range(B) if bool(mask[b, 1:].lt(mask[b, :-1]).any()) or not bool(mask[b].any())]
    if bad:
        what = f"row(s) {bad} of the attention_mask are not left padding (zeros, then at least one 1)"
    else:
        what = ("the attention_mask pads the rows differently from the cache's first prompt (zeros only as its "
                "left padding)")
    raise ValueError(f"seqpar: {what}; on a sharded sequence a batch of rows of different lengths is supported as "
                     f"left padding of the first prompt only (HF's tokenizer padding_side='left'), not right "
                     f"padding, holes or empty rows: pad on the left, or generate those prompts on their own")


def _max_positions(model: nn.Module) -> int | None:
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return limit if isinstance(limit, int) and limit > 0 else None


def generate_pass(model: nn.Module, rt: Runtime) -> None:
    """Register the prefill / decode hooks on ``model`` (an HF causal LM whose attention is ``rt``'s)."""
    takes_keep = "logits_to_keep" in inspect.signature(type(model).forward).parameters
    rank, world = dist.get_rank(rt.group), dist.get_world_size(rt.group)
    limit = _max_positions(model)
    state: dict = {}

    def chunk_mode(cache, T: int, cached: int, device, batch: int) -> str:
        if cache.chunk != "auto":
            return cache.chunk
        from seqpar.plan_inference import choose_chunk, machine_for, shape_of

        if "shape" not in state:
            state["shape"] = shape_of(model)
        machine = cache.machine if cache.machine is not None else machine_for(device)
        return choose_chunk(state["shape"], T, cached, world, machine, batch=batch)

    def shard_ids(ids: torch.Tensor, start: int):
        """ids (B, T) -> this rank's shard of them padded to the layout's multiple, their global positions
        (from ``start``), the rank holding the last real token and its local index there."""
        B, T = ids.shape
        pad = padding_needed(T, rt.layout, world)
        padded = torch.cat([ids, ids.new_zeros(B, pad)], dim=1)
        pos = global_indices(T + pad, rank, world, rt.layout).to(ids.device)
        owner = next(r for r in range(world) if bool((global_indices(T + pad, r, world, rt.layout) == T - 1).any()))
        local = int(torch.nonzero(pos == T - 1).flatten()[0]) if owner == rank else 0
        return shard_tensor(padded, -1, rank, world, rt.layout).contiguous(), (start + pos)[None].expand(B, -1), \
            owner, local

    def pre(module, args, kwargs):
        cache = _cache_of(kwargs, rt)
        if cache is None:
            return args, kwargs
        if args:
            raise ValueError("seqpar: pass the inputs of a cached forward by keyword (input_ids=...)")
        ids = _check_inputs(kwargs)
        B, T = ids.shape
        start = cache.length
        rows = cache.rows() if start else None
        pads = _left_padding(kwargs, B, T, start, rows)  # (B,): rows of different lengths (left padding), or None
        # HF's positions: each row numbered from its first real token (a left-padded row's padding: < 0, unchecked)
        expect = torch.arange(start, start + T)[None] - (0 if pads is None else pads[:, None])  # (B or 1, T)
        given = kwargs.get("position_ids")
        if given is not None:
            got = torch.as_tensor(given).reshape(-1, T).cpu()
            if not ((got.shape[0] in (1, expect.shape[0]) or expect.shape[0] == 1) and
                    bool(((got == expect) | (expect < 0)).all())):
                raise ValueError(f"seqpar: position_ids of a cached forward must continue the cache ({start}, "
                                 f"{start + 1}, ...; a left-padded row's from its first token, as generate numbers "
                                 f"them from the attention_mask); other positions are not supported on a sharded "
                                 f"sequence")
        keep = kwargs.get("logits_to_keep", None)
        many = isinstance(keep, int) and not isinstance(keep, bool) and keep > 1  # the last `keep` tokens' logits
        if keep is not None and not (isinstance(keep, int) and keep >= 0) or (many and (keep > T or not takes_keep)) \
                or (many and start == 0 and pads is not None):
            raise ValueError(f"seqpar: logits_to_keep={keep!r} in a cached forward of {T} tokens on "
                             f"{type(model).__name__}; a cached forward returns the logits of its last k <= T tokens "
                             f"(logits_to_keep=k, 0 or 1: the last token's), through the model's logits_to_keep; a "
                             f"prompt of rows of different lengths the last token's only")
        if limit is not None and start + T > limit:
            raise ValueError(f"seqpar: a sequence of {start + T} tokens ({start} cached + {T} new) is longer than the "
                             f"model's positions (config.max_position_embeddings={limit}); shorten the prompt or "
                             f"max_new_tokens, or use a model configured for longer positions")
        if rows is not None and T > 1 and cache.chunk == "pass_kv":
            raise ValueError("seqpar: chunk='pass_kv' on a cache of rows of different lengths (a left-padded prompt): "
                             "a sharded chunk's ring numbers one set of positions for the batch; use "
                             "SeqparCache(chunk='pass_q') or 'auto' (the chunk then runs replicated)")
        mode = None if start == 0 or T == 1 else "pass_q" if rows is not None else chunk_mode(cache, T, start,
                                                                                              ids.device, ids.shape[0])
        state.update(gather=None, rows=None)
        if start == 0 and pads is not None:  # rows of different lengths: each left-justified, its padding after it
            lengths = T - pads  # (B,) real tokens per row
            slide = (torch.arange(T)[None] + pads[:, None]) % T  # row b's token i <- its column pads[b] + i
            just = torch.gather(ids, 1, slide.to(ids.device))
            kwargs["input_ids"], kwargs["position_ids"], _, _ = shard_ids(just, 0)
            slots = kwargs["position_ids"][0].cpu()  # (S_local,) this rank's slots, the same in every row
            at = slots[None, :] == (lengths - 1)[:, None]  # (B, S_local): where each row's last real token is
            mine = at.any(dim=1)  # (B,) the rows whose last token this rank holds
            local = at.long().argmax(dim=1)
            col = local
            if takes_keep:  # only those tokens' logits; row b's at column col[b] of them
                kept = torch.unique(local[mine])
                kwargs["logits_to_keep"] = kept.to(ids.device)
                col = torch.searchsorted(kept, local).clamp(max=max(0, kept.numel() - 1))
            state.update(rows=(mine, col))
            cache.begin("prefill", T, None, lengths=lengths)
        elif start == 0 or mode == "pass_kv":  # this rank's shard of the padded prompt / chunk
            kwargs["input_ids"], kwargs["position_ids"], owner, local = shard_ids(ids, start)
            if many:  # this rank's rows among the last `keep` tokens, summed into place over the ranks
                pos = kwargs["position_ids"][0] - start
                rows = torch.nonzero((pos >= T - keep) & (pos < T)).flatten()
                kwargs["logits_to_keep"] = rows
                state["gather"] = (keep, pos[rows] - (T - keep))
            elif takes_keep:
                kwargs["logits_to_keep"] = torch.tensor([local], device=ids.device)
            state.update(owner=owner, local=local, keep=takes_keep)
            cache.begin("prefill" if start == 0 else "decode", T, mode)
        else:  # one token, or a chunk replicated (pass-Q)
            kwargs["position_ids"] = expect.to(ids.device).expand(B, -1)  # rows of different lengths: per row
            if takes_keep:
                kwargs["logits_to_keep"] = keep if many else 1
            state.update(owner=0, local=T - 1, keep=takes_keep or T == 1)
            cache.begin("decode", T, mode)
        kwargs.pop("past_key_values", None)
        kwargs["cache"], kwargs["use_cache"] = cache, True
        rt.cache = cache
        return args, kwargs

    def post(module, args, kwargs, output):
        cache, rt.cache = rt.cache, None
        if cache is None or output is None:  # no cache, or the forward raised (the cache stays unfinished)
            return output
        cache.end()
        logits = output["logits"]
        if state["rows"] is not None:  # each row's last token's logits from the rank holding it: sums with zeros
            mine, col = state["rows"]
            rows = logits.new_zeros(logits.shape[0], 1, logits.shape[-1])
            idx = torch.nonzero(mine).flatten()
            rows[idx.to(rows.device), 0] = logits[idx.to(logits.device), col[idx].to(logits.device)]
            if world > 1:
                dist.all_reduce(rows, group=rt.group)
            output["logits"], output["cache"] = rows, cache
            return output
        if state["gather"] is not None:  # the last k tokens' rows, each from its rank: exact sums with zeros
            k, where = state["gather"]
            rows = logits.new_zeros(logits.shape[0], k, logits.shape[-1])
            rows[:, where] = logits
            if world > 1:
                dist.all_reduce(rows, group=rt.group)
            output["logits"], output["cache"] = rows, cache
            return output
        if not state["keep"]:  # the model computed every local token's logits: the last real token's row
            logits = logits[:, state["local"]:state["local"] + 1]
        logits = logits.contiguous()
        if world > 1:
            dist.broadcast(logits, group=rt.group, group_src=state["owner"])
        output["logits"] = logits
        output["cache"] = cache
        return output

    model.register_forward_pre_hook(pre, with_kwargs=True)
    model.register_forward_hook(post, with_kwargs=True, always_call=True)
