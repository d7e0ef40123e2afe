"""The distributed attention methods: one module each, sharing the kernel and comm layers.

``build(method, group, ...)`` returns the method object for one call; ``check(method, ...)`` validates
the shapes a method needs (before any communication); :class:`MethodFunction` runs any method under
autograd (with replay of a kept forward, for checkpointing). Methods: ``ring``
(:mod:`seqpar.methods.ring`), ``ulysses`` (:mod:`seqpar.methods.ulysses`), ``allgather``
(:mod:`seqpar.methods.allgather`), ``hybrid`` (:mod:`seqpar.methods.hybrid`: Ulysses inside a node x a
ring across, built from the (ulysses, ring) sub-groups of :meth:`HybridMethod.groups`, not the cp group).
A new method is a module with a class that has ``from_group`` (a classmethod building the object of
one call), ``check`` (a staticmethod) and the :class:`~seqpar.methods.base.Method` protocol, one entry
in ``_METHODS`` and one name in ``seqpar.vocab.METHODS``.
"""

from __future__ import annotations

from seqpar.masks import MaskSpec
from seqpar.methods.base import Method, MethodFunction, Recorder, StepRecord
from seqpar.methods.allgather import AllGatherMethod
from seqpar.methods.hybrid import HybridMethod
from seqpar.methods.ring import RingMethod
from seqpar.methods.ulysses import UlyssesMethod
from seqpar.vocab import METHODS, check_choice

__all__ = ["build", "check", "Method", "MethodFunction", "Recorder", "StepRecord", "RingMethod", "UlyssesMethod",
           "AllGatherMethod", "HybridMethod"]

_METHODS: dict[str, type] = {"ring": RingMethod, "ulysses": UlyssesMethod, "allgather": AllGatherMethod,
                             "hybrid": HybridMethod}
assert tuple(_METHODS) == METHODS, "one class per name of seqpar.vocab.METHODS, in its order"


def build(method: str, group, *, layout: str, mask: MaskSpec, scale: float, backend: str,
          record: Recorder | None = None, call: int = 0) -> Method:
    """The ``method`` object for one call over ``group`` (a resolved group: ProcessGroup, transport
    group or ``None``; for ``hybrid`` the (ulysses, ring) sub-groups of :meth:`HybridMethod.groups`);
    ``backend`` already resolved for the tensors' device; ``call`` the call's number on the group (the
    same on every rank: it tags the call's messages)."""
    check_choice("method", method, METHODS)
    return _METHODS[method].from_group(group, layout=layout, mask=mask, scale=scale, backend=backend,
                                       record=record, call=call)


def check(method: str, *, hq: int, hkv: int, s_local: int, world: int, layout: str) -> None:
    """What ``method`` needs of the shapes (e.g. heads divisible by the all-to-all degree): ``ValueError``
    naming the argument; local, the same on every rank, before any communication."""
    check_choice("method", method, METHODS)
    _METHODS[method].check(hq=hq, hkv=hkv, s_local=s_local, world=world, layout=layout)
