"""Causal short convolutions (LFM2 / LFM2-MoE / LFM3, Inkling / Inkling2 / Inkling2-loop) exact per run.

A depthwise causal convolution of width ``k`` reads the current token and the ``k - 1`` before it, so a
run of a rank's tokens is exact once it is prefixed by the ``k - 1`` conv inputs that precede it in
global order (its *halo*, :meth:`MixerContext.halo`; zeros before global position 0, which is the
module's own left padding). Everything else in these modules is per token (projections, gates, the
padding mask, the residual), computed on this rank's tokens only. No state passes between runs.

Note
----
One run of L tokens, k = 3 (``x``: the conv's input, after the per-token projection / gate / mask)::

    global     ... x[s-2] x[s-1] | x[s] x[s+1] ... x[s+L-1] | ...
    halo run          [x[s-2] x[s-1]  x[s] ...   x[s+L-1]]        (k-1 + L rows)
    valid conv        y[s] = w0 x[s-2] + w1 x[s-1] + w2 x[s]   ...  L outputs, no padding

The adapters mirror the modules' CPU path (transformers' torch fallback ``causal_conv1d_fn``: the input
cast to the weight's dtype, the output back). Refused by name: a cache (decode state), ``seq_idx``
(documents: the torch fallback ignores it and the fused kernel does not, so no single answer is exact).
A 2D padding mask ``(B, S_local)`` is applied per token before the conv as the modules do, so it is exact.

Besides the :class:`StateAdapter` protocol each adapter has ``input_width(module)`` and
``probe_inputs(module, x)``: the width of the module's input and a plain call of it on a probe's ``x``
(1, T, width) (extra arguments the module needs, e.g. Inkling2's ``dynamic_input``), for a probe that
proves the adapter against the module.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import nn

from seqpar.mixing.base import MixerContext
from seqpar.mixing.calls import call_arguments, check_padding_mask, forward_parameters
from seqpar.mixing.conv import causal_conv_runs, is_causal_depthwise

__all__ = ["Lfm2ShortConvAdapter", "InklingShortConvAdapter", "InklingDynamicShortConvAdapter",
           "SHORT_CONV_ADAPTERS"]

InklingOutput = Literal["residual", "scaled_residual"]  # Inkling: conv + x; Inkling2: (conv + x) / sqrt(k + 1)


def _bind(module: nn.Module, args: tuple, kwargs: dict, mask_arg: str, refused: tuple[str, ...]
          ) -> tuple[str, dict[str, Any], torch.Tensor, torch.Tensor | None]:
    """The call's ``(name, arguments by name, hidden_states (B, S_local, C), padding mask (B, S_local) or None)``;
    refuses the ``refused`` arguments when set and a ``mask_arg`` that is not a 2D mask over the local tokens."""
    name = type(module).__name__
    bound = call_arguments(module, args, kwargs)
    for key in refused:
        if bound.get(key) is not None:
            raise NotImplementedError(
                f"{name}: {key}= is not supported under sequence parallelism (a decode cache / per-document "
                f"resets of the short convolution); call the module without it")
    x, mask = bound["hidden_states"], bound.get(mask_arg)
    check_padding_mask(name, mask_arg, mask, x)
    return name, bound, x, mask


def _masked(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """transformers' ``apply_mask_to_padding_states``: ``x`` (B, S, C) times ``mask`` (B, S), per token."""
    return x if mask is None else (x * mask[:, :, None]).to(x.dtype)


class Lfm2ShortConvAdapter:
    """``Lfm2ShortConv`` and its copies (LFM2-MoE, LFM3): ``out_proj(C * conv(B * x))``, ``[B, C, x] = in_proj(h)``."""

    name = "lfm2_short_conv"

    def matches(self, module: nn.Module) -> bool:
        conv, inp, out = (getattr(module, a, None) for a in ("conv", "in_proj", "out_proj"))
        if not (isinstance(inp, nn.Linear) and isinstance(out, nn.Linear)):
            return False
        c = inp.in_features
        return (is_causal_depthwise(conv, c) and inp.out_features == 3 * c and out.in_features == c
                and {"hidden_states", "attention_mask"} <= forward_parameters(module))

    def input_width(self, module: nn.Module) -> int:
        """The width of the module's input (what a probe's hidden states must have)."""
        return module.in_proj.in_features

    def probe_inputs(self, module: nn.Module, x: torch.Tensor) -> tuple[tuple, dict]:
        """A plain call of the module on the probe's ``x`` (1, T, C): ``module(*args, **kwargs)``."""
        return (x,), {}

    def forward(self, module: nn.Module, ctx: MixerContext, args: tuple, kwargs: dict) -> torch.Tensor:
        _, _, hidden, mask = _bind(module, args, kwargs, "attention_mask", ("cache", "past_key_values", "seq_idx"))
        bcx = module.in_proj(_masked(hidden, mask))  # (B, S_local, 3C)
        b, c, x = bcx.chunk(3, dim=-1)
        y = causal_conv_runs(ctx, b * x, module.conv)  # (B, S_local, C)
        return module.out_proj((c * y).contiguous())


