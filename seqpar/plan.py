"""``seqpar.plan``: a cost model of sequence-parallel attention, per method, per step and per training step.

Given a model shape, a global sequence length, P ranks and the machine (per-link bandwidth inside and
across nodes, kernel throughput), it predicts for each method what one layer's attention costs in
compute and communication, whether the communication hides behind the compute, the training-step
time and the memory per rank; :func:`compare` (or ``plan(..., method="auto")``) ranks the methods for
one shape on one mesh and says why a method cannot run. Validated against measured CPU runs in
benchmarks/scaling.py; docs/scaling.md has the 1M-token projection. Inference (prefill, chunks on a warm
cache by pass-KV / pass-Q, decode on a sharded cache) is :mod:`seqpar.plan_inference`.

Note
----
Per layer, each of the P ranks holds s = S/P tokens (e bytes per element, f = 1/2 causal, 1 full).

ring: one ring step = one (query block, KV block) tile plus one neighbour exchange, in flight together::

    step:   |-- tile compute: c = flops_tile / F --|
            |-- send KV -> r+1, recv <- r-1: m = latency + bytes / BW --|
    time    = max(c, m)     (hidden iff m <= c; GPUs: copy engines / NIC move the bytes)
    time    = c + m         (overlap="none": CPU ranks whose own core does the copies)

    flops_tile (fwd) = 4 B Hq s^2 D * f      zigzag/striped balance the causal half tiles
    flops_tile (bwd) = 10 B Hq s^2 D * f     (5 matmuls of the 2 forward ones' size, with recompute)
    bytes (fwd)      = 2 B Hkv s D * e       K and V, GQA heads un-repeated
    bytes (bwd)      = 2 B Hkv s D * (e + 4) K/V again, plus dK/dV travelling in fp32

    forward  = (P-1) max(c_f, m_f) + d_f                  (d: the causal diagonal tile, its own rate)
    backward = (P-1) max(c_b, m_b) + d_b + m_dkv          (dK/dV's last hop home is not overlapped)

  Compute per step falls like 1/P^2 and bytes like 1/P: the ring hides its communication only for
  long enough local blocks. Across nodes every step moves at the slowest link (the inter-node one).

ulysses (Hq % P == 0): all-to-alls over heads, then the whole S x S attention on Hq/P heads; nothing
overlaps. (P-1)/P of each all-to-all's bytes leave a rank (:meth:`Machine.all_to_all`); Hkv' = Hkv if
Hkv % P == 0, else P (each kv head sent P/Hkv times)::

    forward  = a2a(B (Hq + 2 Hkv') s D e) + 4 B (Hq/P) S^2 D f / F + a2a(B Hq s (D+1) 4)        out+lse fp32
    backward = a2a(B Hq s D e) + 10 B (Hq/P) S^2 D f / F_b + a2a(B (Hq + 2 Hkv') s D 4)   dout in, dq/dk/dv fp32
    (the forward's gathered q, k, v, out, lse are kept for the backward: one more copy in memory)

allgather: K/V all-gathered (one latency, (P-1) blocks through each rank at the ring's bandwidth), the
ring's tiles against every block, dK/dV reduce-scattered in fp32; the collectives are blocking, so
nothing overlaps. Memory O(S): the gathered K/V and (backward) the fp32 dK/dV of every block::

    forward  = allgather(2 B Hkv s D e) + (P-1) c_f + d_f
    backward = allgather(2 B Hkv s D e) + (P-1) c_b + d_b + reduce_scatter(2 B Hkv s D 4)

hybrid (cp = U x R, U = the Ulysses degree on adjacent ranks of one node, R = P/U across nodes): the
Ulysses all-to-all over U ranks (intra-node links), then a ring of R steps over super-blocks of U s
tokens with Hq/U heads: per step U times the ring's compute for the same K/V bytes
(2 B Hkv'' s D e, Hkv'' = Hkv if Hkv % U == 0 else U), on the ring's (inter-node) link::

    forward  = a2a_U(q, k, v) + (R-1) max(U c_f, m_f'') + d_f'' + a2a_U(out, lse)
    backward = a2a_U(dout) + (R-1) max(U c_b, m_b'') + d_b'' + m_dkv'' + a2a_U(dq, dk, dv)

So hybrid moves the ring's bytes in R steps instead of P: it hides them where the ring cannot
(short local blocks on slow inter-node links) for the price of the intra-node all-to-alls.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from seqpar.vocab import AUTO, METHODS, check_choice

__all__ = ["ModelShape", "Machine", "StepPlan", "Plan", "Comparison", "plan", "compare", "applicable", "probe_machine",
           "MODELLED", "PROBE_TAG", "LLAMA3_8B", "H100", "TIME_RESOLUTION"]
Checkpoint = Literal["none", "full"]
# predicted attention times closer than this (relative) are a tie: auto then takes the least memory
TIME_RESOLUTION = 0.05
Overlap = Literal["full", "none"]
# the methods with a cost model here: seqpar.vocab.METHODS and the hybrid (modelled even before it lands there)
MODELLED: tuple[str, ...] = tuple(dict.fromkeys((*METHODS, "hybrid")))


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """Attention shape, plus what the non-attention part needs (``params``, ``hidden``; 0 = ignore)."""

    heads: int
    kv_heads: int
    head_dim: int
    layers: int = 1
    hidden: int = 0  # model width, for activation memory
    params: float = 0.0  # non-embedding parameters, for the linear-layer FLOPs (6 N per token)
    v_head_dim: int | None = None  # v's (and the output's) head dim when it differs (MLA); None = head_dim
    intermediate: int = 0  # MLP width (gate/up/down), for seqpar.plan_memory (0 = attention-only shape)
    vocab: int = 0  # vocabulary size: embedding, LM head and logits
    tied: bool = False  # LM head shares the embedding's weight
    qk_norm: bool = False  # per-head RMSNorm on q and k (Qwen3)

    def block_param_count(self) -> float:
        """Parameters of one Llama-style block: q/k/v/o projections, gate/up/down, two norms (+ qk-norms)."""
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        qv, kvv = self.heads * (self.v_head_dim or self.head_dim), self.kv_heads * (self.v_head_dim or self.head_dim)
        return h * (q + kv + kvv) + qv * h + 3 * h * self.intermediate + 2 * h + (2 * self.head_dim if self.qk_norm
                                                                                  else 0)

    def param_count(self) -> float:
        """Every parameter: blocks, embedding, final norm and (untied) LM head; ``params`` when the shape
        is attention-only (no ``intermediate`` / ``vocab``)."""
        if not (self.hidden and self.intermediate and self.vocab):
            return self.params
        return self.layers * self.block_param_count() + self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden


@dataclasses.dataclass(frozen=True)
class Machine:
    """Per-rank throughput and per-link bandwidth (bytes/s, one direction, neighbour to neighbour).

    ``link_bw`` is the intra-node link, ``inter_node_bw`` the per-GPU link across nodes of
    ``ranks_per_node`` ranks (adjacent ranks share a node). ``all_to_all_bw``: a measured all-to-all
    bandwidth over the whole group (bytes leaving a rank per second), used for ulysses instead of the links."""

    attn_flops: float  # attention kernel, forward FLOP/s on an unmasked tile of the local block's size
    attn_bwd_flops: float | None = None  # backward FLOP/s (default: attn_flops)
    diag_flops: float | None = None  # forward FLOP/s on a causal (diagonal) tile (default: attn_flops)
    diag_bwd_flops: float | None = None  # backward on a causal tile (default: attn_bwd_flops)
    link_bw: float = 50e9  # within a node (or the only link)
    inter_node_bw: float | None = None  # across nodes (default: link_bw)
    ranks_per_node: int = 0  # 0 = one node holds every rank
    latency: float = 0.0  # seconds per exchange / collective step
    overlap: Overlap = "full"  # "none": transfers take the cores that compute (CPU ranks, 1 thread each)
    linear_flops: float = 0.0  # dense matmul FLOP/s for the non-attention layers (0 = ignore)
    memory: float = 0.0  # bytes per rank (0 = unknown)
    all_to_all_bw: float | None = None  # measured all-to-all bandwidth over the whole group (default: the links)
    memory_bw: float = 0.0  # device memory (HBM) bytes/s: decode's reads of weights and cache (0 = ignore;
    #                          seqpar.plan_inference)
    mixer_flops: float = 0.0  # FLOP/s of the sequence mixers' chunked recurrences and convs (seqpar.plan_mixers;
    #                            0 = linear_flops, else attn_flops)

    def spans_nodes(self, ranks: int) -> bool:
        return bool(self.ranks_per_node and ranks > self.ranks_per_node and self.inter_node_bw)

    def ring_bw(self, ranks: int) -> float:
        """The bandwidth of a ring over ``ranks`` adjacent ranks: its slowest link."""
        if self.spans_nodes(ranks):
            return min(self.link_bw, self.inter_node_bw)
        return self.link_bw

    def all_to_all(self, nbytes: float, ranks: int, *, whole_group: bool = True) -> float:
        """Seconds for an all-to-all of ``nbytes`` per rank over ``ranks`` adjacent ranks ((P-1)/P leave
        each rank; across nodes the on-node and off-node shares move at once on their own links)."""
        P = ranks
        if P == 1 or nbytes == 0:
            return 0.0
        if whole_group and self.all_to_all_bw:
            return self.latency + nbytes * (P - 1) / P / self.all_to_all_bw
        if not self.spans_nodes(P):
            return self.latency + nbytes * (P - 1) / P / self.link_bw
        n = self.ranks_per_node
        on, off = nbytes * (n - 1) / P / self.link_bw, nbytes * (P - n) / P / self.inter_node_bw
        return self.latency + (max(on, off) if self.overlap == "full" else on + off)

    def ring_collective(self, block_bytes: float, ranks: int) -> float:
        """Seconds for an all-gather (or reduce-scatter) of one ``block_bytes`` block per rank: one launch
        (``latency``), (P-1) blocks through each rank at the ring's (slowest) link."""
        P = ranks
        return 0.0 if P == 1 else self.latency + (P - 1) * block_bytes / self.ring_bw(P)


