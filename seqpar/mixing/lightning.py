"""MiniMax's lightning attention (linear attention with a per-head scalar decay) exact per run: "scale" maps.

``MiniMaxLightningAttention`` (the ``self_attn`` of a decoder layer whose ``layer_types`` entry is
``"linear_attention"``) keeps per head a state ``S`` (dk, dv) decayed by ``lam = exp(-slope_h)`` per token::

    S_t = lam * S_{t-1} + k_t^T v_t        o_t = q_t S_t        (q, k, v = act(qkv_proj(h)), masked per token)

A run of ``L`` tokens entered with ``S_in`` gives ``o_t = o0_t + (lam^(t+1) q_t) S_in`` (``o0``: the run from
a zero state, by the module's own block algorithm with its decay buffers) and leaves ``lam^L * S_in + S0``,
an elementwise ("scale") map ``(M, b) = (lam^L, S0)``: ``M`` (1, H, 1, 1) broadcasts to ``b``'s
(B, H, dk, dv). Everything after the recurrence (the RMS norm over heads, the sigmoid output gate,
``out_proj``) is per token.

Note
----
The state is not reset at document starts (the module does not read ``position_ids``)::

    global     run0 | run1 | run2          entry(run i) = lam^L(i-1) * entry(run i-1) + S0(run i-1)
    run i      o_t  = o0_t  +  lam^(t+1) q_t . entry(run i)       t = 0 .. L-1 inside the run

The module's second output (its state after the last token) is, per rank, the state after this rank's
last run in global order: the module's own on the rank holding the sequence end. A 2D padding mask
``(B, S_local)`` is applied per token as the module does. Refused by name: a ``cache`` (decode state).
``input_width`` / ``probe_inputs``: the module's input width and a plain call on a probe's ``x`` (the module
needs ``position_embeddings`` and ``attention_mask`` passed, both unread or None), as in short_conv.
"""

from __future__ import annotations

import torch
from torch import nn

from seqpar.mixing.base import MixerContext
from seqpar.mixing.calls import call_arguments, check_padding_mask, forward_parameters

__all__ = ["LightningAttentionAdapter", "LIGHTNING_ADAPTERS"]


def _blocks(module: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One run from a zero state, as the module's block loop: ``q, k, v`` (B, H, L, D) -> (o0 (B, H, L, D),
    S0 (B, H, D, D))."""
    bsz, heads, n, d = q.shape
    bs = module.block_size
    state = q.new_zeros(bsz, heads, d, v.shape[-1])
    outs = []
    for s in range(0, n, bs):
        e = min(s + bs, n)
        m = e - s
        qb, kb, vb = q[:, :, s:e], k[:, :, s:e], v[:, :, s:e]
        intra = torch.matmul(torch.matmul(qb, kb.transpose(-1, -2)) * module.diagonal_decay[:, :, :m, :m], vb)
        inter = torch.matmul(qb * module.query_decay[:, :m], state)
        outs.append(inter + intra)
        state = state * torch.exp(-module.slope_rate * m) + torch.matmul(
            (kb * module.key_decay[:, -m:]).transpose(-1, -2), vb)
    return torch.cat(outs, dim=-2), state


class LightningAttentionAdapter:
    """``MiniMaxLightningAttention``: the block algorithm per run, the state between runs by entry states."""

    name = "minimax_lightning_attention"

    def matches(self, module: nn.Module) -> bool:
        heads, d, bs = (getattr(module, a, None) for a in ("num_attention_heads", "head_dim", "block_size"))
        if not all(isinstance(x, int) and x > 0 for x in (heads, d, bs)):
            return False
        qkv, gate, out = (getattr(module, a, None) for a in ("qkv_proj", "output_gate", "out_proj"))
        shapes = {"slope_rate": (heads, 1, 1), "query_decay": (heads, bs, 1), "key_decay": (heads, bs, 1),
                  "diagonal_decay": (1, heads, bs, bs)}
        params = forward_parameters(module)
        return (all(isinstance(m, nn.Linear) for m in (qkv, gate, out)) and qkv.out_features == 3 * heads * d
                and gate.out_features == heads * d and out.in_features == heads * d
                and qkv.in_features == gate.in_features and callable(getattr(module, "act_fn", None))
                and isinstance(getattr(module, "norm", None), nn.Module)
                and all(tuple(getattr(getattr(module, n, None), "shape", ())) == s for n, s in shapes.items())
                and {"hidden_states", "attention_mask"} <= params)

    def input_width(self, module: nn.Module) -> int:
        """The width of the module's input (what a probe's hidden states must have)."""
        return module.qkv_proj.in_features

    def probe_inputs(self, module: nn.Module, x: torch.Tensor) -> tuple[tuple, dict]:
        """A plain call on the probe's ``x`` (1, T, C): no rotary embeddings (the module reads none), no mask."""
        return (x,), {"position_embeddings": None, "attention_mask": None}

    def forward(self, module: nn.Module, ctx: MixerContext, args: tuple, kwargs: dict):
        name = type(module).__name__
        arg = call_arguments(module, args, kwargs)
        for key in ("cache", "past_key_values"):
            if arg.get(key) is not None:
                raise NotImplementedError(f"{name}: {key}= (the linear-attention decode state) is not supported "
                                          f"under sequence parallelism; pass None")
        hidden, mask = arg["hidden_states"], arg.get("attention_mask")  # (B, S_local, C), (B, S_local) or None
        bsz, seq, _ = hidden.shape
        check_padding_mask(name, "attention_mask", mask, hidden)
        heads, d = module.num_attention_heads, module.head_dim
        qkv = module.act_fn(module.qkv_proj(hidden))
        if mask is not None:
            qkv = (qkv * mask[:, :, None]).to(qkv.dtype)
        q, k, v = qkv.reshape(bsz, seq, heads, 3 * d).split(d, dim=3)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, S_local, D)
        runs = [_blocks(module, *p) for p in zip(ctx.split(q, 2), ctx.split(k, 2), ctx.split(v, 2))]
        lengths = [e - s for s, e in ctx.runs.bounds]
        maps = [(torch.exp(-module.slope_rate * n)[None], s0) for (_, s0), n in zip(runs, lengths)]  # (1, H, 1, 1)
        entries = ctx.entry_states(maps, "scale")  # (B, H, D, D) fp32 each
        outs = []
        for (o0, _), n, e, qr in zip(runs, lengths, entries, ctx.split(q, 2)):
            decay = torch.exp(-module.slope_rate * torch.arange(1, n + 1, device=q.device, dtype=q.dtype)[:, None])
            outs.append(o0 + torch.matmul(qr * decay, e.to(q.dtype)))  # decay (H, L, 1)
        out = ctx.join(outs, dim=2).transpose(1, 2).reshape(bsz, seq, heads * d)
        out = module.norm(out)
        out = torch.sigmoid(module.output_gate(hidden)) * out
        last = max(range(len(lengths)), key=lambda i: ctx.runs.index[i])
        m, b = maps[last]
        final = (m * entries[last].to(b.dtype) + b)  # the state after this rank's last run in global order
        return module.out_proj(out), final


LIGHTNING_ADAPTERS = (LightningAttentionAdapter(),)
