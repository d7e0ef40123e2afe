"""Cases for tests/test_router.py, run on every rank of a spawned gloo world (seqpar.testing.worlds).

The MoE causal LMs of the installed transformers whose loss adds a router load-balancing loss
(``output_router_logits=True``), built tiny (2 layers, hidden 32, 4 experts top-2, vocab 64, fp32,
weights at init). References are the unmodified single-process models on the full sequence; each
case returns plain numbers, the pytest side asserts.
"""

from __future__ import annotations

import copy

import torch

import seqpar
from parallel_cases import _full, _rel, make_batch, mesh_for

VOCAB = 64
COEF = 0.5  # not any model's default, so the coefficient the model reads is exercised
_SIZES = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
              shared_expert_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              head_dim=8, kv_channels=8, num_local_experts=4, num_experts=4, num_experts_per_tok=2,
              max_position_embeddings=256, attention_dropout=0.0, output_router_logits=True,
              router_aux_loss_coef=COEF, aux_loss_coef=COEF)
# per model type: what else its tiny config needs (attention-only layers for the hybrids: their router
# loss is the same function; their linear mixers are another part of the issue)
_EXTRA: dict[str, dict] = {
    "flex_olmo": dict(pad_token_id=1),
    "jamba": dict(attn_layer_period=1, attn_layer_offset=0, expert_layer_period=1, expert_layer_offset=0,
                  pad_token_id=0),
    "jetmoe": dict(num_key_value_heads=2, kv_channels=8),
}

# training-mode routing draws random numbers (PhiMoE's sparsemixer samples its experts): compared in eval mode
_SAMPLED = {"phimoe"}

# the causal LMs whose module defines transformers' load_balancing_loss_func (the Switch-Transformer form)
SUPPORTED = ["ernie4_5_moe", "flex_olmo", "flint", "gpt_oss", "granitemoe", "granitemoe_swa", "granitemoehybrid",
             "granitemoeshared", "jamba", "jetmoe", "laguna", "lara_mini", "mellum", "minimax", "minimax_m2", "mixtral",
             "olmoe", "phimoe", "qwen2_moe", "qwen3_5_moe", "qwen3_moe", "qwen3_next"]
REFUSED = ["doge"]  # its own load_balancing_loss_func (product-key routing): the probe fails


