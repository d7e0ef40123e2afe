"""``seqpar.plan_mixers``: the cost and memory model of sequence mixers (gated DeltaNet, Mamba2, short convs)
under a sharded sequence, per method; ``mixers="auto"``'s choice per layer type.

A hybrid model (:class:`HybridShape`) is its attention shape (:class:`seqpar.plan.ModelShape`, modelled by
:mod:`seqpar.plan`) plus layers of sequence mixers (:class:`MixerShape`, one per layer type: how many,
which kind, their dims). Per mixer layer, per rank, three methods:

- ``gather`` (:mod:`seqpar.mixing.gather`): the layer input all-gathered, the unmodified module on the
  whole sequence on every rank (its compute P times, its activations O(S)), dx reduce-scattered;
- ``state`` (state passing, :mod:`seqpar.mixing.context`): the module's own computation on this rank's
  runs, a halo of ``kernel - 1`` conv inputs per run and one all-gather of every run's fp32 summary
  ``(M, b)`` (bytes independent of S), a sequential scan over the n runs; the summary's extra work
  inside the run (gated DeltaNet: the propagator M (dk x dk) carried through every chunk);
- ``ulysses`` over mixer heads (heads independent, ``heads % P == 0``): the projections on this rank's
  tokens, an all-to-all of the conv / recurrence inputs to H/P heads of the whole sequence, the
  recurrence on S tokens of H/P heads (the same flops as S/P tokens of H heads, no summary), an
  all-to-all of the outputs back. **Modelled only: seqpar does not implement it** (never chosen).

Note
----
Per rank s = S/P tokens, B sequences, e bytes per compute element; the fp32 recurrence. Per token (fwd
FLOPs; the backward is :data:`BWD_FLOPS` times the forward)::

    projections     2 h (proj_in + proj_out)
    conv            2 k conv_dim                       (depthwise causal, k taps)
    gated DeltaNet  per head: 4 C dk + C (dk + dv) + 2 C dv + 6 dk dv       (K K^T, Q K^T; two triangular
                    solves; A D; W S, Q S, K^T D)         state adds 6 dk^2 + 2 C dk + 2 dk dv (M's rows,
                    the entry term (q^T P) S_in)
    Mamba2 (SSD)    per head: 2 Q P + 4 N P, per group 2 Q N     state adds 2 N P (the entry term)
    short conv      none beyond the conv                  state adds nothing (halo only)

    gather   fwd = allgather(B s h e) + (flops on S tokens) / F
             bwd = BWD_FLOPS (flops on S) / F + reduce_scatter(B s h e)
    state    fwd = flops(s, with the state's extra) / F + allgather(R B (k-1) conv e)        halo
                   + allgather(R B summary 4) + n (one map apply) / F                     scan
             bwd = the mirror: BWD_FLOPS x compute, reduce-scatters of the same sizes (fp32 halo)
    ulysses  fwd = proj(s) / F + a2a(B s (conv + 2 H) e) + core(s) / F + a2a(B s inner e)
             bwd = the mirror (a2a of the same sizes)

    runs: contiguous R = 1 per rank (n = P), zigzag R = 2 (n = 2P - 1), packed ~2 per document;
    striped: every token is a run, its payloads grow with S (state not applicable)
    summary per run: gated DeltaNet H dk (dk + dv) floats (M, b); Mamba2 H (1 + P N); short conv none

Collectives are blocking (nothing overlaps); a P = 1 rank communicates nothing. ``F`` is
``Machine.mixer_flops`` (the chunked recurrence's rate; default ``linear_flops``, else ``attn_flops``).

Memory per rank and layer (saved for the backward, ``checkpoint="none"``) is bytes per token x tokens held:
the module's saved set per token (per-token parts in e bytes: input, projections, conv, norm; the core
in fp32, fitted to transformers' torch paths: gated DeltaNet 5 C + 7.5 (dk + dv) + dk dv / C floats per
head, Mamba2 2 Q + 9 P + 6 N + P N / Q) on S tokens (gather) or s tokens (state: + gated DeltaNet's q^T P
and per-chunk M, dk + dk^2 / C floats per head; ulysses), plus the method's buffers (gather: the whole
dx; state: the gathered summaries and halos). Gather's is O(S), state's and ulysses' O(S/P).

``mixers="auto"`` (:func:`choose_mixer`): state passing where its adapter is proven and the predicted
fwd + bwd time is not above gather's by more than :data:`seqpar.plan.TIME_RESOLUTION` (ties go to state:
O(S/P) memory); gather otherwise (striped, one rank, tiny local lengths where the summaries' fixed
cost dominates). Checked against measured CPU runs in ``benchmarks/hybrid.py``.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from seqpar.plan import TIME_RESOLUTION, H100, Machine, ModelShape, StepPlan
from seqpar.vocab import check_choice

__all__ = ["MixerKind", "MIXER_KINDS", "MixerMethod", "MIXER_METHODS", "IMPLEMENTED", "MixerShape", "HybridShape",
           "MixerCost", "MixerComparison", "mixer_cost", "compare_mixers", "choose_mixer", "mixer_shape",
           "HYBRIDS", "CPU", "BWD_FLOPS", "runs_per_rank", "hybrid_table"]

MixerKind = Literal["gated_delta", "mamba2", "short_conv"]
MIXER_KINDS: tuple[str, ...] = ("gated_delta", "mamba2", "short_conv")
MixerMethod = Literal["state", "gather", "ulysses"]
MIXER_METHODS: tuple[str, ...] = ("state", "gather", "ulysses")
IMPLEMENTED: tuple[str, ...] = ("state", "gather")  # ulysses over mixer heads: modelled, not implemented
BWD_FLOPS = 2.0  # backward FLOPs per forward FLOP (dx and dW of every product)

# A nominal CPU gloo rank (one thread): what parallelize's mixers="auto" plans with on CPU when the group has
# no machine (seqpar.set_machine / the attention probe); CUDA: seqpar.plan.H100
CPU = Machine(attn_flops=20e9, linear_flops=40e9, link_bw=2e9, latency=100e-6, overlap="none")


@dataclasses.dataclass(frozen=True)
class MixerShape:
    """One layer type of sequence mixer: ``layers`` layers of ``kind`` with these dims.

    gated DeltaNet: ``heads`` value heads of (``head_k_dim`` = dk, ``head_v_dim`` = dv), ``k_heads`` key heads
    (grouped; 0 = ``heads``); Mamba2: ``heads`` heads of ``head_v_dim`` = P channels, state ``head_k_dim`` = N,
    ``k_heads`` = groups of B / C; short conv: ``hidden`` channels, no heads. ``chunk``: the chunk length of
    the chunked algorithm (C, Q)."""

    kind: MixerKind
    hidden: int
    heads: int = 0
    head_k_dim: int = 0
    head_v_dim: int = 0
    k_heads: int = 0
    conv_kernel: int = 4
    chunk: int = 64
    layers: int = 1

    def __post_init__(self) -> None:
        check_choice("kind", self.kind, MIXER_KINDS)
        if self.kind != "short_conv" and not (self.heads > 0 and self.head_k_dim > 0 and self.head_v_dim > 0):
            raise ValueError(f"MixerShape(kind={self.kind!r}) needs heads, head_k_dim and head_v_dim > 0")

    @property
    def groups(self) -> int:
        """Key heads (gated DeltaNet) / B-C groups (Mamba2)."""
        return self.k_heads or (self.heads if self.kind == "gated_delta" else 1)

    @property
    def inner(self) -> int:
        """Width of the recurrence's output (the out projection's input)."""
        return self.hidden if self.kind == "short_conv" else self.heads * self.head_v_dim

    @property
    def conv_dim(self) -> int:
        """Channels of the depthwise causal conv."""
        if self.kind == "gated_delta":
            return 2 * self.groups * self.head_k_dim + self.inner
        if self.kind == "mamba2":
            return self.inner + 2 * self.groups * self.head_k_dim
        return self.hidden

    @property
    def proj_in(self) -> int:
        """Outputs of the input projections: gated DeltaNet q k v z b a, Mamba2 gate xBC dt, short conv B C x."""
        if self.kind == "gated_delta":
            return self.conv_dim + self.inner + 2 * self.heads
        if self.kind == "mamba2":
            return self.inner + self.conv_dim + self.heads
        return 3 * self.hidden

    # -- per token, forward

    def proj_flops(self) -> float:
        return 2.0 * self.hidden * (self.proj_in + self.inner)

    def conv_flops(self) -> float:
        return 2.0 * self.conv_kernel * self.conv_dim

    def core_flops(self, method: str = "gather") -> float:
        """The recurrence's forward FLOPs per token (all heads); ``method="state"`` adds the summary's work."""
        H, dk, dv, C = self.heads, self.head_k_dim, self.head_v_dim, self.chunk
        if self.kind == "gated_delta":
            f = 4 * C * dk + C * (dk + dv) + 2 * C * dv + 6 * dk * dv
            if method == "state":
                f += 6 * dk * dk + 2 * C * dk + 2 * dk * dv
            return float(H * f)
        if self.kind == "mamba2":
            f = H * (2 * C * dv + 4 * dk * dv) + self.groups * 2 * C * dk
            if method == "state":
                f += H * 2 * dk * dv
            return float(f)
        return 0.0

    def flops(self, method: str = "gather") -> float:
        """Forward FLOPs per token of the whole layer."""
        return self.proj_flops() + self.conv_flops() + self.core_flops(method)

    def summary_floats(self) -> int:
        """fp32 floats of one run's map (M, b) per sequence: what the entry-state all-gather carries."""
        H, dk, dv = self.heads, self.head_k_dim, self.head_v_dim
        if self.kind == "gated_delta":
            return H * dk * (dk + dv)
        if self.kind == "mamba2":
            return H * (1 + dv * dk)
        return 0

    def apply_flops(self) -> float:
        """FLOPs of one map apply ``M . h + b`` of the scan, per sequence."""
        H, dk, dv = self.heads, self.head_k_dim, self.head_v_dim
        if self.kind == "gated_delta":
            return 2.0 * H * dk * dk * dv
        if self.kind == "mamba2":
            return 2.0 * H * dk * dv
        return 0.0

    def saved_bytes(self, e: int, method: str = "gather") -> float:
        """Bytes the layer keeps for its backward per token (module Note; ``method="state"``: the adapter's)."""
        H, dk, dv, C = self.heads, self.head_k_dim, self.head_v_dim, self.chunk
        per_token = e * (self.hidden + self.proj_in + self.conv_dim + 4 * self.inner)
        if self.kind == "gated_delta":
            core = H * (5 * C + 7.5 * (dk + dv) + dk * dv / C) + self.groups * dk * 2 + H * dk  # + fp32 q, k, v
            if method == "state":
                core += H * (dk + dk * dk / C)
            return per_token + 4 * core
        if self.kind == "mamba2":
            return per_token + 4 * H * (2 * C + 9 * dv + 6 * dk + dv * dk / C)
        return e * 7 * self.hidden


