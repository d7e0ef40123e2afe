"""Lazy logits: what a plain model's ``lm_head`` returns in a forward with labels (used by passes/lm_loss.py).

A :class:`LazyLogits` has the real logits' shape (..., S, V), dtype and device and no storage. It keeps
the hidden states ``h`` that entered the head, the head's weight and bias, and the chain of shape-only
ops the model applied since (view / reshape / flatten / unflatten / contiguous, and upcasts: ``.float()``,
``.double()``, ``.to(float32 | float64)``). ``F.cross_entropy`` (the loss pass's override) reads the rows
it needs from it (:meth:`LazyLogits.rows`) and computes the loss in chunks; nothing else ever sees values
that were not computed.

Note
----
The life of one head call's logits::

    root pre-hook        lm_head(h)            chain ops           F.cross_entropy         root post-hook
    (labels given) ----> LazyLogits(h, W, b) -> LazyLogits ... --> chunked loss from h --> seal()
                           |                                       (no (N, V) logits)        |
                           +-- any other op, during the forward:                             +-- any op but
                               on_use(what) (log once, or refuse), then the real logits          metadata:
                               F.linear(h, W, b) (once, autograd-tracked), the chain              ValueError
                               replayed, the op run on them: the model's own path, exact

Metadata (shape, size(), dim, dtype, device, numel, requires_grad, is_floating_point, stride, ...) answers
without values, before and after the seal. After the seal nothing is computed, ever: the weights may have
changed since (an optimizer step, FSDP2 resharding), so logits computed then would be a different answer.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten, tree_map

__all__ = ["LazyForward", "LazyLogits", "SEALED"]

SEALED = ("the logits of a forward with labels were not computed (seqpar computed the loss in chunks from the "
          "hidden states); pass loss='full' to seqpar.parallelize to get logits and loss from one forward, or run "
          "the forward without labels")

_T = torch.Tensor
# answered from the tensor's metadata (a fresh leaf's: no _base, no grad_fn); register_hook: bookkeeping (FSDP2's
# root hook on its outputs; it never fires: no gradient reaches these logits)
_METADATA = frozenset({
    _T.shape.__get__, _T.ndim.__get__, _T.dtype.__get__, _T.device.__get__, _T.layout.__get__,
    _T.requires_grad.__get__, _T.is_leaf.__get__, _T.grad_fn.__get__, _T.grad.__get__, _T.is_cuda.__get__,
    _T.is_cpu.__get__, _T.is_meta.__get__, _T.is_sparse.__get__, _T.is_quantized.__get__, _T.is_nested.__get__,
    _T.itemsize.__get__, _T.nbytes.__get__, _T._base.__get__, _T._version.__get__, _T._is_view, _T.is_inference,
    _T.size, _T.dim, _T.ndimension, _T.numel, _T.nelement,
    _T.is_floating_point, _T.is_complex, _T.is_signed, _T.is_contiguous, _T.stride, _T.element_size, _T.__len__,
    _T.get_device, _T.register_hook, torch.numel, torch.is_floating_point, torch.is_complex,
})
_RESHAPES = frozenset({_T.view, _T.reshape, torch.reshape, _T.flatten, torch.flatten, _T.unflatten, torch.unflatten,
                       _T.contiguous})
_UPCASTS = frozenset({_T.float, _T.double, _T.to})
_RANK = {torch.float16: 1, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}  # precision, for upcasts


class LazyForward:
    """One forward's lazy logits. ``on_use(what)``: called before the real logits are computed for an op
    other than the chunked loss (it logs, or raises to refuse); :meth:`seal` (root post-hook) ends them."""

    def __init__(self, on_use: Callable[[str], None]):
        self.on_use = on_use
        self.sealed = False
        self.sources: list[_Source] = []

    def seal(self) -> None:
        """No values from now on; the hidden states, weights and any real logits are let go."""
        self.sealed = True
        for src in self.sources:
            src.hidden = src.weight = src.bias = src.logits = None


class _Source:
    """One ``lm_head`` call: its input, parameters (the objects of that call: FSDP2's unsharded ones) and
    their versions, and the real logits once computed."""

    def __init__(self, forward: LazyForward, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        self.forward, self.hidden, self.weight, self.bias = forward, hidden, weight, bias
        self.versions = self._versions()
        self.logits: torch.Tensor | None = None
        self.materialized = 0  # times the real logits were computed (0 or 1)

    def _versions(self) -> tuple[int, ...]:
        return tuple(t._version for t in (self.hidden, self.weight, self.bias) if t is not None)

    def check(self) -> None:
        if self.forward.sealed:
            raise ValueError(f"seqpar: {SEALED}")
        if self._versions() != self.versions:
            raise RuntimeError("seqpar lazy logits: the hidden states or the weight of lm_head were modified in place "
                               "after lm_head ran, so its logits can no longer be computed; parallelize the model with "
                               "loss='full'")

    def real(self) -> torch.Tensor:
        self.check()
        if self.logits is None:
            self.logits = F.linear(self.hidden, self.weight, self.bias)  # what the model's own lm_head gives
            self.materialized += 1
        return self.logits


class LazyLogits(torch.Tensor):
    """The logits ``F.linear(hidden, weight, bias)`` (..., S, V) of one ``lm_head`` call, never computed unless an
    op other than the chunked loss needs them during the forward. Build with :meth:`of`."""

    _src: _Source
    _chain: tuple  # ((func, args after the tensor, kwargs), ...) applied to the real logits, in order

    @staticmethod
    def __new__(cls, src: _Source, shape: torch.Size, dtype: torch.dtype, chain: tuple, requires_grad: bool):
        x = torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=src.hidden.device,
                                                requires_grad=requires_grad)
        x._src, x._chain = src, chain
        return x

    @classmethod
    def of(cls, forward: LazyForward, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           dtype: torch.dtype) -> "LazyLogits":
        """The lazy output of a head ``(V, H)`` on ``hidden`` (..., H); ``dtype``: the real output's (autocast)."""
        src = _Source(forward, hidden, weight, bias)
        forward.sources.append(src)
        needs = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
        return cls(src, torch.Size((*hidden.shape[:-1], weight.shape[0])), dtype, (), needs)

    # -- what the loss reads

    @property
    def logits_computed(self) -> int:
        """How many times the real logits of this head call were computed (0: the loss never needed them)."""
        return self._src.materialized

    def materialize(self) -> torch.Tensor:
        """The real tensor: the head's logits (computed once per head call), the chain replayed on them."""
        with torch._C.DisableTorchFunctionSubclass():
            x = self._src.real()
            for func, args, kwargs in self._chain:
                x = func(x, *args, **kwargs)
        return x

    def rows(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
        """``(hidden (N, H), weight (V, H), bias)`` when this tensor is the logits as (N tokens, V) rows in token
        order (only row-major reshapes were applied, so a last dim of V means one token per row); else None."""
        src = self._src
        src.check()
        with torch._C.DisableTorchFunctionSubclass():
            shape, V = tuple(self.shape), src.weight.shape[0]
            n = math.prod(src.hidden.shape[:-1])
        if shape != (n, V):
            return None
        return src.hidden.reshape(n, src.hidden.shape[-1]), src.weight, src.bias

    # -- every torch call on it

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _METADATA:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        lazies = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, LazyLogits)]
        if any(x._src.forward.sealed for x in lazies):
            raise ValueError(f"seqpar: {SEALED}")
        first = args[0] if args else None
        if isinstance(first, LazyLogits) and len(lazies) == 1:
            step = _chain_step(first, func, args[1:], kwargs)
            if step is not None:
                shape, dtype = step
                return LazyLogits(first._src, shape, dtype, first._chain + ((func, tuple(args[1:]), kwargs),),
                                  first.requires_grad)
        for x in lazies:
            x._src.forward.on_use(_name(func))
        args, kwargs = tree_map(lambda a: a.materialize() if isinstance(a, LazyLogits) else a, (args, kwargs))
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(f"seqpar lazy logits reached {func} below torch functions; they hold no values. Parallelize "
                           f"the model with loss='full'")


