"""``seqpar.plan``: a cost model of sequence-parallel attention, per ring step and per training step.

Given a model shape, a global sequence length, P ranks and the machine (per-link bandwidth, kernel
throughput), it predicts what one ring step costs in compute and communication, whether the
communication hides behind the compute, the step time and the memory per rank. Validated against
measured CPU runs in benchmarks/scaling.py; docs/scaling.md has the 1M-token projection.

Note
----
Per layer, each of the P ranks holds S/P tokens. One ring step = one (query block, KV block) tile
plus one neighbour exchange, both in flight together::

    step:   |-- tile compute: c = flops_tile / F --|
            |-- send KV -> r+1, recv <- r-1: m = latency + bytes / BW --|
    time    = max(c, m)     (hidden iff m <= c; GPUs: copy engines / NIC move the bytes)
    time    = c + m         (overlap="none": CPU ranks whose own core does the copies)

    flops_tile (fwd) = 4 B Hq s^2 D * f      s = S/P, f = 1/2 causal zigzag/striped (balanced), 1 full
    flops_tile (bwd) = 10 B Hq s^2 D * f     (5 matmuls of the 2 forward ones' size, with recompute)
    bytes (fwd)      = 2 B Hkv s D * e       K and V, e bytes each, GQA heads un-repeated
    bytes (bwd)      = 2 B Hkv s D * (e + 4) K/V again, plus dK/dV travelling in fp32

    forward  = (P-1) max(c_f, m_f) + d_f                  (d: the causal diagonal tile, its own rate)
    backward = (P-1) max(c_b, m_b) + d_b + m_dkv          (dK/dV's last hop home is not overlapped)

So the compute per step falls like 1/P^2 and the bytes like 1/P: the ring hides its communication
while ``s = S/P >= (4 + ...) F e Hkv / (f 2 Hq BW)`` roughly, i.e. for long enough local blocks.
Across nodes every step moves at the slowest link in the ring (the inter-node one).

``method``: the cost model covers ``"ring"``; the other methods of :data:`seqpar.vocab.METHODS`
(``ulysses``, ``allgather``) are refused until their costs are added here.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from seqpar.vocab import METHODS, Method, check_choice

__all__ = ["ModelShape", "Machine", "StepPlan", "Plan", "plan", "LLAMA3_8B", "H100"]
Checkpoint = Literal["none", "full"]
Overlap = Literal["full", "none"]


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """Attention shape, plus what the non-attention part needs (``params``, ``hidden``; 0 = ignore)."""

    heads: int
    kv_heads: int
    head_dim: int
    layers: int = 1
    hidden: int = 0  # model width, for activation memory
    params: float = 0.0  # non-embedding parameters, for the linear-layer FLOPs (6 N per token)


@dataclasses.dataclass(frozen=True)
class Machine:
    """Per-rank throughput and per-link bandwidth (bytes/s, one direction, neighbour to neighbour)."""

    attn_flops: float  # attention kernel, forward FLOP/s on an unmasked tile of the local block's size
    attn_bwd_flops: float | None = None  # backward FLOP/s (default: attn_flops)
    diag_flops: float | None = None  # forward FLOP/s on the causal diagonal tile (default: attn_flops)
    diag_bwd_flops: float | None = None  # backward on the diagonal tile (default: attn_bwd_flops)
    link_bw: float = 50e9  # within a node (or the only link)
    inter_node_bw: float | None = None  # across nodes (default: link_bw)
    ranks_per_node: int = 0  # 0 = one node holds every rank
    latency: float = 0.0  # seconds per exchange
    overlap: Overlap = "full"  # "none": transfers take the cores that compute (CPU ranks, 1 thread each)
    linear_flops: float = 0.0  # dense matmul FLOP/s for the non-attention layers (0 = ignore)
    memory: float = 0.0  # bytes per rank (0 = unknown)

    def ring_bw(self, ranks: int) -> float:
        if self.ranks_per_node and ranks > self.ranks_per_node and self.inter_node_bw:
            return min(self.link_bw, self.inter_node_bw)
        return self.link_bw


LLAMA3_8B = ModelShape(heads=32, kv_heads=8, head_dim=128, layers=32, hidden=4096, params=6.98e9)
# H100 SXM: NVLink 450 GB/s per direction within a node, 50 GB/s (400 Gb/s) per GPU across nodes;
# FlashAttention-class kernels ~450 TFLOP/s fwd / ~350 bwd in bf16, matmuls at ~50% of 989 TFLOP/s.
H100 = Machine(attn_flops=450e12, attn_bwd_flops=350e12, link_bw=450e9, inter_node_bw=50e9, ranks_per_node=8,
               latency=20e-6, linear_flops=500e12, memory=80e9)


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """One ring step of one layer: seconds of compute and communication, and whether it is hidden."""

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
    fwd: StepPlan  # one ring step, one layer
    bwd: StepPlan
    attn_fwd: float  # seconds, one layer, whole ring
    attn_bwd: float
    linear: float  # seconds per training step for the non-attention layers (fwd + bwd)
    step_time: float  # seconds per training step: layers x (attn_fwd + attn_bwd) + linear
    memory: dict  # bytes per rank, by part

    @property
    def comm_hidden(self) -> bool:
        return self.fwd.hidden and self.bwd.hidden

    @property
    def tokens_per_s(self) -> float:
        return self.seq_len / self.step_time

    def row(self) -> dict:
        return dict(method=self.method, seq_len=self.seq_len, ranks=self.ranks, s_local=self.s_local,
                    step_compute_fwd_ms=self.fwd.compute * 1e3, step_comm_fwd_ms=self.fwd.comm * 1e3,
                    step_compute_bwd_ms=self.bwd.compute * 1e3, step_comm_bwd_ms=self.bwd.comm * 1e3,
                    hidden=self.comm_hidden, attn_fwd_ms=self.attn_fwd * 1e3, attn_bwd_ms=self.attn_bwd * 1e3,
                    step_time_s=self.step_time, tokens_per_s=self.tokens_per_s,
                    memory_gb=self.memory["total"] / 1e9)


def plan(
    model: ModelShape,
    seq_len: int,
    ranks: int,
    machine: Machine,
    *,
    batch: int = 1,
    dtype_bytes: int = 2,
    causal: bool = True,
    method: Method = "ring",
    checkpoint: Checkpoint = "full",
) -> Plan:
    """Predicted per-step costs of ``seqpar.attention`` (``method``) and of a training step.

    ``checkpoint="full"``: only each layer's input is kept for the backward (plus one layer's
    activations while it is recomputed); ``"none"``: every layer keeps ~34 bytes x hidden per token
    (Megatron's count for fp16 with fused attention). Parameters, gradients and Adam state (16 bytes
    per parameter) are sharded over all ranks (FSDP). Logits are assumed computed in chunks.
    """
    check_choice("method", method, METHODS)
    if method != "ring":
        raise ValueError(f"method={method!r}: seqpar.plan models method='ring' only so far; its cost model for "
                         f"{method!r} is not written yet")
    if seq_len % ranks:
        raise ValueError(f"seq_len={seq_len} must be a multiple of ranks={ranks}")
    P, s, B = ranks, seq_len // ranks, batch
    Hq, Hkv, D = model.heads, model.kv_heads, model.head_dim
    f = 0.5 if causal else 1.0
    bw, lat = machine.ring_bw(P), machine.latency
    Fb = machine.attn_bwd_flops or machine.attn_flops
    kv_bytes = 2 * B * Hkv * s * D * dtype_bytes
    dkv_bytes = 2 * B * Hkv * s * D * 4

    def comm(nbytes: float) -> float:
        return lat + nbytes / bw if P > 1 else 0.0

    flops_f = 4 * B * Hq * s * s * D * f
    flops_b = 10 * B * Hq * s * s * D * f
    ov = machine.overlap
    fwd = StepPlan(flops_f / machine.attn_flops, comm(kv_bytes), kv_bytes, flops_f, ov)
    bwd = StepPlan(flops_b / Fb, comm(kv_bytes + dkv_bytes), kv_bytes + dkv_bytes, flops_b, ov)
    # the causal diagonal tile (step 0) runs at its own rate; every other step is a (half) tile
    diag_f = flops_f / (machine.diag_flops or machine.attn_flops) if causal else fwd.compute
    diag_b = flops_b / (machine.diag_bwd_flops or Fb) if causal else bwd.compute
    attn_fwd = (P - 1) * fwd.time + diag_f
    attn_bwd = (P - 1) * bwd.time + diag_b + (comm(dkv_bytes) if P > 1 else 0.0)
    ring_buffers = 2 * kv_bytes + 2 * dkv_bytes  # KV double buffer + dK/dV in flight (fp32)
    linear = 6 * model.params * B * s / machine.linear_flops if machine.linear_flops and model.params else 0.0
    step_time = model.layers * (attn_fwd + attn_bwd) + linear

    h = model.hidden or Hq * D
    qkvo = B * s * (2 * Hq + 2 * Hkv) * D * dtype_bytes
    per_layer_full = 34 * B * s * h  # bytes of saved activations per layer (fp16/bf16, fused attention)
    if checkpoint == "full":
        acts = model.layers * B * s * h * dtype_bytes + per_layer_full
    else:
        acts = model.layers * per_layer_full
    memory = dict(
        params_grads_optim=16 * model.params / P,
        activations=acts,
        attention_working=qkvo + ring_buffers + B * Hq * s * (D + 1) * 4,  # + fp32 dq accumulator and lse
    )
    memory["total"] = sum(memory.values())
    return Plan(method, seq_len, P, s, fwd, bwd, attn_fwd, attn_bwd, linear, step_time, memory)
