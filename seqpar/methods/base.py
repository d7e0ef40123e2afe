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
from typing import Callable, Literal, Protocol

import torch

__all__ = ["Method", "MethodFunction", "StepRecord", "Recorder", "step_timer"]


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


class Method(Protocol):
    name: str

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def backward(self, dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                 lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


class MethodFunction(torch.autograd.Function):
    """``MethodFunction.apply(q, k, v, method, kept=None) -> (out in q's dtype, lse)``; lse is not
    differentiable. ``kept``: the detached ``(out, lse)`` of an earlier forward of these inputs."""

    @staticmethod
    def forward(ctx, q, k, v, method: Method, kept: tuple[torch.Tensor, torch.Tensor] | None = None):
        if kept is None:
            out, lse = method.forward(q, k, v)
            out = out.to(q.dtype)
        else:
            out, lse = kept[0].detach(), kept[1].detach()
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.mark_non_differentiable(lse)
        ctx.method = method
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ctx.method.backward(dout.contiguous(), q, k, v, out, lse)
        return dq, dk, dv, None, None