def _name(func) -> str:
    owner = getattr(func, "__self__", None)  # a property's __get__: name the property
    return getattr(owner, "__name__", None) or getattr(func, "__name__", repr(func))


def _chain_step(x: LazyLogits, func, rest: tuple, kwargs: dict) -> tuple[torch.Size, torch.dtype] | None:
    """(shape, dtype) after ``func(x, *rest, **kwargs)`` when it is a shape-only op or an upcast; else None."""
    dtype = x.dtype
    if func in _UPCASTS:
        if func is _T.to:
            if any(k not in ("dtype", "device", "non_blocking") for k in kwargs) or any(
                    isinstance(a, torch.Tensor) for a in rest):
                return None
            try:
                device, target, _, memory_format = torch._C._nn._parse_to(*rest, **kwargs)
            except (TypeError, RuntimeError):
                return None
            if (device is not None and torch.device(device) != x.device) or memory_format is not None:
                return None
            target = dtype if target is None else target
        elif rest or kwargs:
            return None
        else:
            target = torch.float32 if func is _T.float else torch.float64
        if target != dtype and (target not in (torch.float32, torch.float64) or _RANK.get(dtype, 9) > _RANK[target]):
            return None  # a narrowing or non-float cast changes values: the real logits
        return x.shape, target
    if func not in _RESHAPES:
        return None
    if func is _T.view and any(isinstance(a, torch.dtype) for a in (*rest, *kwargs.values())):
        return None  # a dtype view reinterprets the bits
    if func is _T.contiguous and (rest or kwargs) and (rest or tuple(kwargs.values())) != (torch.contiguous_format,):
        return None
    meta = torch.empty(x.shape, dtype=dtype, device="meta")
    try:
        with torch._C.DisableTorchFunctionSubclass():
            out = func(meta, *rest, **kwargs)
    except (TypeError, RuntimeError):
        return None  # the real op says what is wrong
    return out.shape, dtype