LLAMA3_8B = ModelShape(heads=32, kv_heads=8, head_dim=128, layers=32, hidden=4096, params=6.98e9)
# H100 SXM: NVLink 450 GB/s per direction within a node, 50 GB/s (400 Gb/s) per GPU across nodes;
# FlashAttention-class kernels ~450 TFLOP/s fwd / ~350 bwd in bf16, matmuls at ~50% of 989 TFLOP/s.
H100 = Machine(attn_flops=450e12, attn_bwd_flops=350e12, link_bw=450e9, inter_node_bw=50e9, ranks_per_node=8,
               latency=20e-6, linear_flops=500e12, memory=80e9, memory_bw=3.35e12)


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """One step of one layer: seconds of compute and communication, and whether it is hidden. A ring
    step for ring and hybrid (a super-step); the whole layer for ulysses and allgather (``overlap="none"``:
    their collectives do not overlap compute)."""

    compute: float
    comm: float
    bytes: float
    flops: float

    overlap: Overlap = "full"

    @property
    def hidden(self) -> bool:
        return self.overlap == "full" and self.comm <= self.compute

    @property
    def time(self) -> float:
        return max(self.compute, self.comm) if self.overlap == "full" else self.compute + self.comm


@dataclasses.dataclass(frozen=True)
class Plan:
    method: str
    seq_len: int
    ranks: int
    s_local: int
    fwd: StepPlan  # one ring step, one layer (ulysses / allgather: the layer's totals, not overlapped)
    bwd: StepPlan
    attn_fwd: float  # seconds, one layer, whole method
    attn_bwd: float
    linear: float  # seconds per training step for the non-attention layers (fwd + bwd)
    step_time: float  # seconds per training step: layers x (attn_fwd + attn_bwd) + linear
    memory: dict  # bytes per rank, by part
    ulysses: int = 1  # the all-to-all degree U (ulysses: P; hybrid: U; ring, allgather: 1)
    choice: "Comparison | None" = None  # plan(method="auto"): every method's prediction, and why

    @property
    def comm_hidden(self) -> bool:
        return self.fwd.hidden and self.bwd.hidden

    @property
    def tokens_per_s(self) -> float:
        return self.seq_len / self.step_time

    @property
    def attn_time(self) -> float:
        """Seconds of one layer's attention, forward + backward (what :func:`compare` ranks by)."""
        return self.attn_fwd + self.attn_bwd

    def explain(self) -> str:
        """plan(method="auto"): the table of every method's prediction and the choice; else one line."""
        if self.choice is not None:
            return self.choice.table()
        return f"{self.method}: attention fwd+bwd {self.attn_time * 1e3:.3f} ms per layer"

    def row(self) -> dict:
        return dict(method=self.method, seq_len=self.seq_len, ranks=self.ranks, s_local=self.s_local,
                    ulysses=self.ulysses,
                    step_compute_fwd_ms=self.fwd.compute * 1e3, step_comm_fwd_ms=self.fwd.comm * 1e3,
                    step_compute_bwd_ms=self.bwd.compute * 1e3, step_comm_bwd_ms=self.bwd.comm * 1e3,
                    hidden=self.comm_hidden, attn_fwd_ms=self.attn_fwd * 1e3, attn_bwd_ms=self.attn_bwd * 1e3,
                    step_time_s=self.step_time, tokens_per_s=self.tokens_per_s,
                    memory_gb=self.memory["total"] / 1e9)


