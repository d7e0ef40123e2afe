"""Pass 6, data-parallel: gradients over the dp x cp ranks flattened.

Parameters are replicated over cp, so cp ranks share the sharding. ``fsdp=True``: FSDP2
``fully_shard`` per block, then the root, with the memory options of :class:`~seqpar.fsdp_options.FSDPOptions`
(``precision`` -> ``MixedPrecisionPolicy``, ``reshard`` -> ``reshard_after_forward``, ``fsdp_offload`` ->
``CPUOffloadPolicy``); ``fsdp=False``: full parameters, each backward's gradient contributions
all-reduced in one collective per dtype at the end of the backward (:func:`_all_reduce_gradients`).
Either way the gradient is summed over cp and averaged over dp (FSDP: SUM reduce-scatter + post-divide
by dp, since gloo lacks PREMUL_SUM; under "bf16" / "fp16" both in the fp32 reduce dtype).

Parameters shared between blocks (Zamba ties its hybrid layers' shared transformer block: one Parameter
object in the ``shared_transf`` of several layers) would be managed by two FSDP units, which FSDP2 refuses.
:func:`fsdp_units` puts, per block, the child holding a shared parameter into one grouped unit with its
twins (``fully_shard([layers.1.shared_transf, layers.3.shared_transf])``), sharded before the blocks so each
block's unit keeps only its own parameters; a parameter shared in a way no grouping of block children can
hold (registered on the model itself, or on a module that holds blocks) is refused at ``check`` by name.

Note
----
Zamba, 4 blocks, layers 1 and 3 share ``shared_transf``'s parameters::

    units, in fully_shard order:  [layers.1.shared_transf, layers.3.shared_transf]   (grouped, one all-gather)
                                  layers.0 | layers.1 (linear, mamba_decoder) | layers.2 | layers.3 (...)
                                  the model (embeddings, norm, head)
    touch term (a zero from every parameter of a unit, so ranks reduce-scatter the same sets): per unit
    member, its own unit's parameters only (a nested unit's are resharded DTensors by then)
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from seqpar.fsdp_options import FSDPOptions
from seqpar.mesh import flat_mesh

__all__ = ["check_fsdp_options", "data_parallel_pass", "fsdp_kwargs", "fsdp_units"]

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


def fsdp_units(model: nn.Module, blocks: list[nn.Module]) -> list[list[nn.Module]]:
    """The FSDP2 units below the root, in ``fully_shard`` order: grouped units of the modules that share
    parameters across blocks (per occurrence, the block's child on the way to it, or the block itself for its
    own parameters, or the module outside the blocks that holds it), then every block not itself in one.
    FSDP2 refuses a parameter object held by two units; ``ValueError`` naming it where no grouping can hold it
    (a parameter of a module that holds the blocks; fix: ``fsdp=False``). No communication."""
    block_ids = {id(b) for b in blocks}
    occurrences: dict[int, list[tuple[str, int | None, nn.Module]]] = {}  # param -> (name, block, unit member)

    def walk(m: nn.Module, prefix: str, block: nn.Module | None, member: nn.Module | None) -> None:
        for name, p in m.named_parameters(recurse=False, remove_duplicate=False):
            occurrences.setdefault(id(p), []).append((prefix + name, None if block is None else id(block),
                                                      m if member is None else member))
        for name, c in m.named_children():
            inner = (c, c) if id(c) in block_ids else (block, c if member is block and block is not None else member)
            walk(c, f"{prefix}{name}.", *inner)

    walk(model, "", None, None)
    holders = {id(m) for m in model.modules() if any(id(x) in block_ids for x in m.modules())}
    parent: dict[int, int] = {}  # union-find over the unit members that hold one shared parameter
    members: dict[int, nn.Module] = {}

    def find(i: int) -> int:
        while parent.setdefault(i, i) != i:
            i = parent[i]
        return i

    for occ in occurrences.values():
        if len({block for _, block, _ in occ}) < 2:  # within one block, or only outside them (tied embeddings)
            continue
        for name, block, member in occ:
            if block is None and id(member) in holders:
                raise ValueError(
                    f"fsdp=True: parameter {name!r} is shared between blocks and {type(member).__name__}, which holds "
                    f"the blocks ({', '.join(n for n, _, _ in occ)}), so no FSDP2 unit below the model can hold it. "
                    f"Pass fsdp=False (parameters replicated, gradients all-reduced)")
            members[id(member)] = member
            parent[find(id(member))] = find(id(occ[0][2]))
    groups: dict[int, list[nn.Module]] = {}
    for i, m in members.items():
        groups.setdefault(find(i), []).append(m)
    order = {id(m): k for k, m in enumerate(model.modules())}
    todo = [sorted(g, key=lambda m: order[id(m)]) for g in groups.values()]
    for g in todo:
        inside = {id(x) for m in g for x in m.modules() if x is not m}
        if any(id(m) in inside for m in g):
            raise ValueError(f"fsdp=True: modules {[type(m).__name__ for m in g]} share parameters and hold one "
                             f"another, so no FSDP2 unit can hold them. Pass fsdp=False")
    shared: list[list[nn.Module]] = []
    while todo:  # a unit whose members hold another unit's members is sharded after it (FSDP2 nests)
        ready = [g for g in todo if not any(h is not g and any(x is y for m in g for x in m.modules() for y in h)
                                           for h in todo)]
        if not ready:
            raise ValueError("fsdp=True: the modules that share parameters between blocks hold one another in a "
                             "cycle, so FSDP2 units cannot nest. Pass fsdp=False")
        ready.sort(key=lambda g: order[id(g[0])])
        shared += ready
        todo = [g for g in todo if not any(g is r for r in ready)]
    grouped = {id(m) for g in shared for m in g}
    return [*shared, *([b] for b in blocks if id(b) not in grouped)]


def data_parallel_pass(model: nn.Module, blocks: list[nn.Module], mesh: DeviceMesh, dp: int, fsdp: bool,
                       options: FSDPOptions = FSDPOptions()) -> None:
    flat = flat_mesh(mesh)
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        kw = fsdp_kwargs(options, flat.device_type)
        units = fsdp_units(model, blocks)
        nested: set[int] = set()  # parameters of the units before (a unit member's nested units)
        for unit in units:  # before fully_shard: runs while FSDP2 still has the unit's parameters unsharded
            own = {id(p) for m in unit for p in m.parameters()} - nested
            for m in unit:
                names = tuple(n for n, p in m.named_parameters() if id(p) in own and p.requires_grad)
                m.register_forward_hook(functools.partial(_touch_parameters, names=names))
            nested |= own
        for unit in [*units, [model]]:
            after = options.reshard == "after_forward"
            # units: True / False. The root: None under "after_forward", FSDP's default for the root (kept
            # after forward: the backward starts with it); False under "keep"
            reshard = (None if after else False) if unit[0] is model else after
            fully_shard(unit if len(unit) > 1 else unit[0], mesh=flat, reshard_after_forward=reshard, **kw)
            # gloo has no PREMUL_SUM: reduce with SUM, then divide by dp (sum over cp, mean over dp); a grouped
            # unit's modules share one state
            unit[0].set_force_sum_reduction_for_comms(True)
            unit[0].set_gradient_divide_factor(float(dp))
        return
    _all_reduce_gradients(model, flat.get_group(), dp)


def _touch_parameters(module: nn.Module, args, output, names: tuple[str, ...]):
    """A zero that depends on the parameters ``names`` of ``module`` (its own unit's), added to its output, so
    every parameter gets a gradient on every rank. FSDP2 reduce-scatters the parameters that have one; ranks
    whose tokens left an MoE expert unused would otherwise reduce-scatter different sets (a collective
    mismatch). Looked up by name at each call: FSDP2 swaps the module's parameter objects."""
    params = [module.get_parameter(n) for n in names]
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
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}  # per reduction: model.to(dtype) may cast them
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
