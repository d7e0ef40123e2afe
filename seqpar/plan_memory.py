"""``seqpar.plan_memory``: the bytes one training step holds per rank, item by item (``seqpar.plan``'s
memory half; ``python -m seqpar.plan`` prints it and searches the longest sequence that fits).

Note
----
Per rank: s = B S / cp tokens, e bytes per activation element (fp32: 4, bf16: 2), N = dp x cp ranks
sharing the FSDP2 shards, n parameters (:meth:`ModelShape.param_count`), h hidden, q = Hq D, kv = Hkv D,
I intermediate, V vocab. Resident through the step (device, or host with ``fsdp_offload="cpu"``)::

    params      4 n / N     fp32 shards (FSDP2; bf16 compute copies are all-gathered per block)
    grads       4 n / N     fp32, reduce-scattered per block
    optimizer   8 n / N     AdamW: exp_avg + exp_avg_sq in fp32
    (no FSDP: everything replicated, in the parameters' dtype)

Saved for the backward, per token of one Llama-style block with ``checkpoint="none"`` (what autograd
keeps; RMSNorm upcasts to fp32 and saves that copy when e < 4)::

    residual stream   x, x + attn                          2 e h
    2 RMSNorms        (e<4: fp32 x) + normed + output        2 ((4 if e < 4 else 0) h + 2 e h + 4)
    q/k/v             rotated q, rotated k, v (attention's inputs; the projections' outputs are not kept)
                                                           e (q + 2 kv)
    qk-norm (Qwen3)   the projections' outputs and normed   (4 + e) (q + kv)
    attention         out (= o_proj's input), lse (fp32)     e q + 4 Hq
    MLP (mlp="full")  gate, act(gate), up, act * up          4 e I        (tiled: 0, one tile at a time)

``checkpoint="full"``: per block only its input and the kept attention (out, lse) (the replay needs no
second forward exchange), plus one block's full set while it is recomputed. ``offload="cpu"``: the
checkpointed block inputs live on the host (device: two blocks' in flight); the kept (out, lse) stay. The largest transient is the
maximum over the step's phases:

    loss     full: logits e V (held by the output) + log_softmax 4 V + its gradient 4 V + the nll
             gradient 4 V (+ the fp32 upcast 4 V when e < 4), per token; chunked: the same for one chunk
             of ``loss_chunk`` tokens, plus the fp32 dW of the head
    layer    one block's backward: the method's working set (seqpar.plan: ring K/V double buffers +
             dK/dV, Ulysses' all-to-all buffers, all-gather's O(S) K/V), dq/dk/dv, the MLP's gradients
             (or one tile's), the unsharded parameters and gradients of the block (FSDP2)
    step     AdamW's foreach temporaries (one fp32 copy of the shards)

All numbers are a model: checked against measured CPU peaks in benchmarks/memory.py.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

from seqpar.vocab import check_choice

__all__ = ["MemoryPlan", "memory_plan", "MODELS", "model_shape", "from_hf_config", "max_seq_len", "GiB"]

Precision = Literal["fp32", "bf16"]
LossMode = Literal["auto", "chunked", "full"]
MlpMode = Literal["auto", "tiled", "full"]
Offload = Literal["none", "cpu"]
Reshard = Literal["after_forward", "keep"]
GiB = float(1 << 30)

MLP_AUTO_BYTES = 64 * 2**20  # seqpar.passes.tiled_mlp: mlp="auto" tiles calls above this, in chunks under it


def _shape():
    from seqpar.plan import ModelShape

    return ModelShape


def _presets() -> dict:
    M = _shape()
    llama8 = dict(heads=32, kv_heads=8, head_dim=128, layers=32, hidden=4096, intermediate=14336, vocab=128256)
    return {
        "llama-3.1-8b": M(**llama8),
        "llama-3-8b": M(**llama8),
        "qwen3-8b": M(heads=32, kv_heads=8, head_dim=128, layers=36, hidden=4096, intermediate=12288, vocab=151936,
                      qk_norm=True),
        "llama-3-70b": M(heads=64, kv_heads=8, head_dim=128, layers=80, hidden=8192, intermediate=28672,
                         vocab=128256),
        "tiny": M(heads=4, kv_heads=2, head_dim=16, layers=2, hidden=64, intermediate=128, vocab=256),
    }


MODELS: dict = {}  # name -> ModelShape, filled on first use (seqpar.plan defines the class)


def model_shape(name: str):
    """The :class:`seqpar.plan.ModelShape` of a named preset (:data:`MODELS`)."""
    if not MODELS:
        MODELS.update(_presets())
    check_choice("model", name, tuple(MODELS))
    return MODELS[name]


def from_hf_config(config):
    """A :class:`seqpar.plan.ModelShape` from a transformers config (Llama / Qwen / Mistral style fields)."""
    c = getattr(config, "text_config", None) or config
    heads = c.num_attention_heads
    hidden = c.hidden_size
    head_dim = getattr(c, "head_dim", None) or hidden // heads
    kind = getattr(c, "model_type", "")
    return _shape()(heads=heads, kv_heads=getattr(c, "num_key_value_heads", None) or heads, head_dim=head_dim,
                    layers=c.num_hidden_layers, hidden=hidden, intermediate=c.intermediate_size,
                    vocab=c.vocab_size, tied=bool(getattr(c, "tie_word_embeddings", False)),
                    qk_norm=kind.startswith("qwen3"))


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Per-rank bytes of one training step. ``items``: device bytes by item (they sum to ``total``; the
    transient items are the largest phase's); ``host``: bytes moved to the host (offload); ``phases``:
    the device peak of each phase (``peak_phase`` is the largest); ``options``: what was planned."""

    items: dict
    host: dict
    phases: dict
    peak_phase: str
    total: float
    seq_len: int
    tokens: int  # per rank
    options: dict

    @property
    def host_total(self) -> float:
        return float(sum(self.host.values()))

    def fits(self, limit: float) -> bool:
        return self.total <= limit

    def table(self, unit: float = 1e9, name: str = "GB") -> str:
        lines = [f"{'item':<28} {name:>10}"]
        for k, v in self.items.items():
            lines.append(f"{k:<28} {v / unit:>10.2f}")
        lines.append(f"{'total (device, per rank)':<28} {self.total / unit:>10.2f}   peak in: {self.peak_phase}")
        for k, v in self.host.items():
            lines.append(f"{'host: ' + k:<28} {v / unit:>10.2f}")
        return "\n".join(lines)

    __str__ = table


