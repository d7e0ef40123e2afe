"""Cases for tests/test_tiled_mlp.py, run on every rank of a spawned gloo world (seqpar.testing.worlds).

Tiled MLP (``mlp="tiled"``) and checkpoint offload (``offload="cpu"``) under ``seqpar.parallelize``
against the unmodified single-process model on the full sequence. Each case returns plain numbers; the
pytest side asserts.
"""

from __future__ import annotations

import copy

import torch

import seqpar
from seqpar.testing.memory import reset_peak, status
from parallel_cases import _full, _rel, make_batch, make_model, mesh_for
from router_cases import make_moe

B, S = 2, 64  # cp=4: 16 local tokens per row; mlp_chunk=6 -> 3 tokens per row per chunk (does not divide 16)


def build(kind: str):
    """The tiny fp32 single-process model of ``kind`` (the same on every rank)."""
    if kind == "gemma2":
        import transformers

        torch.manual_seed(0)
        cfg = transformers.Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                        max_position_embeddings=256, sliding_window=4096,
                                        attn_implementation="eager")  # the reference: eager (sdpa: no soft-cap)
        return transformers.Gemma2ForCausalLM(cfg).float()
    if kind in ("mixtral", "qwen2_moe"):
        return make_moe(kind)  # router load-balancing loss on: the router stays whole, its experts are tiled
    return make_model(kind)


def _loss(kind: str, model, batch: dict, sharded: bool) -> torch.Tensor:
    if kind == "gpt":
        if sharded:
            return model(**batch).loss
        logits = model(batch["input_ids"]).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                                                 ignore_index=-100)
    if sharded:
        return model(**batch).loss
    return model(input_ids=batch["input_ids"], labels=batch["labels"]).loss


def _tilers(model) -> int:
    """Calls that ran tiled so far on this rank."""
    from seqpar.passes.tiled_mlp import tiled_modules

    return sum(t.calls for t in tiled_modules(model))


def equivalence(rank, size, *, kind, dp, cp, fsdp, checkpoint, mlp="tiled", mlp_chunk=6, offload="none", steps=2):
    """Loss (every step) and every gradient (every step) of seqpar with the tiled MLP vs the single process;
    ``tiled``: calls that ran tiled on this rank; ``offload``: the offload counters."""
    from seqpar.passes.offload import offload_stats

    mesh = mesh_for(dp, cp)
    replica = mesh.get_local_rank("dp")
    ref = build(kind)
    model = seqpar.parallelize(copy.deepcopy(ref), mesh, fsdp=fsdp, checkpoint=checkpoint, mlp=mlp,
                               mlp_chunk=mlp_chunk, offload=offload)
    res = dict(loss=0.0, grad=0.0, ngrads=0)
    for step in range(steps):
        batches = [make_batch(d, B, S, step) for d in range(dp)]
        ref.zero_grad()
        model.zero_grad()
        ref_losses = [_loss(kind, ref, b, False) for b in batches]
        (sum(ref_losses) / dp).backward()
        loss = _loss(kind, model, seqpar.shard_batch(batches[replica], mesh), True)
        loss.backward()
        res["loss"] = max(res["loss"], _rel(loss.detach(), ref_losses[replica].detach()))
        got = dict(model.named_parameters())
        for name, p in ref.named_parameters():
            if p.grad is not None:
                res["grad"] = max(res["grad"], _rel(_full(got[name].grad), p.grad))
                res["ngrads"] += 1
    res["tiled"] = _tilers(model)
    stats = offload_stats(model)
    if stats is not None:
        res.update(packs=stats.packs, unpacks=stats.unpacks, bytes=stats.bytes, host_bytes=stats.host_bytes,
                   peak_host_bytes=stats.peak_host_bytes)
    return res