def make_moe(model_type: str, seed: int = 0, **overrides):
    """The tiny fp32 model of ``model_type`` (weights at init, seed ``seed``), eager-free SDPA attention."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    cls = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])
    cfg = cls.config_class()  # the text config of a multimodal family (qwen3_5_moe)
    for k, v in {**_SIZES, **_EXTRA.get(model_type, {}), **overrides}.items():
        if hasattr(cfg, k):
            setattr(cfg, k, v)
    if isinstance(getattr(cfg, "layer_types", None), list) and model_type != "jamba":  # jamba: from the periods
        cfg.layer_types = ["full_attention"] * cfg.num_hidden_layers
    if isinstance(getattr(cfg, "mlp_layer_types", None), list):
        cfg.mlp_layer_types = ["sparse"] * cfg.num_hidden_layers
    if hasattr(cfg, "mlp_only_layers"):
        cfg.mlp_only_layers = []
    if hasattr(cfg, "first_k_dense_replace"):
        cfg.first_k_dense_replace = 0
    torch.manual_seed(seed)
    try:
        cfg._attn_implementation = "sdpa"
        model = cls(cfg).float()
    except ValueError:  # no SDPA path (gpt-oss: sinks; ...): transformers' eager attention is the reference
        torch.manual_seed(seed)
        cfg._attn_implementation = "eager"
        model = cls(cfg).float()
    if model_type in _SAMPLED:
        model.eval()  # gradients still flow; only the random draws of training-mode routing are off
    return model


def _grads(model) -> dict:
    return {n: _full(p.grad).clone() for n, p in model.named_parameters() if p.grad is not None}


def _worst(got: dict, want: dict) -> tuple[float, int]:
    worst = 0.0
    for name, g in want.items():
        worst = max(worst, _rel(got[name], g))
    return worst, len(want)


def router_equivalence(rank, size, *, model_type, dp, cp, layout="zigzag", B=2, S=32):
    """loss, aux_loss, the gradient of the loss and the gradient of aux_loss alone: seqpar vs single process.
    The reference always runs on the unpadded (B, S) batch: with an S that is not a multiple of the layout's
    unit, shard_batch's end padding must not count in the router statistics (``pad``: this rank's padded
    tokens, from ``seqpar_tokens``)."""
    mesh = mesh_for(dp, cp)
    replica = mesh.get_local_rank("dp")
    ref = make_moe(model_type)
    model = seqpar.parallelize(copy.deepcopy(ref), mesh, layout=layout, fsdp=False)
    batches = [make_batch(d, B, S, vocab=VOCAB) for d in range(dp)]
    outs = [ref(input_ids=b["input_ids"], labels=b["labels"]) for b in batches]
    sharded = seqpar.shard_batch(batches[replica], mesh, layout=layout)
    tokens = sharded.get("seqpar_tokens")  # only when S is padded to the layout's unit: False = padding
    out = model(**sharded)
    res = dict(loss=_rel(out.loss.detach(), outs[replica].loss.detach()),
               aux=_rel(out.aux_loss.detach(), outs[replica].aux_loss.detach()),
               aux_value=float(out.aux_loss), pad=0 if tokens is None else int((~tokens).sum()))
    # gradients: the mean over dp replicas (the data-parallel pass averages over dp, sums over cp)
    (sum(o.loss for o in outs) / dp).backward(retain_graph=True)
    out.loss.backward(retain_graph=True)
    res["grad"], res["ngrads"] = _worst(_grads(model), _grads(ref))
    ref.zero_grad()
    model.zero_grad()
    (sum(o.aux_loss for o in outs) / dp).backward()
    out.aux_loss.backward()
    res["aux_grad"], res["naux_grads"] = _worst(_grads(model), _grads(ref))
    return res


def no_router_loss(rank, size, *, model_type, cp=4, S=32):
    """A model that returns router logits without a loss (``output_router_logits`` is only a flag on its way to
    attention): the loss equals the single process'."""
    mesh = mesh_for(1, cp)
    ref = make_moe(model_type)
    model = seqpar.parallelize(copy.deepcopy(ref), mesh, fsdp=False)
    batch = make_batch(0, 2, S, vocab=VOCAB)
    want = ref(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    got = model(**seqpar.shard_batch(batch, mesh), output_router_logits=True).loss
    return _rel(got.detach(), want.detach())


def refused(rank, size, *, model_type, cp=4, S=32) -> dict:
    """The errors of a model whose router loss seqpar cannot reproduce: at parallelize when its config turns it
    on; at forward when output_router_logits=True is passed; no error when it is off or its coefficient is 0."""
    mesh = mesh_for(1, cp)
    res = {}
    try:
        seqpar.parallelize(make_moe(model_type), mesh, fsdp=False)
        res["parallelize"] = None
    except ValueError as e:
        res["parallelize"] = str(e)
    model = seqpar.parallelize(make_moe(model_type, output_router_logits=False), mesh, fsdp=False)
    batch = seqpar.shard_batch(make_batch(0, 2, S, vocab=VOCAB), mesh)
    try:
        model(**batch, output_router_logits=True)
        res["forward"] = None
    except ValueError as e:
        res["forward"] = str(e)
    seqpar.parallelize(make_moe(model_type, router_aux_loss_coef=0.0), mesh, fsdp=False)  # coefficient 0: accepted
    return res


def runtime_mismatch(rank, size, *, cp=4, S=32) -> str | None:
    """The forward-time verification: a model whose forward uses another top-k than the one read at parallelize
    (its aux_loss differs from the form seqpar reproduces) raises on every rank instead of training on a
    wrong loss."""
    mesh = mesh_for(1, cp)
    model = seqpar.parallelize(make_moe("mixtral"), mesh, fsdp=False)
    model.num_experts_per_tok = 1  # what MixtralForCausalLM passes to its load_balancing_loss_func
    try:
        model(**seqpar.shard_batch(make_batch(0, 2, S, vocab=VOCAB), mesh))
    except ValueError as e:
        return str(e)
    return None