@dataclasses.dataclass(frozen=True)
class HybridShape:
    """A hybrid model: its attention layers (``attention.layers`` of them) and its mixer layer types."""

    name: str
    attention: ModelShape
    mixers: tuple[MixerShape, ...]


# transformers' default configs (Qwen3.5, Qwen3-Next) and published shapes (Nemotron-H 8B, LFM2 1.2B): the
# layer counts and dims of the mixers; attention fields for seqpar.plan
HYBRIDS: dict[str, HybridShape] = {
    "qwen3.5": HybridShape("qwen3.5", ModelShape(heads=16, kv_heads=4, head_dim=256, layers=8, hidden=4096,
                                                 intermediate=12288, vocab=248320, qk_norm=True),
                           (MixerShape("gated_delta", 4096, heads=32, head_k_dim=128, head_v_dim=128, k_heads=16,
                                       conv_kernel=4, chunk=64, layers=24),)),
    "qwen3-next": HybridShape("qwen3-next", ModelShape(heads=16, kv_heads=2, head_dim=256, layers=12, hidden=2048,
                                                       qk_norm=True),
                              (MixerShape("gated_delta", 2048, heads=32, head_k_dim=128, head_v_dim=128, k_heads=16,
                                          conv_kernel=4, chunk=64, layers=36),)),
    "nemotron-h-8b": HybridShape("nemotron-h-8b", ModelShape(heads=32, kv_heads=8, head_dim=128, layers=4,
                                                             hidden=4096),
                                 (MixerShape("mamba2", 4096, heads=128, head_k_dim=128, head_v_dim=64, k_heads=8,
                                             conv_kernel=4, chunk=128, layers=24),)),
    "lfm2-1.2b": HybridShape("lfm2-1.2b", ModelShape(heads=32, kv_heads=8, head_dim=64, layers=6, hidden=2048),
                             (MixerShape("short_conv", 2048, conv_kernel=3, layers=10),)),
}


