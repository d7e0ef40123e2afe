"""The methods as ``torch.library`` custom ops, so ``torch.compile(fullgraph=True)`` traces through them.

Three ops, parameterised by the method name (one registration serves every method of
:func:`seqpar.methods.build`)::

    seqpar::attention_fwd(q, k, v, <call>)                  -> (out, lse)     autograd: attention_bwd
    seqpar::attention_replay(q, k, v, out, lse, <call>)     -> out            (a kept forward; autograd: attention_bwd)
    seqpar::attention_bwd(dout, q, k, v, out, lse, <call>)  -> (dq, dk, dv)

    <call> = method: str, group_name: str, layout: str, causal: bool, window: int[2], softcap: float,
             scale: float, backend: str        (window, softcap: seqpar.masks.MaskSpec; no documents)

The process group travels by name (``ProcessGroup.group_name``; "" for a single process), as
PyTorch's context-parallel ops do: a ProcessGroup object is not a valid op argument, and a name
keeps the graph free of Python objects. ``register_fake`` gives the output shapes without running
anything, so the compiler never communicates while tracing. Inside, each op builds the method
object and calls its ``forward`` / ``backward``: the same code as eager.

Only torch.distributed groups have names: transports that are not torch.distributed (MPI, thread-ranks)
run eagerly (``seqpar.api`` uses these ops only while compiling). Messages of ops carry the tags of
call 0: the per-call numbering is host-side bookkeeping that a compiled graph cannot update.
"""

from __future__ import annotations

import torch

from seqpar.kernels import acc_dtype
from seqpar.masks import MaskSpec

__all__ = ["attention_fwd", "attention_bwd", "attention_replay", "group_name"]


def group_name(group) -> str:
    """The op argument for a resolved group: its registered name, "" for a single process."""
    return "" if group is None else group.group_name


def _method(method: str, name: str, layout: str, causal: bool, window: list[int], softcap: float, scale: float,
            backend: str):
    from seqpar.methods import build  # the package imports this module

    group = None
    if name:
        from torch.distributed.distributed_c10d import _resolve_process_group

        group = _resolve_process_group(name)
    mask = MaskSpec(causal=causal, window=(window[0], window[1]), softcap=softcap)
    return build(method, group, layout=layout, mask=mask, scale=scale, backend=backend)


@torch.library.custom_op("seqpar::attention_fwd", mutates_args=())
def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, method: str, group: str, layout: str,
                  causal: bool, window: list[int], softcap: float, scale: float,
                  backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = _method(method, group, layout, causal, window, softcap, scale, backend).forward(q, k, v)
    return out.to(q.dtype).contiguous(), lse.contiguous()  # contiguous: the strides register_fake promises


@attention_fwd.register_fake
def _(q, k, v, method, group, layout, causal, window, softcap, scale, backend):
    out = q.new_empty((*q.shape[:-1], v.shape[-1]))  # (B, Hq, S_local, D)
    lse = q.new_empty(q.shape[:-1], dtype=acc_dtype(q.dtype))  # (B, Hq, S_local)
    return out, lse


@torch.library.custom_op("seqpar::attention_replay", mutates_args=())
def attention_replay(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                     method: str, group: str, layout: str, causal: bool, window: list[int], softcap: float,
                     scale: float,
                     backend: str) -> torch.Tensor:
    return out.contiguous().clone()  # an op's output may not alias its input


@attention_replay.register_fake
def _(q, k, v, out, lse, method, group, layout, causal, window, softcap, scale, backend):
    return out.new_empty(out.shape)


@torch.library.custom_op("seqpar::attention_bwd", mutates_args=())
def attention_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                  lse: torch.Tensor, method: str, group: str, layout: str, causal: bool, window: list[int],
                  softcap: float, scale: float,
                  backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    impl = _method(method, group, layout, causal, window, softcap, scale, backend)
    dq, dk, dv = impl.backward(dout.contiguous(), q, k, v, out, lse)
    # fresh contiguous tensors (the strides and offsets register_fake promises): dk and dv may be
    # views of one buffer, and an op's outputs may not alias each other
    fresh = lambda t: t.clone(memory_format=torch.contiguous_format)  # noqa: E731
    return dq.contiguous(), fresh(dk), fresh(dv)


@attention_bwd.register_fake
def _(dout, q, k, v, out, lse, method, group, layout, causal, window, softcap, scale, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_fwd(ctx, inputs, output):
    q, k, v, *call = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.call, ctx.n_inputs = call, len(inputs)


def _setup_replay(ctx, inputs, output):
    q, k, v, out, lse, *call = inputs
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.call, ctx.n_inputs = call, len(inputs)


def _backward(ctx, dout, *unused):  # unused: the lse's gradient (lse is not differentiable)
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = attention_bwd(dout, q, k, v, out, lse, *ctx.call)
    return dq, dk, dv, *([None] * (ctx.n_inputs - 3))


attention_fwd.register_autograd(_backward, setup_context=_setup_fwd)
attention_replay.register_autograd(_backward, setup_context=_setup_replay)
