"""What in a model mixes tokens along the sequence besides the attention seqpar takes over.

Under ``parallelize`` a rank holds a shard of the sequence. Attention is made exact over the whole
sequence; anything else that mixes tokens (a causal conv1d, a Mamba / Mamba2 selective scan, gated
DeltaNet or lightning linear attention, an xLSTM / RWKV / RG-LRU recurrence, an LFM2 short conv, a
hand-written attention that does not go through transformers' ``AttentionInterface``, ALiBi
biases...) would silently compute over the rank's shard only: a different loss with no error. The
check pass refuses such models by name, before any communication: :func:`architecture_problems`
lists every finding as a :class:`Finding` (path in the model, class, why), and
:func:`refuse_unsupported` raises :class:`ArchitectureNotSupported` naming them.

The detection is structural, so it does not go stale with a list of class names:

- **modules** (the strongest signals): ``nn.Conv1d`` (any 1-d ``_ConvNd``) with a kernel longer than 1
  (its parent is named: the mixer that owns it); recurrent ``nn.RNNBase`` modules (GRU/LSTM/RNN);
  padding modules that shift along the sequence (RWKV's ``time_shift``); modules owning the
  parameters of a state-space or linear recurrence (``A_log``, ``dt_bias``, ``time_decay``,
  ``recurrent_param``, ...);
- **attention outside the interface** (Hugging Face models): a module class named ``*Attention*`` /
  ``*Attn*`` whose code computes scores (softmax, matmul, SDPA, ...) without dispatching through
  ``ALL_ATTENTION_FUNCTIONS``: seqpar cannot take it over;
- **no attention at all** (Hugging Face models, when nothing above was found): a causal LM none of
  whose modules dispatches through the interface mixes its tokens with something else (xLSTM's
  mLSTM); its first block is named;
- **the config's layer pattern**: ``layer_types`` / ``layers_block_type`` / ``block_types`` entries
  other than full / sliding / chunked attention or an MLP ("linear_attention", "mamba", "conv",
  "recurrent", "hybrid", an indexer's "indexed_attention", ...), ``hybrid_override_pattern`` with
  Mamba layers ("M"): the block of that layer is named;
- **ALiBi** (Bloom, MPT, Falcon with ``alibi=True``): ``config.alibi`` / ``attn_config.alibi`` /
  ``position_embedding_type="alibi"``, or a modeling module that builds ALiBi tensors and has no
  such switch.

Vision and audio towers of multimodal models are skipped (sub-models whose ``main_input_name`` is
not ``input_ids``: they do not see the sharded token sequence). Nothing runs: no forward, no
communication, no parameter is touched; a model on the meta device is checked the same way.
``tests/test_mixers.py`` checks this against a numerical oracle on every causal LM of the installed
transformers (:mod:`seqpar.testing.zoo`).
"""

from __future__ import annotations

import functools
import inspect
import re
import sys
from dataclasses import dataclass, replace
from typing import Callable

from torch import nn

__all__ = ["ArchitectureNotSupported", "Finding", "architecture_problems", "find_mixers", "refuse_unsupported",
           "split_takeable", "holds_interface_attention",
           "ATTENTION_LAYER_TYPES", "TOKEN_LOCAL_LAYER_TYPES"]


class ArchitectureNotSupported(NotImplementedError, TypeError):
    """The model has something sequence parallelism does not cover (yet). A ``NotImplementedError``
    (and, for callers of earlier versions, a ``TypeError``)."""


@dataclass(frozen=True)
class Finding:
    path: str  # the module's path in the model ("model.layers.0.mamba"); "" for the model itself
    cls: str  # its class name
    why: str  # what gave it away
    kind: str  # "mixer" | "attention" (outside the interface) | "alibi"

    def __str__(self) -> str:
        return f"{self.path or '<model>'} ({self.cls}): {self.why}"


