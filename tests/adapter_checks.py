"""The check every state-passing adapter test makes, written once: the adapter on a LocalContext cut into runs
against the module's own forward on the whole sequence (output and the gradients of every input and parameter).

The module's own forward is the independent truth; :func:`compare` returns the largest relative error
(``max|mine - truth| / max(max|truth|, 1e-30)``) over the output and every gradient.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from seqpar.mixing.base import LocalContext, StateAdapter, apply_map

__all__ = ["randomize", "compare", "first_output", "Fp64Context"]


class Fp64Context(LocalContext):
    """A LocalContext whose entry-state scan keeps the maps' dtype (the interface's is fp32): fp64 tests can then
    be fp64-tight."""

    def entry_states(self, maps, kind):
        h = torch.zeros_like(maps[0][1])
        out = []
        for m, b in maps:
            out.append(h)
            h = apply_map(m, b, h, kind)
        return out


def randomize(module: nn.Module, seed: int = 0, std: float = 0.5) -> nn.Module:
    """Every floating parameter drawn N(0, std^2) (zero-initialised weights would hide mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.is_floating_point():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * std)
    return module


def first_output(out):
    return out[0] if isinstance(out, tuple) else out


def _run(fn: Callable, module: nn.Module, inputs: dict, cotangent: torch.Tensor | None, pick: Callable):
    leaves = {k: (v.detach().clone().requires_grad_() if torch.is_tensor(v) and v.is_floating_point() else v)
              for k, v in inputs.items()}
    for p in module.parameters():
        p.grad = None
    out = pick(fn(leaves))
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(out.dtype) \
        if cotangent is None else cotangent
    out.backward(g)
    grads = {f"d{k}": v.grad for k, v in leaves.items() if torch.is_tensor(v) and v.requires_grad}
    grads.update({f"d{n}": p.grad for n, p in module.named_parameters() if p.requires_grad})
    return out.detach(), grads, g


def compare(adapter: StateAdapter, module: nn.Module, inputs: dict, seq_len: int, cuts: tuple[int, ...],
            pick: Callable = first_output, ctx_type: type = LocalContext) -> dict[str, float]:
    """Relative errors of ``adapter.forward(module, LocalContext(seq_len, cuts), (), inputs)`` against
    ``module(**inputs)``: ``{"out": ..., "d<input>": ..., "d<param>": ...}``."""
    truth, tgrads, g = _run(lambda kw: module(**kw), module, inputs, None, pick)
    ctx = ctx_type(seq_len, cuts)
    mine, mgrads, _ = _run(lambda kw: adapter.forward(module, ctx, (), kw), module, inputs, g, pick)
    assert mine.shape == truth.shape and mine.dtype == truth.dtype, (mine.shape, truth.shape, mine.dtype)

    def rel(a, b):
        if a is None or b is None:
            assert a is None and b is None or (a if b is None else b).abs().max() == 0, "a gradient is missing"
            return 0.0
        return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()

    out = {"out": rel(mine, truth)}
    out.update({k: rel(mgrads.get(k), v) for k, v in tgrads.items()})
    return out
