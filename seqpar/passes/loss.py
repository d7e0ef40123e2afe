"""Pass 3, loss: the loss becomes the mean over the *global* number of non-ignored tokens.

Its value is all-reduced over cp (:func:`reduce_forward`); the gradient stays local, since the cp
ranks' gradients sum to the single-device one. Hugging Face models need the batch of
``seqpar.shard_batch`` (``shift_labels``, ``num_items_in_batch``, global ``position_ids``); in plain
models a mean ``F.cross_entropy`` becomes sum / global count (a torch-function override).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from seqpar.passes.check import ModelKind
from seqpar.passes.lazy_logits import LazyLogits
from seqpar.passes.lm_loss import LMLoss
from seqpar.passes.router import RouterLoss
from seqpar.passes.runtime import Runtime

__all__ = ["loss_pass", "reduce_forward"]


class _ReduceForward(torch.autograd.Function):
    """Forward: all-reduce SUM over ``group``. Backward: identity (each rank keeps its own part)."""

    @staticmethod
    def forward(ctx, x, group):
        y = x.clone()
        dist.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def reduce_forward(x: torch.Tensor, group) -> torch.Tensor:
    """The sum of ``x`` over ``group`` as a value; the gradient flows to this rank's ``x`` only."""
    return _ReduceForward.apply(x, group)


def _global_cross_entropy(rt: Runtime, lm: LMLoss | None = None):
    def cross_entropy(input, target, weight=None, size_average=None, ignore_index=-100, reduce=None,
                      reduction="mean", label_smoothing=0.0):
        total = None
        if isinstance(input, LazyLogits):  # the LM head's lazy logits (lazy_logits.py): the chunked loss
            total = lm.cross_entropy(input, target, weight, size_average, ignore_index, reduce, reduction,
                                     label_smoothing)
            if total is None:  # a call the chunked loss does not reproduce ("auto"): the real logits
                input = input.materialize()
        if total is None and (reduction != "mean" or target.is_floating_point() or size_average is not None or
                              reduce is not None):
            return F.cross_entropy(input, target, weight, size_average, ignore_index, reduce, reduction,
                                   label_smoothing)
        if weight is not None:
            raise ValueError("seqpar: a class-weighted mean cross_entropy cannot be made global; compute the loss "
                             "with reduction='sum' and divide by batch['num_items_in_batch']")
        if total is None:
            total = F.cross_entropy(input, target, ignore_index=ignore_index, reduction="sum",
                                    label_smoothing=label_smoothing)
        if reduction == "sum":  # (chunked only) the local sum, as F.cross_entropy's: in the logits' dtype
            return total.to(input.dtype)
        count = (target != ignore_index).sum().to(total.dtype)  # this rank's tokens
        dist.all_reduce(count, group=rt.group)  # the global count
        return reduce_forward(total / count, rt.group).to(input.dtype)

    return cross_entropy


def loss_pass(model: nn.Module, kind: ModelKind, rt: Runtime, lm: LMLoss | None = None,
              router: RouterLoss | None = None) -> None:
    """``lm``: the chunked LM head + loss of :func:`seqpar.passes.lm_loss.plan` (None: the model's own);
    ``router``: the MoE load-balancing loss of :func:`seqpar.passes.router.check_router_loss` (HF models)."""
    if kind == "sdpa":
        rt.override(model, F.cross_entropy, _global_cross_entropy(rt, lm))
    router = router if kind == "hf" else None

    def pre(module, args, kwargs):
        rt.tokens = kwargs.pop("seqpar_tokens", None)  # shard_batch's end padding (False): for the router loss
        if kind == "sdpa":
            kwargs.pop("shift_labels", None)
            kwargs.pop("num_items_in_batch", None)
            for key in ("max_length_q", "max_length_k"):
                kwargs.pop(key, None)
            cu_q, cu_k = kwargs.pop("cu_seq_lens_q", None), kwargs.pop("cu_seq_lens_k", None)
            rt.cu_seqlens = cu_q if cu_q is not None else cu_k  # the attention override reads it (checked there)
            if lm is not None:
                lm.start_plain(args, kwargs)
            return args, kwargs
        # labels need shift_labels / num_items_in_batch, position_ids, no past_key_values, the router loss:
        # checked and agreed on every rank by the agreement pass's hook, which runs before this one
        kwargs.setdefault("use_cache", False)
        if lm is not None:
            lm.start(kwargs)  # labels out of the arguments: the loss is computed in chunks from lm_head's input
        return args, kwargs

    def post(module, args, kwargs, output):
        rt.cu_seqlens = None
        tokens, rt.tokens = rt.tokens, None
        if lm is not None:
            output = lm.finish(output, kwargs)  # the chunked loss in output.loss, the labels back in kwargs
        if router is not None and output is not None:
            # aux_loss global over the real tokens, its share in the local loss
            output = router.apply(output, kwargs, rt.group, tokens)
        if kind != "hf" or kwargs.get("labels") is None or output is None:  # None: the forward raised
            return output
        if isinstance(output, tuple):
            return (reduce_forward(output[0], rt.group), *output[1:])
        output["loss"] = reduce_forward(output["loss"], rt.group)
        return output

    model.register_forward_pre_hook(pre, with_kwargs=True)
    model.register_forward_hook(post, with_kwargs=True, always_call=True)
