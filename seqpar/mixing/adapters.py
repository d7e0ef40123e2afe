"""The registry of state-passing adapters (:class:`seqpar.mixing.base.StateAdapter`), one per mixer family.

``parallelize(mixers="auto" | "state")`` tries them in this order on every sequence mixer it finds; the
first whose ``matches`` holds is proven equal to the module's own forward by a probe before it is used.
"""

from __future__ import annotations

from seqpar.mixing.base import StateAdapter
from seqpar.mixing.gated_delta import GatedDeltaAdapter
from seqpar.mixing.lightning import LIGHTNING_ADAPTERS
from seqpar.mixing.rglru import RGLRU_ADAPTERS
from seqpar.mixing.short_conv import SHORT_CONV_ADAPTERS
from seqpar.mixing.selective_scan import MAMBA
from seqpar.mixing.ssd import MAMBA2

__all__ = ["ADAPTERS"]

ADAPTERS: tuple[StateAdapter, ...] = (
    GatedDeltaAdapter(),  # Qwen3-Next, Qwen3.5 / -MoE, LaraMini, Qwen4-Exp, OLMo-Hybrid gated DeltaNet
    *SHORT_CONV_ADAPTERS,  # LFM2 / LFM2-MoE / LFM3, Inkling / Inkling2 / Inkling2-loop short convolutions
    *RGLRU_ADAPTERS,  # RecurrentGemma's recurrent block (conv1d + RG-LRU)
    *LIGHTNING_ADAPTERS,  # MiniMax's lightning attention (linear_attention layers)
    MAMBA2,  # Mamba2, Bamba, Nemotron-H, GraniteMoeHybrid, Zamba2, FalconH1 Mamba2 mixers (SSD)
    MAMBA,  # Mamba, FalconMamba, Jamba, Zamba Mamba (v1) mixers (selective scan)
)
