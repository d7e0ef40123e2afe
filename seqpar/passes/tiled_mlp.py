"""Pass mlp (``mlp="auto"`` / ``"tiled"``): each block's MLP run over chunks of tokens, recomputed in backward.

A per-token module (the MLP, a MoE's experts) called on ``x  # (..., T, H)`` holds intermediates of
``T x intermediate_size`` per projection until the backward. Tiled, it keeps only its input::

    forward  (no grad)   x = [x_0 | x_1 | ... | x_n-1]  (chunks of dim -2)  ->  cat(f(x_i))
                         (each chunk's intermediates freed before the next)
    backward (per chunk) y_i = f(x_i) again, with grad;  autograd.grad(y_i, (x_i, params), dy_i)
                         dx = cat(dx_i);  d params = sum_i d params_i, returned once

so what it holds is bounded by one chunk. Parameter gradients are summed here and handed to autograd
once, as gradients of the :class:`_TiledFunction`'s inputs (the module's parameters at call time), so
a post-accumulate-grad hook (``fsdp=False``'s all-reduce) or FSDP2's post-backward sees one
accumulation, exactly as without tiling. Under FSDP2 the parameters at call time are the block's
unsharded ones, and the backward's recomputation runs inside the block's backward, where FSDP2 has
unsharded them again (the same tensors). Under ``checkpoint=True`` the tiled function is part of the
checkpointed block: the recomputation runs its (chunked, no-grad) forward again, which saves the same
input. The module's RNG state at call time is restored for the backward's recomputation (dropout
draws the same masks).

Which modules: in each transformer block, the child named ``mlp``, ``feed_forward``,
``block_sparse_moe`` or ``ffn``. Each is *proven* per-token at ``parallelize`` by a probe (no grad,
random input of 2 x 9 tokens, tokens of the first argument replaced one at a time: only that
token's output may change), never assumed; a module that fails it is refused by ``mlp="tiled"`` (a
``ValueError`` naming it and what the probe saw) and left whole by ``mlp="auto"``. A module whose
submodule's output another part of the model reads (transformers' recorded outputs, e.g. a MoE
router's logits for the load-balancing loss; or any forward hook present at ``parallelize``) is not
tiled whole, since the reader would see chunks without gradient: its children are, each proven
per-token with the arguments it really gets (a MoE's ``experts`` with hidden states, top-k indices
and weights: every tensor argument of the same leading shape is chunked alongside, and the
routing weights get their gradient back).

When (``mlp="auto"``, per call, from shapes): the probe measures the bytes one token's forward saves
for backward (``b``, the parameters excluded). A call on ``N`` tokens of element size ``e`` (probe:
``e0``) is tiled when ``N * b * e / e0 > 64 MiB``, in chunks of ``64 MiB / (b * e / e0)`` tokens
(``mlp_chunk`` tokens if given; a chunk is whole rows of dim -2, ``max(1, chunk // rows)`` per batch
row). ``mlp="tiled"``: every call, the same chunks. Under ``torch.compile`` the module runs whole
(``mlp="tiled"`` with ``compile=True`` is refused at ``parallelize``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Literal, get_args

import torch
from torch import nn

__all__ = ["MLPMode", "MLP_MODES", "MLP_NAMES", "AUTO_BYTES", "TiledMLP", "check_mlp", "tiled_mlp_pass",
           "tiled_modules", "tile", "probe"]

MLPMode = Literal["auto", "tiled", "full"]  # parallelize(mlp=...): tiled where it pays / always / never
MLP_MODES: tuple[str, ...] = get_args(MLPMode)

MLP_NAMES = ("mlp", "feed_forward", "block_sparse_moe", "ffn")  # a block's per-token child, by attribute
AUTO_BYTES = 64 * 2**20  # mlp="auto": tile a call whose intermediates exceed this; chunks stay under it
_PROBE_ROWS, _PROBE_TOKENS = 2, 9
_ATTR = "_seqpar_tiled_mlp"  # the model attribute holding its TiledMLPs (read by tiled_modules)


class NotPerToken(ValueError):
    pass


def check_mlp(mlp: object, mlp_chunk: object, compile: bool) -> None:
    """The options of this pass, before any communication (``ValueError`` / ``TypeError`` naming them)."""
    if not isinstance(mlp, str) or mlp not in MLP_MODES:
        raise ValueError(f"mlp must be one of {MLP_MODES}, got {mlp!r}")
    if mlp_chunk is not None:
        if isinstance(mlp_chunk, bool) or not isinstance(mlp_chunk, int):
            raise TypeError(f"mlp_chunk must be None or an int (tokens per chunk), got {type(mlp_chunk).__name__} "
                            f"{mlp_chunk!r}")
        if mlp_chunk < 1:
            raise ValueError(f"mlp_chunk must be >= 1 (tokens per chunk), got {mlp_chunk}")
        if mlp == "full":
            raise ValueError("mlp_chunk is given but mlp='full' never tiles: pass mlp='auto' or 'tiled', or drop "
                             "mlp_chunk")
    if mlp == "tiled" and compile:
        raise ValueError("mlp='tiled' with compile=True is not supported: the tiled MLP's backward re-runs the "
                         "module under autograd.grad, which torch.compile does not trace. Pass mlp='auto' (under "
                         "compile the MLP runs whole) or compile=False")


# ----------------------------------------------------------------------------- the autograd function


@dataclass
class _Call:
    """One tiled call: the module, how to rebuild its arguments from chunks, where its chunks are."""

    module: nn.Module
    fn: Callable  # the module's own forward
    args: list  # positional arguments, chunked tensors replaced by None
    kwargs: dict
    slots: list  # where the chunked tensors go: ("a", i) or ("k", name)
    bounds: list[tuple[int, int]]  # (start, length) along dim -2
    n: int  # number of chunked tensors (the first inputs of the function)
    rng: tuple | None = None  # (cpu state, (device, state) | None) at call time, when the module trains
    params: list = field(default_factory=list)

    def run(self, pieces) -> torch.Tensor:
        args, kwargs = list(self.args), dict(self.kwargs)
        for (where, key), t in zip(self.slots, pieces):
            if where == "a":
                args[key] = t
            else:
                kwargs[key] = t
        out = self.fn(*args, **kwargs)
        if not isinstance(out, torch.Tensor):
            raise RuntimeError(f"seqpar tiled MLP: the module returned {type(out).__name__}, not a tensor "
                               f"(its probe at parallelize saw a tensor); pass mlp='full'")
        return out

    def chunk(self, tensors, i: int):
        start, length = self.bounds[i]
        return [t.narrow(-2, start, length) for t in tensors]


def _rng_state(device: torch.device):
    dev = None
    if device.type == "cuda":
        dev = (device, torch.cuda.get_rng_state(device))
    return torch.get_rng_state(), dev


def _restore_rng(state) -> None:
    cpu, dev = state
    torch.set_rng_state(cpu)
    if dev is not None:
        torch.cuda.set_rng_state(dev[1], dev[0])


class _TiledFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, call: _Call, *tensors):  # tensors: the n chunked inputs, then the parameters
        chunked = tensors[: call.n]
        with torch.no_grad():
            outs = [call.run(call.chunk(chunked, i)) for i in range(len(call.bounds))]
        for out, (start, length) in zip(outs, call.bounds):
            if out.dim() < 2 or out.shape[-2] != length:
                raise RuntimeError(f"seqpar tiled MLP: a chunk of {length} tokens gave an output of shape "
                                   f"{tuple(out.shape)} (dim -2 must be the tokens); pass mlp='full'")
        ctx.call = call
        ctx.save_for_backward(*chunked)  # only the input (under checkpoint=True: recomputed on demand)
        return torch.cat(outs, dim=-2) if len(outs) > 1 else outs[0]

    @staticmethod
    def backward(ctx, grad_out):
        call: _Call = ctx.call
        chunked = ctx.saved_tensors
        need_in = [ctx.needs_input_grad[1 + j] for j in range(call.n)]
        need_p = [ctx.needs_input_grad[1 + call.n + j] for j in range(len(call.params))]
        params = [p for p, need in zip(call.params, need_p) if need]
        now = {id(p) for p in call.module.parameters()}
        if any(id(p) not in now for p in params):
            raise RuntimeError("seqpar tiled MLP: the module's parameters in backward are not the tensors its forward "
                               "used (something swapped them in between), so their gradients cannot be recomputed; "
                               "pass mlp='full'")
        dparams: list[torch.Tensor | None] = [None] * len(params)
        dins: list[list[torch.Tensor]] = [[] for _ in range(call.n)]
        with torch.random.fork_rng(devices=[call.rng[1][0]] if call.rng and call.rng[1] else [],
                                   enabled=call.rng is not None):
            if call.rng is not None:
                _restore_rng(call.rng)
            for i in range(len(call.bounds)):
                pieces = [t.detach().requires_grad_(need) for t, need in zip(call.chunk(chunked, i), need_in)]
                with torch.enable_grad():
                    out = call.run(pieces)
                targets = [t for t, need in zip(pieces, need_in) if need] + params
                start, length = call.bounds[i]
                if not targets or not out.requires_grad:
                    grads = [None] * len(targets)
                else:
                    grads = torch.autograd.grad(out, targets, grad_out.narrow(-2, start, length), allow_unused=True)
                k = 0
                for j, (t, need) in enumerate(zip(pieces, need_in)):
                    if need:
                        dins[j].append(torch.zeros_like(t) if grads[k] is None else grads[k])
                        k += 1
                for j, g in enumerate(grads[k:]):
                    if g is not None:
                        dparams[j] = g if dparams[j] is None else dparams[j].add_(g)
                del out, grads, pieces
        din = [torch.cat(d, dim=-2) if need else None for d, need in zip(dins, need_in)]
        it = iter(dparams)
        dp = [next(it) if need else None for need in need_p]
        return (None, *din, *dp)


# ----------------------------------------------------------------------------- the per-module tiler


@dataclass
class TiledMLP:
    """The tiling of one module: its mode, chunk, and what its probe measured."""

    path: str
    module: nn.Module
    mode: str  # "auto" | "tiled"
    chunk: int | None  # tokens per chunk (mlp_chunk), None: from AUTO_BYTES
    bytes_per_token: float  # saved for backward by the whole module, per token, at probe_itemsize
    probe_itemsize: int
    calls: int = 0  # calls that ran tiled (bookkeeping for tests and users)

    def plan(self, x: torch.Tensor) -> list[tuple[int, int]] | None:
        """The chunks (start, length) along dim -2 of a call with first argument ``x``, or None (whole)."""
        if torch.compiler.is_compiling() or x.dim() < 2 or x.shape[-2] == 0:
            return None
        rows = math.prod(x.shape[:-2])
        tokens = rows * x.shape[-2]
        per_token = self.bytes_per_token * x.element_size() / self.probe_itemsize
        chunk = self.chunk if self.chunk is not None else max(1, int(AUTO_BYTES // max(per_token, 1.0)))
        if self.mode == "auto" and (tokens * per_token <= AUTO_BYTES or tokens <= chunk):
            return None
        length = max(1, chunk // max(rows, 1))
        T = x.shape[-2]
        return [(s, min(length, T - s)) for s in range(0, T, length)]

    def __call__(self, inner: Callable, args: tuple, kwargs: dict):
        if not args or not isinstance(args[0], torch.Tensor):
            return inner(*args, **kwargs)
        x = args[0]
        bounds = self.plan(x)
        if bounds is None:
            return inner(*args, **kwargs)
        lead = x.shape[:-1]
        args_l, kwargs_d, slots, chunked = list(args), dict(kwargs), [], []
        for where, key, v in [("a", i, a) for i, a in enumerate(args)] + [("k", k, v) for k, v in kwargs.items()]:
            if isinstance(v, torch.Tensor):
                if v.dim() == x.dim() and v.shape[:-1] == lead:
                    slots.append((where, key))
                    chunked.append(v)
                    if where == "a":
                        args_l[key] = None
                    else:
                        kwargs_d[key] = None
                elif v.requires_grad:
                    return inner(*args, **kwargs)  # a whole-sequence tensor that needs a gradient: not ours
        params = [p for p in self.module.parameters() if p.requires_grad]
        rng = _rng_state(x.device) if self.module.training else None
        call = _Call(self.module, inner, args_l, kwargs_d, slots, bounds, len(chunked), rng, params)
        self.calls += 1
        return _TiledFunction.apply(call, *chunked, *params)


def tile(module: nn.Module, tiler: TiledMLP) -> None:
    """``module.forward`` runs through ``tiler`` (an instance attribute: the module's hooks stay outside)."""
    inner = module.forward

    def forward(*args, _inner=inner, **kwargs):
        return tiler(_inner, args, kwargs)

    module.forward = forward


# ----------------------------------------------------------------------------- the probe


def _saved_bytes(fn: Callable, args: tuple, kwargs: dict, params: set[int]) -> int:
    """Bytes of the distinct tensors ``fn`` saves for backward (parameters excluded)."""
    seen: dict[tuple, int] = {}

    def pack(t):
        try:
            if id(t) not in params and t.data_ptr() not in params:
                key = (t.untyped_storage().data_ptr(), t.device)
                seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
        except (RuntimeError, NotImplementedError):  # no storage (a tensor subclass): counted by its size
            seen[(id(t), None)] = t.numel() * t.element_size()
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args, **kwargs)
    return sum(seen.values())


