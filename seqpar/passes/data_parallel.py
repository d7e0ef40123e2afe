"""Pass 6, data-parallel: gradients over the dp x cp ranks flattened.

Parameters are replicated over cp, so cp ranks share the sharding. ``fsdp=True``: FSDP2
``fully_shard`` per block, then the root, with the memory options of :class:`~seqpar.fsdp_options.FSDPOptions`
(``precision`` -> ``MixedPrecisionPolicy``, ``reshard`` -> ``reshard_after_forward``, ``fsdp_offload`` ->
``CPUOffloadPolicy``); ``fsdp=False``: full parameters, each backward's gradient contributions
all-reduced in one collective per dtype at the end of the backward (:func:`_all_reduce_gradients`).
Either way the gradient is summed over cp and averaged over dp (FSDP: SUM reduce-scatter + post-divide
by dp, since gloo lacks PREMUL_SUM; under "bf16" / "fp16" both in the fp32 reduce dtype).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from seqpar.fsdp_options import FSDPOptions
from seqpar.mesh import flat_mesh

__all__ = ["check_fsdp_options", "data_parallel_pass", "fsdp_kwargs"]

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_fsdp_options(model: nn.Module, fsdp: bool, options: FSDPOptions) -> None:
    """``ValueError`` naming the option and the fix: FSDP options without FSDP, or mixed precision on a
    model whose parameters are not fp32 (the sharded fp32 parameters are what the optimizer steps)."""
    if not fsdp and options.non_defaults():
        raise ValueError(
            f"{', '.join(options.non_defaults())} need(s) fsdp=True: they are FSDP2 options (precision: its "
            f"MixedPrecisionPolicy, reshard: reshard_after_forward, fsdp_offload: CPUOffloadPolicy). Pass fsdp=True, "
            f"or drop them; with fsdp=False cast the model yourself (e.g. model.to(torch.bfloat16)) or run it "
            f"under torch.autocast")
    if options.mixed:
        other = [(n, p.dtype) for n, p in model.named_parameters()
                 if p.is_floating_point() and p.dtype != torch.float32]
        if other:
            name, dtype = other[0]
            raise ValueError(
                f"precision={options.precision!r} keeps fp32 sharded parameters and computes in "
                f"{_DTYPES[options.precision]}, but {len(other)} parameter(s) are not fp32 (e.g. {name!r}: {dtype}). "
                f"Call model.float() before parallelize, or pass precision='fp32' to compute in the parameters' "
                f"own dtype")


def fsdp_kwargs(options: FSDPOptions, device_type: str) -> dict:
    """``mp_policy`` / ``offload_policy`` keywords of ``fully_shard`` for ``options`` on ``device_type``."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

    kw: dict = {}
    if options.mixed:  # compute in the low dtype, reduce in fp32; outputs stay in the compute dtype
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=_DTYPES[options.precision], reduce_dtype=torch.float32)
    if options.fsdp_offload == "cpu":  # pinning host memory needs an accelerator
        kw["offload_policy"] = CPUOffloadPolicy(pin_memory=device_type != "cpu")
    return kw


def data_parallel_pass(model: nn.Module, blocks: list[nn.Module], mesh: DeviceMesh, dp: int, fsdp: bool,
                       options: FSDPOptions = FSDPOptions()) -> None:
    flat = flat_mesh(mesh)
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        kw = fsdp_kwargs(options, flat.device_type)
        for b in blocks:  # before fully_shard: runs while FSDP2 still has the block's parameters unsharded
            b.register_forward_hook(_touch_parameters)
        for m in [*blocks, model]:
            after = options.reshard == "after_forward"
            # blocks: True / False. The root: None under "after_forward", FSDP's default for the root (kept
            # after forward: the backward starts with it); False under "keep"
            reshard = (None if after else False) if m is model else after
            fully_shard(m, mesh=flat, reshard_after_forward=reshard, **kw)
            # gloo has no PREMUL_SUM: reduce with SUM, then divide by dp (sum over cp, mean over dp)
            m.set_force_sum_reduction_for_comms(True)
            m.set_gradient_divide_factor(float(dp))
        return
    _all_reduce_gradients(model, flat.get_group(), dp)


