"""What ``seqpar.attention`` remembers about a group between calls: one :class:`GroupState` per group,
owned by the group and bounded, so a long run's state stays flat.

Bookkeeping, not options (options are arguments): the call counter that numbers the calls (and their
message tags), the shape signatures and document offsets the ranks already agreed on (so repeated
calls skip the agreement collective), and ``method="auto"``'s machine and choices.

Note
----
Ownership and bounds::

    group object --(weak key)--> GroupState            the state dies with the group: a destroyed and
                                   calls     int        unreferenced ProcessGroup (or MPIGroup) frees it,
                                   agreed    LRU 64     and a new group never inherits it (no id() keys)
                                   documents LRU 8      cu_seqlens tensors (weakref + version) / lists
                                   auto      LRU 64     method="auto": signature -> method
                                   machine   Machine    method="auto": given or probed

A group that cannot be weakly referenced carries its state as an attribute. ``None`` (one process,
no torch.distributed) has one state of its own.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Any

import torch

__all__ = ["GroupState", "group_state", "find_state", "SIGNATURES", "DOCUMENTS"]

SIGNATURES = 64  # agreed shape signatures (and auto choices) kept per group: a model has a few per step
DOCUMENTS = 8  # agreed cu_seqlens kept per group: a forward and its recomputation need one per batch


class _LRU(OrderedDict):
    """An ordered dict of at most ``size`` entries; :meth:`get` and :meth:`put` mark an entry recently used."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def get(self, key, default=None):
        if key not in self:
            return default
        self.move_to_end(key)
        return self[key]

    def put(self, key, value) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.size:
            self.popitem(last=False)


def group_key(g) -> Any:
    """A group's name: a ProcessGroup's registered name (what compiled code knows it by), else ``id``."""
    if g is None:
        return ""
    return g.group_name if isinstance(g, torch.distributed.ProcessGroup) else id(g)


class GroupState:
    """The state of one group (see the module's Note): every container bounded."""

    def __init__(self, key: Any):
        self.key = key  # group_key: how a compiled trace (which has the name, not the object) finds this state
        self.calls = 0  # attention calls this rank made on the group (numbers them, and their message tags)
        self.agreed: _LRU = _LRU(SIGNATURES)  # document-independent signatures the ranks agreed on -> True
        self.documents: _LRU = _LRU(DOCUMENTS)  # cu_seqlens the ranks agreed on (see offsets / remember)
        self.auto: _LRU = _LRU(SIGNATURES)  # method="auto": signature -> the agreed method
        self.machine = None  # method="auto": the seqpar.plan.Machine (set_machine, or probed once)
        self.agreements = 0  # agreement collectives this rank joined on the group (tests count them)

    def next_call(self) -> int:
        n, self.calls = self.calls, self.calls + 1
        return n

    def offsets(self, cu_seqlens, seq_len: int) -> tuple[int, ...] | None:
        """The agreed host offsets of ``cu_seqlens`` for a sequence of ``seq_len``, or None (not agreed). A
        tensor is found by identity and version (the same tensor object, unmodified since: HF passes one
        tensor to every layer of a forward), never by a read; a list by its values."""
        if isinstance(cu_seqlens, torch.Tensor):
            hit = self.documents.get(("tensor", id(cu_seqlens)))
            if hit is None:
                return None
            ref, version, n, offsets = hit
            return offsets if ref() is cu_seqlens and version == cu_seqlens._version and n == seq_len else None
        return self.documents.get(("list", seq_len, tuple(cu_seqlens)))

    def remember(self, cu_seqlens, seq_len: int, offsets: tuple[int, ...]) -> None:
        """``cu_seqlens`` (agreed: every rank passed these offsets) -> ``offsets``; a tensor weakly held."""
        if isinstance(cu_seqlens, torch.Tensor):
            self.documents.put(("tensor", id(cu_seqlens)),
                               (weakref.ref(cu_seqlens), cu_seqlens._version, seq_len, offsets))
        else:
            self.documents.put(("list", seq_len, tuple(cu_seqlens)), offsets)


_STATES: "weakref.WeakKeyDictionary[Any, GroupState]" = weakref.WeakKeyDictionary()
_LOCAL = GroupState("")  # group None: a single process without torch.distributed


def group_state(g) -> GroupState:
    """``g``'s state (created at its first use), owned by ``g``: freed when ``g`` is."""
    if g is None:
        return _LOCAL
    try:
        st = _STATES.get(g)
        if st is None:
            st = _STATES[g] = GroupState(group_key(g))
        return st
    except TypeError:  # not weakly referenceable: the group carries its state itself
        st = getattr(g, "_seqpar_state", None)
        if st is None:
            st = GroupState(group_key(g))
            try:
                g._seqpar_state = st
            except AttributeError as e:
                raise TypeError(f"group: a {type(g).__name__} can neither be weakly referenced nor carry an "
                                f"attribute, so seqpar cannot keep its per-group state; give the class "
                                f"__weakref__ (or a __dict__)") from e
        return st


def find_state(key: Any) -> GroupState | None:
    """The state of the live group named ``key`` (:func:`group_key`), or None: for compiled code."""
    if key == "":
        return _LOCAL
    return next((st for st in list(_STATES.values()) if st.key == key), None)
