"""Cases for tests/test_hf_masks.py, run on every rank of a spawned gloo world.

The reference is the unmodified Hugging Face model on the full sequence in one process (torch SDPA,
the mask transformers itself builds from its mask function), never seqpar code.
"""

from __future__ import annotations

import copy

import torch
import transformers

import seqpar
from parallel_cases import _rel, mesh_for

VOCAB = 64
# name -> (config class, model class, config overrides): models whose window / chunk reach the attention
# only through transformers' mask_function (no sliding_window argument to the attention function)
MODELS = {
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(use_sliding_window=True, sliding_window=7, max_window_layers=0, num_experts=4,
                       num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=16)),
    "phimoe": ("PhimoeConfig", "PhimoeForCausalLM",
               dict(sliding_window=7, num_local_experts=4, num_experts_per_tok=2, router_jitter_noise=0.0)),
    "llama4": ("Llama4TextConfig", "Llama4ForCausalLM",
               dict(attention_chunk_size=5, intermediate_size_mlp=64, num_local_experts=2, head_dim=8,
                    no_rope_layers=[1, 0], attn_temperature_tuning=False, floor_scale=4)),
    "llama4_tuned": ("Llama4TextConfig", "Llama4ForCausalLM",  # temperature tuning on the NoPE layer 1
                     dict(attention_chunk_size=5, intermediate_size_mlp=64, num_local_experts=2, head_dim=8,
                          no_rope_layers=[1, 0], floor_scale=4)),
}


def build(name: str):
    cfg_cls, model_cls, over = MODELS[name]
    torch.manual_seed(0)
    cfg = getattr(transformers, cfg_cls)(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                         **over)
    cfg._attn_implementation = "sdpa"
    model = getattr(transformers, model_cls)(cfg).float().eval()
    with torch.no_grad():  # weights scaled up, so a dropped mask shows in the loss
        for p in model.parameters():
            if p.ndim > 1:
                p.mul_(3.0)
    return model


def batch(S: int, packed: bool) -> dict:
    g = torch.Generator().manual_seed(S)
    ids = torch.randint(0, VOCAB, (1, S), generator=g)
    out = {"input_ids": ids, "labels": ids.clone()}
    if packed:  # three documents; the first target of each is ignored (DataCollatorWithFlattening's convention)
        pos = torch.cat([torch.arange(n) for n in (13, S - 20, 7)])[None]
        out["position_ids"] = pos
        out["labels"][pos == 0] = -100
    return out


def equal_to_single_process(rank, size, *, name, layout, packed, S=48):
    """(loss rel error, worst gradient rel error) of parallelize vs the single-process model."""
    ref = build(name)
    mesh = mesh_for(1, size)
    model = seqpar.parallelize(copy.deepcopy(ref), mesh, layout=layout, fsdp=False)
    b = batch(S, packed)
    want = ref(**b, use_cache=False).loss  # use_cache=False: with a cache transformers ignores packed documents
    want.backward()
    got = model(**seqpar.shard_batch(b, mesh, layout=layout)).loss
    got.backward()
    params = dict(model.named_parameters())
    grad = max(_rel(params[n].grad, p.grad) for n, p in ref.named_parameters() if p.grad is not None)
    return _rel(got.detach(), want.detach()), grad


def refusal(rank, size, *, name, layout, packed=False, S=48):
    """(type, message) of what parallelize + one forward raised, or None if nothing did."""
    mesh = mesh_for(1, size)
    try:
        model = seqpar.parallelize(build(name), mesh, layout=layout, fsdp=False)
        model(**seqpar.shard_batch(batch(S, packed), mesh, layout=layout))
    except (ValueError, NotImplementedError, TypeError) as e:
        return type(e).__name__, str(e)
    return None
