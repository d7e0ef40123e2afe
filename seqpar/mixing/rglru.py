"""RecurrentGemma's recurrent block (Griffin / Hawk: conv1d + RG-LRU) exact per run: a halo and a "scale" map.

The block is ``linear_out(rg_lru(conv_1d(linear_x(h))) * act(linear_y(h)))``. The conv is causal and
depthwise (width ``k``): per run, the ``k - 1`` preceding conv inputs come as its halo. The RG-LRU is a
diagonal linear recurrence over the lru width ``W``, accumulated in fp32 as the module does::

    h_t = a_t * h_{t-1} + x_t        a_t = 0 where position_ids == 0 (a reset: a document starts), else
                                      exp(-8 * r_t * softplus(c)); x_t = i_t * u_t * (1 if reset else sqrt(1 - a_t^2))

so a run of tokens ``s .. e-1`` is the elementwise affine map of its entry state ``h_{s-1}``::

    h_t = z_t + P_t * h_{s-1}        z: the run's scan from zeros, P_t = a_s * ... * a_t (0 after a reset)
    (M, b) = (P_{e-1}, z_{e-1})      the run's "scale" map, (B, W) each

Note
----
Entry states come from :meth:`MixerContext.entry_states` (a scan of the maps in global run order), so
documents packed with ``position_ids`` restarting at 0 reset exactly where the module resets, on any rank:
the reset zeroes ``P`` from that token on, cutting the run off its entry state::

    run j:   tokens  . . R . .        P = a a 0 0 0   (R: position 0)
             h_t   = z_t + P_t * entry(run j)   -> the tokens from R on ignore entry(run j)

The conv is not reset at document starts (the module's conv is not), and the block ignores its
``attention_mask``, as the module does. Refused by name: ``use_cache=True`` and a ``cache`` (decode states).
``input_width`` / ``probe_inputs``: the module's input width and a plain call on a probe's ``x`` (the module
needs ``position_ids`` and ``attention_mask`` passed), as in :mod:`seqpar.mixing.short_conv`.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

from seqpar.mixing.base import MixerContext
from seqpar.mixing.calls import call_arguments, forward_parameters
from seqpar.mixing.conv import causal_conv_runs, is_causal_depthwise

__all__ = ["RecurrentGemmaBlockAdapter", "RGLRU_ADAPTERS"]

ACC = torch.float32  # the module's accumulation dtype of the recurrence (whatever the activations' dtype)


def _sqrt_bound(rg_lru: nn.Module):
    """The module's own sqrt with a clipped derivative (``SqrtBoundDerivative``), from the module's source module."""
    fn = getattr(sys.modules.get(type(rg_lru).__module__), "SqrtBoundDerivative", None)
    return fn if isinstance(fn, type) and issubclass(fn, torch.autograd.Function) else None


def _gates(rg_lru: nn.Module, u: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token, as ``RecurrentGemmaRglru.forward``: ``u`` (B, S, W) -> (a (B, S, W) zero at resets, x (B, S, W))."""
    bsz, seq, width = u.shape
    heads, bw = rg_lru.num_attention_heads, rg_lru.block_width
    reset = position_ids[:, :, None] == 0  # (B or 1, S, 1)
    per_head = u.reshape(bsz * seq, heads, bw).permute(1, 0, 2)  # (H, B*S, bw)
    res = torch.baddbmm(rg_lru.input_gate_bias[:, None, :], per_head, rg_lru.input_gate_weight)
    input_gate = torch.sigmoid(res.transpose(0, 1).reshape(bsz, seq, width))
    res = torch.baddbmm(rg_lru.recurrent_gate_bias[:, None, :], per_head, rg_lru.recurrent_gate_weight)
    recurrent_gate = torch.sigmoid(res.transpose(0, 1).reshape(bsz, seq, width))
    log_a = -8.0 * recurrent_gate * F.softplus(rg_lru.recurrent_param)
    a = torch.exp(log_a)
    multiplier = _sqrt_bound(rg_lru).apply(1 - torch.exp(2 * log_a))
    multiplier = reset + ~reset * multiplier
    x = (u * input_gate) * multiplier.type(u.dtype)
    return a * ~reset, x


