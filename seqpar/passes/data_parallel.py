"""Pass 6, data-parallel: gradients over the dp x cp ranks flattened.

Parameters are replicated over cp, so cp ranks share the sharding. ``fsdp=True``: FSDP2
``fully_shard`` per block, then the root, with the memory options of :class:`~seqpar.fsdp_options.FSDPOptions`
(``precision`` -> ``MixedPrecisionPolicy``, ``reshard`` -> ``reshard_after_forward``, ``fsdp_offload`` ->
``CPUOffloadPolicy``); ``fsdp=False``: full parameters, a post-accumulate-grad hook per parameter
all-reduces. Either way the gradient is summed over cp and averaged over dp (FSDP: SUM reduce-scatter
+ post-divide by dp, since gloo lacks PREMUL_SUM; under "bf16" / "fp16" both in the fp32 reduce dtype).
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
    group = flat.get_group()

    def hook(p: torch.Tensor) -> None:
        dist.all_reduce(p.grad, group=group)
        if dp > 1:
            p.grad.div_(dp)

    for p in model.parameters():
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(hook)