def _norm_bytes(e: int) -> float:
    """Bytes per element one RMSNorm saves beyond its input: (e<4: the fp32 upcast) + normed + output."""
    return (4 if e < 4 else 0) + 2 * e


def block_saved_bytes(m, e: int, *, mlp_tiled: bool) -> float:
    """Bytes one block keeps for its backward, per token, without checkpointing (module Note)."""
    h, q, kv = m.hidden, m.heads * m.head_dim, m.kv_heads * m.head_dim
    qv, kvv = m.heads * (m.v_head_dim or m.head_dim), m.kv_heads * (m.v_head_dim or m.head_dim)
    b = 2 * e * h  # residual stream: the block's input and the mid-block residual
    b += 2 * (_norm_bytes(e) * h + 4)  # two RMSNorms (+ fp32 rsqrt per token)
    b += e * (q + kv + kvv)  # rotated q, k and v: the attention's saved inputs
    if m.qk_norm:
        b += (4 + e) * (q + kv)  # per-head norms save the projections' outputs and their normed copies
    b += e * qv + 4 * m.heads  # attention out (kept by the method; also o_proj's input), its fp32 lse
    if not mlp_tiled:
        b += 4 * e * m.intermediate  # gate, act(gate), up, act(gate) * up
    return b


def block_backward_bytes(m, e: int, *, mlp_tiled: bool, mlp_chunk: int, tokens: int) -> float:
    """The gradients alive at once inside one block's backward (bytes for ``tokens`` tokens): the
    stream's gradient and the larger of the MLP's (its intermediates' gradients, or one tile's
    recomputed forward and gradients) and the attention's (dout, fp32 dq/dk/dv and their casts)."""
    h, q, kv = m.hidden, m.heads * m.head_dim, m.kv_heads * m.head_dim
    qv = m.heads * (m.v_head_dim or m.head_dim)
    stream = 2 * e * h * tokens  # d(output) and d(norm output) of the residual stream
    if mlp_tiled:
        c = min(mlp_chunk, tokens)
        mlp = (4 + 3) * e * m.intermediate * c + e * h * tokens  # one tile's forward + 3 gradients, dx
    else:
        mlp = 3 * e * m.intermediate * tokens
    attn = (e * qv + 4 * (q + 2 * kv) + e * (q + 2 * kv)) * tokens
    return stream + max(mlp, attn)


