"""Hugging Face transformers integration: a ``seqpar`` attention implementation for models that
dispatch through ``AttentionInterface`` (Llama, Qwen2, Mistral, ...).

Everything goes through transformers' public registries; nothing in transformers is patched:

- ``AttentionInterface.register(name, fn)``: ``fn(module, q, k, v, attention_mask, *, scaling,
  dropout, **kw)`` with q (B, Hq, S_local, D), k/v (B, Hkv, S_local, D) -> ((B, S_local, Hq, D), None).
  It calls the attention of a :class:`seqpar.parallelize` runtime, so causal masking is by *global*
  position (the layout's), never a local 4-D mask.
- ``AttentionMaskInterface.register(name, mask_fn)``: returns ``None`` (no mask is built); a padding
  mask with zeros is refused: mark padding in ``labels`` with -100 instead.
- ``model.set_attn_implementation(name)`` switches the model.

The name is per ``parallelize`` call (``seqpar_<id>``), and the registered function is a closure over
that call's runtime: the group and layout reach the attention without module globals, and two
models parallelized differently in one process do not interfere.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

__all__ = ["is_hf_model", "supports_attention_interface", "register_attention", "check_attention_kwargs"]

# What transformers passes to an attention function that seqpar may ignore: the positions (RoPE is
# already applied to q and k), cache bookkeeping (no KV cache under parallelize), and flags that
# change nothing here. Any other argument with a value is refused by name: a silently different
# answer is worse than an error.
_IGNORABLE = {"position_ids", "cache_position", "use_cache", "output_attentions", "layer_idx", "past_key_values",
              "past_key_value", "head_mask", "return_dict",
              # loss bookkeeping transformers (5.x) forwards with the model's kwargs down to attention; the
              # loss pass (passes/loss.py) uses them, attention has nothing to do with them
              "shift_labels", "num_items_in_batch"}
# Arguments seqpar does not implement yet, and what they would change.
_UNSUPPORTED = {
    "softcap": "logit soft-capping (Gemma 2 attn_logit_softcapping)",
    "s_aux": "attention sinks (gpt-oss)",
    "cu_seq_lens_q": "packed documents (varlen attention)",
    "cu_seq_lens_k": "packed documents (varlen attention)",
    "max_length_q": "packed documents (varlen attention)",
    "max_length_k": "packed documents (varlen attention)",
}


def check_attention_kwargs(kwargs: dict[str, Any], global_len: int) -> None:
    """Refuse every attention argument seqpar would otherwise ignore (``ValueError`` naming it)."""
    for name, value in kwargs.items():
        if value is None or value is False or name in _IGNORABLE:
            continue
        if name == "sliding_window":
            if value < global_len:
                raise ValueError(f"seqpar attention does not implement sliding-window attention (sliding_window="
                                 f"{value} < global length {global_len}); use a window >= the sequence length")
            continue
        if name == "softcap" and value == 0:
            continue
        what = _UNSUPPORTED.get(name, "an attention argument seqpar does not know")
        raise ValueError(f"seqpar attention got {name}={_short(value)}: {what} is not supported, and ignoring it "
                         f"would change the result; use a model configuration without it")


def _short(value: Any) -> str:
    return f"<tensor {tuple(value.shape)}>" if isinstance(value, torch.Tensor) else repr(value)


def is_hf_model(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # transformers is optional
        return False
    return isinstance(model, PreTrainedModel)


def supports_attention_interface(model: nn.Module) -> bool:
    """True when the HF model dispatches attention through ``ALL_ATTENTION_FUNCTIONS``."""
    # The heuristic transformers itself uses before allowing set_attn_implementation (if this
    # version has it; otherwise register_attention checks that the switch took effect).
    check = getattr(type(model), "_can_set_attn_implementation", None)
    return True if check is None else bool(check())


def register_attention(model: nn.Module, attention: Callable[..., torch.Tensor], *, name: str, world: int) -> str:
    """Register ``attention`` under ``name`` (unique per parallelize call) and switch ``model`` to it.

    ``attention(q, k, v, *, is_causal, scale, enable_gqa) -> out`` on (B, H, S_local, D) shards;
    ``world`` is the cp size. Returns ``name``. Raises ``TypeError`` if the model cannot switch.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    def seqpar_attention_forward(
        module: nn.Module,
        query: torch.Tensor,  # (B, Hq, S_local, D)
        key: torch.Tensor,  # (B, Hkv, S_local, D)
        value: torch.Tensor,  # (B, Hkv, S_local, D)
        attention_mask: torch.Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        is_causal: bool | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        if attention_mask is not None:
            raise ValueError("seqpar attention got a materialised attention mask; pass no attention_mask (mark "
                             "padding with labels=-100) and use seqpar.shard_batch")
        if dropout:
            raise ValueError(f"seqpar attention does not implement attention dropout (got {dropout}); set the "
                             f"config's attention_dropout to 0")
        check_attention_kwargs(kwargs, query.shape[2] * world)
        causal = getattr(module, "is_causal", True) if is_causal is None else bool(is_causal)
        out = attention(query, key, value, is_causal=causal, scale=scaling,
                        enable_gqa=query.shape[1] != key.shape[1])  # (B, Hq, S_local, D)
        return out.transpose(1, 2).contiguous(), None  # (B, S_local, Hq, D)

    def seqpar_mask(*, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> None:
        """No mask is built: causality comes from global positions inside the ring."""
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("seqpar: padding attention masks are not supported; drop attention_mask and mark "
                             "padded positions with labels=-100 (seqpar.shard_batch does the rest)")
        return None

    AttentionInterface.register(name, seqpar_attention_forward)
    AttentionMaskInterface.register(name, seqpar_mask)
    model.set_attn_implementation(name)
    if model.config._attn_implementation != name:
        raise TypeError(f"{type(model).__name__} could not switch to the seqpar attention implementation; "
                        f"it does not dispatch through transformers' AttentionInterface")
    return name
