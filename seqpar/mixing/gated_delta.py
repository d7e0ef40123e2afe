"""Gated DeltaNet mixers by state passing: the chunked gated delta rule, a run's affine map, the adapter.

The gated delta rule keeps a state ``S`` (B, H, dk, dv) per head and, per token ``t``::

    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T        o_t = S_t^T q_t

It is affine in the state, so a run of tokens is the map ``S_out = M S_in + b`` with ``M`` (B, H, dk, dk)
the product of the tokens' ``exp(g_t) (I - beta_t k_t k_t^T)`` and ``b`` the run's final state from zeros
(a ``"matrix"`` map of :mod:`seqpar.mixing.base`); the outputs are affine in ``S_in`` too:
``o_t = o0_t + (q_t^T P_t) S_in`` with ``P_t`` the product up to ``t``.

The core (:func:`gated_delta_run`) is the chunked WY / UT-transform algorithm with the state *augmented*
by ``M``: one scan over the chunks carries ``S`` (from zeros) and ``M`` (from the identity) through the
same linear update, ``M`` with values of zero. It returns, in one pass, the outputs from a zero entry
state ``o0``, the per-token propagator ``q_t^T P_t`` (T, dk), ``M`` and ``b``. Once the entry state is
known (:meth:`MixerContext.entry_states`), a run's outputs are one (T, dk) x (dk, dv) product away; no
second pass over the run. Arithmetic in fp32 (fp64 for fp64 input), whatever the input dtype.

Note
----
One chunk of C tokens (Γ_t = exp(g_1 + ... + g_t), the decay from the chunk's start to ``t``)::

    L   = strict_lower( diag(beta) K K^T  ⊙ Γ_i/Γ_j )          (C, C)
    U   = (I + L)^-1 diag(beta) V                               (C, dv)    solve_triangular, unit diagonal
    W   = (I + L)^-1 diag(beta Γ) K                             (C, dk)
    A   = lower( Q K^T ⊙ Γ_i/Γ_j )                              (C, C)     diagonal included

    scan over chunks, S from 0 and M from I (the same update; M's "values" are zero):
        D_S = U - W S            D_M = -W M                     the delta-rule corrections
        o0  = (Γ Q) S + A D_S    qP  = (Γ Q) M + A D_M          outputs / propagator rows
        S  <- Γ_C S + (Γ_C/Γ K)^T D_S       M <- Γ_C M + (Γ_C/Γ K)^T D_M

Cost against the plain chunk rule: the intra-chunk part (L, the two triangular solves, A) is shared;
the scan does ``(dv + dk) / dv`` times its work (twice for dk = dv), plus one (T, dk, dv) product per run
for the entry state; memory per rank O(T_local), the exchanged summary (dk, dk) + (dk, dv) per head.

The adapter (:class:`GatedDeltaAdapter`) runs the transformers gated-DeltaNet mixers (Qwen3-Next,
Qwen3.5 / Qwen3.5-MoE, LaraMini, Qwen4-Exp, OLMo-Hybrid) per run: projections and the gated norm per
token (the module's own submodules), the causal depthwise conv per run with a halo of ``kernel - 1``
inputs, the recurrence per run with its entry state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from seqpar.mixing.base import MixerContext
from seqpar.mixing.calls import call_arguments, check_padding_mask, forward_parameters

__all__ = ["RunSummary", "gated_delta_run", "chunk_gated_delta", "Projection", "GatedDeltaAdapter"]

CHUNK = 64  # tokens per chunk of the WY / UT transform (transformers' default)


@dataclass(frozen=True)
class RunSummary:
    """One run of the gated delta rule as an affine function of its entry state ``S_in`` (B, H, dk, dv).

    ``out(S_in) = out0 + q_prop @ S_in`` and ``final(S_in) = m @ S_in + b``."""

    out0: torch.Tensor  # (B, H, T, dv)  outputs with a zero entry state
    q_prop: torch.Tensor  # (B, H, T, dk)  q_t^T P_t: how each output reads the entry state
    m: torch.Tensor  # (B, H, dk, dk)
    b: torch.Tensor  # (B, H, dk, dv)  the final state from zeros

    def out(self, s_in: torch.Tensor | None) -> torch.Tensor:
        return self.out0 if s_in is None else self.out0 + self.q_prop @ s_in.to(self.q_prop.dtype)

    def final(self, s_in: torch.Tensor | None) -> torch.Tensor:
        return self.b if s_in is None else self.m @ s_in.to(self.m.dtype) + self.b


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _check(q, k, v, g, beta) -> None:
    if q.ndim != 4 or k.shape != q.shape or v.ndim != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"gated delta rule: q, k (B, H, T, dk) and v (B, H, T, dv) must agree, got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if g.shape != q.shape[:3] or beta.shape != q.shape[:3]:
        raise ValueError(f"gated delta rule: g and beta must be (B, H, T) = {tuple(q.shape[:3])}, got "
                         f"{tuple(g.shape)}, {tuple(beta.shape)}")


def gated_delta_run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, *,
                    chunk_size: int = CHUNK) -> RunSummary:
    """One run of the gated delta rule, summarised as an affine function of its entry state.

    ``q``, ``k`` (B, H, T, dk) (already normalised / scaled as the model does), ``v`` (B, H, T, dv),
    ``g`` (B, H, T) log-decays (<= 0), ``beta`` (B, H, T). Differentiable in all of them."""
    _check(q, k, v, g, beta)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    dt = _compute_dtype(q.dtype)
    q, k, v, g, beta = (x.to(dt) for x in (q, k, v, g, beta))
    B, H, T, dk = k.shape
    dv = v.shape[-1]
    C = chunk_size
    pad = (-T) % C
    if pad:  # padded tokens: k = 0, beta = 0, g = 0 -> the identity map, no output read
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        g, beta = (F.pad(x, (0, pad)) for x in (g, beta))
    n = (T + pad) // C
    qc, kc = q.view(B, H, n, C, dk), k.view(B, H, n, C, dk)  # (B, H, n, C, dk)
    vc = v.view(B, H, n, C, dv)
    bc = beta.view(B, H, n, C, 1)
    cum = g.view(B, H, n, C).cumsum(-1)  # (B, H, n, C) log Γ_t inside each chunk
    lower = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    # Γ_i / Γ_j for j <= i, zero above the diagonal (masked before exp: cum_i - cum_j > 0 there)
    ratio = torch.where(lower, cum[..., :, None] - cum[..., None, :], float("-inf")).exp()  # (B, H, n, C, C)
    kb = kc * bc
    system = ((kb @ kc.transpose(-1, -2)) * ratio).tril(-1) + torch.eye(C, dtype=dt, device=q.device)
    gamma = cum.exp()[..., None]  # (B, H, n, C, 1)
    u = torch.linalg.solve_triangular(system, vc * bc, upper=False, unitriangular=True)  # (B, H, n, C, dv)
    w = torch.linalg.solve_triangular(system, kb * gamma, upper=False, unitriangular=True)  # (B, H, n, C, dk)
    a = (qc @ kc.transpose(-1, -2)) * ratio  # (B, H, n, C, C)
    q_dec = qc * gamma  # reads the chunk's entry state
    k_dec = kc * (cum[..., -1:] - cum).exp()[..., None]  # writes the chunk's exit state
    g_chunk = cum[..., -1].exp()[..., None, None]  # (B, H, n, 1, 1)

    s = q.new_zeros(B, H, dk, dv)
    m = torch.eye(dk, dtype=dt, device=q.device).expand(B, H, dk, dk)
    outs, props = [], []
    for i in range(n):
        d_s = u[:, :, i] - w[:, :, i] @ s  # (B, H, C, dv)
        d_m = -(w[:, :, i] @ m)  # (B, H, C, dk)
        outs.append(q_dec[:, :, i] @ s + a[:, :, i] @ d_s)
        props.append(q_dec[:, :, i] @ m + a[:, :, i] @ d_m)
        k_t = k_dec[:, :, i].transpose(-1, -2)
        s = g_chunk[:, :, i] * s + k_t @ d_s
        m = g_chunk[:, :, i] * m + k_t @ d_m
    out0 = torch.cat(outs, dim=2)[:, :, :T]
    q_prop = torch.cat(props, dim=2)[:, :, :T]
    return RunSummary(out0=out0, q_prop=q_prop, m=m, b=s)


def chunk_gated_delta(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                      initial_state: torch.Tensor | None = None, *,
                      chunk_size: int = CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated delta rule over one sequence from ``initial_state`` (B, H, dk, dv) (zeros if None)
    -> (outputs (B, H, T, dv), final state (B, H, dk, dv)), in the compute dtype (fp32 or fp64)."""
    r = gated_delta_run(q, k, v, g, beta, chunk_size=chunk_size)
    return r.out(initial_state), r.final(initial_state)


