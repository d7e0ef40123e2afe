"""Checkpoint offload (``offload="cpu"``, with ``checkpoint=True``): the checkpointed block inputs kept on the host.

Under non-reentrant ``torch.utils.checkpoint`` a block keeps only its inputs (the hidden states
entering it, plus the other tensor arguments: rotary cos/sin, masks, ...) until its backward; the
checkpoint saves them through the *outer* ``torch.autograd.graph.saved_tensors_hooks`` (what runs
inside the block is saved by the checkpoint's own hooks, which take precedence there). So wrapping
each checkpointed block call in :meth:`Offload.hooks` moves exactly those inputs::

    forward   pack(x)    device x -> host copy          CUDA: pinned buffer, async copy on a side
                                                        stream after the producing stream, the
                                                        device block freed once the copy is done
                                                        (record_stream); CPU: a distinct host copy
    backward  unpack     host copy -> x's device        CUDA: async copy on the current stream
                                                        (waits for the offload copy's event); CPU:
                                                        the copy itself

then the checkpoint recomputes the block from it as usual. Values and gradients are unchanged (a copy
is exact). The kept attention results of the checkpoint pass (``(out, lse)`` per attention call)
stay on the device. ``Offload.stats`` counts packs / unpacks / bytes for tests and users
(:func:`offload_stats`). Not with ``compile=True`` (refused at ``parallelize``).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import nn

__all__ = ["OffloadMode", "OFFLOAD_MODES", "Offload", "OffloadStats", "check_offload", "offload_pass",
           "offload_stats"]

OffloadMode = Literal["none", "cpu"]  # parallelize(offload=...): where the checkpointed block inputs wait
OFFLOAD_MODES: tuple[str, ...] = get_args(OffloadMode)

_ATTR = "_seqpar_offload"  # the model attribute that holds its Offload (read by offload_stats)


def check_offload(offload: object, checkpoint: bool, compile: bool) -> None:
    """The option, before any communication (``ValueError`` naming it)."""
    if not isinstance(offload, str) or offload not in OFFLOAD_MODES:
        raise ValueError(f"offload must be one of {OFFLOAD_MODES}, got {offload!r}")
    if offload != "none" and not checkpoint:
        raise ValueError(f"offload={offload!r} moves the checkpointed block inputs, so it needs checkpoint=True "
                         f"(without it, every activation stays where autograd saved it)")
    if offload != "none" and compile:
        raise ValueError(f"offload={offload!r} with compile=True is not supported (the offload hooks would sit "
                         f"inside the compiled block); pass one of the two")


@dataclass
class OffloadStats:
    packs: int = 0
    unpacks: int = 0
    bytes: int = 0  # total bytes copied to the host
    host_bytes: int = 0  # bytes held on the host right now (packed, not yet released)
    peak_host_bytes: int = 0


class _Host:
    """One offloaded tensor: its host copy, device and (CUDA) the copy's event; releases its bytes from the
    stats when the checkpoint drops it."""

    __slots__ = ("tensor", "device", "event", "stats", "__weakref__")

    def __init__(self, tensor, device, event, stats: OffloadStats):
        self.tensor, self.device, self.event, self.stats = tensor, device, event, stats

    def __del__(self):
        try:
            self.stats.host_bytes -= self.tensor.untyped_storage().nbytes()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


class Offload:
    """The pack / unpack pair of one ``parallelize`` call."""

    def __init__(self):
        self.stats = OffloadStats()
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    def _stream(self, device: torch.device):
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def pack(self, t: torch.Tensor):
        t = t.detach()
        if t.device.type == "cuda":
            host = torch.empty_like(t, device="cpu", pin_memory=True)
            stream = self._stream(t.device)
            stream.wait_stream(torch.cuda.current_stream(t.device))  # t is ready on the producing stream
            with torch.cuda.stream(stream):
                host.copy_(t, non_blocking=True)
                event = torch.cuda.Event()
                event.record(stream)
            t.record_stream(stream)  # the device block is not reused before the copy has read it
        else:
            host = torch.empty_like(t, device="cpu")  # a distinct host copy: the same path as a device's
            host.copy_(t)
            event = None
        n = host.untyped_storage().nbytes()
        s = self.stats
        s.packs += 1
        s.bytes += n
        s.host_bytes += n
        s.peak_host_bytes = max(s.peak_host_bytes, s.host_bytes)
        return _Host(host, t.device, event, s)

    def unpack(self, h: _Host) -> torch.Tensor:
        self.stats.unpacks += 1
        if h.device.type == "cuda":
            current = torch.cuda.current_stream(h.device)
            current.wait_event(h.event)
            return h.tensor.to(h.device, non_blocking=True)
        return h.tensor if h.device.type == "cpu" else h.tensor.to(h.device)

    @contextmanager
    def hooks(self):
        with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
            yield


def offload_pass(model: nn.Module, blocks: list[nn.Module]) -> Offload:
    """Each (checkpointed) block's forward under the offload hooks; after the checkpoint pass."""
    off = Offload()
    for block in blocks:
        inner = block.forward  # the checkpoint pass's forward; module hooks (FSDP2's) stay outside

        def forward(*args, _inner=inner, **kwargs):
            with off.hooks():
                return _inner(*args, **kwargs)

        block.forward = forward
    object.__setattr__(model, _ATTR, off)  # not a submodule / parameter: invisible to state_dict, FSDP
    return off


def offload_stats(model: nn.Module) -> OffloadStats | None:
    """The offload counters of a model parallelized with ``offload="cpu"`` (None otherwise)."""
    off = getattr(model, _ATTR, None)
    return None if off is None else off.stats