@dataclasses.dataclass(frozen=True)
class Comparison:
    """Every modelled method for one shape on one mesh: ``plans`` (the applicable ones), ``not_applicable``
    (method -> why), ``best`` (the least memory among those within :data:`TIME_RESOLUTION` of the fastest
    attention fwd+bwd; ties go to the earlier of :data:`MODELLED`)."""

    plans: dict  # method -> Plan
    not_applicable: dict  # method -> reason
    best: str

    def table(self) -> str:
        lines = [f"{'method':<10} {'U':>4} {'fwd ms':>10} {'bwd ms':>10} {'fwd+bwd ms':>11} {'hidden':>6} "
                 f"{'mem GB':>7}"]
        for name, p in sorted(self.plans.items(), key=lambda kv: kv[1].attn_time):
            mark = "  <- chosen" if name == self.best else ""
            lines.append(f"{name:<10} {p.ulysses:>4} {p.attn_fwd * 1e3:>10.3f} {p.attn_bwd * 1e3:>10.3f} "
                         f"{p.attn_time * 1e3:>11.3f} {str(p.comm_hidden):>6} {p.memory['total'] / 1e9:>7.2f}{mark}")
        for name, why in self.not_applicable.items():
            lines.append(f"{name:<10} not applicable: {why}")
        return "\n".join(lines)

    __str__ = table


