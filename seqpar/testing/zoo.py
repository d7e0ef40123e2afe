"""The model zoo of the installed transformers, built tiny, and a numerical oracle for sequence mixing.

Testing support (like :mod:`seqpar.testing.numerics`) for ``tests/test_mixers.py`` and
``benchmarks/zoo_table.py``:

- :func:`causal_lm_types` lists every ``model_type`` of ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``;
- :func:`tiny_config` shrinks a config class's defaults (sizes, experts, layer patterns) so the model
  has a couple of layers, hidden ~32, and still at least one layer of each kind its pattern names;
- :func:`build` constructs the model (fixed seed, eval mode) or says why it cannot;
- :func:`mixes_outside_attention` is the oracle: with attention made token-local (every attention
  call returns its values, each token its own), does a change of one token change the model's output
  at any *other* position? If yes, something besides attention mixes the sequence.

The oracle does not look at module classes, parameter names or the config: it runs the model.
"""

from __future__ import annotations

import copy
import os
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["causal_lm_types", "tiny_config", "build", "Built", "mixes_outside_attention", "NotBuildable", "Row",
           "survey", "mixer_types", "mixer_types_share", "exact_or_refused", "split_noise", "GRAD_NOISE", "EQ_SEQ", "EQ_DOCS"]

VOCAB = 96
SIZES: dict[str, int] = {
    # widths
    "hidden_size": 32, "d_model": 32, "n_embd": 32, "embed_dim": 32, "dim": 32, "embedding_size": 32, "embedding_dim": 32,
    "word_embed_proj_dim": 32, "input_embedding_size": 32, "output_embedding_size": 32, "emb_dim": 32,
    "attention_hidden_size": 32, "lru_width": 32, "backbone_hidden_size": 32, "ple_embed_dim": 8,
    "hidden_size_per_layer_input": 8, "intermediate_size": 64, "ffn_dim": 64, "decoder_ffn_dim": 64,
    "encoder_ffn_dim": 64, "ffn_hidden_size": 64, "dim_ff": 64, "dff": 64, "d_inner": 64, "n_inner": 64,
    "feed_forward_size": 64, "intermediate_size_mlp": 64, "dense_intermediate_size": 64,
    "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32, "shared_intermediate_size": 32,
    "shared_experts_intermediate_size": 32, "moe_shared_expert_intermediate_size": 32,
    "expert_ffn_hidden_size": 32,
    # heads
    "num_attention_heads": 4, "n_head": 4, "n_heads": 4, "num_heads": 4, "decoder_attention_heads": 4,
    "encoder_attention_heads": 4, "attention_heads": 4, "num_key_value_heads": 2, "num_kv_heads": 2,
    "head_dim": 8, "d_head": 8, "dim_head": 8, "attention_head_dim": 8, "attention_head_size": 8, "kv_channels": 8,
    "swa_num_attention_heads": 4, "swa_num_key_value_heads": 2, "swa_head_dim": 8, "num_query_groups": 2,
    # MLA / sparse attention indexers
    "q_lora_rank": 16, "kv_lora_rank": 16, "o_lora_rank": 16, "qk_rope_head_dim": 4, "qk_nope_head_dim": 4,
    "qk_head_dim": 8, "v_head_dim": 8, "index_head_dim": 8, "index_n_heads": 2, "rotary_dim": 4,
    # experts
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "moe_topk": 2, "n_group": 1, "topk_group": 1,
    # state-space / linear attention
    "state_size": 4, "mamba_d_state": 4, "ssm_state_size": 4, "mamba_n_heads": 8, "mamba_num_heads": 8,
    "mamba_d_head": 8, "mamba_head_dim": 8, "mamba_headdim": 8, "mamba_d_ssm": 64, "time_step_rank": 4,
    "mamba_dt_rank": 4, "linear_key_head_dim": 8, "linear_value_head_dim": 8, "linear_num_value_heads": 4,
    "linear_num_key_heads": 2, "linear_head_dim": 8, "linear_num_heads": 4, "n_groups": 1, "mamba_n_groups": 1,
    # lengths (a probe is a few tokens)
    "max_position_embeddings": 64, "n_positions": 64, "n_ctx": 64, "max_target_positions": 64,
    "max_source_positions": 64, "context_length": 64, "max_seq_len": 64,
    # vocabularies
    "vocab_size": VOCAB, "decoder_vocab_size": VOCAB, "vocab_size_per_layer_input": VOCAB,
    "unpadded_vocab_size": VOCAB,
}
LAYER_COUNTS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers", "num_decoder_layers",
                "num_blocks")
TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "cls_token_id", "decoder_start_token_id")
# Per-layer pattern attributes whose entries name the kind of each layer.
PATTERNS = ("layer_types", "layers_block_type", "block_types", "hybrid_override_pattern", "attention_layers",
            "attn_layers")


class NotBuildable(Exception):
    """This class cannot be built tiny here (reason in the message)."""


def causal_lm_types() -> list[tuple[str, str]]:
    """``[(model_type, class name), ...]`` of every causal LM the installed transformers maps."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items())


def _keep(pattern) -> list[int]:
    """Indices of the first layer of each kind in ``pattern``, at least two (a reduced layer pattern)."""
    first: dict = {}
    for i, p in enumerate(pattern):
        first.setdefault(p if not isinstance(p, list) else str(p), i)
    keep = sorted(first.values())
    return keep if len(keep) >= 2 else [0, 1][:len(pattern)]


def _select(v, keep: list[int], n: int):
    """``v`` restricted to the layers ``keep`` if it is per layer (a list/string of length n, or a dict
    keyed by layer index), else ``v``."""
    if isinstance(v, list) and len(v) == n:
        return [v[i] for i in keep]
    if isinstance(v, dict) and v and all(isinstance(k, str) and k.isdigit() or isinstance(k, int) for k in v):
        width = max(len(str(k)) for k in v)
        new = {i: v[k] for k in v for i, j in enumerate(keep) if int(k) == j}
        return {(str(i).zfill(width) if isinstance(next(iter(v)), str) else i): x for i, x in new.items()}
    return v


def _small(k: str, v):
    size = SIZES.get(k, next((s for key, s in SIZES.items() if k.startswith(key + "_per_layer")), None))
    if size is None:
        return v
    if isinstance(v, int) and not isinstance(v, bool):
        return min(v, size)
    if isinstance(v, list) and v and all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        return [min(x, size) for x in v]
    return v


def _shrink(cfg, depth: int = 0) -> None:
    """Overwrite the size attributes of ``cfg`` (and its sub-configs) in place."""
    from transformers import PretrainedConfig

    d = cfg.__dict__
    for k in list(d):
        if isinstance(d[k], PretrainedConfig) and depth < 3:
            _shrink(d[k], depth + 1)
        else:
            d[k] = _small(k, d[k])
    for k in FILL_NONE:
        if k in d and d[k] is None:
            d[k] = SIZES[k]
    if isinstance(d.get("qk_rope_head_dim"), int) and "head_dim" in d:
        d["head_dim"] = d["qk_rope_head_dim"]  # MLA: the rotary part is the model's head_dim
    n_key = next((k for k in LAYER_COUNTS if isinstance(d.get(k), int) and not isinstance(d.get(k), bool)), None)
    if n_key is not None:
        n = d[n_key]
        pattern = next((d[k] for k in PATTERNS if isinstance(d.get(k), (list, str)) and len(d[k]) == n), None)
        keep = _keep(pattern) if pattern is not None else list(range(min(n, 2)))
        for k in list(d):
            if k in PATTERNS and isinstance(d[k], str) and len(d[k]) == n:
                d[k] = "".join(d[k][i] for i in keep)
            elif k not in LAYER_COUNTS:
                d[k] = _select(d[k], keep, n)
        for k in LAYER_COUNTS:
            if d.get(k) == n:
                d[k] = len(keep)
    for k in TOKEN_IDS:
        v = d.get(k)
        if isinstance(v, int) and v >= VOCAB:
            d[k] = VOCAB - 1 - TOKEN_IDS.index(k)
        elif isinstance(v, list):
            d[k] = [t if t < VOCAB else VOCAB - 1 for t in v]
    for k, v in list(d.items()):  # special-token ids of multimodal configs (image_token_id, ...)
        if k.endswith(("_token_id", "_token_index")) and k not in TOKEN_IDS and isinstance(v, int) and v >= VOCAB:
            d[k] = VOCAB - 10
    for k in ("attention_dropout", "hidden_dropout", "dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop"):
        if isinstance(d.get(k), float):
            d[k] = 0.0
    for k in ("sliding_window", "attention_window_size", "sliding_window_size", "local_attention_window_len"):
        if isinstance(d.get(k), int) and not isinstance(d.get(k), bool) and d[k] > 4:
            d[k] = 4  # a window shorter than the probe, so windowed layers see a window


# Classes whose layer pattern lives in attributes the generic shrink does not know, or whose defaults
# have no layer of some kind: attribute -> value, set after the shrink.
OVERRIDES: dict[str, dict[str, Any]] = {
    "jamba": {"num_hidden_layers": 2, "attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2,
              "expert_layer_offset": 1},
    "bamba": {"num_hidden_layers": 2, "attn_layer_indices": [1]},
    "zamba": {"num_hidden_layers": 4, "attn_layer_period": 2, "attn_layer_offset": 1, "attention_hidden_size": 64,
              "layers_block_type": ["mamba", "hybrid", "mamba", "hybrid"]},
    "zamba2": {"num_hidden_layers": 2, "hybrid_layer_ids": [1], "attention_hidden_size": 64},
    "recurrent_gemma": {"num_hidden_layers": 3},
    "gpt_neo": {"num_layers": 2, "attention_types": [[["global", "local"], 1]]},
    "lfm2": {"num_hidden_layers": 2, "layer_types": ["conv", "full_attention"], "full_attn_idxs": [1]},
    "lfm2_moe": {"num_hidden_layers": 2, "layer_types": ["conv", "full_attention"], "num_dense_layers": 1},
    "mamba2": {"num_heads": 8},
    "ernie4_5_moe": {"moe_k": 2},
    "gemma3n_text": {"num_kv_shared_layers": 0},
    "gemma3n": {"num_kv_shared_layers": 0},
    "dory": {"num_hidden_layers": 4, "n_input_layers": 1, "n_recurrent_layers": 2, "n_output_layers": 1,
             "layer_types": ["sliding_attention", "mlp", "full_attention", "mlp"]},
    "reformer": {"is_decoder": True, "axial_pos_shape": [4, 16], "axial_pos_embds_dim": [16, 16],
                 "local_attn_chunk_length": 4, "lsh_attn_chunk_length": 4, "attn_layers": ["local", "lsh"]},
    "xmod": {"default_language": "en_XX"},
}
for _t in ("gemma4", "gemma4_text", "gemma4_unified", "gemma4_unified_text", "gemma4_assistant",
           "gemma4_unified_assistant"):
    OVERRIDES[_t] = {"global_head_dim": 8}
# derived by the config from its layer pattern: left out when the shrunk config is rebuilt
DERIVED = ("per_layer_config",)
FILL_NONE = ("head_dim", "num_key_value_heads", "num_experts_per_tok")


def _apply(cfg, model_type: str) -> None:
    for k, v in OVERRIDES.get(model_type, {}).items():
        if hasattr(cfg, "get_text_config") and cfg.get_text_config() is not cfg:
            setattr(cfg.get_text_config(), k, v)
        setattr(cfg, k, v)


def tiny_config(model_type: str, model_class=None):
    """The default config of ``model_class`` (``model_type``'s), shrunk (see :data:`SIZES`, :data:`OVERRIDES`)."""
    from transformers import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    try:
        cfg = cls()
    except Exception as e:  # noqa: BLE001 - a config that cannot be built with its own defaults
        raise NotBuildable(f"{cls.__name__}() fails: {type(e).__name__}: {_first(e)}") from e
    want = getattr(model_class, "config_class", None)
    if want is not None and not isinstance(cfg, want) and cfg.get_text_config() is not cfg:
        cfg = cfg.get_text_config()  # a causal LM built on the text part of a composite config
        cls = type(cfg)
    _shrink(cfg)
    _apply(cfg, model_type)
    # re-run the config's own derivations (layer patterns from counts, head dims, ...) on the new sizes
    try:
        cfg = cls(**{k: v for k, v in cfg.to_dict().items() if k not in ("transformers_version", *DERIVED)})
    except Exception as e:  # noqa: BLE001
        raise NotBuildable(f"{cls.__name__} rejects the tiny sizes: {type(e).__name__}: {_first(e)}") from e
    _shrink(cfg)  # derivations may have grown things back (e.g. a pattern cycled to the layer count)
    _apply(cfg, model_type)
    return cfg


def _first(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return " ".join(lines[:2])[:200]


@dataclass
class Built:
    model_type: str
    class_name: str
    model: nn.Module | None = None
    reason: str = ""  # why it could not be built
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


def build(model_type: str, class_name: str) -> Built:
    """The tiny model (fp32, eval, seed 0), or ``Built(reason=...)`` when it cannot be built."""
    import transformers

    t0 = time.perf_counter()
    out = Built(model_type, class_name)
    try:
        cls = getattr(transformers, class_name)
        cfg = tiny_config(model_type, cls)
        torch.manual_seed(0)
        model = cls(cfg)
        model.eval()
        out.model = model
    except NotBuildable as e:
        out.reason = str(e)
    except Exception as e:  # noqa: BLE001
        out.reason = f"{class_name}(tiny config) fails: {type(e).__name__}: {_first(e)}"
    out.seconds = time.perf_counter() - t0
    return out


# -- the oracle

_LOCAL = "seqpar_zoo_token_local"


def _token_local_attention(module, query, key, value, attention_mask, **kwargs):
    """Every query gets its own token's value: attention that mixes nothing (cross-attention, with
    other keys than queries, contributes nothing)."""
    hq, hkv = query.shape[1], value.shape[1]
    if query.shape[2] != value.shape[2]:
        return query.new_zeros(query.shape[0], query.shape[2], hq, value.shape[3]), None
    v = value.repeat_interleave(hq // hkv, dim=1) if hq != hkv else value  # (B, Hq, S, Dv)
    return v.transpose(1, 2).contiguous(), None  # (B, S, Hq, Dv)


def _register_local() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(_LOCAL, _token_local_attention)
    AttentionMaskInterface.register(_LOCAL, lambda **kw: None)


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids, use_cache=False)
    t = out.logits if hasattr(out, "logits") else out[0]
    return t.float()


def mixes_outside_attention(model: nn.Module, *, seq: int = 12, t: int = 5) -> dict[str, Any]:
    """The oracle. Model made token-local in its attention (a copy; ``model`` is untouched), two inputs
    that differ at position ``t`` only: ``{"mixes": bool, "changed": positions != t whose logits changed,
    "error": text if the model cannot run that way}``. Needs an HF model on transformers' attention
    interface (otherwise ``error`` says so). The copy's parameters get a little noise first: a mixer
    initialised as the identity (a delta-initialised short conv) would otherwise look token-local."""
    _register_local()
    m = copy.deepcopy(model)
    try:
        m.set_attn_implementation(_LOCAL)
    except Exception as e:  # noqa: BLE001
        return {"mixes": None, "changed": [], "error": f"set_attn_implementation: {type(e).__name__}: {e}"[:200]}
    if getattr(m.config, "_attn_implementation", None) != _LOCAL:
        return {"mixes": None, "changed": [], "error": "the model did not switch its attention"}
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # some mixers start as the identity (a delta-initialised conv): make them not
        for p in m.parameters():
            if p.is_floating_point():
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.02)
    vocab = m.get_input_embeddings().weight.shape[0] if m.get_input_embeddings() is not None else VOCAB
    hi = min(vocab, VOCAB) - 12  # below the special-token ids the tiny configs moved to the top of the vocabulary
    a = torch.randint(3, hi, (1, seq), generator=g)
    b = a.clone()
    b[0, t] = 3 + (int(a[0, t]) - 3 + 7) % (hi - 3)
    state = torch.random.get_rng_state()
    try:
        with torch.no_grad():
            la, lb = _logits(m, a), _logits(m, b)
    except Exception as e:  # noqa: BLE001
        return {"mixes": None, "changed": [], "error": f"forward: {type(e).__name__}: {str(e)[:200]}"}
    finally:
        torch.random.set_rng_state(state)
    diff = (la - lb).abs().flatten(2).amax(-1)[0]  # (S,)
    scale = la.abs().amax().clamp_min(1e-6)
    changed = [i for i in range(seq) if i != t and float(diff[i]) > 1e-5 * float(scale)]
    return {"mixes": bool(changed), "changed": changed, "error": None}


# -- the survey: every causal LM, built, judged by the oracle and by parallelize's check


@dataclass
class Row:
    model_type: str
    class_name: str
    built: str  # "" when built, else why not
    oracle: dict  # mixes_outside_attention's answer ({} when not built)
    verdict: str  # "supported", or the refusal's class and message
    findings: list = field(default_factory=list)  # seqpar.passes.mixers.Finding of the refusal
    seconds: float = 0.0
    model: nn.Module | None = None  # the tiny model, kept for checks of the refusal's module paths

    @property
    def truth(self) -> str:
        """The oracle's answer: "mixes", "local", or "unjudged" (could not build / run it)."""
        if self.built or not self.oracle or self.oracle.get("error"):
            return "unjudged"
        return "mixes" if self.oracle["mixes"] else "local"


_SURVEY: list[Row] | None = None


def survey() -> list[Row]:
    """One :class:`Row` per causal LM of the installed transformers (computed once per process: ~20 s)."""
    global _SURVEY
    if _SURVEY is None:
        _SURVEY = [_survey_one(mt, cn) for mt, cn in causal_lm_types()]
    return _SURVEY


def _survey_one(model_type: str, class_name: str) -> Row:
    from seqpar.passes.check import model_kind
    from seqpar.passes.mixers import ArchitectureNotSupported, architecture_problems

    b = build(model_type, class_name)
    row = Row(model_type, class_name, b.reason, {}, "", seconds=b.seconds)
    if b.model is None:
        row.verdict = "not built"
        return row
    t0 = time.perf_counter()
    row.oracle = mixes_outside_attention(b.model)
    try:
        row.verdict = f"supported ({model_kind(b.model)})"
    except ArchitectureNotSupported as e:
        row.verdict = f"{type(e).__name__}: {e}"
        row.findings = architecture_problems(b.model, hf_model=True)
    except (TypeError, ValueError) as e:
        row.verdict = f"{type(e).__name__}: {e}"
    row.seconds += time.perf_counter() - t0
    row.model = b.model
    return row


# -- the models with sequence mixers besides attention

_MIXER_TYPES: list[tuple[str, str]] | None = None


def mixer_types() -> list[tuple[str, str]]:
    """``[(model_type, class name), ...]`` of the causal LMs of the installed transformers in which
    :mod:`seqpar.passes.mixers` finds a sequence mixer module that ``parallelize(mixers=...)`` takes (built
    tiny; computed once per process). Enumerated, not hand-picked."""
    global _MIXER_TYPES
    if _MIXER_TYPES is None:
        _MIXER_TYPES = mixer_types_share(0, 1)
    return _MIXER_TYPES


def mixer_types_share(rank: int, size: int) -> list[tuple[str, str]]:
    """:func:`mixer_types` among every ``size``-th causal LM from the ``rank``-th: a case for a test world whose
    ranks split the enumeration (each builds a share of the models), merged in :func:`causal_lm_types`' order."""
    from seqpar.passes.check import mixer_findings

    out = []
    for model_type, class_name in causal_lm_types()[rank::size]:
        b = build(model_type, class_name)
        if b.model is not None and mixer_findings(b.model, "hf")[0]:
            out.append((model_type, class_name))
    return out


# -- exact or refused: the model under parallelize against itself in one process

EQ_SEQ = 40  # 4 ranks x zigzag: shard chunks of 5 tokens; windows of 6 and chunks of 7 (not multiples of 5, < S)
EQ_WINDOW, EQ_CHUNK = 6, 7
_SEQPAR_DIRS = (f"{os.sep}seqpar{os.sep}", f"{os.sep}kernels{os.sep}")
_MESHES: dict = {}


def _equivalence_config(config) -> None:
    """Windows and chunks shorter than the sequence, no dropout: set before the model is built (attention
    modules copy their window from the config at construction)."""
    cfgs = [config] + ([config.get_text_config()] if hasattr(config, "get_text_config") else [])
    for cfg in cfgs:
        for k, v in list(vars(cfg).items()):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            if k in ("sliding_window", "attention_window_size", "sliding_window_size") and isinstance(v, int):
                setattr(cfg, k, EQ_WINDOW)
            elif k == "attention_chunk_size" and isinstance(v, int):
                setattr(cfg, k, EQ_CHUNK)
            elif "dropout" in k or k.endswith("_pdrop"):
                setattr(cfg, k, 0.0 if isinstance(v, float) else 0)


def _rel(a: torch.Tensor, b: torch.Tensor, floor: float = 0.0) -> float:
    return float((a.double() - b.double()).abs().max() / max(float(b.abs().max()), floor, 1e-30))


def _raised_in_seqpar(e: BaseException) -> bool:
    frames = traceback.extract_tb(e.__traceback__)
    return bool(frames) and any(d in frames[-1].filename for d in _SEQPAR_DIRS)


EQ_DOCS = (0, 13, 27, EQ_SEQ)  # packed=True: three documents, position_ids restarting at 13 and 27


def exact_or_refused(rank: int, size: int, *, model_type: str, class_name: str, layout: str = "zigzag",
                     mixers: str = "auto", packed: bool = False, checkpoint: bool = False,
                     fsdp: bool = False) -> dict[str, Any]:
    """One causal LM class on this rank of a ``size``-rank gloo world: ``{"status": ...}`` with status

    - ``"exact"``: ``parallelize(model, layout=layout, mixers=mixers, checkpoint=..., fsdp=...)`` +
      ``shard_batch`` gives the single-process
      model's loss (``loss`` rel <= 1e-5) and every gradient (``grad`` rel <= 1e-4 of the parameter's own
      gradient, floored at 1e-4 of the model's largest gradient entry: a key bias's gradient is zero in
      exact arithmetic and its float noise has no relative error);
    - ``"refused"``: a ValueError / NotImplementedError / TypeError raised inside seqpar (``why``);
    - ``"mismatch"`` / ``"crash"`` (an exception raised elsewhere): what must never happen;
    - ``"unbuilt"`` / ``"reference fails"``: the class cannot be built tiny or run in one process here.

    A gradient beyond that bound where the model has sequence mixers is judged against the reference's own
    rounding there (:func:`split_noise`): within :data:`GRAD_NOISE` times it counts as exact (``grad`` is
    then scaled so 1e-4 is the bound; ``grad_raw`` is the plain rule's, ``noise_ratio`` the error over the
    noise, ``noisy`` the parameters).

    The model: :func:`tiny_config` with windows of 6 and chunks of 7 tokens, no dropout, matrices scaled
    x2 (so a dropped mask shows), train mode; a batch of 40 tokens with labels (``packed=True``: and
    ``position_ids`` restarting at the documents of :data:`EQ_DOCS` and their ``cu_seq_lens_q/k``, as
    ``DataCollatorWithFlattening`` gives them, so the reference's mixers are told the documents too).
    ``"paths"``: how the model's sequence mixers ran (``seqpar.passes.sequence_mixers.mixer_plans``).
    """
    import copy

    import transformers

    import seqpar

    try:
        ref = _reference_run(model_type, class_name, packed)
    except Exception as e:  # noqa: BLE001 - reported, not judged
        return {"status": "unbuilt", "why": f"{type(e).__name__}: {_first(e)}"}
    batch = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in ref.batch.items()}  # the cases' own
    if size not in _MESHES:
        _MESHES[size] = seqpar.init_mesh(cp=size)
    mesh = _MESHES[size]

    def failed(e: BaseException) -> dict[str, Any]:
        if isinstance(e, (ValueError, NotImplementedError, TypeError)) and _raised_in_seqpar(e):
            return {"status": "refused", "why": f"{type(e).__name__}: {e}"}
        return {"status": "crash", "why": f"{type(e).__name__}: {str(e)[:300]}", "where": traceback.format_exc()[-1200:]}

    try:  # refusals at parallelize come first (no communication): no reference is needed for them
        model = seqpar.parallelize(copy.deepcopy(ref.model), mesh, layout=layout, fsdp=fsdp, checkpoint=checkpoint,
                                   mixers=mixers)
    except Exception as e:  # noqa: BLE001
        return failed(e)
    want, grads, why = ref.outcome()
    if why:
        return {"status": "reference fails", "why": why}
    try:
        torch.manual_seed(0)
        got = model(**seqpar.shard_batch(batch, mesh, layout=layout)).loss
        got.backward()
    except Exception as e:  # noqa: BLE001
        return failed(e)
    from seqpar.passes.sequence_mixers import mixer_plans

    plans = mixer_plans(model)
    paths = sorted({p.how for p in plans if p.how != "state" or p.calls > p.fallbacks + p.gathered}  # state calls ran
                   | ({"gather"} if any(p.fallbacks or p.gathered for p in plans) else set()))
    params = dict(model.named_parameters())
    full = {n: (g.full_tensor() if hasattr(g, "full_tensor") else g)
            for n, g in ((n, p.grad) for n, p in params.items()) if g is not None}  # FSDP2: DTensor gradients
    floor = max(float(g.abs().max()) for _, g in grads) * 1e-4 if grads else 0.0
    rels = {n: _rel(full[n], g, floor) for n, g in grads if n in full}
    missing = [n for n, _ in grads if n not in full]
    loss = _rel(got.detach(), want)
    raw = max(rels.values(), default=0.0)  # the plain rule's, before the noise scaling below
    noisy = {n for n, r in rels.items() if r > 1e-4}
    ratio = None  # the worst noisy gradient's error over the reference's own rounding there
    if noisy and paths and loss <= 1e-5:  # beyond the bound: is the reference's own rounding that large there?
        noise = split_noise(model_type, class_name, batch, layout, size)
        ratio = max(rels[n] / max(1e-4, noise[n]) for n in noisy if n in noise)
        rels.update({n: rels[n] * 1e-4 / max(1e-4, GRAD_NOISE * noise[n]) for n in noisy if n in noise})
    grad = max(rels.values(), default=0.0)
    ok = loss <= 1e-5 and grad <= 1e-4 and not missing
    return {"status": "exact" if ok else "mismatch", "loss": loss, "grad": grad, "missing": missing[:3],
            "paths": paths, "noisy": sorted(noisy)[:4], "grad_raw": raw, "noise_ratio": ratio}


