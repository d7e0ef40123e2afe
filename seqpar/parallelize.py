"""``seqpar.parallelize``: make an existing model train on sequences sharded over ``mesh["cp"]``.

The model code stays free of parallelism; ``parallelize`` applies passes to it, in place, in this
order (each pass only relies on the ones before it)::

    0. check      mesh has a "cp" dim, options are known, the model has attention seqpar can take
                  over (raises ValueError / TypeError before any communication)
    1. sync       parameters and buffers broadcast from the mesh's first rank (all ranks start equal)
    2. attention  Hugging Face model: a per-call "seqpar_<id>" implementation registered through
                  transformers' AttentionInterface / AttentionMaskInterface, model switched to it.
                  Plain PyTorch model: a TorchFunctionMode, active whenever one of the model's
                  modules runs (forward and checkpoint recomputation), turns every
                  F.scaled_dot_product_attention into seqpar.attention
    3. loss       root hooks: the loss becomes the mean over the *global* number of non-ignored
                  tokens, its value all-reduced over cp (the gradient stays local: the cp ranks'
                  gradients sum to the single-device one). HF: needs the batch of
                  seqpar.shard_batch (shift_labels, num_items_in_batch, global position_ids).
                  Plain model: its mean F.cross_entropy becomes sum / global count
    4. checkpoint (checkpoint=True) every transformer block runs under non-reentrant
                  torch.utils.checkpoint; the ring attention's (out, lse) of the first forward are
                  kept, so the recomputation does not run the ring again (no K/V exchange)
    5. data-parallel gradients, over the dp x cp ranks flattened (parameters are replicated over
                  cp, so cp ranks share the sharding): fsdp=True: FSDP2 ``fully_shard`` per block,
                  then the root; fsdp=False: full parameters, a post-accumulate-grad hook per
                  parameter all-reduces. Either way the gradient is summed over cp and averaged
                  over dp (FSDP: SUM reduce-scatter + post-divide by dp, since gloo lacks PREMUL_SUM)

Semantics: each dp replica trains on its own batch; ``model(**shard_batch(batch))`` returns that
batch's single-device loss on every cp rank; gradients after ``backward`` are the mean over dp
replicas of their single-device gradients (DDP semantics), for FSDP as DTensors (``full_tensor()``).
"""

from __future__ import annotations

import inspect
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.overrides import TorchFunctionMode

from seqpar import hf as _hf
from seqpar.attention import METHODS, attention
from seqpar.attention.ring import ring_backward
from seqpar.comm import make_ring
from seqpar.kernels import resolve_backend
from seqpar.layout import LAYOUTS

__all__ = ["parallelize", "ModelKind", "find_blocks", "check_mesh", "reduce_forward"]

ModelKind = Literal["hf", "sdpa"]


# ----------------------------------------------------------------------------- mesh helpers


def check_mesh(mesh: Any, what: str = "mesh") -> tuple[int, int]:
    """-> (dp, cp). ``mesh`` must be a DeviceMesh with a "cp" dim (1-D "cp", or 2-D ("dp", "cp"))."""
    if not isinstance(mesh, DeviceMesh):
        raise TypeError(f"{what} must be a torch DeviceMesh with a 'cp' dim (seqpar.init_mesh(cp=...)), got "
                        f"{type(mesh).__name__}")
    names = tuple(mesh.mesh_dim_names or ())
    if "cp" not in names:
        raise ValueError(f"{what} has dims {names or '(unnamed)'}, no 'cp' dim to shard the sequence over; build it "
                         f"with seqpar.init_mesh(cp=..., dp=...) (dims ('dp', 'cp'))")
    if mesh.ndim > 2 or (mesh.ndim == 2 and set(names) != {"dp", "cp"}):
        raise ValueError(f"{what} must have dims ('cp',) or ('dp', 'cp'), got {names}")
    cp = mesh["cp"].size() if mesh.ndim == 2 else mesh.size()
    return mesh.size() // cp, cp


def _cp_group(mesh: DeviceMesh) -> dist.ProcessGroup:
    return (mesh["cp"] if mesh.ndim == 2 else mesh).get_group()


