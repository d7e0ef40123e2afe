"""The depthwise causal convolution over runs: what the short-conv, Mamba and Mamba2 adapters share.

A depthwise causal conv of width ``k`` reads the current input and the ``k - 1`` before it, so each run is
exact once prefixed by the ``k - 1`` conv inputs before it in global order (:meth:`MixerContext.halo`; zeros
before global position 0, the module's own left padding). No state passes between runs.

Note
----
One run of L tokens, k = 3::

    halo run      [x[s-2] x[s-1]  x[s] ... x[s+L-1]]     (k-1 + L rows)
    valid conv    y[s] = w0 x[s-2] + w1 x[s-1] + w2 x[s]  ...  L outputs, no padding

As transformers' torch fallback ``causal_conv1d_fn``: computed in the weight's dtype, returned in the input's.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from seqpar.mixing.base import MixerContext

__all__ = ["is_causal_depthwise", "causal_conv_runs"]


def is_causal_depthwise(conv: Any, channels: int) -> bool:
    """Whether ``conv`` is an ``nn.Conv1d`` depthwise over ``channels`` with left padding ``kernel - 1`` (zeros),
    stride 1 and dilation 1: a causal conv once its output is cut to the input's length."""
    return (isinstance(conv, nn.Conv1d) and conv.in_channels == conv.out_channels == conv.groups == channels
            and conv.stride == (1,) and conv.dilation == (1,) and conv.padding == (conv.kernel_size[0] - 1,)
            and conv.padding_mode == "zeros")


def causal_conv_runs(ctx: MixerContext, x: torch.Tensor, conv: nn.Conv1d,
                     activation: str | None = None) -> torch.Tensor:
    """``x`` (B, S_local, C) -> the depthwise causal ``conv`` over each run with its halo of ``kernel - 1`` rows,
    then ``activation`` (an ``ACT2FN`` name, or None): (B, S_local, C) in ``x``'s dtype."""
    k = conv.kernel_size[0]
    w = conv.weight  # (C, 1, k)
    outs = [F.conv1d(piece.transpose(1, 2).to(w.dtype), w, conv.bias, groups=w.shape[0])  # (B, C, L)
            for piece in ctx.halo(x, k - 1, dim=1)]  # (B, k-1+L, C) per run
    out = ctx.join(outs, dim=2)
    if activation is not None:
        from transformers.activations import ACT2FN

        out = ACT2FN[activation](out)
    return out.transpose(1, 2).to(x.dtype)
