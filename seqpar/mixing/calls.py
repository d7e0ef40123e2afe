"""A mixer call's arguments by name, for adapters that read a module's ``forward`` arguments: binding, the 2D
padding-mask check, and the transformers class a module is.

``parallelize`` wraps a taken mixer's ``forward`` with an instance attribute (``module.forward = wrapper``),
so the signature to bind a call against is the class's (``type(module).forward``), not the instance's.

Note
----
::

    call_arguments(block, (h,), {"position_ids": p})  ->  {"input_states": h, "position_ids": p,
                                                             "attention_mask": <default>, ..., **extra kwargs}
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

__all__ = ["forward_parameters", "call_arguments", "check_padding_mask", "transformers_class"]


def _signature(module: nn.Module) -> inspect.Signature | None:
    try:
        return inspect.signature(type(module).forward)
    except (TypeError, ValueError):
        return None


def forward_parameters(module: nn.Module) -> set[str]:
    """The names of the parameters of the module class's ``forward`` (without ``self``; empty if unreadable)."""
    sig = _signature(module)
    return set() if sig is None else set(list(sig.parameters)[1:])


def call_arguments(module: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """``module(*args, **kwargs)``'s arguments by name: bound to the class's ``forward``, defaults applied, the
    ``**kwargs`` catch-all merged in. ``TypeError`` (naming the module) for a call its forward does not accept."""
    sig = _signature(module)
    if sig is None:
        raise TypeError(f"{type(module).__name__}.forward has no readable signature")
    try:
        bound = sig.bind(module, *args, **kwargs)
    except TypeError as e:
        raise TypeError(f"{type(module).__name__}.forward does not accept this call: {e}") from None
    bound.apply_defaults()
    out = dict(list(bound.arguments.items())[1:])  # without self
    for name, p in sig.parameters.items():
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            out.update(out.pop(name, {}))
        elif p.kind is inspect.Parameter.VAR_POSITIONAL and out.pop(name, ()):
            raise TypeError(f"{type(module).__name__}.forward: extra positional arguments are not supported here")
    return out


def check_padding_mask(name: str, arg: str, mask: Any, hidden: torch.Tensor) -> None:
    """``mask`` (the call's ``arg``) must be None or a 2D padding mask (B, S_local) beside ``hidden`` (B, S_local,
    ...): ``TypeError`` / ``ValueError`` naming the module ``name`` and the argument otherwise."""
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name}: {arg} must be None or a 2D padding mask tensor (batch, local tokens), got "
                        f"{type(mask).__name__}")
    if mask.dim() != 2 or tuple(mask.shape) != tuple(hidden.shape[:2]):
        raise ValueError(f"{name}: {arg} must be a 2D padding mask (batch, local tokens) = "
                         f"{tuple(hidden.shape[:2])}, got shape {tuple(mask.shape)}; pass None or the local slice of "
                         f"the 2D mask")


def transformers_class(module: nn.Module, names) -> str | None:
    """The module's class name if it is one of ``names`` and defined inside ``transformers.models`` (else None)."""
    t = type(module)
    return t.__name__ if t.__name__ in names and t.__module__.startswith("transformers.models.") else None
