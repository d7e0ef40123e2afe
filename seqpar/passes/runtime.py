"""The state one ``parallelize`` call shares between its passes: options, overrides, checkpoint frames.

``Runtime.attention`` is what the model's attention calls become. Inside a checkpointed block it
records (first forward) or replays (recomputation) the method's ``(out, lse)`` through
``seqpar.api.attend(kept=...)``, so the recomputation does no forward communication.

Plain PyTorch models are taken over by torch-function overrides (``Runtime.override``): one
:class:`~torch.overrides.TorchFunctionMode` that maps a torch function to a pass's handler, entered
whenever one of the model's modules runs (forward and checkpoint recomputation), once however
deeply modules nest.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.overrides import TorchFunctionMode

from seqpar.api import AttentionCall, attend

__all__ = ["Runtime", "Frame"]


@dataclass
class Frame:
    """One checkpointed block call: the attention results of its first forward, in call order."""

    saved: list[tuple[torch.Tensor, torch.Tensor, AttentionCall]] = field(default_factory=list)
    next: int = 0
    cu_seqlens: torch.Tensor | None = None  # the batch's documents at the first forward (Runtime.documents)


class _Overrides(TorchFunctionMode):
    def __init__(self, handlers: dict[Callable, Callable]):
        super().__init__()
        self.handlers = handlers

    def __torch_function__(self, func, types, args=(), kwargs=None):
        handler = self.handlers.get(func)
        return func(*args, **(kwargs or {})) if handler is None else handler(*args, **(kwargs or {}))


class Runtime:
    """Options of one ``parallelize`` call, reached by closures (no module globals)."""

    def __init__(self, group: dist.ProcessGroup, layout: str, method: str, backend: str = "auto",
                 attention_group=None):
        self.group, self.layout, self.method, self.backend = group, layout, method, backend
        # what attention calls get as group=: the cp group, or the hybrid mesh (its sub-groups live there)
        self.attention_group = group if attention_group is None else attention_group
        self.world = dist.get_world_size(group)
        self.frames: list[tuple[Frame, bool]] = []  # stack of (frame, recording)
        # the batch's document offsets during one forward (plain models: the loss pass sets it; Hugging Face
        # models: the sequence-mixer pass, their attention gets them as arguments; the loss pass clears it)
        self.cu_seqlens: torch.Tensor | None = None
        # the batch's seqpar_tokens during one forward (shard_batch's end padding, False; the loss pass sets
        # and clears it): the router loss leaves the padded tokens out
        self.tokens: torch.Tensor | None = None
        # the SeqparCache of the current cached forward (passes/generate.py sets and clears it): its decode
        # steps' attention runs on the sharded cache (seqpar.inference), not the ring
        self.cache = None
        self._handlers: dict[Callable, Callable] = {}
        self._mode: _Overrides | None = None
        self._mode_depth = 0

    @property
    def name(self) -> str:
        return f"seqpar_{id(self):x}"

    # -- attention, with checkpoint record / replay

    def attention(self, q, k, v, *, is_causal: bool, scale: float | None = None, enable_gqa: bool = False,
                  window_size: tuple[int, int] = (-1, -1), cu_seqlens: torch.Tensor | None = None,
                  softcap: float = 0.0, sinks: torch.Tensor | None = None, layer_idx: int | None = None):
        if self.cache is not None and self.cache.phase == "decode":  # layer_idx: the layer's cache shard
            return self.cache.attend(layer_idx, q, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa,
                                     window_size=window_size, softcap=softcap, sinks=sinks, backend=self.backend,
                                     cu_seqlens=cu_seqlens)
        call = AttentionCall(self.attention_group, is_causal, scale, enable_gqa, self.layout, self.method, self.backend,
                             window_size=window_size, cu_seqlens=cu_seqlens, softcap=softcap, sinks=sinks)
        if not self.frames:
            return attend(q, k, v, call)
        frame, recording = self.frames[-1]
        if recording:
            out, lse = attend(q, k, v, call, return_lse=True)
            frame.saved.append((out.detach(), lse.detach(), call))
            return out
        if frame.next >= len(frame.saved):
            raise RuntimeError("seqpar checkpoint: the recomputation made more attention calls than the forward")
        out, lse, first = frame.saved[frame.next]
        frame.next += 1
        if call.cu_seqlens is None and first.cu_seqlens is not None:
            # a plain model's batch documents are gone by the recomputation: the first forward's
            call = replace(call, cu_seqlens=first.cu_seqlens)
        return attend(q, k, v, call, kept=(out, lse))

    def documents(self) -> torch.Tensor | None:
        """The current batch's document offsets (None: one document); inside a checkpoint recomputation, those
        of the block's first forward (the batch's forward has ended by then)."""
        if self.frames and not self.frames[-1][1]:
            return self.frames[-1][0].cu_seqlens
        return self.cu_seqlens

    @contextmanager
    def frame(self, frame: Frame, recording: bool):
        if recording:
            frame.cu_seqlens = self.cu_seqlens
        else:
            frame.next = 0
        self.frames.append((frame, recording))
        self.enter()
        try:
            yield
        finally:
            self.exit()
            self.frames.pop()

    # -- torch-function overrides of plain models

    def override(self, model: nn.Module, func: Callable, handler: Callable) -> None:
        """While any module of ``model`` runs, calls of ``func`` go to ``handler``."""
        if self._mode is None:
            self._mode = _Overrides(self._handlers)

            def pre(module, args):
                self.enter()

            def post(module, args, output):
                self.exit()

            for m in model.modules():  # every module: a recomputation may start anywhere inside the model
                m.register_forward_pre_hook(pre)
                m.register_forward_hook(post, always_call=True)
        self._handlers[func] = handler

    def enter(self) -> None:
        if self._mode is not None:
            if self._mode_depth == 0:
                self._mode.__enter__()
            self._mode_depth += 1

    def exit(self) -> None:
        if self._mode is not None:
            self._mode_depth -= 1
            if self._mode_depth == 0:
                self._mode.__exit__(None, None, None)
