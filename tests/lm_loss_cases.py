"""Cases for tests/test_chunked_loss.py: tiny causal LMs, and what runs on the spawned gloo ranks.

References are the unmodified models on the full sequence (their own LM head and loss); each case
returns plain numbers, the pytest side asserts.
"""

from __future__ import annotations

import copy
import logging

import torch
import torch.nn.functional as F

import seqpar
from seqpar.models import GPT, GPTConfig
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


# ----------------------------------------------------------------------------- plain models: lazy logits

PLAIN_VOCAB = 96


def _plain_config(vocab: int = PLAIN_VOCAB, n_embd: int = 32, block_size: int = 256):
    return GPTConfig(vocab_size=vocab, block_size=block_size, n_layer=2, n_head=4, n_kv_head=2, n_embd=n_embd)


class PlainLM(GPT):
    """The seqpar GPT (tied head) whose forward does with its logits ``use``: "loss"
    ``F.cross_entropy(logits.view(-1, V).float(), ...)`` with ``ignore_index`` / ``label_smoothing``; "softcap" a
    soft-cap (30 tanh(z / 30)) before that loss; "accuracy" that loss plus the count of correct argmax predictions.
    Returns (logits, loss, correct)."""

    def __init__(self, cfg, use: str, ignore_index: int, label_smoothing: float):
        super().__init__(cfg)
        self.use, self.ignore_index, self.label_smoothing = use, ignore_index, label_smoothing

    def forward(self, input_ids, labels=None, position_ids=None):
        B, S = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(S)
        x = self.wte(input_ids) + self.wpe(position_ids)
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))  # (B, S, V)
        if self.use == "softcap":
            logits = 30.0 * torch.tanh(logits / 30.0)
        if labels is None:
            return logits, None, None
        V = logits.shape[-1]
        loss = F.cross_entropy(logits.view(-1, V).float(), labels.flatten(), ignore_index=self.ignore_index,
                               label_smoothing=self.label_smoothing)
        correct = None
        if self.use == "accuracy":
            correct = ((logits.argmax(-1) == labels) & (labels != self.ignore_index)).sum()
        return logits, loss, correct


def plain_model(use: str = "gpt", *, ignore_index: int = -100, label_smoothing: float = 0.0, seed: int = 0,
                **cfg):
    """A plain PyTorch causal LM: ``use`` "gpt" the seqpar GPT itself, else a :class:`PlainLM`."""
    torch.manual_seed(seed)
    if use == "gpt":
        return GPT(_plain_config(**cfg))
    return PlainLM(_plain_config(**cfg), use, ignore_index, label_smoothing)


def _plain_batch(S: int, vocab: int, seed: int, ignore_index: int) -> dict:
    batch = make_batch(1, S, vocab, seed=seed)
    batch["labels"][batch["labels"] == -100] = ignore_index
    return batch


def _loss_of(out):
    return out.loss if hasattr(out, "loss") else out[1]


def _logits_of(out):
    return out.logits if hasattr(out, "logits") else out[0]


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def plain_lazy(rank, size, *, use="gpt", layout="zigzag", S=48, loss=None, fsdp=False, checkpoint=False,
               compile=False, ignore_index=-100, label_smoothing=0.0, loss_chunk=5):
    """A plain model under ``parallelize(loss=...)`` (None: the default) vs itself unparallelized on the whole
    sequence: relative loss and gradient errors, whether the head's logits were computed (``computed``), the
    warnings logged, and what using the returned logits after the forward raises. ``error``: what the forward
    raised (then nothing else)."""
    from seqpar.batch import shift_labels
    from seqpar.passes.lazy_logits import LazyLogits

    kw = dict(ignore_index=ignore_index, label_smoothing=label_smoothing)
    ref = plain_model(use, **kw)
    opts = {} if loss is None else {"loss": loss}
    rec = _Records()
    log = logging.getLogger("seqpar.passes.lm_loss")
    log.addHandler(rec)
    try:
        model = seqpar.parallelize(plain_model(use, **kw), _mesh(size), layout=layout, fsdp=fsdp,
                                   checkpoint=checkpoint, compile=compile, loss_chunk=loss_chunk, **opts)
        batch = _plain_batch(S, PLAIN_VOCAB, 2, ignore_index)
        sharded = seqpar.shard_batch(batch, _mesh(size), layout=layout, ignore_index=ignore_index)
        try:
            out = model(input_ids=sharded["input_ids"], labels=sharded["labels"],
                        position_ids=sharded["position_ids"])
        except ValueError as e:
            return dict(error=str(e))
    finally:
        log.removeHandler(rec)
    want_out = ref(batch["input_ids"], labels=shift_labels(batch["labels"], ignore_index))
    _loss_of(want_out).backward()
    _loss_of(out).backward()
    got = dict(model.named_parameters())
    grad = max(_rel(_full(got[n].grad), p.grad) for n, p in ref.named_parameters())
    logits = _logits_of(out)
    res = dict(loss=_rel(_loss_of(out).detach(), _loss_of(want_out).detach()), grad=grad, logs=rec.messages,
               lazy=isinstance(logits, LazyLogits), computed=getattr(logits, "logits_computed", None),
               shape=tuple(logits.shape), dtype=str(logits.dtype), error=None)
    if use == "accuracy":
        correct = out[2].clone()
        torch.distributed.all_reduce(correct, group=_mesh(size)["cp"].get_group())
        res["correct"] = (int(correct), int(want_out[2]))
    after = {}  # lazy logits used after the forward: what each use raised (None: nothing)
    for what, fn in (("argmax", lambda t: t.argmax(-1)), ("repr", repr), ("sum", torch.sum),
                     ("backward", lambda t: t.backward(torch.ones(t.shape))), ("float", lambda t: t.float())):
        if res["lazy"]:
            try:
                fn(logits)
                after[what] = None
            except ValueError as e:
                after[what] = str(e)
    res["after"] = after
    return res


def plain_memory(rank, size, *, S=4096, vocab=128000, loss=None):
    """``memory`` for a plain model (the seqpar GPT, vocab 128000) under ``loss`` (None: the default): the peak
    resident memory one training step adds, and its full local fp32 logits' bytes."""
    model = plain_model("gpt", vocab=vocab, n_embd=16, block_size=S)
    model = seqpar.parallelize(model, _mesh(size), fsdp=False, **({} if loss is None else {"loss": loss}))
    batch = seqpar.shard_batch(make_batch(1, S, vocab, seed=3), _mesh(size))
    kw = dict(input_ids=batch["input_ids"], labels=batch["labels"], position_ids=batch["position_ids"])
    model(**kw).loss.backward()  # warm-up: gradients allocated, allocator caches filled
    model.zero_grad(set_to_none=False)
    base = reset_peak()
    out = model(**kw)
    out.loss.backward()
    rise = status("VmHWM") - base
    return dict(rise=rise, logits_bytes=(S // size) * vocab * 4, computed=getattr(out.logits, "logits_computed", None))
