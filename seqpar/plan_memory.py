"""``seqpar.plan_memory``: the bytes one training step holds per rank, item by item (``seqpar.plan``'s
memory half; ``python -m seqpar.plan`` prints it and searches the longest sequence that fits).

Note
----
Per rank: s = B S / cp tokens, N = dp x cp ranks sharing the FSDP2 shards, n parameters
(:meth:`ModelShape.param_count`), h hidden, q = Hq D, kv = Hkv D, I intermediate, V vocab. Two dtypes:
p bytes per parameter element, the model's own dtype (``param_dtype``, "fp32" unless the model was cast),
and e bytes per compute element: ``precision`` is parallelize's FSDP2 option
(:class:`seqpar.fsdp_options.FSDPOptions`): "bf16" / "fp16" gather the parameters and compute (so
every activation) in that dtype on an fp32 model, e = 2, p = 4; "fp32" casts nothing, e = p. Resident
through the step (device, or host with ``fsdp_offload="cpu"``), :meth:`FSDPOptions.state_bytes`::

    params      p n / N     sharded parameters (what AdamW steps; fp32 under mixed precision)
    grads       p n / N     reduce-scattered per block (in fp32 under mixed precision)
    optimizer   2 p n / N   AdamW: exp_avg + exp_avg_sq in the parameters' dtype
    (no FSDP: the same, replicated: N = 1, nothing gathered)

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
second forward exchange), plus one block's set while it is recomputed, less those two (the recomputed
block's input and replayed (out, lse) are the same tensors). ``offload="cpu"``: the checkpointed block
inputs live on the host (device: two blocks' in flight); the kept (out, lse) stay. The largest
transient is the maximum over the step's phases (each measured per op on CPU ranks: the loss, then one
block's backward in its two halves, in the reverse order of its forward)::

    loss       full: logits e V (held by the output) + log_softmax 4 V + its gradient 4 V + the nll
               gradient 4 V (+ the fp32 upcast 4 V when e < 4), per token; chunked: the same for one
               chunk of ``loss_chunk`` tokens, plus the fp32 dW of the head. Every block's saved set.
    MLP bwd    the block's whole saved set (recomputed under checkpointing) + the stream's gradients +
               the MLP's: d(act * up), d(act), d(up) less the freed act * up (2 e I; tiled: one tile's
               forward and gradients and d(x)). No attention buffers are alive yet.
    attn bwd   the MLP half has freed the MLP's, the second norm's and x + attn's saved tensors; now
               the method's working set (seqpar.plan: ring K/V double buffers + dK/dV, Ulysses'
               all-to-all buffers, all-gather's O(S) K/V) + dout, dq/dk/dv (fp32) and their casts
    (both)     the final norm's saved set is gone (its backward ran), one block's unsharded gradient
               (compute + fp32 reduce copy, FSDP2) and the head's (reduced with the root, at the end)
    step       AdamW's foreach temporaries (one copy of the shards)

All numbers are a model: checked against measured CPU peaks in benchmarks/memory.py.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

from seqpar.fsdp_options import (DTYPE_BYTES, FSDP_OFFLOADS, PRECISIONS, RESHARDS, FSDPOffload, FSDPOptions,
                                  Precision, Reshard)
from seqpar.vocab import check_choice

__all__ = ["MemoryPlan", "memory_plan", "MODELS", "model_shape", "from_hf_config", "max_seq_len", "GiB",
           "ParamDtype", "PARAM_DTYPES"]

LossMode = Literal["auto", "chunked", "full"]
MlpMode = Literal["auto", "tiled", "full"]
Offload = Literal["none", "cpu"]  # offload= (checkpointed block inputs); fsdp_offload= is FSDPOffload
# the dtype the model's own parameters are in (model.to(...) before parallelize): "fp32" for mixed precision
ParamDtype = Literal["fp32", "bf16", "fp16"]
PARAM_DTYPES: tuple[str, ...] = tuple(DTYPE_BYTES)
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


def block_saved_parts(m, e: int, *, mlp_tiled: bool) -> dict:
    """Bytes one block keeps for its backward, per token, without checkpointing, by who keeps them
    (module Note). ``input``: the block's input (= the checkpoint's input); ``attn_out``: the attention's
    (out, lse) (= what seqpar's checkpoint keeps); ``mid``: the mid-block residual x + attn, kept only by
    the second norm; ``post_norm`` and ``mlp``: freed by the MLP half of the backward, before the
    attention half runs."""
    h, q, kv = m.hidden, m.heads * m.head_dim, m.kv_heads * m.head_dim
    qv, kvv = m.heads * (m.v_head_dim or m.head_dim), m.kv_heads * (m.v_head_dim or m.head_dim)
    return dict(
        input=e * h,
        in_norm=_norm_bytes(e) * h + 4,  # the first RMSNorm (+ fp32 rsqrt per token)
        qkv=e * (q + kv + kvv),  # rotated q, k and v: the attention's saved inputs
        qk_norm=(4 + e) * (q + kv) if m.qk_norm else 0,  # per-head norms: projections' outputs + normed copies
        attn_out=e * qv + 4 * m.heads,  # attention out (kept by the method; also o_proj's input), fp32 lse
        mid=e * h,
        post_norm=_norm_bytes(e) * h + 4,
        mlp=0 if mlp_tiled else 4 * e * m.intermediate,  # gate, act(gate), up, act(gate) * up
    )


def block_saved_bytes(m, e: int, *, mlp_tiled: bool) -> float:
    """Bytes one block keeps for its backward, per token, without checkpointing (module Note)."""
    return float(sum(block_saved_parts(m, e, mlp_tiled=mlp_tiled).values()))


def block_attention_saved_bytes(m, e: int, *, mlp_tiled: bool) -> float:
    """What of :func:`block_saved_bytes` is still alive when the block's attention backward runs: the
    MLP, the second norm and the mid-block residual were freed by the MLP half of its backward."""
    parts = block_saved_parts(m, e, mlp_tiled=mlp_tiled)
    return float(sum(parts.values()) - parts["mlp"] - parts["post_norm"] - parts["mid"])


def mlp_backward_bytes(m, e: int, *, mlp_tiled: bool, mlp_chunk: int, tokens: int) -> float:
    """The MLP half of one block's backward (bytes for ``tokens`` tokens), beyond the block's saved set:
    the stream's gradient (d(output), d(norm output)) and the MLP's: d(act * up), d(act) and d(up) at
    once, less the saved act * up, which the down projection's backward frees as it makes its gradient
    (net 2 intermediates); tiled: the same for one tile, on top of its recomputed forward (4
    intermediates and its output), and the whole d(x)."""
    h = m.hidden
    stream = 2 * e * h * tokens
    if mlp_tiled:
        c = min(mlp_chunk, tokens)
        return stream + (4 + 3 - 1) * e * m.intermediate * c + e * h * (c + tokens)
    return stream + (3 - 1) * e * m.intermediate * tokens


def attention_backward_bytes(m, e: int, *, tokens: int) -> float:
    """The attention half of one block's backward (bytes for ``tokens`` tokens), beyond the block's
    remaining saved set and the method's working set: the stream's gradient, dout, the fp32 dq/dk/dv
    and their casts to the compute dtype."""
    h, q, kv = m.hidden, m.heads * m.head_dim, m.kv_heads * m.head_dim
    qv = m.heads * (m.v_head_dim or m.head_dim)
    return (2 * e * h + e * qv + 4 * (q + 2 * kv) + e * (q + 2 * kv)) * tokens


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
                offload: Offload = "none", precision: Precision | None = None, fsdp: bool = True,
                reshard: Reshard = "after_forward", fsdp_offload: FSDPOffload = "none",
                param_dtype: ParamDtype = "fp32", device: Literal["cuda", "cpu"] = "cuda",
                free: float = 80e9) -> MemoryPlan:
    """Per-rank bytes of one training step (forward, backward, AdamW step) of ``model`` on a sequence of
    ``seq_len`` tokens sharded over ``cp`` ranks, FSDP2 over ``dp`` x ``cp``. Options as in
    ``seqpar.parallelize`` (module Note for what each item counts): ``precision``, ``reshard`` and
    ``fsdp_offload`` are its FSDP2 options (:class:`seqpar.fsdp_options.FSDPOptions`: ``precision="bf16"``
    computes in bf16 on an fp32 model whose sharded parameters, gradients and AdamW state stay fp32).
    ``param_dtype``: the dtype the model itself is in (``"bf16"``: a model cast with
    ``model.to(torch.bfloat16)``, whose parameters, gradients and AdamW state are bf16; it needs
    ``precision="fp32"``, nothing to cast, as ``parallelize`` refuses mixed precision on it). Default
    ``precision``: "bf16" under FSDP on an fp32 model, else "fp32".
    ``device``: where the step runs and ``free``: its memory (the chunked loss's default chunk depends
    on them)."""
    from seqpar.plan import Machine, _plan  # the methods' working sets are seqpar.plan's

    check_choice("checkpoint", checkpoint, ("none", "full"))
    check_choice("loss", loss, ("auto", "chunked", "full"))
    check_choice("mlp", mlp, ("auto", "tiled", "full"))
    check_choice("offload", offload, ("none", "cpu"))
    check_choice("param_dtype", param_dtype, PARAM_DTYPES)
    if precision is None:
        precision = "bf16" if fsdp and param_dtype == "fp32" else "fp32"
    fo = FSDPOptions(precision=precision, reshard=reshard, fsdp_offload=fsdp_offload)  # validates them
    if not fsdp and fo.non_defaults():
        raise ValueError(f"{', '.join(fo.non_defaults())} need(s) fsdp=True (FSDP2 options, as in parallelize); "
                         f"a model cast to bf16 without FSDP is param_dtype='bf16', precision='fp32'")
    if fo.mixed and param_dtype != "fp32":
        raise ValueError(f"precision={precision!r} casts an fp32 model for compute (parallelize refuses it on a "
                         f"{param_dtype} model); a model already in {param_dtype} computes in it: pass "
                         f"precision='fp32', param_dtype={param_dtype!r}")
    if seq_len % cp:
        raise ValueError(f"seq_len={seq_len} must be a multiple of cp={cp}")
    if not (model.hidden and model.intermediate and model.vocab):
        raise ValueError("memory_plan needs a whole model shape (hidden, intermediate, vocab): a preset of "
                         "seqpar.plan_memory.MODELS or from_hf_config(config)")
    pe = DTYPE_BYTES[param_dtype]  # the parameters' own dtype: shards, gradients, AdamW's moments
    e = DTYPE_BYTES[precision] if fo.mixed else pe  # compute: the gathered parameters and the activations
    N = dp * cp if fsdp else 1
    s = batch * seq_len // cp  # tokens per rank
    h, L, V = model.hidden, model.layers, model.vocab
    chunked = loss != "full"
    mlp_token = (4 * model.intermediate + h) * e  # what one token's MLP saves for its backward
    tiled = mlp == "tiled" or (mlp == "auto" and s * mlp_token > MLP_AUTO_BYTES)
    lc = min(loss_chunk or default_loss_chunk(V, device, free), s)
    mc = mlp_chunk or max(1, MLP_AUTO_BYTES // mlp_token)  # parallelize's tiles: 64 MiB of intermediates

    n = int(model.param_count())
    n_block = int(model.block_param_count())
    n_root = n - L * n_block  # embeddings, final norm, untied head
    # FSDP2's state per rank (seqpar.fsdp_options, the same numbers parallelize's options hold); without
    # FSDP the same sharded items over one rank (replicated) and nothing gathered or reduce-scattered
    st = fo.state_bytes(params=n, ranks=N, largest_block=n_block, root=n_root, param_bytes=pe,
                        optimizer_bytes=2 * pe)
    if fsdp:
        # the root's compute copy stays unsharded for the step; one block's (+ the prefetched next) while
        # it runs, or every block's from its forward to its backward (reshard="keep"); under "cpu" one
        # block's shard staged on the device for its all-gather
        unsharded = float(st["gathered"] + st["staging"])
        # one block's gradient before its reduce-scatter (compute dtype + the flat copy in the reduce
        # dtype), and the head's, which waits for the root's reduce-scatter at the end of the backward
        grads_unsharded = float(st["reduce"]) + (0 if model.tied else e * V * h)
    else:
        unsharded = grads_unsharded = 0.0
    resident = {k: float(st[k]) for k in ("params", "grads", "optimizer")}
    host = {}
    if fsdp and fsdp_offload == "cpu":
        host.update(resident)
        resident = dict(params=0.0, grads=0.0, optimizer=0.0)

    parts = block_saved_parts(model, e, mlp_tiled=tiled)
    saved = block_saved_bytes(model, e, mlp_tiled=tiled) * s  # one block, everything it keeps
    saved_attn = block_attention_saved_bytes(model, e, mlp_tiled=tiled) * s  # ... at its attention backward
    io = s * (8 * 3 + 2 * e * model.head_dim)  # input_ids, labels, positions (int64), rope cos / sin
    head_in = s * (e * h + _norm_bytes(e) * h + 4)  # the last block's output and the final norm's saved set
    block_in, attn_kept = s * parts["input"], s * parts["attn_out"]
    if checkpoint == "none":
        acts = L * saved
        # the block whose backward runs holds its whole saved set (part of acts) while its MLP half runs
        recompute_mlp, recompute_attn = 0.0, saved_attn - saved
    else:
        acts = L * (block_in + attn_kept)  # the checkpoint's input and the kept attention (out, lse)
        # the recomputed block re-creates its saved set except what the checkpoint holds already: the
        # block's input and the replayed (out, lse) are the same tensors
        recompute_mlp = saved - block_in - attn_kept
        recompute_attn = saved_attn - block_in - attn_kept
        if offload == "cpu":  # the block inputs wait on the host; the kept (out, lse) stay on the device
            host["checkpointed block inputs"] = L * block_in
            acts = L * attn_kept + min(2, L) * block_in  # the block being recomputed and the one fetched
    activations = acts + io + head_in
    # by the first block's backward the final norm has run its backward: its saved set and input are gone
    layer_acts = acts + io

    # the attention method's working set of one layer (seqpar.plan's per-method bytes)
    probe = Machine(attn_flops=1e12)
    shape = dataclasses.replace(model, layers=1)
    p = _plan(shape, seq_len, cp, probe, method=method, batch=batch, dtype_bytes=e, causal=True,
              checkpoint="none", ulysses=ulysses, layout="zigzag", memory_model=False)
    method_ws = p.memory["method_working"]

    # one block's backward runs in two halves, in reverse order of its forward: the MLP (its gradients on
    # top of the block's whole saved set; no attention buffers yet), then the attention (the method's
    # working set and dq/dk/dv, once the MLP half has freed the MLP's, the second norm's and the mid-block
    # residual's saved tensors)
    mlp_bwd = mlp_backward_bytes(model, e, mlp_tiled=tiled, mlp_chunk=mc, tokens=s)
    attn_bwd = attention_backward_bytes(model, e, tokens=s)
    if chunked:  # one chunk, the fp32 dW of the head, d(hidden), the per-token lse
        loss_ws = _loss_bytes(model, e, lc, chunked=True) + 4 * V * h + e * h * s + 4 * s
    else:
        loss_ws = _loss_bytes(model, e, s, chunked=False) + e * h * s
    optim_ws = pe * n / N if not (fsdp and fsdp_offload == "cpu") else 0.0  # AdamW's foreach temporaries
    # the sharded gradients appear block by block during the backward (and the head's at its end): the
    # forward, the loss and the first blocks' backward (where the activations peak) run without them
    base = resident["params"] + resident["optimizer"] + unsharded
    phases = {
        "loss": base + activations + loss_ws,
        "MLP backward": base + layer_acts + recompute_mlp + mlp_bwd + grads_unsharded,
        "attention backward": base + layer_acts + recompute_attn + method_ws + attn_bwd + grads_unsharded,
        "optimizer step": sum(resident.values()) + optim_ws,
    }
    peak = max(phases, key=phases.get)
    items = dict(params=resident["params"], optimizer=resident["optimizer"])
    items["unsharded params (FSDP)"] = unsharded
    if peak == "loss":
        items["activations (saved)"] = activations
        items["loss / logits"] = loss_ws
    elif peak == "MLP backward":
        items["activations (saved)"] = layer_acts
        items["layer recompute" if checkpoint == "full" else "layer recompute (none)"] = recompute_mlp
        items["MLP backward"] = mlp_bwd
        items["gradients before reduce-scatter"] = grads_unsharded
    elif peak == "attention backward":
        if checkpoint == "full":
            items["activations (saved)"] = layer_acts
            items["layer recompute"] = recompute_attn
        else:  # the block's MLP half of the saved set is gone
            items["activations (saved)"] = layer_acts + recompute_attn
            items["layer recompute (none)"] = 0.0
        items[f"attention working ({method})"] = method_ws
        items["attention backward"] = attn_bwd
        items["gradients before reduce-scatter"] = grads_unsharded
    else:
        items = dict(resident, **{"optimizer step temporaries": optim_ws})
    total = phases[peak]
    assert math.isclose(sum(items.values()), total, rel_tol=1e-9), (items, total)
    opts = dict(model=dataclasses.asdict(model), seq_len=seq_len, cp=cp, dp=dp, batch=batch, method=method,
                ulysses=ulysses, checkpoint=checkpoint, loss=loss, loss_chunk=lc, mlp=mlp, mlp_chunk=mc,
                offload=offload, precision=precision, param_dtype=param_dtype, fsdp=fsdp, reshard=reshard,
                fsdp_offload=fsdp_offload, device=device)
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


def _hybrids() -> dict:
    from seqpar.plan_mixers import HYBRIDS

    return HYBRIDS


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
    ap.add_argument("--precision", default=None, choices=PRECISIONS,
                    help="parallelize's precision= (FSDP2 mixed precision: compute copies and activations in "
                         "bf16/fp16, fp32 sharded parameters, gradients and AdamW state); default bf16, or fp32 "
                         "with --param-dtype bf16/fp16")
    ap.add_argument("--param-dtype", default="fp32", choices=PARAM_DTYPES,
                    help="the model's own dtype: bf16 = a model cast to bf16 (bf16 parameters, gradients and "
                         "AdamW state; computes in bf16 with --precision fp32)")
    ap.add_argument("--reshard", default="after_forward", choices=RESHARDS)
    ap.add_argument("--fsdp-offload", default="none", choices=FSDP_OFFLOADS)
    ap.add_argument("--gpu-mem", type=float, default=80.0, help="GB (1e9 bytes) per GPU")
    ap.add_argument("--hybrid", default=None, choices=sorted(_hybrids()),
                    help="a hybrid model's sequence-mixer layers instead (seqpar.plan_mixers): every method's time, "
                         "bytes and memory per layer type on --cp (or --gpus) ranks at --seq, H100, and auto's choice")
    a = ap.parse_args(argv)
    if a.hybrid:
        from seqpar.plan_mixers import hybrid_table

        print(hybrid_table(a.hybrid, a.seq, a.cp or a.gpus, layout="zigzag"))
        return
    if a.precision is None:
        a.precision = "bf16" if a.param_dtype == "fp32" else "fp32"
    cp = a.cp or (a.gpus // a.dp if a.dp else a.gpus)
    dp = a.dp or max(1, a.gpus // cp)
    if cp * dp != a.gpus:
        ap.error(f"cp={cp} x dp={dp} must equal --gpus={a.gpus}")
    m = model_shape(a.model)
    kw = dict(cp=cp, dp=dp, method=a.method, ulysses=a.ulysses, checkpoint=a.checkpoint, loss=a.loss,
              loss_chunk=a.loss_chunk, mlp=a.mlp, mlp_chunk=a.mlp_chunk, offload=a.offload, precision=a.precision,
              param_dtype=a.param_dtype, reshard=a.reshard, fsdp_offload=a.fsdp_offload, free=a.gpu_mem * 1e9)
    try:
        p = memory_plan(m, a.seq, **kw)
    except ValueError as err:
        ap.error(str(err))
    limit = a.gpu_mem * 1e9
    print(f"{a.model}: {a.seq} tokens on {a.gpus} GPUs (cp={cp}, dp={dp}), {a.method}, checkpoint={a.checkpoint}, "
          f"loss={a.loss}, mlp={a.mlp}, offload={a.offload}, precision={a.precision}, param_dtype={a.param_dtype}, "
          f"reshard={a.reshard}, fsdp_offload={a.fsdp_offload}; {p.tokens} tokens per GPU")
    print(p.table())
    print(f"total: {p.total / 1e9:.2f} GB per GPU ({'fits' if p.total <= limit else 'does not fit'} "
          f"{a.gpu_mem:g} GB)")
    best = max_seq_len(m, limit, **kw)
    print(f"longest sequence that fits {a.gpu_mem:g} GB per GPU: {best} tokens")