def applicable(method: str, *, heads: int, kv_heads: int, s_local: int, ranks: int, layout: str = "zigzag",
               ulysses: int | None = None) -> str | None:
    """``None`` if ``method`` runs these shapes on P = ``ranks`` (``ulysses``: the mesh's Ulysses degree,
    for hybrid), else the reason (the text of ``seqpar.methods.check``'s error)."""
    from seqpar import methods  # the methods' own rules; imported here so that the cost model stays light

    check_choice("method", method, MODELLED)
    kw = dict(hq=heads, hkv=kv_heads, s_local=s_local, layout=layout)
    try:
        if method == "hybrid":
            if ulysses is None or ulysses < 2 or ranks % ulysses:
                return (f"hybrid needs a mesh with a Ulysses degree U > 1 dividing P={ranks} (got ulysses={ulysses}); "
                        f"build it with seqpar.init_mesh(cp, ulysses=U)")
            cls = getattr(methods, "_METHODS", {}).get("hybrid")
            if cls is not None and hasattr(cls, "check_heads"):  # the heads split over the U sub-group
                cls.check_heads(hq=heads, hkv=kv_heads, ulysses=ulysses, cp=ranks)
            else:
                methods.check("ulysses", world=ulysses, **kw)
            if method in METHODS:
                methods.check(method, world=ranks, **kw)
        else:
            methods.check(method, world=ranks, **kw)
    except ValueError as e:
        return str(e)
    return None


def plan(
    model: ModelShape,
    seq_len: int,
    ranks: int,
    machine: Machine,
    *,
    batch: int = 1,
    dtype_bytes: int = 2,
    causal: bool = True,
    method: str = "ring",
    checkpoint: Checkpoint = "full",
    ulysses: int | None = None,
    layout: str = "zigzag",
    memory: dict | None = None,
) -> Plan:
    """Predicted per-step costs of ``seqpar.attention`` (``method``) and of a training step.

    ``method``: one of :data:`MODELLED`, or ``"auto"``: the fastest applicable one (:func:`compare`; the
    returned plan's ``explain()`` gives every method's prediction). ``ulysses``: hybrid's Ulysses degree
    U (the mesh's; hybrid needs it). ``layout`` only matters for which methods apply.
    ``checkpoint="full"``: only each layer's input is kept for the backward (plus one layer's
    activations while it is recomputed); ``"none"``: every layer keeps ~34 bytes x hidden per token
    (Megatron's count for fp16 with fused attention). Parameters, gradients and Adam state (16 bytes
    per parameter) are sharded over all ranks (FSDP). Logits are assumed computed in chunks.
    A whole model shape (``intermediate`` and ``vocab`` set, e.g. ``seqpar.plan_memory.model_shape(
    "llama-3.1-8b")``) gets :func:`seqpar.plan_memory.memory_plan`'s per-item bytes instead, with
    ``memory``: its options (``loss``, ``mlp``, ``offload``, ``precision``, ``dp``, ...).
    """
    check_choice("method", method, (*MODELLED, AUTO))
    if seq_len % ranks:
        raise ValueError(f"seq_len={seq_len} must be a multiple of ranks={ranks}")
    opts = dict(batch=batch, dtype_bytes=dtype_bytes, causal=causal, checkpoint=checkpoint, ulysses=ulysses,
                layout=layout, memory=memory)
    if method == AUTO:
        c = compare(model, seq_len, ranks, machine, **opts)
        return dataclasses.replace(c.plans[c.best], choice=c)
    if method in ("ulysses", "hybrid"):
        why = applicable(method, heads=model.heads, kv_heads=model.kv_heads, s_local=seq_len // ranks, ranks=ranks,
                         layout=layout, ulysses=ulysses)
        if why:  # the model needs whole heads per rank; the other methods' rules (layout) do not change costs
            raise ValueError(f"method={method!r} cannot run this shape: {why}")
    return _plan(model, seq_len, ranks, machine, method=method, **opts)


