"""Sequence mixers other than attention (convolutions, linear recurrences, SSMs) over a sharded sequence.

``base``: the runs of a rank, the context an adapter gets (halo exchange, entry-state scan) and the
single-process reference context; ``runs``: every layout's runs; ``context``: the distributed context
(``make_context``). The gather path and the families' adapters live beside them (see docs/architecture.md).
"""

from seqpar.mixing.base import (MIXER_MODES, LocalContext, MapKind, MixerContext, MixerMode, Runs, StateAdapter,
                                apply_map, compose_maps, scan_dtype)
from seqpar.mixing.context import DistContext, make_context
from seqpar.mixing.runs import all_runs, local_runs

__all__ = ["DistContext", "make_context", "all_runs", "local_runs", "MIXER_MODES", "LocalContext", "MapKind",
           "MixerContext", "MixerMode", "Runs", "StateAdapter", "apply_map", "compose_maps", "scan_dtype"]
