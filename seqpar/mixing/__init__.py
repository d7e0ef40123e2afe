"""Sequence mixers other than attention (convolutions, linear recurrences, SSMs) over a sharded sequence.

``base``: the runs of a rank, the context an adapter gets (halo exchange, entry-state scan) and the
single-process reference context. The distributed context, the gather path and the families'
adapters live beside it (see docs/architecture.md).
"""

from seqpar.mixing.base import (MIXER_MODES, LocalContext, MapKind, MixerContext, MixerMode, Runs, StateAdapter,
                                apply_map, compose_maps)

__all__ = ["MIXER_MODES", "LocalContext", "MapKind", "MixerContext", "MixerMode", "Runs", "StateAdapter",
           "apply_map", "compose_maps"]