def compare(model: ModelShape, seq_len: int, ranks: int, machine: Machine, *, batch: int = 1, dtype_bytes: int = 2,
            causal: bool = True, checkpoint: Checkpoint = "full", ulysses: int | None = None, layout: str = "zigzag",
            methods: tuple[str, ...] | None = None, memory: dict | None = None) -> Comparison:
    """Every method of ``methods`` (default :data:`MODELLED`) for these shapes on P = ``ranks``: the
    plans of those that apply, the reason for those that do not (shapes, no Ulysses degree, or more
    memory than ``machine.memory``), and the best: among the methods within :data:`TIME_RESOLUTION`
    of the fastest predicted attention time (the model cannot rank closer), the one with the least
    memory per rank (ring / hybrid's O(S/P) buffers over all-gather's O(S) K/V); ties in order of
    :data:`MODELLED`. The other arguments as in :func:`plan`."""
    if seq_len % ranks:
        raise ValueError(f"seq_len={seq_len} must be a multiple of ranks={ranks}")
    opts = dict(batch=batch, dtype_bytes=dtype_bytes, causal=causal, checkpoint=checkpoint, ulysses=ulysses,
                layout=layout, memory=memory)
    plans, why = {}, {}
    for m in methods or MODELLED:
        reason = applicable(m, heads=model.heads, kv_heads=model.kv_heads, s_local=seq_len // ranks, ranks=ranks,
                            layout=layout, ulysses=ulysses)
        if reason is None and m not in METHODS:
            reason = "not in seqpar.vocab.METHODS (modelled only)"
        if reason is not None:
            why[m] = reason
            continue
        p = _plan(model, seq_len, ranks, machine, method=m, **opts)
        if machine.memory and p.memory["total"] > machine.memory:
            why[m] = f"needs {p.memory['total'] / 1e9:.1f} GB per rank, the machine has {machine.memory / 1e9:.1f}"
            continue
        plans[m] = p
    if not plans:
        raise ValueError(f"no method runs these shapes on {ranks} ranks: {why}")
    fastest = min(p.attn_time for p in plans.values())
    close = [m for m in plans if plans[m].attn_time <= fastest * (1 + TIME_RESOLUTION)]
    best = min(close, key=lambda m: (plans[m].memory["total"], MODELLED.index(m)))
    return Comparison(plans, why, best)


