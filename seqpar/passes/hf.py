"""Hugging Face transformers integration: a ``seqpar`` attention implementation for models that
dispatch through ``AttentionInterface`` (Llama, Qwen2, Mistral, ...).

Everything goes through transformers' public registries; nothing in transformers is patched:

- ``AttentionInterface.register(name, fn)``: ``fn(module, q, k, v, attention_mask, *, scaling,
  dropout, **kw)`` with q (B, Hq, S_local, D), k/v (B, Hkv, S_local, D) -> ((B, S_local, Hq, D), None).
  It calls the attention of a :class:`seqpar.parallelize` runtime, so causal masking is by *global*
  position (the layout's), never a local 4-D mask.
- ``AttentionMaskInterface.register(name, mask_fn)``: returns ``None`` (no mask is built); a padding
  mask with zeros is refused: ``seqpar.shard_batch`` turns padding into packed documents.
- The mask arguments transformers passes to the attention function become seqpar's:
  ``sliding_window=w`` -> ``window_size=(w - 1, -1)`` (causal; ``(w - 1, w - 1)`` bidirectional: the
  window of transformers' masks and flash-attention path), ``softcap`` -> ``softcap`` (Gemma 2),
  ``cu_seq_lens_q/k`` (from ``seqpar.shard_batch`` or ``DataCollatorWithFlattening``) -> ``cu_seqlens``,
  ``s_aux`` (gpt-oss attention sinks) -> ``sinks``.
  Per-layer windows (Gemma 2/3 ``layer_types``, Qwen2 ``max_window_layers``) arrive per call.
- ``model.set_attn_implementation(name)`` switches the model.

The name is per ``parallelize`` call (``seqpar_<id>``), and the registered function is a closure over
that call's runtime: the group and layout reach the attention without module globals, and two
models parallelized differently in one process do not interfere.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable

import torch
from torch import nn

from seqpar.passes.hf_masks import MaskPlan, chunk_offsets, read_mask_function

__all__ = ["is_hf_model", "supports_attention_interface", "register_attention", "check_attention_kwargs",
           "check_positions"]

# What transformers passes to an attention function that seqpar may ignore: the positions (RoPE is
# already applied to q and k), cache bookkeeping (no KV cache under parallelize), and flags that
# change nothing here. Any other argument with a value is refused by name: a silently different
# answer is worse than an error.
_IGNORABLE = {"position_ids", "cache_position", "use_cache", "output_attentions", "layer_idx", "past_key_values",
              "past_key_value", "head_mask", "return_dict",
              # loss bookkeeping transformers (5.x) forwards with the model's kwargs down to attention; the
              # loss pass (passes/loss.py) uses them, attention has nothing to do with them
              "shift_labels", "num_items_in_batch", "output_router_logits"}  # MoE flag: passes/router.py
# The mask arguments seqpar implements (check_attention_kwargs turns them into seqpar.attention's).
_MASK_ARGS = ("sliding_window", "softcap", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "s_aux")


def check_attention_kwargs(kwargs: dict[str, Any], causal: bool) -> dict[str, Any]:
    """The mask arguments of ``kwargs`` as seqpar attention arguments (``window_size``, ``cu_seqlens``,
    ``softcap``); every other argument seqpar would otherwise ignore is refused (``ValueError`` naming it)."""
    for name, value in kwargs.items():
        if value is None or value is False or name in _IGNORABLE or name in _MASK_ARGS:
            continue
        raise ValueError(f"seqpar attention got {name}={_short(value)}: an attention argument seqpar does not know "
                         f"is not supported, and ignoring it would change the result; use a model configuration "
                         f"without it")
    out: dict[str, Any] = {}
    window = kwargs.get("sliding_window")
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"seqpar attention got sliding_window={window!r}: expected a positive int (the number "
                             f"of keys a query sees, itself included)")
        out["window_size"] = (window - 1, -1 if causal else window - 1)
    if kwargs.get("softcap"):
        out["softcap"] = float(kwargs["softcap"])
    if kwargs.get("s_aux") is not None:
        out["sinks"] = kwargs["s_aux"]  # gpt-oss attention sinks: (Hq,) parameter
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None or cu_k is not None:
        if cu_q is None or cu_k is None or (cu_q is not cu_k and not torch.equal(cu_q, cu_k)):  # is: no read
            raise ValueError("seqpar attention got cu_seq_lens_q and cu_seq_lens_k that differ (or only one of "
                             "them): packed self-attention needs the same document offsets for queries and keys")
        out["cu_seqlens"] = cu_q
    elif kwargs.get("max_length_q") is not None or kwargs.get("max_length_k") is not None:
        raise ValueError("seqpar attention got max_length_q/k without cu_seq_lens_q/k; pass the document offsets "
                         "(seqpar.shard_batch does)")
    return out


# Modules that derive token positions from the *local* sequence length (an arange over the shard) instead of
# reading position_ids, so seqpar cannot hand them the global ones: (what it is, the test, the way out). Found by
# reading the installed transformers' modeling code for positions built from a length; the model-zoo test
# (tests/test_zoo.py) is the backstop that would catch one this table missed (a different loss).
_LOCAL_POSITIONS: tuple[tuple[str, Callable[[nn.Module], bool], str], ...] = (
    ("attention temperature tuning on a NoPE layer (Llama 4: queries scaled by log1p(floor((position + 1) / "
     "floor_scale)), the positions an arange over the local shard)",
     lambda m: bool(getattr(m, "attn_temperature_tuning", False)) and not getattr(m, "use_rope", True),
     "attn_temperature_tuning=False in the config (the same model for sequences shorter than floor_scale)"),
    ("default positions counted from padding_idx + 1 over the non-pad tokens (RoBERTa-style embeddings), where "
     "seqpar.shard_batch's default positions count from 0",
     lambda m: callable(getattr(type(m), "create_position_ids_from_input_ids", None)),
     "none yet for this embedding (a model with positions from 0, e.g. Llama, GPT-2, BERT)"),
)


def check_positions(model: nn.Module, *, has_attention: bool = True) -> None:
    """Refuse (``ValueError`` naming the model class, the module and the way out) a model with a module that
    computes positions from its local sequence length; see ``_LOCAL_POSITIONS``. ``has_attention=False``: no
    attention reads positions (a pure state-space model, its mixers on the global sequence), so a forward
    without ``position_ids`` is not refused."""
    import inspect

    forward = inspect.signature(type(model).forward).parameters
    if "position_ids" not in forward and has_attention:
        raise ValueError(f"seqpar cannot parallelize {type(model).__name__}: its forward takes no position_ids, so it "
                         f"numbers positions itself from the local length (an arange over the shard, e.g. learned "
                         f"position embeddings of BART-style decoders); seqpar hands every model the global positions "
                         f"through position_ids. Use a model class that takes position_ids")
    for path, m in model.named_modules():
        for what, test, way_out in _LOCAL_POSITIONS:
            if test(m):
                raise ValueError(f"seqpar cannot parallelize {type(model).__name__}: {path} ({type(m).__name__}) "
                                 f"uses {what}, which on a shard would number the tokens from 0. Way out: {way_out}")


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


def register_attention(model: nn.Module, attention: Callable[..., torch.Tensor], *, name: str, world: int,
                       layout: str, cache_active: Callable[[], bool] | None = None) -> str:
    """Register ``attention`` under ``name`` (unique per parallelize call) and switch ``model`` to it.

    ``attention(q, k, v, *, is_causal, scale, enable_gqa, window_size=, cu_seqlens=, softcap=) -> out`` on
    (B, H, S_local, D) shards of a sequence of ``world * S_local`` tokens laid out by ``layout``.
    ``cache_active()``: a sharded KV cache serves the current forward (seqpar.passes.generate): the
    attention also gets the module's ``layer_idx``, and the mask hook accepts the cache's offsets.
    Returns ``name``. Raises ``TypeError`` if the model cannot switch.
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
        if attention_mask is not None and not isinstance(attention_mask, MaskPlan):
            raise ValueError(f"seqpar attention got a materialised attention mask in {type(module).__name__}; pass no "
                             f"attention_mask and use seqpar.shard_batch (it turns padding into packed documents)")
        if dropout:
            raise ValueError(f"seqpar attention does not implement attention dropout (got {dropout}); set the "
                             f"config's attention_dropout to 0")
        if attention_mask is None:  # the model built no mask: the module's own causality (as torch SDPA reads it)
            causal = getattr(module, "is_causal", True) if is_causal is None else bool(is_causal)
        else:  # the mask transformers would have built is the truth (SDPA and eager attend by it)
            causal = attention_mask.causal
        mask = check_attention_kwargs(kwargs, causal)
        if attention_mask is not None:
            mask = _apply_plan(attention_mask, mask, module, query.shape[2])
        if cache_active is not None and cache_active():
            mask["layer_idx"] = getattr(module, "layer_idx", None)
        out = attention(query, key, value, is_causal=causal, scale=scaling,
                        enable_gqa=query.shape[1] != key.shape[1], **mask)  # (B, Hq, S_local, Dv)
        return out.transpose(1, 2).contiguous(), None  # (B, S_local, Hq, Dv)

    # one entry: the chunk offsets of the current batch, made once and handed to every layer (one tensor per
    # batch: the agreement reads each new documents tensor once). Keyed by the batch's document tensor itself
    # (a weak reference and its version), never by its address, which a later batch's tensor may reuse.
    chunked: list = [None]  # [(chunk, total, weakref to cu or None, cu._version, offsets)]

    def _apply_plan(plan: MaskPlan, mask: dict[str, Any], module: nn.Module, s_local: int) -> dict[str, Any]:
        """seqpar.attention's mask arguments from the model's mask (``plan``) and its mask arguments (``mask``)."""
        if plan.window_size != (-1, -1):
            if "window_size" in mask and mask["window_size"] != plan.window_size:
                raise ValueError(f"{type(module).__name__}: the model's mask ({plan.what}) has the window "
                                 f"{plan.window_size} but its attention got sliding_window giving {mask['window_size']}; "
                                 f"seqpar cannot tell which one the model means")
            mask["window_size"] = plan.window_size
        if plan.chunk is not None:
            if layout == "packed":
                raise ValueError(f"{type(module).__name__}: chunked attention (attention_chunk_size={plan.chunk}) "
                                 f"is not supported with layout='packed' (its shards follow the documents, not the "
                                 f"chunks); use layout='zigzag', 'striped' or 'contiguous'")
            cu = mask.get("cu_seqlens")
            last = chunked[0]
            same = last is not None and last[:2] == (plan.chunk, world * s_local) and (
                (cu is None and last[2] is None) or (cu is not None and last[2] is not None and last[2]() is cu
                                                     and last[3] == cu._version))
            if not same:
                offsets = chunk_offsets(plan.chunk, world * s_local, cu)
                chunked[0] = (plan.chunk, world * s_local, None if cu is None else weakref.ref(cu),
                              None if cu is None else cu._version, offsets)
            mask["cu_seqlens"] = chunked[0][4]
        return mask

    def seqpar_mask(*, mask_function: Callable | None = None, attention_mask: torch.Tensor | None = None,
                    q_offset: Any = 0, kv_offset: Any = 0, q_length: int | None = None,
                    kv_length: int | None = None, config: Any = None, **kwargs: Any) -> MaskPlan | None:
        """No mask is built: the mask function is read as a :class:`MaskPlan` (causal / window / chunks,
        applied by global position inside the ring), or refused by name."""
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("seqpar: the model got an attention_mask with zeros (padding); build the batch with "
                             "seqpar.shard_batch, which drops the padding and keeps the rows apart as documents")
        cached = cache_active is not None and cache_active()  # a sharded cache: global offsets and lengths
        if not cached and (int(q_offset) or int(kv_offset) or (q_length is not None and kv_length is not None
                                                                 and q_length != kv_length)):
            raise ValueError("seqpar: a mask over a KV cache (past tokens) is not supported on a sharded sequence")
        if mask_function is None:
            return None
        return read_mask_function(mask_function, config=config)

    AttentionInterface.register(name, seqpar_attention_forward)
    AttentionMaskInterface.register(name, seqpar_mask)
    model.set_attn_implementation(name)
    if model.config._attn_implementation != name:
        raise TypeError(f"{type(model).__name__} could not switch to the seqpar attention implementation; "
                        f"it does not dispatch through transformers' AttentionInterface")
    return name
