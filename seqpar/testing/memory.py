"""This process's resident memory from ``/proc/self/status`` and its peak, reset between phases (Linux).

torch CPU tensors are malloc'd memory, so the resident size is the honest measure on CPU ranks (there is
no ``torch.cuda.max_memory_allocated`` analogue): ``VmHWM`` is the process's peak resident size, and
writing ``5`` to ``/proc/self/clear_refs`` resets it to the current ``VmRSS``. A phase's peak is then:
``base = reset_peak()``, run the phase, ``status("VmHWM") - base``. Used by the memory tests and by
``benchmarks/memory.py`` / ``benchmarks/million.py``.
"""

from __future__ import annotations

import ctypes
import gc

__all__ = ["status", "reset_peak", "trim", "can_reset_peak", "saved_bytes"]


def status(key: str) -> int:
    """A ``/proc/self/status`` field in bytes (``VmRSS``, ``VmHWM``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def reset_peak() -> int:
    """Reset ``VmHWM`` to the current resident size -> that size in bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status("VmRSS")


def can_reset_peak() -> bool:
    import os

    return os.access("/proc/self/clear_refs", os.W_OK)


def trim() -> None:
    """Collect garbage and hand glibc's free heap memory back, so the next phase starts from live data."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def saved_bytes(module, fn) -> int:
    """Bytes of the activations autograd keeps for backward while ``fn()`` runs: distinct storages, the storages
    of ``module``'s parameters excluded (what a rank holds for backward, by tensor, not by process memory)."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen: dict[int, int] = {}

    def pack(x):
        if x.untyped_storage().data_ptr() not in params:
            seen[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        fn()
    return sum(seen.values())