# Layer kinds whose only sequence mixing is attention seqpar takes over (or none at all).
ATTENTION_LAYER_TYPES = frozenset({"full_attention", "sliding_attention", "chunked_attention", "attention",
                                   "global", "local", "full", "sliding", "swa"})
TOKEN_LOCAL_LAYER_TYPES = frozenset({"mlp", "moe", "dense", "sparse", "ffn", "hash_moe"})
# Parameters (by their name in the owning module) of state-space models and linear recurrences.
RECURRENCE_PARAMS = frozenset({"A_log", "dt_bias", "time_decay", "time_first", "recurrent_param", "time_faaaa",
                               "dt_proj_bias"})
_PATTERN_ATTRS = ("layer_types", "layers_block_type", "block_types", "attention_layers", "attn_layers")
_INTERFACE = ("ALL_ATTENTION_FUNCTIONS", "attention_interface", "get_interface(")
_COMPUTES = ("softmax", "matmul", "bmm(", "einsum", "scaled_dot_product_attention", "flash_attn", " @ ",
             "cumsum", "cumprod")


# -- the text part of the model


def _is_side_tower(module: nn.Module, text_configs: tuple) -> bool:
    """A vision / audio sub-model: its inputs are not the sharded token sequence (it reads pixels or
    audio features, or its config has no vocabulary)."""
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    if not isinstance(module, PreTrainedModel):
        return False
    cfg = getattr(module, "config", None)
    if any(cfg is c for c in text_configs):
        return False  # the model itself, or its language model
    name = getattr(module, "main_input_name", None)
    if isinstance(name, str) and name not in ("input_ids", "inputs_embeds"):
        return True
    return cfg is not None and getattr(cfg, "vocab_size", None) is None and "text" not in type(cfg).__name__.lower()


def _text_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``named_modules()`` without the subtrees of vision / audio towers."""
    out: list[tuple[str, nn.Module]] = []
    skip: list[str] = []
    texts = (getattr(model, "config", None), _text_config(model))
    for name, m in model.named_modules():
        if any(name == s or name.startswith(s + ".") for s in skip):
            continue
        if name and _is_side_tower(m, texts):
            skip.append(name)
            continue
        out.append((name, m))
    return out


def _parent(path: str) -> str:
    return path.rsplit(".", 1)[0] if "." in path else ""


def _text_config(model: nn.Module):
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    get = getattr(cfg, "get_text_config", None)
    try:
        return get() if callable(get) else cfg
    except Exception:  # noqa: BLE001 - ambiguous composite configs: the top-level one
        return cfg


# -- module signals


def _module_findings(mods: list[tuple[str, nn.Module]]) -> list[Finding]:
    by_path = dict(mods)
    found: dict[str, Finding] = {}

    def owner(path: str, why: str) -> None:
        p = _parent(path)
        m = by_path.get(p)
        if m is None:
            return
        found.setdefault(p, Finding(p, type(m).__name__, why, "mixer"))

    for path, m in mods:
        if isinstance(m, nn.modules.conv._ConvNd) and len(m.kernel_size) == 1 and m.kernel_size[0] > 1:
            depthwise = " depthwise" if m.groups > 1 and m.groups == m.in_channels else ""
            owner(path, f"a{depthwise} convolution along the sequence ({path.rsplit('.', 1)[-1]}: "
                        f"{type(m).__name__}, kernel_size={m.kernel_size[0]})")
        elif isinstance(m, nn.RNNBase):
            found.setdefault(path, Finding(path, type(m).__name__, f"a recurrent {m.mode} layer over the sequence",
                                           "mixer"))
        elif isinstance(m, (nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d)) and any(
                m.padding[2:4]):
            owner(path, f"a token shift ({path.rsplit('.', 1)[-1]}: {type(m).__name__}{tuple(m.padding)} pads "
                        f"along the sequence)")
        names = {n for n, _ in m.named_parameters(recurse=False)} | {n for n, _ in m.named_buffers(recurse=False)}
        rec = sorted(names & RECURRENCE_PARAMS)
        if rec:
            found.setdefault(path, Finding(path, type(m).__name__, f"parameters of a state-space / linear "
                                                                   f"recurrence ({', '.join(rec)})", "mixer"))
    # one finding per mixer: drop those inside another finding (a conv inside a named mixer)
    paths = sorted(found)
    return [found[p] for p in paths if not any(p.startswith(q + ".") for q in paths if q and q != p)]


@functools.lru_cache(maxsize=None)
def _code(cls: type) -> str | None:
    """The source of the methods of the class that defines ``cls.forward`` (None: torch's own, or no
    source); function sources, not the class's: ``inspect.getsource(cls)`` parses the whole module."""
    impl = next((c for c in cls.__mro__ if "forward" in c.__dict__), None)
    if impl is None or impl.__module__.startswith(("torch.", "seqpar.")):
        return None
    parts = []
    for v in impl.__dict__.values():
        f = getattr(v, "__func__", v)
        f = inspect.unwrap(f) if callable(f) else None
        if inspect.isfunction(f):
            try:
                parts.append(inspect.getsource(f))
            except (OSError, TypeError):
                pass
    return "\n".join(parts) or None