def _loss_bytes(m, e: int, tokens: int, *, chunked: bool) -> float:
    """The LM head + cross entropy at its peak. Full (transformers' loss on whole logits): the forward's
    logits (e), their fp32 upcast (e < 4) and log_softmax's output; or the backward's log_softmax output,
    the nll gradient and the log_softmax gradient (fp32; the logits themselves are not saved). Chunked
    (seqpar.passes.lm_loss), per chunk of ``tokens``: the recomputed logits (e), their fp32 softmax
    gradient (+ the fp32 upcast when e < 4)."""
    if chunked:
        return tokens * m.vocab * (e + 4 + (4 if e < 4 else 0))
    return tokens * m.vocab * max(e + (4 if e < 4 else 0) + 4, 12)


def default_loss_chunk(vocab: int, device: str = "cuda", free: float = 80e9) -> int:
    """seqpar.passes.lm_loss's default chunk: one chunk of fp32 logits within 64 MiB (CPU) or free / 16
    clamped to [64 MiB, 1 GiB] (CUDA); a multiple of 16."""
    budget = 64 << 20 if device == "cpu" else min(max(free // 16, 64 << 20), 1 << 30)
    tokens = max(1, int(budget // (4 * max(1, vocab))))
    return tokens - tokens % 16 if tokens > 16 else tokens


def memory_plan(model, seq_len: int, *, cp: int = 1, dp: int = 1, batch: int = 1, method: str = "ring",
                ulysses: int | None = None, checkpoint: str = "full", loss: LossMode = "chunked",
                loss_chunk: int | None = None, mlp: MlpMode = "tiled", mlp_chunk: int | None = None,
                offload: Offload = "none", precision: Precision = "bf16", fsdp: bool = True,
                reshard: Reshard = "after_forward", fsdp_offload: Offload = "none",
                device: Literal["cuda", "cpu"] = "cuda", free: float = 80e9) -> MemoryPlan:
    """Per-rank bytes of one training step (forward, backward, AdamW step) of ``model`` on a sequence of
    ``seq_len`` tokens sharded over ``cp`` ranks, FSDP2 over ``dp`` x ``cp``. Options as in
    ``seqpar.parallelize`` (module Note for what each item counts); ``device``: where the step runs
    and ``free``: its memory (the chunked loss's default chunk depends on them)."""
    from seqpar.plan import Machine, _plan  # the methods' working sets are seqpar.plan's

    check_choice("checkpoint", checkpoint, ("none", "full"))
    check_choice("loss", loss, ("auto", "chunked", "full"))
    check_choice("mlp", mlp, ("auto", "tiled", "full"))
    check_choice("offload", offload, ("none", "cpu"))
    check_choice("precision", precision, ("fp32", "bf16"))
    check_choice("reshard", reshard, ("after_forward", "keep"))
    check_choice("fsdp_offload", fsdp_offload, ("none", "cpu"))
    if seq_len % cp:
        raise ValueError(f"seq_len={seq_len} must be a multiple of cp={cp}")
    if not (model.hidden and model.intermediate and model.vocab):
        raise ValueError("memory_plan needs a whole model shape (hidden, intermediate, vocab): a preset of "
                         "seqpar.plan_memory.MODELS or from_hf_config(config)")
    e = 2 if precision == "bf16" else 4
    N = dp * cp if fsdp else 1
    s = batch * seq_len // cp  # tokens per rank
    h, L, V = model.hidden, model.layers, model.vocab
    chunked = loss != "full"
    mlp_token = (4 * model.intermediate + h) * e  # what one token's MLP saves for its backward
    tiled = mlp == "tiled" or (mlp == "auto" and s * mlp_token > MLP_AUTO_BYTES)
    lc = min(loss_chunk or default_loss_chunk(V, device, free), s)
    mc = mlp_chunk or max(1, MLP_AUTO_BYTES // mlp_token)  # parallelize's tiles: 64 MiB of intermediates

    n = model.param_count()
    n_block = model.block_param_count()
    n_root = n - L * n_block  # embeddings, final norm, untied head
    if fsdp:
        pb, gb, ob = 4 * n / N, 4 * n / N, 8 * n / N
        # the root's compute copy stays unsharded for the step; one block's (+ the prefetched next) while
        # it runs, or every block's from its forward to its backward (reshard="keep")
        unsharded = e * n_root + e * n_block * (L if reshard == "keep" else 2)
        # one block's gradient before its reduce-scatter (compute dtype + the fp32 flat copy), and the
        # head's, which waits for the root's reduce-scatter at the end of the backward
        grads_unsharded = (e + 4) * n_block + (0 if model.tied else e * V * h)
    else:
        pe = 2 if precision == "bf16" else 4  # a bf16 model keeps its parameters, grads and Adam in bf16
        pb, gb, ob = pe * n, pe * n, 2 * pe * n
        unsharded = grads_unsharded = 0.0
    resident = dict(params=pb, grads=gb, optimizer=ob)
    host = {}
    if fsdp and fsdp_offload == "cpu":
        host.update(resident)
        resident = dict(params=0.0, grads=0.0, optimizer=0.0)

    saved = block_saved_bytes(model, e, mlp_tiled=tiled) * s
    io = s * (8 * 3 + 2 * e * model.head_dim)  # input_ids, labels, positions (int64), rope cos / sin
    head_in = s * (e * h + _norm_bytes(e) * h + 4)  # the last block's output and the final norm's saved set
    if checkpoint == "none":
        acts = L * saved
        recompute = 0.0
    else:
        block_in = s * e * h  # the checkpoint's input
        attn_kept = s * (e * model.heads * (model.v_head_dim or model.head_dim) + 4 * model.heads)  # (out, lse)
        acts = L * (block_in + attn_kept)
        recompute = saved
        if offload == "cpu":  # the block inputs wait on the host; the kept (out, lse) stay on the device
            host["checkpointed block inputs"] = L * block_in
            acts = L * attn_kept + min(2, L) * block_in  # the block being recomputed and the one fetched
    activations = acts + io + head_in

    # the attention method's working set of one layer (seqpar.plan's per-method bytes)
    probe = Machine(attn_flops=1e12)
    shape = dataclasses.replace(model, layers=1)
    p = _plan(shape, seq_len, cp, probe, method=method, batch=batch, dtype_bytes=e, causal=True,
              checkpoint="none", ulysses=ulysses, layout="zigzag", memory_model=False)
    method_ws = p.memory["method_working"]

    layer_bwd = block_backward_bytes(model, e, mlp_tiled=tiled, mlp_chunk=mc, tokens=s)
    layer = recompute + method_ws + layer_bwd + (grads_unsharded if fsdp else 0.0)
    if chunked:  # one chunk, the fp32 dW of the head, d(hidden), the per-token lse
        loss_ws = _loss_bytes(model, e, lc, chunked=True) + 4 * V * h + e * h * s + 4 * s
    else:
        loss_ws = _loss_bytes(model, e, s, chunked=False) + e * h * s
    optim_ws = 4 * n / N if not (fsdp and fsdp_offload == "cpu") else 0.0
    # the sharded gradients appear block by block during the backward (and the head's at its end): the
    # forward, the loss and the first blocks' backward (where the activations peak) run without them
    base = resident["params"] + resident["optimizer"] + unsharded
    phases = {
        "loss": base + activations + loss_ws,
        "layer backward": base + activations + layer,
        "optimizer step": sum(resident.values()) + optim_ws,
    }
    peak = max(phases, key=phases.get)
    items = dict(params=resident["params"], optimizer=resident["optimizer"])
    items["unsharded params (FSDP)"] = unsharded
    items["activations (saved)"] = activations
    if peak == "loss":
        items["loss / logits"] = loss_ws
    elif peak == "layer backward":
        items["layer recompute" if recompute else "layer recompute (none)"] = recompute
        items[f"attention working ({method})"] = method_ws
        items["layer backward grads"] = layer_bwd + (grads_unsharded if fsdp else 0.0)
    else:
        items = dict(resident, **{"optimizer step temporaries": optim_ws})
    total = phases[peak]
    assert math.isclose(sum(items.values()), total, rel_tol=1e-9), (items, total)
    opts = dict(model=dataclasses.asdict(model), seq_len=seq_len, cp=cp, dp=dp, batch=batch, method=method,
                ulysses=ulysses, checkpoint=checkpoint, loss=loss, loss_chunk=lc, mlp=mlp, mlp_chunk=mc,
                offload=offload, precision=precision, fsdp=fsdp, reshard=reshard, fsdp_offload=fsdp_offload,
                device=device)
    return MemoryPlan(items, host, phases, peak, total, seq_len, s, opts)


def max_seq_len(model, limit: float, *, multiple: int | None = None, hi: int = 1 << 31, **kw) -> int:
    """The longest sequence (a multiple of ``multiple``, default 2 cp: zigzag's granularity) whose
    :func:`memory_plan` (``kw``) fits ``limit`` bytes per rank; 0 if none does. Binary search: memory
    grows with the sequence."""
    cp = kw.get("cp", 1)
    step = multiple or 2 * cp
    if memory_plan(model, step, **kw).total > limit:
        return 0
    lo, top = 1, hi // step  # lo fits; top x step is the ceiling searched
    if memory_plan(model, top * step, **kw).total <= limit:
        return top * step
    while lo < top - 1:
        mid = (lo + top) // 2
        if memory_plan(model, mid * step, **kw).total <= limit:
            lo = mid
        else:
            top = mid
    return lo * step


# ---------------------------------------------------------------------------------------------- the CLI


def main(argv: list[str] | None = None) -> None:
    """``python -m seqpar.plan``: the per-rank breakdown of one training step and the longest sequence that fits."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m seqpar.plan", description=main.__doc__)
    ap.add_argument("--model", default="llama-3.1-8b", choices=sorted(_presets()))
    ap.add_argument("--seq", type=int, default=1 << 20, help="tokens per sequence (global)")
    ap.add_argument("--gpus", type=int, default=8, help="GPUs in all (= dp x cp)")
    ap.add_argument("--cp", type=int, default=None, help="context-parallel degree (default: every GPU)")
    ap.add_argument("--dp", type=int, default=None, help="data-parallel degree (default: gpus / cp)")
    ap.add_argument("--method", default="ring", choices=("ring", "ulysses", "allgather", "hybrid"))
    ap.add_argument("--ulysses", type=int, default=None, help="hybrid's Ulysses degree")
    ap.add_argument("--checkpoint", default="full", choices=("none", "full"))
    ap.add_argument("--loss", default="chunked", choices=("auto", "chunked", "full"))
    ap.add_argument("--loss-chunk", type=int, default=None)
    ap.add_argument("--mlp", default="tiled", choices=("auto", "tiled", "full"))
    ap.add_argument("--mlp-chunk", type=int, default=None)
    ap.add_argument("--offload", default="none", choices=("none", "cpu"))
    ap.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    ap.add_argument("--reshard", default="after_forward", choices=("after_forward", "keep"))
    ap.add_argument("--fsdp-offload", default="none", choices=("none", "cpu"))
    ap.add_argument("--gpu-mem", type=float, default=80.0, help="GB (1e9 bytes) per GPU")
    a = ap.parse_args(argv)
    cp = a.cp or (a.gpus // a.dp if a.dp else a.gpus)
    dp = a.dp or max(1, a.gpus // cp)
    if cp * dp != a.gpus:
        ap.error(f"cp={cp} x dp={dp} must equal --gpus={a.gpus}")
    m = model_shape(a.model)
    kw = dict(cp=cp, dp=dp, method=a.method, ulysses=a.ulysses, checkpoint=a.checkpoint, loss=a.loss,
              loss_chunk=a.loss_chunk, mlp=a.mlp, mlp_chunk=a.mlp_chunk, offload=a.offload, precision=a.precision,
              reshard=a.reshard, fsdp_offload=a.fsdp_offload, free=a.gpu_mem * 1e9)
    p = memory_plan(m, a.seq, **kw)
    limit = a.gpu_mem * 1e9
    print(f"{a.model}: {a.seq} tokens on {a.gpus} GPUs (cp={cp}, dp={dp}), {a.method}, checkpoint={a.checkpoint}, "
          f"loss={a.loss}, mlp={a.mlp}, offload={a.offload}, precision={a.precision}, reshard={a.reshard}, "
          f"fsdp_offload={a.fsdp_offload}; {p.tokens} tokens per GPU")
    print(p.table())
    print(f"total: {p.total / 1e9:.2f} GB per GPU ({'fits' if p.total <= limit else 'does not fit'} "
          f"{a.gpu_mem:g} GB)")
    best = max_seq_len(m, limit, **kw)
    print(f"longest sequence that fits {a.gpu_mem:g} GB per GPU: {best} tokens")