def _flat_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The dp x cp ranks as one 1-D mesh (FSDP's shard dim and the gradient all-reduce group)."""
    if mesh.ndim == 1:
        return mesh
    ranks = sorted(mesh.mesh.flatten().tolist())
    if ranks == list(range(dist.get_world_size())):
        return DeviceMesh.from_group(dist.group.WORLD, mesh.device_type, mesh_dim_names=("dp_cp",))
    return mesh._flatten("dp_cp")  # a sub-world mesh: torch's own flattening


class _ReduceForward(torch.autograd.Function):
    """Forward: all-reduce SUM over ``group``. Backward: identity (each rank keeps its own part)."""

    @staticmethod
    def forward(ctx, x, group):
        y = x.clone()
        dist.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def reduce_forward(x: torch.Tensor, group) -> torch.Tensor:
    """The sum of ``x`` over ``group`` as a value; the gradient flows to this rank's ``x`` only."""
    return _ReduceForward.apply(x, group)


# ----------------------------------------------------------------------------- attention runtime


class _Replay(torch.autograd.Function):
    """Attention whose forward result was kept: returns ``out``; backward is the ring backward."""

    @staticmethod
    def forward(ctx, q, k, v, out, lse, ring, layout, causal, scale, backend):
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.opts = dict(ring=ring, layout=layout, causal=causal, scale=scale, backend=backend)
        return out.detach()

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ring_backward(dout.contiguous(), q, k, v, out, lse, **ctx.opts)
        return dq, dk, dv, None, None, None, None, None, None, None


@dataclass
class _Frame:
    """One checkpointed block call: the attention results of its first forward, in call order."""

    saved: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    next: int = 0


class _Runtime:
    """Options of one ``parallelize`` call, reached by closures (no module globals).

    ``attention`` is what the model's attention calls become. Inside a checkpointed block it
    records (forward) or replays (recomputation) the ring's (out, lse).
    """

    def __init__(self, group: dist.ProcessGroup, layout: str, method: str, backend: str = "auto"):
        self.group, self.layout, self.method, self.backend = group, layout, method, backend
        self.world = dist.get_world_size(group)
        self.frames: list[tuple[_Frame, bool]] = []  # stack of (frame, recording)
        self.mode: _SDPAMode | None = None
        self._mode_depth = 0

    @property
    def name(self) -> str:
        return f"seqpar_{id(self):x}"

    def attention(self, q, k, v, *, is_causal: bool, scale: float | None = None, enable_gqa: bool = False):
        opts = dict(group=self.group, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa, layout=self.layout,
                    method=self.method, backend=self.backend)
        if not self.frames:
            return attention(q, k, v, **opts)
        frame, recording = self.frames[-1]
        if recording:
            out, lse = attention(q, k, v, return_lse=True, **opts)
            frame.saved.append((out.detach(), lse.detach()))
            return out
        if frame.next >= len(frame.saved):
            raise RuntimeError("seqpar checkpoint: the recomputation made more attention calls than the forward")
        out, lse = frame.saved[frame.next]
        frame.next += 1
        if out.shape != q.shape:
            raise RuntimeError(f"seqpar checkpoint: recomputed q {tuple(q.shape)} does not match the kept attention "
                               f"output {tuple(out.shape)}")
        lead = q.shape[:-3]
        q4, k4, v4, o4 = (t.reshape(-1, *t.shape[-3:]) for t in (q, k, v, out))
        s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        res = _Replay.apply(q4, k4, v4, o4, lse.reshape(-1, *lse.shape[-2:]), make_ring(self.group), self.layout,
                            is_causal, s, resolve_backend(self.backend, q.device))
        return res.reshape(*lead, *res.shape[-3:])

    # -- the SDPA mode of plain models, entered once however deeply modules nest

    def enter_mode(self) -> None:
        if self.mode is not None:
            if self._mode_depth == 0:
                self.mode.__enter__()
            self._mode_depth += 1

    def exit_mode(self) -> None:
        if self.mode is not None:
            self._mode_depth -= 1
            if self._mode_depth == 0:
                self.mode.__exit__(None, None, None)

    @contextmanager
    def frame(self, frame: _Frame, recording: bool):
        if not recording:
            frame.next = 0
        self.frames.append((frame, recording))
        self.enter_mode()
        try:
            yield
        finally:
            self.exit_mode()
            self.frames.pop()


class _SDPAMode(TorchFunctionMode):
    """While active: SDPA -> seqpar attention; mean cross-entropy -> global-token mean (see pass 3)."""

    def __init__(self, rt: _Runtime):
        super().__init__()
        self.rt = rt

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return self._sdpa(*args, **kwargs)
        if func is F.cross_entropy:
            return self._cross_entropy(*args, **kwargs)
        if func is F.multi_head_attention_forward:
            raise TypeError("seqpar.parallelize: nn.MultiheadAttention is not supported; call "
                            "F.scaled_dot_product_attention in the model")
        return func(*args, **kwargs)

    def _sdpa(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
              enable_gqa=False):
        if attn_mask is not None:
            raise ValueError("seqpar: scaled_dot_product_attention with attn_mask is not supported under "
                             "parallelize; use is_causal=True (masking is by global position)")
        if dropout_p:
            raise ValueError(f"seqpar: attention dropout is not supported (dropout_p={dropout_p})")
        return self.rt.attention(query, key, value, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)

    def _cross_entropy(self, input, target, weight=None, size_average=None, ignore_index=-100, reduce=None,
                       reduction="mean", label_smoothing=0.0):
        if reduction != "mean" or target.is_floating_point() or size_average is not None or reduce is not None:
            return F.cross_entropy(input, target, weight, size_average, ignore_index, reduce, reduction,
                                   label_smoothing)
        if weight is not None:
            raise ValueError("seqpar: a class-weighted mean cross_entropy cannot be made global; compute the loss "
                             "with reduction='sum' and divide by batch['num_items_in_batch']")
        total = F.cross_entropy(input, target, ignore_index=ignore_index, reduction="sum",
                                label_smoothing=label_smoothing)
        count = (target != ignore_index).sum().to(total.dtype)  # this rank's tokens
        dist.all_reduce(count, group=self.rt.group)  # the global count
        return reduce_forward(total / count, self.rt.group)


# ----------------------------------------------------------------------------- passes


def find_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks: children of the outermost non-empty ``nn.ModuleList``s."""
    lists: list[tuple[str, nn.ModuleList]] = []
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) and not any(name.startswith(n + ".") for n, _ in lists):
            lists.append((name, m))
    return [b for _, ml in lists for b in ml]


def _calls_sdpa(model: nn.Module) -> bool:
    for m in model.modules():
        try:
            src = inspect.getsource(type(m))
        except (OSError, TypeError):
            continue
        if "scaled_dot_product_attention" in src:
            return True
    return False


def _model_kind(model: nn.Module) -> ModelKind:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if _hf.is_hf_model(model):
        if not _hf.supports_attention_interface(model):
            raise TypeError(f"{type(model).__name__} does not dispatch attention through transformers' "
                            f"AttentionInterface, so seqpar cannot take it over")
        return "hf"
    if any(isinstance(m, nn.MultiheadAttention) for m in model.modules()):
        raise TypeError("model uses nn.MultiheadAttention, which seqpar cannot shard; call "
                        "torch.nn.functional.scaled_dot_product_attention instead")
    if not _calls_sdpa(model):
        raise TypeError(f"{type(model).__name__} has no supported attention: seqpar takes over Hugging Face models "
                        f"using AttentionInterface and models calling "
                        f"torch.nn.functional.scaled_dot_product_attention")
    return "sdpa"


def _sync_params(model: nn.Module, group: dist.ProcessGroup) -> None:
    src = dist.get_global_rank(group, 0)
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.device.type != "meta":
                dist.broadcast(t.data, src=src, group=group)


def _attention_pass(model: nn.Module, kind: ModelKind, rt: _Runtime) -> None:
    if kind == "hf":
        _hf.register_attention(model, rt.attention, name=rt.name, world=rt.world)
        return
    rt.mode = _SDPAMode(rt)

    def pre(module, args):
        rt.enter_mode()

    def post(module, args, output):
        rt.exit_mode()

    for m in model.modules():  # every module: a recomputation may start anywhere inside the model
        m.register_forward_pre_hook(pre)
        m.register_forward_hook(post, always_call=True)


def _loss_pass(model: nn.Module, kind: ModelKind, rt: _Runtime) -> None:
    def pre(module, args, kwargs):
        if kind == "sdpa":
            kwargs.pop("shift_labels", None)
            kwargs.pop("num_items_in_batch", None)
            return args, kwargs
        if kwargs.get("labels") is not None and ("num_items_in_batch" not in kwargs or "shift_labels" not in kwargs):
            raise ValueError("seqpar: labels without shift_labels/num_items_in_batch; build the batch with "
                             "seqpar.shard_batch(batch, mesh, layout=...) so the loss is the global-token mean")
        if "position_ids" not in kwargs and "input_ids" in kwargs:
            raise ValueError("seqpar: no position_ids; the model would number the local shard 0..S/P-1. Use "
                             "seqpar.shard_batch, which adds the global positions")
        if kwargs.get("past_key_values") is not None:
            raise ValueError("seqpar: past_key_values (KV cache) is not supported on a sharded sequence")
        kwargs.setdefault("use_cache", False)
        return args, kwargs

    def post(module, args, kwargs, output):
        if kind != "hf" or kwargs.get("labels") is None:
            return output
        if isinstance(output, tuple):
            return (reduce_forward(output[0], rt.group), *output[1:])
        output["loss"] = reduce_forward(output["loss"], rt.group)
        return output

    model.register_forward_pre_hook(pre, with_kwargs=True)
    model.register_forward_hook(post, with_kwargs=True)


def _checkpoint_pass(model: nn.Module, blocks: list[nn.Module], rt: _Runtime) -> None:
    from torch.utils.checkpoint import checkpoint

    if getattr(model, "is_gradient_checkpointing", False):
        model.gradient_checkpointing_disable()  # ours replaces HF's (which would re-run the ring)
    for block in blocks:
        inner = block.forward  # the bound forward; hooks stay outside the checkpoint

        def forward(*args, _inner=inner, **kwargs):
            frame = _Frame()
            return checkpoint(_inner, *args, use_reentrant=False,
                              context_fn=lambda: (rt.frame(frame, True), rt.frame(frame, False)), **kwargs)

        block.forward = forward


def _grad_pass(model: nn.Module, blocks: list[nn.Module], mesh: DeviceMesh, dp: int, fsdp: bool) -> None:
    flat = _flat_mesh(mesh)
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for m in [*blocks, model]:
            fully_shard(m, mesh=flat)
            # gloo has no PREMUL_SUM: reduce with SUM, then divide by dp (sum over cp, mean over dp)
            m.set_force_sum_reduction_for_comms(True)
            m.set_gradient_divide_factor(float(dp))
        return
    group = flat.get_group()

    def hook(p: torch.Tensor) -> None:
        dist.all_reduce(p.grad, group=group)
        if dp > 1:
            p.grad.div_(dp)

    for p in model.parameters():
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(hook)


def parallelize(
    model: nn.Module,
    mesh: DeviceMesh,
    *,
    layout: str = "zigzag",
    method: str = "ring",
    fsdp: bool = True,
    checkpoint: bool = False,
    backend: str = "auto",
) -> nn.Module:
    """Apply sequence parallelism (and FSDP2 / activation checkpointing) to ``model`` in place.

    ``mesh``: a DeviceMesh with a "cp" dim (``seqpar.init_mesh``); ("dp", "cp") for data parallelism
    on top. ``layout``/``method``/``backend`` as in :func:`seqpar.attention`; batches must be sharded
    with the same layout (:func:`seqpar.shard_batch`). Passes, in order: check, sync, attention,
    loss, checkpoint, data-parallel gradients (see the module docstring). Returns ``model``.
    """
    dp, _ = check_mesh(mesh)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    for name, flag in (("fsdp", fsdp), ("checkpoint", checkpoint)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    kind = _model_kind(model)
    blocks = find_blocks(model)
    if (fsdp or checkpoint) and not blocks:
        raise TypeError(f"{type(model).__name__} has no nn.ModuleList of blocks to shard/checkpoint per block")
    rt = _Runtime(_cp_group(mesh), layout, method, backend)

    _sync_params(model, _flat_mesh(mesh).get_group())
    _attention_pass(model, kind, rt)
    _loss_pass(model, kind, rt)
    if checkpoint:
        _checkpoint_pass(model, blocks, rt)
    _grad_pass(model, blocks, mesh, dp, fsdp)
    return model
