"""What every distributed attention method provides, and the one autograd function that runs any of them.

A method object is built per call (``seqpar.methods.build``) and holds that call's options (its
comm, layout, mask, scale, kernel backend): nothing is stored globally. It computes

    forward(q, k, v)                  -> out (fp32/fp64), lse         (B, Hq, S_local, D), (B, Hq, S_local)
    backward(dout, q, k, v, out, lse) -> dq, dk, dv                   against the *global* out / lse

:class:`MethodFunction` wraps any method for autograd, and *replays*: given the ``(out, lse)`` that an
earlier forward of the same inputs returned (``kept``), it skips the forward (no communication) and
keeps what the backward needs. Activation checkpointing uses this so the recomputation does not run
the method's communication again::

    first forward      MethodFunction(q, k, v, method)                 -> (out, lse)  [kept]
    recomputation      MethodFunction(q', k', v', method, kept)        -> (out, lse)  no exchange
    backward           method.backward(dout, q', k', v', out, lse)                     the method's comm

An optional per-step ``record`` hook (a :data:`Recorder`) receives one :class:`StepRecord` per
computed step: the thread CPU time of its kernels. Benchmarks time kernels through it; ``None``
(the default) costs one branch per step.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Literal, Protocol

import torch

from seqpar.comm import CommError, PeerAborted
from seqpar.masks import MaskSpec
from seqpar.mesh import group_rank_size

__all__ = ["Method", "MethodFunction", "merge_sinks", "StepRecord", "Recorder", "step_timer", "CallOptions", "CollectiveMethod",
           "guarded"]


@dataclass(frozen=True)
class StepRecord:
    phase: Literal["forward", "backward"]
    step: int  # the method's step (ring: 0 .. P-1)
    seconds: float  # thread CPU time of this step's kernels


Recorder = Callable[[StepRecord], None]


class _StepTimer:
    def __init__(self, record: Recorder, phase: str, step: int):
        self.record, self.phase, self.step = record, phase, step

    def __enter__(self) -> None:
        self.t0 = time.thread_time()

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.record(StepRecord(self.phase, self.step, time.thread_time() - self.t0))


def step_timer(record: Recorder | None, phase: str, step: int):
    """Context for one step's kernels: reports to ``record`` if given, else does nothing."""
    return nullcontext() if record is None else _StepTimer(record, phase, step)


def guarded(fn: Callable[[], Any], *, method: str, rank: int, size: int, call: int, where: str, suspects: str):
    """``fn()`` (posting or waiting for a transfer, or a collective); a transport failure becomes a
    :class:`~seqpar.comm.CommError` naming the method, this rank, the call, ``where`` and the likely cause.
    An in-process transport's :class:`~seqpar.comm.PeerAborted` (another rank failed first) passes as is."""
    try:
        return fn()
    except PeerAborted:
        raise
    except (RuntimeError, TimeoutError) as e:
        raise CommError(
            f"seqpar.attention (method={method!r}): group rank {rank} of {size} failed in call #{call} on this "
            f"group, {where}. Likely cause: the ranks did not make the same seqpar attention calls in the same "
            f"order (a data-dependent branch, or an exception caught on some ranks only), or {suspects} stopped "
            f"or died. Every rank of the group must make the same attention calls in the same order. "
            f"Transport: {type(e).__name__}: {e}"
        ) from e


@dataclass(frozen=True, kw_only=True)
class CallOptions:
    """The options of one call, the same for every method (keyword-only fields of each method class)."""

    layout: str
    mask: MaskSpec  # causal, window, documents, soft-cap (seqpar.masks)
    scale: float
    # "aten" | "reference" | "triton", or "auto" on CUDA: the kernel dispatch picks per (device, dtype),
    # after the Triton self-check
    backend: str
    record: Recorder | None = None
    call: int = 0  # the call's number on the group (the ring tags its messages with it)

    @property
    def causal(self) -> bool:
        return self.mask.causal


@dataclass(frozen=True)
class CollectiveMethod(CallOptions):
    """A method whose transfers are collectives over ``group`` (this rank ``rank`` of ``size``)."""

    group: Any
    rank: int
    size: int

    @classmethod
    def from_group(cls, group, **opts):
        """The method of one call over a resolved group (ProcessGroup, transport group or ``None``)."""
        return cls(group, *group_rank_size(group), **opts)

    def _collective(self, fn: Callable[[], Any], where: str):
        return guarded(fn, method=self.name, rank=self.rank, size=self.size, call=self.call, where=where,
                       suspects="a rank of the group")


class Method(Protocol):
    name: str

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def backward(self, dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                 lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


def merge_sinks(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention sinks (gpt-oss): one extra logit per head with value 0 in every row's softmax.
    ``out`` (B, Hq, S, D), ``lse`` (B, Hq, S) in fp32/fp64, ``sinks`` (Hq,) ->
    ``out * exp(lse - lse')``, ``lse' = logaddexp(lse, sink)``: the merge of the attention with a block
    whose lse is the sink and whose output is 0."""
    s = sinks.to(lse.dtype)[None, :, None]  # (1, Hq, 1)
    merged = torch.logaddexp(lse, s)
    return out * torch.exp(lse - merged).unsqueeze(-1), merged


class MethodFunction(torch.autograd.Function):
    """``MethodFunction.apply(q, k, v, method, kept=None, sinks=None) -> (out in q's dtype, lse)``; lse is
    not differentiable. ``kept``: the detached ``(out, lse)`` of an earlier forward of these inputs.
    ``sinks`` (Hq,): attention sinks (:func:`merge_sinks`); differentiable.

    With sinks the backward is the method's own, against the merged (out, lse): the sink has value 0,
    so for the real keys ``p = exp(s - lse')`` and ``dS = p (dP - rowsum(dO * O'))`` as always, and
    ``d sink = -sum_rows exp(sink - lse') rowsum(dO * O')`` (this rank's rows; the gradient reduction
    of the parameter sums the ranks)."""

    @staticmethod
    def forward(ctx, q, k, v, method: Method, kept: tuple[torch.Tensor, torch.Tensor] | None = None,
                sinks: torch.Tensor | None = None):
        if kept is None:
            out, lse = method.forward(q, k, v)
            if sinks is not None:
                out, lse = merge_sinks(out, lse, sinks.detach())
            out = out.to(q.dtype)
        else:
            out, lse = kept[0].detach(), kept[1].detach()
        ctx.save_for_backward(q, k, v, out, lse, sinks)
        ctx.mark_non_differentiable(lse)
        ctx.method = method
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, sinks = ctx.saved_tensors
        dq, dk, dv = ctx.method.backward(dout.contiguous(), q, k, v, out, lse)
        dsinks = None
        if sinks is not None and ctx.needs_input_grad[5]:
            delta = (dout.to(lse.dtype) * out.to(lse.dtype)).sum(-1)  # (B, Hq, S)
            p = torch.exp(sinks.to(lse.dtype)[None, :, None] - lse)  # the sink's probability per row
            dsinks = (-(p * delta).sum((0, 2))).to(sinks.dtype)
        return dq, dk, dv, None, None, dsinks
