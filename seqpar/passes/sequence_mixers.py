"""Pass mixers (``mixers="auto" | "state" | "gather"``): every sequence mixer besides attention made exact.

:mod:`seqpar.passes.mixers` finds the modules that mix tokens outside seqpar's attention (a Mamba
mixer, a short conv, a gated DeltaNet, an mLSTM block, ...); the check pass refuses those no
per-module wrapper can take. Each one taken gets its ``forward`` wrapped (an instance attribute, like
the tiled MLP: the module's hooks stay outside) and runs one of two paths:

- **gather** (:mod:`seqpar.mixing.gather`): every tensor argument of shape ``(B, S_local, ...)`` is
  all-gathered into the whole sequence in global order, the unmodified module runs on it, and each
  rank keeps its own tokens of every ``(B, S, ...)`` output (in tuples and ``ModelOutput``s too).
  Exact for any causal mixer; it costs the layer's activations O(S) and its compute P times;
- **state** (:mod:`seqpar.mixing.base`): a state-passing adapter of :data:`seqpar.mixing.adapters.ADAPTERS`
  runs the module's own computation on this rank's runs with halos and entry states from the other
  ranks (O(S/P) activations, a fixed-size exchange). An adapter is used only where a probe at
  ``parallelize`` proves it equal to the module (one process, no communication: a random input of 32
  tokens cut into 4 runs, fp32, output and input gradient within ``rel <= 1e-5``).

``"auto"``: state passing where an adapter is proven (the ``striped`` layout: gather, every token being
its own run there) and, per call shape, :func:`seqpar.plan_mixers.choose_mixer` predicts it no slower than
gather (one rank, tiny local lengths where the fixed cost of the summaries dominates: gather; kinds the cost
model does not cover keep the proven adapter), else gather, and gather for a call the adapter refuses
with ``NotImplementedError`` (document boundaries it cannot reset at); ``"state"``: state passing, or
``ValueError`` naming each mixer without a proven adapter; ``"gather"``: gather everywhere; ``"refuse"``: no
mixer is taken (the check pass refuses them by name).

Note
----
What a gathered mixer receives and returns, per rank (P = 4, S = 40, S_local = 10)::

    argument                               on the gathered call
    hidden_states (B, 10, H)          ->   (B, 40, H), global order
    position_ids (B, 10)              ->   (B, 40), the global positions (packed documents restart)
    attention_mask (B, 10) all ones   ->   (B, 40) ones;  with zeros (padding): refused
    attention_mask MaskPlan (seqpar's hook: a causal mask by global position)  ->  None (what a causal
                                           mixer reads of a causal mask: nothing; windows/chunks refused)
    cache_position arange(10)         ->   arange(40)      (no cache: the positions of the whole call)
    cu_seq_lens_q/k (global offsets)  ->   as they are     (already global)
    a cache / past state / object     ->   refused by name
    output (B, 40, H)                 ->   (B, 10, H) this rank's tokens;  other outputs as they are

The batch's document offsets (``cu_seq_lens_q`` of :func:`seqpar.shard_batch`), which the ``packed``
layout's permutation and the state contexts need, are recorded on the Runtime at the model's forward
pre-hook and kept in a checkpointed block's frame for its recomputation (``Runtime.documents``).
"""

from __future__ import annotations

import copy
import dis
import functools
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch
from torch import nn

from seqpar.mixing.base import MIXER_MODES, LocalContext, StateAdapter
from seqpar.mixing.gather import gather_sequence, keep_local
from seqpar.passes.mixers import Finding
from seqpar.passes.runtime import Runtime

__all__ = ["MixerPlan", "check_mixers", "plan_mixers", "sequence_mixer_pass", "mixer_plans", "probe_adapter",
           "unread_parameters",
           "PROBE_TOKENS", "PROBE_CUTS", "PROBE_REL"]

PROBE_TOKENS, PROBE_CUTS, PROBE_REL = 32, (5, 14, 23), 1e-5
_ATTR = "_seqpar_mixers"  # the model attribute holding its MixerPlans (read by mixer_plans)
_SCALARS = (bool, int, float, str, torch.dtype, torch.device)
_GLOBAL_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")  # already global


