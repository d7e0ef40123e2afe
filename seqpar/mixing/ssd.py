"""Mamba2's SSD scan over runs, and the state-passing adapter of the Mamba2 mixers.

The scan (per head h of H = G x R, heads in G groups sharing B and C; state (P, N) per head)::

    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T        y_t = h_t C_t  (+ D x_t, added by the mixer)

is affine in the state with a scalar decay per (batch, head), so one run of tokens is the "scale" map
``h_out = M * h_in + b``: ``M = exp(A * sum_t dt_t)`` (B, H, 1, 1) and ``b`` the run's final state from zeros.
Its outputs split the same way: ``y_t = y0_t + exp(A * cumsum(dt)_t) (C_t . h_in)``, with ``y0`` the outputs
from a zero entry state. So a rank scans each of its runs once from zeros (:func:`ssd_scan`), the context turns
the runs' ``(M, b)`` into entry states (a scan over runs in global order), and each run adds its entry term
(:func:`ssd_entry`). Nothing here holds more than the rank's own tokens plus one state per run.

Note
----
Inside a run the scan is chunked (chunk Q, the module's ``chunk_size``): quadratic within a chunk,
a recurrence over chunk states between chunks; all in fp32 (fp64 for fp64 inputs)::

    run (T tokens, zero entry)   | chunk 0 | chunk 1 | chunk 2 |    last chunk padded with dt = 0 (decay 1, no input)
    within chunk k:              Y_diag[l] = sum_{s<=l} (C_l . B_s) exp(seg[l, s]) dt_s x_s
                                 seg[l, s] = sum_{s<r<=l} dt_r A   (a masked cumsum, no cancelling differences)
    chunk states:                S_k = sum_s exp(seg[Q-1, s]) dt_s x_s B_s^T
    state at chunk starts:       H_0 = 0, H_{k+1} = exp(sum_k dt A) H_k + S_k   (a (n+1) x n decay matrix)
    between chunks:              Y_off[l] = exp(cum_l) (C_l . H_k)
    run summary:                 M = exp(A sum_t dt_t),  b = H_n
    entry state (after the scan over runs):  y_t += exp(A cumsum(dt)_t) (C_t . h_in)

The Mamba2 mixers of transformers (``Mamba2Mixer``, ``BambaMixer``, ``NemotronHMamba2Mixer``,
``GraniteMoeHybridMambaLayer``, ``Zamba2MambaMixer``, ``FalconH1Mixer``) share one forward (``torch_forward``
path): ``in_proj -> (gate, xBC, dt)``, a depthwise causal conv over xBC (per run with a halo of kernel - 1 rows),
``x, B, C = split(xBC)``, ``dt = clamp(softplus(dt + dt_bias), time_step_limit)``, the scan, ``+ D x``, the
gated RMS norm with the gate, ``out_proj``. FalconH1 adds its mup multipliers on the input and the projection
and may have no norm (``y * silu(gate)``). :class:`Mamba2Adapter` runs the module's own per-token submodules
(projections, norm) on the rank's tokens and the conv and scan per run.
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

__all__ = ["ssd_scan", "ssd_entry", "ssd", "bind_mixer_call", "Mamba2Adapter", "MAMBA2"]

Mamba2Flavour = Literal["mamba2", "falcon_h1"]  # the plain Mamba2 forward / FalconH1's (mup, optional norm)

# transformers class name -> which forward it has (matched by exact type name inside transformers.models)
MAMBA2_CLASSES: dict[str, Mamba2Flavour] = {
    "Mamba2Mixer": "mamba2", "BambaMixer": "mamba2", "NemotronHMamba2Mixer": "mamba2",
    "GraniteMoeHybridMambaLayer": "mamba2", "Zamba2MambaMixer": "mamba2", "FalconH1Mixer": "falcon_h1",
}
GATED_NORMS = ("MambaRMSNormGated", "BambaRMSNormGated", "NemotronHRMSNormGated", "GraniteMoeHybridRMSNormGated",
               "Zamba2RMSNormGated", "FalconH1RMSNormGated")  # per-token norms over the channel groups
# keyword arguments that carry document boundaries (the kernels reset the state there; the adapter does not)
DOCUMENT_KWARGS = ("seq_idx", "cu_seq_lens_q", "cu_seq_lens_k", "cu_seqlens")


def _masked_segsum(a: torch.Tensor) -> torch.Tensor:
    """``a`` (..., Q) -> (..., Q, Q): ``out[l, s] = sum_{s < r <= l} a[r]`` for ``s <= l``, ``-inf`` above the diagonal.

    A cumulative sum of the masked values (not a difference of prefix sums), so entries near the diagonal
    keep full precision however long the prefix."""
    q = a.shape[-1]
    lower = torch.ones(q, q, dtype=torch.bool, device=a.device).tril()  # [l, s]: s <= l
    seg = (a[..., :, None] * lower.tril(-1)).cumsum(-2)  # [l, s] = sum_{s < r <= l} a[r]
    return seg.masked_fill(~lower, -math.inf)


def ssd_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, *,
             chunk_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One run of the SSD scan from a zero state.

    ``x`` (b, T, H, P), ``dt`` (b, T, H) (already softplus / clamped), ``A`` (H,) (negative), ``B`` / ``C``
    (b, T, G, N) with H a multiple of G (head h reads group h // (H / G)). Computed in fp32 (fp64 for fp64 input).
    Returns ``y0`` (b, T, H, P) (without the D skip), ``b`` (b, H, P, N) the final state, and ``log_decay``
    (b, T, H) = ``A * cumsum(dt)`` (the run's map is ``M = exp(log_decay[:, -1])``)."""
    bsz, t, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    if h % g or C.shape != B.shape or dt.shape != (bsz, t, h) or A.shape != (h,) or B.shape[:2] != (bsz, t):
        raise ValueError(f"ssd_scan: shapes x {tuple(x.shape)}, dt {tuple(dt.shape)}, A {tuple(A.shape)}, "
                         f"B {tuple(B.shape)}, C {tuple(C.shape)} do not agree (x (b,T,H,P), dt (b,T,H), A (H,), "
                         f"B = C (b,T,G,N), H a multiple of G)")
    r = h // g
    work = torch.promote_types(x.dtype, torch.float32)
    q = min(chunk_size, t)  # a run shorter than a chunk is one chunk (no padding)
    nc = -(-t // q)
    pad = nc * q - t
    x, dt, A, B, C = (v.to(work) for v in (x, dt, A, B, C))
    a = dt * A  # (b, T, H) log-decay of each step
    log_decay = a.cumsum(1)

    def chunks(v):  # (b, T, ...) -> (b, nc, Q, ...), zero-padded
        v = F.pad(v, (0, 0) * (v.dim() - 2) + (0, pad))
        return v.reshape(bsz, nc, q, *v.shape[2:])

    xdt = chunks((x * dt[..., None]).view(bsz, t, g, r, p))  # (b, nc, Q, G, R, P)
    ac = chunks(a.view(bsz, t, g, r))  # (b, nc, Q, G, R)
    Bc, Cc = chunks(B), chunks(C)  # (b, nc, Q, G, N)
    acum = ac.cumsum(2)  # (b, nc, Q, G, R) within the chunk

    # within chunks: (C_l . B_s) per group, times the decay from s to l per head
    scores = torch.einsum("bclgn,bcsgn->bcgls", Cc, Bc)  # (b, nc, G, Q, Q)
    decay = torch.exp(_masked_segsum(ac.permute(0, 1, 3, 4, 2)))  # (b, nc, G, R, Q, Q)
    y = torch.einsum("bcgrls,bcsgrp->bclgrp", scores[:, :, :, None] * decay, xdt)

    # each chunk's own final state, then the states at chunk starts
    to_end = torch.exp(acum[:, :, -1:] - acum)  # (b, nc, Q, G, R); seg[Q-1, s] (a difference within one chunk)
    states = torch.einsum("bcsgrp,bcsgn->bcgrpn", xdt * to_end[..., None], Bc)  # (b, nc, G, R, P, N)
    totals = acum[:, :, -1].permute(0, 2, 3, 1)  # (b, G, R, nc)
    # starts[k] = sum_{j<k} exp(sum_{j<i<k} totals_i) states_j, k = 0..nc (k = nc: the run's final state)
    between = _masked_segsum(F.pad(totals, (1, 0)))[..., :, 1:]  # (b, G, R, nc+1, nc): [k, j] = sum_{j<i<k}
    starts = torch.einsum("bgrkj,bjgrpn->bkgrpn", torch.exp(between), states)  # (b, nc+1, G, R, P, N)
    y = y + torch.einsum("bclgn,bcgrpn->bclgrp", Cc, starts[:, :-1]) * torch.exp(acum)[..., None]
    y0 = y.reshape(bsz, nc * q, h, p)[:, :t]
    return y0, starts[:, -1].reshape(bsz, h, p, n), log_decay


def ssd_entry(C: torch.Tensor, log_decay: torch.Tensor, h_in: torch.Tensor) -> torch.Tensor:
    """A run's outputs from its entry state: ``C`` (b, T, G, N), ``log_decay`` (b, T, H), ``h_in`` (b, H, P, N)
    -> (b, T, H, P) = ``exp(log_decay_t) (C_t . h_in)``."""
    bsz, t, g, n = C.shape
    h, p = h_in.shape[1], h_in.shape[2]
    ch = torch.einsum("btgn,bgrpn->btgrp", C.to(log_decay.dtype), h_in.to(log_decay.dtype).view(bsz, g, h // g, p, n))
    return ch.reshape(bsz, t, h, p) * torch.exp(log_decay)[..., None]


def ssd(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, *, chunk_size: int,
        initial_state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The SSD scan of one sequence from ``initial_state`` (b, H, P, N) (zeros if None): ``(y, final_state)``,
    ``y`` (b, T, H, P) without the D skip."""
    y0, b, log_decay = ssd_scan(x, dt, A, B, C, chunk_size=chunk_size)
    if initial_state is None:
        return y0, b
    m = torch.exp(log_decay[:, -1])[..., None, None]  # (b, H, 1, 1)
    return y0 + ssd_entry(C, log_decay, initial_state), m * initial_state.to(b.dtype) + b


# -- what the Mamba mixers share: the call's arguments


def _bind(hidden_states, cache=None, attention_mask=None, **kwargs):
    return hidden_states, cache, attention_mask, kwargs


def bind_mixer_call(name: str, args: tuple, kwargs: dict, ctx: MixerContext) -> torch.Tensor:
    """The mixer call ``(hidden_states, cache=None, attention_mask=None, **kwargs)`` -> ``hidden_states``;
    refuses by name what state passing does not implement: a cache (decoding), a padding mask that is not all
    ones, document boundaries (``seq_idx`` / ``cu_seq_lens``); checks the local length against the runs."""
    hidden, cache, mask, rest = _bind(*args, **kwargs)
    cache = cache if cache is not None else rest.pop("cache_params", None)
    if cache is not None:
        raise NotImplementedError(f"{name} state passing: a cache (cache=...) is not supported (decoding with a "
                                  "sharded recurrent state); call the model without a cache")
    docs = [k for k in DOCUMENT_KWARGS if rest.get(k) is not None]
    if docs:
        raise NotImplementedError(f"{name} state passing: document boundaries ({', '.join(docs)}) are not "
                                  "supported (the state would have to reset there); use mixers='gather'")
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        raise TypeError(f"{name} state passing: hidden_states must be a (B, S_local, hidden) tensor, "
                        f"got {type(hidden).__name__} {getattr(hidden, 'shape', '')}")
    if hidden.shape[1] != ctx.runs.length:
        raise ValueError(f"{name} state passing: hidden_states has {hidden.shape[1]} tokens but this rank's runs "
                         f"hold {ctx.runs.length}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or not bool((mask == 1).all()):
            raise NotImplementedError(f"{name} state passing: a padding attention_mask that is not all ones is not "
                                      "supported (padding tokens zeroed inside the scan); pass no mask or mixers="
                                      "'gather'")
    return hidden


class Mamba2Adapter:
    """State passing for the Mamba2 mixers of transformers (see the module docstring)."""

    name = "mamba2"

    def matches(self, module: nn.Module) -> bool:
        cls = transformers_class(module, MAMBA2_CLASSES)
        if cls is None:
            return False
        from transformers.activations import ACT2FN

        m = module
        try:
            h, p, g, n, inner = m.num_heads, m.head_dim, m.n_groups, m.ssm_state_size, m.intermediate_size
            conv_dim, limit, act = m.conv_dim, tuple(m.time_step_limit), m.activation
            ok = (inner == h * p and h % g == 0 and conv_dim == inner + 2 * g * n
                  and is_causal_depthwise(m.conv1d, conv_dim)
                  and isinstance(m.in_proj, nn.Linear) and m.in_proj.out_features == inner + conv_dim + h
                  and isinstance(m.out_proj, nn.Linear) and m.out_proj.in_features == inner
                  and all(getattr(m, k).shape == (h,) for k in ("dt_bias", "A_log", "D"))
                  and len(limit) == 2 and all(isinstance(v, (int, float)) for v in limit)
                  and isinstance(act, str) and act in ACT2FN and int(m.chunk_size) > 0)
        except (AttributeError, TypeError):
            return False
        norm_ok = type(m.norm).__name__ in GATED_NORMS
        if MAMBA2_CLASSES[cls] == "falcon_h1":
            norm_ok = isinstance(m.norm, nn.Identity) if not m.mamba_rms_norm else norm_ok
            ok = ok and getattr(m, "mup_vector", None) is not None and m.mup_vector.shape[-1] == m.in_proj.out_features
        return bool(ok and norm_ok)

    def forward(self, module: nn.Module, ctx: MixerContext, args: tuple, kwargs: dict) -> torch.Tensor:
        m = module
        flavour = MAMBA2_CLASSES[type(m).__name__]
        hidden = bind_mixer_call(type(m).__name__, args, kwargs, ctx)
        bsz, t, _ = hidden.shape
        dtype = hidden.dtype
        h, p, g, n, inner = m.num_heads, m.head_dim, m.n_groups, m.ssm_state_size, m.intermediate_size
        if flavour == "falcon_h1":
            hidden = hidden * m.ssm_in_multiplier
        proj = m.in_proj(hidden)  # (B, S_local, inner + conv_dim + H)
        if flavour == "falcon_h1":
            proj = proj * m.mup_vector
        gate, xbc, dt = proj.split([inner, m.conv_dim, h], dim=-1)
        xbc = causal_conv_runs(ctx, xbc, m.conv1d, m.activation)  # (B, S_local, conv_dim)
        x, B, C = xbc.split([inner, g * n, g * n], dim=-1)

        work = torch.promote_types(dtype, torch.float32)
        lo, hi = m.time_step_limit
        dt = F.softplus(dt + m.dt_bias.to(dt.dtype)).clamp(min=lo, max=hi)  # (B, S_local, H)
        A = -torch.exp(m.A_log.float())  # (H,) rounded to fp32 as the module does, then computed in `work`
        x = x.reshape(bsz, t, h, p).to(work)
        B, C = B.reshape(bsz, t, g, n), C.reshape(bsz, t, g, n)

        xs, dts, Bs, Cs = (ctx.split(v, dim=1) for v in (x, dt, B, C))
        scans = [ssd_scan(xr, dtr, A, br, cr, chunk_size=int(m.chunk_size)) for xr, dtr, br, cr in zip(xs, dts, Bs, Cs)]
        maps = [(torch.exp(ld[:, -1])[..., None, None], b) for _, b, ld in scans]  # M (B, H, 1, 1), b (B, H, P, N)
        entries = ctx.entry_states(maps, "scale")
        ys = [y0 + ssd_entry(c, ld, e) for (y0, _, ld), c, e in zip(scans, Cs, entries)]
        y = ctx.join(ys, dim=1) + m.D[:, None] * x  # (B, S_local, H, P)
        y = y.reshape(bsz, t, inner)
        if flavour == "falcon_h1" and not m.mamba_rms_norm:
            y = y * F.silu(gate)
        else:
            y = m.norm(y, gate)
        return m.out_proj(y.to(dtype))


MAMBA2 = Mamba2Adapter()