GRAD_NOISE = 2.0  # a gradient may differ from the reference by this many times the reference's own rounding


@dataclass
class _RefRun:
    """The reference of :func:`exact_or_refused` for one (model, batch): the model as built (never run: each
    case parallelizes a copy of it), the batch, and, computed on first use, the single-process loss and
    gradients of a copy of it, or why that fails."""
    model: nn.Module
    batch: dict
    _outcome: tuple | None = None

    def outcome(self) -> tuple[torch.Tensor | None, list[tuple[str, torch.Tensor]], str]:
        """``(loss, [(name, grad), ...], "")``, or ``(None, [], why)`` when the model does not run here."""
        if self._outcome is None:
            ref = copy.deepcopy(self.model)
            try:
                torch.manual_seed(0)
                batch = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in self.batch.items()}
                want = ref(**batch, use_cache=False).loss  # with a cache transformers ignores documents
                want.backward()
                if not torch.isfinite(want):
                    self._outcome = (None, [], f"loss {want.item()}")
                else:
                    grads = [(n, p.grad) for n, p in ref.named_parameters() if p.grad is not None]
                    self._outcome = (want.detach(), grads, "")
            except Exception as e:  # noqa: BLE001 - the model does not run in one process at this size
                self._outcome = (None, [], f"{type(e).__name__}: {_first(e)}")
        return self._outcome