def check_mixers(mixers: object) -> None:
    """The option of this pass, before any communication (``ValueError`` naming it and the choices)."""
    if not isinstance(mixers, str) or mixers not in MIXER_MODES:
        raise ValueError(f"mixers must be one of {MIXER_MODES} (state passing where proven else gather / state "
                         f"passing or refused / gather everywhere / refuse every sequence mixer), got {mixers!r}")


@dataclass
class MixerPlan:
    """How one sequence mixer runs under parallelize."""

    path: str
    module: nn.Module
    how: Literal["gather", "state"]
    adapter: StateAdapter | None = None  # the proven adapter (how == "state")
    why: str = ""  # why this path (what the probes said)
    calls: int = 0  # calls that ran this way (bookkeeping for tests and users)
    fallbacks: int = 0  # mixers="auto": state calls the adapter refused (NotImplementedError), run gathered instead
    shape: Any = None  # the cost model's seqpar.plan_mixers.MixerShape of the module (None: a kind it does not cover)
    choices: dict = field(default_factory=dict)  # mixers="auto": (B, S_local, dtype, machine) -> "state" | "gather"
    gathered: int = 0  # mixers="auto": calls the cost model sent to the gather path (the adapter proven)


# ----------------------------------------------------------------------------- the probe of an adapter


def _tensors(out: Any) -> list[torch.Tensor]:
    """The tensors of an output structure, in order (tuples, lists, dicts / ModelOutputs)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _tensors(o)]
    return []


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def _hidden_sizes(model: nn.Module, module: nn.Module, adapter: StateAdapter | None = None) -> list[int]:
    """Candidate widths of the module's input: the adapter's ``input_width(module)`` where it has one (Inkling's
    key / value convolutions are narrower than the hidden size), else the config's hidden size, then the
    module's first Linear's input."""
    width = getattr(adapter, "input_width", None)
    if width is not None:
        try:
            w = width(module)
        except Exception:  # noqa: BLE001 - a module the adapter cannot size: the generic candidates
            w = None
        if isinstance(w, int) and not isinstance(w, bool) and w > 0:
            return [w]
    out: list[int] = []
    cfg = getattr(model, "config", None)
    if cfg is not None:
        text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        h = getattr(text, "hidden_size", None)
        if isinstance(h, int) and not isinstance(h, bool):
            out.append(h)
    lin = next((m for m in module.modules() if isinstance(m, nn.Linear)), None)
    if lin is not None and lin.in_features not in out:
        out.append(lin.in_features)
    return out


def _probe_arguments(module: nn.Module, x: torch.Tensor) -> tuple[tuple, dict]:
    """The arguments after ``x`` a probe call needs: required ones (``position_ids``: ``arange(T)``, others
    None, as a single document without a mask has them) and ``use_cache=False`` where the forward takes it."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return (), {}
    rest = []
    for p in params:
        if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) or p.default is not p.empty:
            break
        rest.append(torch.arange(x.shape[1], device=x.device)[None] if p.name == "position_ids" else None)
    kwargs = {"use_cache": False} if any(p.name == "use_cache" for p in params) else {}
    return tuple(rest), kwargs