def _scan_from_zero(a: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One run, ``a``, ``x`` (B, L, W): the fp32 scan from a zero state ``z`` and the products ``P`` (B, L, W)."""
    a, x = a.to(ACC), x.to(ACC)
    h = torch.zeros_like(x[:, 0])
    zs = []
    for t in range(x.shape[1]):  # token by token, as the module's linear-mode scan
        h = a[:, t] * h + x[:, t]
        zs.append(h)
    return torch.stack(zs, dim=1), torch.cumprod(a, dim=1)


class RecurrentGemmaBlockAdapter:
    """``RecurrentGemmaRecurrentBlock``: conv1d with a halo, the RG-LRU by run maps + entry states."""

    name = "recurrent_gemma_block"

    def matches(self, module: nn.Module) -> bool:
        lx, ly, lo = (getattr(module, a, None) for a in ("linear_x", "linear_y", "linear_out"))
        conv, lru = getattr(module, "conv_1d", None), getattr(module, "rg_lru", None)
        if not (all(isinstance(m, nn.Linear) for m in (lx, ly, lo)) and isinstance(conv, nn.Conv1d)
                and isinstance(lru, nn.Module)):
            return False
        w = lx.out_features
        heads, bw = getattr(lru, "num_attention_heads", None), getattr(lru, "block_width", None)
        shapes = {"recurrent_param": (w,), "input_gate_weight": (heads, bw, bw), "input_gate_bias": (heads, bw),
                  "recurrent_gate_weight": (heads, bw, bw), "recurrent_gate_bias": (heads, bw)}
        params = forward_parameters(module)
        return (ly.out_features == w and lo.in_features == w and is_causal_depthwise(conv, w)
                and isinstance(heads, int) and isinstance(bw, int)
                and heads * bw == w and callable(getattr(module, "act_fn", None)) and _sqrt_bound(lru) is not None
                and all(tuple(getattr(getattr(lru, n, None), "shape", ())) == s for n, s in shapes.items())
                and {"input_states", "position_ids", "use_cache"} <= params)

    def input_width(self, module: nn.Module) -> int:
        """The width of the module's input (what a probe's hidden states must have)."""
        return module.linear_x.in_features

    def probe_inputs(self, module: nn.Module, x: torch.Tensor) -> tuple[tuple, dict]:
        """A plain call on the probe's ``x`` (1, T, D): positions restart at 0 at 3/5 of T (a document start
        inside the probe's sequence), no cache, no mask (the module reads none)."""
        n = x.shape[1]
        cut = (3 * n) // 5
        pos = torch.cat([torch.arange(cut), torch.arange(n - cut)]).to(x.device)[None]
        return (x,), {"position_ids": pos, "attention_mask": None, "use_cache": False}

    def forward(self, module: nn.Module, ctx: MixerContext, args: tuple, kwargs: dict):
        name = type(module).__name__
        arg = call_arguments(module, args, kwargs)
        if arg.get("use_cache"):
            raise NotImplementedError(f"{name}: use_cache=True (the conv / RG-LRU decode states) is not supported "
                                      f"under sequence parallelism; pass use_cache=False")
        for key in ("cache", "past_key_values"):
            if arg.get(key) is not None:
                raise NotImplementedError(f"{name}: {key}= is not supported under sequence parallelism; pass None")
        h, pos = arg["input_states"], arg["position_ids"]  # (B, S_local, D), (B or 1, S_local)
        if not (torch.is_tensor(pos) and pos.dim() == 2 and pos.shape[1] == h.shape[1]
                and pos.shape[0] in (1, h.shape[0])):
            raise ValueError(f"{name}: position_ids must be (batch or 1, local tokens) = (*, {h.shape[1]}), the "
                             f"global positions of this rank's tokens; got "
                             f"{tuple(pos.shape) if torch.is_tensor(pos) else type(pos).__name__}")
        y = module.act_fn(module.linear_y(h))  # (B, S_local, W)
        u = causal_conv_runs(ctx, module.linear_x(h), module.conv_1d)  # (B, S_local, W)
        a, x = _gates(module.rg_lru, u, pos)
        runs = [_scan_from_zero(ar, xr) for ar, xr in zip(ctx.split(a, 1), ctx.split(x, 1))]
        entries = ctx.entry_states([(p[:, -1], z[:, -1]) for z, p in runs], "scale")  # (B, W) fp32 each
        hs = ctx.join([(z + p * e[:, None]).to(u.dtype) for (z, p), e in zip(runs, entries)], dim=1)
        module.conv1d_state = None  # no decode state is kept without a cache (the module's final state, which it
        module.rg_lru.recurrent_states = None  # leaves here but never reads without use_cache, is not kept)
        return module.linear_out(hs * y), None


RGLRU_ADAPTERS = (RecurrentGemmaBlockAdapter(),)
