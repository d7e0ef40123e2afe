"""Pass 0, check: options, mesh and model, validated before any communication."""

from __future__ import annotations

import inspect
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from seqpar.fsdp_options import FSDPOptions
from seqpar.mesh import check_mesh
from seqpar.passes import hf
from seqpar.passes.data_parallel import check_fsdp_options, fsdp_units
from seqpar.passes.lm_loss import check_loss
from seqpar.passes.mixers import (ArchitectureNotSupported, Finding, architecture_problems, find_mixers,
                                  holds_interface_attention, refuse_unsupported, split_takeable)
from seqpar.passes.offload import check_offload
from seqpar.passes.sequence_mixers import check_mixers
from seqpar.passes.tiled_mlp import check_mlp
from seqpar.vocab import BACKENDS, LAYOUT_CHOICES, METHOD_CHOICES, check_choice

__all__ = ["ArchitectureNotSupported", "ModelKind", "check", "find_blocks", "model_kind", "mixer_findings"]

ModelKind = Literal["hf", "sdpa"]


def find_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks: children of the outermost non-empty ``nn.ModuleList``s."""
    lists: list[tuple[str, nn.ModuleList]] = []
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) and not any(name.startswith(n + ".") for n, _ in lists):
            lists.append((name, m))
    return [b for _, ml in lists for b in ml]


_SDPA_IDS = frozenset(id(f) for f in (F.scaled_dot_product_attention,
                                      getattr(torch._C._nn, "scaled_dot_product_attention", None)) if f is not None)


def _code_objects(code):
    """``code`` and the code objects nested in it (lambdas, inner functions, comprehensions)."""
    yield code
    for c in code.co_consts:
        if inspect.iscode(c):
            yield from _code_objects(c)


def _refers_to_sdpa(fn, seen: set[int], depth: int = 0) -> bool:
    """Whether the function ``fn`` (or a Python function it names, up to 3 calls deep) reaches
    ``F.scaled_dot_product_attention``: the objects its code names are resolved (globals, closure cells and
    attribute chains of modules such as ``F.x`` / ``torch.nn.functional.x``) and compared by identity, so an
    import under another name counts and a comment or string does not."""
    fn = inspect.unwrap(getattr(fn, "__func__", fn))
    code = getattr(fn, "__code__", None)
    if code is None or id(code) in seen or depth > 3:
        return False
    seen.add(id(code))
    glb = getattr(fn, "__globals__", {})
    cells = [c.cell_contents for c in (getattr(fn, "__closure__", None) or ()) if _has_contents(c)]
    for co in _code_objects(code):
        names = set(co.co_names)
        values = [glb[n] for n in names if n in glb] + cells
        frontier = list(values)
        for _ in range(3):  # attribute chains through modules: torch -> nn -> functional -> sdpa
            nxt = []
            for v in frontier:
                if id(v) in _SDPA_IDS:
                    return True
                if inspect.ismodule(v):
                    nxt += [getattr(v, n) for n in names if hasattr(v, n)]
            frontier = nxt
        for v in values:  # Python helpers the code names (not torch's own)
            if inspect.isfunction(v) and not (v.__module__ or "").startswith("torch"):
                if _refers_to_sdpa(v, seen, depth + 1):
                    return True
    return False


def _has_contents(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:  # an empty cell
        return False
    return True


def _calls_sdpa(model: nn.Module) -> bool:
    """Whether some module of ``model`` computes attention with ``F.scaled_dot_product_attention``: declared
    (a class attribute ``seqpar_attention = "sdpa"``), or found structurally in what its methods call
    (:func:`_refers_to_sdpa`: the objects the code names, resolved; never the source text)."""
    seen: set[int] = set()
    for m in model.modules():
        if getattr(type(m), "seqpar_attention", None) == "sdpa":
            return True
        for cls in type(m).__mro__:
            if (cls.__module__ or "").startswith("torch."):
                continue  # nn.Module's own methods
            for fn in vars(cls).values():
                if inspect.isfunction(fn) and _refers_to_sdpa(fn, seen):
                    return True
    return False


def mixer_findings(model: nn.Module, kind: ModelKind) -> tuple[list[Finding], list[Finding]]:
    """(the sequence mixers a per-module wrapper takes, everything else sequence parallelism does not cover):
    :func:`seqpar.passes.mixers.split_takeable` with the model kind's notion of "holds seqpar's attention"."""
    if kind == "hf":
        return split_takeable(model, architecture_problems(model, hf_model=True), holds_interface_attention)
    return split_takeable(model, find_mixers(model), _calls_sdpa)


def _refuse_mixers(model: nn.Module, kind: ModelKind, mixers: str) -> None:
    taken, rest = mixer_findings(model, kind)
    if mixers != "refuse":
        refuse_unsupported(model, rest)
        return
    problems = architecture_problems(model, hf_model=True) if kind == "hf" else find_mixers(model)
    hint = (f"Way out (mixers='refuse'): parallelize(..., mixers='auto') takes {', '.join(f.path for f in taken[:4])}"
            f"{' ...' if len(taken) > 4 else ''} (state passing where proven, else the mixer on the gathered "
            f"sequence)." if taken else "")
    refuse_unsupported(model, problems, hint=hint)