_REF_RUNS: dict[tuple, _RefRun] = {}  # this process's references of the latest model (packed and not)


def _reference_run(model_type: str, class_name: str, packed: bool) -> _RefRun:
    """The reference for ``exact_or_refused(model_type, class_name, packed=...)``, built once per process while
    cases of the same model follow each other (its variants of layout / mixers / checkpoint / fsdp share it:
    the single-process run depends on the model and the batch only)."""
    key = (model_type, class_name, packed)
    if key not in _REF_RUNS:
        if any(k[:2] != key[:2] for k in _REF_RUNS):  # another model: drop the previous one's
            _REF_RUNS.clear()
        ref = _reference(model_type, class_name)
        vocab = ref.get_input_embeddings().weight.shape[0]
        ids = torch.randint(3, max(4, min(vocab, VOCAB) - 12), (1, EQ_SEQ), generator=torch.Generator().manual_seed(7))
        batch = {"input_ids": ids, "labels": ids.clone()}
        if packed:  # as DataCollatorWithFlattening gives them: the reference's mixers see the documents too
            batch["position_ids"] = torch.cat([torch.arange(b - a) for a, b in zip(EQ_DOCS, EQ_DOCS[1:])])[None]
            cu = torch.tensor(EQ_DOCS, dtype=torch.int32)
            longest = max(b - a for a, b in zip(EQ_DOCS, EQ_DOCS[1:]))
            batch.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
        _REF_RUNS[key] = _RefRun(ref, batch)
    return _REF_RUNS[key]


