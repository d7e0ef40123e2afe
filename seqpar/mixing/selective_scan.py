"""Mamba's (v1) selective scan over runs, and the state-passing adapter of the Mamba mixers.

The scan (per channel d of D = G x R, channels in G groups sharing B and C; state (N,) per channel)::

    h_t = exp(dt_t A) * h_{t-1} + dt_t x_t B_t        y_t = h_t . C_t  (+ D x_t, then * silu(gate), by the mixer)

decays elementwise, so a run is the "scale" map ``h_out = M * h_in + b`` with ``M = exp(A * sum_t dt_t)``
(B, D, N) and ``b`` the final state from zeros, and ``y_t = y0_t + (exp(A * cumsum(dt)_t) * h_in) . C_t``.
A rank scans each run once from zeros (:func:`selective_scan`), the context scans the runs' maps into entry
states, and each run adds its entry term (:func:`selective_entry`).

Note
----
Inside a run the scan is two-level (chunk Q ~ sqrt(T)): a recurrence over the Q positions of every chunk at
once, then one over the chunk starts. Only products of decays <= 1, so nothing overflows::

    run (T tokens)      | chunk 0 | chunk 1 | ... |     padded with dt = 0 (decay 1, no input)
    within chunks       s[k, l] = exp(dt A)[k, l] * s[k, l-1] + (dt x B)[k, l]     (Q steps, all chunks at once)
    chunk starts        H[0] = 0, H[k+1] = prod_l exp(dt A)[k, l] * H[k] + s[k, Q-1]   (T / Q steps)
    states              h[k, l] = s[k, l] + cumprod_l exp(dt A)[k] * H[k]

The Mamba mixers of transformers (``MambaMixer``, ``FalconMambaMixer``, ``JambaMambaMixer``: one head;
``ZambaMambaMixer``: ``n_mamba_heads`` heads with their own x / dt projections) share the torch path:
``in_proj -> (x, gate)``, a depthwise causal conv over x (per run with a halo of kernel - 1 rows),
``x_proj -> (dt, B, C)`` (FalconMamba and Jamba: RMS norms on each), ``dt = softplus(dt_proj(dt))``, the scan,
``+ D x``, ``* silu(gate)``, ``out_proj``. :class:`MambaAdapter` runs the module's own per-token submodules.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from seqpar.mixing.base import MixerContext
from seqpar.mixing.ssd import _is_conv, _transformers_class, bind_mixer_call, causal_conv_runs

__all__ = ["selective_scan", "selective_entry", "MambaAdapter", "MAMBA"]

MambaFlavour = Literal["mamba", "normed", "zamba"]  # plain / RMS norms on dt, B, C / multi-head (Zamba)

MAMBA_CLASSES: dict[str, MambaFlavour] = {"MambaMixer": "mamba", "FalconMambaMixer": "normed",
                                          "JambaMambaMixer": "normed", "ZambaMambaMixer": "zamba"}
RMS_NORMS = ("FalconMambaWeightlessRMSNorm", "JambaRMSNorm")  # per-token norms over the last dim


def selective_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   *, chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One run of the selective scan from a zero state.

    ``x`` / ``dt`` (b, T, D) (``dt`` already softplus'd), ``A`` (D, N) (negative), ``B`` / ``C`` (b, T, G, N) with
    D a multiple of G (channel d reads group d // (D / G)). Computed in fp32 (fp64 for fp64 input); ``chunk_size``
    defaults to ceil(sqrt(T)). Returns ``y0`` (b, T, D), ``b`` (b, D, N) the final state, and ``cum_dt``
    (b, T, D) = ``cumsum(dt)`` (the run's map is ``M = exp(A * cum_dt[:, -1, :, None])``)."""
    bsz, t, d = x.shape
    g, n = B.shape[2], B.shape[3]
    if d % g or dt.shape != x.shape or A.shape != (d, n) or B.shape[:2] != (bsz, t) or C.shape != B.shape:
        raise ValueError(f"selective_scan: shapes x {tuple(x.shape)}, dt {tuple(dt.shape)}, A {tuple(A.shape)}, "
                         f"B {tuple(B.shape)}, C {tuple(C.shape)} do not agree (x = dt (b,T,D), A (D,N), "
                         f"B = C (b,T,G,N), D a multiple of G)")
    work = torch.promote_types(x.dtype, torch.float32)
    x, dt, A, B, C = (v.to(work) for v in (x, dt, A, B, C))
    q = chunk_size or max(1, math.isqrt(t - 1) + 1)
    nc = -(-t // q)
    pad = nc * q - t

    def chunks(v, value=0.0):  # (b, T, D, N) -> (b, nc, Q, D, N), padded with value
        return F.pad(v, (0, 0, 0, 0, 0, pad), value=value).view(bsz, nc, q, d, n)

    per_channel = lambda v: v[:, :, :, None, :].expand(bsz, t, g, d // g, n).reshape(bsz, t, d, n)  # noqa: E731
    decay = chunks(torch.exp(dt[..., None] * A), 1.0)  # (b, nc, Q, D, N)
    inject = chunks((dt * x)[..., None] * per_channel(B))  # (b, nc, Q, D, N)
    s = torch.zeros_like(inject[:, :, 0])  # (b, nc, D, N)
    local = []
    for i in range(q):  # every chunk's recurrence from zero, all chunks at once
        s = decay[:, :, i] * s + inject[:, :, i]
        local.append(s)
    local = torch.stack(local, 2)  # (b, nc, Q, D, N)
    through = decay.cumprod(2)  # (b, nc, Q, D, N): decay from the chunk start to each position
    starts = [torch.zeros_like(s[:, 0])]  # (b, D, N) per chunk start
    for k in range(nc):
        starts.append(through[:, k, -1] * starts[-1] + local[:, k, -1])
    states = local + through * torch.stack(starts[:-1], 1)[:, :, None]  # (b, nc, Q, D, N)
    y0 = (states.view(bsz, nc * q, d, n)[:, :t] * per_channel(C)).sum(-1)
    return y0, starts[-1], dt.cumsum(1)


def selective_entry(C: torch.Tensor, A: torch.Tensor, cum_dt: torch.Tensor, h_in: torch.Tensor) -> torch.Tensor:
    """A run's outputs from its entry state: ``C`` (b, T, G, N), ``A`` (D, N), ``cum_dt`` (b, T, D), ``h_in``
    (b, D, N) -> (b, T, D) = ``(exp(A * cum_dt_t) * h_in) . C_t``."""
    bsz, t, g, n = C.shape
    d = A.shape[0]
    work = cum_dt.dtype
    h = torch.exp(cum_dt[..., None] * A.to(work)) * h_in.to(work)[:, None]  # (b, T, D, N)
    return (h.view(bsz, t, g, d // g, n) * C.to(work)[:, :, :, None]).sum(-1).reshape(bsz, t, d)


class MambaAdapter:
    """State passing for the Mamba (v1) mixers of transformers (see the module docstring)."""

    name = "mamba"

    def matches(self, module: nn.Module) -> bool:
        cls = _transformers_class(module, MAMBA_CLASSES)
        if cls is None:
            return False
        from transformers.activations import ACT2FN

        m, flavour = module, MAMBA_CLASSES[cls]
        try:
            inner, n, rank = m.intermediate_size, m.ssm_state_size, m.time_step_rank
            ok = (_is_conv(m.conv1d, inner) and isinstance(m.in_proj, nn.Linear)
                  and m.in_proj.out_features == 2 * inner and isinstance(m.out_proj, nn.Linear)
                  and m.out_proj.in_features == inner and isinstance(m.activation, str) and m.activation in ACT2FN
                  and not hasattr(getattr(m, "config", None), "_is_quantized"))
            if flavour == "zamba":
                heads, hd = m.n_mamba_heads, m.mamba_head_dim
                ok = ok and (heads * hd == inner and m.x_proj_weight.shape == (heads, rank + 2 * n, hd)
                             and m.dt_proj_weight.shape == (heads, hd, rank) and m.A_log.shape == (heads, hd, n)
                             and m.D.shape == (heads, hd) and m.dt_proj_bias is not None
                             and m.dt_proj_bias.shape == (heads, hd))
            else:
                ok = ok and (isinstance(m.x_proj, nn.Linear) and m.x_proj.out_features == rank + 2 * n
                             and m.x_proj.bias is None and isinstance(m.dt_proj, nn.Linear)
                             and m.dt_proj.bias is not None and m.A_log.shape == (inner, n) and m.D.shape == (inner,))
            if flavour == "normed":
                ok = ok and all(type(getattr(m, k)).__name__ in RMS_NORMS
                                for k in ("dt_layernorm", "b_layernorm", "c_layernorm"))
        except (AttributeError, TypeError):
            return False
        return bool(ok)

    def forward(self, module: nn.Module, ctx: MixerContext, args: tuple, kwargs: dict) -> torch.Tensor:
        m = module
        flavour = MAMBA_CLASSES[type(m).__name__]
        hidden = bind_mixer_call(type(m).__name__, args, kwargs, ctx)
        bsz, t, _ = hidden.shape
        dtype = hidden.dtype
        inner, n, rank = m.intermediate_size, m.ssm_state_size, m.time_step_rank
        proj = m.in_proj(hidden)  # (B, S_local, 2 inner)
        if flavour == "zamba":  # channels interleaved (x, gate) pairs
            x, gate = proj.view(bsz, t, inner, 2).unbind(-1)
        else:
            x, gate = proj.split([inner, inner], dim=-1)
        x = causal_conv_runs(ctx, x, m.conv1d, m.activation)  # (B, S_local, inner)
        A = -torch.exp(m.A_log.float()).reshape(inner, n)  # rounded to fp32 as the module does
        if flavour == "zamba":
            heads, hd = m.n_mamba_heads, m.mamba_head_dim
            ssm = torch.einsum("hkd,bthd->bthk", m.x_proj_weight, x.view(bsz, t, heads, hd))  # (B, S, heads, r+2N)
            ts, B, C = ssm.split([rank, n, n], dim=-1)
            dt = torch.einsum("hdr,bthr->bthd", m.dt_proj_weight, ts).reshape(bsz, t, inner)
            bias, D = m.dt_proj_bias.float().reshape(inner), m.D.float().reshape(inner)
        else:
            ts, B, C = m.x_proj(x).split([rank, n, n], dim=-1)
            if flavour == "normed":
                ts, B, C = m.dt_layernorm(ts), m.b_layernorm(B), m.c_layernorm(C)
            dt = ts @ m.dt_proj.weight.t()  # (B, S_local, inner), no bias yet
            B, C = B[:, :, None], C[:, :, None]  # one group
            bias, D = m.dt_proj.bias.float(), m.D.float()
        dt = F.softplus(dt + bias.to(dt.dtype))

        xs, dts, Bs, Cs = (ctx.split(v, dim=1) for v in (x, dt, B, C))
        scans = [selective_scan(xr, dtr, A, br, cr) for xr, dtr, br, cr in zip(xs, dts, Bs, Cs)]
        maps = [(torch.exp(A.to(cum.dtype) * cum[:, -1, :, None]), b) for _, b, cum in scans]  # (B, inner, N) each
        entries = ctx.entry_states(maps, "scale")
        ys = [y0 + selective_entry(c, A, cum, e) for (y0, _, cum), c, e in zip(scans, Cs, entries)]
        y = (ctx.join(ys, dim=1) + x * D) * F.silu(gate)  # (B, S_local, inner)
        return m.out_proj(y.to(dtype))


MAMBA = MambaAdapter()
