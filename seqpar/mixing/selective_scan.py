"""Mamba's (v1) selective scan over runs, and the state-passing adapter of the Mamba mixers.

The scan (per channel d of D = G x R, channels in G groups sharing B and C; state (N,) per channel)::

    h_t = exp(dt_t A) * h_{t-1} + dt_t x_t B_t        y_t = h_t . C_t  (+ D x_t, then * silu(gate), by the mixer)

decays elementwise, so a run is the "scale" map ``h_out = M * h_in + b`` with ``M = exp(A * sum_t dt_t)``
(B, D, N) and ``b`` the final state from zeros. A rank scans each run once from zeros (:func:`selective_scan`),
the context scans the runs' maps into entry states, and each run's outputs follow from its entry state, which
only shifts the run's chunk starts (:meth:`SelectiveRun.out`).

Note
----
Inside a run the scan is two-level (chunk Q ~ sqrt(T)): a recurrence over the Q positions of every chunk at
once, then one over the chunk starts. Only products of decays <= 1, so nothing overflows::

    run (T tokens)      | chunk 0 | chunk 1 | ... |     padded with dt = 0 (decay 1, no input)
    within chunks       s[k, l] = exp(dt A)[k, l] * s[k, l-1] + (dt x B)[k, l]     (Q steps, all chunks at once)
    chunk starts        H[0] = 0, H[k+1] = prod_l exp(dt A)[k, l] * H[k] + s[k, Q-1]   (T / Q steps)
    run map             M = prod_k prod_l exp(dt A)[k, l],  b = H[nc]
    entry state h_in    H'[k] = H[k] + (prod_{j<k} prod_l exp(dt A)[j, l]) * h_in
    states              h[k, l] = s[k, l] + cumprod_l exp(dt A)[k] * H'[k],   y = h . C

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
from seqpar.mixing.calls import transformers_class
from seqpar.mixing.conv import causal_conv_runs, is_causal_depthwise
from seqpar.mixing.ssd import bind_mixer_call

__all__ = ["selective_scan", "SelectiveRun", "MambaAdapter", "MAMBA"]

MambaFlavour = Literal["mamba", "normed", "zamba"]  # plain / RMS norms on dt, B, C / multi-head (Zamba)

MAMBA_CLASSES: dict[str, MambaFlavour] = {"MambaMixer": "mamba", "FalconMambaMixer": "normed",
                                          "JambaMambaMixer": "normed", "ZambaMambaMixer": "zamba"}
RMS_NORMS = ("FalconMambaWeightlessRMSNorm", "JambaRMSNorm")  # per-token norms over the last dim


class SelectiveRun:
    """One run of the selective scan, scanned from a zero state, waiting for its entry state.

    ``m`` (b, D, N) and ``b`` (b, D, N) are the run's map (``h_out = m * h_in + b``); :meth:`out` gives the
    outputs (b, T, D) for an entry state (the entry only shifts the chunk starts, so no (b, T, D, N) term is
    added), :meth:`final` the state after the run."""

    def __init__(self, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                 chunk_size: int | None = None):
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

        def chunks(v):  # (b, T, ...) -> (b, nc, Q, ...), zero-padded
            return F.pad(v, (0, 0) * (v.dim() - 2) + (0, pad)).view(bsz, nc, q, *v.shape[2:])

        decay = torch.exp(chunks(dt)[..., None] * A)  # (b, nc, Q, D, N); padding: dt = 0, decay 1
        inject = chunks(((dt * x).view(bsz, t, g, d // g)[..., None] * B[:, :, :, None]).view(bsz, t, d, n))
        s = torch.zeros_like(inject[:, :, 0])  # (b, nc, D, N)
        local = []
        for i in range(q):  # every chunk's recurrence from zero, all chunks at once
            s = decay[:, :, i] * s + inject[:, :, i]
            local.append(s)
        self.local = torch.stack(local, 2)  # (b, nc, Q, D, N)
        self.through = decay.cumprod(2)  # (b, nc, Q, D, N): decay from the chunk start to each position
        starts, prefix = [torch.zeros_like(s[:, 0])], [torch.ones_like(s[:, 0])]  # (b, D, N) per chunk start
        for k in range(nc):
            starts.append(self.through[:, k, -1] * starts[-1] + self.local[:, k, -1])
            prefix.append(self.through[:, k, -1] * prefix[-1])
        self.starts, self.prefix = torch.stack(starts, 1), torch.stack(prefix, 1)  # (b, nc+1, D, N)
        self.m, self.b = prefix[-1], starts[-1]
        self.C, self.shape = C, (bsz, t, g, d // g, n, nc, q)

    def out(self, h_in: torch.Tensor | None = None) -> torch.Tensor:
        """The run's outputs (b, T, D) (without the D skip) from the entry state ``h_in`` (b, D, N) (None: zeros)."""
        bsz, t, g, r, n, nc, q = self.shape
        starts = self.starts[:, :-1]
        if h_in is not None:
            starts = starts + self.prefix[:, :-1] * h_in.to(starts.dtype)[:, None]
        states = self.local + self.through * starts[:, :, None]  # (b, nc, Q, D, N)
        y = states.view(bsz, nc * q, g, r, n)[:, :t] * self.C[:, :, :, None]
        return y.sum(-1).reshape(bsz, t, g * r)

    def final(self, h_in: torch.Tensor) -> torch.Tensor:
        """The state after the run from the entry state ``h_in``."""
        return self.m * h_in.to(self.b.dtype) + self.b


def selective_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   *, chunk_size: int | None = None) -> SelectiveRun:
    """One run of the selective scan from a zero state.

    ``x`` / ``dt`` (b, T, D) (``dt`` already softplus'd), ``A`` (D, N) (negative), ``B`` / ``C`` (b, T, G, N) with
    D a multiple of G (channel d reads group d // (D / G)). Computed in fp32 (fp64 for fp64 input); ``chunk_size``
    defaults to ceil(sqrt(T)). The :class:`SelectiveRun` has the map ``(m, b)``, ``out(h_in)`` and ``final(h_in)``."""
    return SelectiveRun(x, dt, A, B, C, chunk_size)


class MambaAdapter:
    """State passing for the Mamba (v1) mixers of transformers (see the module docstring)."""

    name = "mamba"

    def matches(self, module: nn.Module) -> bool:
        cls = transformers_class(module, MAMBA_CLASSES)
        if cls is None:
            return False
        from transformers.activations import ACT2FN

        m, flavour = module, MAMBA_CLASSES[cls]
        try:
            inner, n, rank = m.intermediate_size, m.ssm_state_size, m.time_step_rank
            ok = (is_causal_depthwise(m.conv1d, inner) and isinstance(m.in_proj, nn.Linear)
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
        entries = ctx.entry_states([(r.m, r.b) for r in scans], "scale")  # (B, inner, N) each
        ys = [r.out(e) for r, e in zip(scans, entries)]
        y = (ctx.join(ys, dim=1) + x * D) * F.silu(gate)  # (B, S_local, inner)
        return m.out_proj(y.to(dtype))


MAMBA = MambaAdapter()