def probe_adapter(adapter: StateAdapter, module: nn.Module, hidden: int) -> str | None:
    """None if ``adapter.forward(module, LocalContext(32, cuts=(5, 14, 23)), (x, ...), {...})`` equals
    ``module(x, ...)`` on a random ``x`` (1, 32, hidden) in fp32 (outputs and the gradients of ``x`` and of the
    other floating inputs within ``rel <= 1e-5``); else what the probe saw. ``...``: the adapter's
    ``probe_inputs(module, x)`` where it has one (Inkling2's dynamic conv needs ``dynamic_input``), else
    :func:`_probe_arguments`. One process, no communication; parameters' ``.grad`` are not touched."""
    p = next(module.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    if p is not None and p.device.type == "meta":
        return "the module is on the meta device (no values to probe)"
    if any(q.is_floating_point() and q.dtype != torch.float32 for q in module.parameters()):
        module = copy.deepcopy(module).float()
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(1, PROBE_TOKENS, hidden, generator=g, device=device)
    devices = [device] if device.type == "cuda" else []

    def inputs(xi: torch.Tensor) -> tuple[tuple, dict, list[torch.Tensor]]:
        """The call's arguments on ``xi`` and its differentiable inputs (``xi``, then the floating tensors the
        adapter's ``probe_inputs`` adds, e.g. Inkling2's ``dynamic_input``, made leaves)."""
        if getattr(adapter, "probe_inputs", None) is None:
            rest, kwargs = _probe_arguments(module, xi)
            return (xi, *rest), dict(kwargs), [xi]
        args, kwargs = adapter.probe_inputs(module, xi)
        leaves = [xi]

        def leaf(v):
            if isinstance(v, torch.Tensor) and v is not xi and v.is_floating_point():
                v = v.detach().clone().requires_grad_(True)
                leaves.append(v)
            return v

        args = tuple(leaf(v) for v in args)
        kwargs = {k: leaf(v) for k, v in kwargs.items()}
        return args, kwargs, leaves

    def run(fn):
        args, kwargs, leaves = inputs(x.clone().requires_grad_(True))
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(0)
            out = fn(args, kwargs)
        ts = [t for t in _tensors(out) if t.is_floating_point()]
        w = torch.Generator(device=device).manual_seed(1)
        loss = sum((t.float() * torch.randn(t.shape, generator=w, device=device)).sum() for t in ts)
        dx = torch.autograd.grad(loss, leaves, allow_unused=True) if ts and loss.requires_grad else None
        return [t.detach() for t in ts], dx

    try:
        want, dwant = run(lambda a, k: module(*a, **k))
    except Exception as e:  # noqa: BLE001 - the module cannot run on the probe input
        return f"the module does not run on a (1, {PROBE_TOKENS}, {hidden}) input: {type(e).__name__}: {e}"[:300]
    try:
        got, dgot = run(lambda a, k: adapter.forward(module, LocalContext(PROBE_TOKENS, PROBE_CUTS), a, k))
    except Exception as e:  # noqa: BLE001 - an adapter that fails on the probe is not used
        return f"adapter {adapter.name} fails on the probe: {type(e).__name__}: {e}"[:300]
    if len(got) != len(want) or any(a.shape != b.shape for a, b in zip(got, want)):
        return (f"adapter {adapter.name} returns tensors of shapes {[tuple(t.shape) for t in got]}, the module "
                f"{[tuple(t.shape) for t in want]}")
    rels = [_rel(a, b) for a, b in zip(got, want)]
    if dwant is not None:
        if dgot is None or any(g is None for g, w in zip(dgot, dwant) if w is not None):
            return f"adapter {adapter.name} gives no input gradient"
        rels += [_rel(g, w) for g, w in zip(dgot, dwant) if w is not None]
    worst = max(rels, default=0.0)
    if not math.isfinite(worst) or worst > PROBE_REL:
        return f"adapter {adapter.name} differs from the module on the probe (rel {worst:.2e} > {PROBE_REL:g})"
    return None


# ----------------------------------------------------------------------------- the plan


def _adapters() -> tuple[StateAdapter, ...]:
    from seqpar.mixing.adapters import ADAPTERS

    return ADAPTERS


def _context_available() -> str | None:
    try:
        from seqpar.mixing.context import make_context  # noqa: F401
    except ImportError as e:
        return f"the distributed context (seqpar.mixing.context.make_context) is not available: {e}"
    return None


def _plan_one(model: nn.Module, f: Finding, module: nn.Module, mode: str, layout: str) -> tuple[MixerPlan, str]:
    """The plan of one mixer, and why state passing was not chosen ("" when it was, or not tried)."""
    if mode == "gather":
        return MixerPlan(f.path, module, "gather", why="mixers='gather'"), ""
    if layout == "striped":
        return MixerPlan(f.path, module, "gather", why="layout='striped': every token is its own run"), \
            "layout='striped' deals every token to another rank, so every token is its own run (use 'zigzag', " \
            "'contiguous' or 'packed' for state passing)"
    missing = _context_available()
    if missing is not None:
        return MixerPlan(f.path, module, "gather", why=missing), missing
    tried = []
    for adapter in _adapters():
        try:
            if not adapter.matches(module):
                continue
        except Exception as e:  # noqa: BLE001 - a structural test that fails does not match
            tried.append(f"{adapter.name}.matches raised {type(e).__name__}: {e}")
            continue
        whys = [probe_adapter(adapter, module, h) for h in _hidden_sizes(model, module, adapter)] or ["no input width"]
        if any(w is None for w in whys):
            from seqpar.plan_mixers import mixer_shape

            return MixerPlan(f.path, module, "state", adapter, why=f"adapter {adapter.name} proven by the probe",
                             shape=mixer_shape(module)), ""
        tried.append(whys[0])
    why = "; ".join(tried) if tried else "no state-passing adapter matches it"
    return MixerPlan(f.path, module, "gather", why=why), why


def plan_mixers(model: nn.Module, taken: list[Finding], mode: str, layout: str) -> list[MixerPlan]:
    """The plan of every taken mixer; ``mode="state"``: ``ValueError`` naming each mixer without a proven
    adapter and why. No communication (adapters are probed in this process)."""
    if mode == "refuse" or not taken:
        return []
    plans, refused = [], []
    for f in taken:
        plan, why = _plan_one(model, f, model.get_submodule(f.path), mode, layout)
        plans.append(plan)
        if mode == "state" and plan.how != "state":
            refused.append(f"{f.path} ({f.cls}): {why}")
    if refused:
        raise ValueError("mixers='state': these sequence mixers have no state-passing adapter proven equal to them: "
                         + "; ".join(refused) + ". Pass mixers='auto' (state passing where proven, the gather path "
                         "elsewhere) or mixers='gather'")
    return plans


# ----------------------------------------------------------------------------- the gather call


class _Refused(ValueError):
    pass


def _refuse(plan: MixerPlan, what: str) -> _Refused:
    return _Refused(f"seqpar sequence mixer {plan.path} ({type(plan.module).__name__}) on the gathered sequence: "
                    f"{what}")


def _is_cache(v: Any) -> bool:
    try:
        from transformers.cache_utils import Cache
    except ImportError:
        return False
    return isinstance(v, Cache)


def unread_parameters(fn: Callable) -> tuple[tuple[str, ...], frozenset[str]]:
    """(the positional parameter names of ``fn`` after ``self``, the parameters its code never reads): a
    parameter no instruction of the (unwrapped) function loads, and no inner function captures, cannot
    change what it computes (RecurrentGemma's recurrent block takes the layer's attention mask and ignores
    it). Unknown code: nothing is unread."""
    code = getattr(inspect.unwrap(getattr(fn, "__func__", fn)), "__code__", None)
    return ((), frozenset()) if code is None else _unread(code)


@functools.lru_cache(maxsize=256)
def _unread(code) -> tuple[tuple[str, ...], frozenset[str]]:
    params = code.co_varnames[:code.co_argcount + code.co_kwonlyargcount]
    loaded: set[str] = set(code.co_cellvars)
    for ins in dis.get_instructions(code):
        if ins.opname.startswith("LOAD_"):
            names = ins.argval if isinstance(ins.argval, tuple) else (ins.argval,)
            loaded.update(n for n in names if isinstance(n, str))
    positional = code.co_varnames[:code.co_argcount]
    return tuple(positional[1:] if positional[:1] == ("self",) else positional), \
        frozenset(p for p in params if p not in loaded and p != "self")


class _Arguments:
    """Checks a call's arguments (first, every rank, before any communication), then maps them."""

    def __init__(self, plan: MixerPlan, B: int, n: int, S: int, unread: frozenset[str] = frozenset()):
        self.plan, self.B, self.n, self.S, self.unread = plan, B, n, S, unread

    def check(self, name: str, v: Any) -> None:
        from seqpar.passes.hf_masks import MaskPlan

        if v is None or isinstance(v, _SCALARS) or name in _GLOBAL_KWARGS or name in self.unread:
            return
        if isinstance(v, MaskPlan):
            if not v.causal or v.window_size != (-1, -1) or v.chunk is not None:
                raise _refuse(self.plan, f"{name} is a {v.what or 'mask'} that is not plainly causal "
                                         f"(window {v.window_size}, chunk {v.chunk}); the mixer would read it as a "
                                         f"mask tensor seqpar never builds")
            return
        if isinstance(v, (tuple, list)):
            for i, x in enumerate(v):
                self.check(f"{name}[{i}]", x)
            return
        if _is_cache(v) or name in ("cache", "past_key_values", "cache_params", "state", "past_key_value"):
            raise _refuse(self.plan, f"{name} ({type(v).__name__}) is a cache / past state, which a sharded "
                                     f"sequence does not have; call the model with use_cache=False and no cache")
        if not isinstance(v, torch.Tensor):
            raise _refuse(self.plan, f"{name} is a {type(v).__name__}, which seqpar cannot map onto the gathered "
                                     f"sequence (tensors, tuples of tensors and plain values only)")
        if self._sequence(v):
            if v.ndim == 2 and "mask" in name and not v.is_floating_point() and not bool(v.all()):
                raise _refuse(self.plan, f"{name} is a padding mask with zeros; build the batch with "
                                         f"seqpar.shard_batch, which turns padding into packed documents")
            return
        if name == "cache_position" and v.ndim == 1 and v.shape[0] == self.n:
            if not torch.equal(v.cpu(), torch.arange(self.n, dtype=v.dtype)):
                raise _refuse(self.plan, f"cache_position={v.tolist()[:6]}... does not start at 0 (a cache); call the "
                                         f"model with use_cache=False and no cache")
            return
        if self.n in tuple(v.shape):
            raise _refuse(self.plan, f"{name} has shape {tuple(v.shape)}, with the local length {self.n} elsewhere "
                                     f"than dim 1 of a (B={self.B}, S_local={self.n}, ...) tensor, so seqpar cannot "
                                     f"tell how to gather it")

    def _sequence(self, v: torch.Tensor) -> bool:
        return v.ndim >= 2 and v.shape[0] == self.B and v.shape[1] == self.n

    def map(self, name: str, v: Any, gather: Callable[[torch.Tensor], torch.Tensor]) -> Any:
        from seqpar.passes.hf_masks import MaskPlan

        if name in self.unread:
            return v  # never read by the module
        if isinstance(v, MaskPlan):
            return None  # a causal mask: what a causal mixer reads of it is nothing (checked above)
        if isinstance(v, (tuple, list)):
            return type(v)(self.map(f"{name}[{i}]", x, gather) for i, x in enumerate(v))
        if not isinstance(v, torch.Tensor) or name in _GLOBAL_KWARGS:
            return v
        if self._sequence(v):
            return gather(v)
        if name == "cache_position" and v.ndim == 1 and v.shape[0] == self.n:
            return torch.arange(self.S, dtype=v.dtype, device=v.device)
        return v


def _keep(plan: MixerPlan, out: Any, B: int, S: int, keep: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """This rank's tokens of every (B, S, ...) tensor of ``out``; other values as they are."""
    if isinstance(out, torch.Tensor):
        if out.ndim >= 2 and out.shape[0] == B and out.shape[1] == S:
            return keep(out)
        if S in tuple(out.shape):
            raise _refuse(plan, f"it returned a tensor of shape {tuple(out.shape)} with the sequence (S={S}) "
                                f"elsewhere than dim 1 of (B={B}, S, ...), which seqpar cannot split into the ranks' "
                                f"tokens")
        return out
    if isinstance(out, (tuple, list)) and not hasattr(out, "_fields"):
        return type(out)(_keep(plan, o, B, S, keep) for o in out)
    if isinstance(out, dict):
        new = copy.copy(out)  # a ModelOutput keeps its class and field order
        for k in list(out.keys()):
            new[k] = _keep(plan, out[k], B, S, keep)
        return new
    return out


def _hidden_states(plan: MixerPlan, args: tuple, kwargs: dict) -> torch.Tensor:
    """The call's first argument (or ``hidden_states=``), the (B, S_local, ...) hidden states, or refused."""
    x = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(x, torch.Tensor) or x.ndim < 2:
        raise _refuse(plan, f"its first argument is {type(x).__name__}, not the (B, S_local, ...) hidden states")
    return x


def _gather_call(plan: MixerPlan, rt: Runtime, inner: Callable, args: tuple, kwargs: dict):
    x = _hidden_states(plan, args, kwargs)
    B, n = x.shape[0], x.shape[1]
    S = n * rt.world
    names, unread = unread_parameters(inner)
    a = _Arguments(plan, B, n, S, unread)
    arg_names = [names[i] if i < len(names) else f"argument {i}" for i in range(len(args))]
    for name, v in zip(arg_names, args):
        a.check(name, v)
    for k, v in kwargs.items():
        a.check(k, v)
    cu = rt.documents()

    def gather(t):
        return gather_sequence(t, rt.group, rt.layout, cu)

    args_g = tuple(a.map(name, v, gather) for name, v in zip(arg_names, args))
    kwargs_g = {k: a.map(k, v, gather) for k, v in kwargs.items()}
    out = inner(*args_g, **kwargs_g)
    plan.calls += 1
    return _keep(plan, out, B, S, lambda t: keep_local(t, rt.group, rt.layout, cu))


def _state_call(plan: MixerPlan, rt: Runtime, inner: Callable, args: tuple, kwargs: dict, fallback: bool):
    """The adapter on this rank's runs. ``fallback`` (``mixers="auto"``): a call the adapter refuses with
    ``NotImplementedError`` (documents a Mamba2 adapter cannot reset at, ...) runs on the gathered sequence
    instead; adapters refuse from their arguments, the same on every rank, before communicating."""
    from seqpar.mixing.context import make_context

    x = _hidden_states(plan, args, kwargs)
    ctx = make_context(rt.group, rt.layout, x.shape[1] * rt.world, rt.documents())
    try:
        out = plan.adapter.forward(plan.module, ctx, args, kwargs)
    except NotImplementedError:
        if not fallback:
            raise
        plan.fallbacks += 1
        return _gather_call(plan, rt, inner, args, kwargs)
    plan.calls += 1
    return out


def _auto_path(plan: MixerPlan, rt: Runtime, args: tuple, kwargs: dict) -> str:
    """``mixers="auto"``: the path of a call of a proven adapter, by the cost model at the call's shape (the
    group's machine if it has one, else the device's nominal one), remembered per shape. The same on every
    rank (the same shapes and machine), no communication."""
    from seqpar.plan_mixers import choose_mixer
    from seqpar.state import group_state

    x = args[0] if args else kwargs.get("hidden_states")
    if plan.shape is None or not isinstance(x, torch.Tensor) or x.ndim < 2:
        return "state"
    machine = group_state(rt.group).machine
    key = (x.shape[0], x.shape[1], x.dtype, machine)
    if key not in plan.choices:
        if len(plan.choices) >= 64:  # a model has a few shapes per step
            plan.choices.clear()
        plan.choices[key] = choose_mixer(plan.shape, x.shape[1], rt.world, layout=rt.layout, machine=machine,
                                         device=x.device.type, batch=x.shape[0], dtype_bytes=x.element_size())
    return plan.choices[key]


def _wrap(plan: MixerPlan, rt: Runtime, mode: str) -> None:
    inner = plan.module.forward  # the bound forward; the module's hooks stay outside

    def forward(*args, _inner=inner, **kwargs):
        if plan.how == "gather":
            return _gather_call(plan, rt, _inner, args, kwargs)
        if mode == "auto" and _auto_path(plan, rt, args, kwargs) == "gather":
            plan.gathered += 1
            return _gather_call(plan, rt, _inner, args, kwargs)
        return _state_call(plan, rt, _inner, args, kwargs, fallback=mode == "auto")

    plan.module.forward = forward


# ----------------------------------------------------------------------------- the pass


def sequence_mixer_pass(model: nn.Module, plans: list[MixerPlan], rt: Runtime, kind: str, mode: str = "auto") -> None:
    """Wrap each planned mixer's forward; record the batch's documents on ``rt`` at the model's forward
    (Hugging Face models: ``cu_seq_lens_q``; plain models: the loss pass does)."""
    object.__setattr__(model, _ATTR, list(plans))  # not a submodule: invisible to state_dict, FSDP
    if not plans:
        return
    for plan in plans:
        _wrap(plan, rt, mode)
    if kind == "hf":
        def pre(module, args, kwargs):
            rt.cu_seqlens = kwargs.get("cu_seq_lens_q")  # cleared by the loss pass's post-hook

        model.register_forward_pre_hook(pre, with_kwargs=True)


def mixer_plans(model: nn.Module) -> list[MixerPlan]:
    """The sequence mixers of a parallelized model: path, path taken ("gather" / "state"), why, calls."""
    return list(getattr(model, _ATTR, []))