def model_kind(model: nn.Module, mixers: str = "refuse") -> ModelKind:
    """"hf" or "sdpa", or a refusal that says why, before any communication.

    ``TypeError``: not a module, or no attention seqpar takes over (``nn.MultiheadAttention``, no SDPA call).
    :class:`~seqpar.passes.mixers.ArchitectureNotSupported` (a ``NotImplementedError``, also a ``TypeError``):
    the model has something sequence parallelism does not cover yet, each named with its path and class
    (:mod:`seqpar.passes.mixers`): a sequence mixer besides attention (conv1d, SSM, linear attention,
    recurrence) that no per-module path takes (all of them with ``mixers="refuse"``), attention computed
    outside transformers' AttentionInterface, ALiBi.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if hf.is_hf_model(model):
        _refuse_mixers(model, "hf", mixers)
        if not hf.supports_attention_interface(model):
            raise ArchitectureNotSupported(
                f"seqpar.parallelize: {type(model).__name__} does not dispatch attention through transformers' "
                f"AttentionInterface (its modeling module {type(model).__module__} computes attention in its own "
                f"code; transformers' _can_set_attn_implementation() is False), so seqpar cannot take it over. "
                f"Way out: a model class whose attention uses the interface (most recent decoder-only classes)")
        return "hf"
    if any(isinstance(m, nn.MultiheadAttention) for m in model.modules()):
        raise TypeError("model uses nn.MultiheadAttention, which seqpar cannot shard; call "
                        "torch.nn.functional.scaled_dot_product_attention instead")
    if not _calls_sdpa(model):
        raise TypeError(f"model ({type(model).__name__}) has no supported attention: seqpar takes over Hugging Face "
                        f"models using AttentionInterface and models calling "
                        f"torch.nn.functional.scaled_dot_product_attention")
    _refuse_mixers(model, "sdpa", mixers)
    return "sdpa"


def check(model: nn.Module, mesh, *, layout: str, method: str, fsdp: bool, checkpoint: bool,
          compile: bool = False, backend: str = "auto", loss: str = "auto",
          loss_chunk: int | None = None,
          fsdp_options: FSDPOptions = FSDPOptions(), mlp: str = "auto", mlp_chunk: int | None = None,
          offload: str = "none", mixers: str = "refuse") -> tuple[int, ModelKind, list[nn.Module], list[Finding]]:
    """-> (dp, model kind, blocks, the sequence mixers taken); raises ValueError / TypeError naming what to
    change."""
    dp, _ = check_mesh(mesh)
    check_choice("layout", layout, LAYOUT_CHOICES)
    check_choice("method", method, METHOD_CHOICES)  # "auto": resolved per shape by seqpar.attention
    check_choice("backend", backend, BACKENDS)
    check_loss(loss, loss_chunk)  # the chunked LM head + loss (passes/lm_loss.py)
    for name, flag in (("fsdp", fsdp), ("checkpoint", checkpoint), ("compile", compile)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool (True or False), got {type(flag).__name__} {flag!r}")
    check_mlp(mlp, mlp_chunk, compile)  # tiled MLP (passes/tiled_mlp.py)
    check_offload(offload, checkpoint, compile)  # checkpoint offload (passes/offload.py)
    check_mixers(mixers)  # sequence mixers besides attention (passes/sequence_mixers.py)
    kind = model_kind(model, mixers)
    taken = mixer_findings(model, kind)[0] if mixers != "refuse" else []
    if compile and taken:
        raise ValueError(f"compile=True with sequence mixers besides attention ({', '.join(f.path for f in taken[:3])}"
                         f"{' ...' if len(taken) > 3 else ''}) is not supported: their gather / state-passing calls "
                         f"communicate from Python inside the block, which torch.compile does not trace. Pass "
                         f"compile=False")
    check_fsdp_options(model, fsdp, fsdp_options)  # precision / reshard / fsdp_offload (their values: FSDPOptions)
    if compile and checkpoint and kind == "sdpa":
        raise ValueError("compile=True with checkpoint=True is not supported for plain PyTorch models: inside a "
                         "compiled activation checkpoint the override that turns F.scaled_dot_product_attention "
                         "into seqpar's does not apply, so the result would be wrong. Use one of the two, or a "
                         "Hugging Face model (its attention is registered, not overridden)")
    blocks = find_blocks(model)
    if (fsdp or checkpoint or compile) and not blocks:
        flags = " and ".join(f"{n}=False" for n, f in (("fsdp", fsdp), ("checkpoint", checkpoint),
                                                       ("compile", compile)) if f)
        raise TypeError(f"model ({type(model).__name__}) has no nn.ModuleList of blocks to shard/checkpoint/compile "
                        f"per block: pass {flags}, or keep the blocks in an nn.ModuleList")
    if fsdp:
        fsdp_units(model, blocks)  # parameters shared between blocks: grouped units, or refused by name
    return dp, kind, blocks, taken