def _plan(model: ModelShape, seq_len: int, ranks: int, machine: Machine, *, method: str, batch: int,
          dtype_bytes: int, causal: bool, checkpoint: Checkpoint, ulysses: int | None, layout: str,
          memory: dict | None = None, memory_model: bool = True) -> Plan:
    P, s, B, e = ranks, seq_len // ranks, batch, dtype_bytes
    Hq, Hkv, D = model.heads, model.kv_heads, model.head_dim
    Dv = model.v_head_dim or D  # MLA: v / out / dv have their own head dim (then 2 D below is D + Dv)
    f = 0.5 if causal else 1.0
    lat, ov = machine.latency, machine.overlap
    Ff = machine.attn_flops
    Fb = machine.attn_bwd_flops or Ff
    Fdf = machine.diag_flops or Ff
    Fdb = machine.diag_bwd_flops or Fb
    kv_bytes = B * Hkv * s * (D + Dv) * e  # this rank's K/V block
    dkv_bytes = B * Hkv * s * (D + Dv) * 4
    flops_f = 2 * B * Hq * s * s * (D + Dv) * f  # one (balanced) ring tile: q k^T (D), p v (Dv)
    flops_b = 2 * B * Hq * s * s * (3 * D + 2 * Dv) * f  # recompute q k^T, dq, dk (D); dv, dp (Dv)
    qkvo = B * s * ((Hq + Hkv) * D + (Hq + Hkv) * Dv) * e
    lse_dq = B * Hq * s * (D + 1) * 4  # fp32 dq accumulator and lse
    U = 1

    def hop(nbytes: float, bw: float) -> float:
        return lat + nbytes / bw

    if method in ("ring", "hybrid"):
        U = 1 if method == "ring" else int(ulysses)
        R = P // U
        hkv_u = Hkv if Hkv % U == 0 else U  # kv heads per super-block: Hkv/U or 1 head, U s tokens
        step_kv, step_dkv = B * hkv_u * s * (D + Dv) * e, B * hkv_u * s * (D + Dv) * 4
        bw = machine.ring_bw(P)

        def comm(nbytes: float) -> float:
            return hop(nbytes, bw) if R > 1 else 0.0

        fwd = StepPlan(U * flops_f / Ff, comm(step_kv), step_kv, U * flops_f, ov)
        bwd = StepPlan(U * flops_b / Fb, comm(step_kv + step_dkv), step_kv + step_dkv, U * flops_b, ov)
        # the diagonal (super-)step: U causal tiles at the diagonal rate, U (U-1) half tiles at the tile rate
        diag_f = (flops_f / Fdf + (U - 1) * flops_f / Ff) if causal else fwd.compute
        diag_b = (flops_b / Fdb + (U - 1) * flops_b / Fb) if causal else bwd.compute
        a2a_in_f = a2a_out_f = a2a_in_b = a2a_out_b = 0.0
        if U > 1:
            a2a = lambda n: machine.all_to_all(n, U, whole_group=False)  # noqa: E731  the U adjacent ranks
            a2a_in_f = a2a(B * ((Hq + hkv_u) * D + hkv_u * Dv) * s * e)
            a2a_out_f = a2a(B * Hq * s * (Dv + 1) * 4)
            a2a_in_b = a2a(B * Hq * s * Dv * e)  # dout: the forward's gathered q, k, v, out, lse are kept
            a2a_out_b = a2a(B * ((Hq + hkv_u) * D + hkv_u * Dv) * s * 4)
        attn_fwd = a2a_in_f + (R - 1) * fwd.time + diag_f + a2a_out_f
        # step 1 carries K/V only (the owner's dK/dV stays home), steps 2 .. R-1 K/V and the dK/dV buffer,
        # then the buffer's hop home (exposed)
        bwd1 = StepPlan(U * flops_b / Fb, comm(step_kv), step_kv, U * flops_b, ov)
        attn_bwd = a2a_in_b + (bwd1.time + (R - 2) * bwd.time if R > 1 else 0.0) + diag_b + comm(step_dkv) + a2a_out_b
        # the backward's peak (measured: benchmarks/memory.py --methods): K/V current + received (+ the spare
        # of a ring of > 2); fp32 dK/dV: the owner's (home), this step's tile grads and their fused buffer
        # (+ one in flight each way on a ring of > 2)
        working = (2 + (R > 2)) * step_kv + (3 + 2 * (R > 2)) * step_dkv
        if U > 1:  # the all-to-all'd backward inputs and fp32 gradients (as many elements as the local ones)
            # the kept gathered q, k, v, out (+ lse), dout, and the fp32 gradients
            working += (B * ((Hq + hkv_u) * D + (2 * Hq + hkv_u) * Dv) * s * e + B * Hq * s * 4
                        + B * ((Hq + hkv_u) * D + hkv_u * Dv) * s * 4)
    elif method == "ulysses":
        U = P
        hkv_p = Hkv if Hkv % P == 0 else P  # kv heads sent (copies when Hkv < P)
        a2a = lambda n: machine.all_to_all(n, P)  # noqa: E731
        in_f, out_f = B * ((Hq + hkv_p) * D + hkv_p * Dv) * s * e, B * Hq * s * (Dv + 1) * 4
        in_b = B * Hq * s * Dv * e  # dout only: the forward's gathered q, k, v, out, lse are kept
        out_b = B * ((Hq + hkv_p) * D + hkv_p * Dv) * s * 4
        S = seq_len
        ff, fb = 2 * B * (Hq // P) * S * S * (D + Dv) * f, 2 * B * (Hq // P) * S * S * (3 * D + 2 * Dv) * f
        # one kernel on the whole sequence, H/P heads: cut into P x P blocks of the ring's size s it is the
        # ring's mix, P causal diagonal blocks (1/P of the causal flops, at the diagonal rate) and full
        # blocks (at the full rate), so its compute equals the ring's per rank
        cf = ff / P / Fdf + ff * (P - 1) / P / Ff if causal else ff / Ff
        cb = fb / P / Fdb + fb * (P - 1) / P / Fb if causal else fb / Fb
        fwd = StepPlan(cf, a2a(in_f) + a2a(out_f), in_f + out_f, ff, "none")
        bwd = StepPlan(cb, a2a(in_b) + a2a(out_b), in_b + out_b, fb, "none")
        attn_fwd, attn_bwd = fwd.time, bwd.time
        kept = B * ((Hq + hkv_p) * D + (Hq + hkv_p) * Dv) * s * e + B * Hq * s * 4  # gathered q, k, v, out, lse
        # the backward's peak (measured: benchmarks/memory.py --methods): the kept gathered tensors, dout
        # gathered, and the fp32 gradients three times (the kernel's, the fused message, the received one)
        working = kept + in_b + 3 * out_b
    elif method == "allgather":
        gather, scatter = machine.ring_collective(kv_bytes, P), machine.ring_collective(dkv_bytes, P)
        diag_f = flops_f / Fdf if causal else flops_f / Ff
        diag_b = flops_b / Fdb if causal else flops_b / Fb
        comp_f, comp_b = (P - 1) * flops_f / Ff + diag_f, (P - 1) * flops_b / Fb + diag_b
        fwd = StepPlan(comp_f, gather, (P - 1) * kv_bytes, P * flops_f, "none")
        bwd = StepPlan(comp_b, gather + scatter, (P - 1) * (kv_bytes + dkv_bytes), P * flops_b, "none")
        attn_fwd, attn_bwd = fwd.time, bwd.time
        # O(S): the gathered K/V (+ the local fused block it was gathered from) and every block's fp32
        # dK/dV (+ one tile's from the kernel)
        working = (P + 1) * kv_bytes + (P + 1) * dkv_bytes
    else:  # pragma: no cover - check_choice above
        raise AssertionError(method)

    linear = 6 * model.params * B * s / machine.linear_flops if machine.linear_flops and model.params else 0.0
    step_time = model.layers * (attn_fwd + attn_bwd) + linear
    h = model.hidden or Hq * D
    per_layer_full = 34 * B * s * h  # bytes of saved activations per layer (fp16/bf16, fused attention)
    if checkpoint == "full":
        acts = model.layers * B * s * h * dtype_bytes + per_layer_full
    else:
        acts = model.layers * per_layer_full
    if memory_model and model.hidden and model.intermediate and model.vocab:  # a whole model: every byte
        from seqpar.plan_memory import memory_plan

        # 2-byte activations: parallelize's precision="bf16" on an fp32 model (FSDP2 mixed precision: fp32
        # shards, gradients and AdamW state), or a model cast to bf16 without FSDP; ``memory`` may say which
        opts = dict(memory or {})
        if dtype_bytes == 2 and "precision" not in opts and "param_dtype" not in opts:
            if opts.get("fsdp", True):
                opts["precision"] = "bf16"
            else:
                opts.update(precision="fp32", param_dtype="bf16")
        elif dtype_bytes != 2:
            opts.setdefault("precision", "fp32")
        mp = memory_plan(model, seq_len, cp=P, batch=B, method=method, ulysses=ulysses, checkpoint=checkpoint,
                         **opts)
        memory = dict(mp.items, total=mp.total)
    else:
        memory = dict(
            params_grads_optim=16 * model.params / P,
            activations=acts,
            attention_working=qkvo + working + lse_dq,
        )
        memory["total"] = sum(memory.values())
    memory["method_working"] = working + lse_dq  # the method's own buffers (not in the total's sum)
    return Plan(method, seq_len, P, s, fwd, bwd, attn_fwd, attn_bwd, linear, step_time, memory, U)


# ---------------------------------------------------------------------------------------------- the probe

PROBE_TAG = 31  # the probe's ring messages: never a tag of an attention call (seqpar.comm.call_tags: 17, 23 mod 64)


def probe_machine(group=None, *, device=None, dtype=None, head_dim: int = 64, backend: str = "auto",
                  ulysses_group=None) -> Machine:
    """Measure a :class:`Machine` on ``group`` (a collective: every rank of the group calls it together).

    A short probe (~0.1-1 s): the attention kernel's forward and backward throughput on one small tile
    (full and causal, ``dtype``/``device``/``backend`` as the attention call's), a ring exchange of a large
    block (bandwidth) and of 4 KiB (latency), an all-to-all over the group (torch.distributed groups), an
    all-to-all over ``ulysses_group`` (hybrid's intra-node sub-group; its bandwidth becomes ``link_bw``)
    and the ranks' host names (``ranks_per_node``), and the memory a rank can still allocate (``memory``: the
    device's free memory on CUDA, the host's available memory shared by the node's ranks on CPU, the
    least over ranks; :func:`compare` rules out a method whose working set exceeds it). Every rank's times
    are combined by their maximum
    (one small all-gather), so every rank returns the same machine. Attention call numbers and message
    tags are not touched (ring messages carry :data:`PROBE_TAG`). ``overlap`` is "full" on CUDA, else "none".
    """
    import socket
    import time
    import zlib

    import torch
    import torch.distributed as dist

    from seqpar.comm import TransportGroup, all_to_all, gather_ints, make_ring
    from seqpar.kernels import block_attention, block_attention_backward, resolve_backend
    from seqpar.mesh import group_rank_size, resolve_group

    g = resolve_group(group)
    rank, P = group_rank_size(g)
    device = torch.device("cpu") if device is None else torch.device(device)
    dtype = dtype or torch.float32
    cuda = device.type == "cuda"
    backend = resolve_backend(backend, device)

    def timed(fn, reps: int = 2) -> int:  # ns, the minimum of reps after one warm-up
        fn()
        best = None
        for _ in range(reps):
            if cuda:
                torch.cuda.synchronize(device)
            t0 = time.perf_counter_ns()
            fn()
            if cuda:
                torch.cuda.synchronize(device)
            dt = time.perf_counter_ns() - t0
            best = dt if best is None else min(best, dt)
        return max(best, 1)

    gen = torch.Generator(device=device).manual_seed(0)
    H, n, D = 4, (2048 if cuda else 256), head_dim
    q, k, v, do = (torch.randn(1, H, n, D, generator=gen, device=device).to(dtype) for _ in range(4))
    kern = []
    for mask in ("full", "causal"):
        out, lse = block_attention(q, k, v, mask=mask, scale=D ** -0.5, backend=backend)
        kern.append(timed(lambda m=mask: block_attention(q, k, v, mask=m, scale=D ** -0.5, backend=backend)))
        kern.append(timed(lambda m=mask, o=out, l=lse: block_attention_backward(
            do, q, k, v, o.to(dtype), l, mask=m, scale=D ** -0.5, backend=backend)))
    big = (64 if cuda else 4) << 20
    comm, a2a_bytes = [0, 0, 0, 0], 0
    if P > 1:
        ring = make_ring(g)
        for i, nbytes in enumerate((big, 4096)):
            send = torch.zeros(nbytes // 4, dtype=torch.float32, device=device)
            recv = torch.empty_like(send)
            comm[i] = timed(lambda s=send, r=recv: ring.exchange(s, r, tag=PROBE_TAG).wait())
        if not isinstance(g, TransportGroup):
            x = torch.zeros(P, big // 4 // P, dtype=torch.float32, device=device)
            a2a_bytes = x.numel() * 4
            comm[2] = timed(lambda: all_to_all(x, g, 0, 0))
            if ulysses_group is not None and dist.get_world_size(ulysses_group) > 1:
                U = dist.get_world_size(ulysses_group)
                y = torch.zeros(U, big // 4 // U, dtype=torch.float32, device=device)
                comm[3] = timed(lambda: all_to_all(y, ulysses_group, 0, 0))
    host = zlib.crc32(socket.gethostname().encode()) & 0x7FFFFFFF
    free = _free_mib(device)
    rows = gather_ints([*kern, *comm, free, host], g) if P > 1 else [[*kern, *comm, free, host]]
    worst = [max(r[i] for r in rows) for i in range(len(kern) + len(comm))]
    hosts = [r[-1] for r in rows]
    s = lambda ns: ns * 1e-9  # noqa: E731
    full_f, full_b = 4 * H * n * n * D, 10 * H * n * n * D
    lat = s(worst[5]) if P > 1 else 0.0
    ring_bw = big / max(s(worst[4]) - lat, 1e-9) if P > 1 else 50e9
    per_node = hosts.count(hosts[0])
    free_bytes = min(r[-2] for r in rows) * float(1 << 20)
    if not cuda:  # CPU ranks of a node share its memory
        free_bytes /= per_node
    multi = P > 1 and per_node < P
    link = ring_bw
    if worst[7]:
        U = dist.get_world_size(ulysses_group)
        link = big * (U - 1) / U / max(s(worst[7]) - lat, 1e-9)
    return Machine(
        attn_flops=full_f / s(worst[0]), attn_bwd_flops=full_b / s(worst[1]),
        diag_flops=full_f / 2 / s(worst[2]), diag_bwd_flops=full_b / 2 / s(worst[3]),
        link_bw=link if multi else max(link, ring_bw), inter_node_bw=ring_bw if multi else None,
        ranks_per_node=per_node if multi else 0, latency=lat, overlap="full" if cuda else "none",
        all_to_all_bw=(a2a_bytes * (P - 1) / P / max(s(worst[6]) - lat, 1e-9)) if worst[6] else None,
        memory=free_bytes,
    )


def _free_mib(device) -> int:
    """MiB this rank can still allocate: the device's free memory (CUDA), the host's MemAvailable (CPU);
    0 when unknown (then no method is ruled out for memory)."""
    import torch

    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0] >> 20)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) >> 10
    except OSError:
        pass
    return 0


if __name__ == "__main__":  # python -m seqpar.plan: the memory breakdown and the longest sequence that fits
    from seqpar.plan_memory import main

    main()