def runs_per_rank(layout: str, ranks: int) -> tuple[int, int]:
    """(the most runs a rank holds, runs over all ranks) of one sequence (packed: one document)."""
    if ranks == 1:
        return 1, 1
    if layout == "contiguous":
        return 1, ranks
    if layout in ("zigzag", "packed"):
        return 2, 2 * ranks - (1 if layout == "zigzag" else 0)
    raise ValueError(f"layout={layout!r}: every token is its own run (state passing is not modelled)")


@dataclasses.dataclass(frozen=True)
class MixerCost:
    """One mixer layer under one method: ``fwd`` / ``bwd`` (compute and communication, not overlapped),
    ``memory`` (bytes per rank: ``activations`` saved, ``working`` the method's buffers, ``total``)."""

    method: str
    kind: str
    seq_len: int
    ranks: int
    s_local: int
    fwd: StepPlan
    bwd: StepPlan
    memory: dict
    implemented: bool = True

    @property
    def time(self) -> float:
        """Seconds of one layer, forward + backward."""
        return self.fwd.time + self.bwd.time

    @property
    def bytes(self) -> float:
        return self.fwd.bytes + self.bwd.bytes

    def row(self) -> dict:
        return dict(method=self.method, kind=self.kind, seq_len=self.seq_len, ranks=self.ranks, s_local=self.s_local,
                    fwd_ms=self.fwd.time * 1e3, bwd_ms=self.bwd.time * 1e3,
                    comm_ms=(self.fwd.comm + self.bwd.comm) * 1e3,
                    bytes=self.bytes, flops=self.fwd.flops + self.bwd.flops,
                    activations_gb=self.memory["activations"] / 1e9, memory_gb=self.memory["total"] / 1e9,
                    implemented=self.implemented)


