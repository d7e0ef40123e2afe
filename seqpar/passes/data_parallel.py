"""Pass 5, data-parallel: gradients over the dp x cp ranks flattened.

Parameters are replicated over cp, so cp ranks share the sharding. ``fsdp=True``: FSDP2
``fully_shard`` per block, then the root; ``fsdp=False``: full parameters, a post-accumulate-grad
hook per parameter all-reduces. Either way the gradient is summed over cp and averaged over dp
(FSDP: SUM reduce-scatter + post-divide by dp, since gloo lacks PREMUL_SUM).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from seqpar.mesh import flat_mesh

__all__ = ["data_parallel_pass"]


def data_parallel_pass(model: nn.Module, blocks: list[nn.Module], mesh: DeviceMesh, dp: int, fsdp: bool) -> None:
    flat = flat_mesh(mesh)
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
