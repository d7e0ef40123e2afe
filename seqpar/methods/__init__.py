"""The distributed attention methods: one module each, sharing the kernel and comm layers.

``build(method, group, ...)`` returns the method object for one call; :class:`MethodFunction` runs any
method under autograd (with replay of a kept forward, for checkpointing). Methods: ``ring``
(:mod:`seqpar.methods.ring`).
"""

from __future__ import annotations

from seqpar.comm import make_ring
from seqpar.methods.base import Method, MethodFunction, Recorder, StepRecord
from seqpar.methods.ring import RingMethod
from seqpar.vocab import METHODS, check_choice

__all__ = ["build", "Method", "MethodFunction", "Recorder", "StepRecord", "RingMethod"]


def build(method: str, group, *, layout: str, causal: bool, scale: float, backend: str,
          record: Recorder | None = None, call: int = 0) -> Method:
    """The ``method`` object for one call over ``group`` (a resolved group: ProcessGroup, transport
    group or ``None``); ``backend`` already resolved for the tensors' device; ``call`` the call's
    number on the group (the same on every rank: it tags the call's messages)."""
    check_choice("method", method, METHODS)
    # one entry per name in seqpar.vocab.METHODS
    return RingMethod(make_ring(group), layout=layout, causal=causal, scale=scale, backend=backend, record=record,
                      call=call)