class InklingShortConvAdapter:
    """Inkling's / Inkling2's static short convolution: fp32 ``conv(mask * x) + x`` (Inkling2: / sqrt(k + 1))."""

    def __init__(self, output: InklingOutput):
        if output not in ("residual", "scaled_residual"):
            raise ValueError(f"output={output!r} must be 'residual' or 'scaled_residual'")
        self.output = output
        self.name = "inkling_short_conv" if output == "residual" else "inkling2_short_conv"

    def matches(self, module: nn.Module) -> bool:
        conv = getattr(module, "conv1d", None)
        params = forward_parameters(module)
        # Inkling2's forward takes (and ignores) dynamic_input, for the dynamic conv's interface; Inkling's does not
        variant = "scaled_residual" if "dynamic_input" in params else "residual"
        return (isinstance(conv, nn.Conv1d) and is_causal_depthwise(conv, conv.in_channels)
                and getattr(module, "conv_kernel_size", None) == conv.kernel_size[0]
                and {"hidden_states", "conv_mask"} <= params and variant == self.output)

    def input_width(self, module: nn.Module) -> int:
        return module.conv1d.in_channels

    def probe_inputs(self, module: nn.Module, x: torch.Tensor) -> tuple[tuple, dict]:
        return (x,), {}

    def forward(self, module: nn.Module, ctx: MixerContext, args: tuple, kwargs: dict) -> torch.Tensor:
        _, _, hidden, mask = _bind(module, args, kwargs, "conv_mask", ("cache", "past_key_values", "seq_idx"))
        x = hidden.float()
        y = causal_conv_runs(ctx, _masked(x, mask), module.conv1d) + x
        if self.output == "scaled_residual":
            y = y / math.sqrt(module.conv_kernel_size + 1)
        return y.to(hidden.dtype)


class InklingDynamicShortConvAdapter:
    """Inkling2's dynamic short convolution: taps ``static_weight + weight_proj(dynamic_input)`` per token and
    key/value head, over the halo'd fp32 context; ``seq_idx`` (documents) masks taps across a boundary, its halo
    travels with the context's."""

    name = "inkling2_dynamic_short_conv"

    def matches(self, module: nn.Module) -> bool:
        w, proj = getattr(module, "static_weight", None), getattr(module, "weight_proj", None)
        k, heads = getattr(module, "conv_kernel_size", None), getattr(module, "num_heads", None)
        return (isinstance(w, nn.Parameter) and w.dim() == 2 and isinstance(proj, nn.Linear)
                and isinstance(k, int) and isinstance(heads, int) and w.shape[0] == k and w.shape[1] % heads == 0
                and proj.out_features == heads * k
                and {"hidden_states", "dynamic_input", "conv_mask"} <= forward_parameters(module))

    def input_width(self, module: nn.Module) -> int:
        return module.static_weight.shape[1]

    def probe_inputs(self, module: nn.Module, x: torch.Tensor) -> tuple[tuple, dict]:
        """``x`` and a ``dynamic_input`` (1, T, the taps' projection input) drawn from a fixed seed."""
        g = torch.Generator(device=x.device).manual_seed(2)
        dyn = torch.randn(x.shape[0], x.shape[1], module.weight_proj.in_features, generator=g, device=x.device)
        return (x,), {"dynamic_input": dyn.to(x.dtype)}

    def forward(self, module: nn.Module, ctx: MixerContext, args: tuple, kwargs: dict) -> torch.Tensor:
        name, bound, hidden, mask = _bind(module, args, kwargs, "conv_mask", ("cache", "past_key_values"))
        dyn = bound["dynamic_input"]  # (B, S_local, hidden); hidden (B, S_local, C)
        seq_idx = bound.get("seq_idx")
        if seq_idx is not None and tuple(seq_idx.shape) != tuple(hidden.shape[:2]):
            raise ValueError(f"{name}: seq_idx must be (batch, local tokens) = {tuple(hidden.shape[:2])}, "
                             f"got {tuple(seq_idx.shape)}")
        k, heads = module.conv_kernel_size, module.num_heads
        bsz, _, c = hidden.shape
        weights = module.static_weight.float().T.view(heads, -1, k)  # (H, C/H, k), tap j = j tokens back
        dynamic = module.weight_proj(dyn).float()  # (B, S_local, H*k)
        x = hidden.float()
        ctx_x = ctx.halo(_masked(x, mask), k - 1, dim=1)  # per run (B, k-1 + L, C)
        # seq_idx rides as float (exact below 2**24); the zero rows before position 0 meet zero context anyway
        ctx_idx = ctx.halo(seq_idx.float()[..., None], k - 1, dim=1) if seq_idx is not None else None
        pieces = []
        for r, (xs, (a, e)) in enumerate(zip(ctx_x, ctx.runs.bounds)):
            n = e - a
            win = xs.transpose(1, 2).unfold(-1, k, 1).flip(-1).transpose(1, 2)  # (B, L, C, k), [..., j]: j back
            win = win.reshape(bsz, n, heads, -1, k)
            if ctx_idx is not None:
                idx = ctx_idx[r][..., 0]  # (B, k-1 + L)
                same = idx.unfold(-1, k, 1).flip(-1) == idx[:, k - 1:, None]  # (B, L, k)
                win = win * same[:, :, None, None, :]
            tap = weights + dynamic[:, a:e].view(bsz, n, heads, 1, k)  # (B, L, H, C/H, k)
            pieces.append((win * tap).sum(-1).reshape(bsz, n, c))
        y = (ctx.join(pieces, dim=1) + x) / math.sqrt(2 * k + 1)
        return y.to(hidden.dtype)


SHORT_CONV_ADAPTERS = (Lfm2ShortConvAdapter(), InklingShortConvAdapter("residual"),
                       InklingShortConvAdapter("scaled_residual"), InklingDynamicShortConvAdapter())
