"""The interface between seqpar's sequence-mixer paths and the model families' adapters.

A rank holds its tokens as *runs*: maximal stretches of consecutive global positions, in local
order. A recurrent or convolutional mixer is exact on a run once it knows what came before the run
in global order: the last ``k - 1`` inputs of a causal convolution (its *halo*) and the recurrent
state at the run's first token (its *entry state*). Every run is an affine map of its entry state,
``h_out = M . h_in + b`` (``.``: a matrix product over the state's first axis for ``"matrix"`` maps,
gated DeltaNet / KDA; elementwise for ``"scale"`` maps, Mamba / Mamba2 / RG-LRU), so the entry states
follow from the runs' ``(M, b)`` by a scan in global run order whose payload does not grow with S.

Note
----
P = 2, zigzag, 8 tokens (4 runs of 2)::

    global order    run0 run1 run2 run3        rank 0: run0 run3   rank 1: run1 run2
    halo(run2)   = last k-1 inputs of run1 (rank 1 itself); halo(run3) = of run2 (rank 1 -> rank 0)
    entry(run0)  = 0 (or the caller's initial state)
    entry(run i) = M_{i-1} . entry(run i-1) + b_{i-1}

A :class:`MixerContext` gives an adapter its runs, the halos and the entry states; the adapter
(:class:`StateAdapter`, one per mixer family) runs the module's own computation per run with them.
:class:`LocalContext` is the single-process context (one rank whose tokens are cut into runs):
the reference the distributed context is tested against, and what adapters' probes run on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol, get_args

import torch
from torch import nn

__all__ = ["MixerMode", "MIXER_MODES", "MapKind", "Runs", "MixerContext", "StateAdapter", "LocalContext",
           "apply_map", "compose_maps", "scan_dtype"]

# parallelize(mixers=...): "auto" state passing where an adapter is proven equal (else gather); "state" state
# passing or refused by name; "gather" every mixer on the gathered sequence; "refuse" the mixers are refused
MixerMode = Literal["auto", "state", "gather", "refuse"]
MIXER_MODES: tuple[str, ...] = get_args(MixerMode)

MapKind = Literal["matrix", "scale"]  # how a run's M acts on a state: matmul over the first state axis / elementwise


@dataclass(frozen=True)
class Runs:
    """This rank's runs of consecutive global positions, in local order."""

    bounds: tuple[tuple[int, int], ...]  # local [start, end) of each run
    starts: tuple[int, ...]  # global position of each run's first token
    index: tuple[int, ...]  # each run's place in the global run order, 0 .. n-1
    n: int  # runs over all ranks

    def __post_init__(self) -> None:
        if not (len(self.bounds) == len(self.starts) == len(self.index)):
            raise ValueError("Runs: bounds, starts and index must have one entry per run")

    @property
    def length(self) -> int:
        """Tokens on this rank."""
        return sum(e - s for s, e in self.bounds)


class MixerContext(Protocol):
    """What an adapter gets for one call: this rank's runs and the two exchanges."""

    runs: Runs

    def split(self, x: torch.Tensor, dim: int = 1) -> list[torch.Tensor]:
        """``x`` (..., S_local, ...) along ``dim`` -> one piece per run (views)."""
        ...

    def join(self, pieces: list[torch.Tensor], dim: int = 1) -> torch.Tensor:
        """The inverse of :meth:`split`."""
        ...

    def halo(self, x: torch.Tensor, width: int, dim: int = 1) -> list[torch.Tensor]:
        """Per run: the run's rows of ``x`` along ``dim`` prefixed by the ``width`` rows that precede its first
        token in global order (zeros before global position 0). Differentiable: the gradient of a halo row
        goes back to the rank that owns it."""
        ...

    def entry_states(self, maps: list[tuple[torch.Tensor, torch.Tensor]], kind: MapKind) -> list[torch.Tensor]:
        """Per run: its entry state, from every run's ``(M, b)`` (this rank's given in run order; the
        first run in global order enters with zeros). Computed in fp32 whatever the maps' dtype; differentiable
        in every rank's ``M`` and ``b``."""
        ...


class StateAdapter(Protocol):
    """One family of mixers (gated DeltaNet, Mamba2, ...) run exactly per run with halos and entry states."""

    name: str

    def matches(self, module: nn.Module) -> bool:
        """Structural: the module has what :meth:`forward` reads (attributes, parameter shapes)."""
        ...

    def forward(self, module: nn.Module, ctx: MixerContext, args: tuple, kwargs: dict) -> Any:
        """What ``module(*args, **kwargs)`` returns for this rank's tokens, computed per run."""
        ...


def scan_dtype(maps: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.dtype:
    """The entry-state scan's dtype: fp32, or fp64 when any map is fp64 (bf16 / fp16 maps are scanned in fp32)."""
    return torch.float64 if any(t.dtype == torch.float64 for mb in maps for t in mb) else torch.float32


def apply_map(m: torch.Tensor, b: torch.Tensor, h: torch.Tensor, kind: MapKind) -> torch.Tensor:
    """``m . h + b``: ``m`` (..., a, a) times ``h`` (..., a, c) for ``"matrix"``, elementwise for ``"scale"``."""
    return (m @ h if kind == "matrix" else m * h) + b


def compose_maps(first: tuple[torch.Tensor, torch.Tensor], then: tuple[torch.Tensor, torch.Tensor],
                 kind: MapKind) -> tuple[torch.Tensor, torch.Tensor]:
    """The map of ``first`` followed by ``then``: ``h -> M2 . (M1 . h + b1) + b2``."""
    (m1, b1), (m2, b2) = first, then
    return (m2 @ m1 if kind == "matrix" else m2 * m1), apply_map(m2, b2, b1, kind)


class LocalContext:
    """One process holding the whole sequence, cut into runs at ``cuts`` (local = global order).

    ``LocalContext(seq_len, cuts=(5, 12))`` has runs [0, 5), [5, 12), [12, seq_len). Halos and entry states
    are computed in this process with the same semantics as the distributed context, so an adapter
    run on it must equal the module's own forward on the whole sequence."""

    def __init__(self, seq_len: int, cuts: tuple[int, ...] = ()):
        edges = (0, *cuts, seq_len)
        if any(b <= a for a, b in zip(edges, edges[1:])):
            raise ValueError(f"cuts={cuts} must be increasing inside (0, {seq_len})")
        bounds = tuple(zip(edges, edges[1:]))
        self.runs = Runs(bounds=bounds, starts=tuple(a for a, _ in bounds), index=tuple(range(len(bounds))),
                         n=len(bounds))

    def split(self, x: torch.Tensor, dim: int = 1) -> list[torch.Tensor]:
        return [x.narrow(dim, a, b - a) for a, b in self.runs.bounds]

    def join(self, pieces: list[torch.Tensor], dim: int = 1) -> torch.Tensor:
        return torch.cat(pieces, dim=dim)

    def halo(self, x: torch.Tensor, width: int, dim: int = 1) -> list[torch.Tensor]:
        shape = list(x.shape)
        shape[dim] = width
        padded = torch.cat([x.new_zeros(shape), x], dim=dim)
        return [padded.narrow(dim, a, width + b - a) for a, b in self.runs.bounds]

    def entry_states(self, maps: list[tuple[torch.Tensor, torch.Tensor]], kind: MapKind) -> list[torch.Tensor]:
        dt = scan_dtype(maps)
        h = torch.zeros_like(maps[0][1], dtype=dt)
        out = []
        for m, b in maps:
            out.append(h)
            h = apply_map(m.to(dt), b.to(dt), h, kind)
        return out