def mixer_cost(mixer: MixerShape, seq_len: int, ranks: int, machine: Machine, *, method: str, batch: int = 1,
               dtype_bytes: int = 2, layout: str = "zigzag") -> MixerCost:
    """One layer of ``mixer`` on ``ranks`` ranks (module Note). ``ValueError`` where ``method`` cannot run
    these shapes (:func:`compare_mixers` reports it as not applicable)."""
    check_choice("method", method, MIXER_METHODS)
    if seq_len % ranks:
        raise ValueError(f"seq_len={seq_len} must be a multiple of ranks={ranks}")
    P, s, B, e, m = ranks, seq_len // ranks, batch, dtype_bytes, mixer
    F = machine.mixer_flops or machine.linear_flops or machine.attn_flops
    coll = machine.ring_collective
    h = m.hidden
    if method == "gather":
        f_fwd = B * seq_len * m.flops("gather")
        gath = B * s * h * e
        fwd = StepPlan(f_fwd / F, coll(gath, P), (P - 1) * gath, f_fwd, "none")
        bwd = StepPlan(BWD_FLOPS * f_fwd / F, coll(gath, P), (P - 1) * gath, BWD_FLOPS * f_fwd, "none")
        acts = B * seq_len * m.saved_bytes(e, "gather")
        working = 2 * B * seq_len * h * e  # the whole dx, and its rank-ordered copy for the reduce-scatter
    elif method == "state":
        R, n = runs_per_rank(layout, P)
        f_fwd = B * s * m.flops("state")
        halo = R * B * (m.conv_kernel - 1) * m.conv_dim
        summ = R * B * m.summary_floats() * 4
        scan = n * B * m.apply_flops()
        comm_f = (coll(halo * e, P) + (coll(summ, P) if summ else 0.0)) if P > 1 else 0.0
        comm_b = (coll(halo * 4, P) + (coll(summ, P) if summ else 0.0)) if P > 1 else 0.0
        moved = (P - 1) * (halo * e + summ) if P > 1 else 0.0
        fwd = StepPlan((f_fwd + scan) / F, comm_f, moved, f_fwd + scan, "none")
        bwd = StepPlan(BWD_FLOPS * (f_fwd + scan) / F, comm_b, moved + (P - 1) * halo * (4 - e),
                       BWD_FLOPS * (f_fwd + scan), "none")
        acts = B * s * m.saved_bytes(e, "state")
        working = P * (summ + halo * 4) + n * B * m.summary_floats() * 4  # gathered maps / halos, the entry states
    else:  # ulysses over the mixer's heads (channels for a short conv)
        units = m.heads if m.kind != "short_conv" else m.conv_dim
        if units % P:
            raise ValueError(f"ulysses over mixer heads needs {'heads' if m.kind != 'short_conv' else 'channels'}="
                             f"{units} divisible by P={P}")
        g = m.groups if m.kind == "short_conv" or m.groups % P == 0 else P  # key heads / groups: copies when fewer
        conv_in = m.conv_dim if m.kind == "short_conv" else (m.conv_dim - 2 * m.groups * m.head_k_dim
                                                              + 2 * g * m.head_k_dim)
        extra = 0 if m.kind == "short_conv" else (2 * m.heads if m.kind == "gated_delta" else m.heads)  # g, beta / dt
        a_in, a_out = B * s * (conv_in + extra) * e, B * s * m.inner * e
        f_fwd = B * s * m.flops("gather")  # the core on S tokens of H/P heads = s tokens of H heads
        a2a = lambda n: machine.all_to_all(n, P)  # noqa: E731
        fwd = StepPlan(f_fwd / F, a2a(a_in) + a2a(a_out), a_in + a_out, f_fwd, "none")
        bwd = StepPlan(BWD_FLOPS * f_fwd / F, a2a(a_in) + a2a(a_out), a_in + a_out, BWD_FLOPS * f_fwd, "none")
        acts = B * s * m.saved_bytes(e, "gather")
        working = 2 * (a_in + a_out)
    memory = dict(activations=float(acts), working=float(working), total=float(acts + working))
    return MixerCost(method, m.kind, seq_len, P, s, fwd, bwd, memory, method in IMPLEMENTED)