@functools.lru_cache(maxsize=None)
def _own_attention_code(cls: type) -> str | None:
    """Why instances of ``cls`` compute attention in their own code, or None."""
    if not re.search(r"attention|attn", cls.__name__, re.IGNORECASE):
        return None
    src = _code(cls)
    if src is None or any(s in src for s in _INTERFACE):
        return None
    ops = [s.strip(" (") for s in _COMPUTES if s in src]
    if not ops:
        return None  # a wrapper around other modules (they are checked themselves)
    return (f"computes attention (or another token mixing: {', '.join(ops)}) in its own code, not through "
            f"transformers' AttentionInterface, so seqpar cannot take it over")


@functools.lru_cache(maxsize=None)
def _dispatches(cls: type) -> bool:
    """Instances of ``cls`` call an attention function through transformers' interface."""
    src = _code(cls)
    return src is not None and any(s in src for s in _INTERFACE)


def holds_interface_attention(module: nn.Module) -> bool:
    """``module`` or a module inside it calls an attention function through transformers' interface."""
    return any(_dispatches(type(m)) for m in module.modules())


def _attention_findings(mods: list[tuple[str, nn.Module]]) -> list[Finding]:
    out: list[Finding] = []
    for path, m in mods:
        why = _own_attention_code(type(m))
        if why is not None and not any(path.startswith(f.path + ".") for f in out):
            out.append(Finding(path, type(m).__name__, why, "attention"))
    return out


# -- config signals


def _layer_lists(mods: list[tuple[str, nn.Module]], n: int) -> list[tuple[str, nn.ModuleList]]:
    return [(p, m) for p, m in mods if isinstance(m, nn.ModuleList) and len(m) == n]


def _cycled_lists(mods: list[tuple[str, nn.Module]], n: int) -> list[tuple[str, nn.ModuleList]]:
    """The outermost non-empty ``nn.ModuleList`` when it is longer than a layer pattern of ``n`` entries
    (RecurrentGemma's ``block_types`` repeat over the layers)."""
    lists = [(p, m) for p, m in mods if isinstance(m, nn.ModuleList) and len(m)]
    return lists[:1] if lists and len(lists[0][1]) > n else []