def probe(module: nn.Module, args: tuple, kwargs: dict) -> float:
    """Bytes saved for backward per token if ``module(*args, **kwargs)`` is per-token along dim -2 of
    ``args[0]``; else :class:`NotPerToken` saying what the probe saw. The module's buffers (running
    statistics, ...) and the global RNG are as before."""
    buffers = [(b, b.detach().clone()) for b in module.buffers()]
    try:
        return _probe(module, args, kwargs)
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)


def _probe(module: nn.Module, args: tuple, kwargs: dict) -> float:
    x = args[0]
    lead = x.shape[:-1]
    with torch.no_grad(), torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        def run(a0):
            torch.manual_seed(0)
            return module(a0, *args[1:], **kwargs)

        base = run(x)
        if not isinstance(base, torch.Tensor):
            raise NotPerToken(f"returns {type(base).__name__}, not a tensor")
        if base.shape[:-1] != lead:
            raise NotPerToken(f"maps an input of shape {tuple(x.shape)} to {tuple(base.shape)} (not one output "
                              f"per token)")
        if not bool(torch.isfinite(base).all()):
            raise NotPerToken("gives non-finite outputs on a random input")
        scale = base.abs().max().clamp_min(1e-30)
        tol = 64 * torch.finfo(base.dtype).eps * scale if base.dtype.is_floating_point else 0
        T = x.shape[-2]
        g = torch.Generator(device=x.device).manual_seed(1)
        for j in sorted({0, T // 2, T - 1}):  # token j of the first row only (rows must not mix either)
            xp = x.clone()
            row = xp.reshape(-1, T, x.shape[-1])[0]  # a view of the first row
            row[j] = torch.randn(row[j].shape, generator=g, device=x.device, dtype=torch.float32).to(x.dtype)
            moved = (run(xp) - base).abs().amax(dim=-1).reshape(-1, T) > tol  # (rows, T): outputs that changed
            moved[0, j] = False
            if bool(moved.any()):
                where = [(int(r), int(t)) for r, t in moved.nonzero()[:8]]
                raise NotPerToken(f"changing token {j} of {T} (row 0) also changed the output at (row, token) "
                                  f"{where} (the module mixes tokens)")
    pids = {id(p) for p in module.parameters()} | {p.data_ptr() for p in module.parameters()}
    x_grad = x.detach().requires_grad_(x.is_floating_point())
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        nbytes = _saved_bytes(module, (x_grad, *args[1:]), kwargs, pids)
    return nbytes / max(1, math.prod(lead))


# ----------------------------------------------------------------------------- the pass


def _recorded_classes(model: nn.Module) -> tuple[set[type], set[str]]:
    """Module classes whose outputs transformers records (``_can_record_outputs``: router logits, ...)."""
    classes: set[type] = set()
    names: set[str] = set()
    for m in model.modules():
        rec = getattr(type(m), "_can_record_outputs", None)
        if not isinstance(rec, dict):
            continue
        for specs in rec.values():
            for s in specs if isinstance(specs, (list, tuple)) else [specs]:
                if isinstance(s, type):
                    classes.add(s)
                elif isinstance(s, str):
                    names.add(s)
                else:
                    if isinstance(getattr(s, "target_class", None), type):
                        classes.add(s.target_class)
                    if isinstance(getattr(s, "class_name", None), str):
                        names.add(s.class_name)
    return classes, names


def _hidden_size(model: nn.Module, module: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    if cfg is not None:
        text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        h = getattr(text, "hidden_size", None)
        if isinstance(h, int):
            return h
    for m in module.modules():
        if isinstance(m, nn.Linear):
            return m.in_features
    return None


def _probe_input(module: nn.Module, hidden: int) -> torch.Tensor:
    p = next(iter(module.parameters()), None)
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    device = p.device if p is not None else torch.device("cpu")
    g = torch.Generator(device=device).manual_seed(0)
    return torch.randn(_PROBE_ROWS, _PROBE_TOKENS, hidden, generator=g, device=device,
                       dtype=torch.float32).to(dtype)


def _capture_children(module: nn.Module, x: torch.Tensor) -> dict[str, tuple[tuple, dict]]:
    """The arguments each direct child of ``module`` gets when ``module(x)`` runs (first call of each)."""
    got: dict[str, tuple[tuple, dict]] = {}
    handles = []
    for name, child in module.named_children():
        def pre(m, args, kwargs, _name=name):
            got.setdefault(_name, (tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args),
                                   {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}))

        handles.append(child.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            module(x)
    finally:
        for h in handles:
            h.remove()
    return got


def _reads_inside(module: nn.Module, classes: set[type], names: set[str]) -> str | None:
    """Why another part of the model reads a submodule's output (recorded, hooked), or None."""
    for name, m in module.named_modules():
        if isinstance(m, tuple(classes)) or any(type(m).__name__.endswith(n) for n in names):
            return f"{name or 'itself'} ({type(m).__name__}): its output is recorded by transformers"
        if m is not module and (m._forward_hooks or m._forward_pre_hooks):
            return f"{name} ({type(m).__name__}) has forward hooks"
    return None


def _plan_module(model, path: str, module: nn.Module, mode: str, chunk: int | None,
                 recorded) -> tuple[list[TiledMLP], list[str]]:
    """The tilers for one block's MLP (itself, or its children), and why anything was left whole."""
    hidden = _hidden_size(model, module)
    if hidden is None:
        return [], [f"{path} ({type(module).__name__}): its hidden size is unknown (no config.hidden_size, no "
                    f"nn.Linear), so it cannot be probed"]
    x = _probe_input(module, hidden)
    try:
        per_token = probe(module, (x,), {})
    except NotPerToken as e:
        return [], [f"{path} ({type(module).__name__}) is not per-token: {e}"]
    except Exception as e:  # noqa: BLE001 - a module that cannot run on the probe input is not tiled
        return [], [f"{path} ({type(module).__name__}) could not be probed on a (2, 9, {hidden}) input: "
                    f"{type(e).__name__}: {e}"]
    why = _reads_inside(module, *recorded)
    itemsize = x.element_size()
    if why is None:
        return [TiledMLP(path, module, mode, chunk, per_token, itemsize)], []
    # another part of the model reads a submodule's output: tile the children that hold no such output
    tilers, whole = [], []
    for name, (args, kwargs) in _capture_children(module, x).items():
        child = getattr(module, name)
        cpath = f"{path}.{name}"
        if not any(True for _ in child.parameters()) or _reads_inside(child, *recorded) is not None:
            continue
        if not args or not isinstance(args[0], torch.Tensor) or not args[0].is_floating_point():
            continue
        try:
            b = probe(child, args, kwargs)
        except NotPerToken as e:
            whole.append(f"{cpath} ({type(child).__name__}) is not per-token: {e}")
            continue
        except Exception as e:  # noqa: BLE001
            whole.append(f"{cpath} ({type(child).__name__}) could not be probed: {type(e).__name__}: {e}")
            continue
        tilers.append(TiledMLP(cpath, child, mode, chunk, b, args[0].element_size()))
    if not tilers:
        whole.append(f"{path} ({type(module).__name__}) is left whole: {why}, and no child of it is tileable")
    return tilers, whole


def tiled_mlp_pass(model: nn.Module, blocks: list[nn.Module], mode: str, chunk: int | None) -> list[TiledMLP]:
    """Tile each block's MLP (``mode`` "auto" or "tiled"); ``mlp="tiled"``: ``ValueError`` naming every
    block MLP that cannot be tiled and why. Returns the tilers (their ``calls`` count tiled calls)."""
    if mode == "full":
        return []
    recorded = _recorded_classes(model)
    names = {id(m): n for n, m in model.named_modules()}
    plans, refusals = [], []
    for block in blocks:
        for attr in MLP_NAMES:
            module = getattr(block, attr, None)
            if isinstance(module, nn.Module):
                tilers, whole = _plan_module(model, names.get(id(module), attr), module, mode, chunk, recorded)
                plans += tilers
                refusals += [w for w in whole if not tilers]
    if mode == "tiled":
        if refusals:
            raise ValueError("mlp='tiled': these modules cannot be tiled over tokens: " + "; ".join(refusals)
                             + ". Pass mlp='auto' (tiles only what its probe proves per-token) or mlp='full'")
        if not plans:
            raise ValueError(f"mlp='tiled': no block of {type(model).__name__} has a child named one of "
                             f"{MLP_NAMES}; pass mlp='auto' or 'full'")
    for t in plans:
        tile(t.module, t)
    object.__setattr__(model, _ATTR, plans)  # not a submodule: invisible to state_dict, FSDP
    return plans


def tiled_modules(model: nn.Module) -> list[TiledMLP]:
    """The tiled modules of a parallelized model (their path, probe measurement and tiled ``calls``)."""
    return list(getattr(model, _ATTR, []))