@dataclasses.dataclass(frozen=True)
class MixerComparison:
    """Every method for one mixer layer type: ``costs`` (the applicable ones), ``not_applicable`` (method ->
    why) and ``best`` (among :data:`IMPLEMENTED`: the least memory within :data:`TIME_RESOLUTION` of the
    fastest; ties in the order of :data:`MIXER_METHODS`)."""

    mixer: MixerShape
    costs: dict
    not_applicable: dict
    best: str

    def table(self) -> str:
        lines = [f"{'method':<9} {'fwd ms':>10} {'bwd ms':>10} {'comm ms':>9} {'MB moved':>9} {'acts GB':>8} "
                 f"{'mem GB':>7}"]
        for name, c in sorted(self.costs.items(), key=lambda kv: kv[1].time):
            mark = "  <- chosen" if name == self.best else ("  (modelled, not implemented)" if not c.implemented
                                                            else "")
            lines.append(f"{name:<9} {c.fwd.time * 1e3:>10.3f} {c.bwd.time * 1e3:>10.3f} "
                         f"{(c.fwd.comm + c.bwd.comm) * 1e3:>9.3f} {c.bytes / 1e6:>9.2f} "
                         f"{c.memory['activations'] / 1e9:>8.3f} {c.memory['total'] / 1e9:>7.3f}{mark}")
        for name, why in self.not_applicable.items():
            lines.append(f"{name:<9} not applicable: {why}")
        return "\n".join(lines)

    __str__ = table


def compare_mixers(mixer: MixerShape, seq_len: int, ranks: int, machine: Machine, *, batch: int = 1,
                   dtype_bytes: int = 2, layout: str = "zigzag", methods: tuple[str, ...] | None = None
                   ) -> MixerComparison:
    """Every method of ``methods`` (default :data:`MIXER_METHODS`) for one layer of ``mixer``; ``best`` among
    the implemented ones (module Note: state passing unless gather is faster by more than the resolution)."""
    costs, why = {}, {}
    for method in methods or MIXER_METHODS:
        try:
            costs[method] = mixer_cost(mixer, seq_len, ranks, machine, method=method, batch=batch,
                                       dtype_bytes=dtype_bytes, layout=layout)
        except ValueError as err:
            why[method] = str(err)
    usable = [m for m in costs if costs[m].implemented]
    if not usable:
        raise ValueError(f"no implemented method runs this mixer on {ranks} ranks: {why}")
    fastest = min(costs[m].time for m in usable)
    close = [m for m in usable if costs[m].time <= fastest * (1 + TIME_RESOLUTION)]
    best = min(close, key=lambda m: (costs[m].memory["total"], MIXER_METHODS.index(m)))
    return MixerComparison(mixer, costs, why, best)


