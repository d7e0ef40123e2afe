"""Cases for tests/test_chunked_loss.py: tiny causal LMs, and what runs on the spawned gloo ranks.

References are the unmodified models on the full sequence (their own LM head and loss); each case
returns plain numbers, the pytest side asserts.
"""

from __future__ import annotations

import copy

import torch

import seqpar
from seqpar.testing.memory import reset_peak, status

# name -> (config class, model class, config overrides): one model per feature of the chunked loss
MODELS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama_tied": ("LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": True}),
    "qwen2_tied": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": True}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 8, "query_pre_attn_scalar": 8,
                                                     "final_logit_softcapping": 3.0}),  # soft-cap
    "cohere": ("CohereConfig", "CohereForCausalLM", {"logit_scale": 0.25}),  # logits * logit_scale
    "granite": ("GraniteConfig", "GraniteForCausalLM", {"logits_scaling": 4.0}),  # logits / logits_scaling
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2,
                                                        "output_router_logits": True,
                                                        "router_aux_loss_coef": 0.5}),  # + coef * aux_loss
}


def make_model(name: str, *, vocab: int = 96, hidden: int = 32, layers: int = 2, seed: int = 0):
    import transformers

    cfg_cls, model_cls, extra = MODELS[name]
    torch.manual_seed(seed)
    cfg = getattr(transformers, cfg_cls)(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
        attn_implementation="eager" if name.startswith("gemma") else "sdpa", **extra)
    return getattr(transformers, model_cls)(cfg).float()


def make_batch(B: int, S: int, vocab: int = 96, seed: int = 0, packed: bool = False) -> dict:
    """Unshifted labels with ignored tokens (a prefix and holes); ``packed``: B=1 with documents
    (position_ids restarting at 0)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, S), generator=g)
    labels = ids.clone()
    labels[:, : S // 5] = -100
    labels[torch.rand(B, S, generator=g) < 0.2] = -100
    batch = {"input_ids": ids, "labels": labels}
    if packed:
        cut = [0, S // 3, S // 3 + S // 4, S]
        batch["position_ids"] = torch.cat([torch.arange(b - a) for a, b in zip(cut, cut[1:])])[None]
        labels[:, cut[:-1]] = -100  # no target across a document start (as DataCollatorWithFlattening)
    return batch


def reference(model, batch: dict) -> torch.Tensor:
    """The model's own loss on the full sequence (documents kept apart with a block mask when packed)."""
    pos = batch.get("position_ids")
    if pos is None:
        return model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    # packed: run each document on its own (what seqpar's document masks compute), loss over all
    starts = [0] + [i for i in range(1, pos.shape[1]) if pos[0, i] == 0] + [pos.shape[1]]
    total, count = 0.0, 0
    for a, b in zip(starts, starts[1:]):
        ids, lab = batch["input_ids"][:, a:b], batch["labels"][:, a:b].clone()
        n = int((lab[:, 1:] != -100).sum())
        if n:
            total = total + model(input_ids=ids, labels=lab).loss * n
            count += n
    return total / count


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


_MESHES: dict = {}


def _mesh(cp: int):
    if cp not in _MESHES:
        _MESHES[cp] = seqpar.init_mesh(cp=cp)
    return _MESHES[cp]


def equivalence(rank, size, *, name, layout="zigzag", S=48, B=1, packed=False, loss="chunked", loss_chunk=7,
                fsdp=False, checkpoint=False):
    """Loss and every gradient of ``parallelize(model, loss=...)`` on ``size`` ranks vs the unmodified model
    on the full batch; ``logits``: whether the output still carries logits."""
    vocab = 96
    ref = make_model(name, vocab=vocab)
    model = seqpar.parallelize(copy.deepcopy(ref), _mesh(size), layout=layout, fsdp=fsdp, checkpoint=checkpoint,
                               loss=loss, loss_chunk=loss_chunk)
    batch = make_batch(B, S, vocab, seed=1, packed=packed)
    want = reference(ref, batch)
    want.backward()
    out = model(**seqpar.shard_batch(batch, _mesh(size), layout=layout))
    out.loss.backward()
    got = dict(model.named_parameters())
    grad = max(_rel(_full(got[n].grad), p.grad) for n, p in ref.named_parameters())
    return dict(loss=_rel(out.loss.detach(), want.detach()), grad=grad, logits=out.logits is not None)


def plain_equivalence(rank, size, *, layout="zigzag", S=48, loss_chunk=5):
    """The seqpar GPT (tied head, plain PyTorch) with loss="chunked" vs itself unparallelized."""
    from seqpar.models import GPT, GPTConfig

    torch.manual_seed(0)
    ref = GPT(GPTConfig(vocab_size=96, block_size=256, n_layer=2, n_head=4, n_kv_head=2, n_embd=32))
    model = seqpar.parallelize(copy.deepcopy(ref), _mesh(size), layout=layout, fsdp=False, loss="chunked",
                               loss_chunk=loss_chunk)
    batch = make_batch(1, S, 96, seed=2)
    logits = ref(batch["input_ids"]).logits
    want = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten())
    want.backward()
    sharded = seqpar.shard_batch(batch, _mesh(size), layout=layout)
    out = model(input_ids=sharded["input_ids"], labels=sharded["labels"], position_ids=sharded["position_ids"])
    out.loss.backward()
    got = dict(model.named_parameters())
    grad = max(_rel(got[n].grad, p.grad) for n, p in ref.named_parameters())
    return dict(loss=_rel(out.loss.detach(), want.detach()), grad=grad, logits_numel=out.logits.numel())


def memory(rank, size, *, loss, S=4096, vocab=128000):
    """Peak resident memory added by one training step (forward + backward) of a large-vocabulary model
    (its full local fp32 logits: S/size x vocab x 4 bytes), measured with VmHWM after a reset."""
    torch.manual_seed(0)
    model = make_model("llama", vocab=vocab, hidden=16, layers=1)
    model = seqpar.parallelize(model, _mesh(size), fsdp=False, loss=loss)
    batch = seqpar.shard_batch(make_batch(1, S, vocab, seed=3), _mesh(size))
    model(**batch).loss.backward()  # warm-up: gradients allocated, allocator caches filled
    model.zero_grad(set_to_none=False)
    base = reset_peak()
    loss_value = model(**batch).loss
    loss_value.backward()
    rise = status("VmHWM") - base
    return dict(rise=rise, logits_bytes=(S // size) * vocab * 4, loss=loss_value.item())