def _config_findings(model: nn.Module, mods: list[tuple[str, nn.Module]]) -> list[Finding]:
    cfg = _text_config(model)
    if cfg is None:
        return []
    out: list[Finding] = []
    for attr in _PATTERN_ATTRS + ("hybrid_override_pattern",):
        pattern = getattr(cfg, attr, None)
        if not isinstance(pattern, (list, tuple, str)) or not pattern:
            continue
        if attr == "hybrid_override_pattern":  # Nemotron-H: "M" Mamba2, "*" attention, "-" MLP, "E" MoE
            bad = [(i, k) for i, k in enumerate(pattern) if k == "M"]
        else:
            bad = [(i, k) for i, k in enumerate(pattern) if isinstance(k, str)
                   and k.lower() not in ATTENTION_LAYER_TYPES | TOKEN_LOCAL_LAYER_TYPES]
        if not bad:
            continue
        lists = _layer_lists(mods, len(pattern)) or _cycled_lists(mods, len(pattern))
        for i, k in bad:
            if lists:
                path, ml = lists[0]
                for j in range(i, len(ml), len(pattern)):  # a pattern shorter than the layers repeats
                    out.append(Finding(f"{path}.{j}" if path else str(j), type(ml[j]).__name__,
                                       f"config.{attr}[{i}] = {k!r} (not an attention layer)", "mixer"))
            else:
                out.append(Finding("", type(model).__name__, f"config.{attr}[{i}] = {k!r} (not an attention layer)",
                                   "mixer"))
    # token n-gram embeddings (Blt's hashed byte groups: each position's embedding reads the tokens before it)
    for name in ("encoder_hash_byte_group_size", "hash_byte_group_size", "ngram_sizes"):
        sizes = getattr(cfg, name, None)
        if isinstance(sizes, (list, tuple)) and any(isinstance(n, int) and n > 1 for n in sizes):
            out.append(Finding("", type(model).__name__, f"config.{name} = {list(sizes)}: embeddings of token "
                               f"n-grams (each position reads the n-1 tokens before it)", "mixer"))
    return out


# -- ALiBi


def _alibi(model: nn.Module) -> Finding | None:
    cfg = _text_config(model)
    name = type(model).__name__
    for where, c in (("config", cfg), ("config.attn_config", getattr(cfg, "attn_config", None))):
        if c is None:
            continue
        flag = c.get("alibi") if isinstance(c, dict) else getattr(c, "alibi", None)
        if flag is not None:
            return Finding("", name, f"{where}.alibi = True: ALiBi position biases", "alibi") if flag else None
        if getattr(c, "position_embedding_type", None) == "alibi":
            return Finding("", name, f"{where}.position_embedding_type = 'alibi': ALiBi position biases", "alibi")
    module = sys.modules.get(type(model).__module__)
    if module is not None and any("alibi" in n.lower() and callable(getattr(module, n)) for n in dir(module)):
        return Finding("", name, f"{module.__name__} builds ALiBi position biases (and has no switch for them)",
                       "alibi")
    return None


# -- public