def _by_length(fn, items: list[tuple[torch.Tensor, ...]], dim: int) -> list[tuple[torch.Tensor, ...]]:
    """``[fn(*item) for item in items]``, one call per run length: the items of equal length along ``dim``
    concatenated along the batch dim 0 (zigzag's two runs, striped's one-token runs: one call)."""
    groups: dict[int, list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(item[0].shape[dim], []).append(i)
    out: list = [None] * len(items)
    for idx in groups.values():
        res = fn(*(torch.cat([items[i][j] for i in idx]) for j in range(len(items[idx[0]]))))
        for i, parts in zip(idx, zip(*(r.chunk(len(idx)) for r in res))):
            out[i] = parts
    return out


# -- the transformers mixers

# How a mixer projects its input: Qwen3-Next's fused qkvz + ba (head-grouped), Qwen3.5 / LaraMini /
# Qwen4-Exp's separate qkv / z / b / a, OLMo-Hybrid's separate q / k / v / a / b / g (gate) projections.
Projection = Literal["qkvz_ba", "qkv_z_b_a", "q_k_v_a_b_g"]

_PACKING_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "cu_seqlens", "max_length_q", "max_length_k", "seq_idx")


def _linear(mod: nn.Module, name: str, out_features: int, in_features: int | None = None) -> str | None:
    lin = getattr(mod, name, None)
    if not isinstance(lin, nn.Linear):
        return f"{name} is not an nn.Linear"
    if lin.out_features != out_features or (in_features is not None and lin.in_features != in_features):
        return (f"{name} is {lin.in_features} -> {lin.out_features}, expected "
                f"{in_features if in_features is not None else lin.in_features} -> {out_features}")
    return None