def _touch_parameters(module: nn.Module, args, output):
    """A zero that depends on every parameter of ``module``, added to its output, so every parameter gets a
    gradient on every rank. FSDP2 reduce-scatters the parameters that have one; ranks whose tokens left an
    MoE expert unused would otherwise reduce-scatter different sets (a collective mismatch)."""
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        return output
    zero = sum(p.reshape(-1)[:1].sum() for p in params) * 0.0

    def add(t):
        return t + zero.to(t.dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad else t

    if isinstance(output, torch.Tensor):
        return add(output)
    if isinstance(output, tuple) and output:
        return (add(output[0]), *output[1:])
    if isinstance(output, dict):  # a ModelOutput: its first tensor (the hidden states)
        for k, v in output.items():
            if isinstance(v, torch.Tensor) and v.is_floating_point() and v.requires_grad:
                output[k] = add(v)
                break
    return output


def _all_reduce_gradients(model: nn.Module, group, dp: int) -> None:
    """fsdp=False: each backward's gradient contributions summed over the group (divided by dp), in one
    all-reduce per dtype at the end of the backward, the same on every rank whatever each rank's graph used.

    Note
    ----
    Ranks of one cp group run different tokens, so their autograd graphs differ: an MoE expert that no
    token of this shard was routed to gets no gradient here but does on another rank. A per-parameter
    all-reduce hook would then make different collectives on different ranks (a mismatch or a hang).
    So each parameter's contribution of this backward is taken out of ``.grad`` as it is accumulated,
    and at the end of the backward the contributions of all parameters (zeros for the unused ones) and
    one "used here" flag each are all-reduced in parameter order and added back. A parameter no rank
    used keeps ``grad is None`` (as in one process); with gradient accumulation each backward's
    reduced contribution is added once::

        accumulate p:  g = the gradient just accumulated   .grad -= g   pending[p] = g
        end of backward (queued once, outer graph task):
                       flat = [pending[p] or 0 for p] + [used_p]  ->  all_reduce(SUM)  ->  .grad += flat_p / dp

    The gradient just accumulated is what the parameter's tensor hook saw last (a hook also sees
    ``torch.autograd.grad`` calls, e.g. the tiled MLP's recomputation, but the accumulation's call comes
    right before its post-accumulate hook).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    last: dict[int, torch.Tensor] = {}  # id(param) -> the gradient its tensor hook saw last
    pending: dict[int, torch.Tensor] = {}  # id(param) -> this backward's local contribution
    queued = [False]

    def reduce_all() -> None:
        queued[0] = False
        got = dict(pending)
        pending.clear()
        last.clear()
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for p in params:
            by_dtype.setdefault(p.dtype, []).append(p)
        for dtype, ps in by_dtype.items():
            parts = [got[id(p)].reshape(-1) if id(p) in got else p.new_zeros(p.numel()) for p in ps]
            used = torch.tensor([float(id(p) in got) for p in ps], dtype=dtype, device=ps[0].device)
            flat = torch.cat([*parts, used])
            dist.all_reduce(flat, group=group)
            if dp > 1:
                flat[: flat.numel() - len(ps)].div_(dp)
            offset = 0
            for i, p in enumerate(ps):
                n = p.numel()
                if flat[flat.numel() - len(ps) + i] > 0:  # some rank used p
                    g = flat[offset: offset + n].view_as(p)
                    if p.grad is None:
                        p.grad = g.clone()
                    else:
                        p.grad.add_(g)
                offset += n

    def seen(grad: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        last[id(p)] = grad
        return grad

    def accumulated(p: torch.Tensor) -> None:
        g = last.pop(id(p))
        if p.grad is g or p.grad.data_ptr() == g.data_ptr():  # the first accumulation took g itself
            p.grad = None
            g = g.detach().clone() if g.requires_grad else g
        else:
            p.grad.sub_(g)
        pending[id(p)] = g if id(p) not in pending else pending[id(p)] + g
        if not queued[0]:
            queued[0] = True
            torch.autograd.Variable._execution_engine.queue_callback(reduce_all)

    for p in params:
        p.register_hook(lambda grad, p=p: seen(grad, p))
        p.register_post_accumulate_grad_hook(accumulated)