def _reference(model_type: str, class_name: str):
    """The model of :func:`exact_or_refused` (tiny, windows / chunks shortened, matrices x2, train mode)."""
    import transformers

    cls = getattr(transformers, class_name)
    cfg = tiny_config(model_type, cls)
    _equivalence_config(cfg)
    torch.manual_seed(0)
    ref = cls(cfg).float()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.ndim > 1 and "embed" not in name:
                p.mul_(2.0)
    ref.train()
    return ref


def split_noise(model_type: str, class_name: str, batch: dict, layout: str, size: int) -> dict[str, float]:
    """The reference's own rounding in each gradient, relative (the zoo's floor rule): the single-process
    model's gradient against the same model whose sequence mixers' backward is split by the ranks' tokens
    (each mixer's output computed ``size`` times in this process, rank r's tokens kept from the r-th call:
    the same math summed in another order, as the gather path sums it). One process, no seqpar: where a
    mixer's gradient is ill-conditioned (a gated DeltaNet's ``A_log`` at tiny size cancels to 1e-6 of its
    terms in fp32) this is the precision the reference itself has."""
    from seqpar.passes.check import mixer_findings

    def grads(split: bool) -> dict[str, torch.Tensor]:
        m = _reference(model_type, class_name)
        if split:
            for f in mixer_findings(m, "hf")[0]:
                _split_forward(m.get_submodule(f.path), layout, size)
        torch.manual_seed(0)
        m(**batch, use_cache=False).loss.backward()
        return {n: p.grad for n, p in m.named_parameters() if p.grad is not None}

    whole, split = grads(False), grads(True)
    floor = max(float(g.abs().max()) for g in whole.values()) * 1e-4 if whole else 0.0
    return {n: _rel(split[n], g, floor) for n, g in whole.items() if n in split}


def _split_forward(module: nn.Module, layout: str, size: int) -> None:
    from seqpar.layout import global_indices

    inner = module.forward

    def combine(outs: list, S: int):
        first = outs[0]
        if isinstance(first, torch.Tensor) and first.ndim >= 2 and first.shape[1] == S:
            total = torch.zeros_like(first)
            for r, o in enumerate(outs):
                mask = torch.zeros(S, dtype=first.dtype)
                mask[global_indices(S, r, size, layout)] = 1
                total = total + o * mask.view(1, S, *([1] * (first.ndim - 2)))
            return total
        if isinstance(first, tuple):
            return type(first)(combine([o[i] for o in outs], S) for i in range(len(first)))
        return first

    def forward(*args, **kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        return combine([inner(*args, **kwargs) for _ in range(size)], x.shape[1])

    module.forward = forward