def offload_vs_plain(rank, size, *, kind, cp=4):
    """checkpoint=True with offload="cpu" against checkpoint=True without: loss and every gradient bitwise
    equal on this rank (a host copy is exact)."""
    mesh = mesh_for(1, cp)
    ref = build(kind)
    a = seqpar.parallelize(copy.deepcopy(ref), mesh, fsdp=False, checkpoint=True, mlp="full")
    b = seqpar.parallelize(copy.deepcopy(ref), mesh, fsdp=False, checkpoint=True, mlp="full", offload="cpu")
    batch = seqpar.shard_batch(make_batch(0, B, S), mesh)
    la, lb = _loss(kind, a, batch, True), _loss(kind, b, batch, True)
    la.backward()
    lb.backward()
    gb = dict(b.named_parameters())
    diff = max(float((p.grad - gb[n].grad).abs().max()) for n, p in a.named_parameters() if p.grad is not None)
    return dict(loss=float((la - lb).detach().abs()), grad=diff)


def refused(rank, size, *, cp=4):
    """A model whose block MLP mixes tokens: mlp="tiled"'s ValueError message, and how many modules mlp="auto"
    tiled (none)."""
    from seqpar.models import GPT, GPTConfig

    class Mixing(torch.nn.Module):  # a cumulative mean over tokens after a projection: not per-token
        def __init__(self, n):
            super().__init__()
            self.proj = torch.nn.Linear(n, n)

        def forward(self, x):
            y = self.proj(x)
            return y.cumsum(-2) / torch.arange(1, y.shape[-2] + 1, dtype=y.dtype, device=y.device)[:, None]

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=256, n_layer=2, n_head=4, n_kv_head=2, n_embd=32))
    for block in model.h:
        block.mlp = Mixing(32)
    from seqpar.passes.tiled_mlp import tiled_modules

    auto = seqpar.parallelize(copy.deepcopy(model), mesh_for(1, cp), fsdp=False, mlp="auto")
    msg = None
    try:
        seqpar.parallelize(model, mesh_for(1, cp), fsdp=False, mlp="tiled")
    except ValueError as e:
        msg = str(e)
    return dict(msg=msg, auto_tiled=len(tiled_modules(auto)))


# ----------------------------------------------------------------------------- memory (one process, no world)


def _peak_rise_mib(fn) -> float:
    """The rise of this process's peak resident memory (VmHWM, reset through /proc/self/clear_refs) over its RSS
    at the reset, while ``fn`` runs."""
    import gc

    gc.collect()
    start = reset_peak()
    fn()
    return (status("VmHWM") - start) / 2**20


def mlp_memory(S: int = 8192, intermediate: int = 4096) -> dict:
    """One Llama MLP forward + backward on (1, S, 32) fp32, whole and with mlp="auto"'s tiling: the peak rises
    (MiB), the chunks, and the gradients' agreement. Run it in a process of its own whose glibc returns every
    freed tensor at once (MALLOC_MMAP_THRESHOLD_ fixed), so RSS follows the live tensors."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    from seqpar.passes.tiled_mlp import TiledMLP, probe, tile

    torch.manual_seed(0)
    whole = LlamaMLP(LlamaConfig(hidden_size=32, intermediate_size=intermediate))
    tiled = copy.deepcopy(whole)
    tiler = TiledMLP("mlp", tiled, "auto", None, probe(tiled, (torch.randn(1, 9, 32),), {}), 4)
    tile(tiled, tiler)
    x, dy = torch.randn(1, S, 32), torch.randn(1, S, 32)
    grads = {}

    def step(m, key):
        xi = x.clone().requires_grad_()
        m(xi).backward(dy)
        grads[key] = [xi.grad] + [p.grad.clone() for p in m.parameters()]

    tiled_mib = _peak_rise_mib(lambda: step(tiled, "tiled"))
    whole_mib = _peak_rise_mib(lambda: step(whole, "whole"))
    return dict(whole_mib=whole_mib, tiled_mib=tiled_mib, chunks=len(tiler.plan(x)), calls=tiler.calls,
                per_projection_mib=S * intermediate * 4 / 2**20,
                grad=max(_rel(a, b) for a, b in zip(grads["tiled"], grads["whole"])))
