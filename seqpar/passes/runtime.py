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
from dataclasses import dataclass, field
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

    saved: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    next: int = 0


class _Overrides(TorchFunctionMode):
    def __init__(self, handlers: dict[Callable, Callable]):
        super().__init__()
        self.handlers = handlers

    def __torch_function__(self, func, types, args=(), kwargs=None):
        handler = self.handlers.get(func)
        return func(*args, **(kwargs or {})) if handler is None else handler(*args, **(kwargs or {}))


class Runtime:
    """Options of one ``parallelize`` call, reached by closures (no module globals)."""

    def __init__(self, group: dist.ProcessGroup, layout: str, method: str, backend: str = "auto"):
        self.group, self.layout, self.method, self.backend = group, layout, method, backend
        self.world = dist.get_world_size(group)
        self.frames: list[tuple[Frame, bool]] = []  # stack of (frame, recording)
        self._handlers: dict[Callable, Callable] = {}
        self._mode: _Overrides | None = None
        self._mode_depth = 0

    @property
    def name(self) -> str:
        return f"seqpar_{id(self):x}"

    # -- attention, with checkpoint record / replay

    def attention(self, q, k, v, *, is_causal: bool, scale: float | None = None, enable_gqa: bool = False):
        call = AttentionCall(self.group, is_causal, scale, enable_gqa, self.layout, self.method, self.backend)
        if not self.frames:
            return attend(q, k, v, call)
        frame, recording = self.frames[-1]
        if recording:
            out, lse = attend(q, k, v, call, return_lse=True)
            frame.saved.append((out.detach(), lse.detach()))
            return out
        if frame.next >= len(frame.saved):
            raise RuntimeError("seqpar checkpoint: the recomputation made more attention calls than the forward")
        kept = frame.saved[frame.next]
        frame.next += 1
        return attend(q, k, v, call, kept=kept)

    @contextmanager
    def frame(self, frame: Frame, recording: bool):
        if not recording:
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