def choose_mixer(mixer: MixerShape, s_local: int, ranks: int, *, layout: str, machine: Machine | None = None,
                 device: str = "cpu", batch: int = 1, dtype_bytes: int = 4) -> str:
    """``mixers="auto"``'s path for one call: ``"state"`` or ``"gather"`` (:func:`compare_mixers`'s best of the
    two). ``machine``: the group's (``seqpar.set_machine`` / the attention probe), else :data:`CPU` on CPU,
    :data:`seqpar.plan.H100` on CUDA. Deterministic in its arguments: every rank of a group chooses alike."""
    if layout == "striped" or ranks == 1:
        return "gather"
    machine = machine or (CPU if device == "cpu" else H100)
    return compare_mixers(mixer, s_local * ranks, ranks, machine, batch=batch, dtype_bytes=dtype_bytes,
                          layout=layout, methods=IMPLEMENTED).best


def mixer_shape(module) -> MixerShape | None:
    """The :class:`MixerShape` of a transformers mixer module, read from its attributes (gated DeltaNet:
    ``num_v_heads`` ...; Mamba2: ``num_heads``, ``head_dim``, ``ssm_state_size``, ``n_groups``; LFM2's short
    conv: ``conv`` + ``in_proj``), or None for a kind this model does not cover (then auto keeps a proven
    adapter)."""
    def ints(*names):
        vals = [getattr(module, n, None) for n in names]
        return vals if all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in vals) else None

    gd = ints("hidden_size", "num_v_heads", "num_k_heads", "head_k_dim", "head_v_dim", "conv_kernel_size")
    if gd is not None:
        h, nv, nk, dk, dv, kern = gd
        return MixerShape("gated_delta", h, heads=nv, head_k_dim=dk, head_v_dim=dv, k_heads=nk, conv_kernel=kern)
    m2 = ints("hidden_size", "num_heads", "head_dim", "ssm_state_size", "n_groups", "conv_kernel_size", "chunk_size")
    if m2 is not None:
        h, H, P, N, G, kern, Q = m2
        return MixerShape("mamba2", h, heads=H, head_k_dim=N, head_v_dim=P, k_heads=G, conv_kernel=kern, chunk=Q)
    conv, proj = getattr(module, "conv", None), getattr(module, "in_proj", None)
    ch, ks = getattr(conv, "in_channels", None), getattr(conv, "kernel_size", None)
    if isinstance(ch, int) and getattr(conv, "groups", None) == ch and getattr(proj, "out_features", None) == 3 * ch \
            and isinstance(ks, tuple) and len(ks) == 1:
        return MixerShape("short_conv", ch, conv_kernel=ks[0])
    return None


def hybrid_table(name: str, seq_len: int, ranks: int, machine: Machine = H100, *, batch: int = 1,
                 dtype_bytes: int = 2, layout: str = "zigzag") -> str:
    """``python -m seqpar.plan --hybrid NAME``: per mixer layer type, every method's row and the choice; the
    attention layers' method (seqpar.plan.compare) and the hybrid's layers summed, all-state vs all-gather."""
    from seqpar.plan import compare

    check_choice("hybrid", name, tuple(HYBRIDS))
    hy = HYBRIDS[name]
    lines = [f"{name}: {seq_len} tokens on {ranks} ranks ({seq_len // ranks} per rank), {layout}, batch {batch}, "
             f"{dtype_bytes}-byte activations"]
    totals = {m: 0.0 for m in MIXER_METHODS}
    auto = 0.0
    for mx in hy.mixers:
        c = compare_mixers(mx, seq_len, ranks, machine, batch=batch, dtype_bytes=dtype_bytes, layout=layout)
        lines.append(f"\n{mx.layers} x {mx.kind} (hidden {mx.hidden}, heads {mx.heads}, dk {mx.head_k_dim}, "
                     f"dv {mx.head_v_dim}): one layer")
        lines.append(c.table())
        for m, cost in c.costs.items():
            totals[m] += mx.layers * cost.time
        auto += mx.layers * c.costs[c.best].time
    att = compare(hy.attention, seq_len, ranks, machine, batch=batch, dtype_bytes=dtype_bytes, layout=layout)
    a = hy.attention.layers * att.plans[att.best].attn_time
    lines.append(f"\n{hy.attention.layers} x attention ({att.best}): {a * 1e3:.1f} ms fwd+bwd in all")
    lines.append("mixer + attention layers, fwd+bwd (no MLP / projections of attention): "
                 + ", ".join(f"all {m} {(t + a) * 1e3:.1f} ms" for m, t in totals.items() if m in IMPLEMENTED)
                 + f", auto {(auto + a) * 1e3:.1f} ms")
    return "\n".join(lines)