def _int(mod: nn.Module, name: str) -> int | None:
    v = getattr(mod, name, None)
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


class GatedDeltaAdapter:
    """The gated-DeltaNet mixers of transformers by state passing (:class:`seqpar.mixing.base.StateAdapter`).

    ``matches`` reads the attributes and parameter shapes ``forward`` uses and the module's options; a
    module it does not implement (an accelerate-hooked conv, an unknown conv activation, non-grouped heads)
    does not match, and :meth:`why_not` says why."""

    name = "gated_delta"

    def projection(self, module: nn.Module) -> Projection | None:
        if hasattr(module, "in_proj_qkvz"):
            return "qkvz_ba"
        if hasattr(module, "in_proj_qkv"):
            return "qkv_z_b_a"
        if hasattr(module, "q_proj") and hasattr(module, "g_proj"):
            return "q_k_v_a_b_g"
        return None

    def why_not(self, module: nn.Module) -> str | None:
        """None if :meth:`forward` implements ``module``, else the reason."""
        from transformers.activations import ACT2FN

        proj = self.projection(module)
        if proj is None:
            return "no known gated-DeltaNet projection (in_proj_qkvz / in_proj_qkv / q_proj + g_proj)"
        if not {"hidden_states", "attention_mask"} <= forward_parameters(module):
            return "forward does not take hidden_states and attention_mask"
        dims = {n: _int(module, n) for n in ("num_k_heads", "num_v_heads", "head_k_dim", "head_v_dim", "key_dim",
                                             "value_dim", "conv_kernel_size", "hidden_size")}
        if None in dims.values():
            return f"missing positive int attributes {[n for n, v in dims.items() if v is None]}"
        nk, nv, dk, dv = dims["num_k_heads"], dims["num_v_heads"], dims["head_k_dim"], dims["head_v_dim"]
        kd, vd, kern, hid = dims["key_dim"], dims["value_dim"], dims["conv_kernel_size"], dims["hidden_size"]
        if kd != nk * dk or vd != nv * dv or nv % nk:
            return f"head layout key_dim={kd}, value_dim={vd}, {nk} key heads / {nv} value heads is not grouped"
        conv_dim = 2 * kd + vd
        conv = getattr(module, "conv1d", None)
        if type(conv) is not nn.Conv1d:
            return "conv1d is not a plain nn.Conv1d"
        if (conv.in_channels, conv.out_channels, conv.groups) != (conv_dim,) * 3 or conv.kernel_size != (kern,) \
                or conv.stride != (1,) or conv.dilation != (1,) or tuple(conv.weight.shape) != (conv_dim, 1, kern):
            return f"conv1d is not the depthwise causal conv over {conv_dim} channels with kernel {kern}"
        if getattr(conv, "_hf_hook", None) is not None:
            return "conv1d has an accelerate hook (offloaded weights) that the adapter does not fire"
        act = getattr(module, "activation", None)
        if act is not None and (not isinstance(act, str) or act not in ACT2FN):
            return f"conv activation {act!r} is not one of transformers' ACT2FN"
        for n in ("A_log", "dt_bias"):
            p = getattr(module, n, None)
            if not isinstance(p, torch.Tensor) or tuple(p.shape) != (nv,):
                return f"{n} is not a ({nv},) tensor"
        if proj == "qkvz_ba":
            errs = [_linear(module, "in_proj_qkvz", 2 * kd + 2 * vd, hid), _linear(module, "in_proj_ba", 2 * nv, hid),
                    None if callable(getattr(module, "fix_query_key_value_ordering", None))
                    else "no fix_query_key_value_ordering"]
        elif proj == "qkv_z_b_a":
            errs = [_linear(module, "in_proj_qkv", conv_dim, hid), _linear(module, "in_proj_z", vd, hid),
                    _linear(module, "in_proj_b", nv, hid), _linear(module, "in_proj_a", nv, hid)]
        else:
            errs = [_linear(module, n, kd, hid) for n in ("q_proj", "k_proj")]
            errs += [_linear(module, "v_proj", vd, hid), _linear(module, "g_proj", vd, hid),
                     _linear(module, "a_proj", nv, hid), _linear(module, "b_proj", nv, hid)]
            if not isinstance(getattr(module, "allow_neg_eigval", None), bool):
                errs.append("allow_neg_eigval is not a bool")
        norm, out = ("o_norm", "o_proj") if proj == "q_k_v_a_b_g" else ("norm", "out_proj")
        errs += [None if isinstance(getattr(module, norm, None), nn.Module) else f"no {norm} module",
                 _linear(module, out, hid, vd)]
        errs = [e for e in errs if e]
        return "; ".join(errs) if errs else None

    def matches(self, module: nn.Module) -> bool:
        return self.why_not(module) is None

    def input_width(self, module: nn.Module) -> int:
        """The width of the module's input (what a probe's hidden states must have)."""
        return module.hidden_size

    def probe_inputs(self, module: nn.Module, x: torch.Tensor) -> tuple[tuple, dict]:
        """A plain call of the module on a probe's ``x`` (1, T, hidden): ``module(*args, **kwargs)``."""
        return (x,), {}

    # -- forward

    @staticmethod
    def _bind(module: nn.Module, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The call bound to the class's ``forward(hidden_states, cache=None, attention_mask=None, **kwargs)``
        -> (hidden (B, S_local, hidden), padding mask (B, S_local) or None); refuses what it cannot honour."""
        name = type(module).__name__
        bound = call_arguments(module, args, kwargs)
        for key in ("cache", "cache_params"):  # cache_params: the deprecated name of cache
            if bound.get(key) is not None:
                raise NotImplementedError(f"{name}: {key}= (a past conv / recurrent state) is not supported under "
                                          "sequence parallelism; call without a cache (training / whole-prompt "
                                          "forward)")
        for key in _PACKING_KWARGS:
            if bound.get(key) is not None:
                raise NotImplementedError(f"{name}: {key}= (packed documents) is not supported; the state would "
                                          "have to restart at each document")
        hidden = bound["hidden_states"]
        if not isinstance(hidden, torch.Tensor) or hidden.ndim != 3:
            raise TypeError(f"{name}: hidden_states must be a (B, S_local, hidden) tensor")
        mask = bound.get("attention_mask")
        check_padding_mask(name, "attention_mask", mask, hidden)
        return hidden, mask

    def forward(self, module: nn.Module, ctx: MixerContext, args: tuple, kwargs: dict) -> Any:
        from transformers.activations import ACT2FN

        hidden, mask = self._bind(module, args, kwargs)  # (B, T, hidden), (B, T) or None
        B, T, _ = hidden.shape
        if T != ctx.runs.length:
            raise ValueError(f"{type(module).__name__}: hidden_states has {T} tokens, this rank's runs hold "
                             f"{ctx.runs.length}")
        if mask is not None:  # a padding mask zeroes its tokens' inputs, per token (the module's own rule)
            hidden = (hidden * mask[:, :, None]).to(hidden.dtype)
        proj = self.projection(module)
        nv, dk, dv = module.num_v_heads, module.head_k_dim, module.head_v_dim
        kd, vd, kern = module.key_dim, module.value_dim, module.conv_kernel_size

        # projections, per token
        beta_scale = 1.0
        if proj == "qkvz_ba":
            qkvz, ba = module.in_proj_qkvz(hidden), module.in_proj_ba(hidden)
            q, k, v, z, b, a = module.fix_query_key_value_ordering(qkvz, ba)
            mixed = torch.cat([x.reshape(B, T, -1) for x in (q, k, v)], dim=-1)  # (B, T, 2 kd + vd)
        elif proj == "qkv_z_b_a":
            mixed, z = module.in_proj_qkv(hidden), module.in_proj_z(hidden)
            b, a = module.in_proj_b(hidden), module.in_proj_a(hidden)
        else:
            mixed = torch.cat([module.q_proj(hidden), module.k_proj(hidden), module.v_proj(hidden)], dim=-1)
            b, a = module.b_proj(hidden), module.a_proj(hidden)
            z = None  # the gate is projected after the recurrence, as the module does
            beta_scale = 2.0 if module.allow_neg_eigval else 1.0

        # the causal depthwise conv, per run, over the run's inputs prefixed by the kern - 1 before it
        w, bias = module.conv1d.weight, module.conv1d.bias  # (conv_dim, 1, kern)
        act = ACT2FN[module.activation] if module.activation is not None else None

        def conv(x):  # (n B, kern - 1 + T_run, conv_dim) -> (n B, T_run, conv_dim)
            y = F.conv1d(x.transpose(1, 2).to(w.dtype), w, bias, groups=w.shape[0])
            return ((act(y) if act is not None else y).to(mixed.dtype).transpose(1, 2),)

        halos = [(x,) for x in ctx.halo(mixed, kern - 1, dim=1)]
        mixed = ctx.join([y for y, in _by_length(conv, halos, dim=1)], dim=1)  # (B, T, conv_dim)
        q, k, v = torch.split(mixed, [kd, kd, vd], dim=-1)

        beta = b.sigmoid()
        if beta_scale != 1.0:
            beta = beta * beta_scale
        g = -module.A_log.float().exp() * F.softplus(a.float() + module.dt_bias)  # (B, T, nv)

        # the kernel's inputs (B, nv, T, d): grouped heads repeated, fp32, q / k l2-normalised, q scaled
        dt = _compute_dtype(q.dtype)
        rep = nv // module.num_k_heads
        q, k = (x.reshape(B, T, -1, dk).repeat_interleave(rep, dim=2).transpose(1, 2).to(dt) for x in (q, k))
        v = v.reshape(B, T, nv, dv).transpose(1, 2).to(dt)
        q, k = (x * torch.rsqrt((x * x).sum(-1, keepdim=True) + 1e-6) for x in (q, k))
        q = q * dk ** -0.5
        beta, g = beta.transpose(1, 2).to(dt), g.transpose(1, 2).to(dt)  # (B, nv, T)

        # the recurrence: each run's summary, the entry states from every run's map, each run's outputs
        pieces = list(zip(*(ctx.split(x, dim=2) for x in (q, k, v, g, beta))))

        def summary(*x):
            r = gated_delta_run(*x)
            return r.out0, r.q_prop, r.m, r.b

        runs = [RunSummary(*r) for r in _by_length(summary, pieces, dim=2)]
        entries = ctx.entry_states([(r.m, r.b) for r in runs], "matrix")
        core = ctx.join([r.out(e) for r, e in zip(runs, entries)], dim=2)  # (B, nv, T, dv)
        core = core.transpose(1, 2).to(mixed.dtype)  # (B, T, nv, dv), the kernel's output dtype

        # gated norm and output projection, per token
        if proj == "q_k_v_a_b_g":
            z = module.g_proj(hidden)
            out = module.o_norm(core.reshape(-1, dv), z.reshape(-1, dv)).reshape(B, T, -1)
            return module.o_proj(out)
        out = module.norm(core.reshape(-1, dv), z.reshape(-1, dv)).reshape(B, T, -1)
        return module.out_proj(out)
