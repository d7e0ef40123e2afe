"""``seqpar.plan_inference``: a cost model of inference on a sharded sequence (``seqpar.plan``'s inference half).

Prefill (a prompt, or a chunk of T new tokens after L cached ones, by pass-KV or pass-Q) and one decode
step on a KV cache sharded over P context-parallel ranks, each rank optionally a tensor-parallel group of
``tp`` GPUs (Meta's CP x TP8; seqpar itself is the CP part). Everything per GPU: hq = Hq/tp, hkv =
max(1, Hkv/tp) heads, s = T/P chunk tokens and c = L/P cached tokens per CP rank, e bytes per element,
N_l parameters per block (``ModelShape.block_param_count``, or ``params / layers``), F / F_diag / F_lin
the machine's attention / causal-tile / matmul rates, M its memory bandwidth, bw the CP ring's link, and
``step(x, y) = max(x, y)`` when transfers overlap compute (GPUs), ``x + y`` otherwise (CPU ranks).

Note
----
Per layer::

    pass-KV (the chunk sharded; L = 0: a whole prompt, the ring of training's forward)
      own ring   (P-1) step(2 B hq s^2 (D+Dv)/2 / F,  lat + B hkv s (D+Dv) e / bw) + 2 B hq s^2 (D+Dv)/2 / F_diag
      cache ring (P-1) step(2 B hq s c (D+Dv) / F,    lat + B hkv c (D+Dv) e / bw) + 2 B hq s c (D+Dv) / F
      linear     2 N_l B s / tp / F_lin                      (each rank its T/P tokens)
    pass-Q (the chunk replicated on every rank: what seqpar runs; its queries never travel)
      attention  2 B hq T (c + s/2) (D+Dv) / F               (the cache shard + the chunk's dealt tokens)
      merge      all-gather of B hq T (Dv+1) fp32:  lat + (P-1) b / bw
                 or a tree (Tree Attention's log-P all-reduce): ceil(log2 P) (lat + b / bw)
      linear     2 N_l B T / tp / F_lin                      (every rank all T tokens)
    decode (pass-Q with T = 1, memory bound)
      attention  max(2 B hq c (D+Dv) / F,  B hkv c (D+Dv) e / M)    the cache shard read once
      linear     max(2 N_l B / tp / F_lin,  N_l e / tp / M)          the weights read once
      merge      as pass-Q;  + the LM head  max(2 V h B / tp / F_lin, V h e / tp / M)
    every mode, tp > 1: 2 all-reduces of the layer's tokens x h inside the node: 2 (lat + 2 (tp-1)/tp bytes / link)

pass-KV moves the cache once around the ring and computes 1/P of the chunk's linear layers; pass-Q moves
only the partial outputs but computes every layer on the whole chunk on every rank: it wins when the chunk
is short against the cache (few new tokens, a large L). :func:`choose_chunk` compares the two.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

from seqpar.plan import H100, Machine, ModelShape

__all__ = ["InferencePlan", "prefill_plan", "decode_plan", "choose_chunk", "merge_choice", "shape_of", "machine_for",
           "CPU",
           "LLAMA3_70B", "LLAMA3_405B", "Merge", "ChunkMode"]

ChunkMode = Literal["pass_kv", "pass_q"]
Merge = Literal["auto", "all_gather", "tree"]

# A CPU rank as measured by benchmarks/generate.py --chunks (4 gloo ranks sharing 2 cores, fp32, one thread each:
# ~10 ms per collective when ranks outnumber cores, ~5 GFLOP/s): what chunk="auto" plans with on CPU
CPU = Machine(attn_flops=5e9, link_bw=2e9, latency=1e-2, overlap="none", linear_flops=5e9, memory_bw=1e10)
LLAMA3_70B = ModelShape(heads=64, kv_heads=8, head_dim=128, layers=80, hidden=8192, intermediate=28672, vocab=128256)
LLAMA3_405B = ModelShape(heads=128, kv_heads=8, head_dim=128, layers=126, hidden=16384, intermediate=53248,
                         vocab=128256)


@dataclasses.dataclass(frozen=True)
class InferencePlan:
    """One forward of the whole model on the sharded cache, per GPU: seconds by part (all layers) and the
    bytes each GPU sends over the CP links. ``merge``: how partial outputs were merged (pass-Q, decode)."""

    mode: str  # "pass_kv" (a prompt when cached == 0), "pass_q", "decode"
    new_tokens: int
    cached: int
    ranks: int  # CP ranks
    tp: int
    attention: float  # seconds: attention compute and its exposed transfers
    merge_time: float  # seconds: pass-Q / decode's merge of the partials (0 for pass-KV)
    linear: float  # seconds: every other layer, the LM head and the TP all-reduces
    time: float
    bytes_sent: float  # per GPU over the CP links, all layers
    merge: str | None = None

    @property
    def gpus(self) -> int:
        return self.ranks * self.tp


def _block_params(model: ModelShape) -> float:
    if model.hidden and model.intermediate:
        return model.block_param_count()
    return model.params / max(model.layers, 1)


def _step(machine: Machine, compute: float, comm: float) -> float:
    return max(compute, comm) if machine.overlap == "full" else compute + comm


def _tp_allreduce(machine: Machine, tp: int, tokens: float, hidden: int, e: int) -> float:
    if tp <= 1 or not hidden:
        return 0.0
    return 2 * (machine.latency + 2 * (tp - 1) / tp * tokens * hidden * e / machine.link_bw)


def _merge(machine: Machine, nbytes: float, ranks: int, bw: float, merge: Merge) -> tuple[float, str]:
    if ranks == 1:
        return 0.0, "none"
    gather = machine.latency + (ranks - 1) * nbytes / bw
    tree = math.ceil(math.log2(ranks)) * (machine.latency + nbytes / bw)
    if merge == "auto":
        merge = "all_gather" if gather <= tree else "tree"
    return (gather if merge == "all_gather" else tree), merge


def _check(model, new_tokens, cached, ranks, tp, mode=None) -> None:
    if not isinstance(model, ModelShape):
        raise TypeError(f"model must be a seqpar.plan.ModelShape, got {type(model).__name__}")
    for name, value, low in (("new_tokens", new_tokens, 1), ("cached", cached, 0), ("ranks", ranks, 1), ("tp", tp, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if model.heads % tp:
        raise ValueError(f"tp={tp} must divide the model's {model.heads} query heads")
    if mode is not None and mode not in ("pass_kv", "pass_q"):
        raise ValueError(f"mode={mode!r}; expected 'pass_kv' or 'pass_q'")


def prefill_plan(model: ModelShape, new_tokens: int, ranks: int, machine: Machine = H100, *, cached: int = 0,
                 mode: ChunkMode = "pass_kv", tp: int = 1, batch: int = 1, dtype_bytes: int = 2,
                 merge: Merge = "auto") -> InferencePlan:
    """A prompt (``cached=0``) or a chunk of ``new_tokens`` after ``cached`` tokens, run by ``mode`` on
    ``ranks`` CP ranks of ``tp`` GPUs each (see the module's Note)."""
    _check(model, new_tokens, cached, ranks, tp, mode)
    P, B, e, T, L = ranks, batch, dtype_bytes, new_tokens, cached
    hq, hkv = model.heads / tp, max(1.0, model.kv_heads / tp)
    D, Dv = model.head_dim, model.v_head_dim or model.head_dim
    F, Fd, Fl = machine.attn_flops, machine.diag_flops or machine.attn_flops, machine.linear_flops
    bw = machine.ring_bw(P * tp)
    lat = machine.latency
    s, c = T / P, L / P
    n_l = _block_params(model)
    merge_name = None
    if mode == "pass_kv":
        tile = 2 * B * hq * s * s * (D + Dv) / 2
        kv = B * hkv * s * (D + Dv) * e
        own = (P - 1) * _step(machine, tile / F, lat + kv / bw) + tile / Fd
        cache, cache_kv = 0.0, B * hkv * c * (D + Dv) * e
        if L:
            ct = 2 * B * hq * s * c * (D + Dv) / F
            cache = (P - 1) * _step(machine, ct, lat + cache_kv / bw) + ct
        attention, merge_t = own + cache, 0.0
        sent = (P - 1) * (kv + (cache_kv if L else 0.0))
        tokens = B * s
    else:
        attention = 2 * B * hq * T * (c + s / 2) * (D + Dv) / F
        nbytes = B * hq * T * (Dv + 1) * 4
        merge_t, merge_name = _merge(machine, nbytes, P, bw, merge)
        sent = 0.0 if P == 1 else ((P - 1) * nbytes if merge_name == "all_gather" else
                                   math.ceil(math.log2(P)) * nbytes)
        tokens = B * T
    linear = (2 * n_l * tokens / tp / Fl if Fl else 0.0) + _tp_allreduce(machine, tp, tokens, model.hidden, e)
    layers = model.layers
    return InferencePlan(mode, T, L, P, tp, layers * attention, layers * merge_t, layers * linear,
                         layers * (attention + merge_t + linear), layers * sent, merge_name)


def decode_plan(model: ModelShape, context: int, ranks: int, machine: Machine = H100, *, tp: int = 1, batch: int = 1,
                dtype_bytes: int = 2, weight_bytes: int | None = None, merge: Merge = "auto") -> InferencePlan:
    """One decode step (one new token per batch row) with ``context`` tokens cached over ``ranks`` CP ranks
    of ``tp`` GPUs each: memory-bound attention over the cache shard and weights, one merge per layer."""
    _check(model, 1, context, ranks, tp)
    P, B, e = ranks, batch, dtype_bytes
    we = e if weight_bytes is None else weight_bytes
    hq, hkv = model.heads / tp, max(1.0, model.kv_heads / tp)
    D, Dv = model.head_dim, model.v_head_dim or model.head_dim
    F, Fl, M = machine.attn_flops, machine.linear_flops, machine.memory_bw
    c = context / P
    flops = 2 * B * hq * c * (D + Dv)
    read = B * hkv * c * (D + Dv) * e
    attention = max(flops / F, read / M if M else 0.0)
    nbytes = B * hq * (Dv + 1) * 4
    merge_t, merge_name = _merge(machine, nbytes, P, machine.ring_bw(P * tp), merge)
    n_l = _block_params(model)
    linear = max(2 * n_l * B / tp / Fl if Fl else 0.0, n_l * we / tp / M if M else 0.0)
    linear += _tp_allreduce(machine, tp, B, model.hidden, e)
    head = 0.0
    if model.vocab and model.hidden:
        vh = model.vocab * model.hidden
        head = max(2 * vh * B / tp / Fl if Fl else 0.0, vh * we / tp / M if M else 0.0)
    layers = model.layers
    sent = 0.0 if P == 1 else ((P - 1) if merge_name == "all_gather" else math.ceil(math.log2(P))) * nbytes
    return InferencePlan("decode", 1, context, P, tp, layers * attention, layers * merge_t, layers * linear + head,
                         layers * (attention + merge_t + linear) + head, layers * sent, merge_name)


def choose_chunk(model: ModelShape, new_tokens: int, cached: int, ranks: int, machine: Machine = H100, *, tp: int = 1,
                 batch: int = 1, dtype_bytes: int = 2) -> ChunkMode:
    """The faster of pass-KV and pass-Q for a chunk of ``new_tokens`` after ``cached`` (ties: pass-KV, whose
    memory per rank is O(T/P) where pass-Q holds the whole chunk's activations on every rank)."""
    opts = dict(cached=cached, tp=tp, batch=batch, dtype_bytes=dtype_bytes)
    kv = prefill_plan(model, new_tokens, ranks, machine, mode="pass_kv", **opts)
    q = prefill_plan(model, new_tokens, ranks, machine, mode="pass_q", **opts)
    return "pass_q" if q.time < kv.time else "pass_kv"


def merge_choice(machine: Machine, nbytes: float, ranks: int) -> str:
    """``"all_gather"`` or ``"tree"``: the cheaper merge of ``nbytes`` of partials per rank over ``ranks`` adjacent
    ranks (ties: the all-gather)."""
    return _merge(machine, nbytes, ranks, machine.ring_bw(ranks), "auto")[1] if ranks > 1 else "all_gather"


def shape_of(model) -> ModelShape:
    """The :class:`ModelShape` of a transformers model (its config; parameters counted when the config lacks
    the MLP width)."""
    from seqpar.plan_memory import from_hf_config

    try:
        return from_hf_config(model.config)
    except AttributeError:
        c = getattr(model.config, "text_config", None) or model.config
        heads = c.num_attention_heads
        return ModelShape(heads=heads, kv_heads=getattr(c, "num_key_value_heads", None) or heads,
                          head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads, layers=c.num_hidden_layers,
                          hidden=c.hidden_size, params=float(sum(p.numel() for p in model.parameters())))


def machine_for(device) -> Machine:
    """What ``chunk="auto"`` plans with when the cache names no machine: :data:`seqpar.plan.H100` on CUDA,
    :data:`CPU` otherwise."""
    return H100 if getattr(device, "type", str(device)) == "cuda" else CPU
