"""Pass 2, attention: the model's attention calls become ``Runtime.attention`` (seqpar's method).

Hugging Face models: a per-call ``seqpar_<id>`` implementation registered through transformers'
AttentionInterface (:mod:`seqpar.passes.hf`). Plain PyTorch models: a torch-function override of
``F.scaled_dot_product_attention`` (``nn.MultiheadAttention`` refused).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from seqpar.passes import hf
from seqpar.passes.check import ModelKind
from seqpar.passes.generate import generate_pass
from seqpar.passes.runtime import Runtime

__all__ = ["attention_pass"]


def attention_pass(model: nn.Module, kind: ModelKind, rt: Runtime) -> None:
    if kind == "hf":
        hf.register_attention(model, rt.attention, name=rt.name, world=rt.world, layout=rt.layout,
                              cache_active=lambda: rt.cache is not None)
        generate_pass(model, rt)  # forwards with a KV cache (generate): prefill sharded, decode on the cache
        return

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if attn_mask is not None:
            raise ValueError("seqpar: scaled_dot_product_attention with attn_mask is not supported under "
                             "parallelize; use is_causal=True (masking is by global position)")
        if dropout_p:
            raise ValueError(f"seqpar: attention dropout is not supported (dropout_p={dropout_p})")
        # packed documents of the batch (seqpar.shard_batch's cu_seq_lens_q/k, held for this forward)
        return rt.attention(query, key, value, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa,
                            cu_seqlens=rt.cu_seqlens)

    def mha(*args, **kwargs):
        raise TypeError("seqpar.parallelize: nn.MultiheadAttention is not supported; call "
                        "F.scaled_dot_product_attention in the model")

    rt.override(model, F.scaled_dot_product_attention, sdpa)
    rt.override(model, F.multi_head_attention_forward, mha)