def _is_hf(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(model, PreTrainedModel)


def _no_attention_findings(model: nn.Module, mods: list[tuple[str, nn.Module]]) -> list[Finding]:
    """A Hugging Face causal LM none of whose modules dispatches attention through the interface mixes
    its tokens with something else (xLSTM's mLSTM, a state-space model, ...): its blocks are named."""
    if any(_dispatches(type(m)) for _, m in mods):
        return []
    lists = [(p, m) for p, m in mods if isinstance(m, nn.ModuleList) and len(m)]
    blocks = [(f"{lists[0][0]}.{i}", b) for i, b in enumerate(lists[0][1])] if lists else [("", model)]
    return [Finding(path, type(block).__name__, "no module of the model dispatches attention through transformers' "
                                                "AttentionInterface: the sequence is mixed by something else", "mixer")
            for path, block in blocks]


def find_mixers(model: nn.Module) -> list[Finding]:
    """The modules (and config layers) of ``model`` that mix tokens outside the attention interface."""
    mods = _text_modules(model)
    found = _module_findings(mods)
    known = [f.path for f in found]
    for f in _config_findings(model, mods):
        # a config layer whose block already has a named mixer inside is not repeated
        if not any(k == f.path or k.startswith(f.path + ".") for k in known):
            found.append(f)
    return found


def architecture_problems(model: nn.Module, *, hf_model: bool) -> list[Finding]:
    """Everything in ``model`` sequence parallelism does not cover: mixers, attention computed outside
    transformers' interface (Hugging Face models), ALiBi."""
    found = find_mixers(model)
    if hf_model:
        mods = _text_modules(model)
        paths = [f.path for f in found]
        own = [f for f in _attention_findings(mods) if not any(f.path == p or f.path.startswith(p + ".") for p in paths)]
        found += own
        if not found:
            found += _no_attention_findings(model, mods)
        alibi = _alibi(model)
        if alibi is not None:
            found.append(alibi)
    return found


def split_takeable(model: nn.Module, findings: list[Finding],
                   holds_attention: Callable[[nn.Module], bool]) -> tuple[list[Finding], list[Finding]]:
    """``findings`` -> (the mixer modules a per-module wrapper can take, the rest with why not).

    Taken: a ``"mixer"`` finding that names a module holding no attention seqpar takes over
    (``holds_attention``), i.e. the mixer itself (a Mamba mixer, a short conv, a gated DeltaNet), or a
    whole block without seqpar attention; a config finding's block without seqpar attention is taken
    through the modules inside it that compute attention in their own code (MiniMax's lightning
    attention), or whole. Not taken: attention outside the interface, ALiBi, findings without a module
    (the model's config: Blt's n-gram embeddings), blocks that also hold seqpar attention (a DSA
    indexer's layer)."""
    taken: list[Finding] = []
    rest: list[Finding] = []
    for f in findings:
        if f.kind != "mixer" or not f.path:
            rest.append(f)
            continue
        module = model.get_submodule(f.path)
        if holds_attention(module):
            rest.append(replace(f, why=f"{f.why}; the module also holds attention seqpar takes over, so the "
                                       f"mixer inside it cannot be run on the gathered sequence alone"))
            continue
        inner = [(f"{f.path}.{p}", m) for p, m in module.named_modules() if p and _own_attention_code(type(m))] \
            if f.why.startswith("config.") else []
        inner = [(p, m) for p, m in inner if not any(p.startswith(q + ".") for q, _ in inner)]
        taken += [Finding(p, type(m).__name__, f"{f.why}: {_own_attention_code(type(m))}", "mixer") for p, m in inner] \
            or [f]
    return taken, rest


_WAY_OUT = {
    "mixer": "sequence parallelism does not cover this mixer yet (a rank would mix only its own shard of the "
             "sequence, a silently different loss); train this model without parallelize, or use an "
             "architecture whose only sequence mixing is attention",
    "attention": "load the model with a transformers version / model class whose attention dispatches through "
                 "AttentionInterface (most recent decoder-only classes do), or use a plain PyTorch model calling "
                 "F.scaled_dot_product_attention",
    "alibi": "seqpar's attention has no ALiBi bias (it would need the global positions of both query and key); "
             "use a RoPE / learned-position model",
}


def refuse_unsupported(model: nn.Module, findings: list[Finding], hint: str = "") -> None:
    """Raise :class:`ArchitectureNotSupported` naming every finding (no-op without findings); ``hint``: a
    last line (another way out)."""
    if not findings:
        return
    kinds = [k for k in ("mixer", "attention", "alibi") if any(f.kind == k for f in findings)]
    lines = [f"  - {f}" for f in findings[:12]]
    if len(findings) > 12:
        lines.append(f"  - ... and {len(findings) - 12} more")
    what = {"mixer": "sequence mixers besides attention", "attention": "attention outside transformers' "
            "AttentionInterface", "alibi": "ALiBi"}
    raise ArchitectureNotSupported(
        f"seqpar.parallelize: {type(model).__name__} has {' and '.join(what[k] for k in kinds)}, which sequence "
        f"parallelism does not cover yet:\n" + "\n".join(lines) + "\n" +
        "\n".join(f"Way out ({k}): {_WAY_OUT[k]}." for k in kinds) + (f"\n{hint}" if hint else ""))
